"""The proposal to trio-websocket, measured: an echo server that reads in each connection's task.

    python -m bench.direct_echo --cert C --key K

trio-websocket gives every connection a reader task and a message channel between it and the
handler; an idle connection holds both, parked. This server is the alternative: the handler's
own task reads the TLS stream and feeds wsproto (the protocol library trio-websocket is built
on), answering pings and closes and echoing messages, with the same TLS context as the other
servers. `nox -s bench` measures its idle memory next to the trio-websocket echo server's
(`direct_echo_conn_kib` and `echo_conn_kib`); the gateway itself does not use it.

It listens on a free loopback port and prints `echo server at wss://localhost:PORT/echo`, like
`bench.echo_server`, until SIGTERM or SIGINT.
"""

from __future__ import annotations

import ssl
from functools import partial

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)

from bench.echo_server import run_echo_server

RECEIVE_BYTES = 4096  # trio-websocket's default receive size, so reads are alike


async def echo_connection(stream: trio.abc.Stream) -> None:
    """Serve one connection from its own task: upgrade, then echo until it closes."""
    ws = WSConnection(ConnectionType.SERVER)
    text: list[str] = []
    binary: list[bytes] = []
    try:
        while data := await stream.receive_some(RECEIVE_BYTES):
            ws.receive_data(bytes(data))  # the same object when it already is bytes
            out: list[bytes] = []
            closing = False
            for event in ws.events():
                if isinstance(event, Request):
                    out.append(ws.send(AcceptConnection()))
                elif isinstance(event, TextMessage):
                    text.append(event.data)
                    if event.message_finished:
                        out.append(ws.send(Message(data="".join(text))))
                        text.clear()
                elif isinstance(event, BytesMessage):
                    binary.append(bytes(event.data))
                    if event.message_finished:
                        out.append(ws.send(Message(data=b"".join(binary))))
                        binary.clear()
                elif isinstance(event, Ping):
                    out.append(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    out.append(ws.send(event.response()))
                    closing = True
            if out:
                await stream.send_all(b"".join(out))
            if closing:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the peer went away
    finally:
        await trio.aclose_forcefully(stream)


async def serve(
    context: ssl.SSLContext, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen on a free loopback port until cancelled; `task_status` gets the port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_ssl_over_tcp, echo_connection, 0, context, host="127.0.0.1")
        )
        task_status.started(listeners[0].transport_listener.socket.getsockname()[1])


async def _start(nursery: trio.Nursery, context: ssl.SSLContext) -> int:
    port: int = await nursery.start(serve, context)
    return port


def main() -> None:
    """Parse the flags and serve until told to stop."""
    run_echo_server(_start, __doc__)


if __name__ == "__main__":
    main()
