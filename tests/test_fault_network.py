"""Network faults between runtime and gateway: links cut mid-frame, stalled half-open, delayed.

Runtimes (our client) reach an in-process gateway through the chaos proxy, under load: output
batches, KV writes, and inputs a platform task posts. Leases are short (heartbeat 1 s, a 2 s lease;
3 s for stalls) so a stall outlives one within the test. After each fault class the
store must hold every acknowledged output once and in order, every acknowledged KV write, and
every input delivered once and acknowledged; sessions must resume (same sessionId).
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import cast

import pytest
import trio
from e2e_support import gateway_for_test
from fault_support import (
    NEVER,
    Audit,
    Book,
    Faults,
    audit,
    control_client,
    create_book,
    drive_runtime,
    fault_seed,
    port_of,
    post_inputs_until,
    post_sentinels,
    proxy_to,
    proxy_url,
    session_view,
)
from reliability_ledger import record
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection

from gateway.chaos import ChaosProxy
from gateway.client import ConnectError, connect
from gateway.links import Link

SHORT_LEASE = {"heartbeat_interval_ms": 1000, "lease_misses": 2}
# A stall is watched from 0.3 s after it begins: a 3 s lease leaves the watch time to see the
# session still leased, even when a slow box delays the last heartbeat before the stall.
STALL_LEASE = {"heartbeat_interval_ms": 1000, "lease_misses": 3}
MIN_CUTS = 10
RUNTIMES = 3
# A connection lives for this many bytes (both ways, TLS included) once cutting is on: past the
# handshake and attach, then cut inside whatever frame is crossing at that byte.
CUT_AFTER = (6_000, 60_000)
LATE = 1.0  # seconds an expiry may trail its deadline (timer wake-up plus one poll)


def _attached(books: list[Book]) -> bool:
    return all(book.session is not None and book.outputs for book in books)


async def _wait_attached(books: list[Book]) -> None:
    with trio.fail_after(20):
        while not _attached(books):
            await trio.sleep(0.02)


def _check_resumed(books: list[Book]) -> list[str]:
    """Every runtime kept its session across the faults (resumed, never replaced)."""
    problems = []
    for book in books:
        now = book.session.session_id if book.session is not None else None
        if now != book.first_session_id:
            problems.append(f"{book.run_id}: session {book.first_session_id} became {now}")
    return problems


# --- the load that faults are injected under ----------------------------------------------------


@dataclass
class LoadRun:
    """What one run under faults left behind, for its test to judge and record."""

    seed: int
    books: list[Book]
    audit: Audit
    resumed: list[str]  # runtimes whose session was replaced instead of resumed
    links_opened: int  # connections the proxy accepted, in all

    @property
    def operations(self) -> int:
        """Acknowledged operations of every runtime: what a loss is counted against."""
        return sum(book.operations() for book in self.books)

    def check(self) -> None:
        """Nothing acknowledged was lost, and every runtime kept its session."""
        assert not self.audit.problems, f"seed {self.seed}:\n" + "\n".join(self.audit.problems)
        assert not self.resumed, self.resumed


# Runs the faults while runtimes and the platform work; returns once they should stop.
Inject = Callable[[ChaosProxy, random.Random, list[Book], Faults], Awaitable[None]]


async def under_load(
    tmp_path: Path, kind: str, inject: Inject, after: Callable[[ChaosProxy], None] | None = None
) -> LoadRun:
    """Runtimes and a platform posting inputs work through the chaos proxy while `inject` runs
    its faults; then every runtime's sentinel is posted (`after` runs once they are through)
    and the store is audited against every runtime's book."""
    seed = fault_seed()
    rng = random.Random(seed)
    print(f"{kind} schedule seed {seed} (FAULT_SEED={seed} replays it)")
    faults, stop = Faults(), trio.Event()
    async with gateway_for_test(tmp_path, **SHORT_LEASE) as h, proxy_to(
        "127.0.0.1", port_of(h.running.runtime_url)
    ) as proxy:
        control = h.running.control_url
        books = [await create_book(control) for _ in range(RUNTIMES)]
        async with trio.open_nursery() as runtimes:
            for book in books:
                runtimes.start_soon(
                    drive_runtime, book, proxy_url(proxy), h.ca.client_context(), faults, stop,
                    random.Random(rng.random()),
                )
            await _wait_attached(books)
            async with trio.open_nursery() as platform:
                platform.start_soon(
                    post_inputs_until, books, lambda: control, faults, stop,
                    random.Random(rng.random()),
                )
                await inject(proxy, rng, books, faults)
                stop.set()
            await post_sentinels(books, control, faults)
            if after is not None:
                after(proxy)
        result = await audit(h.running.service.store, books)
        return LoadRun(seed, books, result, _check_resumed(books), proxy.connections_made)


# --- drops -------------------------------------------------------------------------------------


async def cut_mid_frame(tmp_path: Path, seconds: float) -> None:
    """Cut every connection after a random byte count, for `seconds`, while runtimes work."""
    before_cutting = 0

    async def cut(proxy: ChaosProxy, rng: random.Random, books: list[Book], faults: Faults) -> None:
        nonlocal before_cutting
        before_cutting = proxy.connections_made
        proxy.cut_mid_frame(rng.randint(*CUT_AFTER))
        proxy.cut()  # the links opened before cutting was on: their successors get cut
        # `seconds` of cutting, and on a slow box longer, until enough links were cut (each cut
        # link's runtime backs off before it tries again).
        deadline = trio.current_time() + seconds
        give_up = deadline + 10 * seconds
        while trio.current_time() < deadline or (
            proxy.connections_made - before_cutting - len(books) < MIN_CUTS
            and trio.current_time() < give_up
        ):
            await trio.sleep(rng.uniform(0.05, 0.3))
            proxy.cut_mid_frame(rng.randint(*CUT_AFTER))  # each new link: a new budget
            faults.injected = proxy.connections_made - before_cutting
        proxy.cut_mid_frame(NEVER)

    run = await under_load(tmp_path, "drop", cut)
    # Every link opened since cutting began was cut mid-frame, but each runtime's last one.
    cuts = run.links_opened - before_cutting - len(run.books)
    record(
        "network drop",
        tried=cuts,
        lost=run.audit.lost_cases(cuts) + (1 if run.resumed else 0),
        detail=f"{cuts} links cut mid-frame (seed {run.seed}); {run.operations} acknowledged"
        " operations audited",
    )
    run.check()
    assert cuts >= MIN_CUTS, f"only {cuts} links were cut: the test did not exercise much"


async def test_links_cut_mid_frame_lose_nothing(tmp_path: Path) -> None:
    await cut_mid_frame(tmp_path, seconds=5)


@pytest.mark.slow
async def test_links_cut_mid_frame_for_long_lose_nothing(tmp_path: Path) -> None:
    await cut_mid_frame(tmp_path, seconds=40)


class _PeerGone:
    """A WebSocket whose peer vanished: every send fails the way trio-websocket reports it."""

    async def send_message(self, message: str) -> None:
        raise ConnectionClosed(CloseReason(1006, None))


async def test_frames_for_a_link_cut_under_its_writer_are_dropped_quietly() -> None:
    """A cut link's writer stops at its failed send; the connection is torn down a moment later.

    Frames other tasks produce in that moment (an input delivery for a run the platform just
    posted to) must be dropped quietly: the inputs are stored and are redelivered on the next
    attach. Raising instead fails the platform's POST with a 500 for inputs that were queued,
    inviting a retry that queues them twice (seen under the long mid-frame cut test).
    """
    async with trio.open_nursery() as connection:
        link = Link(1, cast(WebSocketConnection, _PeerGone()), 4, connection)
        link.enqueue("a frame the writer will fail to send")
    assert connection.cancel_scope.cancel_called  # the writer ended the connection, as it must
    link.enqueue("an input delivery posted a moment later")


# --- stalls ------------------------------------------------------------------------------------


def _wall(stamp: str) -> float:
    """An RFC 3339 `...Z` timestamp of the control API as Unix seconds."""
    return datetime.fromisoformat(stamp).timestamp()


async def _expiry(control: str, run_id: str) -> tuple[float, float, float]:
    """Watch a stalled session until it expires.

    Returns (the lease deadline, the start of the last poll that still saw it leased, the end of
    the first poll that saw it expired): the expiry happened between the last two.
    """
    async with control_client() as http:
        view = await session_view(http, control, run_id)
        assert view["state"] == "leased", view
        deadline = _wall(view["leaseExpiresAt"])
        last_leased = time.time()
        with trio.fail_after(10):
            while True:
                started = time.time()
                view = await session_view(http, control, run_id)
                ended = time.time()
                if view["state"] == "expired":
                    return deadline, last_leased, ended
                assert view["state"] == "leased", view
                # Nothing crosses a stalled link: the lease must not have been renewed.
                assert _wall(view["leaseExpiresAt"]) == deadline, view
                last_leased = started
                await trio.sleep(0.02)


async def stall_and_recover(tmp_path: Path, stalls: int) -> None:
    """Stall the link past the lease, check the expiry's timing, then let it recover."""
    seed = fault_seed()
    rng = random.Random(seed)
    print(f"stall schedule seed {seed} (FAULT_SEED={seed} replays it)")
    faults, stop = Faults(), trio.Event()
    timings: list[str] = []
    problems: list[str] = []
    async with gateway_for_test(tmp_path, recovery_window_ms=30_000, **STALL_LEASE) as h, \
            proxy_to("127.0.0.1", port_of(h.running.runtime_url)) as proxy:
        control = h.running.control_url
        books = [await create_book(control)]
        (book,) = books
        async with trio.open_nursery() as runtimes:
            runtimes.start_soon(partial(
                drive_runtime, book, proxy_url(proxy), h.ca.client_context(), faults, stop,
                random.Random(rng.random()), pause=0.01, connect_timeout=1.0,
            ))
            await _wait_attached(books)
            async with trio.open_nursery() as platform:
                platform.start_soon(
                    post_inputs_until, books, lambda: control, faults, stop,
                    random.Random(rng.random()), (0.05, 0.2),
                )
                for _ in range(stalls):
                    await trio.sleep(rng.uniform(0.3, 1.2))
                    problems += await _one_stall(proxy, control, book, rng, timings)
                    faults.injected += 1
                stop.set()
            await post_sentinels(books, control, faults)
        result = await audit(h.running.service.store, books)
        problems += _check_resumed(books)
    record(
        "network stall",
        tried=stalls,
        lost=min(stalls, result.lost_cases(stalls) + len(problems)),
        detail=f"{stalls} stalls past a 3 s lease (seed {seed}): {'; '.join(timings)}; "
        f"{book.operations()} acknowledged operations audited",
    )
    assert not result.problems, f"seed {seed}:\n" + "\n".join(result.problems)
    assert not problems, f"seed {seed}:\n" + "\n".join(problems)


async def _one_stall(
    proxy: ChaosProxy, control: str, book: Book, rng: random.Random, timings: list[str]
) -> list[str]:
    """One stall: the session expires at its deadline, then resumes once the link flows again."""
    assert book.session is not None
    session_id = book.session.session_id
    async with control_client() as http:
        before = await session_view(http, control, book.run_id)
    proxy.stall()
    # Let whatever was already past the proxy land, so the deadline read next is the final one.
    await trio.sleep(0.3)
    deadline, last_leased, expired_seen = await _expiry(control, book.run_id)
    problems = []
    if expired_seen < deadline - 0.01:
        problems.append(f"expired at or before {expired_seen:.3f}, deadline {deadline:.3f}")
    if expired_seen > deadline + LATE:
        problems.append(f"expired only by {expired_seen:.3f}, deadline {deadline:.3f}")
    if last_leased < deadline - 0.5:
        problems.append("the watch did not see the session leased close to its deadline")
    timings.append(f"expired {expired_seen - deadline:+.3f} s from the deadline")
    await trio.sleep(rng.uniform(0.0, 1.0))  # well within the 30 s recovery window
    proxy.resume()
    async with control_client() as http:
        with trio.fail_after(15):
            while True:
                view = await session_view(http, control, book.run_id)
                if view["state"] == "leased" and view["connected"]:
                    break
                await trio.sleep(0.02)
    if view["sessionId"] != session_id or book.session.session_id != session_id:
        problems.append(f"recovery replaced session {session_id} with {view['sessionId']}")
    if view["connectionEpoch"] <= before["connectionEpoch"]:
        problems.append(f"recovered at epoch {view['connectionEpoch']}, not above "
                        f"{before['connectionEpoch']}")
    return problems


async def test_a_handshake_stalled_half_way_fails_within_connect_timeout(tmp_path: Path) -> None:
    """`connect_timeout` bounds a WebSocket handshake that the network stalls half-way.

    A runtime that reconnects while its network is half-open gets its TCP connection accepted
    and then nothing. The attempt must fail in time so that the next one can be made once the
    network is back; an attempt that waits forever leaves the runtime "reconnecting" forever
    (seen under the long stall test).
    """
    async with gateway_for_test(tmp_path, **SHORT_LEASE) as h, proxy_to(
        "127.0.0.1", port_of(h.running.runtime_url)
    ) as proxy:
        run_id, token = await h.create_run()
        proxy.stall()
        started = trio.current_time()
        failed = False
        with trio.move_on_after(10):
            try:
                async with connect(proxy_url(proxy), token=token, run_id=run_id,
                                   ssl_context=h.ca.client_context(), connect_timeout=0.5):
                    raise AssertionError("attached through a stalled network")
            except ConnectError:
                failed = True
        waited = trio.current_time() - started
        proxy.resume()
    record("network stall", tried=1, lost=int(not failed or waited > 3),
           detail=f"a handshake stalled half-way failed after {waited:.2f} s "
           f"(connect_timeout 0.5 s)")
    assert failed, f"the stalled attempt was still waiting after {waited:.1f} s"
    assert waited < 3, waited


async def test_stalled_links_expire_at_the_deadline_and_recover(tmp_path: Path) -> None:
    await stall_and_recover(tmp_path, stalls=2)


@pytest.mark.slow
async def test_many_stalls_expire_at_the_deadline_and_recover(tmp_path: Path) -> None:
    await stall_and_recover(tmp_path, stalls=10)


# --- delays ------------------------------------------------------------------------------------


async def delayed(tmp_path: Path, seconds: float) -> None:
    """Delay every chunk both ways by a changing 20-250 ms while runtimes work."""

    async def delay(proxy: ChaosProxy, rng: random.Random, books: list[Book], _: Faults) -> None:
        deadline = trio.current_time() + seconds
        while trio.current_time() < deadline:
            proxy.delay_s = rng.uniform(0.02, 0.25)
            await trio.sleep(0.5)

    def undelay(proxy: ChaosProxy) -> None:
        proxy.delay_s = 0  # the sentinels went through delayed; the closes need not

    run = await under_load(tmp_path, "delay", delay, after=undelay)
    ops = run.operations
    record(
        "network delay",
        tried=ops,
        lost=min(ops, len(run.audit.problems) + len(run.resumed)),
        detail=f"{ops} acknowledged operations through a 20-250 ms delay (seed {run.seed})",
    )
    run.check()
    assert ops > 50, f"only {ops} operations got through: the test did not exercise much"


async def test_delayed_links_lose_nothing(tmp_path: Path) -> None:
    await delayed(tmp_path, seconds=4)


@pytest.mark.slow
async def test_long_delays_lose_nothing(tmp_path: Path) -> None:
    await delayed(tmp_path, seconds=30)
