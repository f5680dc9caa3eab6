"""`agent-gateway serve` as a real child process: start it, find its ports, kill it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import trio
from e2e_support import ADMIN_TOKEN, CertificateAuthority

RUNTIME_LINE = re.compile(r"runtimes connect to (wss://\S+)")
CONTROL_LINE = re.compile(r"control API at (http://\S+)")


class GatewayProcess:
    """One `python -m gateway serve` child on ephemeral ports, with its stdout parsed for URLs."""

    def __init__(self, data_dir: Path, ca: CertificateAuthority, *extra: str) -> None:
        self.data_dir = data_dir
        self.ca = ca
        self.extra = extra
        self.process: trio.Process | None = None
        self.runtime_url = ""
        self.control_url = ""
        self.output: list[str] = []

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the gateway and wait until it says where it listens."""
        command = [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--port",
            "0",
            "--control-port",
            "0",
            "--tls-cert",
            str(self.ca.cert),
            "--tls-key",
            str(self.ca.key),
            *self.extra,
        ]
        env = {**os.environ, "AGENT_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
        self.process = await nursery.start(
            lambda task_status=trio.TASK_STATUS_IGNORED: trio.run_process(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                check=False,
                task_status=task_status,
            )
        )
        assert self.process is not None and self.process.stdout is not None
        ready = trio.Event()
        nursery.start_soon(self._read_output, ready)
        with trio.fail_after(30):
            await ready.wait()

    async def _read_output(self, ready: trio.Event) -> None:
        assert self.process is not None and self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *lines, rest = buffer.split(b"\n")
            buffer = rest
            for raw in lines:
                line = raw.decode(errors="replace")
                self.output.append(line)
                if match := RUNTIME_LINE.search(line):
                    self.runtime_url = match.group(1)
                if match := CONTROL_LINE.search(line):
                    self.control_url = match.group(1)
                if self.runtime_url and self.control_url:
                    ready.set()

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup, exactly like a crash."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM: a graceful drain."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def hangup(self) -> None:
        """SIGHUP: reload the TLS certificate."""
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    async def wait(self, timeout: float = 30) -> int:
        """The exit code, waiting at most `timeout` seconds."""
        assert self.process is not None
        with trio.fail_after(timeout):
            return await self.process.wait()
