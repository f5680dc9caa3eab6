"""The runtime client against a tiny scripted gateway: routing, errors, reconnects, de-duplication.

The fake speaks just enough of the protocol (through the real codec) to let each test script the
moment something goes wrong: a dropped connection, a lost reply, a redelivery, a close code.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from gateway.client import (
    MAX_BATCH,
    ClientClosed,
    ConnectionState,
    GatewayError,
    GatewaySession,
    GaveUp,
    Rejected,
    Revoked,
    Superseded,
    connect,
)
from gateway.codec import Decoded, decode, encode, encode_reply
from statemachine.messages import (
    AckInputCommand,
    AckInputResponse,
    Channel,
    ErrorCode,
    ErrorPayload,
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

RUN = "run_unittest0001"
TOKEN = "tok-unit-test"
SESSION = "ses_fakesession01"
FAST = {"reconnect_backoff": (0.01, 0.05), "ack_delay": 0.01}
TEST_TIMEOUT = 20  # a client bug that loops or hangs fails the test instead of the suite


def now_ms() -> Millis:
    return Millis(time.time_ns() // 1_000_000)


def input_event(seq: int) -> InputEvent:
    return InputEvent(f"in-{seq}", seq, "user.message", {"n": seq}, now_ms())


Reaction = Callable[[int, WebSocketConnection, Decoded], Awaitable[bool]]


class FakeGateway:
    """Answers like a gateway; `react` may take over any command first (return True if it did)."""

    def __init__(self) -> None:
        self.url = ""
        self.frames: list[tuple[int, Decoded]] = []
        self.frame_bytes: list[tuple[Channel, int]] = []  # each command's size as received
        self.sockets: list[WebSocketConnection] = []
        self.close_codes: dict[int, int | None] = {}
        self.errors_sent: list[ErrorCode] = []
        self.react: Reaction | None = None
        self.reject_status: int | None = None
        self.kv: dict[str, str] = {}
        self.outputs: dict[int, OutputEvent] = {}
        self.inputs: list[InputEvent] = []
        self.acked = -1
        self.redeliver_from: int | None = None  # attach redelivers from here (not acked + 1)
        self.delivered: dict[int, int] = {}
        self.heartbeat_ms = 1000
        self.max_frame_bytes: int | None = None  # what the attach reply says (None: not told)
        self.redelivery_delay = 0.0  # seconds between an attach reply and its redelivery
        self.nursery: trio.Nursery | None = None

    # --- what tests look at -------------------------------------------------------------------

    def commands(self, channel: Channel, conn: int | None = None) -> list[Any]:
        return [d.command for c, d in self.frames
                if d.channel is channel and (conn is None or c == conn)]

    def attaches(self) -> list[RuntimeAttachRequest]:
        return self.commands(Channel.ATTACH)

    async def send(self, conn: int, channel: Channel, request_id: str, payload: Any) -> None:
        if isinstance(payload, ErrorPayload):
            self.errors_sent.append(payload.code)
        await self.sockets[conn].send_message(encode(channel, request_id, payload))

    async def reply(self, conn: int, request_id: str, payload: Any) -> None:
        if isinstance(payload, ErrorPayload):
            self.errors_sent.append(payload.code)
        await self.sockets[conn].send_message(encode_reply(request_id, payload))

    async def deliver(self, conn: int, events: list[InputEvent]) -> None:
        self.delivered[conn] = max([self.delivered.get(conn, -1), *(e.seq for e in events)])
        delivery = TaskInputDelivery(SESSION, RUN, tuple(events))
        await self.send(conn, Channel.INPUT, f"in-{events[0].seq}", delivery)

    async def deliver_later(self, conn: int, events: list[InputEvent]) -> None:
        await trio.sleep(self.redelivery_delay)
        await self.deliver(conn, events)

    async def close(self, conn: int, code: int) -> None:
        await self.sockets[conn].aclose(code)

    # --- the server ---------------------------------------------------------------------------

    async def handler(self, request: WebSocketRequest) -> None:
        if self.reject_status is not None:
            await request.reject(self.reject_status)
            return
        if (b"authorization", f"Bearer {TOKEN}".encode()) not in [
            (k.lower(), v) for k, v in request.headers
        ]:
            await request.reject(401, body=b'{"detail": "bad token"}')
            return
        ws = await request.accept()
        conn = len(self.sockets)
        self.sockets.append(ws)
        try:
            while True:
                message = await ws.get_message()
                decoded = decode(message)
                assert isinstance(decoded, Decoded), decoded
                size = len(message.encode() if isinstance(message, str) else message)
                self.frame_bytes.append((decoded.channel, size))
                self.frames.append((conn, decoded))
                if self.react is not None and await self.react(conn, ws, decoded):
                    continue
                await self.answer(conn, decoded)
        except ConnectionClosed as closed:
            self.close_codes[conn] = closed.reason.code if closed.reason else None

    async def answer(self, conn: int, decoded: Decoded) -> None:
        rid, command = decoded.request_id, decoded.command
        if isinstance(command, RuntimeAttachRequest):
            await self.reply(conn, rid, RuntimeAttachResponse(
                SESSION, RUN, self.heartbeat_ms, Millis(now_ms() + 3 * self.heartbeat_ms), "cfg-1",
                max_frame_bytes=self.max_frame_bytes))
            start = self.acked + 1 if self.redeliver_from is None else self.redeliver_from
            pending = [e for e in self.inputs if e.seq >= start]
            if pending and self.redelivery_delay:
                assert self.nursery is not None  # later, while this connection's frames flow
                self.nursery.start_soon(self.deliver_later, conn, pending)
            elif pending:
                await self.deliver(conn, pending)
        elif isinstance(command, HeartbeatCommand):
            due = Millis(now_ms() + self.heartbeat_ms)
            await self.reply(conn, rid, HeartbeatResponse(True, due))
        elif decoded.channel is Channel.CONFIG_GET:
            await self.reply(conn, rid, GetConfigResponse({"model": "m1", "temperature": 0.5}))
        elif isinstance(command, GetSecretsCommand):
            granted = {"API_KEY": "k-1", "OTHER": "o-1"}
            names = granted if command.names is None else command.names
            await self.reply(conn, rid, GetSecretsResponse(
                {n: granted[n] for n in names if n in granted}))
        elif isinstance(command, GetKVCommand):
            await self.reply(conn, rid, GetKVResponse(
                {k: self.kv[k] for k in command.keys if k in self.kv}))
        elif isinstance(command, SetKVCommand):
            self.kv.update(command.kv)
            await self.reply(conn, rid, SetKVResponse(True))
        elif isinstance(command, PublishOutputEventsRequest):
            if self.store(command.events):
                await self.reply(conn, rid, PublishOutputEventsResponse(True))
            else:
                await self.reply(conn, rid, ErrorPayload.of(ErrorCode.SEQ_GAP, "gap"))
        elif isinstance(command, AckInputCommand):
            if command.seq <= self.acked:  # as the gateway does: stored already, whatever was sent
                await self.reply(conn, rid, AckInputResponse(True))
            elif command.seq > self.delivered.get(conn, -1):
                await self.reply(conn, rid, ErrorPayload.of(ErrorCode.SEQ_GAP, "not delivered"))
            else:
                self.acked = max(self.acked, command.seq)
                await self.reply(conn, rid, AckInputResponse(True))
        else:  # pragma: no cover - every command is answered above
            raise AssertionError(decoded)

    def store(self, events: tuple[OutputEvent, ...]) -> bool:
        """Idempotent on seq, refusing gaps (as the real store does)."""
        for event in events:
            if event.seq in self.outputs:
                continue
            if event.seq != len(self.outputs):
                return False
            self.outputs[event.seq] = event
        return True


@asynccontextmanager
async def fake_gateway() -> AsyncIterator[FakeGateway]:
    fake = FakeGateway()
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, fake.handler, "127.0.0.1", 0, None)
            fake.url = f"ws://127.0.0.1:{server.port}/runtime"
            fake.nursery = nursery
            yield fake
            nursery.cancel_scope.cancel()


def session(fake: FakeGateway, **options: Any) -> Any:
    values: dict[str, Any] = {"token": TOKEN, "run_id": RUN, **FAST}
    values.update(options)
    return connect(fake.url, **values)


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.005)


async def process_inputs_0_and_1(s: GatewaySession) -> None:
    """Take inputs 0 and 1 and ask for the next one, which marks 1 processed (none comes)."""
    iterator = s.inputs()
    await iterator.__anext__()
    await iterator.__anext__()
    with trio.move_on_after(0.01):
        await iterator.__anext__()


# --- requests and replies ----------------------------------------------------------------------


async def test_attach_then_every_command_routed_by_id() -> None:
    async with fake_gateway() as fake:
        held: list[tuple[int, Decoded]] = []

        async def out_of_order(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
            if decoded.channel in (Channel.SECRETS_GET, Channel.CONFIG_GET, Channel.KV_GET):
                held.append((conn, decoded))
                if len(held) == 3:  # answer the three in reverse order of arrival
                    for c, d in reversed(held):
                        await fake.answer(c, d)
                return True
            return False

        fake.react = out_of_order
        fake.kv["k"] = "v"
        results: dict[str, Any] = {}
        async with session(fake, capabilities=["kv.read", "secrets.read"],
                           runtime_instance_id="rt-unit") as s:
            assert s.session_id == SESSION
            assert s.config_version == "cfg-1"

            async def run(name: str, call: Callable[[], Awaitable[Any]]) -> None:
                results[name] = await call()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, "secrets", lambda: s.get_secrets(["API_KEY", "NOPE"]))
                nursery.start_soon(run, "config", s.get_config)
                nursery.start_soon(run, "kv", lambda: s.kv_get(["k", "missing"]))
            fake.react = None
            await s.kv_set({"a": "1"})
            assert await s.kv_get(["a", "k"]) == {"a": "1", "k": "v"}
            assert await s.get_secrets() == {"API_KEY": "k-1", "OTHER": "o-1"}

    assert results == {
        "secrets": {"API_KEY": "k-1"},
        "config": {"model": "m1", "temperature": 0.5},
        "kv": {"k": "v"},
    }
    [attach] = fake.attaches()
    assert attach.run_id == RUN
    assert attach.reconnect is False
    # No start_epoch: the wall clock in ms, so a restarted process outranks its predecessor.
    assert attach.connection_epoch is not None
    assert abs(attach.connection_epoch - time.time() * 1000) < 600_000
    assert attach.runtime_instance_id == "rt-unit"
    assert {c.value for c in attach.capabilities} == {"kv.read", "secrets.read"}
    ids = [d.request_id for _, d in fake.frames]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"c-[0-9]+", i) for i in ids)
    assert fake.close_codes == {0: 1000}  # leaving the block closes normally


async def test_error_frame_raises_gateway_error_and_session_stays_usable() -> None:
    async with fake_gateway() as fake:
        async def deny(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
            if decoded.channel is Channel.KV_GET:
                await fake.reply(conn, decoded.request_id, ErrorPayload.of(
                    ErrorCode.CAPABILITY_DENIED, "this session was not granted 'kv.read'"))
                return True
            return False

        fake.react = deny
        async with session(fake) as s:
            with pytest.raises(GatewayError) as caught:
                await s.kv_get(["a"])
            assert caught.value.code is ErrorCode.CAPABILITY_DENIED
            assert caught.value.retryable is False
            assert "capability_denied" in str(caught.value)
            assert await s.get_config() == {"model": "m1", "temperature": 0.5}
    assert len(fake.sockets) == 1


async def test_leaving_the_block_with_an_exception_raises_it_unwrapped() -> None:
    async with fake_gateway() as fake:
        kept: list[GatewaySession] = []
        with pytest.raises(KeyError):
            async with session(fake) as s:
                kept.append(s)
                raise KeyError("from the body")
        with pytest.raises(ClientClosed):
            await kept[0].get_config()


# --- connecting and reconnecting -----------------------------------------------------------------


async def test_wrong_token_is_rejected_before_attach() -> None:
    async with fake_gateway() as fake:
        with pytest.raises(Rejected) as caught:
            async with session(fake, token="wrong"):
                raise AssertionError("must not attach")
        assert caught.value.status_code == 401
        assert "bad token" in str(caught.value)
        assert "wrong" not in str(caught.value)
        assert fake.frames == []


async def test_stale_epoch_on_first_attach_is_superseded() -> None:
    async with fake_gateway() as fake:
        async def stale(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
            await fake.reply(conn, decoded.request_id, ErrorPayload.of(
                ErrorCode.STALE_EPOCH, "connectionEpoch 0 is below 4"))
            return True

        fake.react = stale
        with pytest.raises(Superseded):
            async with session(fake):
                raise AssertionError("must not attach")


async def test_drop_reconnects_with_higher_epoch_and_retries_in_flight_call() -> None:
    async with fake_gateway() as fake:
        async def drop_first_write(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
            if decoded.channel is Channel.KV_SET and conn == 0:
                await ws.aclose(1012)  # draining: the reply never comes
                return True
            return False

        fake.react = drop_first_write
        states: list[ConnectionState] = []
        async with session(fake, capabilities=["kv.write"], on_state=states.append,
                           start_epoch=5) as s:
            await s.kv_set({"answer": "42"})
            assert s.connection_epoch == 6
    assert fake.kv == {"answer": "42"}
    first, second = fake.attaches()
    assert (first.reconnect, first.connection_epoch) == (False, 5)
    assert (second.reconnect, second.connection_epoch) == (True, 6)
    assert len(fake.commands(Channel.KV_SET, conn=0)) == 1
    assert len(fake.commands(Channel.KV_SET, conn=1)) == 1
    assert states == ["connecting", "attached", "reconnecting", "attached", "closed"]


@pytest.mark.parametrize("stored_before_drop", [True, False])
async def test_unacknowledged_outputs_are_republished_with_the_same_seqs(
    stored_before_drop: bool,
) -> None:
    async with fake_gateway() as fake:
        async def lose_reply(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
            if decoded.channel is Channel.OUTPUT and conn == 0:
                if stored_before_drop:
                    assert isinstance(decoded.command, PublishOutputEventsRequest)
                    fake.store(decoded.command.events)
                await ws.aclose(1011)
                return True
            return False

        fake.react = lose_reply
        async with session(fake) as s:
            seqs = await s.publish([("log.line", {"i": i}) for i in range(3)])
            assert seqs == [0, 1, 2]
            assert await s.publish([("log.line", {"i": 3})]) == [3]
    sent_first, sent_again = fake.commands(Channel.OUTPUT)[:2]
    assert sent_first.events == sent_again.events  # same seqs, eventIds and timestamps
    assert sorted(fake.outputs) == [0, 1, 2, 3]
    assert [fake.outputs[i].data for i in range(4)] == [{"i": i} for i in range(4)]
    assert all(re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", e.event_id) for e in fake.outputs.values())
    assert ErrorCode.SEQ_GAP not in fake.errors_sent


async def test_cancelled_publish_is_still_sent_before_later_ones() -> None:
    async with fake_gateway() as fake:
        async def swallow_first(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
            return decoded.channel is Channel.OUTPUT and conn == 0

        fake.react = swallow_first
        async with session(fake) as s:
            with trio.move_on_after(0.2):
                await s.publish([("a", {}), ("b", {})])
                raise AssertionError("the swallowed batch cannot be acknowledged")
            await fake.close(0, 1012)
            assert await s.publish([("c", {})]) == [2]
    assert [fake.outputs[i].type for i in range(3)] == ["a", "b", "c"]


async def test_rate_limited_commands_are_retried_after_a_pause() -> None:
    async with fake_gateway() as fake:
        refused_at: list[float] = []

        async def limit(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
            if decoded.channel is Channel.KV_SET and len(refused_at) < 3:
                refused_at.append(trio.current_time())
                await fake.reply(conn, decoded.request_id, ErrorPayload.of(
                    ErrorCode.RATE_LIMITED, "too many commands; slow down and retry"))
                return True
            return False

        fake.react = limit
        async with session(fake, capabilities=["kv.read", "kv.write"]) as s:
            await s.kv_set({"a": "1"})
            assert await s.kv_get(["a"]) == {"a": "1"}
    gaps = [b - a for a, b in itertools.pairwise(refused_at)]
    # Pauses of 25-50 ms, then 50-100 ms (the first pause doubled, with jitter).
    assert len(refused_at) == 3 and gaps[0] >= 0.025 and gaps[1] >= 0.05
    assert len(fake.sockets) == 1  # no reconnect: the session just waited


async def test_refused_batch_gives_its_seqs_back() -> None:
    async with fake_gateway() as fake:
        async def refuse_bad(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
            command = decoded.command
            if isinstance(command, PublishOutputEventsRequest) and command.events[0].type == "bad":
                await fake.reply(conn, decoded.request_id, ErrorPayload.of(
                    ErrorCode.INVALID_FRAME, "the value at `path` is too long",
                    "/payload/events/0/type"))
                return True
            return False

        fake.react = refuse_bad
        async with session(fake) as s:
            with pytest.raises(GatewayError) as caught:
                await s.publish([("bad", {})])
            assert caught.value.path == "/payload/events/0/type"
            assert await s.publish([("good", {})]) == [0]
    assert [e.type for e in fake.outputs.values()] == ["good"]


async def test_lease_expired_answer_reattaches_and_retries() -> None:
    async with fake_gateway() as fake:
        async def expire_once(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
            if decoded.channel is Channel.CONFIG_GET and conn == 0:
                await fake.reply(conn, decoded.request_id, ErrorPayload.of(
                    ErrorCode.LEASE_EXPIRED, "the lease expired"))
                return True
            return False

        fake.react = expire_once
        async with session(fake) as s:
            assert await s.get_config() == {"model": "m1", "temperature": 0.5}
    first, second = fake.attaches()
    assert second.reconnect is True
    assert second.connection_epoch == first.connection_epoch + 1  # type: ignore[operator]


# --- close codes that end the session ------------------------------------------------------------


async def test_superseded_close_stops_pending_and_future_calls() -> None:
    async with fake_gateway() as fake:
        async def take_over(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
            if decoded.channel is Channel.KV_GET:
                await ws.aclose(4001)
                return True
            return False

        fake.react = take_over
        states: list[ConnectionState] = []
        async with session(fake, on_state=states.append) as s:
            with pytest.raises(Superseded):
                await s.kv_get(["a"])
            with pytest.raises(Superseded):
                await s.get_config()
            with pytest.raises(Superseded):
                await s.publish([("x", {})])
            with pytest.raises(Superseded):
                async for _ in s.inputs():
                    raise AssertionError("no inputs after the session stopped")
            assert isinstance(s.failure, Superseded)
            await trio.sleep(0.1)  # a reconnect would have happened by now
    assert len(fake.sockets) == 1
    assert states == ["connecting", "attached", "closed"]


async def test_revoked_close_stops_the_session() -> None:
    async with fake_gateway() as fake, session(fake) as s:
        await fake.close(0, 4002)
        await eventually(lambda: s.state == "closed")
        with pytest.raises(Revoked):
            await s.get_config()
    assert len(fake.sockets) == 1


async def test_reconnecting_gives_up_after_the_limit() -> None:
    async with fake_gateway() as fake, session(fake, give_up_after=0.3) as s:
        fake.reject_status = 503
        await fake.close(0, 1012)
        with trio.fail_after(5):
            with pytest.raises(GaveUp):
                await s.get_config()
        assert s.state == "closed"


# --- heartbeats --------------------------------------------------------------------------------


async def test_heartbeats_flow_while_a_user_call_waits() -> None:
    async with fake_gateway() as fake:
        async def never_answer_kv(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
            return decoded.channel is Channel.KV_GET

        fake.react = never_answer_kv
        async with session(fake) as s, trio.open_nursery() as nursery:
            nursery.start_soon(s.kv_get, ["slow"])
            await eventually(lambda: bool(fake.commands(Channel.HEARTBEAT)), timeout=3)
            nursery.cancel_scope.cancel()
    [beat, *_] = fake.commands(Channel.HEARTBEAT)
    assert (beat.session_id, beat.run_id) == (SESSION, RUN)


async def test_unanswered_heartbeat_means_a_dead_link() -> None:
    async with fake_gateway() as fake:
        async def stall(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
            return decoded.channel is Channel.HEARTBEAT and conn == 0

        fake.react = stall
        async with session(fake) as s:
            await eventually(lambda: len(fake.attaches()) == 2, timeout=5)
            assert await s.get_config() == {"model": "m1", "temperature": 0.5}
    assert fake.attaches()[1].reconnect is True


# --- inputs ------------------------------------------------------------------------------------


async def test_inputs_are_deduplicated_and_acknowledged_after_processing() -> None:
    async with fake_gateway() as fake:
        fake.inputs = [input_event(i) for i in range(3)]
        seen: list[int] = []
        async with session(fake) as s:
            iterator = s.inputs()
            for expected in range(3):
                assert (await iterator.__anext__()).seq == expected
                seen.append(expected)
            # Nothing is acknowledged before the body asks for the next event.
            await eventually(lambda: fake.acked == 1)
            await trio.sleep(0.05)
            assert fake.acked == 1
            await fake.deliver(0, [input_event(1), input_event(2)])  # a duplicate delivery

            async def consume() -> None:
                async for event in iterator:
                    seen.append(event.seq)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                await eventually(lambda: fake.acked == 2)
                # After a reconnect the gateway redelivers from the start; one new event too.
                fake.redeliver_from = 0
                fake.inputs.append(input_event(3))
                await fake.close(0, 1012)
                await eventually(lambda: seen == [0, 1, 2, 3])
                await eventually(lambda: fake.acked == 3)
                nursery.cancel_scope.cancel()
    assert seen == [0, 1, 2, 3]
    acks = [c.seq for c in fake.commands(Channel.INPUT_ACK)]
    assert acks == sorted(acks)
    assert ErrorCode.SEQ_GAP not in fake.errors_sent


async def test_acks_wait_for_the_new_connection_to_redeliver() -> None:
    async with fake_gateway() as fake:
        fake.inputs = [input_event(0), input_event(1)]
        async with session(fake, ack_delay=0.2) as s:
            iterator = s.inputs()
            await iterator.__anext__()
            await iterator.__anext__()
            # Processed up to 1, acked up to nothing yet, when the connection drops. The next
            # connection redelivers 0 and 1 well after its attach reply, and the client's ack
            # (due 0.2 s after processing) must wait for that: it would name undelivered seqs.
            with trio.move_on_after(0.01):
                await iterator.__anext__()
            fake.redelivery_delay = 0.5
            await fake.close(0, 1012)
            await eventually(lambda: fake.acked == 1)
    assert ErrorCode.SEQ_GAP not in fake.errors_sent
    assert fake.commands(Channel.INPUT_ACK, conn=0) == []


async def test_leaving_retries_the_last_ack_when_its_link_is_cut() -> None:
    """Regression: a cut during the final flush dropped the ack, and the session closed anyway
    (the store then held the sentinel input unacknowledged although it was processed)."""
    async with fake_gateway() as fake:
        fake.inputs = [input_event(0), input_event(1)]

        async def cut_first_ack(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
            if decoded.channel is Channel.INPUT_ACK and conn == 0:
                await ws.aclose(1012)  # the ack never reaches the store
                return True
            return False

        fake.react = cut_first_ack
        async with session(fake, ack_delay=5.0) as s:  # only the close flushes acks here
            await process_inputs_0_and_1(s)
    assert fake.acked == 1
    assert [c.seq for c in fake.commands(Channel.INPUT_ACK, conn=1)] == [1]


# --- frame limits ------------------------------------------------------------------------------


async def test_publishes_are_cut_into_frames_within_the_gateways_limit() -> None:
    async with fake_gateway() as fake:
        fake.max_frame_bytes = 2048
        async with session(fake) as s:
            seqs = await s.publish([("log.line", {"text": "x" * 300, "i": i}) for i in range(20)])
            assert seqs == list(range(20))
            assert await s.publish([("log.line", {"i": 20})]) == [20]
    sizes = [size for channel, size in fake.frame_bytes if channel is Channel.OUTPUT]
    assert len(sizes) >= 4  # 20 events of 300+ bytes cannot go in fewer frames of 2 KiB
    assert max(sizes) <= 2048
    assert [fake.outputs[i].data.get("i") for i in range(21)] == list(range(21))
    assert ErrorCode.SEQ_GAP not in fake.errors_sent


async def test_a_frame_too_big_for_the_limit_is_refused_before_it_is_sent() -> None:
    async with fake_gateway() as fake:
        fake.max_frame_bytes = 2048
        async with session(fake, capabilities=["kv.write"]) as s:
            with pytest.raises(GatewayError) as caught:
                await s.publish([("log.line", {"i": 0}), ("log.line", {"blob": "x" * 3000})])
            assert caught.value.code is ErrorCode.PAYLOAD_TOO_LARGE
            assert caught.value.retryable is False
            assert "2048" in caught.value.message
            with pytest.raises(GatewayError) as caught:
                await s.kv_set({"big": "y" * 3000})
            assert caught.value.code is ErrorCode.PAYLOAD_TOO_LARGE
            assert "2048" in caught.value.message
            # The refused call took no seqs: the next one starts the log.
            assert await s.publish([("log.line", {"i": 1})]) == [0]
    assert fake.commands(Channel.KV_SET) == []
    [sent] = fake.commands(Channel.OUTPUT)
    assert [e.data for e in sent.events] == [{"i": 1}]


async def test_a_1009_close_fails_the_publish_in_flight_instead_of_resending_it() -> None:
    async with fake_gateway() as fake:
        async def too_big(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
            command = decoded.command
            if isinstance(command, PublishOutputEventsRequest) and any(
                    e.type == "huge" for e in command.events):
                await ws.aclose(1009)  # what a gateway does with a frame over its hard limit
                return True
            return False

        fake.react = too_big
        async with session(fake) as s:
            with trio.fail_after(5), pytest.raises(GatewayError) as caught:
                await s.publish([("huge", {"blob": "x" * 5000})])
            assert caught.value.code is ErrorCode.PAYLOAD_TOO_LARGE
            assert caught.value.retryable is False
            assert await s.publish([("log.line", {})]) == [0]
    assert len([c for c in fake.commands(Channel.OUTPUT) if c.events[0].type == "huge"]) == 1
    assert [e.type for e in fake.outputs.values()] == ["log.line"]


# --- reconnect backoff -------------------------------------------------------------------------


async def test_a_gateway_that_drops_every_attach_is_backed_off_and_given_up_on() -> None:
    async with fake_gateway() as fake:
        async def flap(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
            if conn > 0 and decoded.channel is Channel.ATTACH:
                await fake.answer(conn, decoded)  # attached, then dropped at once
                await ws.aclose(1011)
                return True
            return False

        fake.react = flap
        async with session(fake, reconnect_backoff=(0.01, 0.2), give_up_after=0.5) as s:
            await fake.close(0, 1011)
            with trio.fail_after(5), pytest.raises(GaveUp):
                await s.get_config()
    # Each attach answered then dropped must not restart the backoff from its 10 ms.
    assert len(fake.attaches()) < 30


async def test_a_link_that_stayed_up_restarts_the_backoff_and_give_up_clock() -> None:
    async with fake_gateway() as fake, session(
            fake, reconnect_backoff=(0.01, 0.05), give_up_after=0.2) as s:

        def attached(count: int) -> Callable[[], bool]:
            return lambda: len(fake.attaches()) == count and s.state == "attached"

        for conn in range(5):  # 5 drops over more than give_up_after, each after a stable link
            await eventually(attached(conn + 1))
            await trio.sleep(0.1)  # twice the backoff's upper bound: a stable link
            await fake.close(conn, 1011)
        assert await s.get_config() == {"model": "m1", "temperature": 0.5}
        assert s.failure is None


async def test_time_connected_does_not_count_toward_give_up_after() -> None:
    """Links that work for a while (shorter than the backoff's upper bound) and drop are not
    given up on: give_up_after bounds time without a connection, as GaveUp says."""
    async with fake_gateway() as fake, session(
            fake, reconnect_backoff=(0.01, 2.0), give_up_after=0.5) as s:
        for conn in range(3):
            await fake.close(conn, 1011)
            with trio.fail_after(5):
                while len(fake.attaches()) < conn + 2 or s.state != "attached":
                    await trio.sleep(0.005)
            await trio.sleep(0.7)  # a working link, longer than give_up_after
        assert await s.get_config() == {"model": "m1", "temperature": 0.5}
        assert s.failure is None


# --- answers that say "not accepted" -----------------------------------------------------------


def not_accepted(fake: FakeGateway, channel: Channel, reply: Any, *, first_only: bool) -> None:
    """Have the fake answer commands on `channel` with `reply` (an `accepted: false` one)."""

    async def refuse(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
        if decoded.channel is channel and (not first_only or len(fake.commands(channel)) == 1):
            await fake.reply(conn, decoded.request_id, reply)
            return True
        return False

    fake.react = refuse


async def test_a_publish_not_accepted_is_sent_again() -> None:
    async with fake_gateway() as fake:
        not_accepted(fake, Channel.OUTPUT, PublishOutputEventsResponse(False), first_only=True)
        async with session(fake) as s:
            assert await s.publish([("log.line", {})]) == [0]
    first, second = fake.commands(Channel.OUTPUT)
    assert first.events == second.events
    assert list(fake.outputs) == [0]


async def test_a_kv_write_not_accepted_raises() -> None:
    async with fake_gateway() as fake:
        not_accepted(fake, Channel.KV_SET, SetKVResponse(False), first_only=False)
        async with session(fake, capabilities=["kv.write"]) as s:
            with pytest.raises(GatewayError) as caught:
                await s.kv_set({"a": "1"})
            assert caught.value.code is ErrorCode.INTERNAL
            assert caught.value.retryable is True
            assert "did not accept" in caught.value.message


async def test_an_ack_not_accepted_is_sent_again_later() -> None:
    async with fake_gateway() as fake:
        fake.inputs = [input_event(0), input_event(1)]
        not_accepted(fake, Channel.INPUT_ACK, AckInputResponse(False), first_only=True)
        async with session(fake) as s:
            iterator = s.inputs()
            await iterator.__anext__()
            await iterator.__anext__()  # 0 is processed
            await eventually(lambda: fake.acked == 0)
    assert [c.seq for c in fake.commands(Channel.INPUT_ACK)][:2] == [0, 0]


# --- leaving the block -------------------------------------------------------------------------


async def test_leaving_because_an_outer_scope_was_cancelled_does_not_wait_to_flush() -> None:
    async with fake_gateway() as fake:
        fake.inputs = [input_event(0), input_event(1)]

        async def swallow(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
            return decoded.channel in (Channel.OUTPUT, Channel.INPUT_ACK)

        fake.react = swallow
        with trio.fail_after(5):  # far below close_timeout: leaving must not wait for it
            with trio.CancelScope() as outer:
                async with session(fake, close_timeout=30) as s, trio.open_nursery() as nursery:
                    nursery.start_soon(s.publish, [("log.line", {})])
                    iterator = s.inputs()
                    await iterator.__anext__()
                    await iterator.__anext__()  # 0 is processed, its ack is owed
                    await eventually(lambda: bool(fake.commands(Channel.OUTPUT)))
                    outer.cancel()
                    await trio.sleep_forever()
            assert outer.cancelled_caught
            await eventually(lambda: 0 in fake.close_codes)  # the socket was closed
    assert fake.acked == -1  # to be delivered again: a cancelled exit acknowledges nothing more


async def test_a_normal_exit_flushes_no_longer_than_an_outer_deadline() -> None:
    async with fake_gateway() as fake:
        async def swallow(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
            return decoded.channel is Channel.OUTPUT

        fake.react = swallow
        kept: list[GatewaySession] = []
        with trio.fail_after(5):
            with trio.move_on_after(0.3):
                async with session(fake, close_timeout=30) as s:
                    kept.append(s)
                    with trio.move_on_after(0.05):
                        await s.publish([("log.line", {})])
            assert kept[0].state == "closed"


async def test_leaving_after_a_stored_ack_lost_its_reply_does_not_wait() -> None:
    async with fake_gateway() as fake:
        fake.inputs = [input_event(0), input_event(1)]

        async def store_then_cut(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
            if decoded.channel is Channel.INPUT_ACK and conn == 0:
                assert isinstance(decoded.command, AckInputCommand)
                fake.acked = decoded.command.seq  # durable; only the reply is lost
                await ws.aclose(1012)
                return True
            return False

        fake.react = store_then_cut
        with trio.fail_after(5):  # far below close_timeout: nothing is owed
            async with session(fake, ack_delay=5.0, close_timeout=30) as s:
                await process_inputs_0_and_1(s)
    assert fake.acked == 1
    assert [c.seq for c in fake.commands(Channel.INPUT_ACK, conn=1)] == [1]


async def test_leaving_after_a_lost_ack_waits_for_the_redelivery_if_it_was_not_stored() -> None:
    async with fake_gateway() as fake:
        fake.inputs = [input_event(0), input_event(1)]

        async def cut_first_ack(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
            if decoded.channel is Channel.INPUT_ACK and conn == 0:
                fake.redelivery_delay = 0.2  # the probe arrives before the redelivery
                await ws.aclose(1012)
                return True
            return False

        fake.react = cut_first_ack
        async with session(fake, ack_delay=5.0) as s:
            await process_inputs_0_and_1(s)
    assert fake.acked == 1
    # The probe is refused (not stored), and sent once more only after the redelivery.
    assert [c.seq for c in fake.commands(Channel.INPUT_ACK, conn=1)] == [1, 1]
    assert fake.errors_sent.count(ErrorCode.SEQ_GAP) == 1


# --- calls larger than one frame ---------------------------------------------------------------


async def test_a_refused_frame_drops_the_rest_of_its_call() -> None:
    async with fake_gateway() as fake:
        async def refuse_bad(conn: int, ws: WebSocketConnection, decoded: Decoded) -> bool:
            command = decoded.command
            if isinstance(command, PublishOutputEventsRequest) and command.events[0].type == "bad":
                await fake.reply(conn, decoded.request_id, ErrorPayload.of(
                    ErrorCode.INVALID_FRAME, "bad type", "/payload/events/0/type"))
                return True
            return False

        fake.react = refuse_bad
        async with session(fake) as s:
            with pytest.raises(GatewayError):
                await s.publish([("bad", {})] + [("good", {"i": i}) for i in range(MAX_BATCH)])
            assert await s.publish([("after", {})]) == [0]
    assert len(fake.commands(Channel.OUTPUT)) == 2  # the refused frame and "after"
    assert [e.type for e in fake.outputs.values()] == ["after"]


# --- inputs left unprocessed -------------------------------------------------------------------


@pytest.mark.parametrize("leave", ["break", "raise"])
async def test_an_input_the_loop_left_comes_first_next_time_and_is_not_acked_before(
    leave: str,
) -> None:
    async with fake_gateway() as fake:
        fake.inputs = [input_event(i) for i in range(3)]
        async with session(fake) as s:
            with pytest.raises(KeyError) if leave == "raise" else trio.CancelScope():
                async for event in s.inputs():
                    if event.seq == 1:
                        if leave == "raise":
                            raise KeyError("the body failed on 1")
                        break
            await eventually(lambda: fake.acked == 0)
            seen = []
            async for event in s.inputs():
                seen.append(event.seq)
                assert fake.acked < event.seq  # nothing is acknowledged before its body ran
                if event.seq == 2:
                    break
            assert seen == [1, 2]
            await eventually(lambda: fake.acked == 1)
    assert fake.acked == 1  # 2 was left unprocessed: only the close would have acked it
