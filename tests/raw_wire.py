"""A WebSocket client that sends exactly the bytes a test asks for, for hostile-input tests.

trio-websocket (like every well-behaved client) refuses to send a text frame that is not UTF-8
or to lie about a frame's length, which is exactly what a hostile runtime does. This client does
the opening handshake with wsproto and then writes frames it builds itself; it reads the
gateway's frames back through wsproto, so what it sees is what a real peer would see.
"""

from __future__ import annotations

import json
import os
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

TEXT = 0x1
BINARY = 0x2
CONTINUATION = 0x0


class Closed(Exception):
    """The gateway closed the connection (with this code, or None if the stream just ended)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"closed with {code} {reason!r}")
        self.code = code
        self.reason = reason


class Rejected(Exception):
    """The gateway refused the handshake with an HTTP status."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        super().__init__(f"handshake refused with {status}")
        self.status = status
        self.headers = headers
        self.body = body


def frame_bytes(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One masked client frame, built by hand so nothing checks what it carries."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    length = len(payload)
    if length < 126:
        head.append(0x80 | length)
    elif length < 1 << 16:
        head.append(0x80 | 126)
        head += struct.pack("!H", length)
    else:
        head.append(0x80 | 127)
        head += struct.pack("!Q", length)
    mask = os.urandom(4)
    head += mask
    # XOR with the mask four bytes at a time via int arithmetic: fast enough for megabytes.
    repeated = (mask * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        length, "big"
    )
    return bytes(head) + masked


class RawWire:
    """One raw WebSocket connection: send arbitrary frames, receive parsed ones."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.pending: list[Any] = []

    async def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        """Write one frame exactly as given."""
        await self.stream.send_all(frame_bytes(opcode, payload, fin=fin))

    async def send_text(self, text: str | bytes) -> None:
        """A text frame carrying these bytes (str is UTF-8 encoded; bytes are sent as they are)."""
        data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
        await self.send_frame(TEXT, data)

    async def send_json(self, frame: Any) -> None:
        """A text frame with this value as JSON."""
        await self.send_text(json.dumps(frame))

    async def recv(self, timeout: float = 10) -> dict[str, Any]:
        """The next frame from the gateway as JSON; raises Closed when the gateway closes."""
        with trio.fail_after(timeout):
            while True:
                for event in self._events():
                    if isinstance(event, TextMessage):
                        self.pending.append(event.data)
                        if event.message_finished:
                            text = "".join(self.pending)
                            self.pending.clear()
                            parsed: dict[str, Any] = json.loads(text)
                            return parsed
                    elif isinstance(event, BytesMessage):
                        raise AssertionError("the gateway sent a binary frame")
                    elif isinstance(event, CloseConnection):
                        await self._answer_close(event)
                        raise Closed(event.code, event.reason or "")
                    elif isinstance(event, Ping):
                        await self.stream.send_all(self.ws.send(event.response()))
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    raise Closed(None) from None
                if not data:
                    raise Closed(None)
                self.ws.receive_data(bytes(data))

    def _events(self) -> list[Any]:
        return list(self.ws.events())

    async def _answer_close(self, event: CloseConnection) -> None:
        if self.ws.state is ConnectionState.REMOTE_CLOSING:
            # Busy: our own sender is mid-frame; the gateway has stopped reading it anyway.
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                          trio.BusyResourceError):
                await self.stream.send_all(self.ws.send(event.response()))

    async def call(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send a JSON frame and return the next frame (the tests send one at a time)."""
        await self.send_json(frame)
        return await self.recv()


async def handshake(
    url: str,
    ssl_context: ssl.SSLContext,
    headers: list[tuple[bytes, bytes]],
    *,
    path: str | None = None,
) -> RawWire:
    """Open TLS to the gateway and upgrade; raises Rejected with the HTTP refusal."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    stream = await trio.open_ssl_over_tcp_stream(
        parts.hostname, parts.port, ssl_context=ssl_context
    )
    ws = WSConnection(ConnectionType.CLIENT)
    request = Request(host=parts.hostname, target=path or parts.path, extra_headers=headers)
    await stream.send_all(ws.send(request))
    wire = RawWire(stream, ws)
    status, got_headers, body = 0, [], b""
    with trio.fail_after(10):
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise Closed(None, "the server ended the stream during the handshake")
            ws.receive_data(bytes(data))
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    return wire
                if isinstance(event, RejectConnection):
                    status, got_headers = event.status_code, list(event.headers)
                    if not event.has_body:
                        raise Rejected(status, got_headers, body)
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        raise Rejected(status, got_headers, body)


@asynccontextmanager
async def raw_wire(
    url: str, ssl_context: ssl.SSLContext, token: str | None
) -> AsyncIterator[RawWire]:
    """A raw connection carrying this bearer token; the stream is closed on the way out."""
    headers = [] if token is None else [(b"authorization", f"Bearer {token}".encode())]
    wire = await handshake(url, ssl_context, headers)
    try:
        yield wire
    finally:
        with trio.move_on_after(2):
            await wire.stream.aclose()
