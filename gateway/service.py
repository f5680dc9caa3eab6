"""The trio shell around the pure core: it feeds `Hub` and carries out the effects it returns.

One frame's whole path: `server.py` reads it, `codec.py` decodes it, `Hub.handle` decides, and
`Gateway.execute` (here) sends, arms timers and talks to the store. Store effects are awaited in
the task that produced them; their answers go back into the hub, whose further effects join the
same queue, so one command's work stays in one task, in order.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, cast

import trio
from attrs import evolve, frozen
from trio_websocket import ConnectionClosed

from gateway.clock import Clock
from gateway.codec import DecodeError, decode, encode
from gateway.config import Settings
from gateway.links import Link, watch_sends
from gateway.masking import mask_events
from gateway.metrics import Metrics
from gateway.store.base import NewInput, Store, StoreError
from gateway.timers import Timers
from statemachine.effects import (
    AckInputs,
    AppendOutputs,
    ArmTimer,
    AttemptLost,
    ClaimEpoch,
    CloseConnection,
    DeliverInputs,
    Effect,
    ReadInputs,
    ReadKV,
    SaveSession,
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
    DrainStarted,
    Input,
    InputsPosted,
    InputsRead,
    KVRead,
    RunRegistered,
    RunRevoked,
    SessionRestored,
    StoreAnswer,
    StoreAnswered,
    StoreFailed,
    TimerFired,
)
from statemachine.messages import (
    REPLY_CHANNELS,
    Capability,
    Channel,
    CloseCode,
    ErrorCode,
    ErrorPayload,
    Millis,
    OutputEvent,
    RecoverConnectionsCommand,
    RuntimeAttachRequest,
    TaskInputDelivery,
    delivery_id,
)
from statemachine.records import RunGrant, SessionState

log = logging.getLogger("agent_gateway")

STORE_ANSWER_WAIT_S: Final = 30.0
"""How long one store operation may take before the core is told that it failed."""


def _new_token() -> str:
    return "agt_" + secrets.token_urlsafe(32)


def utf8_size(text: str) -> int:
    """A frame's size on the wire, where limits count bytes (len() undercounts non-ASCII 2-4x)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def token_digest(token: str) -> bytes:
    """Runtime tokens are kept only as digests: a stolen database grants no access."""
    return hashlib.sha256(token.encode("utf-8")).digest()


@frozen
class SessionView:
    """What the platform may see of a session (never secrets)."""

    run_id: str
    state: SessionState
    session_id: str | None
    connection_epoch: int | None
    lease_expires_at: Millis | None
    capabilities: tuple[str, ...]
    connected: bool


class Gateway:
    """The running gateway: core, store, connections, timers and metrics, wired together."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock or Clock()
        self.metrics = metrics or Metrics()
        self.metrics.sessions.states = lambda: (s.state for s in self.hub.sessions.values())
        self.hub = Hub(settings.policy())
        self.timers = Timers(self.clock)
        self.links: dict[int, Link] = {}
        self.draining = False
        self.observers: list[Callable[[SessionChanged], None]] = []
        self._last_conn = 0
        self._outputs_changed: dict[str, trio.Event] = {}
        self._output_polls: Counter[str] = Counter()  # long polls in progress, by run
        self._no_links = trio.Event()
        self._no_links.set()
        self.drained = trio.Event()  # the drain is over: the control API may stop
        self.control_stopped = trio.Event()  # it has, with the requests in flight answered
        # Frames this long or shorter are within `max_frame_bytes` whatever their characters.
        self._short_frame = settings.max_frame_bytes // 4
        self._hard_frame = settings.hard_frame_bytes

    # --- life cycle -----------------------------------------------------------------------------

    async def load(self) -> None:
        """Warm the core from the store: runs, then the sessions alive before a restart."""
        for grant in await self.store.list_runs():
            self.hub.handle(RunRegistered(grant))
        for record in await self.store.list_sessions():
            await self.feed(SessionRestored(record, self.clock.now()))

    async def run_timers(self) -> None:
        """Keep every deadline: session leases for the core, stalled sends (until cancelled)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_sends, self.links, self.settings.send_timeout_s)
            await self.timers.run(self._timer_fired)

    async def _timer_fired(self, run_id: str) -> None:
        await self.feed(TimerFired(run_id, self.clock.now()))

    async def drain(self) -> None:
        """Stop taking work, answer what is in flight, and tell runtimes to come back elsewhere."""
        self.draining = True
        await self.feed(DrainStarted(self.clock.now()))
        with trio.move_on_after(self.settings.drain_timeout_s):
            await self._no_links.wait()
        for link in list(self.links.values()):
            link.abort(CloseCode.SERVICE_RESTART, "the gateway is restarting; reconnect")
        self.drained.set()
        for changed in self._outputs_changed.values():
            changed.set()  # long polls answer now, while the control API still serves them

    # --- the core loop --------------------------------------------------------------------------

    async def feed(self, event: Input, origin: int | None = None) -> None:
        """Give the core one input and carry out everything that follows from it."""
        await self.execute(self.hub.handle(event), origin)

    async def execute(self, effects: Iterable[Effect], origin: int | None = None) -> None:
        """Carry out effects in order; `origin` is the connection whose own task this is.

        The connection's task may be cancelled midway (its connection closed: 4001, 4002, 4003,
        1012). What the core decided must still happen: store operations finish and their
        answers reach the core (shielded, in `_answer`), and the effects left over are carried
        out with the connection's own frames dropped (it is closing; what they carried is
        durable, or answers a command the runtime retries).
        """
        queue: deque[Effect | _Queued] = deque(self._queue_deliveries(effects, origin))
        try:
            while queue:
                effect = queue.popleft()
                kind = type(effect)
                if kind is SendReply:  # the hot path: one per command
                    reply = cast(SendReply, effect)
                    channel = REPLY_CHANNELS[type(reply.payload)]
                    frame = encode(channel, reply.request_id, reply.payload)
                    # A UTF-8 character is at most 4 bytes: only a long frame needs counting.
                    if len(frame) > self._short_frame and (
                        error := self._oversized(frame, reply.request_id)
                    ):
                        channel, frame = Channel.ERROR, error
                    if (link := self._direct(reply.conn, frame, origin)) is not None:
                        await link.send(frame)
                    self.metrics.frames.sent[channel] += 1
                elif kind in _STORE_EFFECTS:
                    ticket = cast(StoreEffect, effect).ticket
                    answer = await self._answer(cast(StoreEffect, effect))
                    answered = self.hub.handle(StoreAnswered(ticket, answer, self.clock.now()))
                    for item in self._queue_deliveries(answered, origin):
                        if type(item) is _Queued:
                            # Waited for before the effects already queued (a recover's reads
                            # of its other runs): the link's queue is bounded, and a runtime
                            # that reads, only not at store speed, must not be closed 4003.
                            queue.appendleft(item)
                        else:
                            queue.append(item)
                elif kind is _Queued:
                    queued = cast(_Queued, effect)
                    await queued.link.written(queued.upto)
                else:
                    await self._other(cast(Effect, effect), origin)
        except trio.Cancelled:
            left = [e for e in queue if not (
                isinstance(e, (SendReply, SendError, _Queued)) and e.conn == origin)]
            with trio.CancelScope(shield=True):
                await self.execute(cast(list[Effect], left))  # no origin: frames are only queued
            raise

    async def _answer(self, effect: Effect) -> StoreAnswer:
        """The store's answer to one effect, which the core hears even if this task is cancelled.

        Bounded: after `STORE_ANSWER_WAIT_S` the core is told the store failed (the operation
        may still complete; "internal" means nothing is guaranteed either way).
        """
        with trio.CancelScope(shield=True, deadline=trio.current_time() + STORE_ANSWER_WAIT_S):
            return await self._store(effect)
        log.error("store did not answer %s within %g s", type(effect).__name__,
                  STORE_ANSWER_WAIT_S)
        return StoreFailed("StoreTimeout")

    async def _other(self, effect: Effect, origin: int | None) -> None:
        if isinstance(effect, SendError):
            await self._send(
                effect.conn, encode(Channel.ERROR, effect.request_id, effect.error), origin
            )
            self.metrics.error[effect.error.code].inc()
        elif isinstance(effect, ArmTimer):
            self.timers.arm(effect.run_id, effect.deadline)
        elif isinstance(effect, CloseConnection):
            link = self.links.get(effect.conn)
            if link is not None:
                link.close(effect.code, effect.reason)
        elif isinstance(effect, SessionChanged):
            self._session_changed(effect)
        elif isinstance(effect, AttemptLost):
            self.metrics.attempts_lost.inc()
            log.warning("attempt lost: run %s attempt %s", effect.run_id, effect.attempt_id)
        elif isinstance(effect, SaveSession):
            # Shielded like `_answer`: a connection closing must not lose the session's state.
            deadline = trio.current_time() + STORE_ANSWER_WAIT_S
            with self.metrics.store_op["save"].time(), trio.CancelScope(
                shield=True, deadline=deadline
            ) as saving:
                try:
                    await self.store.save_session(effect.record)
                except StoreError as failure:
                    # The next change saves the whole state again; the reason, not a traceback.
                    log.error("could not save session state of run %s: %s",
                              effect.record.run_id, failure)
            if saving.cancelled_caught:
                log.error("could not save session state of run %s: the store did not answer "
                          "within %g s", effect.record.run_id, STORE_ANSWER_WAIT_S)
        else:  # pragma: no cover - every effect type is handled above
            raise TypeError(f"unhandled effect {type(effect).__name__}")

    def _queue_deliveries(self, effects: Iterable[Effect], origin: int | None) -> list[Any]:
        """The effects, with each input delivery put in its link's queue now, as decided.

        Called as soon as the core decides, before anything is awaited: deliveries then reach
        the runtime in the order the core made them, whichever task made them. Carried out in
        turn, one waiting in this task behind an awaited store read would be overtaken by a later
        one another task (the platform posting) sent at once, and the runtime, which drops a seq
        below the highest it saw, would never handle it. The connection's own task still waits
        for each of its deliveries to be sent (`_Queued`) before it goes on, as it did for a
        direct send.
        """
        out: list[Any] = []
        for effect in effects:
            if type(effect) is not DeliverInputs:
                out.append(effect)
                continue
            frames = self._delivery_frames(effect.delivery_id, effect.delivery)
            self.metrics.frames.sent[Channel.INPUT] += len(frames)
            if (link := self.links.get(effect.conn)) is None:
                continue
            link.enqueue(*frames, own=effect.conn == origin)  # whole: see `Link.enqueue`
            if effect.conn == origin:
                out.append(_Queued(effect.conn, link, link.queued))
        return out

    def _oversized(self, frame: str, request_id: str) -> str | None:
        """The error frame to send instead of a reply over `maxFrameBytes`, or None if it fits.

        Only reads can get that big (a `kv.get` of many large values): the runtime is told to
        ask for less, instead of getting a frame its transport would refuse (1009).
        """
        size = utf8_size(frame)
        if size <= self.settings.max_frame_bytes:
            return None
        self.metrics.error[ErrorCode.PAYLOAD_TOO_LARGE].inc()
        error = ErrorPayload.of(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"the reply would be {size} bytes, over maxFrameBytes"
            f" ({self.settings.max_frame_bytes}); ask for less at a time",
        )
        return encode(Channel.ERROR, request_id, error)

    def _delivery_frames(self, frame_id: str, delivery: TaskInputDelivery) -> list[str]:
        """Encode a delivery, split into frames no bigger (in UTF-8 bytes) than the frame limit.

        The core batches by count; only here are bytes known. The control API refuses an input
        that could not fit a frame alone, so halving always ends.
        """
        frame = encode(Channel.INPUT, frame_id, delivery)
        if utf8_size(frame) <= self.settings.max_frame_bytes or len(delivery.events) == 1:
            return [frame]
        half = len(delivery.events) // 2
        frames = []
        for part in (delivery.events[:half], delivery.events[half:]):
            part_id = delivery_id(delivery.run_id, part[0].seq)
            frames += self._delivery_frames(part_id, evolve(delivery, events=part))
        return frames

    async def _send(self, conn: int, frame: str, origin: int | None) -> None:
        if (link := self._direct(conn, frame, origin)) is not None:
            await link.send(frame)

    def _direct(self, conn: int, frame: str, origin: int | None) -> Link | None:
        """The link to send `frame` on from this task; None if it was queued or has no link.

        Only the connection's own task sends directly (its replies; its input deliveries are
        queued as decided, see `_queue_deliveries`); other tasks queue. Not a coroutine, so the
        reply path awaits one coroutine less.
        """
        link = self.links.get(conn)
        if link is None or conn == origin:
            return link
        link.enqueue(frame)
        return None

    def _session_changed(self, change: SessionChanged) -> None:
        if change.new is SessionState.EXPIRED:
            self.metrics.lease_expiries.inc()
        log.info(
            "session %s of run %s: %s -> %s",
            change.session_id,
            change.run_id,
            change.old.value,
            change.new.value,
        )
        for observer in self.observers:
            observer(change)

    async def _store(self, effect: Any) -> StoreAnswer:
        """Run one store effect; a store failure becomes an answer, never an escaped exception."""
        try:
            if isinstance(effect, ClaimEpoch):
                with self.metrics.store_op["claim"].time():
                    return await self.store.claim_epoch([claim.record for claim in effect.claims])
            if isinstance(effect, AppendOutputs):
                return await self._append(effect)
            if isinstance(effect, ReadKV):
                with self.metrics.store_op["read_kv"].time():
                    return KVRead(await self.store.kv_get(effect.run_id, effect.keys))
            if isinstance(effect, WriteKV):
                with self.metrics.store_op["write_kv"].time():
                    return await self.store.kv_set(effect.run_id, effect.epoch, effect.kv)
            if isinstance(effect, ReadInputs):
                with self.metrics.store_op["read_inputs"].time():
                    events = await self.store.read_inputs(
                        effect.run_id, effect.after_seq, effect.limit
                    )
                return InputsRead(events)
            if isinstance(effect, AckInputs):
                with self.metrics.store_op["ack"].time():
                    return await self.store.ack_inputs(effect.run_id, effect.epoch, effect.seq)
        except StoreError as failure:
            # The store's own words (SQLite's reason, never a value) tell an operator what to fix.
            log.error("store failed on %s: %s", type(effect).__name__, failure)
            return StoreFailed(type(failure).__name__)
        raise TypeError(f"not a store effect: {type(effect).__name__}")

    async def _append(self, effect: AppendOutputs) -> StoreAnswer:
        events: Sequence[OutputEvent] = effect.events
        if self.settings.mask_secrets:
            # A main run's token reads the secrets of its whole family (the main run and every
            # sub-run) and may publish into any of their logs: all of them are masked in `type`
            # and `data`. A re-publish is matched by its eventId, so eventIds are masked only
            # with the secrets that stay fixed while the run lives (its own and its main run's;
            # sub-runs come and go): a retry after a lost reply then still matches what was stored.
            family = self.hub.family(effect.run_id)
            known = [value for grant in family for value in grant.secrets.values()]
            if known:
                fixed = [value for grant in self.hub.lineage(effect.run_id)
                         for value in grant.secrets.values()]
                events = mask_events(events, known, fixed)
        with self.metrics.store_op["append"].time():
            answer = await self.store.append_outputs(effect.run_id, effect.epoch, events)
        if answer.outcome is AppendOutcome.STORED:
            waiting = self._outputs_changed.pop(effect.run_id, None)
            if waiting is not None:
                waiting.set()
        return answer

    # --- runtime connections --------------------------------------------------------------------

    async def authenticate(self, token: str) -> str | None:
        """The run a runtime token belongs to, or None (the caller refuses the handshake)."""
        if not token or len(token) > 256:
            return None
        return await self.store.run_for_token(token_digest(token))

    async def serve_connection(self, ws: Any, principal: str) -> None:
        """Run one accepted runtime connection until it closes; nothing of it outlives this call."""
        self._last_conn += 1
        conn_id = self._last_conn
        self.metrics.connections.inc()
        if not self.links:
            self._no_links = trio.Event()  # drain waits on this until the last link is gone
        try:
            async with trio.open_nursery() as nursery:
                link = Link(
                    conn_id,
                    ws,
                    self.settings.outbound_queue,
                    nursery,
                    self.settings.send_timeout_s,
                    self.clock.trio_now,
                )
                self.links[conn_id] = link
                await self.feed(ConnectionOpened(conn_id, principal, self.clock.now()), conn_id)
                # The read loop is written out here, not in a helper: every idle session holds
                # its suspended frames, and every send and receive passes through them.
                try:
                    while not link.closing:
                        await self.on_message(link, await ws.get_message())
                except ConnectionClosed:
                    pass
                except Exception:
                    # A bug in handling this connection: tell its runtime to reconnect (1011),
                    # not that it was closed on purpose; the endpoint logs the traceback.
                    if link.close_code is None:
                        link.close_code = CloseCode.INTERNAL_ERROR
                        link.close_reason = "the gateway failed; reconnect"
                    raise
                if not link.closing:
                    nursery.cancel_scope.cancel()
                # Else a close was decided: the writer sends what is queued (it may be midway
                # through a frame, which a cancel would tear, breaking the TLS stream so that the
                # close frame saying why never goes out), then ends the connection itself;
                # `watch_sends` bounds how long a peer that stopped reading can hold it.
        finally:
            self.links.pop(conn_id, None)
            self.metrics.connections.dec()
            with trio.CancelScope(shield=True):
                await self.feed(ConnectionLost(conn_id, self.clock.now()))
                await link.finish()
            if link.close_code is not None:
                # Counted here, once per connection, so closes decided outside the core (a slow
                # consumer's 4003, a drain timeout's 1012) are counted like the core's own.
                self.metrics.closes.labels(str(int(link.close_code))).inc()
            if not self.links:
                self._no_links.set()

    async def on_message(self, link: Link, message: str | bytes) -> None:
        """Decode one frame and feed it to the core; a bad frame gets its error and nothing else."""
        if isinstance(message, bytes):
            error = ErrorPayload.of(
                ErrorCode.INVALID_FRAME,
                "binary frames are not part of the protocol: send one JSON object per text message",
            )
            await self._refuse(link, None, error)
            return
        if len(message) > self._short_frame and utf8_size(message) > self._hard_frame:
            # The transport's own limit counts characters; the documented one counts bytes.
            link.abort(CloseCode.MESSAGE_TOO_BIG, "the frame is over the hard size limit")
            return
        decoded = decode(message, self.settings.max_frame_bytes)
        if isinstance(decoded, DecodeError):
            await self._refuse(link, decoded.request_id, decoded.error)
            return
        self.metrics.frames.received[decoded.channel] += 1
        command = decoded.command
        fresh = ""
        try:
            # Runs are looked up only for a command the core will not refuse for the connection's
            # rate: a flood of attaches naming made-up runs must not become a flood of reads.
            if isinstance(command, RuntimeAttachRequest):
                fresh = "ses_" + secrets.token_hex(16)
                if self.hub.admits(link.conn_id, self.clock.now()):
                    await self._know_runs((command.run_id,))
            elif isinstance(command, RecoverConnectionsCommand) and self.hub.admits(
                link.conn_id, self.clock.now()
            ):
                await self._know_runs((command.main_run_id, *command.sub_run_ids))
        except StoreError as failure:
            # Not `unknown_run`: the run may well exist, the store could not say. Retryable.
            log.error("store failed looking up a run: %s", failure)
            error = ErrorPayload.of(ErrorCode.INTERNAL, "the store failed; retry")
            await self._refuse(link, decoded.request_id, error)
            return
        event = CommandReceived(link.conn_id, decoded.request_id, command, self.clock.now(), fresh)
        await self.execute(self.hub.handle(event), link.conn_id)  # `feed`, one coroutine less

    async def _refuse(self, link: Link, request_id: str | None, error: ErrorPayload) -> None:
        self.metrics.error[error.code].inc()
        await link.send(encode(Channel.ERROR, request_id, error))

    async def _know_runs(self, run_ids: Iterable[str]) -> None:
        """Load grants the core lacks (a run created through another gateway of the fleet).

        A store failure is raised, never taken for "no such run": callers answer it retryably.
        The first run the store does not have ends the lookups: a command naming it is refused
        whole (`forbidden_run`), and a recover may name 256 runs.
        """
        for run_id in dict.fromkeys(run_ids):
            if not self.hub.knows_run(run_id):
                grant = await self.store.get_run(run_id)
                if grant is None:
                    return
                main = grant.main_run_id
                if main is not None and not self.hub.knows_run(main):
                    # Its main run first: the sub-run's outputs are masked with its secrets too.
                    if (main_grant := await self.store.get_run(main)) is None:
                        return  # revoked meanwhile, and the sub-run with it
                    self.hub.handle(RunRegistered(main_grant))
                self.hub.handle(RunRegistered(grant))

    # --- the platform's side (used by the control API) ------------------------------------------

    async def create_run(
        self,
        *,
        run_id: str | None = None,
        capabilities: Iterable[Capability] = (),
        secrets_: dict[str, str] | None = None,
        config: dict[str, Any] | None = None,
        config_version: str | None = None,
        main_run_id: str | None = None,
    ) -> tuple[RunGrant, str]:
        """Register a run (or a sub-run) and mint its runtime token, shown only this once."""
        config = config or {}
        grant = RunGrant(
            run_id=run_id or "run_" + secrets.token_hex(13),
            capabilities=frozenset(capabilities),
            secrets=dict(secrets_ or {}),
            config=config,
            config_version=config_version
            or "cfg_" + hashlib.sha256(repr(sorted(config.items())).encode()).hexdigest()[:16],
            main_run_id=main_run_id,
        )
        token = _new_token()
        await self.store.create_run(grant, token_digest(token))
        # A revoke of the main run that committed after this create (revoking the sub-run with
        # it) may have reached the core while we waited: the core must not learn the sub-run.
        if main_run_id is None or self.hub.knows_run(main_run_id):
            self.hub.handle(RunRegistered(grant))
        return grant, token

    async def replace_token(self, run_id: str) -> str | None:
        """Mint a new runtime token for a live run (the old one stops working); None if none.

        For a token the platform lost (a create whose answer never came) or one that leaked.
        Connections admitted with the old token keep their sessions; revoke the run to end them.
        """
        token = _new_token()
        return token if await self.store.replace_token(run_id, token_digest(token)) else None

    async def revoke_run(self, run_id: str) -> bool:
        """Revoke a run's token (and its sub-runs'), and close whatever connection holds them."""
        revoked = await self.store.revoke_run(run_id)
        if revoked:
            await self.feed(RunRevoked(run_id, self.clock.now()))
        return revoked

    async def post_inputs(self, run_id: str, events: Sequence[NewInput]) -> list[int]:
        """Queue input events durably, then push them to the run's runtime if it is connected."""
        seqs = await self.store.post_inputs(run_id, events)
        if seqs:  # a retried post may only name seqs queued before: max, not the last
            await self.feed(InputsPosted(run_id, max(seqs), self.clock.now()))
        return seqs

    async def wait_outputs(
        self, run_id: str, after: int, limit: int, wait_s: float
    ) -> list[OutputEvent]:
        """Output events after `after`, waiting up to `wait_s` for the first one to arrive."""
        deadline = trio.current_time() + wait_s
        self._output_polls[run_id] += 1
        try:
            while True:
                # Watched before the read: an append that commits while the read is on its way
                # back sets this event, and the next turn reads again instead of sleeping on.
                changed = self._outputs_changed.setdefault(run_id, trio.Event())
                events = await self.store.read_outputs(run_id, after, limit)
                # Not on `draining`: a platform polling in a loop would spin through the drain.
                if events or self.drained.is_set() or trio.current_time() >= deadline:
                    return events
                with trio.move_on_at(deadline):
                    await changed.wait()
        finally:
            self._output_polls[run_id] -= 1
            if not self._output_polls[run_id]:  # the last poll of the run forgets its event
                del self._output_polls[run_id]
                self._outputs_changed.pop(run_id, None)

    async def session_view(self, run_id: str) -> SessionView | None:
        """The session as the platform may see it: live from the core, else as last stored."""
        session = self.hub.sessions.get(run_id)
        if session is not None:
            return SessionView(
                run_id=run_id,
                state=session.state,
                session_id=session.session_id or None,
                connection_epoch=session.epoch if session.epoch >= 0 else None,
                lease_expires_at=session.lease_expires_at if session.session_id else None,
                capabilities=tuple(sorted(c.value for c in session.capabilities)),
                connected=session.conn is not None,
            )
        await self._know_runs((run_id,))
        if not self.hub.knows_run(run_id):
            return None
        record = await self.store.get_session(run_id)
        if record is None:
            return SessionView(run_id, SessionState.DETACHED, None, None, None, (), False)
        return SessionView(
            run_id=run_id,
            state=record.state,
            session_id=record.session_id,
            connection_epoch=record.epoch,
            lease_expires_at=record.lease_expires_at,
            capabilities=tuple(sorted(c.value for c in record.capabilities)),
            connected=False,
        )


@frozen
class _Queued:
    """Where the connection's own task waits for an input delivery it queued to be sent."""

    conn: int
    link: Link
    upto: int  # the writer has sent it once it has sent this many frames


_STORE_EFFECTS = frozenset({ClaimEpoch, AppendOutputs, ReadKV, WriteKV, ReadInputs, AckInputs})
