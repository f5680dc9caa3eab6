"""Slow consumers and overload: the gateway sheds the offender and stays on time for everyone else.

The gateway runs as its own process (so its RSS is its own). In each test a few well-behaved
runtimes (`HeartbeatProbe`) heartbeat every 100 ms and time the answers, while one misbehaves:

- a runtime that never reads while the platform posts it inputs in bulk: closed with 4003 (the
  documented slow-consumer code, counted in /metrics), with the gateway's memory bounded;
- a runtime that floods commands past the per-connection rate: every command gets exactly one
  answer, its reply or `rate_limited`, and the connection stays usable;
- more connections than `--max-sessions`: refused with HTTP 503 at the handshake.

Meanwhile every probe's heartbeats must be answered within the heartbeat interval (1 s); that is
a liveness bound, not a speed target (speed is bench/'s business).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e_support import CertificateAuthority, Wire
from fault_support import (
    HEARTBEAT,
    HeartbeatProbe,
    control_client,
    create_book,
    metric,
    rss,
    session_view,
)
from process_support import GatewayProcess
from reliability_ledger import record
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

HEARTBEAT_S = 1.0
PROBES = 3
CONFIG_GET = "runtime.session.config.get.command"


@asynccontextmanager
async def gateway_with_probes(
    tmp_path: Path, *extra: str
) -> AsyncIterator[tuple[GatewayProcess, CertificateAuthority, list[HeartbeatProbe]]]:
    """A gateway process and attached probes heartbeating until the block ends."""
    ca = CertificateAuthority(tmp_path)
    # A long lease (60 intervals): the misbehaving runtimes send no heartbeats, and an expired
    # lease would stop the very deliveries a slow-consumer test needs.
    process = GatewayProcess(
        tmp_path / "data", ca, "--heartbeat-interval-ms", str(int(HEARTBEAT_S * 1000)),
        "--lease-misses", "60", *extra,
    )
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await process.start(nursery)
        probes = []
        for _ in range(PROBES):
            book = await create_book(process.control_url)
            probe = HeartbeatProbe(book.run_id, book.token)
            nursery.start_soon(probe.run, process.runtime_url, ca.client_context(), stop)
            probes.append(probe)
        with trio.fail_after(10):
            for probe in probes:
                await probe.ready.wait()
        yield process, ca, probes
        stop.set()
        await trio.sleep(0.3)  # let the probes leave cleanly before the gateway drains
        process.terminate()
        assert await process.wait() == 0
        nursery.cancel_scope.cancel()


def probe_problems(probes: list[HeartbeatProbe]) -> list[str]:
    """Heartbeats that were refused or answered later than one heartbeat interval."""
    problems = [failure for probe in probes for failure in probe.failures]
    worst = max(probe.worst() for probe in probes)
    if worst >= HEARTBEAT_S:
        problems.append(f"a heartbeat took {worst:.3f} s to be answered (interval {HEARTBEAT_S})")
    return problems


def worst_heartbeat(probes: list[HeartbeatProbe]) -> str:
    """The slowest heartbeat answer and how many were timed, for the ledger."""
    count = sum(len(probe.latencies) for probe in probes)
    worst = max(probe.worst() for probe in probes)
    return f"{count} heartbeats of {len(probes)} other runtimes, slowest {worst * 1000:.0f} ms"


@asynccontextmanager
async def runtime_ws(
    process: GatewayProcess, ca: CertificateAuthority, token: str
) -> AsyncIterator[WebSocketConnection]:
    """A raw WebSocket to the gateway carrying a run's token."""
    headers = [(b"authorization", f"Bearer {token}".encode())]
    async with open_websocket_url(
        process.runtime_url, ssl_context=ca.client_context(), extra_headers=headers
    ) as ws:
        yield ws


async def attach(ws: WebSocketConnection, run_id: str) -> dict[str, str]:
    """Attach on a raw connection; the ids every later command carries."""
    wire = Wire(ws)
    reply = await wire.attach(run_id)
    return {"sessionId": reply["sessionId"], "runId": run_id}


# --- a runtime that never reads ----------------------------------------------------------------

SLOW_QUEUE = 32  # frames queued per connection before a non-reading runtime is closed
EVENT_BYTES = 1000
EVENTS_PER_POST = 1000  # 1 MB per post; the gateway delivers it as 10 frames of 100 events


async def _sample_peak(process: GatewayProcess, peak: list[int], stop: trio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss(process))
        await trio.sleep(0.02)


async def _read_inputs(ws: WebSocketConnection, ids: dict[str, str], got: list[int]) -> None:
    """A runtime that does read: count the input events it is sent, and keep its lease."""

    async def heartbeat() -> None:
        while True:
            await trio.sleep(HEARTBEAT_S / 2)
            await ws.send_message(json.dumps({"channel": HEARTBEAT, "id": "h", "payload": ids}))

    with contextlib.suppress(ConnectionClosed):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeat)
            while True:
                frame = json.loads(await ws.get_message())
                if frame["channel"] == "service.task.input.event":
                    got[0] += len(frame["payload"]["events"])


async def slow_consumer(tmp_path: Path, slow: int, posts: int, rss_bound: int) -> None:
    """Post `posts` 1 MB batches of inputs, round robin, to `slow` runtimes that stopped reading
    (and every eighth to one that reads, which must be left alone)."""
    async with gateway_with_probes(tmp_path, "--outbound-queue", str(SLOW_QUEUE)) as (
        process, ca, probes,
    ):
        slow_books = [await create_book(process.control_url) for _ in range(slow)]
        reader = await create_book(process.control_url)
        events = [{"type": "bulk", "data": {"i": i, "pad": "x" * EVENT_BYTES}}
                  for i in range(EVENTS_PER_POST)]
        read = [0]
        async with contextlib.AsyncExitStack() as stack:
            sockets = [await stack.enter_async_context(runtime_ws(process, ca, book.token))
                       for book in slow_books]
            reading = await stack.enter_async_context(runtime_ws(process, ca, reader.token))
            for ws, book in zip(sockets, slow_books, strict=True):
                await attach(ws, book.run_id)
            reader_ids = await attach(reading, reader.run_id)
            # From here on the slow runtimes read nothing: trio-websocket buffers one message,
            # then stops reading the socket, so the gateway's sends back up.
            baseline = rss(process)
            peak = [baseline]
            sent_to = [0] * slow
            closed_after: list[int | None] = [None] * slow
            stop = trio.Event()
            async with trio.open_nursery() as nursery, control_client(timeout=60) as http:
                nursery.start_soon(_sample_peak, process, peak, stop)
                nursery.start_soon(_read_inputs, reading, reader_ids, read)
                for post in range(posts):
                    if post % 8 == 7:
                        run_id = reader.run_id
                    else:
                        target = sum(sent_to) % slow
                        run_id = slow_books[target].run_id
                        sent_to[target] += 1
                    response = await http.post(
                        f"{process.control_url}/v1/runs/{run_id}/inputs", json={"events": events}
                    )
                    assert response.status_code == 202, response.text
                    for index, book in enumerate(slow_books):
                        view = await session_view(http, process.control_url, book.run_id)
                        if closed_after[index] is None and not view["connected"]:
                            closed_after[index] = sent_to[index]
                with trio.fail_after(30):
                    while read[0] < EVENTS_PER_POST * (posts // 8):
                        await trio.sleep(0.02)
                reader_view = await session_view(http, process.control_url, reader.run_id)
                stop.set()
                nursery.cancel_scope.cancel()
            closes = await metric(process.control_url, "agent_gateway_closes_total", code="4003")
            # The slow runtimes read again: whatever frames made it out, then the end.
            codes: list[int | None] = []
            for ws in sockets:
                try:
                    with trio.fail_after(30):
                        while True:
                            await ws.get_message()
                except ConnectionClosed as closed:
                    codes.append(closed.reason.code if closed.reason is not None else None)
        problems = probe_problems(probes)
    growth = peak[0] - baseline
    posted = posts * EVENTS_PER_POST * EVENT_BYTES >> 20
    unclosed = sum(1 for after in closed_after if after is None)
    lost = min(slow, unclosed + abs(slow - int(closes)) + (growth > rss_bound)
               + (not reader_view["connected"]) + bool(problems))
    record("slow consumer", tried=slow, lost=lost,
           detail=f"{posted} MiB of inputs posted to {slow} runtimes that never read and one "
           f"that does: each non-reader closed 4003 after {closed_after} MiB, the reader left "
           f"alone, gateway RSS +{growth >> 20} MiB; {worst_heartbeat(probes)}")
    assert not unclosed, f"runtimes that never read were not closed: {closed_after}"
    assert closes == slow, f"{closes} connections closed with 4003, expected {slow}"
    assert reader_view["connected"], "the runtime that reads was closed too"
    # The close frame itself reaches a peer that does not read only if its buffers have room;
    # usually it sees the link end abnormally (1006) once it reads again.
    assert set(codes) <= {4003, 1006}, codes
    assert growth <= rss_bound, f"gateway RSS grew by {growth >> 20} MiB (bound {rss_bound >> 20})"
    assert not problems, problems


async def test_runtimes_that_never_read_are_closed_4003(tmp_path: Path) -> None:
    await slow_consumer(tmp_path, slow=3, posts=64, rss_bound=40 << 20)


@pytest.mark.slow
async def test_many_runtimes_that_never_read_are_closed_4003(tmp_path: Path) -> None:
    await slow_consumer(tmp_path, slow=8, posts=160, rss_bound=96 << 20)


# --- a flood of commands -----------------------------------------------------------------------

RATE, BURST = 50, 100


async def command_flood(tmp_path: Path, commands: int) -> None:
    """Pipeline `commands` config reads on one connection as fast as TLS carries them."""
    async with gateway_with_probes(
        tmp_path, "--command-rate", str(RATE), "--command-burst", str(BURST)
    ) as (process, ca, probes):
        book = await create_book(process.control_url)
        answers: dict[str, list[dict[str, Any]]] = {}
        async with runtime_ws(process, ca, book.token) as ws:
            ids = await attach(ws, book.run_id)

            async def collect() -> None:
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        frame = json.loads(await ws.get_message())
                        answers.setdefault(frame["id"], []).append(frame)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect)
                started = trio.current_time()
                for n in range(commands):
                    await ws.send_message(
                        json.dumps({"channel": CONFIG_GET, "id": f"f{n}", "payload": ids})
                    )
                with trio.fail_after(60):
                    while len(answers) < commands:
                        await trio.sleep(0.01)
                elapsed = trio.current_time() - started
                await trio.sleep(0.2)  # room for a duplicate answer to show up
                flood_answers = dict(answers)
                # The bucket refills: the same connection is served again after a pause.
                await trio.sleep(2 / RATE)
                await ws.send_message(
                    json.dumps({"channel": CONFIG_GET, "id": "after", "payload": ids})
                )
                with trio.fail_after(10):
                    while "after" not in answers:
                        await trio.sleep(0.01)
                after = answers["after"][0]["channel"]
                nursery.cancel_scope.cancel()
        problems = probe_problems(probes)
    replies = limited = wrong = 0
    for n in range(commands):
        got = flood_answers.get(f"f{n}", [])
        if len(got) != 1:
            wrong += 1
        elif got[0]["channel"] == "runtime.session.config.get.reply":
            replies += 1
        elif got[0]["payload"]["code"] == "rate_limited" and got[0]["payload"]["retryable"]:
            limited += 1
        else:
            wrong += 1
    record("command flood", tried=commands, lost=wrong,
           detail=f"{commands} commands pipelined in {elapsed:.2f} s at a limit of {RATE}/s "
           f"(burst {BURST}): {replies} served, {limited} rate_limited, {wrong} other; "
           f"{worst_heartbeat(probes)}")
    assert wrong == 0, f"{wrong} commands did not get exactly one reply or rate_limited"
    assert limited > 0
    assert replies <= BURST + RATE * elapsed + 2, (replies, elapsed)
    assert after == "runtime.session.config.get.reply", after
    assert not problems, problems


async def test_a_command_flood_is_rate_limited_and_answered(tmp_path: Path) -> None:
    await command_flood(tmp_path, commands=2000)


# --- more connections than the maximum ---------------------------------------------------------

MAX_SESSIONS = 8


async def _hold_open(
    process: GatewayProcess, ca: CertificateAuthority, token: str, release: trio.Event
) -> None:
    async with runtime_ws(process, ca, token):
        await release.wait()


async def _connections(process: GatewayProcess, expected: int) -> None:
    with trio.fail_after(10):
        while await metric(process.control_url, "agent_gateway_connections") != expected:
            await trio.sleep(0.02)


async def connection_overload(tmp_path: Path, attempts: int) -> None:
    """Fill the gateway to --max-sessions, then knock `attempts` more times."""
    async with gateway_with_probes(tmp_path, "--max-sessions", str(MAX_SESSIONS)) as (
        process, ca, probes,
    ):
        book = await create_book(process.control_url)
        # Two runs fill it: one token may hold at most half of --max-sessions.
        other = await create_book(process.control_url)
        releases = [trio.Event() for _ in range(MAX_SESSIONS - PROBES)]
        statuses: list[int | None] = []
        bodies: list[bytes] = []
        async with trio.open_nursery() as nursery:
            for number, release in enumerate(releases):
                token = (book, other)[number % 2].token
                nursery.start_soon(_hold_open, process, ca, token, release)
            await _connections(process, MAX_SESSIONS)
            for _ in range(attempts):
                try:
                    async with runtime_ws(process, ca, book.token):
                        statuses.append(101)
                except ConnectionRejected as rejected:
                    statuses.append(rejected.status_code)
                    bodies.append(rejected.body or b"")
            # One leaves: the gateway takes the next one again.
            releases[0].set()
            await _connections(process, MAX_SESSIONS - 1)
            async with runtime_ws(process, ca, book.token) as ws:
                ids = await attach(ws, book.run_id)
            for release in releases:
                release.set()
        problems = probe_problems(probes)
    refused = sum(1 for status in statuses if status == 503)
    record("connection overload", tried=attempts, lost=attempts - refused,
           detail=f"{attempts} connections beyond --max-sessions {MAX_SESSIONS}: {refused} "
           f"refused with HTTP 503 at the handshake; {worst_heartbeat(probes)}")
    assert statuses == [503] * attempts, statuses
    for body in bodies:
        problem = json.loads(body)
        assert problem["status"] == 503 and problem["type"].endswith("/too-many-connections")
    assert ids["sessionId"].startswith("ses_")
    assert not problems, problems


async def test_connections_beyond_the_maximum_get_503(tmp_path: Path) -> None:
    await connection_overload(tmp_path, attempts=20)
