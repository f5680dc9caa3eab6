"""One run's session: its state, lease, epoch and input cursor, moved only through TRANSITIONS.

A session outlives connections: the lease runs on after a drop, and a runtime that comes back
with `reconnect: true` (or `recover`) within the recovery window resumes the same session.
"""

from __future__ import annotations

from attrs import frozen

from statemachine.effects import (
    ArmTimer,
    AttemptLost,
    DeliverInputs,
    Effect,
    ReadInputs,
    SaveSession,
    SendReply,
    SessionChanged,
)
from statemachine.errors import Refused
from statemachine.inputs import ConnId, EpochClaimed
from statemachine.messages import (
    Capability,
    ErrorCode,
    HeartbeatCommand,
    HeartbeatResponse,
    InputEvent,
    Millis,
    RuntimeAttachResponse,
    TaskInputDelivery,
    delivery_id,
)
from statemachine.policy import Policy
from statemachine.records import RunGrant, SessionRecord, SessionState
from statemachine.table import TRANSITIONS, Action, Trigger


@frozen
class Claimant:
    """Who is taking a session: the identity an attach brings, and an id in case it is new."""

    fresh_session_id: str
    attempt_id: str | None
    runtime_instance_id: str | None
    capabilities: frozenset[Capability] | None  # None: recover, which keeps what was granted


_S = SessionState


class Session:
    """The state machine of one run's session (h11-style: state in, effects out)."""

    __slots__ = (
        "armed",
        "attempt_id",
        "capabilities",
        "claim_ticket",
        "conn",
        "epoch",
        "grant",
        "input_acked",
        "input_delivered",
        "input_last",
        "input_reading",
        "input_resumed",
        "input_sent",
        "lease_expires_at",
        "output_next",
        "policy",
        "recovery_deadline",
        "resuming",
        "run_id",
        "runtime_instance_id",
        "session_id",
        "state",
        "told",
    )

    def __init__(self, grant: RunGrant, policy: Policy) -> None:
        self.grant = grant
        self.policy = policy
        self.run_id = grant.run_id
        self.state = _S.DETACHED
        self.session_id = ""
        # Whether an attach reply told a runtime `session_id`. A session granted after its
        # claimer's link dropped is leased but untold: a re-attach may resume it (its reply says
        # the id), a recover may not (it names only the main run's id).
        self.told = False
        self.epoch = -1  # the highest epoch ever claimed for the run; it never goes down
        self.conn: ConnId | None = None
        self.attempt_id: str | None = None
        self.runtime_instance_id: str | None = None
        self.capabilities: frozenset[Capability] = frozenset()
        self.lease_expires_at = Millis(0)
        self.recovery_deadline = Millis(0)
        self.armed: Millis | None = None  # the deadline the shell will report, if any
        self.claim_ticket: int | None = None  # the store claim whose answer decides the session
        self.input_acked = -1  # inputs up to here are acknowledged (durably)
        self.input_last = -1  # inputs up to here are queued in the store
        self.input_sent = -1  # inputs up to here went out on the current connection
        self.input_delivered = -1  # inputs up to here went out on some connection of this session
        # Inputs up to here went out on an earlier connection before the current one resumed the
        # session: the runtime may ack them before they are sent again (it processed them before
        # the drop). Inputs queued since, or while no connection existed, it has not seen.
        self.input_resumed = -1
        self.resuming = False  # the claim in flight resumes the session (re-attach, recover)
        self.input_reading: int | None = None  # the store read of inputs in flight, if any
        self.output_next = 0  # the seq the run's output log takes next, as of the last claim

    # --- the table ------------------------------------------------------------------------------

    def _fire(self, trigger: Trigger, now: Millis, out: list[Effect]) -> Action:
        """Move along the table and report the move; the caller carries out the returned action."""
        transition = TRANSITIONS[self.state, trigger]
        if transition.target is not self.state:
            out.append(
                SessionChanged(self.run_id, self.session_id, self.state, transition.target, now)
            )
            self.state = transition.target
        return transition.action

    def record(self) -> SessionRecord:
        """The durable view of this session, for the store."""
        return SessionRecord(
            run_id=self.run_id,
            session_id=self.session_id,
            state=self.state,
            epoch=self.epoch,
            attempt_id=self.attempt_id,
            runtime_instance_id=self.runtime_instance_id,
            capabilities=self.capabilities,
            lease_expires_at=self.lease_expires_at,
            input_acked_seq=self.input_acked,
        )

    # --- time -----------------------------------------------------------------------------------

    def check_deadlines(self, now: Millis, out: list[Effect]) -> ConnId | None:
        """Apply deadlines that have passed, so correctness never waits on a timer's punctuality.

        Return the connection the session let go of because its recovery window closed, if any.
        """
        if self.state is _S.LEASED and now < self.lease_expires_at and self.armed is not None:
            return None  # the common case, on every heartbeat: nothing due, a timer already armed
        lost: ConnId | None = None
        if self.state is _S.LEASED and now >= self.lease_expires_at:
            self._fire(Trigger.LEASE_DEADLINE, now, out)  # EXPIRE
            self.recovery_deadline = Millis(self.lease_expires_at + self.policy.recovery_window_ms)
            out.append(SaveSession(self.record()))
        if self.state is _S.EXPIRED and now >= self.recovery_deadline:
            self._fire(Trigger.RECOVERY_DEADLINE, now, out)  # LOSE
            # The attempt is over: a silent connection left bound would fence the next attempt
            # ("another connection holds this run") although nothing holds it any more.
            lost = self._unbind()
            out.append(AttemptLost(self.run_id, self.attempt_id, now))
            out.append(SaveSession(self.record()))
        self._arm(out)
        return lost

    def timer_fired(self, now: Millis, out: list[Effect]) -> ConnId | None:
        """The shell's timer came: expire what is due; return the connection let go, if any."""
        self.armed = None
        return self.check_deadlines(now, out)

    def _arm(self, out: list[Effect]) -> None:
        """Keep one timer per session, armed no later than the next deadline that matters."""
        if self.state is _S.LEASED:
            due = self.lease_expires_at
        elif self.state is _S.EXPIRED:
            due = self.recovery_deadline
        else:
            return
        # A renewed lease leaves the earlier timer armed: it fires, finds nothing due, and re-arms.
        # That costs one timer per lease period instead of one per heartbeat.
        if self.armed is None or due < self.armed:
            self.armed = due
            out.append(ArmTimer(self.run_id, due))

    # --- claiming the session -------------------------------------------------------------------

    def resumable(self) -> bool:
        """Whether a runtime was granted this session, so a reconnect or recover may resume it."""
        # DETACHED: lost, revoked or never granted. ATTACHED: a fresh session whose claim is in
        # flight or was refused; its sessionId was never told to a runtime, so resuming it would
        # lease the run under an id no runtime knows.
        return self.session_id != "" and self.state in (_S.LEASED, _S.EXPIRED, _S.RECOVERING)

    def guard_epoch(self, epoch: int, conn: ConnId) -> None:
        """Refuse an epoch that cannot take the session: lower than seen, or equal but held."""
        if epoch < self.epoch:
            raise Refused.because(
                ErrorCode.STALE_EPOCH,
                f"connectionEpoch {epoch} is below {self.epoch}, the highest seen for this run",
            )
        if epoch == self.epoch and self.conn is not None and self.conn != conn:
            raise Refused.because(
                ErrorCode.STALE_EPOCH,
                f"another connection holds this run at epoch {epoch}; attach with a higher epoch",
            )

    def claim(
        self,
        trigger: Trigger,
        conn: ConnId,
        epoch: int,
        claimant: Claimant,
        ticket: int,
        now: Millis,
        out: list[Effect],
    ) -> ConnId | None:
        """Take the session for `conn` at `epoch`; return the connection it displaced, if any."""
        resumes = trigger is Trigger.REATTACH and self.resumable()
        if not resumes:
            self.session_id = claimant.fresh_session_id
            self.told = False
            self.input_delivered = -1  # what went to the session before is not this one's
            self.attempt_id = claimant.attempt_id
        # The connection that already holds the session, resuming it: what went out on it
        # stays sent (a live connection is sent nothing twice, and may ack all of it).
        same_link = resumes and self.conn == conn
        self.resuming = resumes
        if claimant.runtime_instance_id is not None:
            self.runtime_instance_id = claimant.runtime_instance_id
        if claimant.capabilities is not None:
            # Every attach states what the runtime wants now; the grant still bounds it.
            self.capabilities = claimant.capabilities
        self._fire(trigger, now, out)  # CLAIM from every state
        displaced = self.conn if self.conn is not None and self.conn != conn else None
        self.conn = conn
        self.epoch = epoch
        self.claim_ticket = ticket
        if not same_link:
            # A new connection, or a new session: redeliver from the last ack once granted.
            self.input_sent = -1
            self.input_reading = None
        return displaced

    def claim_answered(
        self, ticket: int, claim: EpochClaimed | None, now: Millis, out: list[Effect]
    ) -> bool:
        """The store answered our claim (None: it failed): grant the lease (True) or not."""
        if ticket != self.claim_ticket:
            return False  # a later claim replaced this one; its connection was closed
        self.claim_ticket = None
        if claim is None:
            trigger = Trigger.CLAIM_FAILED
        else:
            trigger = Trigger.CLAIM_HELD if claim.ok else Trigger.CLAIM_FENCED
        action = self._fire(trigger, now, out)
        if action is Action.GIVE_UP:
            # The session is not this runtime's: its connection must not fence the next claimer.
            self._unbind()
        if action is Action.RELEASE:
            # The runtime was told `internal` (retryable): its retry must find the session.
            self.recovery_deadline = Millis(
                max(self.recovery_deadline, now + self.policy.recovery_window_ms)
            )
            self._arm(out)
        if claim is None or action is not Action.GRANT:
            out.append(SaveSession(self.record()))
            return False
        self.lease_expires_at = Millis(now + self.policy.lease_ttl_ms)
        self.output_next = claim.output_last_seq.get(self.run_id, -1) + 1
        self.input_acked = max(self.input_acked, claim.input_acked_seq.get(self.run_id, -1))
        self.input_last = max(self.input_last, claim.input_last_seq.get(self.run_id, -1))
        # Redeliver whatever was not acknowledged, unless this very connection was sent it.
        self.input_sent = max(self.input_sent, self.input_acked)
        self.input_resumed = self.input_delivered if self.resuming else -1
        self._arm(out)
        return True

    def attach_response(self, extended: bool) -> RuntimeAttachResponse:
        """What the runtime learns when its attach is granted (`extended`: if it asked for more)."""
        return RuntimeAttachResponse(
            session_id=self.session_id,
            run_id=self.run_id,
            heartbeat_interval_ms=self.policy.heartbeat_interval_ms,
            lease_expires_at=self.lease_expires_at,
            config_version=self.grant.config_version,
            next_output_seq=self.output_next if extended else None,
            max_frame_bytes=self.policy.max_frame_bytes if extended else None,
        )

    # --- using the session ----------------------------------------------------------------------

    def _guard_caller(
        self, conn: ConnId, session_id: str, trigger: Trigger, now: Millis, out: list[Effect]
    ) -> Action:
        """Check the caller holds this session, then look the trigger up.

        The hub applies passed deadlines first (`check_deadlines`), since a closed window also
        ends the connection's hold, which the hub tracks too.
        """
        if conn != self.conn:
            raise Refused.because(
                ErrorCode.NOT_ATTACHED,
                "this connection does not hold the run's session; attach first",
            )
        if session_id != self.session_id:
            raise Refused.because(ErrorCode.SESSION_MISMATCH, "sessionId is not this run's session")
        action = self._fire(trigger, now, out)
        if action is Action.LEASE_EXPIRED:
            raise Refused.because(
                ErrorCode.LEASE_EXPIRED,
                "the lease expired; re-attach with reconnect: true or recover within the window",
            )
        if action is Action.NOT_ATTACHED:
            raise Refused.because(
                ErrorCode.NOT_ATTACHED, "the session has no lease yet; wait for it"
            )
        return action

    def heartbeat(
        self,
        conn: ConnId,
        request_id: str,
        command: HeartbeatCommand,
        now: Millis,
        out: list[Effect],
    ) -> None:
        """Renew the lease of a live session (never one that already expired)."""
        if (
            command.runtime_instance_id is not None
            and self.runtime_instance_id is not None
            and command.runtime_instance_id != self.runtime_instance_id
        ):
            raise Refused.because(
                ErrorCode.SESSION_MISMATCH, "runtimeInstanceId is not the one that attached"
            )
        self._guard_caller(conn, command.session_id, Trigger.HEARTBEAT, now, out)  # RENEW
        self.lease_expires_at = Millis(now + self.policy.lease_ttl_ms)
        due = Millis(now + self.policy.heartbeat_interval_ms)
        out.append(SendReply(conn, request_id, HeartbeatResponse(True, due)))

    def use(
        self,
        conn: ConnId,
        session_id: str,
        needs: Capability | None,
        now: Millis,
        out: list[Effect],
    ) -> None:
        """Admit a command (secrets, config, kv, outputs, acks) or refuse it with the reason."""
        self._guard_caller(conn, session_id, Trigger.USE, now, out)  # SERVE
        if needs is not None and needs not in self.capabilities:
            raise Refused.because(
                ErrorCode.CAPABILITY_DENIED, f"this session was not granted {needs.value!r}"
            )

    # --- inputs ---------------------------------------------------------------------------------

    def wants_inputs(self) -> bool:
        """Whether the store holds inputs this session's live connection has not been sent."""
        return (
            self.state is _S.LEASED
            and self.conn is not None
            and self.input_reading is None
            and self.input_sent < self.input_last
        )

    def read_inputs(self, ticket: int) -> ReadInputs:
        """Start reading the next batch of unsent inputs (call only when `wants_inputs`)."""
        self.input_reading = ticket
        return ReadInputs(ticket, self.run_id, self.input_sent, self.policy.input_batch)

    def inputs_read(
        self, ticket: int, conn: ConnId, events: tuple[InputEvent, ...], out: list[Effect]
    ) -> None:
        """Send what the store returned, unless the connection changed while we read."""
        if ticket != self.input_reading:
            return
        self.input_reading = None
        if conn != self.conn or self.state is not _S.LEASED:
            return
        fresh = tuple(e for e in events if e.seq > self.input_sent)
        if not fresh:
            return
        self.input_sent = fresh[-1].seq
        self.input_delivered = max(self.input_delivered, self.input_sent)
        self.input_last = max(self.input_last, self.input_sent)
        delivery = TaskInputDelivery(self.session_id, self.run_id, fresh)
        out.append(DeliverInputs(conn, delivery_id(self.run_id, fresh[0].seq), delivery))

    def input_read_failed(self, ticket: int) -> None:
        """Forget a failed read so the next pump tries again."""
        if ticket == self.input_reading:
            self.input_reading = None

    # --- losing the connection or the run -------------------------------------------------------

    def _unbind(self) -> ConnId | None:
        """Forget the connection; whoever holds the session next is redelivered from the ack."""
        conn, self.conn = self.conn, None
        self.input_sent = -1
        self.input_reading = None
        return conn

    def connection_lost(self, conn: ConnId, now: Millis, out: list[Effect]) -> None:
        """The connection holding the session is gone; the lease runs on until its deadline."""
        if conn != self.conn:
            return
        self._fire(Trigger.CONNECTION_LOST, now, out)  # UNBIND
        self._unbind()

    def revoke(self, now: Millis, out: list[Effect]) -> ConnId | None:
        """The run was revoked: end the session; return the connection to close, if any."""
        self._fire(Trigger.REVOKED, now, out)  # END
        self.claim_ticket = None
        return self._unbind()

    def restore(self, record: SessionRecord, now: Millis) -> None:
        """Resume from the store after a gateway restart, with a fresh grace period."""
        self.session_id = record.session_id
        # The store cannot say: a granted fresh attach is stored as its claim left it (ATTACHED),
        # told or not. Taken as told, so a runtime that was told can recover after a restart.
        self.told = True
        self.epoch = record.epoch
        self.attempt_id = record.attempt_id
        self.runtime_instance_id = record.runtime_instance_id
        self.capabilities = record.capabilities
        self.input_acked = record.input_acked_seq
        self.input_last = max(self.input_last, record.input_acked_seq)
        if record.state in (_S.LEASED, _S.ATTACHED, _S.RECOVERING):
            # Runtimes could not heartbeat while we were down: give them a whole lease to return.
            self.state = _S.LEASED
            self.lease_expires_at = Millis(now + self.policy.lease_ttl_ms)
        elif record.state is _S.EXPIRED:
            self.state = _S.EXPIRED
            self.lease_expires_at = record.lease_expires_at
            self.recovery_deadline = Millis(now + self.policy.recovery_window_ms)
        else:
            self.state = _S.DETACHED
