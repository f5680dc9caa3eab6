"""JSON lines over pipes: how the orchestrator and its child processes talk.

Children print one JSON object per line on stdout (events and their final result) and read
commands the same way on stdin, so a slow or silent child shows up as a timeout, never a hang.
"""

from __future__ import annotations

import sys
from typing import Any

import orjson
import trio


class LineReader:
    """Whole lines from a byte stream (a child's stdout, or our own stdin)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def readline(self) -> bytes | None:
        """The next line without its newline, or None at end of stream."""
        while True:
            cut = self.buffer.find(b"\n")
            if cut >= 0:
                line = bytes(self.buffer[:cut])
                del self.buffer[: cut + 1]
                return line
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self.buffer += chunk

    async def read_json(self) -> dict[str, Any] | None:
        """The next line that is a JSON object (other output, such as warnings, is skipped)."""
        while True:
            line = await self.readline()
            if line is None:
                return None
            if line.startswith(b"{"):
                try:
                    value = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(value, dict):
                    return value


def emit(**fields: Any) -> None:
    """Print one JSON object as a line on stdout, flushed so the reader sees it at once."""
    sys.stdout.write(orjson.dumps(fields).decode() + "\n")
    sys.stdout.flush()
