"""Builders and a driver for testing the pure core without the trio shell.

The `Driver` is a test double of the shell: it feeds the hub inputs at a fake clock, records every
effect, keeps each store effect until a test (or the in-memory `MemoryStore`) answers it exactly
once, and remembers armed timers. Tests then speak in runtime terms ("attach, heartbeat, let the
lease run out") instead of hand-assembling inputs, and still see every effect the core returns.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from attrs import define, field, frozen

from statemachine.effects import (
    AckInputs,
    AppendOutputs,
    ArmTimer,
    ClaimEpoch,
    CloseConnection,
    DeliverInputs,
    Effect,
    ReadInputs,
    ReadKV,
    SendError,
    SendReply,
    SessionChanged,
    StoreEffect,
    WriteKV,
)
from statemachine.hub import Hub
from statemachine.inputs import (
    AppendOutcome,
    CommandReceived,
    ConnectionLost,
    ConnectionOpened,
    ConnId,
    EpochClaimed,
    Input,
    InputsPosted,
    InputsRead,
    KVRead,
    OutputsAppended,
    RunRegistered,
    StoreAnswer,
    StoreAnswered,
    StoreFailed,
    TimerFired,
    Written,
)
from statemachine.messages import (
    AckInputCommand,
    Capability,
    CloseCode,
    Command,
    ErrorCode,
    ErrorPayload,
    GetConfigCommand,
    GetKVCommand,
    GetSecretsCommand,
    HeartbeatCommand,
    InputEvent,
    Millis,
    OutputEvent,
    PublishOutputEventsRequest,
    RecoverConnectionsCommand,
    RuntimeAttachRequest,
    RuntimeAttachResponse,
    SetKVCommand,
)
from statemachine.policy import Policy
from statemachine.records import RunGrant, SessionState
from statemachine.session import Session

T = TypeVar("T")

MAIN = "run-main"
SUB = "run-sub"
SUB2 = "run-sub-2"
OTHER = "run-other"
OTHER_SUB = "run-other-sub"

START = Millis(1_700_000_000_000)
ALL_CAPS = frozenset(Capability)
SECRETS = {"API_KEY": "sk-test-1", "DB_URL": "postgres://test"}
CONFIG: dict[str, Any] = {"model": "m-1", "temperature": 0.5}
ATTEMPT = "attempt-1"
INSTANCE = "instance-1"

STORE_EFFECTS = (ClaimEpoch, AppendOutputs, ReadKV, WriteKV, ReadInputs, AckInputs)
FRAMES = (SendReply, SendError, DeliverInputs, CloseConnection)


# --- builders -------------------------------------------------------------------------------------


def grant(
    run_id: str,
    main: str | None = None,
    caps: Iterable[Capability] = ALL_CAPS,
    secrets: dict[str, str] | None = None,
) -> RunGrant:
    """A run's grant with sensible defaults, so tests name only what they are about."""
    return RunGrant(
        run_id=run_id,
        capabilities=frozenset(caps),
        secrets=dict(SECRETS if secrets is None else secrets),
        config=dict(CONFIG),
        config_version="cfg-1",
        main_run_id=main,
    )


def output(seq: int, event_id: str | None = None) -> OutputEvent:
    """An output event whose content is derived from its seq, so re-publishes are identical."""
    return OutputEvent(event_id or f"out-{seq}", seq, "progress", {"n": seq}, START)


def input_event(run_id: str, seq: int) -> InputEvent:
    """An input event the platform posted for a run."""
    return InputEvent(f"in-{run_id}-{seq}", seq, "message", {"n": seq}, START)


def attach_cmd(
    run_id: str,
    *,
    epoch: int | None = None,
    reconnect: bool = False,
    caps: Iterable[Capability] = tuple(Capability),
    attempt: str | None = ATTEMPT,
    instance: str = INSTANCE,
    version: str = "v1",
    extensions: bool = True,
) -> RuntimeAttachRequest:
    """An attach command as a runtime would send it (this project's client asks for extensions)."""
    return RuntimeAttachRequest(
        run_id=run_id,
        runtime_instance_id=instance,
        protocol_version=version,
        attempt_id=attempt,
        reconnect=reconnect,
        connection_epoch=epoch,
        capabilities=tuple(caps),
        reply_extensions=extensions,
    )


def heartbeat_cmd(session_id: str, run_id: str, instance: str | None = None) -> HeartbeatCommand:
    """A heartbeat for a session."""
    return HeartbeatCommand(session_id, run_id, instance)


def recover_cmd(
    session_id: str, main: str, subs: Sequence[str] = (), epoch: int | None = None
) -> RecoverConnectionsCommand:
    """A recover of a main run's session and its sub-runs' sessions."""
    return RecoverConnectionsCommand(session_id, main, tuple(subs), epoch)


def secrets_cmd(
    session_id: str, run_id: str, names: Sequence[str] | None = None
) -> GetSecretsCommand:
    """A secrets read: the named ones, or all when `names` is None."""
    return GetSecretsCommand(session_id, run_id, None if names is None else tuple(names))


def config_cmd(session_id: str, run_id: str) -> GetConfigCommand:
    """A config read: the cheapest command that needs a lease and nothing else."""
    return GetConfigCommand(session_id, run_id)


def kv_get_cmd(session_id: str, run_id: str, keys: Sequence[str]) -> GetKVCommand:
    """A KV read."""
    return GetKVCommand(session_id, run_id, tuple(keys))


def kv_set_cmd(session_id: str, run_id: str, kv: dict[str, str]) -> SetKVCommand:
    """A KV write."""
    return SetKVCommand(session_id, run_id, dict(kv))


def publish_cmd(session_id: str, run_id: str, seqs: Iterable[int]) -> PublishOutputEventsRequest:
    """An output batch with the given seqs."""
    return PublishOutputEventsRequest(session_id, run_id, tuple(output(seq) for seq in seqs))


def ack_cmd(session_id: str, run_id: str, seq: int) -> AckInputCommand:
    """An input acknowledgement up to `seq`."""
    return AckInputCommand(session_id, run_id, seq)


# --- effect queries -------------------------------------------------------------------------------


def of_type(effects: Iterable[object], kind: type[T]) -> list[T]:
    """The effects of one kind, in order."""
    return [effect for effect in effects if isinstance(effect, kind)]


def of_types(effects: Iterable[Effect], *kinds: type[Any]) -> list[Effect]:
    """The effects of any of several kinds, in order."""
    return [effect for effect in effects if isinstance(effect, kinds)]


def only(items: Sequence[T]) -> T:
    """The one item of a sequence; fails loudly when there are none or several."""
    assert len(items) == 1, f"expected exactly one, got {len(items)}: {items!r}"
    return items[0]


def frames_to(effects: Iterable[Effect], conn: ConnId) -> list[Effect]:
    """Everything sent to (or closing) a connection."""
    return [effect for effect in effects if isinstance(effect, FRAMES) and effect.conn == conn]


def answers(
    effects: Iterable[Effect], request_id: str | None = None
) -> list[SendReply | SendError]:
    """Replies and errors, optionally only those answering one request."""
    found: list[SendReply | SendError] = [
        effect for effect in effects if isinstance(effect, (SendReply, SendError))
    ]
    if request_id is None:
        return found
    return [effect for effect in found if effect.request_id == request_id]


def reply_of(effects: Iterable[Effect], kind: type[T], request_id: str | None = None) -> T:
    """The payload of the one answer (to `request_id`) in `effects`: it must be a `kind` reply."""
    answer = only(answers(effects, request_id))
    assert isinstance(answer, SendReply), f"expected a reply, got {answer!r}"
    assert isinstance(answer.payload, kind), f"expected {kind.__name__}, got {answer.payload!r}"
    return answer.payload


def error_of(effects: Iterable[Effect], request_id: str | None = None) -> ErrorPayload:
    """The payload of the one answer in `effects` (to `request_id`), which must be an error."""
    answer = only(answers(effects, request_id))
    assert isinstance(answer, SendError), f"expected an error, got {answer!r}"
    return answer.error


def error_code(effects: Iterable[Effect], request_id: str | None = None) -> ErrorCode:
    """The code of the one error answering in `effects`."""
    return error_of(effects, request_id).code


def closes(effects: Iterable[Effect]) -> list[tuple[ConnId, CloseCode]]:
    """Which connections were closed, and with which code, in order."""
    return [(close.conn, close.code) for close in of_type(effects, CloseConnection)]


def changes(effects: Iterable[Effect], run_id: str) -> list[tuple[SessionState, SessionState]]:
    """The state changes one run's session reported."""
    return [(c.old, c.new) for c in of_type(effects, SessionChanged) if c.run_id == run_id]


# --- the store double ---------------------------------------------------------------------------


@define
class MemoryStore:
    """A tiny in-memory store with the real one's rules: epoch fences, seq order, input queues.

    It mirrors the contract of gateway/store/base.py closely enough that answers are realistic:
    a claim fails only against a higher stored epoch, fenced writes need the stored epoch to be
    the writer's, output batches must continue the log from seq 0 (a stored seq may come again
    only with its stored eventId), inputs are numbered from 0.
    """

    epochs: dict[str, int] = field(factory=dict)
    outputs: dict[str, list[OutputEvent]] = field(factory=dict)
    kv: dict[str, dict[str, str]] = field(factory=dict)
    inputs: dict[str, list[InputEvent]] = field(factory=dict)
    acked: dict[str, int] = field(factory=dict)

    def answer(self, effect: StoreEffect) -> StoreAnswer:
        """Carry out one store effect and say what the real store would answer."""
        if isinstance(effect, ClaimEpoch):
            return self._claim(effect)
        if isinstance(effect, AppendOutputs):
            return self._append(effect)
        if isinstance(effect, ReadKV):
            found = self.kv.get(effect.run_id, {})
            return KVRead({key: found[key] for key in effect.keys if key in found})
        if isinstance(effect, WriteKV):
            if self.fenced(effect.run_id, effect.epoch):
                return Written(fenced=True)
            self.kv.setdefault(effect.run_id, {}).update(effect.kv)
            return Written(fenced=False)
        if isinstance(effect, ReadInputs):
            queued = self.inputs.get(effect.run_id, [])
            after = [event for event in queued if event.seq > effect.after_seq]
            return InputsRead(tuple(after[: effect.limit]))
        if self.fenced(effect.run_id, effect.epoch):
            return Written(fenced=True)
        self.acked[effect.run_id] = max(self.acked.get(effect.run_id, -1), effect.seq)
        return Written(fenced=False)

    def fenced(self, run_id: str, epoch: int) -> bool:
        """Whether a write at `epoch` is refused: the stored epoch is not the writer's."""
        return self.epochs.get(run_id, -1) != epoch

    def last_input(self, run_id: str) -> int:
        """The seq of the run's last queued input, or -1."""
        return len(self.inputs.get(run_id, ())) - 1

    def next_output(self, run_id: str) -> int:
        """The seq the run's output log takes next."""
        return len(self.outputs.get(run_id, ()))

    def post(self, run_id: str, count: int, now: Millis) -> InputsPosted:
        """Queue `count` inputs for the run, as the platform does, and say so to the core."""
        queue = self.inputs.setdefault(run_id, [])
        for _ in range(count):
            queue.append(input_event(run_id, len(queue)))
        return InputsPosted(run_id, len(queue) - 1, now)

    def _claim(self, effect: ClaimEpoch) -> EpochClaimed:
        records = [claim.record for claim in effect.claims]
        ok = all(record.epoch >= self.epochs.get(record.run_id, -1) for record in records)
        if ok:
            for record in records:
                self.epochs[record.run_id] = record.epoch
        return EpochClaimed(
            ok=ok,
            input_acked_seq={r.run_id: self.acked.get(r.run_id, -1) for r in records},
            input_last_seq={r.run_id: self.last_input(r.run_id) for r in records},
            output_last_seq={r.run_id: len(self.outputs.get(r.run_id, [])) - 1 for r in records},
        )

    def _append(self, effect: AppendOutputs) -> OutputsAppended:
        log = self.outputs.setdefault(effect.run_id, [])
        if self.fenced(effect.run_id, effect.epoch):
            return OutputsAppended(AppendOutcome.FENCED, len(log))
        seqs = [event.seq for event in effect.events]
        if any(later <= earlier for earlier, later in itertools.pairwise(seqs)):
            return OutputsAppended(AppendOutcome.SEQ_GAP, len(log))
        fresh = [event for event in effect.events if event.seq >= len(log)]
        if any(event.seq != len(log) + i for i, event in enumerate(fresh)):
            return OutputsAppended(AppendOutcome.SEQ_GAP, len(log))
        again = [event for event in effect.events if event.seq < len(log)]
        if any(log[event.seq].event_id != event.event_id for event in again):
            return OutputsAppended(AppendOutcome.SEQ_CONFLICT, len(log))
        log.extend(fresh)
        return OutputsAppended(AppendOutcome.STORED, len(log))


# --- the driver ---------------------------------------------------------------------------------


class Driver:
    """Drives a Hub like the shell does: a fake clock, store tickets answered once, timers kept."""

    def __init__(self, policy: Policy | None = None, runs: Iterable[RunGrant] = ()) -> None:
        self.policy = policy if policy is not None else Policy()
        self.hub = Hub(self.policy)
        self.store = MemoryStore()
        self.now = START
        self.log: list[Effect] = []
        self.unanswered: dict[int, StoreEffect] = {}
        self.answered: set[int] = set()
        self.timers: dict[str, Millis] = {}
        self._request_ids = itertools.count(1)
        self._session_ids = itertools.count(1)
        for run in runs:
            self.feed(RunRegistered(run))

    # --- feeding ----------------------------------------------------------------------------------

    def feed(self, event: Input) -> list[Effect]:
        """Hand one input to the hub; book its store effects and timers; return its effects."""
        effects = self.hub.handle(event)
        for effect in effects:
            if isinstance(effect, STORE_EFFECTS):
                ticket = effect.ticket
                assert ticket not in self.unanswered and ticket not in self.answered, (
                    f"ticket {ticket} issued twice"
                )
                self.unanswered[ticket] = effect
            elif isinstance(effect, ArmTimer):
                self.timers[effect.run_id] = effect.deadline
        self.log.extend(effects)
        return effects

    def advance(self, ms: int) -> None:
        """Move the fake clock forward."""
        assert ms >= 0, "the clock is monotonic"
        self.now = Millis(self.now + ms)

    def advance_to(self, at: int) -> None:
        """Move the fake clock forward to an instant (never back)."""
        self.advance(at - self.now)

    def register(self, run: RunGrant) -> list[Effect]:
        """The platform created a run."""
        return self.feed(RunRegistered(run))

    def open(self, conn: ConnId, principal: str = MAIN) -> list[Effect]:
        """A runtime connected with the token of `principal`."""
        return self.feed(ConnectionOpened(conn, principal, self.now))

    def lose(self, conn: ConnId) -> list[Effect]:
        """The connection is gone."""
        return self.feed(ConnectionLost(conn, self.now))

    def send(self, conn: ConnId, command: Command, request_id: str | None = None) -> list[Effect]:
        """A command frame arrives on a connection (with a fresh session id on hand)."""
        rid = request_id if request_id is not None else f"auto-{next(self._request_ids)}"
        fresh = f"session-{next(self._session_ids)}"
        return self.feed(CommandReceived(conn, rid, command, self.now, fresh))

    def post_inputs(self, run_id: str, count: int) -> list[Effect]:
        """The platform queues inputs for a run (in the store) and tells the core."""
        return self.feed(self.store.post(run_id, count, self.now))

    # --- the store --------------------------------------------------------------------------------

    def answer(self, ticket: int, answer: StoreAnswer) -> list[Effect]:
        """Deliver the store's answer to one outstanding ticket (each ticket exactly once)."""
        assert ticket in self.unanswered, f"ticket {ticket} is not outstanding"
        del self.unanswered[ticket]
        self.answered.add(ticket)
        return self.feed(StoreAnswered(ticket, answer, self.now))

    def answer_from_store(self, ticket: int) -> list[Effect]:
        """Let the in-memory store carry out the ticket's effect and answer it."""
        return self.answer(ticket, self.store.answer(self.unanswered[ticket]))

    def fail(self, ticket: int, reason: str = "disk unavailable") -> list[Effect]:
        """The store failed the ticket's operation."""
        return self.answer(ticket, StoreFailed(reason))

    def outstanding(self, kind: type[T]) -> list[T]:
        """Outstanding store effects of one kind, oldest first."""
        return of_type((self.unanswered[t] for t in sorted(self.unanswered)), kind)

    def ticket_of(self, kind: type[StoreEffect]) -> int:
        """The ticket of the one outstanding store effect of a kind."""
        return only(self.outstanding(kind)).ticket

    def settle(self, limit: int = 1000) -> list[Effect]:
        """Answer every outstanding ticket from the store, oldest first, until none is left."""
        effects: list[Effect] = []
        for _ in range(limit):
            if not self.unanswered:
                return effects
            effects += self.answer_from_store(min(self.unanswered))
        raise AssertionError(f"store traffic did not settle after {limit} answers")

    # --- time -------------------------------------------------------------------------------------

    def fire_timers(self) -> list[Effect]:
        """Report every armed deadline that has come, as the shell's timers do."""
        effects: list[Effect] = []
        for run_id, deadline in sorted(self.timers.items()):
            if deadline <= self.now:
                del self.timers[run_id]
                effects += self.feed(TimerFired(run_id, self.now))
        return effects

    # --- shortcuts --------------------------------------------------------------------------------

    def session(self, run_id: str) -> Session:
        """The hub's session of a run."""
        return self.hub.sessions[run_id]

    def attach_leased(self, conn: ConnId, run_id: str, **options: Any) -> str:
        """Attach a run on a connection and let the store grant it; return the session id."""
        rid = f"attach-{next(self._request_ids)}"
        effects = self.send(conn, attach_cmd(run_id, **options), request_id=rid)
        effects += self.settle()
        return reply_of(effects, RuntimeAttachResponse, rid).session_id


@frozen
class Held:
    """A driver whose main run's session is in a known state, and who holds it."""

    driver: Driver
    conn: ConnId
    session_id: str
    epoch: int

    @property
    def session(self) -> Session:
        """The main run's session."""
        return self.driver.session(MAIN)


def session_in(state: SessionState, policy: Policy | None = None) -> Held:
    """Bring the main run's session into `state` through real inputs only.

    ATTACHED: an attach whose claim is unanswered. LEASED: the claim held. EXPIRED: the lease
    timer fired at its deadline. DETACHED: then the recovery window closed too (the session let
    go of the silent connection, which stays open). RECOVERING: a second connection re-attached
    with a higher epoch (superseding the first) and its claim is unanswered.
    """
    d = Driver(policy, runs=[grant(MAIN)])
    d.open(1)
    if state is SessionState.ATTACHED:
        d.send(1, attach_cmd(MAIN, epoch=1))
        held = Held(d, 1, d.session(MAIN).session_id, 1)
    else:
        session_id = d.attach_leased(1, MAIN, epoch=1)
        held = Held(d, 1, session_id, 1)
        if state is SessionState.RECOVERING:
            d.open(2)
            d.send(2, attach_cmd(MAIN, epoch=2, reconnect=True))
            held = Held(d, 2, session_id, 2)
        elif state is not SessionState.LEASED:
            d.advance_to(d.session(MAIN).lease_expires_at)
            d.fire_timers()
            if state is SessionState.DETACHED:
                d.advance_to(d.session(MAIN).recovery_deadline)
                d.fire_timers()
    assert d.session(MAIN).state is state
    return held
