"""The gateway's pure core: every run's session, every connection, every store operation in flight.

`Hub.handle(input)` is the only entry point: the shell feeds it a decoded command or a fact (a
connection lost, a timer fired, the store answered) and carries out the effects it returns, in
order. The hub keeps the protocol's promises that span sessions and connections:

- every command gets exactly one answer, its reply or one error frame (or none if its connection
  is gone, since nothing is ever sent after a close);
- a store write is answered only when the store has made it durable;
- a connection displaced by a higher epoch is closed, and a closed connection is never written to.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from attrs import define, field

from statemachine.effects import (
    AckInputs,
    AppendOutputs,
    ClaimEpoch,
    CloseConnection,
    Effect,
    EpochClaim,
    ReadKV,
    SendError,
    SendReply,
    WriteKV,
)
from statemachine.errors import Refused
from statemachine.inputs import (
    AppendOutcome,
    CommandReceived,
    ConnectionLost,
    ConnectionOpened,
    ConnId,
    DrainStarted,
    EpochClaimed,
    Input,
    InputsPosted,
    InputsRead,
    KVRead,
    OutputsAppended,
    RunRegistered,
    RunRevoked,
    SessionRestored,
    StoreAnswered,
    StoreFailed,
    TimerFired,
    Written,
)
from statemachine.messages import (
    PROTOCOL_VERSIONS,
    AckInputCommand,
    AckInputResponse,
    Capability,
    CloseCode,
    ErrorCode,
    ErrorPayload,
    GetConfigCommand,
    GetConfigResponse,
    GetKVCommand,
    GetKVResponse,
    GetSecretsCommand,
    GetSecretsResponse,
    HeartbeatCommand,
    Millis,
    PublishOutputEventsRequest,
    PublishOutputEventsResponse,
    RecoverConnectionsCommand,
    RecoverConnectionsResponse,
    RuntimeAttachRequest,
    RuntimeAttachResponse,
    SetKVCommand,
    SetKVResponse,
)
from statemachine.policy import Policy
from statemachine.records import RunGrant
from statemachine.session import Claimant, Session
from statemachine.table import Trigger


class Op(enum.Enum):
    """What a store operation in flight was for, so its answer can be routed."""

    ATTACH = "attach"
    RECOVER = "recover"
    READ_KV = "read_kv"
    WRITE_KV = "write_kv"
    APPEND = "append"
    ACK = "ack"
    READ_INPUTS = "read_inputs"


@define(slots=True)
class Pending:
    """A store operation in flight: who asked, and for which runs."""

    op: Op
    conn: ConnId
    request_id: str | None
    run_ids: tuple[str, ...]
    payload: Any = None  # what the answer needs besides the store's word (e.g. the acked seq)


@define(slots=True)
class Connection:
    """What the core knows of one WebSocket: whose token opened it, and which runs it holds."""

    principal: str
    tokens: float
    refilled_at: Millis
    runs: set[str]
    in_flight: int = 0  # commands awaiting the store; drain closes only when this is 0
    closed: bool = False
    # Runs it held until the platform revoked them: commands naming them are forbidden_run.
    revoked: set[str] = field(factory=set)


class Hub:
    """All sessions of this gateway and the rules between them; no I/O, no clock, no randomness."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.grants: dict[str, RunGrant] = {}
        self.sub_runs: dict[str, set[str]] = {}  # main run id -> its live sub-runs
        self.sessions: dict[str, Session] = {}
        self.connections: dict[ConnId, Connection] = {}
        self.pending: dict[int, Pending] = {}
        self.draining = False
        self._last_ticket = 0
        self._on_input: dict[type[Any], Callable[[Any, list[Effect]], None]] = {
            CommandReceived: self._command,
            StoreAnswered: self._store_answered,
            TimerFired: self._timer_fired,
            ConnectionOpened: self._connection_opened,
            ConnectionLost: self._connection_lost,
            InputsPosted: self._inputs_posted,
            RunRegistered: self._run_registered,
            RunRevoked: self._run_revoked,
            SessionRestored: self._session_restored,
            DrainStarted: self._drain_started,
        }
        self._on_command: dict[
            type[Any], Callable[[Connection, CommandReceived, list[Effect]], None]
        ]
        self._on_command = {
            HeartbeatCommand: self._heartbeat,
            RuntimeAttachRequest: self._attach,
            RecoverConnectionsCommand: self._recover,
            GetSecretsCommand: self._get_secrets,
            GetConfigCommand: self._get_config,
            GetKVCommand: self._get_kv,
            SetKVCommand: self._set_kv,
            PublishOutputEventsRequest: self._publish,
            AckInputCommand: self._ack_inputs,
        }

    def handle(self, event: Input) -> list[Effect]:
        """Feed one input; return what the shell must do, in order."""
        out: list[Effect] = []
        self._on_input[type(event)](event, out)
        return out

    def knows_run(self, run_id: str) -> bool:
        """Whether the run's grant is loaded (else the shell loads it before attaching)."""
        return run_id in self.grants

    # --- bookkeeping ----------------------------------------------------------------------------

    def _ticket(self) -> int:
        self._last_ticket += 1
        return self._last_ticket

    def _session(self, run_id: str) -> Session:
        session = self.sessions.get(run_id)
        if session is None:
            session = self.sessions[run_id] = Session(self.grants[run_id], self.policy)
        return session

    def _close(
        self, conn_id: ConnId, code: CloseCode, reason: str, now: Millis, out: list[Effect]
    ) -> None:
        """Close a connection once: unbind its sessions, and never write to it again."""
        conn = self.connections.get(conn_id)
        if conn is None or conn.closed:
            return
        conn.closed = True
        out.append(CloseConnection(conn_id, code, reason))
        for run_id in conn.runs:
            session = self.sessions.get(run_id)
            if session is not None:
                session.connection_lost(conn_id, now, out)

    def _let_go(self, conn_id: ConnId | None, run_id: str) -> None:
        """The run's session no longer holds the connection: stop counting it among its runs."""
        conn = self.connections.get(conn_id) if conn_id is not None else None
        if conn is not None:
            conn.runs.discard(run_id)

    def _check_deadlines(self, session: Session, now: Millis, out: list[Effect]) -> None:
        """Apply the session's passed deadlines; a closed window also ends its connection's hold."""
        self._let_go(session.check_deadlines(now, out), session.run_id)

    def _open(self, conn_id: ConnId) -> Connection | None:
        conn = self.connections.get(conn_id)
        return None if conn is None or conn.closed else conn

    def _await_store(self, conn: Connection, pending: Pending) -> int:
        ticket = self._ticket()
        self.pending[ticket] = pending
        conn.in_flight += 1
        return ticket

    def _pump(self, session: Session, out: list[Effect]) -> None:
        """Start reading inputs for a session whose connection is behind the store."""
        if session.wants_inputs():
            assert session.conn is not None
            ticket = self._ticket()
            self.pending[ticket] = Pending(Op.READ_INPUTS, session.conn, None, (session.run_id,))
            out.append(session.read_inputs(ticket))

    # --- runs and connections -------------------------------------------------------------------

    def lineage(self, run_id: str) -> list[RunGrant]:
        """The run and, for a sub-run, its main run: grants that do not change while it lives."""
        grant = self.grants.get(run_id)
        if grant is None:
            return []
        main = self.grants.get(grant.main_run_id) if grant.main_run_id is not None else None
        return [grant] if main is None else [main, grant]

    def family(self, run_id: str) -> list[RunGrant]:
        """The run's main run and every sub-run of it: what a main run's token may act on."""
        grant = self.grants.get(run_id)
        if grant is None:
            return []
        main = grant.main_run_id or run_id
        members = [main, *sorted(self.sub_runs.get(main, ()))]
        return [self.grants[member] for member in members if member in self.grants]

    def _run_registered(self, event: RunRegistered, out: list[Effect]) -> None:
        self.grants[event.grant.run_id] = event.grant
        if event.grant.main_run_id is not None:
            self.sub_runs.setdefault(event.grant.main_run_id, set()).add(event.grant.run_id)
        session = self.sessions.get(event.grant.run_id)
        if session is not None:
            session.grant = event.grant

    def _run_revoked(self, event: RunRevoked, out: list[Effect]) -> None:
        doomed = {event.run_id} | self.sub_runs.pop(event.run_id, set())
        revoked = self.grants.get(event.run_id)
        if revoked is not None and revoked.main_run_id is not None:
            self.sub_runs.get(revoked.main_run_id, set()).discard(event.run_id)
        for run_id in sorted(doomed):
            session = self.sessions.pop(run_id, None)
            if session is not None:
                # A sub-run rides on its main run's connection: revoking only the sub-run ends
                # its session there, not the link (4002 tells a runtime not to come back).
                # Links of a revoked main run are all closed just below.
                held_by = session.revoke(event.now, out)
                self._let_go(held_by, run_id)
                if (conn := self.connections.get(held_by) if held_by is not None else None):
                    conn.revoked.add(run_id)
            self.grants.pop(run_id, None)
        for conn_id, conn in list(self.connections.items()):
            if conn.principal in doomed:
                self._close(conn_id, CloseCode.REVOKED, "the run was revoked", event.now, out)

    def _session_restored(self, event: SessionRestored, out: list[Effect]) -> None:
        if event.record.run_id in self.grants:
            session = self._session(event.record.run_id)
            session.restore(event.record, event.now)
            self._check_deadlines(session, event.now, out)

    def _connection_opened(self, event: ConnectionOpened, out: list[Effect]) -> None:
        self.connections[event.conn] = Connection(
            event.principal, self.policy.command_burst, event.now, set()
        )

    def _connection_lost(self, event: ConnectionLost, out: list[Effect]) -> None:
        conn = self.connections.pop(event.conn, None)
        if conn is None:
            return
        for run_id in conn.runs:
            session = self.sessions.get(run_id)
            if session is not None:
                session.connection_lost(event.conn, event.now, out)

    def _timer_fired(self, event: TimerFired, out: list[Effect]) -> None:
        session = self.sessions.get(event.run_id)
        if session is not None:
            self._let_go(session.timer_fired(event.now, out), session.run_id)

    def _inputs_posted(self, event: InputsPosted, out: list[Effect]) -> None:
        session = self.sessions.get(event.run_id)
        if session is not None:
            session.input_last = max(session.input_last, event.last_seq)
            self._pump(session, out)

    def _drain_started(self, event: DrainStarted, out: list[Effect]) -> None:
        self.draining = True
        for conn_id, conn in list(self.connections.items()):
            if conn.in_flight == 0:
                self._close_for_drain(conn_id, event.now, out)

    def _close_for_drain(self, conn_id: ConnId, now: Millis, out: list[Effect]) -> None:
        self._close(
            conn_id, CloseCode.SERVICE_RESTART, "the gateway is restarting; reconnect", now, out
        )

    # --- commands -------------------------------------------------------------------------------

    def _command(self, event: CommandReceived, out: list[Effect]) -> None:
        conn = self._open(event.conn)
        if conn is None:
            return  # nothing is sent on a closed connection; the shell is tearing it down
        try:
            self._admit(conn, event.now)
            self._on_command[type(event.command)](conn, event, out)
        except Refused as refused:
            out.append(SendError(event.conn, event.request_id, refused.error))

    def admits(self, conn_id: ConnId, now: Millis) -> bool:
        """Whether a command arriving now on the connection would get past its rate limit.

        The shell asks before work it does ahead of the core (looking up runs in the store): a
        command the core will refuse `rate_limited` must not cost the store anything.
        """
        conn = self._open(conn_id)
        if conn is None:
            return False
        elapsed = max(now - conn.refilled_at, 0)
        return conn.tokens + elapsed * self.policy.command_rate / 1000 >= 1

    def _admit(self, conn: Connection, now: Millis) -> None:
        """Token bucket per connection: a burst is fine, a flood is refused."""
        elapsed = now - conn.refilled_at
        if elapsed > 0:
            conn.tokens = min(
                self.policy.command_burst, conn.tokens + elapsed * self.policy.command_rate / 1000
            )
            conn.refilled_at = now
        if conn.tokens < 1:
            raise Refused.because(ErrorCode.RATE_LIMITED, "too many commands; slow down and retry")
        conn.tokens -= 1

    def _authorized(self, conn: Connection, run_id: str) -> Session:
        """The session of a run this connection's token may act on: its own run or a sub-run."""
        grant = self.grants.get(run_id)
        if grant is None or (run_id != conn.principal and grant.main_run_id != conn.principal):
            raise Refused(_forbidden_run())
        return self._session(run_id)

    def _held(
        self, conn: Connection, event: CommandReceived, run_id: str, out: list[Effect]
    ) -> Session:
        """The session a command addresses, which this connection must have attached."""
        session = self.sessions.get(run_id) if run_id in conn.runs else None
        if session is None:
            grant = self.grants.get(run_id)
            if run_id in conn.revoked or (
                grant is not None and conn.principal not in (run_id, grant.main_run_id)
            ):
                raise Refused(_forbidden_run())  # attaching would not help: not retryable
            raise Refused.because(
                ErrorCode.NOT_ATTACHED, "this connection has not attached that run; attach first"
            )
        # Before the session looks at the command: a lease or window that ran out decides it.
        self._check_deadlines(session, event.now, out)
        return session

    def _attach(self, conn: Connection, event: CommandReceived, out: list[Effect]) -> None:
        command: RuntimeAttachRequest = event.command  # type: ignore[assignment]
        if command.protocol_version not in PROTOCOL_VERSIONS:
            raise Refused.because(
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocolVersion must be one of {sorted(PROTOCOL_VERSIONS)}",
            )
        session = self._authorized(conn, command.run_id)
        self._check_deadlines(session, event.now, out)
        epoch = command.connection_epoch
        if epoch is None:
            epoch = max(session.epoch, 0)
        session.guard_epoch(epoch, event.conn)
        claimant = Claimant(
            fresh_session_id=event.fresh_session_id,
            attempt_id=command.attempt_id,
            runtime_instance_id=command.runtime_instance_id,
            capabilities=frozenset(command.capabilities) & session.grant.capabilities,
        )
        trigger = Trigger.REATTACH if command.reconnect else Trigger.ATTACH
        pending = Pending(
            Op.ATTACH, event.conn, event.request_id, (command.run_id,), command.reply_extensions
        )
        self._claim(conn, event, ((session, trigger),), epoch, claimant, pending, out)

    def _recover(self, conn: Connection, event: CommandReceived, out: list[Effect]) -> None:
        command: RecoverConnectionsCommand = event.command  # type: ignore[assignment]
        main = self._authorized(conn, command.main_run_id)
        sessions = [main]
        for run_id in dict.fromkeys(command.sub_run_ids):
            sub = self._authorized(conn, run_id)
            if sub.grant.main_run_id != command.main_run_id:
                raise Refused.because(
                    ErrorCode.FORBIDDEN_RUN, "a subRunId is not a sub-run of mainRunId"
                )
            if sub is not main:
                sessions.append(sub)
        for session in sessions:
            self._check_deadlines(session, event.now, out)
        if main.session_id != command.session_id or main.session_id == "":
            raise Refused.because(
                ErrorCode.SESSION_MISMATCH, "sessionId is not mainRunId's session"
            )
        if not all(session.resumable() and session.told for session in sessions):
            # Nothing to resume: the attempt was lost, a sub-run never attached, or its only
            # session is a fresh attach not granted, or granted with no link left to tell its
            # sessionId on.
            # Not an error: the protocol's answer is "no", and the runtime attaches afresh.
            out.append(SendReply(event.conn, event.request_id, RecoverConnectionsResponse(False)))
            return
        epoch = command.connection_epoch
        if epoch is None:
            epoch = max(session.epoch for session in sessions)
        for session in sessions:  # all or nothing: check every session before touching any
            session.guard_epoch(epoch, event.conn)
        claimant = Claimant("", None, None, None)
        pending = Pending(
            Op.RECOVER, event.conn, event.request_id, tuple(session.run_id for session in sessions)
        )
        pairs = tuple((session, Trigger.REATTACH) for session in sessions)
        self._claim(conn, event, pairs, epoch, claimant, pending, out)

    def _claim(
        self,
        conn: Connection,
        event: CommandReceived,
        sessions: tuple[tuple[Session, Trigger], ...],
        epoch: int,
        claimant: Claimant,
        pending: Pending,
        out: list[Effect],
    ) -> None:
        """Move sessions to this connection at `epoch` and ask the store to fence everyone else."""
        ticket = self._await_store(conn, pending)
        displaced: list[ConnId] = []
        for session, trigger in sessions:
            old = session.claim(trigger, event.conn, epoch, claimant, ticket, event.now, out)
            if old is not None:
                displaced.append(old)
            conn.runs.add(session.run_id)
        for old in displaced:
            self._close(
                old,
                CloseCode.SUPERSEDED,
                "a connection with a higher epoch took the run",
                event.now,
                out,
            )
        out.append(ClaimEpoch(ticket, tuple(EpochClaim(s.record()) for s, _ in sessions)))

    def _heartbeat(self, conn: Connection, event: CommandReceived, out: list[Effect]) -> None:
        command: HeartbeatCommand = event.command  # type: ignore[assignment]
        session = self._held(conn, event, command.run_id, out)
        session.heartbeat(event.conn, event.request_id, command, event.now, out)
        # A failed input read is retried at the heartbeat's pace, not left until the next post.
        self._pump(session, out)

    def _use(
        self,
        conn: Connection,
        event: CommandReceived,
        run_id: str,
        session_id: str,
        needs: Capability | None,
        out: list[Effect],
    ) -> Session:
        session = self._held(conn, event, run_id, out)
        session.use(event.conn, session_id, needs, event.now, out)
        return session

    def _get_secrets(self, conn: Connection, event: CommandReceived, out: list[Effect]) -> None:
        command: GetSecretsCommand = event.command  # type: ignore[assignment]
        session = self._use(
            conn, event, command.run_id, command.session_id, Capability.SECRETS_READ, out
        )
        granted = session.grant.secrets
        names = granted.keys() if command.names is None else command.names
        secrets = {name: granted[name] for name in names if name in granted}
        out.append(SendReply(event.conn, event.request_id, GetSecretsResponse(secrets)))

    def _get_config(self, conn: Connection, event: CommandReceived, out: list[Effect]) -> None:
        command: GetConfigCommand = event.command  # type: ignore[assignment]
        session = self._use(conn, event, command.run_id, command.session_id, None, out)
        out.append(SendReply(event.conn, event.request_id, GetConfigResponse(session.grant.config)))

    def _get_kv(self, conn: Connection, event: CommandReceived, out: list[Effect]) -> None:
        command: GetKVCommand = event.command  # type: ignore[assignment]
        session = self._use(
            conn, event, command.run_id, command.session_id, Capability.KV_READ, out
        )
        ticket = self._await_store(
            conn, Pending(Op.READ_KV, event.conn, event.request_id, (session.run_id,))
        )
        out.append(ReadKV(ticket, session.run_id, command.keys))

    def _set_kv(self, conn: Connection, event: CommandReceived, out: list[Effect]) -> None:
        command: SetKVCommand = event.command  # type: ignore[assignment]
        session = self._use(
            conn, event, command.run_id, command.session_id, Capability.KV_WRITE, out
        )
        ticket = self._await_store(
            conn, Pending(Op.WRITE_KV, event.conn, event.request_id, (session.run_id,))
        )
        out.append(WriteKV(ticket, session.run_id, session.epoch, command.kv))

    def _publish(self, conn: Connection, event: CommandReceived, out: list[Effect]) -> None:
        command: PublishOutputEventsRequest = event.command  # type: ignore[assignment]
        session = self._use(conn, event, command.run_id, command.session_id, None, out)
        if not command.events:
            out.append(SendReply(event.conn, event.request_id, PublishOutputEventsResponse(True)))
            return
        ticket = self._await_store(
            conn, Pending(Op.APPEND, event.conn, event.request_id, (session.run_id,))
        )
        out.append(AppendOutputs(ticket, session.run_id, session.epoch, command.events))

    def _ack_inputs(self, conn: Connection, event: CommandReceived, out: list[Effect]) -> None:
        command: AckInputCommand = event.command  # type: ignore[assignment]
        session = self._use(conn, event, command.run_id, command.session_id, None, out)
        if command.seq <= session.input_acked:
            out.append(SendReply(event.conn, event.request_id, AckInputResponse(True)))
            return
        if command.seq > max(session.input_sent, session.input_resumed):
            raise Refused.because(
                ErrorCode.SEQ_GAP,
                f"seq {command.seq} was not delivered yet; last delivered:"
                f" {max(session.input_sent, session.input_resumed)}",
            )
        ticket = self._await_store(
            conn, Pending(Op.ACK, event.conn, event.request_id, (session.run_id,), command.seq)
        )
        out.append(AckInputs(ticket, session.run_id, session.epoch, command.seq))

    # --- the store's answers --------------------------------------------------------------------

    def _store_answered(self, event: StoreAnswered, out: list[Effect]) -> None:
        pending = self.pending.pop(event.ticket, None)
        if pending is None:
            return
        answer = event.answer
        if pending.op is Op.READ_INPUTS:
            self._inputs_answered(pending, event, out)
            return
        conn = self.connections.get(pending.conn)
        if conn is not None:
            conn.in_flight -= 1
        if pending.op in (Op.ATTACH, Op.RECOVER):
            reply: Any = self._claim_answered(pending, event, out)
        elif isinstance(answer, StoreFailed):
            reply = ErrorPayload.of(ErrorCode.INTERNAL, "the store failed; retry")
        elif isinstance(answer, KVRead):
            reply = GetKVResponse(answer.kv)
        elif _revoked(answer) or (pending.run_ids[0] not in self.sessions and _fenced(answer)):
            # The run was revoked while the write waited on the store, which refused it: the
            # answer the command gets had the revoke come first (not stale_epoch, which tells a
            # runtime another instance took the run). The store says so itself, as the core may
            # hear of the revoke only after this answer; else, revocation alone removes a session.
            reply = _forbidden_run()
        elif isinstance(answer, OutputsAppended):
            reply = self._append_reply(answer)
        elif isinstance(answer, Written) and answer.fenced:
            reply = ErrorPayload.of(ErrorCode.STALE_EPOCH, "a higher epoch holds this run now")
        elif pending.op is Op.ACK:
            session = self.sessions.get(pending.run_ids[0])
            if session is not None:
                session.input_acked = max(session.input_acked, pending.payload)
                # What is acknowledged is never sent again (acks may run ahead after a resume).
                session.input_sent = max(session.input_sent, session.input_acked)
            reply = AckInputResponse(True)
        else:
            reply = SetKVResponse(True)
        if conn is not None and not conn.closed:
            if isinstance(reply, ErrorPayload):
                out.append(SendError(pending.conn, pending.request_id, reply))
            else:
                assert pending.request_id is not None
                out.append(SendReply(pending.conn, pending.request_id, reply))
                if isinstance(reply, RuntimeAttachResponse) and (
                    told := self.sessions.get(pending.run_ids[0])
                ):
                    told.told = True  # from now on, a recover may resume it
            if self.draining and conn.in_flight == 0:
                self._close_for_drain(pending.conn, event.now, out)
        if pending.op in (Op.ATTACH, Op.RECOVER):
            # After the reply, so a runtime learns its sessionId before its first delivery.
            for run_id in pending.run_ids:
                session = self.sessions.get(run_id)
                if session is not None:
                    self._pump(session, out)

    @staticmethod
    def _append_reply(answer: OutputsAppended) -> Any:
        if answer.outcome is AppendOutcome.STORED:
            return PublishOutputEventsResponse(True)
        if answer.outcome is AppendOutcome.FENCED:
            return ErrorPayload.of(ErrorCode.STALE_EPOCH, "a higher epoch holds this run now")
        if answer.outcome is AppendOutcome.SEQ_CONFLICT:
            return ErrorPayload.of(
                ErrorCode.SEQ_CONFLICT,
                "a seq in the batch is stored with another eventId; the log's next seq is "
                f"{answer.expected_seq} (an attach with replyExtensions says it: nextOutputSeq)",
            )
        return ErrorPayload.of(
            ErrorCode.SEQ_GAP,
            f"the batch does not continue the log; next seq is {answer.expected_seq}",
        )

    def _claim_answered(self, pending: Pending, event: StoreAnswered, out: list[Effect]) -> Any:
        answer = event.answer
        sessions = [self.sessions.get(run_id) for run_id in pending.run_ids]
        # All or nothing: if a later claim took one of the runs, none of them is granted here.
        whole = all(s is not None and s.claim_ticket == event.ticket for s in sessions)
        claim = answer if isinstance(answer, EpochClaimed) and whole else None
        granted = [s.claim_answered(event.ticket, claim, event.now, out) for s in sessions if s]
        for session in sessions:
            if session is not None and session.conn != pending.conn:
                self._let_go(pending.conn, session.run_id)  # given up, or taken by a later claim
        if any(session is None for session in sessions):
            # The platform revoked a run while the claim was in flight (revocation is the only
            # thing that removes a session). Answer what the command gets had the revocation come
            # first; the other runs' failed claims RELEASE them, so a recover without it can
            # succeed. Not stale_epoch: no higher epoch holds anything here.
            return _forbidden_run()
        if isinstance(answer, StoreFailed):
            return ErrorPayload.of(ErrorCode.INTERNAL, "the store failed; retry")
        if not whole:
            return ErrorPayload.of(ErrorCode.STALE_EPOCH, "a later attach took one of the runs")
        if not all(granted):
            return ErrorPayload.of(ErrorCode.STALE_EPOCH, "a higher epoch took this run")
        if pending.op is Op.RECOVER:
            return RecoverConnectionsResponse(True)
        return self.sessions[pending.run_ids[0]].attach_response(extended=pending.payload)

    def _inputs_answered(self, pending: Pending, event: StoreAnswered, out: list[Effect]) -> None:
        session = self.sessions.get(pending.run_ids[0])
        if session is None:
            return
        if isinstance(event.answer, InputsRead):
            session.inputs_read(event.ticket, pending.conn, event.answer.events, out)
            self._pump(session, out)
        else:
            # No retry loop against a failing store: the next post or re-attach pumps again.
            session.input_read_failed(event.ticket)


def _fenced(answer: Any) -> bool:
    """Whether the store refused a write for its epoch (or because the run is revoked)."""
    if isinstance(answer, OutputsAppended):
        return answer.outcome in (AppendOutcome.FENCED, AppendOutcome.REVOKED)
    return isinstance(answer, Written) and answer.fenced


def _revoked(answer: Any) -> bool:
    """Whether the store refused a write because its run is revoked."""
    if isinstance(answer, OutputsAppended):
        return answer.outcome is AppendOutcome.REVOKED
    return isinstance(answer, Written) and answer.revoked


def _forbidden_run() -> ErrorPayload:
    """What a command naming a run its token may not act on (or a revoked run) is told."""
    return ErrorPayload.of(ErrorCode.FORBIDDEN_RUN, "this token may not act on that run")
