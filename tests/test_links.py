"""The send watchdog: a runtime that stops reading stalls a direct send and is closed with 4003.

A direct send (a reply from the connection's own task) is not wrapped in a cancel scope of its
own; `watch_sends` sweeps the links instead. These tests drive it with trio's MockClock, so the
timing checks are exact and cost no wall time (pytest-trio's `autojump_clock`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import cast

import pytest
import trio
from trio_websocket import WebSocketConnection

from gateway.links import Link, watch_sends
from statemachine.messages import CloseCode

TIMEOUT = 10.0


class _SlowPeer:
    """A WebSocket whose peer takes `delay` seconds to accept each frame (inf: never)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.sent: list[str] = []

    async def send_message(self, message: str) -> None:
        await trio.sleep(self.delay)
        self.sent.append(message)


async def _watched(
    peer: _SlowPeer, act: Callable[[Link], Awaitable[None]]
) -> tuple[Link, _SlowPeer, float]:
    """Run `act` on a link to `peer` under the watchdog; return when the connection ended."""
    # A watchdog that never fires must fail the test, not hang it.
    with trio.fail_after(TIMEOUT * 2):
        async with trio.open_nursery() as watchdog:
            async with trio.open_nursery() as connection:
                link = Link(1, cast(WebSocketConnection, peer), 64, connection, TIMEOUT)
                watchdog.start_soon(watch_sends, {1: link}, TIMEOUT)
                started = trio.current_time()
                await act(link)
            ended = trio.current_time() - started
            watchdog.cancel_scope.cancel()
    return link, peer, ended


async def _send_watched(delay: float) -> tuple[Link, _SlowPeer, float]:
    """Send one frame to a peer with `delay` under the watchdog; return when the send ended."""

    async def reply(link: Link) -> None:
        await link.send("a reply")

    return await _watched(_SlowPeer(delay), reply)


async def test_a_peer_that_never_reads_is_closed_4003_within_a_quarter_past_the_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    link, peer, ended = await _send_watched(float("inf"))
    assert link.close_code is CloseCode.SLOW_CONSUMER
    assert peer.sent == []
    assert TIMEOUT <= ended <= TIMEOUT * 1.25
    assert link.sending_since is None  # the aborted send cleaned up after itself


async def test_a_slow_but_reading_peer_is_left_alone(autojump_clock: trio.abc.Clock) -> None:
    link, peer, ended = await _send_watched(TIMEOUT * 0.9)
    assert link.close_code is None
    assert peer.sent == ["a reply"]
    assert ended == pytest.approx(TIMEOUT * 0.9)


async def test_an_idle_link_is_never_stalled() -> None:
    async with trio.open_nursery() as connection:
        link = Link(1, cast(WebSocketConnection, _SlowPeer(0)), 4, connection, TIMEOUT)
        assert not link.stalled(trio.current_time() + 1e9)
        await link.send("a reply")
        assert not link.stalled(trio.current_time() + 1e9)


async def test_the_queue_and_its_writer_are_made_only_when_another_task_sends() -> None:
    peer = _SlowPeer(0)
    async with trio.open_nursery() as connection:
        link = Link(1, cast(WebSocketConnection, peer), 4, connection, TIMEOUT)
        await link.send("a reply")
        assert not connection.child_tasks  # replies alone need no writer task
        link.enqueue("an input delivery")
        link.close(CloseCode.SUPERSEDED, "a newer connection took the run")
    # The writer sent what was queued, then ended the connection with the decided code.
    assert peer.sent == ["a reply", "an input delivery"]
    assert connection.cancel_scope.cancel_called
    assert link.close_code is CloseCode.SUPERSEDED


async def test_a_link_whose_connection_ended_can_still_be_closed_and_sent_to() -> None:
    """Regression: the drain closed a link whose task was still leaving its (done) nursery."""
    peer = _SlowPeer(0)
    async with trio.open_nursery() as connection:
        link = Link(1, cast(WebSocketConnection, peer), 4, connection, TIMEOUT)
        connection.cancel_scope.cancel()  # what the connection's task does before leaving
    link.enqueue("an input delivery posted as the connection ended")
    link.close(CloseCode.SERVICE_RESTART, "the gateway is restarting; reconnect")
    assert link.close_code is CloseCode.SERVICE_RESTART  # finish() still sends this code
    assert peer.sent == []


async def _queued_to_a_peer_that_never_reads(
    close: CloseCode | None,
) -> tuple[Link, _SlowPeer, float]:
    """Queue two frames (far fewer than the queue holds) for a peer that never reads."""

    async def deliver(link: Link) -> None:
        link.enqueue("an input delivery")
        link.enqueue("another")
        if close is not None:
            await trio.sleep(1)
            link.close(close, "decided while the writer was stuck")

    return await _watched(_SlowPeer(float("inf")), deliver)


async def test_a_peer_that_stops_reading_queued_frames_is_closed_4003(
    autojump_clock: trio.abc.Clock,
) -> None:
    link, peer, ended = await _queued_to_a_peer_that_never_reads(None)
    assert link.close_code is CloseCode.SLOW_CONSUMER
    assert TIMEOUT <= ended <= TIMEOUT * 1.25
    assert peer.sent == [] and link.writing_since is None


async def test_a_close_decided_behind_a_stuck_writer_still_ends_the_connection(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A revoke (4002) waits for the queue to be written: a peer that never reads must not hold
    it, or the revoked runtime's connection would stay open for good."""
    link, _, ended = await _queued_to_a_peer_that_never_reads(CloseCode.REVOKED)
    assert link.close_code is CloseCode.REVOKED  # the decided code is the one sent
    assert TIMEOUT <= ended <= TIMEOUT * 1.25
