"""Child processes of a bench run: the gateway, the echo server and the load generators.

Each child is started with its stdout piped (it announces where it listens, or reports results as
JSON lines) and is always stopped on the way out, however the run ends.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import psutil
import trio

from bench.lines import LineReader
from bench.tls import TlsFiles

RUNTIME_LINE = re.compile(rb"runtimes connect to (wss://\S+)")
CONTROL_LINE = re.compile(rb"control API at (http://\S+)")
ECHO_LINE = re.compile(rb"echo server at (wss://\S+)")
STARTUP_S = 120.0  # a gateway loading 20 000 runs on a slow box still starts well within this


class ChildFailed(Exception):
    """A child process ended or went silent before saying what the suite waited for."""


class Child:
    """One running child: its process, a reader of its stdout, and a writer to its stdin."""

    def __init__(self, name: str, process: trio.Process) -> None:
        self.name = name
        self.process = process
        assert process.stdout is not None
        self.out = LineReader(process.stdout)
        self._psutil = psutil.Process(process.pid)

    @property
    def pid(self) -> int:
        """The child's process id (what the CPU and RSS readings are taken of)."""
        return self.process.pid

    def cpu_seconds(self) -> float:
        """User plus system CPU the child has used so far."""
        times = self._psutil.cpu_times()
        return float(times.user + times.system)

    def rss_bytes(self) -> int:
        """The child's resident set size now."""
        return int(self._psutil.memory_info().rss)

    async def expect(self, pattern: re.Pattern[bytes], timeout: float) -> bytes:
        """Read stdout lines until one matches; return the pattern's first group."""
        with trio.move_on_after(timeout):
            while (line := await self.out.readline()) is not None:
                if match := pattern.search(line):
                    return match.group(1)
            code = self.process.poll()
            raise ChildFailed(f"{self.name} exited (code {code}) before it was ready")
        raise ChildFailed(f"{self.name} said nothing matching {pattern.pattern!r} in {timeout} s")

    async def event(self, name: str, timeout: float) -> dict[str, Any]:
        """Wait for the child's next JSON line with `"event": name` (failing on its error)."""
        with trio.move_on_after(timeout):
            while (value := await self.out.read_json()) is not None:
                if value.get("event") == "error":
                    raise ChildFailed(f"{self.name}: {value.get('message')}\n{value.get('trace')}")
                if value.get("event") == name:
                    return value
            raise ChildFailed(f"{self.name} exited (code {self.process.poll()}) before {name!r}")
        raise ChildFailed(f"{self.name} did not report {name!r} within {timeout} s")

    async def send(self, **command: Any) -> None:
        """Write one JSON command line to the child's stdin."""
        assert self.process.stdin is not None
        await self.process.stdin.send_all(orjson.dumps(command) + b"\n")

    def stop(self) -> None:
        """Ask the child to stop (SIGTERM); the gateway drains, the others just exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)


@asynccontextmanager
async def child(
    name: str, command: Sequence[str], *, env: dict[str, str] | None = None,
    stderr: Path | None = None, grace_s: float = 20.0,
) -> AsyncIterator[Child]:
    """Run a child for the block's duration; SIGTERM it afterwards, SIGKILL if it lingers."""
    log = stderr.open("ab") if stderr is not None else None
    process = await trio.lowlevel.open_process(
        list(command),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
    )
    running = Child(name, process)
    try:
        yield running
    finally:
        with trio.CancelScope(shield=True):
            running.stop()
            with trio.move_on_after(grace_s):
                await process.wait()
            if process.poll() is None:
                process.kill()
                await process.wait()
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    await pipe.aclose()
            if log is not None:
                log.close()


def gateway_command(data_dir: Path, tls: TlsFiles, *flags: str) -> list[str]:
    """`python -m gateway serve` on free loopback ports, with this run's certificate."""
    return [
        sys.executable, "-m", "gateway", "serve",
        "--data-dir", str(data_dir), "--port", "0", "--control-port", "0",
        "--tls-cert", str(tls.cert), "--tls-key", str(tls.key), *flags,
    ]


def module_command(module: str, *args: str) -> list[str]:
    """`python -m <module> <args>` with this interpreter."""
    return [sys.executable, "-m", module, *args]
