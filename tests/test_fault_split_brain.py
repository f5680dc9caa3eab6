"""Split brain: two runtime instances attach to one run with different epochs, in any interleaving.

Hypothesis generates the program: instances A and B each attach once (at some point among their
writes), publish output events and write KV keys, and the two step lists are interleaved in any
order; each step either waits for its answer or is pipelined, so writes of one instance are often
in flight at the moment the other supersedes it. The frames are raw JSON over trio-websocket
against an in-process gateway, whose store is wrapped to record the order in which it took the
writes that matter.

What must hold, with H the instance with the higher epoch and L the other:
- H's attach is granted; L ends either refused (`stale_epoch` to its attach) or closed with 4001;
- store order: every write of L that took effect was taken before H's claim (a write L sent
  before H's claim may legitimately be accepted, even if its answer arrives after H's);
- every accepted write is stored, every refused one is not;
- the output log is L's events (if any) followed by H's, never interleaved.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e_support import Harness, PeerReadingLater, Wire, gateway_for_test
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from reliability_ledger import record
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from gateway.store.base import NewInput, Store
from statemachine.inputs import AppendOutcome, EpochClaimed, OutputsAppended, Written
from statemachine.messages import OutputEvent
from statemachine.records import SessionRecord

ATTACH = "runtime.session.attach.command"
KV_GET = "runtime.session.kv.get.command"
OUTPUT = "runtime.task.output.event"
KV_SET = "runtime.session.kv.set.command"
NO_SESSION = "ses_" + "0" * 32  # a writer that never learnt a sessionId still sends a valid frame
_arrival = itertools.count()  # one clock for both connections: which answer came first


# --- programs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One thing one instance does; `wait`: block on its answer before the next step."""

    instance: str
    action: str  # "attach", "publish" or "kv"
    wait: bool


@dataclass(frozen=True)
class Program:
    """Two instances' epochs and attach flavours, and their interleaved steps."""

    epochs: dict[str, int]
    reconnect: dict[str, bool]
    steps: tuple[Step, ...]


@st.composite
def programs(draw: st.DrawFn) -> Program:
    """Both instances' steps (one attach each, anywhere among its writes), interleaved freely."""
    low, high = draw(st.lists(st.integers(0, 6), min_size=2, max_size=2, unique=True))
    epochs = dict(zip("AB", (low, high) if draw(st.booleans()) else (high, low), strict=True))
    actions: dict[str, list[str]] = {}
    for name in "AB":
        writes = draw(st.lists(st.sampled_from(["publish", "kv"]), max_size=8))
        at = draw(st.integers(0, len(writes)))
        actions[name] = [*writes[:at], "attach", *writes[at:]]
    order = draw(st.permutations(["A"] * len(actions["A"]) + ["B"] * len(actions["B"])))
    taken = {"A": 0, "B": 0}
    steps = []
    for name in order:
        # Mostly pipelined: a burst of writes in flight is what a supersede should meet.
        wait = draw(st.sampled_from([False, False, False, True]))
        steps.append(Step(name, actions[name][taken[name]], wait))
        taken[name] += 1
    reconnect = {name: draw(st.booleans()) for name in "AB"}
    return Program(epochs, reconnect, tuple(steps))


# --- the store's order -------------------------------------------------------------------------


@dataclass
class Taken:
    """One store call, in the order the store queued (and so committed) it."""

    kind: str  # "claim", "append" or "kv"
    owner: str  # the instance whose content it carries ("" for a claim)
    epoch: int
    effective: bool | None = None  # None: the call raised or never returned


class StoreOrder:
    """Wraps the fenced writes and claims of a live store to record their commit order.

    The SQLite store queues a write synchronously when it is called and commits its queue in
    order, so the order of calls here is the order of commits.
    """

    def __init__(self, store: Store) -> None:
        self.taken: list[Taken] = []
        claim, append, kv_set = store.claim_epoch, store.append_outputs, store.kv_set

        async def claim_epoch(records: list[SessionRecord]) -> EpochClaimed:
            entry = self._add("claim", "", records[0].epoch)
            answer = await claim(records)
            entry.effective = answer.ok
            return answer

        async def append_outputs(
            run_id: str, epoch: int, events: list[OutputEvent]
        ) -> OutputsAppended:
            entry = self._add("append", str(events[0].data.get("by")), epoch)
            answer = await append(run_id, epoch, events)
            entry.effective = answer.outcome is AppendOutcome.STORED
            return answer

        async def kv_set_(run_id: str, epoch: int, kv: dict[str, str]) -> Written:
            entry = self._add("kv", next(iter(kv)).partition("-")[0], epoch)
            answer = await kv_set(run_id, epoch, kv)
            entry.effective = not answer.fenced
            return answer

        setattr(store, "claim_epoch", claim_epoch)  # noqa: B010 - replacing a bound method
        setattr(store, "append_outputs", append_outputs)  # noqa: B010
        setattr(store, "kv_set", kv_set_)  # noqa: B010

    def _add(self, kind: str, owner: str, epoch: int) -> Taken:
        entry = Taken(kind, owner, epoch)
        self.taken.append(entry)
        return entry


# --- one instance on the wire ------------------------------------------------------------------


@dataclass
class Instance:
    """One runtime instance: its connection, what it sent, what came back, how it ended."""

    name: str
    epoch: int
    run_id: str
    ws: WebSocketConnection
    sent: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (action, what)
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    arrived: dict[str, int] = field(default_factory=dict)  # id -> when its answer came
    strays: list[dict[str, Any]] = field(default_factory=list)  # frames answering nothing
    close_code: int | None = None
    closed: trio.Event = field(default_factory=trio.Event)
    attach_id: str | None = None
    session_id: str = NO_SESSION
    next_seq: int | None = None
    count: int = 0
    _changed: trio.Event = field(default_factory=trio.Event)

    async def read(self) -> None:
        """Collect every frame until the gateway closes the connection."""
        try:
            while True:
                frame = json.loads(await self.ws.get_message())
                request_id = frame.get("id")
                if request_id in self.sent and request_id not in self.answers:
                    self.answers[request_id] = frame
                    self.arrived[request_id] = next(_arrival)
                else:
                    self.strays.append(frame)
                self._wake()
        except ConnectionClosed as closed:
            self.close_code = closed.reason.code if closed.reason is not None else None
            self.closed.set()
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def send(self, channel: str, action: str, what: str, payload: dict[str, Any]) -> str:
        """Send one command (if the connection still takes frames); return its id."""
        self.count += 1
        request_id = f"{self.name}{self.count}"
        self.sent[request_id] = (action, what)
        try:
            await self.ws.send_message(
                json.dumps({"channel": channel, "id": request_id, "payload": payload})
            )
        except ConnectionClosed:
            del self.sent[request_id]  # never left this side: nothing to answer
        return request_id

    async def until(self, ready: Callable[[], bool]) -> None:
        """Wait until `ready()` or the connection is closed."""
        with trio.fail_after(10):
            while not ready() and not self.closed.is_set():
                await self._changed.wait()

    async def answer(self, request_id: str) -> dict[str, Any] | None:
        """The answer to one request, or None if the connection closed without one."""
        await self.until(lambda: request_id in self.answers)
        return self.answers.get(request_id)

    def settled(self) -> bool:
        """Every request answered, or the connection is gone."""
        return self.closed.is_set() or all(rid in self.answers for rid in self.sent)

    def accepted(self, request_id: str) -> bool:
        """Whether a request got an accepting reply."""
        frame = self.answers.get(request_id)
        return frame is not None and frame["channel"] != "runtime.session.error" and bool(
            frame["payload"].get("accepted", True)
        )

    def refused(self, request_id: str) -> str | None:
        """The error code a request was refused with, if it was."""
        frame = self.answers.get(request_id)
        if frame is None or frame["channel"] != "runtime.session.error":
            return None
        code: str = frame["payload"]["code"]
        return code


async def _perform(h: Harness, me: Instance, step: Step, program: Program) -> None:
    if step.action == "attach":
        request_id = await me.send(ATTACH, "attach", "", {
            "runId": me.run_id,
            "runtimeInstanceId": f"rt-{me.name}",
            "protocolVersion": "v1",
            "reconnect": program.reconnect[me.name],
            "connectionEpoch": me.epoch,
            "capabilities": ["kv.write"],
        })
        me.attach_id = request_id
        if step.wait:
            await me.answer(request_id)
        return
    # A real runtime writes only once it knows its sessionId (and, for a fresh instance, where
    # the log stands), so a write waits for its own instance's attach answer, never the other's.
    if me.attach_id is not None:
        attach = await me.answer(me.attach_id)
        if attach is not None and attach["channel"] == "runtime.session.attach.reply":
            me.session_id = attach["payload"]["sessionId"]
    ids = {"sessionId": me.session_id, "runId": me.run_id}
    if step.action == "publish":
        if me.next_seq is None:
            me.next_seq = len(await _log(h, me.run_id))
        seq, me.next_seq = me.next_seq, me.next_seq + 1
        event_id = f"evt-{me.name}-{me.count + 1}"
        request_id = await me.send(OUTPUT, "publish", event_id, {**ids, "events": [{
            "eventId": event_id,
            "seq": seq,
            "type": "split.brain",
            "data": {"by": me.name, "seq": seq},
            "timestamp": "2026-11-21T12:00:00.000Z",
        }]})
    else:
        key = f"{me.name}-{me.count + 1}"
        request_id = await me.send(KV_SET, "kv", key, {**ids, "kv": {key: me.name}})
    if step.wait:
        await me.answer(request_id)


async def _log(h: Harness, run_id: str) -> list[dict[str, Any]]:
    response = await h.http.get(f"/v1/runs/{run_id}/outputs", params={"after": -1})
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


# --- the checks --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What the store and the control API show once the program has played out."""

    log: list[OutputEvent]
    kv: dict[str, str]
    view: dict[str, Any]
    taken: list[Taken]


def check(program: Program, instances: dict[str, Instance], out: Outcome) -> list[str]:
    """Every rule of the module docstring; returns what was broken."""
    high, low = sorted(instances.values(), key=lambda i: i.epoch, reverse=True)
    problems = []

    attach = high.answers.get(high.attach_id or "")
    if attach is None or attach["channel"] != "runtime.session.attach.reply":
        problems.append(f"{high.name}'s attach at the highest epoch was not granted: {attach}")
    if high.close_code is not None:
        problems.append(f"{high.name} (highest epoch) was closed with {high.close_code}")
    stale = low.refused(low.attach_id or "") == "stale_epoch"
    superseded = low.close_code == 4001
    if stale == superseded:
        problems.append(f"{low.name} (lower epoch) must end either refused stale_epoch or closed "
                        f"4001: attach answer {low.answers.get(low.attach_id or '')}, close "
                        f"{low.close_code}")

    claims = [i for i, t in enumerate(out.taken)
              if t.kind == "claim" and t.epoch == high.epoch and t.effective]
    claimed_at = claims[0] if claims else len(out.taken)
    for index, taken in enumerate(out.taken):
        if taken.owner == low.name and taken.effective and index > claimed_at:
            problems.append(f"{low.name}'s {taken.kind} took effect after {high.name}'s claim "
                            f"(store positions {index} > {claimed_at})")

    stored_events = {event.event_id: event for event in out.log}
    for me in (high, low):
        for request_id, (action, what) in me.sent.items():
            if action == "publish":
                stored = what in stored_events
            elif action == "kv":
                stored = what in out.kv
            else:
                continue
            if me.accepted(request_id) and not stored:
                problems.append(f"{me.name}'s {action} {what} was accepted but is not stored")
            if me.refused(request_id) is not None and stored:
                problems.append(f"{me.name}'s {action} {what} was refused "
                                f"({me.refused(request_id)}) but is stored")
        if me.strays:
            problems.append(f"{me.name} got frames answering nothing it sent: {me.strays[:3]}")

    owners = "".join(str(event.data["by"]) for event in out.log)
    if owners != low.name * owners.count(low.name) + high.name * owners.count(high.name):
        problems.append(f"the output log interleaves the instances: {owners}")
    if [event.seq for event in out.log] != list(range(len(out.log))):
        problems.append(f"the output log has gaps: {[event.seq for event in out.log]}")

    if out.view["connectionEpoch"] != high.epoch:
        problems.append(f"the session ends at epoch {out.view['connectionEpoch']}, "
                        f"not {high.epoch}")
    return problems


# --- the property ------------------------------------------------------------------------------


async def play(directory: Path, program: Program) -> tuple[list[str], Outcome]:
    """Run one program against a fresh gateway; return what was broken and what was seen."""
    async with gateway_for_test(directory) as h:
        run_id, token = await h.create_run(capabilities=["kv.read", "kv.write"])
        store = h.running.service.store
        order = StoreOrder(store)
        context = h.ca.client_context()
        headers = [(b"authorization", f"Bearer {token}".encode())]
        url = h.running.runtime_url
        async with (
            open_websocket_url(url, ssl_context=context, extra_headers=headers) as ws_a,
            open_websocket_url(url, ssl_context=context, extra_headers=headers) as ws_b,
        ):
            instances = {
                "A": Instance("A", program.epochs["A"], run_id, ws_a),
                "B": Instance("B", program.epochs["B"], run_id, ws_b),
            }
            async with trio.open_nursery() as nursery:
                for instance in instances.values():
                    nursery.start_soon(instance.read)
                for step in program.steps:
                    await _perform(h, instances[step.instance], step, program)
                for instance in instances.values():
                    await instance.until(instance.settled)
                # Give a late close (or a late answer that should not come) time to show.
                await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        keys = [what for i in instances.values() for action, what in i.sent.values()
                if action == "kv"]
        view = (await h.http.get(f"/v1/runs/{run_id}/session")).json()
        outcome = Outcome(
            await store.read_outputs(run_id, -1, 1000), await store.kv_get(run_id, keys), view,
            order.taken,
        )
    _label(instances, order.taken)
    return check(program, instances, outcome), outcome


def _label(instances: dict[str, Instance], taken: list[Taken]) -> None:
    """Name what happened, so `--hypothesis-show-statistics` shows the cases were covered."""
    _, low = sorted(instances.values(), key=lambda i: i.epoch, reverse=True)
    event("lower epoch closed 4001" if low.close_code == 4001 else "lower epoch refused")
    writes = [rid for rid, (action, _) in low.sent.items() if action != "attach"]
    if any(rid not in low.answers for rid in writes):
        event("lower epoch had writes in flight, never answered, when superseded")
    effective = sum(1 for t in taken if t.owner == low.name and t.effective)
    if effective > sum(1 for rid in writes if low.accepted(rid)):
        event("a lower-epoch write took effect (before the claim) but its answer never came")


async def _property(directory: Path, program: Program) -> None:
    problems, outcome = await play(directory, program)
    record("split brain", tried=1, lost=1 if problems else 0,
           detail="" if not problems else "; ".join(problems))
    assert not problems, f"{program}\n" + "\n".join(problems) + f"\n{outcome}"


_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow],
}


@settings(max_examples=30, **_SETTINGS)
@given(program=programs())
async def test_only_the_highest_epoch_acts(
    tmp_path_factory: pytest.TempPathFactory, program: Program
) -> None:
    await _property(tmp_path_factory.mktemp("split"), program)


@pytest.mark.slow
@settings(max_examples=300, **_SETTINGS)
@given(program=programs())
async def test_only_the_highest_epoch_acts_in_many_interleavings(
    tmp_path_factory: pytest.TempPathFactory, program: Program
) -> None:
    await _property(tmp_path_factory.mktemp("split"), program)


# --- superseded in the middle of a reply -------------------------------------------------------


async def test_a_runtime_superseded_mid_reply_is_still_told_4001(tmp_path: Path) -> None:
    """The close that says "superseded" must survive a reply the gateway is still sending.

    The lower-epoch runtime pipelines large reads and stops reading, so the gateway is stuck in
    the middle of sending it a reply when the higher epoch attaches. Once the old runtime reads
    again it must get the frames sent so far, whole, and then close code 4001; a torn reply
    would end the link abnormally (1006), and a client that sees a plain drop reconnects with a
    higher epoch and takes the run back from its successor.
    """
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run(capabilities=["kv.read", "kv.write"])
        context = h.ca.client_context()
        headers = [(b"authorization", f"Bearer {token}".encode())]
        url = h.running.runtime_url
        big = {f"k{i}": "x" * 60_000 for i in range(8)}  # each read answers ~480 KB
        code: int | None = None
        async with open_websocket_url(url, ssl_context=context, extra_headers=headers) as low:
            wire = Wire(low)
            reply = await wire.attach(run_id, connectionEpoch=1,
                                      capabilities=["kv.read", "kv.write"])
            ids = {"sessionId": reply["sessionId"], "runId": run_id}
            assert (await wire.call(KV_SET, {**ids, "kv": big}))["payload"] == {"accepted": True}
            for n in range(40):  # ~19 MB of replies: far more than the socket buffers hold
                await low.send_message(json.dumps(
                    {"channel": KV_GET, "id": f"g{n}", "payload": {**ids, "keys": list(big)}}
                ))
            await trio.sleep(0.5)  # the gateway is now blocked mid-reply
            async with open_websocket_url(
                url, ssl_context=context, extra_headers=headers
            ) as high:
                await Wire(high).attach(run_id, connectionEpoch=2, capabilities=["kv.read"])
                replies = 0
                try:
                    with trio.fail_after(20):
                        while True:
                            frame = json.loads(await low.get_message())
                            assert frame["channel"] == "runtime.session.kv.get.reply", frame
                            replies += 1
                except ConnectionClosed as closed:
                    code = closed.reason.code if closed.reason is not None else None
        record("split brain", tried=1, lost=int(code != 4001),
               detail="" if code == 4001 else f"superseded mid-reply: closed {code}, not 4001")
        assert code == 4001, f"closed with {code} after {replies} whole replies"


async def test_a_delivery_in_flight_when_the_connection_is_superseded_is_sent_whole(
    tmp_path: Path,
) -> None:
    """The superseded connection's own task, finishing a command, must not cut its writer off.

    The writer is in the middle of an input delivery (the runtime reads slowly) when a higher
    epoch supersedes the connection, while the connection's own task waits on the store for a
    kv.set. When that answer comes, the task left its read loop and cancelled the writer
    mid-frame: on TLS the stream breaks, the close frame never goes out, and the runtime sees a
    plain drop (1006) instead of 4001, so it reconnects with a higher epoch and takes the run
    back. Found reviewing the shell, and seen by a randomized explorer of it: runtimes slow to
    read big deliveries were closed 1006 though nothing cut their links.
    """
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run(capabilities=["kv.write"])
        service = h.running.service
        kv_set = service.store.kv_set
        writing, disk = trio.Event(), trio.Event()

        async def busy_disk(*args: Any, **kwargs: Any) -> Any:
            writing.set()
            await disk.wait()
            return await kv_set(*args, **kwargs)

        setattr(service.store, "kv_set", busy_disk)  # noqa: B010 - replacing a bound method
        peer = PeerReadingLater()
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(service.serve_connection, peer, run_id)
                attach = {"runId": run_id, "runtimeInstanceId": "rt-old", "protocolVersion": "v1",
                          "connectionEpoch": 1, "capabilities": ["kv.write"]}
                await peer.inbox.send(json.dumps({"channel": ATTACH, "id": "a1",
                                                  "payload": attach}))
                while not peer.sent:
                    await trio.sleep(0.01)
                ids = {"sessionId": peer.sent[0]["payload"]["sessionId"], "runId": run_id}
                now = service.clock.now()
                await service.post_inputs(run_id, [NewInput("in-0", "t", {"i": 0}, now)])
                await peer.stuck.wait()  # the writer is mid-delivery
                await peer.inbox.send(json.dumps({"channel": KV_SET, "id": "k1",
                                                  "payload": {**ids, "kv": {"a": "1"}}}))
                await writing.wait()  # the connection's own task waits on the store
                async with h.wire(token) as new:
                    await new.attach(run_id, connectionEpoch=2, reconnect=True)
                    disk.set()
                    while service.hub.pending:  # the kv.set's answer reached the core
                        await trio.sleep(0.01)
                    peer.reading.set()  # the old runtime reads again
        assert not peer.torn, "the delivery was cut off mid-frame"
        assert [frame["channel"] for frame in peer.sent] == [
            "runtime.session.attach.reply", "service.task.input.event"]
        assert peer.close_code == 4001
