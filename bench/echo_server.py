"""The ceiling: a bare trio-websocket echo server, in its own process, with the gateway's TLS.

    python -m bench.echo_server --cert C --key K

It listens on a free loopback port, prints `echo server at wss://localhost:PORT/echo`, and echoes
every message until SIGTERM or SIGINT arrives. The transport settings are trio-websocket's
defaults; `gateway.server.serve_runtime` changes only limits and timeouts (max_message_size,
connect_timeout, disconnect_timeout), which cost nothing per message or per idle connection, so
the two differ by the gateway's own work.
"""

from __future__ import annotations

import argparse
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from gateway.limits import raise_nofile
from gateway.tls import server_context


async def _echo(request: WebSocketRequest) -> None:
    ws = await request.accept()
    try:
        while True:
            await ws.send_message(await ws.get_message())
    except ConnectionClosed:
        pass


# Starts an echo server in the nursery on the given TLS context; returns its port.
StartServer = Callable[[trio.Nursery, ssl.SSLContext], Awaitable[int]]


async def _until_signalled(start: StartServer, cert: Path, key: Path) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            # The gateway's own context, bar its reload hook: every server pays for the same TLS.
            port = await start(nursery, server_context(cert, key))
            print(f"echo server at wss://localhost:{port}/echo", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def run_echo_server(start: StartServer, doc: str | None) -> None:
    """Parse --cert/--key and serve until SIGTERM/SIGINT: the main of every bench echo server."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--cert", required=True, type=Path)
    parser.add_argument("--key", required=True, type=Path)
    args = parser.parse_args()
    raise_nofile()
    trio.run(_until_signalled, start, args.cert, args.key)
    sys.exit(0)


async def _start(nursery: trio.Nursery, context: ssl.SSLContext) -> int:
    server = await nursery.start(serve_websocket, _echo, "127.0.0.1", 0, context)
    return int(server.port)


def main() -> None:
    """Parse the flags and serve until told to stop."""
    run_echo_server(_start, __doc__)


if __name__ == "__main__":
    main()
