"""The ceiling: a bare trio-websocket echo server, in its own process, with the gateway's TLS.

    python -m bench.echo_server --cert C --key K

It listens on a free loopback port, prints `echo server at wss://localhost:PORT/echo`, and echoes
every message until stdin closes or SIGTERM arrives. The transport settings are trio-websocket's
defaults, as in `gateway.server.serve_runtime`, so the two differ only by the gateway's own work.
"""

from __future__ import annotations

import argparse
import signal
import sys
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


async def _serve(cert: str, key: str) -> None:
    context = server_context(Path(cert), Path(key))  # the gateway's own, bar its reload hook
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, _echo, "127.0.0.1", 0, context)
            print(f"echo server at wss://localhost:{server.port}/echo", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def main() -> None:
    """Parse the flags and serve until told to stop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    raise_nofile()
    trio.run(_serve, args.cert, args.key)
    sys.exit(0)


if __name__ == "__main__":
    main()
