"""File-descriptor limits: the gateway raises its soft limit and never promises more sessions than
its descriptors can hold (a connection past the limit would hang at accept, never see a 503)."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

from gateway.limits import FD_RESERVE, raise_nofile, session_capacity


def test_capacity_is_the_setting_or_what_the_descriptors_allow() -> None:
    assert session_capacity(100, 1024) == 100
    assert session_capacity(50_000, 1024) == 1024 - FD_RESERVE
    assert session_capacity(50_000, FD_RESERVE) == 1  # never zero: the gateway still serves
    # An unlimited soft limit (what raise_nofile returns then) leaves --max-sessions as it is.
    assert session_capacity(50_000, resource.RLIM_INFINITY) == 50_000


def _python(code: str, soft: int, hard: int) -> subprocess.CompletedProcess[str]:
    """Run `code` in a child whose RLIMIT_NOFILE starts at (soft, hard)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = min(hard, 4096)
    child = _python(
        "from gateway.limits import raise_nofile; print(raise_nofile())", 256, ceiling
    )
    assert child.returncode == 0, child.stderr
    assert int(child.stdout) == ceiling
    assert raise_nofile() >= resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def test_serve_holds_no_more_sessions_than_its_descriptors_allow(tmp_path: Path) -> None:
    """`serve` says so at start and lowers --max-sessions, instead of hanging runtimes later."""
    hard = FD_RESERVE + 72

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))

    command = [sys.executable, "-m", "gateway", "serve", "--dev", "--port", "0",
               "--control-port", "0", "--data-dir", str(tmp_path), "--max-sessions", "50000",
               "--drain-timeout-s", "0"]
    with subprocess.Popen(command, preexec_fn=limit, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True) as gateway:
        assert gateway.stdout is not None
        said = []
        try:
            for line in gateway.stdout:
                said.append(line)
                if "runtimes connect to wss://" in line:
                    break
        finally:
            gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(timeout=30) == 0, said
    assert any(
        f"RLIMIT_NOFILE is {hard}: holding at most 72 runtime connections" in line
        for line in said
    ), said
