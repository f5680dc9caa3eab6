"""A loopback TCP proxy that misbehaves on purpose: cut, stall (half-open) and delay connections.

The demo uses it to cut a runtime off mid-run; the fault tests use it to prove that leases expire,
sessions recover and nothing is lost. It forwards bytes, so TLS stays end to end. It listens on
loopback only and forwards only to the target it was given.
"""

from __future__ import annotations

import enum

import trio


class Mode(enum.Enum):
    """How the proxy treats traffic right now."""

    PASS = "pass"
    STALL = "stall"  # keep sockets open but forward nothing: a half-open link, no FIN, no RST


class ChaosProxy:
    """Forwards 127.0.0.1:<port> to a target, with faults switched on and off by the caller."""

    def __init__(self, target_host: str, target_port: int, *, chunk: int = 65536) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.chunk = chunk
        self.mode = Mode.PASS
        self.delay_s = 0.0
        self.port = 0
        self._flowing = trio.Event()
        self._flowing.set()
        self._links: set[trio.CancelScope] = set()
        self._cut_after: int | None = None
        self.connections_made = 0

    def cut(self) -> None:
        """Drop every current connection at once, as a failed network would."""
        for scope in list(self._links):
            scope.cancel()

    def cut_mid_frame(self, after_bytes: int) -> None:
        """Drop each connection after it forwards `after_bytes` more bytes (mid-frame, usually)."""
        self._cut_after = after_bytes

    def stall(self) -> None:
        """Stop forwarding in both directions without closing anything."""
        self.mode = Mode.STALL
        self._flowing = trio.Event()

    def resume(self) -> None:
        """Forward again (stalled bytes flow on)."""
        self.mode = Mode.PASS
        self._flowing.set()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept on an ephemeral loopback port until cancelled; `task_status` gets the port."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections_made += 1
        async with client:
            try:
                upstream = await trio.open_tcp_stream(self.target_host, self.target_port)
            except OSError:
                return
            async with upstream, trio.open_nursery() as nursery:
                scope = nursery.cancel_scope
                self._links.add(scope)
                budget = [self._cut_after]  # shared: the cut counts bytes both ways
                nursery.start_soon(self._pump, client, upstream, scope, budget)
                nursery.start_soon(self._pump, upstream, client, scope, budget)
            self._links.discard(scope)

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        scope: trio.CancelScope,
        budget: list[int | None],
    ) -> None:
        try:
            while True:
                data = await source.receive_some(self.chunk)
                if not data:
                    break
                await self._flowing.wait()
                if self.delay_s:
                    await trio.sleep(self.delay_s)
                if budget[0] is not None:
                    if len(data) >= budget[0]:
                        await sink.send_all(data[: budget[0]])
                        break
                    budget[0] -= len(data)
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()  # one direction ended: end both, like a dropped TCP connection
