"""Random interleavings of everything that can happen to a hub, checked against its promises.

A hypothesis state machine drives one Hub with several connections and two runs (a main run and
its sub-run): connections come and go, runtimes attach (random epochs, reconnect or not),
heartbeat, recover, publish, write, ack; time jumps; timers fire; the store answers in any order
(sometimes failing, sometimes for connections long gone); now and then the platform revokes a run
or the gateway drains. After every step the promises are checked, from the effects a runtime or
the store would see and from the hub's own bookkeeping.
"""

from __future__ import annotations

from attrs import define
from core_support import (
    MAIN,
    STORE_EFFECTS,
    SUB,
    Driver,
    ack_cmd,
    attach_cmd,
    config_cmd,
    grant,
    heartbeat_cmd,
    kv_set_cmd,
    publish_cmd,
    recover_cmd,
)
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from statemachine.effects import (
    ClaimEpoch,
    CloseConnection,
    DeliverInputs,
    Effect,
    ReadInputs,
    SendError,
    SendReply,
    SessionChanged,
)
from statemachine.inputs import (
    CommandReceived,
    ConnectionLost,
    ConnectionOpened,
    ConnId,
    DrainStarted,
    Input,
    RunRevoked,
    StoreAnswered,
    StoreFailed,
    TimerFired,
)
from statemachine.messages import (
    AckInputResponse,
    Command,
    GetConfigResponse,
    HeartbeatResponse,
    RecoverConnectionsResponse,
    RuntimeAttachResponse,
)
from statemachine.records import SessionState
from statemachine.table import TRANSITIONS, Trigger

RUNS = (MAIN, SUB)
L, A, R, E, D = (
    SessionState.LEASED,
    SessionState.ATTACHED,
    SessionState.RECOVERING,
    SessionState.EXPIRED,
    SessionState.DETACHED,
)

picks = st.integers(min_value=0, max_value=15)
runs = st.sampled_from(RUNS)
epochs = st.one_of(st.none(), st.integers(min_value=0, max_value=4))
# Rare rules act on one inner value only: hypothesis favours the ends of a range, and shrinking
# moves towards 0, so a shrunk example drops the rare step unless the failure needs it.
rarely = st.integers(min_value=0, max_value=9)
RARE = 9


@define
class Request:
    """A command in flight, as the runtime that sent it remembers it."""

    conn: ConnId
    runs: tuple[str, ...]
    ack_seq: int | None = None  # for an ack: the seq it acknowledges
    answered: bool = False


class HubMachine(RuleBasedStateMachine):
    """Random traffic against one hub; every promise checked after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.d = Driver(runs=[grant(MAIN), grant(SUB, MAIN)])
        self.opened: list[ConnId] = []
        self.dead: set[ConnId] = set()  # closed by the hub, or lost: nothing more goes to it
        self.lost: set[ConnId] = set()
        self.requests: dict[str, Request] = {}
        self.awaiting: dict[int, str] = {}  # store ticket -> the request it will answer
        self.session_ids: dict[str, str] = {}  # run -> the latest sessionId a runtime was given
        self.holder: dict[str, ConnId | None] = {}  # run -> the connection that claimed it last
        self.lease_end: dict[str, int] = {}  # run -> when its lease ends, as effects tell it
        self.expired: set[str] = set()  # runs whose session expired and was not granted since
        self.max_epoch: dict[str, int] = {}
        self.seen_epochs: dict[int, int] = {}  # id(session) -> its epoch at the last step
        self.delivered: dict[str, int] = {}  # run -> the highest input seq ever delivered
        self.received: dict[tuple[str, ConnId], set[int]] = {}  # input seqs each link was sent
        self.granted_to: dict[str, ConnId] = {}  # run -> the last connection told it holds it
        self.revoked: set[str] = set()
        self.draining = False

    # --- feeding and observing ------------------------------------------------------------------

    def feed(self, event: Input, request_id: str | None = None) -> list[Effect]:
        """Feed one input and check every effect against what came before it."""
        dead_before = set(self.dead)
        effects = self.d.feed(event)
        for effect in effects:
            self.observe(effect)
        if isinstance(event, CommandReceived):
            assert request_id is not None
            self.after_command(event, request_id, effects, dead_before)
        elif isinstance(event, StoreAnswered) and event.ticket in self.awaiting:
            request = self.requests[self.awaiting.pop(event.ticket)]
            # (a) the answer comes with the store's word, unless its connection is gone.
            assert request.answered or request.conn in dead_before, "store answer lost a reply"
        return effects

    def after_command(
        self, event: CommandReceived, request_id: str, effects: list[Effect], dead: set[ConnId]
    ) -> None:
        """A command is answered at once, or waits on exactly one store ticket."""
        request = self.requests[request_id]
        if event.conn in dead:
            assert effects == [], "a closed connection's command produced effects"
            return
        if request.answered:
            return
        waits = [e for e in effects if isinstance(e, STORE_EFFECTS)]
        waits = [e for e in waits if not isinstance(e, ReadInputs)]
        assert len(waits) == 1, f"unanswered command waits on {waits!r}"
        self.awaiting[waits[0].ticket] = request_id

    def observe(self, effect: Effect) -> None:
        """Check one effect, in order, and learn from it."""
        if isinstance(effect, (SendReply, SendError, DeliverInputs, CloseConnection)):
            # (b) nothing is ever sent to a connection after it was closed or lost.
            assert effect.conn in self.opened, f"frame to a connection never opened: {effect!r}"
            assert effect.conn not in self.dead, f"frame after close or loss: {effect!r}"
        if isinstance(effect, (SendReply, SendError)):
            assert effect.request_id is not None
            request = self.requests[effect.request_id]
            # (a) never two answers; each to the connection that asked.
            assert not request.answered, f"second answer to {effect.request_id}"
            assert request.conn == effect.conn
            request.answered = True
            if isinstance(effect, SendReply):
                self.observe_reply(effect, request)
        elif isinstance(effect, DeliverInputs):
            run_id = effect.delivery.run_id
            assert self.holder.get(run_id) == effect.conn, "inputs to a non-holder"
            seqs = [event.seq for event in effect.delivery.events]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            self.delivered[run_id] = max(self.delivered.get(run_id, -1), seqs[-1])
            self.received.setdefault((run_id, effect.conn), set()).update(seqs)
        elif isinstance(effect, CloseConnection):
            self.dead.add(effect.conn)
            self.forget_holder(effect.conn)
        elif isinstance(effect, ClaimEpoch):
            for claim in effect.claims:
                run_id, epoch = claim.record.run_id, claim.record.epoch
                # (c) a run's highest epoch never goes down.
                assert epoch >= self.max_epoch.get(run_id, -1), "epoch went down"
                self.max_epoch[run_id] = epoch
        elif isinstance(effect, SessionChanged):
            if effect.new is D:
                # Given up, lost or revoked: the session lets go of its connection, which holds
                # nothing more (a new attempt may take the run without superseding it).
                self.holder[effect.run_id] = None
            if effect.new is E:
                self.expired.add(effect.run_id)
            if effect.new is L:
                # (d) only a granted claim leads back into LEASED.
                assert effect.old in (A, R), f"{effect.old} -> LEASED"
                self.expired.discard(effect.run_id)
                self.lease_end[effect.run_id] = effect.at + self.d.policy.lease_ttl_ms

    def observe_reply(self, reply: SendReply, request: Request) -> None:
        """Replies that hand out or use a session go to its one holder, within its lease."""
        payload = reply.payload
        if isinstance(payload, RuntimeAttachResponse):
            self.session_ids[payload.run_id] = payload.session_id
            assert payload.lease_expires_at == self.d.now + self.d.policy.lease_ttl_ms
        if isinstance(payload, RecoverConnectionsResponse) and not payload.accepted:
            return
        if isinstance(payload, (RuntimeAttachResponse, RecoverConnectionsResponse)):
            for run_id in request.runs:
                self.granted_to[run_id] = reply.conn
        if isinstance(payload, (RuntimeAttachResponse, RecoverConnectionsResponse,
                                HeartbeatResponse, GetConfigResponse)):
            for run_id in request.runs:
                # (e) one live holder per run: only it is served.
                assert self.holder.get(run_id) == reply.conn, f"{run_id} served to a non-holder"
        if isinstance(payload, AckInputResponse) and request.ack_seq is not None:
            (run_id,) = request.runs
            assert request.ack_seq <= self.delivered.get(run_id, -1), "acked an undelivered seq"
        if isinstance(payload, HeartbeatResponse):
            (run_id,) = request.runs
            # (d) a lease is never extended after it ran out, short of a recovery.
            assert run_id not in self.expired, "heartbeat renewed an expired lease"
            assert self.d.now < self.lease_end[run_id], "heartbeat renewed a lease past its end"
            self.lease_end[run_id] = self.d.now + self.d.policy.lease_ttl_ms

    def forget_holder(self, conn: ConnId) -> None:
        for run_id, holder in self.holder.items():
            if holder == conn:
                self.holder[run_id] = None

    def command(
        self, pick: int, command: Command, runs: tuple[str, ...], ack_seq: int | None = None
    ) -> None:
        """Send a command on a connection the shell still reads from; mostly the run's holder."""
        conns = [conn for conn in self.opened if conn not in self.lost]
        if not conns:
            return
        holder = self.holder.get(runs[0])
        conn = holder if holder is not None and pick < 10 else conns[pick % len(conns)]
        request_id = f"r{len(self.requests)}"
        self.requests[request_id] = Request(conn, runs, ack_seq)
        fresh = f"session-{len(self.requests)}"
        event = CommandReceived(conn, request_id, command, self.d.now, fresh)
        before, dead, epochs = dict(self.holder), set(self.dead), dict(self.max_epoch)
        effects = self.feed(event, request_id)
        for index, claim in enumerate(effects):
            if not isinstance(claim, ClaimEpoch):
                continue
            for c in claim.claims:
                run_id = c.record.run_id
                previous = before.get(run_id)
                if any(isinstance(e, SessionChanged) and e.run_id == run_id and e.new is D
                       for e in effects[:index]):
                    previous = None  # its window closed on this command: the holder let go
                if previous not in (None, conn) and previous not in dead:
                    # (e) only a higher epoch takes a run from a live holder, and closes it.
                    assert c.record.epoch > epochs[run_id], "an equal epoch took a live session"
                    assert previous in self.dead, "two live holders"
                self.holder[run_id] = conn

    def session_id(self, run_id: str, bogus: bool = False) -> str:
        return "bogus" if bogus else self.session_ids.get(run_id, "unknown")

    @initialize()
    def two_connections_and_a_leased_main_run(self) -> None:
        """Start where the interesting traffic is: connected, the main run leased on the first."""
        self.open_connection()
        self.open_connection()
        self.command(0, attach_cmd(MAIN, epoch=1), (MAIN,))
        self.store_catches_up()

    # --- connections ----------------------------------------------------------------------------

    @precondition(lambda self: len(self.opened) < 5 and not self.draining)
    @rule()
    def open_connection(self) -> None:
        conn = len(self.opened) + 1
        self.opened.append(conn)
        self.feed(ConnectionOpened(conn, MAIN, self.d.now))

    @rule(pick=picks)
    def lose_connection(self, pick: int) -> None:
        conns = [conn for conn in self.opened if conn not in self.lost]
        if conns:
            conn = conns[pick % len(conns)]
            self.feed(ConnectionLost(conn, self.d.now))
            self.lost.add(conn)
            self.dead.add(conn)
            self.forget_holder(conn)

    # --- commands -------------------------------------------------------------------------------

    @rule(pick=picks, run_id=runs, epoch=epochs, reconnect=st.booleans())
    def attach(self, pick: int, run_id: str, epoch: int | None, reconnect: bool) -> None:
        self.command(pick, attach_cmd(run_id, epoch=epoch, reconnect=reconnect), (run_id,))

    @rule(pick=picks, run_id=runs, bogus=st.booleans())
    def heartbeat(self, pick: int, run_id: str, bogus: bool) -> None:
        self.command(pick, heartbeat_cmd(self.session_id(run_id, bogus), run_id), (run_id,))

    @rule(pick=picks, run_id=runs)
    def get_config(self, pick: int, run_id: str) -> None:
        self.command(pick, config_cmd(self.session_id(run_id), run_id), (run_id,))

    @rule(pick=picks, with_sub=st.booleans(), epoch=epochs)
    def recover(self, pick: int, with_sub: bool, epoch: int | None) -> None:
        subs = (SUB,) if with_sub else ()
        command = recover_cmd(self.session_id(MAIN), MAIN, subs, epoch)
        self.command(pick, command, (MAIN, *subs))

    @rule(pick=picks, run_id=runs, offset=st.integers(-2, 1), count=st.integers(0, 3))
    def publish(self, pick: int, run_id: str, offset: int, count: int) -> None:
        start = max(0, self.d.store.next_output(run_id) + offset)
        command = publish_cmd(self.session_id(run_id), run_id, range(start, start + count))
        self.command(pick, command, (run_id,))

    @rule(pick=picks, run_id=runs, value=st.sampled_from(["a", "b"]))
    def kv_set(self, pick: int, run_id: str, value: str) -> None:
        self.command(pick, kv_set_cmd(self.session_id(run_id), run_id, {"k": value}), (run_id,))

    @rule(pick=picks, run_id=runs, offset=st.integers(-1, 1))
    def ack(self, pick: int, run_id: str, offset: int) -> None:
        seq = self.delivered.get(run_id, -1) + offset
        self.command(pick, ack_cmd(self.session_id(run_id), run_id, seq), (run_id,), seq)

    # --- the platform, the clock, the store -----------------------------------------------------

    @rule(run_id=runs, count=st.integers(1, 3))
    def post_inputs(self, run_id: str, count: int) -> None:
        if run_id not in self.revoked:  # the store refuses posts to revoked runs
            self.feed(self.d.store.post(run_id, count, self.d.now))

    @rule(ms=st.one_of(st.integers(1, 3_000), st.integers(20_000, 100_000)), punctual=st.booleans())
    def advance(self, ms: int, punctual: bool) -> None:
        """Time passes; the shell's timers fire on time, or late (then commands see it first)."""
        self.d.advance(ms)
        if punctual:
            self.fire_timers()

    @rule()
    def fire_timers(self) -> None:
        for run_id, deadline in sorted(self.d.timers.items()):
            if deadline <= self.d.now:
                del self.d.timers[run_id]
                self.feed(TimerFired(run_id, self.d.now))

    @rule(pick=picks, fail=rarely)
    def store_answers(self, pick: int, fail: int) -> None:
        if not self.d.unanswered:
            return
        tickets = sorted(self.d.unanswered)
        ticket = tickets[pick % len(tickets)]
        effect = self.d.unanswered.pop(ticket)
        self.d.answered.add(ticket)
        answer = StoreFailed("disk unavailable") if fail == RARE else self.d.store.answer(effect)
        self.feed(StoreAnswered(ticket, answer, self.d.now))

    @rule()
    def store_catches_up(self) -> None:
        """The store answers everything outstanding, oldest first (its usual pace)."""
        while self.d.unanswered:
            self.store_answers(0, 0)

    @rule(run_id=runs, dice=rarely)
    def revoke(self, run_id: str, dice: int) -> None:
        if dice == RARE and run_id not in self.revoked:
            doomed = set(RUNS) if run_id == MAIN else {run_id}
            self.revoked |= doomed
            self.feed(RunRevoked(run_id, self.d.now))
            for doomed_run in doomed:
                self.holder[doomed_run] = None
            if run_id == MAIN:  # its token is dead: every connection opened with it is closed
                assert set(self.opened) <= self.dead

    @rule(dice=rarely)
    def drain(self, dice: int) -> None:
        if dice == RARE and not self.draining:
            self.draining = True
            self.feed(DrainStarted(self.d.now))

    # --- invariants -----------------------------------------------------------------------------

    @invariant()
    def every_ticket_is_pending_until_answered(self) -> None:
        # (f) the hub waits on exactly the tickets the store has not answered.
        assert set(self.d.hub.pending) == set(self.d.unanswered)

    @invariant()
    def every_command_is_answered_or_waiting(self) -> None:
        # (a) a command is answered, waits on an outstanding ticket, or lost its connection.
        waiting = set(self.awaiting.values())
        for request_id, request in self.requests.items():
            assert request.answered or request_id in waiting or request.conn in self.dead

    @invariant()
    def sessions_are_in_table_states(self) -> None:
        for run_id, session in self.d.hub.sessions.items():
            # (g) every state is a SessionState the table answers for every trigger.
            assert isinstance(session.state, SessionState)
            assert all((session.state, trigger) in TRANSITIONS for trigger in Trigger)
            # (c) a session's epoch never goes down.
            assert session.epoch >= self.seen_epochs.get(id(session), -1)
            self.seen_epochs[id(session)] = session.epoch
            # (e) a session is held by a live connection or by none; a leased one, by the
            # connection that was told so.
            assert session.conn is None or session.conn not in self.dead
            if session.state is L and session.conn is not None:
                assert self.granted_to.get(run_id) == session.conn, "leased to an untold link"
            assert run_id not in self.revoked

    @invariant()
    def deadlines_are_watched(self) -> None:
        # Expiry never depends on traffic: a live lease or window always has a timer armed in time.
        for run_id, session in self.d.hub.sessions.items():
            due = {L: session.lease_expires_at, E: session.recovery_deadline}.get(session.state)
            if due is not None:
                armed = self.d.timers.get(run_id)
                assert armed is not None and armed <= due, f"{run_id}: timer {armed}, due {due}"

    def teardown(self) -> None:
        """Let the store answer everything: no reply is lost, nothing is left pending."""
        for _ in range(1000):
            if not self.d.unanswered:
                break
            self.store_answers(0, 0)
        assert self.d.unanswered == {} and self.d.hub.pending == {}
        self.every_command_is_answered_or_waiting()
        assert all(conn.in_flight == 0 for conn in self.d.hub.connections.values())
        if self.draining:
            assert set(self.opened) <= self.dead, "a drained connection was left open"
        # Every unacknowledged input reaches each leased run's live holder (a new post pumps
        # after failed reads).
        for run_id, session in self.d.hub.sessions.items():
            if session.state is L and session.conn is not None:
                self.post_inputs(run_id, 1)
                self.store_catches_up()
                acked = self.d.store.acked.get(run_id, -1)
                unacked = set(range(acked + 1, self.d.store.last_input(run_id) + 1))
                assert unacked <= self.received.get((run_id, session.conn), set())


def _examples() -> int:
    # 150 locally; a profile asking for fewer than hypothesis' default (CI's) wins, so the suite
    # keeps its time budget there.
    wanted = settings().max_examples  # the loaded profile's
    return 150 if wanted >= 100 else wanted


HubMachine.TestCase.settings = settings(
    max_examples=_examples(), stateful_step_count=40, deadline=None, database=None
)
test_hub_keeps_its_promises = HubMachine.TestCase
