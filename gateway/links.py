"""One runtime connection's way out.

Frames answering the connection's own commands are sent straight from its own task (a channel
hand-off would cost more than the rest of the frame's work). Frames that other tasks produce
(input deliveries posted by the platform, a close for a superseded connection) go through a
queue that the connection's writer task drains, bounded for them (a delivery split into several
frames goes in whole). Input deliveries from the own task take that queue too, queued as the core
decides them: the runtime must get them in seq order. They do not count toward the bound, since
the own task waits for them to be sent.
The queue and the writer are made when first needed: most connections never need them, and idle
sessions are what a gateway holds.

A runtime that stops reading fills that queue, or stalls a send (direct or queued) past
`send_timeout_s`, and is closed with 4003 instead of making the gateway hold its frames in memory.

A direct send is not wrapped in its own cancel scope: entering and leaving one costs about as much
as the rest of a heartbeat's own work. Each link notes when its send began, and one watchdog task
(`watch_sends`) sweeps the links a few times per timeout and aborts those stuck too long.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from statemachine.messages import CloseCode


class Link:
    """The outbound side of one runtime connection."""

    __slots__ = (
        "_capacity",
        "_now",
        "_nursery",
        "_others_queued",
        "_others_taken",
        "_outbox",
        "_queued",
        "_send_ended",
        "_sent_queued",
        "_written",
        "close_code",
        "close_reason",
        "conn_id",
        "scope",
        "send_timeout_s",
        "sending_since",
        "writing_since",
        "ws",
    )

    def __init__(
        self,
        conn_id: int,
        ws: WebSocketConnection,
        capacity: int,
        nursery: trio.Nursery,
        send_timeout_s: float = 10.0,
        now: Callable[[], float] = trio.current_time,
    ) -> None:
        self.conn_id = conn_id
        self.ws = ws
        self.scope = nursery.cancel_scope  # cancelling it ends the connection
        self.send_timeout_s = send_timeout_s
        self._nursery = nursery
        self._now = now  # trio's clock; the gateway passes its direct reader (`Clock.trio_now`)
        self._capacity = capacity
        # Each frame is queued with whether the connection's own task queued it (see `enqueue`).
        self._outbox: trio.MemorySendChannel[tuple[str, bool]] | None = None
        self._queued = 0  # frames put in the queue so far,
        self._written = 0  # and those of them the writer has sent
        self._others_queued = 0  # frames other tasks queued,
        self._others_taken = 0  # and those of them the writer has taken out
        self._sent_queued: trio.Event | None = None  # set when the writer sends one, if awaited
        # When the connection's own task began the send it is in the middle of (trio clock).
        self.sending_since: float | None = None
        # The same for the writer task's send; apart, as both may be waiting on the peer at once.
        self.writing_since: float | None = None
        self._send_ended: trio.Event | None = None  # set when that send ends, if anyone waits
        self.close_code: CloseCode | None = None
        self.close_reason = ""

    @property
    def closing(self) -> bool:
        """Whether a close was decided: nothing new may be sent."""
        return self.close_code is not None

    async def send(self, frame: str) -> None:
        """Send from the connection's own task; `watch_sends` closes a peer that never takes it."""
        if self.close_code is not None:  # `closing`, without a property call on every reply
            return
        self.sending_since = self._now()
        try:
            await self.ws.send_message(frame)
        except ConnectionClosed:
            return
        finally:
            self.sending_since = None
            if self._send_ended is not None:
                self._send_ended.set()

    def stalled(self, now: float) -> bool:
        """Whether a send (direct or queued) has waited for the peer past `send_timeout_s`."""
        since = self.sending_since
        if self.writing_since is not None and (since is None or self.writing_since < since):
            since = self.writing_since
        return since is not None and now - since >= self.send_timeout_s

    def enqueue(self, *frames: str, own: bool = False) -> None:
        """Send without waiting; other tasks' frames past the capacity mean the runtime is slow.

        Only other tasks' frames count toward the capacity: the connection's own task (`own`)
        waits for its frames to be sent (`written`) before it reads more, so its share is bounded
        by one delivery, however many frames that delivery was split into. Counting it would
        close a runtime that is reading (4003) for a redelivery split into more frames than the
        queue holds.

        The frames of one call (one delivery, split by size) go in whole, the capacity checked
        before the first: they are queued at once, before the writer can take any, so checking
        each would close a reading runtime for any delivery split into more frames than the
        queue holds, the platform's posts as much as the own task's redeliveries. They still
        count toward it for the frames queued after them.
        """
        if self.closing:
            return
        if not own and self._others_queued - self._others_taken >= self._capacity:
            self.abort(CloseCode.SLOW_CONSUMER, "the runtime is not reading its frames")
            return
        queue = self._queue()
        if queue is None:
            return  # the connection is ending; what the frames carried is durable
        try:
            for frame in frames:
                queue.send_nowait((frame, own))  # never blocks: the buffer is unbounded
                self._queued += 1
                if not own:
                    self._others_queued += 1
        except trio.BrokenResourceError:
            # The writer stopped on a failed send (the peer is gone) and the connection is
            # being torn down: drop the frame. What it carried is durable (inputs are
            # redelivered on the next attach), and the caller, often the platform's request,
            # must not fail for it.
            pass

    @property
    def queued(self) -> int:
        """How many frames were put in the queue so far (what `written` waits for)."""
        return self._queued

    async def written(self, upto: int) -> None:
        """Wait until the writer has sent the first `upto` frames queued, or the link ends.

        The connection's own task waits here for its input deliveries, which take the queue to
        stay in order with everyone else's: the core reads no next batch before the runtime
        takes this one, as with a direct send. A link that ends cancels the wait (its scope).
        """
        while self._written < upto and not self.scope.cancel_called:
            self._sent_queued = trio.Event()
            await self._sent_queued.wait()

    def close(self, code: CloseCode, reason: str) -> None:
        """Close after the frames already queued are sent (the writer does the closing)."""
        if self.closing:
            return
        self.close_code, self.close_reason = code, reason
        queue = self._queue()
        if queue is not None:
            queue.close()  # the writer sends what is queued, then ends the connection

    def abort(self, code: CloseCode, reason: str) -> None:
        """Close now, dropping queued frames (the peer is not reading them anyway)."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            if self._outbox is not None:
                self._outbox.close()
        self.scope.cancel()

    def _queue(self) -> trio.MemorySendChannel[tuple[str, bool]] | None:
        """The writer's queue, made with the writer task on first use; None once it is too late.

        A nursery that is done takes no new task. The connection's task leaves its nursery
        only once it is cancelled, or once a close was decided (the writer then ends it, and
        callers check `closing` first), so a cancelled connection gets no writer: it is ending
        anyway (the drain, for one, may close a link whose task has not yet left its nursery).
        """
        if self._outbox is None:
            if self.scope.cancel_called:
                return None
            # Unbounded: `enqueue` bounds other tasks' frames itself, and the own task's by waiting.
            self._outbox, inbox = trio.open_memory_channel[tuple[str, bool]](math.inf)
            self._nursery.start_soon(self._write_queued, inbox)
        return self._outbox

    async def _write_queued(self, inbox: trio.MemoryReceiveChannel[tuple[str, bool]]) -> None:
        """The writer task: drain the queue until a close is decided, then end the connection."""
        async with inbox:
            async for frame, own in inbox:
                if not own:
                    self._others_taken += 1
                # Watched like a direct send: a peer that stops reading before the queue fills
                # would otherwise hold the queued frames, and any close waiting behind them.
                self.writing_since = self._now()
                try:
                    await self.ws.send_message(frame)
                except ConnectionClosed:
                    break
                finally:
                    self.writing_since = None
                self._written += 1
                if self._sent_queued is not None:
                    self._sent_queued.set()
        # The connection's own task may be halfway through sending a frame (a reply): ending the
        # connection now would tear that frame, and the close frame behind it would never say
        # why (4001, 4002, 1012). Wait for it; `watch_sends` bounds that wait by `send_timeout_s`.
        while self.sending_since is not None:
            self._send_ended = trio.Event()
            await self._send_ended.wait()
        self.scope.cancel()

    async def finish(self) -> None:
        """Send the close frame with the decided code (bounded: a dead peer cannot hold us)."""
        code = self.close_code if self.close_code is not None else CloseCode.NORMAL
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await self.ws.aclose(int(code), self.close_reason or None)


async def watch_sends(links: Mapping[int, Link], send_timeout_s: float) -> None:
    """Close, with 4003, every link whose direct send stalled; runs until cancelled.

    A stalled peer is caught between one and 1.25 timeouts after its send began.
    """
    while True:
        await trio.sleep(send_timeout_s / 4)
        now = trio.current_time()
        for link in [link for link in links.values() if link.stalled(now)]:
            link.abort(CloseCode.SLOW_CONSUMER, "the runtime is not reading its frames")
