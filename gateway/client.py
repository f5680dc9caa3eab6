"""A typed trio client for runtime authors: attach, heartbeat, commands, outputs and inputs.

The protocol asks a runtime to do several things at once (renew its lease on time, match replies
to requests, acknowledge inputs, come back after a drop with a higher epoch and resend whatever
was not acknowledged). This module does all of that behind one `async with`:

    async with connect(url, token=token, run_id=run_id, capabilities=["kv.read"]) as session:
        config = await session.get_config()
        await session.publish([("log.line", {"text": "hello"})])
        async for event in session.inputs():
            ...  # acknowledged (cumulatively, in batches) once the loop asks for the next one

Background tasks (per connection: reader, writer, heartbeat; per session: supervisor, publisher,
acknowledger) never run user code, so a slow loop body never delays a heartbeat, and a user's
cancelled await never tears a frame in half: frames go out through one writer task.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import random
import ssl
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final, Literal, TypeVar

import orjson
import trio
from attrs import evolve, frozen
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from gateway.codec import FrameRejected, decode_server_frame, encode
from statemachine.messages import (
    AckInputCommand,
    AckInputResponse,
    Capability,
    Channel,
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
    HeartbeatResponse,
    InputEvent,
    Millis,
    OutputEvent,
    PublishOutputEventsRequest,
    PublishOutputEventsResponse,
    RuntimeAttachRequest,
    RuntimeAttachResponse,
    SetKVCommand,
    SetKVResponse,
    TaskInputDelivery,
)

__all__ = [
    "ClientClosed",
    "ClientError",
    "ConnectError",
    "ConnectionState",
    "GatewayError",
    "GatewaySession",
    "GaveUp",
    "InputEvent",
    "OutputDraft",
    "ProtocolViolation",
    "Rejected",
    "Revoked",
    "Superseded",
    "connect",
]

log = logging.getLogger("agent_gateway.client")
# First and longest pause before retrying a command the gateway refused with rate_limited (s).
RATE_LIMIT_PAUSE = (0.05, 2.0)
# How often a closing session looks again for a link that can take its last acknowledgement (s).
_FLUSH_RETRY_S = 0.02

ConnectionState = Literal["connecting", "attached", "reconnecting", "closed"]
"""What `on_state` is told: the demo prints these, operators grep for them."""

MAX_BATCH: Final = 1000
"""Events per publish frame: the schema's `maxItems`; bigger publishes go out in several frames."""

DEFAULT_MAX_FRAME_BYTES: Final = 1 << 20
"""The frame limit assumed when the attach reply does not say (`maxFrameBytes`): the default."""

MAX_MESSAGE_BYTES: Final = 8 << 20
"""Largest gateway frame the client reads (input deliveries can be big; the gateway caps them)."""

_OUTBOX: Final = 64  # frames queued for the writer before senders wait
_CLOSE_TIMEOUT: Final = 2.0  # seconds a closing handshake may take before we just drop the socket
# A cancelled exit only waits for its (cancelled) connection task to drop the socket.
_CANCELLED_CLOSE_S: Final = 0.5
_ids = itertools.count(1)  # request ids are unique per process, so never reused in flight
# Longer than any id `_ids` makes, so a frame sized with it is never smaller than the one sent.
_ID_PLACEHOLDER: Final = "c-" + "9" * 20

_R = TypeVar("_R")


# --- errors ------------------------------------------------------------------------------------


class ClientError(Exception):
    """Everything this client raises, so a runtime can catch one type."""


class GatewayError(ClientError):
    """The gateway refused a command (`runtime.session.error`); `retryable` is the spec's flag."""

    def __init__(self, code: ErrorCode, message: str, retryable: bool,
                 path: str | None = None) -> None:
        super().__init__(code, message, retryable, path)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.path = path

    def __str__(self) -> str:
        where = f" (at {self.path})" if self.path else ""
        return f"{self.code.value}: {self.message}{where}"

    @classmethod
    def of(cls, error: ErrorPayload) -> GatewayError:
        """The exception for an error frame's payload."""
        return cls(error.code, error.message, error.retryable, error.path)


class Superseded(ClientError):
    """Another connection with a higher `connectionEpoch` took the run: this one must stop."""


class Revoked(ClientError):
    """The platform revoked the run or its token: there is nothing to reconnect to."""


class Rejected(ClientError):
    """The gateway refused the WebSocket handshake with an HTTP status (401: bad token)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(status_code, message)
        self.status_code = status_code
        self.message = message

    def __str__(self) -> str:
        return f"HTTP {self.status_code}: {self.message}"


class ConnectError(ClientError):
    """The first connection could not be made (the cause says why); nothing was attached."""


class GaveUp(ClientError):
    """Reconnecting took longer than `give_up_after` seconds (time connected does not count)."""


class ClientClosed(ClientError):
    """The session's `async with` block has ended; the client takes no more calls."""


class ProtocolViolation(ClientError):
    """The gateway sent something the protocol does not allow (a bug on its side)."""


_TERMINAL_CLOSES: Final[dict[int, Callable[[str], ClientError]]] = {
    CloseCode.SUPERSEDED: lambda run: Superseded(
        f"run {run}: a connection with a higher connectionEpoch took the session (close 4001)"),
    CloseCode.REVOKED: lambda run: Revoked(f"run {run} or its token was revoked (close 4002)"),
}
# Answers that mean "this connection's session is not usable": re-attach, then retry.
_REATTACH_CODES: Final = frozenset({ErrorCode.LEASE_EXPIRED, ErrorCode.NOT_ATTACHED})
# Handshake statuses that will not change by retrying (the token, the path or the run is wrong).
_FATAL_STATUSES: Final = frozenset({400, 401, 403, 404, 410})


# --- what runtimes pass in ---------------------------------------------------------------------


@frozen
class OutputDraft:
    """An output event before the client numbers, names and timestamps it."""

    type: str
    data: Mapping[str, Any]


DraftLike = OutputDraft | tuple[str, Mapping[str, Any]]


def _drafts(events: OutputDraft | Iterable[DraftLike]) -> list[OutputDraft]:
    """Accept one draft, or any mix of drafts and (type, data) pairs."""
    items: Iterable[DraftLike] = (events,) if isinstance(events, OutputDraft) else events
    drafts = []
    for item in items:
        if isinstance(item, OutputDraft):
            drafts.append(item)
        else:
            kind, data = item
            drafts.append(OutputDraft(kind, data))
    return drafts


def _frame_bytes(frame: str) -> int:
    """A frame's size as the gateway measures it: UTF-8 bytes."""
    return len(frame) if frame.isascii() else len(frame.encode("utf-8"))


def _now_ms() -> Millis:
    """Wall-clock milliseconds: what output timestamps and `nextHeartbeatDueAt` are measured in."""
    return Millis(time.time_ns() // 1_000_000)


@frozen
class _Options:
    """Everything `connect` was told, kept together for the background tasks."""

    url: str
    token: str
    run_id: str
    capabilities: tuple[Capability, ...]
    ssl_context: ssl.SSLContext | None
    runtime_instance_id: str
    attempt_id: str | None
    protocol_version: str
    backoff: tuple[float, float]
    give_up_after: float | None
    on_state: Callable[[ConnectionState], None] | None
    start_epoch: int
    connect_timeout: float
    ack_delay: float
    close_timeout: float


# --- one WebSocket connection ------------------------------------------------------------------


class _Dropped:
    """Outcome of a request whose connection went away before it was answered."""


_DROPPED: Final = _Dropped()


class _Waiter:
    """Where the reader leaves the one answer to one request."""

    __slots__ = ("event", "outcome", "size")

    def __init__(self, size: int) -> None:
        self.event = trio.Event()
        self.outcome: object = _DROPPED
        self.size = size  # bytes of the request's frame, to find the one a 1009 close refused

    def settle(self, outcome: object) -> None:
        """Record the answer once; later ones (there should be none) are ignored."""
        if not self.event.is_set():
            self.outcome = outcome
            self.event.set()


class _Link:
    """One WebSocket to the gateway and the requests waiting on it; dies once, never revives."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.session_id = ""
        self.pending: dict[str, _Waiter] = {}
        self.outbox, self.outbox_out = trio.open_memory_channel[str](_OUTBOX)
        self.dead = trio.Event()
        self.finished = trio.Event()
        self.reason = ""
        self.close_code: int | None = None
        self.failure: ClientError | None = None
        self.delivered = -1  # highest input seq the gateway sent on this connection
        self.attached_at = math.inf  # trio time of its attach reply

    def kill(self, reason: str, close_code: int | None = None,
             failure: ClientError | None = None) -> None:
        """Mark the connection unusable and release every request waiting on it."""
        if self.dead.is_set():
            return
        self.reason, self.close_code, self.failure = reason, close_code, failure
        self.dead.set()
        if close_code == CloseCode.MESSAGE_TOO_BIG and self.pending:
            # The close does not say which frame it refused: the largest in flight is the one
            # that can be over the limit. Sending it again would only close the next link too.
            biggest = max(self.pending.values(), key=lambda waiter: waiter.size)
            biggest.settle(GatewayError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"the gateway closed the connection with 1009 (frame too big) while this "
                f"{biggest.size}-byte frame was in flight",
                False,
            ))
        for waiter in self.pending.values():
            waiter.settle(_DROPPED)
        self.pending.clear()


class _Attempt:
    """The outcome of opening one connection: an attached link, or why there is none."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.link: _Link | None = None
        self.reply: RuntimeAttachResponse | None = None
        self.error: BaseException | None = None
        self.fatal = False


class _Batch:
    """The events of one publish call; kept until the gateway says they are all durable.

    It goes out in as many frames as the frame limit and `MAX_BATCH` require, one at a time.
    """

    __slots__ = ("done", "error", "events", "sizes", "stored")

    def __init__(self, events: tuple[OutputEvent, ...], sizes: list[int]) -> None:
        self.events = events  # renumbered in place if an earlier batch is refused
        # Each event's bytes in a frame. Renumbering only lowers seqs, so these stay upper bounds.
        self.sizes = sizes
        self.stored = 0  # the first events[:stored] are durable
        self.done = trio.Event()
        self.error: BaseException | None = None

    def settle(self, error: BaseException | None) -> None:
        """Tell the publishing caller how its batch ended."""
        self.error = error
        self.done.set()


# --- the session -------------------------------------------------------------------------------


class GatewaySession:
    """A run's session as a runtime sees it: survives reconnects, hides epochs and retries."""

    def __init__(self, options: _Options, start_seq: int | None) -> None:
        self._o = options
        self._nursery: trio.Nursery | None = None
        self._link: _Link | None = None
        self._changed = trio.Event()
        self._failure: ClientError | None = None
        self._closing = False
        self._epoch = options.start_epoch
        self._session_id = ""
        self._config_version: str | None = None
        self._state: ConnectionState = "closed"  # until _start says "connecting"
        # outputs
        self._next_seq = start_seq or 0
        # None: continue the run's log where the gateway says it goes on (its nextOutputSeq).
        self._seq_from_gateway = start_seq is None
        self._outbox: deque[_Batch] = deque()
        self._outbox_changed = trio.Event()
        self._max_frame = DEFAULT_MAX_FRAME_BYTES  # the last attach reply's maxFrameBytes
        # reconnecting: the backoff's step and when the current run of unstable links began
        self._retries = 0
        self._down_for = 0.0  # seconds without a connection since the last stable one
        # inputs
        self._inbox, self._inbox_out = trio.open_memory_channel[InputEvent](math.inf)
        self._input_high = -1  # highest seq ever handed to `inputs()`, for de-duplication
        self._held: InputEvent | None = None  # yielded, but its loop body has not finished
        self._processed = -1  # highest seq whose loop body finished
        self._acked = -1  # highest seq the gateway stored as acknowledged
        self._ack_in_doubt = -1  # highest ack sent whose answer was lost with its connection
        self._ack_wanted = trio.Event()

    # --- what runtimes read -----------------------------------------------------------------

    @property
    def run_id(self) -> str:
        """The run this session belongs to."""
        return self._o.run_id

    @property
    def session_id(self) -> str:
        """The gateway's id of the current session (a re-attach after a lost session changes it)."""
        return self._session_id

    @property
    def config_version(self) -> str | None:
        """The configuration version the last attach reported."""
        return self._config_version

    @property
    def connection_epoch(self) -> int:
        """The epoch of the current (or last attempted) attach."""
        return self._epoch

    @property
    def state(self) -> ConnectionState:
        """Where the connection is now (the same values `on_state` is told)."""
        return self._state

    @property
    def failure(self) -> ClientError | None:
        """Why the session stopped for good (Superseded, Revoked, GaveUp, ...), if it did."""
        return self._failure

    # --- commands ---------------------------------------------------------------------------

    async def get_secrets(self, names: Iterable[str] | None = None) -> dict[str, str]:
        """The run's secrets: the named ones (unknown names left out), or all granted."""
        wanted = None if names is None else tuple(names)
        reply = await self._call(
            Channel.SECRETS_GET,
            lambda sid: GetSecretsCommand(sid, self.run_id, wanted),
            GetSecretsResponse,
        )
        return dict(reply.secrets)

    async def get_config(self) -> dict[str, Any]:
        """The run's configuration."""
        reply = await self._call(
            Channel.CONFIG_GET, lambda sid: GetConfigCommand(sid, self.run_id), GetConfigResponse
        )
        return dict(reply.config)

    async def kv_get(self, keys: Iterable[str]) -> dict[str, str]:
        """Read keys of the run's KV namespace (missing keys are left out)."""
        wanted = tuple(keys)
        reply = await self._call(
            Channel.KV_GET, lambda sid: GetKVCommand(sid, self.run_id, wanted), GetKVResponse
        )
        return dict(reply.kv)

    async def kv_set(self, mapping: Mapping[str, str]) -> None:
        """Write keys durably; retried across reconnects (writing the same values is harmless).

        Raises GatewayError (retryable) if the gateway answers that it did not accept the write.
        """
        kv = dict(mapping)
        reply = await self._call(
            Channel.KV_SET, lambda sid: SetKVCommand(sid, self.run_id, kv), SetKVResponse
        )
        if not reply.accepted:
            raise GatewayError(
                ErrorCode.INTERNAL, "the gateway did not accept the KV write (accepted: false)",
                True,
            )

    async def publish(self, events: OutputDraft | Iterable[DraftLike]) -> list[int]:
        """Publish output events; return their seqs once the gateway has stored them durably.

        Seqs are assigned here, in call order. A call the caller stops waiting for (cancelled)
        is still sent, before any later call: its seqs are taken and the gateway must see them.
        An event whose frame alone exceeds the gateway's `maxFrameBytes` is refused here
        (GatewayError `payload_too_large`) and nothing of the call is sent. A call larger than
        one frame is stored frame by frame: if a frame is refused, the call raises, the frames
        before it stay stored and the rest of the call is not sent.
        """
        self._raise_if_stopped()
        drafts = _drafts(events)
        now = _now_ms()
        batch_events = tuple(
            OutputEvent(f"evt-{uuid.uuid4().hex}", seq, d.type, dict(d.data), now)
            for seq, d in enumerate(drafts, start=self._next_seq)
        )
        sizes = self._event_sizes(batch_events)
        base = self._frame_base(self._session_id)
        for index, (event, size) in enumerate(zip(batch_events, sizes, strict=True)):
            if base + size > self._max_frame:
                raise GatewayError(
                    ErrorCode.PAYLOAD_TOO_LARGE,
                    f"output event {index} ({event.type!r}) needs a {base + size}-byte frame; "
                    f"the gateway takes at most {self._max_frame} bytes (maxFrameBytes)",
                    False,
                )
        if not batch_events:
            return []
        # No await since the seqs were read: no other publish can have taken them meanwhile.
        self._next_seq += len(batch_events)
        batch = _Batch(batch_events, sizes)
        self._outbox.append(batch)
        self._poke_publisher()
        await batch.done.wait()
        if batch.error is not None:
            raise copy.copy(batch.error)
        return [event.seq for event in batch.events]

    async def inputs(self) -> AsyncIterator[InputEvent]:
        """Input events in seq order, each once; acknowledged after the loop body finishes.

        An event counts as processed when the loop asks for the next one; acknowledgements are
        cumulative and batched. Iterate from one task only. Ends when the session is closed;
        raises the session's failure (Superseded, Revoked, ...) if it stopped for good.
        """
        while True:
            self._raise_if_failed()
            event = self._held
            if event is None:
                try:
                    event = await self._inbox_out.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    self._raise_if_failed()
                    return
                # Held until the loop asks for the next one: a loop left on it (break, an
                # exception) did not process it, so the next iteration must yield it first.
                self._held = event
            yield event
            if self._held is event:
                self._held = None
            if event.seq > self._processed:
                self._processed = event.seq
                self._ack_wanted.set()

    # --- requests ---------------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise copy.copy(self._failure)

    def _raise_if_stopped(self) -> None:
        self._raise_if_failed()
        if self._closing:
            raise ClientClosed("the session's async with block has ended")

    def _wake(self) -> None:
        """Tell everyone waiting for a usable connection to look again."""
        self._changed.set()
        self._changed = trio.Event()

    async def _live_link(self) -> _Link:
        """The attached connection, waiting through reconnects; raises once the session stops."""
        while True:
            self._raise_if_stopped()
            link = self._link
            if link is not None and not link.dead.is_set():
                return link
            await self._changed.wait()

    def _frame_base(self, session_id: str) -> int:
        """Bytes of a publish frame with no events (the envelope every output frame carries)."""
        empty = PublishOutputEventsRequest(session_id, self.run_id, ())
        return _frame_bytes(encode(Channel.OUTPUT, _ID_PLACEHOLDER, empty))

    def _event_sizes(self, events: tuple[OutputEvent, ...]) -> list[int]:
        """What each event adds to a publish frame (its JSON), so batches can be cut to fit."""
        base = self._frame_base(self._session_id)
        return [
            _frame_bytes(encode(Channel.OUTPUT, _ID_PLACEHOLDER, PublishOutputEventsRequest(
                self._session_id, self.run_id, (event,)))) - base
            for event in events
        ]

    def _fitting(self, batch: _Batch, session_id: str) -> int:
        """How many of the batch's unsent events the next frame can carry (0: not even one)."""
        budget = self._max_frame - self._frame_base(session_id)
        used = -1  # n events take their sizes plus n - 1 commas
        count = 0
        for size in itertools.islice(batch.sizes, batch.stored, batch.stored + MAX_BATCH):
            used += size + 1
            if used > budget:
                break
            count += 1
        return count

    async def _request(self, link: _Link, channel: Channel, payload: Any) -> object:
        """Send one command on `link` and return its answer, or `_DROPPED` if the link died.

        A frame over the gateway's limit is not sent: the answer is a GatewayError, as the
        gateway would refuse it (or, at twice the limit, close the connection with 1009).
        """
        if link.dead.is_set():
            return _DROPPED
        request_id = f"c-{next(_ids)}"
        frame = encode(channel, request_id, payload)
        size = _frame_bytes(frame)
        if size > self._max_frame:
            return GatewayError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"the {channel.value} frame is {size} bytes; the gateway takes at most "
                f"{self._max_frame} bytes (maxFrameBytes)",
                False,
            )
        waiter = _Waiter(size)
        link.pending[request_id] = waiter
        try:
            try:
                await link.outbox.send(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                link.kill("the connection's writer stopped")
                return _DROPPED
            await waiter.event.wait()
            return waiter.outcome
        finally:
            link.pending.pop(request_id, None)

    async def _call(self, channel: Channel, build: Callable[[str], Any], expect: type[_R]) -> _R:
        """A command answered on whichever connection is live; retried after every reconnect.

        `rate_limited` is retried too, after a pause that doubles (with jitter) each time: every
        command of the protocol is safe to repeat, and the caller asked for it to happen.
        """
        pause = RATE_LIMIT_PAUSE[0]
        while True:
            link = await self._live_link()
            outcome = await self._request(link, channel, build(link.session_id))
            if isinstance(outcome, expect):
                return outcome
            if isinstance(outcome, _Dropped):
                continue
            if isinstance(outcome, ErrorPayload):
                if self._refused(link, outcome):
                    continue
                if self._failure is not None:
                    raise copy.copy(self._failure)
                if outcome.code is ErrorCode.RATE_LIMITED:
                    await trio.sleep(random.uniform(pause / 2, pause))
                    pause = min(pause * 2, RATE_LIMIT_PAUSE[1])
                    continue
                raise GatewayError.of(outcome)
            if isinstance(outcome, ClientError):
                raise outcome
            raise ProtocolViolation(
                f"{channel.value} was answered with {type(outcome).__name__}"
            )

    def _refused(self, link: _Link, error: ErrorPayload) -> bool:
        """React to an error frame for the whole session; True if the command should be retried."""
        if error.code in _REATTACH_CODES:
            link.kill(f"the gateway answered {error.code.value}; re-attaching")
            return True
        if error.code is ErrorCode.STALE_EPOCH:
            superseded = Superseded(f"run {self.run_id}: {error.message} (stale_epoch)")
            link.kill("stale epoch", failure=superseded)
            self._fail(superseded)
        elif error.code is ErrorCode.FORBIDDEN_RUN:
            # Answered after this link attached the run, so the token could act on it: the run
            # was revoked since. A sub-run attached on its main run's token learns it only this
            # way (its link stays open for the main run: no 4002), and would otherwise stay
            # "attached", heartbeating into refusals, with inputs() never ending.
            revoked = Revoked(f"run {self.run_id} was revoked (forbidden_run)")
            link.kill("revoked", failure=revoked)
            self._fail(revoked)
        return False

    # --- connections ------------------------------------------------------------------------

    def _set_state(self, state: ConnectionState) -> None:
        if state == self._state:
            return
        self._state = state
        if self._o.on_state is not None:
            try:
                self._o.on_state(state)
            except Exception:
                log.exception("on_state callback failed")

    async def _open(self, reconnect: bool) -> _Attempt:
        """Open a connection and attach on it (in a background task, which owns the socket)."""
        assert self._nursery is not None
        attempt = _Attempt()
        self._nursery.start_soon(self._run_link, reconnect, self._epoch, attempt)
        await attempt.done.wait()
        return attempt

    async def _run_link(self, reconnect: bool, epoch: int, attempt: _Attempt) -> None:
        """Own one WebSocket for its whole life: attach, serve, close; never raises."""
        link: _Link | None = None
        # trio-websocket's own connect_timeout raises on time but then waits for its reader
        # task, which a network stalled mid-handshake (half-open) holds forever: this scope
        # bounds the whole opening, and is lifted once the WebSocket is open.
        opening = trio.CancelScope(deadline=trio.current_time() + self._o.connect_timeout)
        try:
            with opening:
                async with open_websocket_url(
                    self._o.url,
                    self._o.ssl_context,
                    extra_headers=[(b"authorization", f"Bearer {self._o.token}".encode())],
                    max_message_size=MAX_MESSAGE_BYTES,
                    connect_timeout=self._o.connect_timeout,
                    disconnect_timeout=_CLOSE_TIMEOUT,
                ) as ws:
                    opening.deadline = math.inf
                    link = _Link(ws)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._read, link)
                        nursery.start_soon(self._write, link)
                        await self._attach(link, reconnect, epoch, attempt)
                        attempt.done.set()
                        if attempt.link is not None:
                            assert attempt.reply is not None
                            nursery.start_soon(self._heartbeat, link, attempt.reply)
                            await link.dead.wait()
                        else:
                            link.kill("attach failed")
                        nursery.cancel_scope.cancel()
            if opening.cancelled_caught:
                # trio-websocket reports a refused certificate as this silence, not as itself.
                attempt.error = ConnectionError(
                    f"no WebSocket handshake within {self._o.connect_timeout:g} s (if the gateway's"
                    " certificate is self-signed, as serve --dev's is, pass an ssl_context that"
                    " trusts it)"
                )
        except ConnectionRejected as rejected:
            status = rejected.status_code or 0
            attempt.error = Rejected(status, _rejection_text(rejected))
            attempt.fatal = status in _FATAL_STATUSES
        except (HandshakeError, ConnectionClosed, OSError, trio.BrokenResourceError) as error:
            if attempt.done.is_set():
                log.debug("connection closed uncleanly: %r", error)
            else:
                attempt.error = error
        except Exception as error:  # a bug must not take the runtime's session down silently
            log.exception("connection task failed")
            if link is not None:
                link.kill(f"internal error: {error!r}")
            attempt.error = error
        finally:
            if link is not None:
                link.kill("connection closed")
                link.finished.set()
            attempt.done.set()

    async def _attach(self, link: _Link, reconnect: bool, epoch: int, attempt: _Attempt) -> None:
        """Attach (or re-attach) on a fresh link and record the outcome in `attempt`."""
        request = RuntimeAttachRequest(
            run_id=self.run_id,
            runtime_instance_id=self._o.runtime_instance_id,
            protocol_version=self._o.protocol_version,
            attempt_id=self._o.attempt_id,
            reconnect=reconnect,
            connection_epoch=epoch,
            capabilities=self._o.capabilities,
            reply_extensions=True,  # where the output log goes on, and the frame size limit
        )
        outcome: object = _DROPPED
        with trio.move_on_after(self._o.connect_timeout):
            outcome = await self._request(link, Channel.ATTACH, request)
        if isinstance(outcome, RuntimeAttachResponse):
            link.session_id = outcome.session_id
            attempt.link, attempt.reply = link, outcome
        elif isinstance(outcome, ErrorPayload):
            error = GatewayError.of(outcome)
            if outcome.code is ErrorCode.STALE_EPOCH:
                attempt.error = Superseded(
                    f"run {self.run_id}: connectionEpoch {epoch} was refused ({outcome.message})"
                )
                attempt.fatal = True
            else:
                attempt.error, attempt.fatal = error, not outcome.retryable
        elif isinstance(outcome, _Dropped):
            attempt.error = link.failure or ConnectionError(link.reason or "closed during attach")
            if link.close_code in _TERMINAL_CLOSES:
                attempt.error = _TERMINAL_CLOSES[link.close_code](self.run_id)
                attempt.fatal = True
        else:
            attempt.error = ConnectionError("no attach reply in time")

    def _adopt(self, attempt: _Attempt) -> None:
        """Make a freshly attached link the session's connection."""
        assert attempt.link is not None and attempt.reply is not None
        reply = attempt.reply
        if self._session_id and reply.session_id != self._session_id:
            log.warning("run %s: the gateway started a new session (the old one was lost)",
                        self.run_id)
        self._session_id = reply.session_id
        self._config_version = reply.config_version
        self._max_frame = reply.max_frame_bytes or DEFAULT_MAX_FRAME_BYTES
        attempt.link.attached_at = trio.current_time()
        if self._seq_from_gateway and reply.next_output_seq is not None:
            # Only on the first attach: later, our own unacknowledged batches hold the seqs.
            self._next_seq = max(self._next_seq, reply.next_output_seq)
        self._seq_from_gateway = False
        self._link = attempt.link
        self._set_state("attached")
        self._wake()
        self._poke_publisher()
        self._ack_wanted.set()

    async def _read(self, link: _Link) -> None:
        """Route every frame: replies to their waiters, deliveries to the inbox."""
        try:
            while True:
                self._route(link, await link.ws.get_message())
        except ConnectionClosed as closed:
            code = closed.reason.code if closed.reason is not None else None
            link.kill(f"the connection closed ({closed.reason})", code)

    async def _write(self, link: _Link) -> None:
        """The only task that sends on the socket, so a cancelled caller never breaks a frame."""
        try:
            async with link.outbox_out:
                async for frame in link.outbox_out:
                    await link.ws.send_message(frame)
        except ConnectionClosed as closed:
            code = closed.reason.code if closed.reason is not None else None
            link.kill(f"the connection closed ({closed.reason})", code)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            link.kill(f"could not send: {error!r}")

    def _route(self, link: _Link, message: str | bytes) -> None:
        try:
            channel, request_id, payload = decode_server_frame(message, MAX_MESSAGE_BYTES)
        except FrameRejected as bad:
            log.warning("the gateway sent a frame outside the protocol: %s", bad)
            waiter = link.pending.pop(bad.request_id, None) if bad.request_id else None
            if waiter is not None:
                waiter.settle(ProtocolViolation(f"the gateway's answer broke the protocol: {bad}"))
            return
        if channel is Channel.INPUT:
            self._deliver(link, payload)
            return
        waiter = link.pending.pop(request_id, None) if request_id is not None else None
        if waiter is not None:
            waiter.settle(payload)
        elif isinstance(payload, ErrorPayload):
            log.warning("the gateway refused a frame: %s: %s", payload.code.value, payload.message)
        else:
            log.debug("an answer to no request in flight (%s)", channel.value)

    def _deliver(self, link: _Link, delivery: TaskInputDelivery) -> None:
        """Queue new input events; redelivered ones (seq already seen) are dropped here."""
        if delivery.run_id != self.run_id:
            log.warning("input delivery for another run ignored")
            return
        for event in delivery.events:
            link.delivered = max(link.delivered, event.seq)
            if event.seq > self._input_high:
                self._input_high = event.seq
                self._inbox.send_nowait(event)
        self._ack_wanted.set()  # acks wait for the gateway to have (re)delivered what they name

    async def _heartbeat(self, link: _Link, reply: RuntimeAttachResponse) -> None:
        """Renew the lease when the gateway says it is due; a silent gateway means a dead link."""
        interval = reply.heartbeat_interval_ms / 1000
        delay = interval
        while True:
            await trio.sleep(delay)
            outcome: object = None
            with trio.move_on_after(interval):
                outcome = await self._request(
                    link,
                    Channel.HEARTBEAT,
                    HeartbeatCommand(link.session_id, self.run_id, self._o.runtime_instance_id),
                )
            if outcome is None:
                link.kill("no heartbeat reply within one interval")
                return
            if isinstance(outcome, HeartbeatResponse) and outcome.accepted:
                due_in = (outcome.next_heartbeat_due_at - _now_ms()) / 1000
                delay = min(max(due_in, interval / 10), interval)
            elif isinstance(outcome, ErrorPayload):
                self._refused(link, outcome)
                if link.dead.is_set():
                    return
                log.warning("heartbeat refused: %s", outcome.code.value)
                delay = interval / 10 if outcome.retryable else interval
            elif isinstance(outcome, HeartbeatResponse):
                link.kill("the gateway did not accept the heartbeat")
                return
            else:
                return

    # --- background tasks of the session ----------------------------------------------------

    async def _start(self, nursery: trio.Nursery) -> None:
        """Make the first connection and attach; raise if that fails (nothing retries it)."""
        self._nursery = nursery
        self._set_state("connecting")
        attempt = await self._open(reconnect=False)
        if attempt.link is None:
            self._set_state("closed")
            error = attempt.error
            if isinstance(error, ClientError):
                raise error
            raise ConnectError(f"could not attach to {self._o.url}: {error!r}") from error
        self._adopt(attempt)
        nursery.start_soon(self._supervise)
        nursery.start_soon(self._publisher)
        nursery.start_soon(self._acknowledger)

    async def _supervise(self) -> None:
        """Notice each dropped connection and replace it, or stop the session for good."""
        while True:
            link = self._link
            if link is None:
                return
            await link.dead.wait()
            self._link = None
            self._wake()
            if self._closing or self._failure is not None:
                return
            terminal = link.failure
            if terminal is None and link.close_code in _TERMINAL_CLOSES:
                terminal = _TERMINAL_CLOSES[link.close_code](self.run_id)
            if terminal is not None:
                self._fail(terminal)
                return
            log.info("run %s: connection lost (%s); reconnecting", self.run_id, link.reason)
            self._set_state("reconnecting")
            # A link counts as restored only once it stayed up for the backoff's upper bound:
            # then even a gateway that accepts every attach and drops it at once (or after any
            # delay) gets at most about one attach per upper bound. (An answered heartbeat would
            # prove less: some gateways answer it and drop.) Until then the backoff keeps
            # growing and the time spent without a connection keeps adding up for give_up_after.
            if trio.current_time() - link.attached_at >= self._o.backoff[1]:
                self._retries, self._down_for = 0, 0.0
            if not await self._reconnect():
                return

    async def _reconnect(self) -> bool:
        """Re-attach with backoff (full jitter) and a higher epoch each try; False if we stop.

        give_up_after bounds the time spent without a connection since the last stable one
        (time connected does not count, so links that live a while and drop are not given up).
        """
        low, high = self._o.backoff
        down_since = trio.current_time()
        while True:
            delay = random.uniform(0, min(high, low * 2 ** min(self._retries, 60)))
            self._retries += 1
            limit = self._o.give_up_after
            down = self._down_for + trio.current_time() + delay - down_since
            if limit is not None and down > limit:
                self._fail(GaveUp(f"run {self.run_id}: no stable connection within {limit:g} s "
                                  "of reconnecting"))
                return False
            await trio.sleep(delay)
            if self._closing or self._failure is not None:
                return False
            self._epoch += 1
            attempt = await self._open(reconnect=True)
            if attempt.link is not None:
                self._down_for += trio.current_time() - down_since
                self._adopt(attempt)
                return True
            if attempt.fatal:
                assert isinstance(attempt.error, ClientError)
                self._fail(attempt.error)
                return False
            log.info("run %s: reconnect failed (%r)", self.run_id, attempt.error)

    def _fail(self, error: ClientError) -> None:
        """Stop for good: every pending and future call raises `error`."""
        if self._failure is None:
            self._failure = error
            log.warning("run %s: session stopped: %s", self.run_id, error)
        if self._link is not None:
            self._link.kill(str(error), failure=error)
        self._inbox.close()
        while self._outbox:
            self._outbox.popleft().settle(error)
        self._wake()
        self._poke_publisher()
        self._set_state("closed")

    def _poke_publisher(self) -> None:
        self._outbox_changed.set()

    async def _publisher(self) -> None:
        """Send queued output batches one at a time, in seq order, until each is durable."""
        while True:
            if not self._outbox:
                if self._failure is not None:
                    return
                self._outbox_changed = trio.Event()
                await self._outbox_changed.wait()
                continue
            if not await self._send_batch(self._outbox[0]):
                return

    async def _send_batch(self, batch: _Batch) -> bool:
        """Get one batch stored (or definitively refused); False once the session has stopped."""
        low, high = self._o.backoff
        part: tuple[OutputEvent, ...] = ()

        def request(session_id: str) -> PublishOutputEventsRequest:
            # Cut for this link: a new session id, or a new limit, may change what fits.
            nonlocal part
            count = self._fitting(batch, session_id)
            if count == 0:
                raise GatewayError(
                    ErrorCode.PAYLOAD_TOO_LARGE,
                    f"output seq {batch.events[batch.stored].seq} does not fit in a frame of "
                    f"{self._max_frame} bytes (maxFrameBytes)",
                    False,
                )
            part = batch.events[batch.stored:batch.stored + count]
            return PublishOutputEventsRequest(session_id, self.run_id, part)

        tries = 0
        while batch.stored < len(batch.events):
            try:
                reply = await self._call(Channel.OUTPUT, request, PublishOutputEventsResponse)
            except GatewayError as refused:
                if refused.retryable:
                    # Stored or not, its seqs are taken: resend the same events until stored.
                    tries += 1
                    await trio.sleep(random.uniform(0, min(high, low * 2 ** min(tries, 60))))
                    continue
                self._drop_batch(batch, refused)
                return True
            except ClientError:
                return False  # _fail already settled every queued batch
            except Exception as error:  # a bug in encoding: nothing of this frame was sent
                self._drop_batch(batch, error)
                return True
            if not reply.accepted:
                # Not stored, says the gateway: like a retryable refusal, the same events again.
                log.warning("run %s: the gateway did not accept output seqs %d-%d; retrying",
                            self.run_id, part[0].seq, part[-1].seq)
                tries += 1
                await trio.sleep(random.uniform(0, min(high, low * 2 ** min(tries, 60))))
                continue
            tries = 0
            batch.stored += len(part)
        if self._outbox and self._outbox[0] is batch:
            self._outbox.popleft()
        batch.settle(None)
        return True

    def _drop_batch(self, batch: _Batch, refused: BaseException) -> None:
        """A refused frame stored nothing: give its seqs, and the rest of its call's, onwards.

        The rest of the call is not sent either (a call is not half stored on purpose). Only
        the head of the queue is ever sent, so the later batches were never seen by the gateway
        and can be renumbered without leaving a gap or reusing a stored seq.
        """
        if self._outbox and self._outbox[0] is batch:
            self._outbox.popleft()
        shift = len(batch.events) - batch.stored
        for later in self._outbox:
            later.events = tuple(evolve(e, seq=e.seq - shift) for e in later.events)
        self._next_seq -= shift
        batch.settle(refused)

    async def _acknowledger(self) -> None:
        """Acknowledge processed inputs cumulatively, a little after the fact, in one frame."""
        while self._failure is None:
            await self._ack_wanted.wait()
            self._ack_wanted = trio.Event()
            await trio.sleep(self._o.ack_delay)
            if not await self._flush_acks():
                await trio.sleep(self._o.backoff[0])  # not in a tight loop: the gateway said no
                self._ack_wanted.set()

    async def _flush_acks(self, probe: bool = False) -> bool:
        """Send the highest ack the current connection can take (it must have delivered it).

        False if the gateway answered `accepted: false` (ask again later). With `probe`, an ack
        whose answer was lost with its connection is sent again even though the new connection
        has not redelivered it: if the gateway stored it, it redelivers nothing, and only this
        tells a closing session that nothing is owed (if it did not, it refuses with seq_gap).
        """
        while True:
            link = self._link
            if link is None or link.dead.is_set():
                return True  # the next attach wakes us
            reach = max(link.delivered, self._ack_in_doubt) if probe else link.delivered
            target = min(self._processed, reach)
            if target <= self._acked:
                return True
            probing = target > link.delivered
            command = AckInputCommand(link.session_id, self.run_id, target)
            outcome = await self._request(link, Channel.INPUT_ACK, command)
            if isinstance(outcome, AckInputResponse):
                if not outcome.accepted:
                    log.warning("input ack %d not accepted; will ask again", target)
                    return False
                self._acked = max(self._acked, target)
            elif isinstance(outcome, ErrorPayload):
                self._refused(link, outcome)
                if probing:
                    # The probe was refused: not stored, so it is redelivered and acked then.
                    self._ack_in_doubt = -1
                elif not link.dead.is_set():
                    log.warning("input ack refused: %s", outcome.code.value)
                return True
            else:
                if isinstance(outcome, _Dropped):
                    self._ack_in_doubt = max(self._ack_in_doubt, target)
                return True

    async def _stop(self) -> None:
        """Leave cleanly: send what is owed (bounded by close_timeout), then close with 1000.

        If the block is left because a scope around it was cancelled, the background tasks
        that would send are cancelled too: close the connection and leave at once.
        """
        outer = trio.current_effective_deadline()  # -inf: a scope around us is cancelled
        cancelled = outer == -math.inf
        with trio.CancelScope(shield=True):
            if not cancelled:
                # Not past the outer deadline either: the background tasks die there.
                with trio.move_on_at(min(outer, trio.current_time() + self._o.close_timeout)):
                    await self._flush()
            self._closing = True
            link = self._link
            if link is not None:
                link.kill("the runtime closed the session")
                with trio.move_on_after(_CANCELLED_CLOSE_S if cancelled else _CLOSE_TIMEOUT):
                    await link.finished.wait()
            self._inbox.close()
            closed = ClientClosed("the session closed before these events were stored")
            while self._outbox:  # only if close_timeout ran out: their publishers must not hang
                self._outbox.popleft().settle(closed)
            self._wake()
            self._set_state("closed")

    async def _flush(self) -> None:
        """Wait until every queued batch is settled and every processed input acknowledged."""
        try:
            while self._outbox and self._failure is None:
                await self._outbox[0].done.wait()
            # Until the last processed input is acknowledged: a link cut during the flush
            # drops it, and the next link must first redeliver what it acks (or, for an ack
            # whose answer was lost, say it has it: the probe).
            while self._processed > self._acked and self._failure is None:
                await self._live_link()
                await self._flush_acks(probe=True)
                if self._processed > self._acked:
                    await trio.sleep(_FLUSH_RETRY_S)
        except ClientError:
            pass  # stopped for good: nothing more can be sent


def _rejection_text(rejected: ConnectionRejected) -> str:
    """The gateway's problem `detail` (never the token), or a generic phrase."""
    body = rejected.body or b""
    try:
        detail = orjson.loads(body).get("detail")
        if isinstance(detail, str):
            return detail[:200]
    except (ValueError, AttributeError):
        pass
    return "the gateway refused the WebSocket handshake"


def _capabilities(values: Iterable[Capability | str]) -> tuple[Capability, ...]:
    return tuple(v if isinstance(v, Capability) else Capability(v) for v in values)


@asynccontextmanager
async def connect(
    url: str,
    *,
    token: str,
    run_id: str,
    capabilities: Iterable[Capability | str] = (),
    ssl_context: ssl.SSLContext | None = None,
    runtime_instance_id: str | None = None,
    attempt_id: str | None = None,
    protocol_version: str = "v1",
    reconnect_backoff: tuple[float, float] = (0.2, 10.0),
    give_up_after: float | None = None,
    on_state: Callable[[ConnectionState], None] | None = None,
    start_epoch: int | None = None,
    start_seq: int | None = None,
    connect_timeout: float = 10.0,
    ack_delay: float = 0.05,
    close_timeout: float = 5.0,
) -> AsyncIterator[GatewaySession]:
    """Attach to a run for the duration of the block, reconnecting as the protocol asks.

    `start_epoch` must exceed every epoch used for this run before; by default it is the wall
    clock in milliseconds, so a restarted process outranks its predecessor (which also means the
    newest of two instances of one run wins: the older one is closed with 4001). Outputs continue
    the run's log where the gateway says it goes on (`nextOutputSeq`), unless `start_seq` says
    otherwise.
    Raises `ConnectError`, `Rejected`, `GatewayError` or `Superseded` if the first attach fails;
    reconnects after later drops are transparent. Reconnects back off from `reconnect_backoff`'s
    lower to its upper bound; a connection that stays up for less than the upper bound does not
    reset that; `give_up_after` bounds the seconds spent without a connection since the last
    one that did (time connected does not count), then raises GaveUp.

    Leaving the block normally (or with an exception) first waits, up to `close_timeout`, for
    pending publishes to be stored and processed inputs to be acknowledged. Leaving it because
    a scope around it was cancelled does not wait: the connection is closed at once, inputs not
    acknowledged yet are delivered again to the next session, and publishes not confirmed yet
    may or may not be stored (a restarted runtime reads where the log goes on, `nextOutputSeq`,
    from its attach reply).
    """
    low, high = reconnect_backoff
    if not 0 < low <= high:
        raise ValueError("reconnect_backoff must be (min, max) with 0 < min <= max")
    options = _Options(
        url=url,
        token=token,
        run_id=run_id,
        capabilities=_capabilities(capabilities),
        ssl_context=ssl_context,
        runtime_instance_id=runtime_instance_id or f"rt-{uuid.uuid4().hex[:16]}",
        attempt_id=attempt_id,
        protocol_version=protocol_version,
        backoff=(low, high),
        give_up_after=give_up_after,
        on_state=on_state,
        start_epoch=time.time_ns() // 1_000_000 if start_epoch is None else start_epoch,
        connect_timeout=connect_timeout,
        ack_delay=ack_delay,
        close_timeout=close_timeout,
    )
    session = GatewaySession(options, start_seq)
    try:
        async with trio.open_nursery() as nursery:
            await session._start(nursery)
            try:
                yield session
            finally:
                await session._stop()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Background tasks never raise, so a group holds the body's (or _start's) one exception:
        # hand it over as itself, as if no nursery were involved.
        if len(group.exceptions) != 1:
            raise
        only = group.exceptions[0]
        raise only from only.__cause__
