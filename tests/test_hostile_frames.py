"""Hostile frames over a live gateway: each is refused as documented, and nobody else notices.

Every case is a frame sent exactly as a hostile runtime would send it (raw bytes; `raw_wire`),
with the answer spec/v1/errors.md promises: an error code (and the request's id when it can be
read), or a close code. After every batch a second runtime, attached the whole time on its own
connection, must still get its heartbeat answered, and the hostile connection must still work
where it was not closed. Hand-written cases pin the edges; hypothesis generates the rest.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import reliability_ledger
import trio
from e2e_support import ADMIN_TOKEN, CertificateAuthority
from gateway_thread import GatewayThread
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from process_support import GatewayProcess
from raw_wire import BINARY, TEXT, Closed, RawWire, raw_wire

MAX_FRAME = 256 * 1024
HARD = 2 * MAX_FRAME  # the transport's limit: above it the connection is closed with 1009

ATTACH = "runtime.session.attach.command"
HEARTBEAT = "runtime.session.heartbeat.command"
RECOVER = "runtime.session.recover.command"
SECRETS = "runtime.session.secrets.get.command"
CONFIG = "runtime.session.config.get.command"
KV_GET = "runtime.session.kv.get.command"
KV_SET = "runtime.session.kv.set.command"
OUTPUT = "runtime.task.output.event"
ACK = "runtime.task.input.ack.command"
GATEWAY_CHANNELS = (
    "runtime.session.attach.reply",
    "runtime.session.heartbeat.reply",
    "runtime.session.recover.reply",
    "runtime.session.secrets.get.reply",
    "runtime.session.config.get.reply",
    "runtime.session.kv.get.reply",
    "runtime.session.kv.set.reply",
    "runtime.task.output.reply",
    "runtime.task.input.ack.reply",
    "service.task.input.event",
    "runtime.session.error",
)
ALL_CHANNELS = frozenset(
    {ATTACH, HEARTBEAT, RECOVER, SECRETS, CONFIG, KV_GET, KV_SET, OUTPUT, ACK, *GATEWAY_CHANNELS}
)

# Placeholders, replaced at send time by the batch's real ids (the frames are generated before
# the runs exist).
RUN = "@RUN@"
SES = "@SES@"
OTHER_RUN = "@OTHER_RUN@"
OTHER_SES = "@OTHER_SES@"
PAD = "@PAD@"  # filled with "x" at send time, to make the frame exactly `Hostile.size` bytes
SOME_SES = "ses_0123456789abcdef"  # well-formed, but nobody's session

# Every command other than attach/recover: a session id, a run id and its own fields.
SCOPED: dict[str, dict[str, Any]] = {
    HEARTBEAT: {},
    SECRETS: {},
    CONFIG: {},
    KV_GET: {"keys": ["k"]},
    KV_SET: {"kv": {"k": "hostile"}},
    OUTPUT: {"events": []},
    ACK: {"seq": 0},
}

CLOSED_BY_TRANSPORT = frozenset({1007, None})
"""How a text frame that is not UTF-8 ends: RFC 6455 (8.1) makes the receiver fail the
connection. trio-websocket drops the TCP stream without sending 1007 first (so the peer sees no
close frame); either way nothing reaches the gateway."""

# --- the cases -----------------------------------------------------------------------------------

FRAME_KINDS = (
    "invalid UTF-8",
    "non-JSON",
    "non-object",
    "deep nesting",
    "huge strings/arrays",
    "out-of-range numbers",
    "duplicate keys",
    "binary",
    "unknown channel",
    "reply channel",
    "command before attach",
    "other run/session ids",
)


@dataclass(frozen=True)
class Hostile:
    """One hostile frame and the answer the spec promises for it."""

    kind: str  # a FRAME_KINDS entry
    data: bytes
    codes: frozenset[str]  # accepted error codes; empty: the connection must end instead
    request_id: str | None = None  # the id the error frame must carry
    id_recovered: bool = False  # the id can only be read by a parser more lenient than strict JSON
    opcode: int = TEXT
    attached: bool = False  # sent once the connection has attached its run
    close: frozenset[int | None] = frozenset()
    size: int | None = None  # the frame's exact length once its placeholders are filled in

    def __post_init__(self) -> None:
        assert self.kind in FRAME_KINDS, self.kind


def error(kind: str, data: bytes, code: str, request_id: str | None = None,
          **extra: Any) -> Hostile:
    """A case answered by one error frame."""
    return Hostile(kind, data, frozenset({code}), request_id, **extra)


def frame(channel: Any, request_id: Any, payload: Any) -> bytes:
    """An envelope as JSON bytes."""
    return json.dumps({"channel": channel, "id": request_id, "payload": payload}).encode()


def scoped(channel: str, run: str = RUN, session: str = SES) -> dict[str, Any]:
    """A well-formed payload of a session-scoped command."""
    return {"sessionId": session, "runId": run, **SCOPED[channel]}


def attach_payload(run: str = RUN, **extra: Any) -> dict[str, Any]:
    """A well-formed attach payload."""
    return {"runId": run, "runtimeInstanceId": "rt-hostile", "protocolVersion": "v1", **extra}


def padded(kind: str, size: int, request_id: str) -> Hostile:
    """A kv.set whose value makes the frame exactly `size` bytes, with the answer for that size."""
    data = frame(KV_SET, request_id, {"sessionId": SES, "runId": RUN, "kv": {"k": PAD}})
    if size > HARD:
        return Hostile(kind, data, frozenset(), attached=True, close=frozenset({1009}), size=size)
    if size > MAX_FRAME:
        return error(kind, data, "payload_too_large", request_id, id_recovered=True,
                     attached=True, size=size)
    # Under the frame limit, but the value is over the schema's 64 KiB for a KV value.
    return error(kind, data, "invalid_frame", request_id, attached=True, size=size)


def hand_written() -> Iterator[Hostile]:
    """The edges, named one by one."""
    # Text frames that are not UTF-8: the transport fails the connection.
    for bad in (b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80"):
        yield Hostile("invalid UTF-8", frame(HEARTBEAT, "u1", {}).replace(b"{}", b'{"x": "' + bad
                      + b'"}'), frozenset(), close=CLOSED_BY_TRANSPORT)
        yield error("invalid UTF-8", b"\x00" + bad, "invalid_frame", opcode=BINARY)
    yield error("invalid UTF-8", frame(HEARTBEAT, "u2", {"x": "\ud800"}), "invalid_frame", "u2",
                id_recovered=True)
    yield error("invalid UTF-8", frame(HEARTBEAT, "u3", {"x": "\udfff\ud800"}), "invalid_frame",
                "u3", id_recovered=True)

    for text in (b"", b" ", b"{", b"}", b"nope", b"{'channel': 1}", b'{"channel":}', b"[1,",
                 b'{"id": "j1"} {"id": "j2"}', b'{"id": "j3",}', b"\x00", b"/* */ {}", b"01"):
        yield error("non-JSON", text, "invalid_frame")

    for value in ([], [1, 2], "frame", 0, -1.5, True, None, [{"channel": HEARTBEAT, "id": "n1"}]):
        yield error("non-object", json.dumps(value).encode(), "invalid_frame")

    for depth in (33, 1000, 100_000):
        yield error("deep nesting", b"[" * depth + b"]" * depth, "invalid_frame")
        body = b'{"x": ' + b"[" * depth + b"]" * depth + b"}"
        yield error("deep nesting", frame(HEARTBEAT, f"d{depth}", {}).replace(b"{}", body),
                    "invalid_frame", f"d{depth}", id_recovered=True)
    nested_objects = 36_000  # 7 bytes a level: as deep as objects go under the frame limit
    body = b'{"a": ' * nested_objects + b"1" + b"}" * nested_objects
    yield error("deep nesting", frame(HEARTBEAT, "d-obj", {}).replace(b"{}", body),
                "invalid_frame", "d-obj", id_recovered=True)
    # 32 levels are allowed (envelope included): the heartbeat is answered, not refused.
    allowed = b'{"m": ' * 29 + b"1" + b"}" * 29
    yield Hostile("deep nesting", frame(HEARTBEAT, "d-ok", {"sessionId": SES, "runId": RUN,
                  "metadata": {}}).replace(b'"metadata": {}', b'"metadata": ' + allowed),
                  frozenset({"ok"}), "d-ok", attached=True)

    for size in (70_000, MAX_FRAME - 1, MAX_FRAME, MAX_FRAME + 1, HARD - 1, HARD, HARD + 1,
                 3 * MAX_FRAME):
        yield padded("huge strings/arrays", size, f"h{size}")
    for channel, payload, rid in (
        (KV_GET, {"sessionId": SES, "runId": RUN, "keys": ["k"] * 257}, "ha1"),
        (SECRETS, {"sessionId": SES, "runId": RUN, "names": ["n" * 257]}, "ha2"),
        (OUTPUT, {"sessionId": SES, "runId": RUN, "events": [{}] * 1001}, "ha3"),
        (ATTACH, attach_payload(protocolVersion="v" * 10_000), "ha4"),
        (ATTACH, attach_payload(runtimeInstanceId="r" * 129), "ha5"),
        (HEARTBEAT, {"sessionId": SES, "runId": RUN, "metadata": {f"m{i}": i for i in range(65)}},
         "ha6"),
    ):
        yield error("huge strings/arrays", frame(channel, rid, payload), "invalid_frame", rid,
                    attached=True)
    many = frame(KV_GET, "ha7", {"sessionId": SES, "runId": RUN, "keys": ["k"] * 60_000})
    assert MAX_FRAME < len(many) <= HARD
    yield error("huge strings/arrays", many, "payload_too_large", "ha7", id_recovered=True)

    for number, strict in (("1e400", True), ("-1e400", True), (str(2**64), True),
                           (str(-(2**63) - 1), True), ("NaN", True), ("Infinity", True),
                           ("-Infinity", True), ("-1", False), (str(2**53), False),
                           (str(2**63 - 1), False), ("1.5", False), ("-1e-3", False)):
        rid = f"num{number}"[:64]
        yield error("out-of-range numbers",
                    frame(ACK, rid, {"sessionId": SES, "runId": RUN, "seq": 0}).replace(
                        b'"seq": 0', b'"seq": ' + number.encode()),
                    "invalid_frame", rid, id_recovered=strict)
        yield error("out-of-range numbers",
                    frame(ATTACH, rid + "e", attach_payload(connectionEpoch=0)).replace(
                        b'"connectionEpoch": 0', b'"connectionEpoch": ' + number.encode()),
                    "invalid_frame", rid + "e", id_recovered=strict)

    yield error("duplicate keys", b'{"channel": "%s", "id": "k1", "id": "k2", "payload": {}}'
                % HEARTBEAT.encode(), "invalid_frame")
    yield error("duplicate keys", b'{"channel": "%s", "channel": "%s", "id": "k3", "payload": {}}'
                % (HEARTBEAT.encode(), CONFIG.encode()), "invalid_frame", "k3", id_recovered=True)
    yield error("duplicate keys", frame(HEARTBEAT, "k4", {"runId": RUN}).replace(
                b'"runId"', b'"runId": "%s", "runId"' % OTHER_RUN.encode()), "invalid_frame",
                "k4", id_recovered=True)
    yield error("duplicate keys", frame(HEARTBEAT, "k5", {"metadata": {"a": {"b": 1}}}).replace(
                b'{"b": 1}', b'{"b": 1, "b": 1}'), "invalid_frame", "k5", id_recovered=True)

    yield error("binary", frame(HEARTBEAT, "b1", scoped(HEARTBEAT)), "invalid_frame",
                opcode=BINARY, attached=True)
    yield error("binary", b"", "invalid_frame", opcode=BINARY)
    yield error("binary", b"\x00" * 100_000, "invalid_frame", opcode=BINARY)

    for name in ("no.such.channel", "", "runtime.session.attach", "RUNTIME.SESSION.ATTACH.COMMAND",
                 " " + ATTACH, ATTACH + "\n", "runtime.session.kv.delete.command"):
        yield error("unknown channel", frame(name, "c1", {}), "unknown_channel", "c1")

    for channel in GATEWAY_CHANNELS:
        yield error("reply channel", frame(channel, "rc", {"accepted": True}), "unknown_channel",
                    "rc", attached=True)
    yield error("reply channel", frame("runtime.session.error", None, {"code": "internal"}),
                "unknown_channel")

    for channel in SCOPED:
        yield error("command before attach", frame(channel, "pre", scoped(channel)),
                    "not_attached", "pre")
        yield error("command before attach",
                    frame(channel, "pre2", scoped(channel, session=SOME_SES)), "not_attached",
                    "pre2")

    yield from other_ids()


def other_ids() -> Iterator[Hostile]:
    """Commands of an attached connection that name another run, session or runtime instance."""
    kind = "other run/session ids"
    yield error(kind, frame(ATTACH, "o1", attach_payload(OTHER_RUN)), "forbidden_run", "o1",
                attached=True)
    yield error(kind, frame(ATTACH, "o2", attach_payload(OTHER_RUN, reconnect=True,
                                                          connectionEpoch=99)),
                "forbidden_run", "o2", attached=True)
    yield error(kind, frame(RECOVER, "o3", {"sessionId": OTHER_SES, "mainRunId": OTHER_RUN,
                                            "connectionEpoch": 99}),
                "forbidden_run", "o3", attached=True)
    yield error(kind, frame(RECOVER, "o4", {"sessionId": SES, "mainRunId": RUN,
                                            "subRunIds": [OTHER_RUN]}),
                "forbidden_run", "o4", attached=True)
    for channel in SCOPED:
        # Another run: this connection never attached it (and its token may not).
        yield Hostile(kind, frame(channel, "o5", scoped(channel, OTHER_RUN, OTHER_SES)),
                      frozenset({"not_attached", "forbidden_run"}), "o5", attached=True)
        # Our run, someone else's (live) session, or a made-up one.
        yield error(kind, frame(channel, "o6", scoped(channel, RUN, OTHER_SES)),
                    "session_mismatch", "o6", attached=True)
        yield error(kind, frame(channel, "o7", scoped(channel, RUN, SOME_SES)),
                    "session_mismatch", "o7", attached=True)
    yield error(kind, frame(HEARTBEAT, "o8", {**scoped(HEARTBEAT), "runtimeInstanceId": "rt-w"}),
                "session_mismatch", "o8", attached=True)


# --- running a batch -----------------------------------------------------------------------------


@dataclass
class Batch:
    """What a batch did: problems found, by kind, and the frames tried, by kind."""

    tried: dict[str, int] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)

    def count(self, case: Hostile) -> None:
        self.tried[case.kind] = self.tried.get(case.kind, 0) + 1

    def lose(self, kind: str, what: str) -> None:
        self.problems.setdefault(kind, []).append(what)

    def record(self) -> None:
        """Into the ledger (before asserting, so a failing run still reports its figures)."""
        for kind in sorted(set(self.tried) | set(self.problems)):
            lost = len(self.problems.get(kind, []))
            reliability_ledger.record("hostile frame: " + kind, max(self.tried.get(kind, 0), lost),
                                      lost)

    def all_problems(self) -> list[str]:
        return [f"{kind}: {p}" for kind, ps in self.problems.items() for p in ps]


class Runtime:
    """One run's connections during a batch: attaches on demand, reconnects after a close."""

    def __init__(self, gw: GatewayThread, run_id: str, token: str) -> None:
        self.gw = gw
        self.run_id = run_id
        self.token = token
        self.wire: RawWire | None = None
        self.stack: Any = None
        self.session_id = ""
        self.attached = False
        self.epoch = 0

    async def connect(self) -> RawWire:
        await self.disconnect()
        self.stack = raw_wire(self.gw.runtime_url, self.gw.ca.client_context(), self.token)
        self.wire = await self.stack.__aenter__()
        self.attached = False
        return self.wire

    async def disconnect(self) -> None:
        if self.stack is not None:
            await self.stack.__aexit__(None, None, None)
        self.stack, self.wire, self.attached = None, None, False

    async def attach(self) -> dict[str, Any]:
        wire = self.wire or await self.connect()
        self.epoch += 1
        answer = await wire.call({"channel": ATTACH, "id": "attach", "payload": attach_payload(
            self.run_id, runtimeInstanceId="rt-" + self.run_id[-6:], connectionEpoch=self.epoch,
            reconnect=bool(self.session_id), capabilities=["secrets.read", "kv.read", "kv.write"])})
        assert answer["channel"] == "runtime.session.attach.reply", answer
        self.session_id = answer["payload"]["sessionId"]
        self.attached = True
        return answer

    async def call(self, channel: str, extra: dict[str, Any]) -> dict[str, Any]:
        """A session-scoped command of this run's own session."""
        assert self.wire is not None
        return await self.wire.call({"channel": channel, "id": "own", "payload": {
            "sessionId": self.session_id, "runId": self.run_id, **extra}})

    async def heartbeat(self) -> dict[str, Any]:
        return await self.call(HEARTBEAT, {})


async def _create_run(http: httpx.AsyncClient) -> tuple[str, str]:
    response = await http.post("/v1/runs", json={
        "capabilities": ["secrets.read", "kv.read", "kv.write"], "secrets": {}, "config": {}})
    assert response.status_code == 201, response.text
    return response.json()["runId"], response.json()["runtimeToken"]


async def _send_and_answer(wire: RawWire, case: Hostile, data: bytes) -> dict[str, Any]:
    """Send while already reading: a gateway that closes mid-frame must not hide its close code.

    Raises Closed when the gateway ends the connection, trio.TooSlowError when it never answers.
    """
    outcome: list[dict[str, Any] | Closed | trio.TooSlowError] = []

    async def send() -> None:
        # If the gateway stops reading mid-frame, the receiver reports how it closed.
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await wire.send_frame(case.opcode, data)

    async def receive(done: trio.CancelScope) -> None:
        try:
            outcome.append(await wire.recv(timeout=20))
        except (Closed, trio.TooSlowError) as ended:
            outcome.append(ended)
        done.cancel()  # a sender still pushing a frame the gateway refused to read stops here

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(receive, nursery.cancel_scope)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _check(case: Hostile, got: dict[str, Any] | Closed, check_ids: bool) -> str | None:
    """What is wrong with the answer to `case`, or None."""
    if isinstance(got, Closed):
        if case.codes:
            return f"connection closed ({got.code}) instead of {sorted(case.codes)}"
        if got.code not in case.close:
            return f"closed with {got.code}, expected one of {sorted(case.close, key=str)}"
        return None
    if not case.codes:
        return f"answered {got} instead of closing"
    if case.codes == {"ok"}:
        return None if got.get("channel", "").endswith(".reply") else f"refused: {got}"
    if got.get("channel") != "runtime.session.error":
        return f"not refused: {got}"
    code = got["payload"]["code"]
    if code not in case.codes:
        return f"code {code}, expected {sorted(case.codes)}"
    if (check_ids or not case.id_recovered) and got.get("id") != case.request_id:
        return f"id {got.get('id')!r}, expected {case.request_id!r}"
    return None


async def run_batch(gw: GatewayThread, cases: Sequence[Hostile], *,
                    check_ids: bool = False) -> Batch:
    """Send the cases (not-attached ones on a fresh connection first), checking every answer."""
    batch = Batch()
    async with httpx.AsyncClient(base_url=gw.control_url, timeout=30,
                                 headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
        witness = Runtime(gw, *await _create_run(http))
        hostile = Runtime(gw, *await _create_run(http))
        try:
            await witness.attach()
            witness_kv = await witness.call(KV_SET, {"kv": {"k": "witness"}})
            assert witness_kv["payload"] == {"accepted": True}, witness_kv
            await hostile.attach()  # a session exists, so SES is a real (but not held) session
            await hostile.disconnect()
            ordered = [c for c in cases if not c.attached] + [c for c in cases if c.attached]
            for case in ordered:
                if hostile.wire is None:
                    await hostile.connect()
                if case.attached and not hostile.attached:
                    await hostile.attach()
                data = as_sent(case.data, hostile.run_id, hostile.session_id, witness.run_id,
                               witness.session_id)
                if case.size is not None:
                    data = data.replace(PAD.encode(), b"x" * (case.size - len(data) + len(PAD)))
                    assert len(data) == case.size
                batch.count(case)
                assert hostile.wire is not None
                got: dict[str, Any] | Closed
                try:
                    got = await _send_and_answer(hostile.wire, case, data)
                except Closed as closed:
                    got = closed
                    await hostile.disconnect()
                except trio.TooSlowError:
                    batch.lose(case.kind, f"no answer to {data[:80]!r}")
                    await hostile.disconnect()
                    continue
                if (problem := _check(case, got, check_ids)) is not None:
                    batch.lose(case.kind, f"{problem} for {data[:120]!r}")
            # The gateway kept serving: the witness (connected throughout) and the hostile
            # connection itself, unless it was closed on purpose.
            beat = await witness.heartbeat()
            if beat.get("payload", {}).get("accepted") is not True:
                batch.lose(ordered[-1].kind if ordered else "binary", f"witness refused: {beat}")
            if hostile.wire is not None:
                if not hostile.attached:
                    await hostile.attach()
                mine = await hostile.heartbeat()
                if mine.get("payload", {}).get("accepted") is not True:
                    batch.lose(ordered[-1].kind, f"hostile connection stopped working: {mine}")
            await _nothing_leaked_across(batch, witness, hostile, http)
        finally:
            await hostile.disconnect()
            await witness.disconnect()
    return batch


async def _nothing_leaked_across(batch: Batch, witness: Runtime, hostile: Runtime,
                                 http: httpx.AsyncClient) -> None:
    """Hostile commands naming the witness's run or session changed nothing of either run."""
    kv = await witness.call(KV_GET, {"keys": ["k"]})
    if kv["payload"] != {"kv": {"k": "witness"}}:
        batch.lose("other run/session ids", f"witness KV changed: {kv}")
    if hostile.wire is not None:
        own = await hostile.call(KV_GET, {"keys": ["k"]})
        if own["payload"] != {"kv": {}}:
            batch.lose("other run/session ids", f"a refused kv.set was stored: {own}")
    for run_id in (witness.run_id, hostile.run_id):
        stored = (await http.get(f"/v1/runs/{run_id}/outputs")).json()
        if stored["events"]:
            batch.lose("other run/session ids", f"outputs appeared in {run_id}: {stored}")
    view = (await http.get(f"/v1/runs/{witness.run_id}/session")).json()
    if view["sessionId"] != witness.session_id or not view["connected"]:
        batch.lose("other run/session ids", f"witness session taken: {view}")


def run(gw: GatewayThread, cases: Sequence[Hostile], *, check_ids: bool = False) -> Batch:
    """Run a batch from synchronous code (hypothesis drives examples synchronously)."""
    return trio.run(lambda: run_batch(gw, cases, check_ids=check_ids))


# --- the gateway under attack --------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    with GatewayThread(
        tmp_path_factory.mktemp("hostile-frames"),
        max_frame_bytes=MAX_FRAME,
        command_rate=1e6,
        command_burst=1e6,
    ) as running:
        yield running


def test_hand_written_hostile_frames_are_refused_as_documented(gw: GatewayThread) -> None:
    cases = list(hand_written())
    assert {c.kind for c in cases} == set(FRAME_KINDS)
    batch = run(gw, cases)
    batch.record()
    problems = batch.all_problems()
    assert not problems, "\n".join(problems)


def test_frames_over_the_limit_but_under_the_hard_limit_carry_their_id(
    gw: GatewayThread,
) -> None:
    """`payload_too_large` names the request it refuses, so the runtime knows which batch to split:
    the frame is not parsed, but its id is still read."""
    cases = [c for c in hand_written() if c.id_recovered and "payload_too_large" in c.codes]
    assert len(cases) >= 4
    problems = run(gw, cases, check_ids=True).all_problems()
    assert not problems, "\n".join(problems)


def test_strict_json_refusals_carry_the_id_when_it_can_be_read(gw: GatewayThread) -> None:
    """errors.md: the error's id is null only when the frame's id could not be read. In a frame
    refused for a duplicate key elsewhere, a number out of range, nesting deeper than 32 levels or
    a lone surrogate escape, the top-level id is a plain valid string and can be read."""
    cases = [c for c in hand_written() if c.id_recovered and "invalid_frame" in c.codes]
    assert len(cases) >= 20
    problems = run(gw, cases, check_ids=True).all_problems()
    assert not problems, "\n".join(problems)


# --- generated frames ----------------------------------------------------------------------------

_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
_REQUEST_ID = st.text(st.sampled_from(string.ascii_letters + string.digits + "-_.:!~"),
                      min_size=1, max_size=64)
_JSON_SCALAR = (st.none() | st.booleans() | st.integers(-(2**53), 2**53)
                | st.floats(allow_nan=False, allow_infinity=False) | _TEXT)
_JSON = st.recursive(_JSON_SCALAR, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(_TEXT, inner, max_size=4), max_leaves=12)
_INVALID_UTF8 = st.binary(min_size=1, max_size=12).filter(lambda b: not _is_utf8(b))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def as_sent(data: bytes, run_id: str, session_id: str, other_run_id: str,
            other_session_id: str) -> bytes:
    """A case's bytes with its placeholders replaced by the batch's real ids."""
    return (data.replace(RUN.encode(), run_id.encode())
            .replace(SES.encode(), session_id.encode())
            .replace(OTHER_RUN.encode(), other_run_id.encode())
            .replace(OTHER_SES.encode(), other_session_id.encode()))


# Shaped like the real ids, which is all that decides whether the sent text is JSON: a backslash
# put before a placeholder becomes `\r` or `\s` once it is filled, and `\r` is a valid escape.
_STAND_INS = ("run_0123456789ab", "ses_0123456789ab", "run_ba9876543210", "ses_ba9876543210")


def _is_json(text: str) -> bool:
    """Whether `text` is JSON as it will be sent (placeholders filled)."""
    try:
        sent = as_sent(text.encode("utf-8", "surrogatepass"), *_STAND_INS)
        json.loads(sent.decode("utf-8", "surrogatepass"))
    except ValueError:
        return False
    return True


@st.composite
def hostile_frames(draw: st.DrawFn) -> Hostile:
    """Any one hostile frame of any kind, with the answer its kind and content call for."""
    kind = draw(st.sampled_from(FRAME_KINDS))
    rid = draw(_REQUEST_ID)
    channel = draw(st.sampled_from(sorted(SCOPED)))
    if kind == "invalid UTF-8":
        bad = draw(_INVALID_UTF8)
        data = frame(channel, rid, scoped(channel)).replace(b"@RUN@", b"@RUN@" + bad, 1)
        if draw(st.booleans()):
            return error(kind, data, "invalid_frame", opcode=BINARY)
        return Hostile(kind, data, frozenset(), close=CLOSED_BY_TRANSPORT)
    if kind == "non-JSON":
        valid = frame(channel, rid, scoped(channel)).decode()
        text = draw(st.one_of(
            _TEXT.filter(lambda t: not _is_json(t)),
            st.integers(0, len(valid) - 1).map(lambda cut: valid[:cut]),
            st.tuples(st.integers(0, len(valid) - 1), st.sampled_from("{}[],:'\\x"))
            .map(lambda p: valid[:p[0]] + p[1] + valid[p[0]:]).filter(lambda t: not _is_json(t)),
        ))
        return error(kind, text.encode(), "invalid_frame")
    if kind == "non-object":
        value = draw(_JSON.filter(lambda v: not isinstance(v, dict)))
        return error(kind, json.dumps(value).encode(), "invalid_frame")
    if kind == "deep nesting":
        opener, closer, step = draw(st.sampled_from([(b"[", b"]", 2), (b'{"a": ', b"}", 7)]))
        depth = draw(st.integers(33, (MAX_FRAME - 500) // step))
        body = opener * depth + b"0" * (opener != b"[") + closer * depth
        if draw(st.booleans()):
            return error(kind, body, "invalid_frame")  # no envelope, so no id to read
        data = frame(channel, rid, {"x": 0}).replace(b'"x": 0', b'"x": ' + body)
        return error(kind, data, "invalid_frame", rid, id_recovered=True)
    if kind == "huge strings/arrays":
        size = draw(st.one_of(st.integers(70_000, MAX_FRAME), st.integers(MAX_FRAME + 1, HARD),
                              st.integers(HARD + 1, 3 * MAX_FRAME)))
        return padded(kind, size, rid)
    if kind == "out-of-range numbers":
        number, strict = draw(st.one_of(
            st.integers(max_value=-1).map(lambda n: (str(n), n < -(2**63))),
            st.integers(min_value=2**53).map(lambda n: (str(n), n >= 2**63)),
            st.sampled_from([("1e400", True), ("-1e309", True), ("NaN", True),
                             ("Infinity", True), ("2.5", False), ("-0.5", False)]),
        ))
        where = draw(st.sampled_from([(ACK, "seq"), (ATTACH, "connectionEpoch"),
                                      (RECOVER, "connectionEpoch")]))
        payload = (scoped(ACK) if where[0] == ACK else attach_payload(connectionEpoch=0)
                   if where[0] == ATTACH else {"sessionId": SES, "mainRunId": RUN,
                                                "connectionEpoch": 0})
        data = frame(where[0], rid, payload).replace(
            f'"{where[1]}": 0'.encode(), f'"{where[1]}": {number}'.encode())
        return error(kind, data, "invalid_frame", rid, id_recovered=strict)
    if kind == "duplicate keys":
        payload = scoped(channel)
        key = draw(st.sampled_from(["channel", "id", "payload", *payload]))
        pairs = [("channel", channel), ("id", rid), ("payload", payload)]
        if key in ("channel", "id", "payload"):
            index = next(i for i, (k, _) in enumerate(pairs) if k == key)
            pairs.insert(draw(st.integers(0, len(pairs))), pairs[index])
            text = "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}"
        else:
            inner = list(payload.items())
            inner.insert(draw(st.integers(0, len(inner))), (key, payload[key]))
            members = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in inner)
            text = json.dumps({"channel": channel, "id": rid, "payload": 0}).replace(
                '"payload": 0', '"payload": {' + members + "}")
        readable = None if key == "id" else rid
        return error(kind, text.encode(), "invalid_frame", readable, id_recovered=key != "id")
    if kind == "binary":
        data = draw(st.one_of(st.binary(max_size=200),
                              st.just(frame(channel, rid, scoped(channel)))))
        return error(kind, data, "invalid_frame", opcode=BINARY)
    if kind == "unknown channel":
        name = draw(_TEXT.filter(lambda n: n not in ALL_CHANNELS))
        return error(kind, frame(name, rid, {}), "unknown_channel", rid)
    if kind == "reply channel":
        payload = draw(st.dictionaries(_TEXT, _JSON_SCALAR, max_size=3))
        return error(kind, frame(draw(st.sampled_from(GATEWAY_CHANNELS[:-1])), rid, payload),
                     "unknown_channel", rid, attached=draw(st.booleans()))
    if kind == "command before attach":
        session = draw(st.sampled_from([SES, SOME_SES]))
        return error(kind, frame(channel, rid, scoped(channel, session=session)), "not_attached",
                     rid)
    assert kind == "other run/session ids"
    run_id, session, codes = draw(st.sampled_from([
        (OTHER_RUN, OTHER_SES, {"not_attached", "forbidden_run"}),
        (OTHER_RUN, SES, {"not_attached", "forbidden_run"}),
        (RUN, OTHER_SES, {"session_mismatch"}),
        (RUN, SOME_SES, {"session_mismatch"}),
    ]))
    return Hostile(kind, frame(channel, rid, scoped(channel, run_id, session)),
                   frozenset(codes), rid, attached=True)


def _generated(gw: GatewayThread, cases: list[Hostile]) -> None:
    batch = run(gw, cases)
    batch.record()
    problems = batch.all_problems()
    assert not problems, "\n".join(problems)


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow,
                                                  HealthCheck.function_scoped_fixture,
                                                  HealthCheck.large_base_example,
                                                  HealthCheck.data_too_large])
@given(st.lists(hostile_frames(), min_size=1, max_size=12))
def test_generated_hostile_frames_are_refused_as_documented(
    gw: GatewayThread, cases: list[Hostile]
) -> None:
    _generated(gw, cases)


@pytest.mark.slow
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow,
                                                   HealthCheck.function_scoped_fixture,
                                                   HealthCheck.large_base_example,
                                                   HealthCheck.data_too_large])
@given(st.lists(hostile_frames(), min_size=1, max_size=30))
def test_many_generated_hostile_frames_are_refused_as_documented(
    gw: GatewayThread, cases: list[Hostile]
) -> None:
    _generated(gw, cases)


# --- memory ------------------------------------------------------------------------------------

RSS_BOUND = 64 * 1024 * 1024


async def test_a_flood_of_large_hostile_frames_leaves_memory_bounded(tmp_path: Path) -> None:
    """The gateway runs as its own process, so its RSS is not mixed with the test's buffers."""
    ca = CertificateAuthority(tmp_path)
    process = GatewayProcess(tmp_path / "data", ca, "--max-frame-bytes", str(MAX_FRAME),
                             "--command-rate", "1000000", "--command-burst", "1000000")
    big = frame(KV_SET, "m1", {"sessionId": "ses_00000000", "runId": "run_00000000",
                               "kv": {"k": "x" * (MAX_FRAME + 1000)}})
    deep = b"[" * 100_000 + b"]" * 100_000
    wide = frame(KV_GET, "m2", {"sessionId": "ses_00000000", "runId": "run_00000000",
                                "keys": ["k" * 200] * 1000})
    over = b"x" * (HARD + 1)
    async with trio.open_nursery() as nursery:
        await process.start(nursery)
        gateway = psutil.Process(process.process.pid)  # type: ignore[union-attr]
        async with httpx.AsyncClient(base_url=process.control_url, timeout=30,
                                     headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
            witness_run, witness_token = await _create_run(http)
            _, token = await _create_run(http)
        context = ca.client_context()
        tried = lost = 0
        async with raw_wire(process.runtime_url, context, witness_token) as witness:
            answer = await witness.call({"channel": ATTACH, "id": "a", "payload": attach_payload(
                witness_run)})
            ids = {"sessionId": answer["payload"]["sessionId"], "runId": witness_run}

            async def flood(rounds: int) -> tuple[int, int]:
                sent = failed = 0
                async with raw_wire(process.runtime_url, context, token) as wire:
                    for _ in range(rounds):
                        for data in (big, deep, wide):
                            await wire.send_text(data)
                            got = await wire.recv(timeout=20)
                            sent += 1
                            failed += got.get("channel") != "runtime.session.error"
                for _ in range(max(1, rounds // 10)):
                    async with raw_wire(process.runtime_url, context, token) as wire:
                        sent += 1
                        try:
                            got = await _send_and_answer(wire, Hostile(
                                "huge strings/arrays", over, frozenset(), opcode=TEXT), over)
                            failed += 1
                        except Closed as closed:
                            failed += closed.code != 1009
                return sent, failed

            await flood(5)  # warm up: the allocator's pools, TLS buffers, compiled validators
            before = gateway.memory_info().rss
            sent, failed = await flood(60)
            after = gateway.memory_info().rss
            tried, lost = sent, failed
            beat = await witness.call({"channel": HEARTBEAT, "id": "b", "payload": ids})
            lost += beat["payload"].get("accepted") is not True
        process.terminate()
        await process.wait()
    reliability_ledger.record("hostile frame: huge strings/arrays", tried, lost,
                              f"gateway RSS {before >> 20} -> {after >> 20} MiB")
    assert lost == 0
    assert after - before < RSS_BOUND, f"RSS grew from {before} to {after} bytes"


def test_ledger_kinds_are_ledger_classes() -> None:
    for kind in FRAME_KINDS:
        assert "hostile frame: " + kind in reliability_ledger.CLASSES
