"""The load generators' side of the wire: raw frames, prepared up front, and bare connections.

Clients here do as little as a client can: frames are string templates filled with a counter,
replies are checked with a substring test, and only the few replies whose content matters (attach,
input deliveries) are parsed. Nothing is validated against the schemas on this side.
"""

from __future__ import annotations

import ssl
from typing import Any

import orjson
import trio
from trio_websocket import WebSocketConnection, connect_websocket_url

HEARTBEAT_REPLY = '"channel":"runtime.session.heartbeat.reply"'
ACCEPTED = '"accepted":true'
MAX_MESSAGE = 8 << 20  # input deliveries can exceed trio-websocket's 1 MiB default


async def connect(
    nursery: trio.Nursery, url: str, ssl_context: ssl.SSLContext, token: str | None = None
) -> WebSocketConnection:
    """Open one WebSocket (TLS + upgrade) whose reader task lives in `nursery`."""
    headers = [] if token is None else [(b"authorization", f"Bearer {token}".encode())]
    return await connect_websocket_url(
        nursery, url, ssl_context, extra_headers=headers, max_message_size=MAX_MESSAGE
    )


def attach_frame(run_id: str, instance: str) -> str:
    """An attach command for `run_id` (no capabilities asked: none of the scenarios needs one)."""
    return orjson.dumps(
        {
            "channel": "runtime.session.attach.command",
            "id": "attach-1",
            "payload": {"runId": run_id, "runtimeInstanceId": instance, "protocolVersion": "v1"},
        }
    ).decode()


class AttachFailed(Exception):
    """The gateway answered an attach with something other than its reply."""


def session_of(reply: str | bytes) -> str:
    """The sessionId an attach reply grants (raises AttachFailed on an error frame)."""
    frame: dict[str, Any] = orjson.loads(reply)
    if frame.get("channel") != "runtime.session.attach.reply":
        raise AttachFailed(str(frame.get("payload", {}).get("code", "no reply")))
    session_id: str = frame["payload"]["sessionId"]
    return session_id


async def attach(ws: WebSocketConnection, run_id: str, instance: str) -> str:
    """Attach `run_id` on `ws` and return its sessionId."""
    await ws.send_message(attach_frame(run_id, instance))
    return session_of(await ws.get_message())


class HeartbeatFrames:
    """One session's heartbeat command with a fresh request id each time (~200 bytes)."""

    __slots__ = ("count", "prefix", "suffix")

    def __init__(self, session_id: str, run_id: str, instance: str) -> None:
        body = orjson.dumps(
            {
                "sessionId": session_id,
                "runId": run_id,
                "runtimeInstanceId": instance,
                "metadata": {"load": 0.25, "inflight": 3},
            }
        ).decode()
        self.prefix = '{"channel":"runtime.session.heartbeat.command","id":"hb-'
        self.suffix = '","payload":' + body + "}"
        self.count = 0

    def next(self) -> str:
        """The next frame."""
        self.count += 1
        return self.prefix + str(self.count) + self.suffix


def output_batch(session_id: str, run_id: str, first_seq: int, count: int, text: str) -> str:
    """A publish frame of `count` events numbered from `first_seq`, each about 200 bytes."""
    events = [
        {
            "eventId": f"evt-{first_seq + i}",
            "seq": first_seq + i,
            "type": "log.line",
            "data": {"text": text, "step": first_seq + i},
            "timestamp": "2026-01-01T00:00:00.000Z",
        }
        for i in range(count)
    ]
    frame = {
        "channel": "runtime.task.output.event",
        "id": f"out-{first_seq}",
        "payload": {"sessionId": session_id, "runId": run_id, "events": events},
    }
    return orjson.dumps(frame).decode()


def ack_frame(session_id: str, run_id: str, seq: int) -> str:
    """An input acknowledgement up to and including `seq`."""
    return orjson.dumps(
        {
            "channel": "runtime.task.input.ack.command",
            "id": f"ack-{seq}",
            "payload": {"sessionId": session_id, "runId": run_id, "seq": seq},
        }
    ).decode()
