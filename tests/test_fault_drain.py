"""Drain: SIGTERM while runtimes are busy; in-flight work is answered, runtimes come back.

A gateway process serves raw runtimes that keep eight publish requests in flight at all times,
plus one runtime on our client (outputs, KV, inputs from a platform task), when it gets SIGTERM.
What must hold:

- every raw connection is closed with 1012 (service restart: reconnect);
- every request either got its answer, or got none and did nothing: the store after a restart
  holds exactly the publishes that were answered `accepted: true`, gapless (no accepted-but-
  unanswered write, no answered write missing);
- the process exits within its `--drain-timeout-s` (plus a margin for process teardown);
- the client runtime reconnects to the restarted gateway into the same session and, at the end,
  has lost nothing it was told was stored.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e_support import CertificateAuthority, Wire
from fault_support import (
    Book,
    Faults,
    RestartableGateway,
    audit,
    create_book,
    drive_runtime,
    fault_seed,
    post_inputs_until,
    post_sentinels,
)
from reliability_ledger import record
from trio_websocket import ConnectionClosed, open_websocket_url

from gateway.store.sqlite import open_sqlite_store

DRAIN_TIMEOUT_S = 3.0
EXIT_MARGIN_S = 3.0  # process teardown after the drain: the store, the control server, exit
PUBLISHERS = 4
WINDOW = 8  # publish requests each raw runtime keeps in flight
OUTPUT = "runtime.task.output.event"


@dataclass
class Pipelined:
    """A raw runtime that pipelines publishes, and what became of each request."""

    run_id: str
    token: str
    sent: dict[str, int] = field(default_factory=dict)  # request id -> seq
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    duplicates: int = 0
    close_code: int | None = None
    closed: trio.Event = field(default_factory=trio.Event)
    busy: trio.Event = field(default_factory=trio.Event)  # set once well under way
    open_at_term: int = 0  # requests unanswered when SIGTERM went out
    _answered: trio.Event = field(default_factory=trio.Event)

    async def run(self, url: str, context: Any) -> None:
        """Attach, then publish one event per request with WINDOW in flight, until closed."""
        headers = [(b"authorization", f"Bearer {self.token}".encode())]
        async with open_websocket_url(
            url, ssl_context=context, extra_headers=headers, disconnect_timeout=2
        ) as ws:
            reply = await Wire(ws).attach(self.run_id)
            ids = {"sessionId": reply["sessionId"], "runId": self.run_id}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, ws)
                seq = 0
                while not self.closed.is_set():
                    if len(self.sent) - len(self.answers) >= WINDOW:
                        await self._answered.wait()
                        continue
                    request_id = f"p{seq}"
                    self.sent[request_id] = seq
                    try:
                        await ws.send_message(json.dumps({
                            "channel": OUTPUT, "id": request_id, "payload": {**ids, "events": [{
                                "eventId": f"e{seq}", "seq": seq, "type": "drain",
                                "data": {"seq": seq}, "timestamp": "2026-11-21T12:00:00.000Z",
                            }]},
                        }))
                    except ConnectionClosed:
                        del self.sent[request_id]  # never left: not a request
                        break
                    seq += 1
                    if seq == 50:
                        self.busy.set()
                await self.closed.wait()

    async def _read(self, ws: Any) -> None:
        try:
            while True:
                frame = json.loads(await ws.get_message())
                if frame["id"] in self.answers:
                    self.duplicates += 1
                self.answers[frame["id"]] = frame
                self._answered.set()
                self._answered = trio.Event()
        except ConnectionClosed as closed:
            self.close_code = closed.reason.code if closed.reason is not None else None
            self.closed.set()
            self._answered.set()

    def accepted(self) -> set[int]:
        """Seqs whose publish was answered `accepted: true`."""
        return {self.sent[rid] for rid, frame in self.answers.items()
                if frame["channel"] == "runtime.task.output.reply" and frame["payload"]["accepted"]}

    def fates(self, stored: list[int]) -> list[str]:
        """Requests whose outcome breaks the drain's promise."""
        problems = []
        accepted = self.accepted()
        if stored != list(range(len(stored))):
            problems.append(f"{self.run_id}: the stored log has gaps: {stored[:20]}")
        for seq in sorted(set(stored) - accepted):
            problems.append(f"{self.run_id}: seq {seq} is stored but its publish was never "
                            "answered accepted")
        for seq in sorted(accepted - set(stored)):
            problems.append(f"{self.run_id}: seq {seq} was accepted but is not stored")
        refused = [f for f in self.answers.values() if f["channel"] == "runtime.session.error"]
        if refused:
            problems.append(f"{self.run_id}: publishes refused during the drain: {refused[:3]}")
        if self.duplicates:
            problems.append(f"{self.run_id}: {self.duplicates} requests answered twice")
        if self.close_code != 1012:
            problems.append(f"{self.run_id}: closed with {self.close_code}, not 1012")
        return problems


async def drains(tmp_path: Path, cycles: int) -> None:
    """`cycles` times: load the gateway, SIGTERM it, check the drain, restart it."""
    seed = fault_seed()
    rng = random.Random(seed)
    print(f"drain schedule seed {seed} (FAULT_SEED={seed} replays it)")
    ca = CertificateAuthority(tmp_path)
    gateway = RestartableGateway(
        tmp_path / "data", ca, "--drain-timeout-s", str(DRAIN_TIMEOUT_S)
    )
    context = ca.client_context()
    faults, stop = Faults(), trio.Event()
    problems: list[str] = []
    exits: list[float] = []
    raw: list[Pipelined] = []
    async with trio.open_nursery() as nursery:
        await gateway.serve_proxy(nursery)
        process = await gateway.start(nursery)
        books: list[Book] = [await create_book(process.control_url)]
        async with trio.open_nursery() as runtimes:
            runtimes.start_soon(
                drive_runtime, books[0], gateway.url, context, faults, stop,
                random.Random(rng.random()),
            )
            async with trio.open_nursery() as platform:
                platform.start_soon(
                    post_inputs_until, books, gateway.control_url, faults, stop,
                    random.Random(rng.random()),
                )
                for _ in range(cycles):
                    publishers = []
                    for _ in range(PUBLISHERS):
                        book = await create_book(process.control_url)
                        publishers.append(Pipelined(book.run_id, book.token))
                    async with trio.open_nursery() as busy:
                        for publisher in publishers:
                            busy.start_soon(publisher.run, process.runtime_url, context)
                        with trio.fail_after(20):
                            for publisher in publishers:
                                await publisher.busy.wait()
                        await trio.sleep(rng.uniform(0.0, 0.3))
                        for publisher in publishers:
                            publisher.open_at_term = len(publisher.sent) - len(publisher.answers)
                        started = trio.current_time()
                        process.terminate()
                        code = await process.wait(timeout=DRAIN_TIMEOUT_S + EXIT_MARGIN_S + 5)
                        exits.append(trio.current_time() - started)
                        if code != 0:
                            problems.append(f"the draining gateway exited with {code}")
                    faults.injected += 1
                    raw += publishers
                    process = await gateway.start(nursery)
                    await trio.sleep(0.5)  # the client runtime comes back and works a while
                stop.set()
            await post_sentinels(books, process.control_url, faults)
        process.terminate()
        assert await process.wait() == 0
        nursery.cancel_scope.cancel()

    async with open_sqlite_store(gateway.database, synchronous="normal") as store:
        for publisher in raw:
            stored = [e.seq for e in await store.read_outputs(publisher.run_id, -1, 1_000_000)]
            problems += publisher.fates(stored)
        result = await audit(store, books)
    client = books[0]
    assert client.session is not None
    if client.session.session_id != client.first_session_id:
        problems.append(f"the client runtime came back into a new session "
                        f"{client.session.session_id}, not {client.first_session_id}")
    slow_exits = [t for t in exits if t > DRAIN_TIMEOUT_S + EXIT_MARGIN_S]
    requests = sum(len(p.sent) for p in raw)
    in_flight = sum(p.open_at_term for p in raw)
    record(
        "drain",
        tried=requests,
        lost=min(requests, len(problems) + len(result.problems) + len(slow_exits)),
        detail=f"{cycles} SIGTERMs (seed {seed}) with {len(raw)} raw runtimes pipelining "
        f"{requests} publishes ({in_flight} unanswered at SIGTERM), exits after "
        f"{', '.join(f'{t:.2f}' for t in exits)} s (timeout {DRAIN_TIMEOUT_S} s); client "
        f"runtime: {client.operations()} acknowledged operations audited",
    )
    assert not problems, f"seed {seed}:\n" + "\n".join(problems[:40])
    assert not result.problems, f"seed {seed}:\n" + "\n".join(result.problems)
    assert not slow_exits, f"exits took {exits} s, timeout {DRAIN_TIMEOUT_S} s"
    assert in_flight > 0, "no request was in flight at SIGTERM: the drain was not put to work"


async def test_sigterm_under_load_answers_in_flight_work(tmp_path: Path) -> None:
    await drains(tmp_path, cycles=1)


@pytest.mark.slow
async def test_repeated_sigterms_under_load_answer_in_flight_work(tmp_path: Path) -> None:
    await drains(tmp_path, cycles=6)
