"""Every channel and every error a runtime can provoke, over real TLS sockets to a real gateway."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio
import trio.testing
from e2e_support import (
    ADMIN_TOKEN,
    CertificateAuthority,
    Harness,
    PeerReadingLater,
    Wire,
    error_code,
    gateway_for_test,
    settings_for,
)
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from gateway.codec import decode_server_frame
from gateway.embedded import open_gateway
from gateway.links import Link
from gateway.store.base import NewInput, StoreError
from statemachine.effects import ArmTimer, Effect, SendReply
from statemachine.inputs import CommandReceived
from statemachine.messages import Channel, HeartbeatCommand, HeartbeatResponse, Millis
from statemachine.records import SessionState

HEARTBEAT = "runtime.session.heartbeat.command"
RECOVER = "runtime.session.recover.command"
SECRETS = "runtime.session.secrets.get.command"
CONFIG = "runtime.session.config.get.command"
KV_GET = "runtime.session.kv.get.command"
KV_SET = "runtime.session.kv.set.command"
OUTPUT = "runtime.task.output.event"
ACK = "runtime.task.input.ack.command"
INPUT = "service.task.input.event"


def close_code(closed: ConnectionClosed) -> int | None:
    """The code the gateway closed with (None: no close frame arrived)."""
    return None if closed.reason is None else closed.reason.code


def event(seq: int, text: str = "x") -> dict[str, Any]:
    """An output event as a runtime would publish it."""
    return {
        "eventId": f"evt-{seq}",
        "seq": seq,
        "type": "log.line",
        "data": {"text": text},
        "timestamp": "2026-11-21T12:00:00.000Z",
    }


def utf8_frame(channel: str, request_id: str, payload: dict[str, Any]) -> str:
    """A command frame with its non-ASCII text as is (`Wire.send` escapes it to ASCII)."""
    frame = {"channel": channel, "id": request_id, "payload": payload}
    return json.dumps(frame, ensure_ascii=False)


async def attached(h: Harness, wire: Wire, run_id: str, **extra: Any) -> dict[str, Any]:
    """Attach and return the ids every later command needs."""
    reply = await wire.attach(run_id, **extra)
    return {"sessionId": reply["sessionId"], "runId": run_id}


async def outputs(h: Harness, run_id: str, after: int = -1) -> list[dict[str, Any]]:
    """What the platform reads of a run's output log."""
    response = await h.http.get(f"/v1/runs/{run_id}/outputs", params={"after": after})
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


async def test_attach_heartbeat_config_secrets(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run(
            secrets={"API_KEY": "s3cr3t-value", "OTHER": "other-value"},
            config={"model": "m1", "temperature": 0.5},
            configVersion="cfg-7",
        )
        async with h.wire(token) as wire:
            reply = await wire.attach(run_id, capabilities=["secrets.read"])
            assert reply["runId"] == run_id
            assert reply["sessionId"].startswith("ses_")
            assert reply["heartbeatIntervalMs"] >= 1000
            assert reply["configVersion"] == "cfg-7"
            ids = {"sessionId": reply["sessionId"], "runId": run_id}

            beat = await wire.call(HEARTBEAT, ids)
            assert beat["channel"] == "runtime.session.heartbeat.reply"
            assert beat["payload"]["accepted"] is True
            assert beat["payload"]["nextHeartbeatDueAt"].endswith("Z")

            config = await wire.call(CONFIG, ids)
            assert config["payload"] == {"config": {"model": "m1", "temperature": 0.5}}

            named = await wire.call(SECRETS, {**ids, "names": ["API_KEY", "MISSING"]})
            assert named["payload"] == {"secrets": {"API_KEY": "s3cr3t-value"}}
            everything = await wire.call(SECRETS, ids)
            assert everything["payload"]["secrets"] == {
                "API_KEY": "s3cr3t-value",
                "OTHER": "other-value",
            }
            # kv.read was not asked for at attach, so it was not granted.
            assert (
                error_code(await wire.call(KV_GET, {**ids, "keys": ["a"]})) == "capability_denied"
            )

        view = (await h.http.get(f"/v1/runs/{run_id}/session")).json()
        assert view["sessionId"] == ids["sessionId"]
        assert "s3cr3t-value" not in json.dumps(view)


async def test_capabilities_are_what_was_asked_and_allowed(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run(capabilities=["kv.read"], secrets={"K": "value-1"})
        async with h.wire(token) as wire:
            ids = await attached(
                h, wire, run_id, capabilities=["kv.read", "kv.write", "secrets.read"]
            )
            assert error_code(await wire.call(SECRETS, ids)) == "capability_denied"
            assert error_code(await wire.call(KV_SET, {**ids, "kv": {"a": "1"}})) == (
                "capability_denied"
            )
            got = await wire.call(KV_GET, {**ids, "keys": ["a"]})
            assert got["payload"] == {"kv": {}}


async def test_kv_is_durable_and_per_run(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_a, token_a = await h.create_run()
        run_b, token_b = await h.create_run()
        async with h.wire(token_a) as wire:
            ids = await attached(h, wire, run_a, capabilities=["kv.read", "kv.write"])
            done = await wire.call(KV_SET, {**ids, "kv": {"step": "3", "phase": "plan"}})
            assert done["payload"] == {"accepted": True}
            got = await wire.call(KV_GET, {**ids, "keys": ["step", "phase", "nope"]})
            assert got["payload"] == {"kv": {"step": "3", "phase": "plan"}}
        async with h.wire(token_b) as wire:
            ids = await attached(h, wire, run_b, capabilities=["kv.read"])
            got = await wire.call(KV_GET, {**ids, "keys": ["step"]})
            assert got["payload"] == {"kv": {}}


async def test_outputs_are_ordered_idempotent_and_gapless(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run()
        async with h.wire(token) as wire:
            ids = await attached(h, wire, run_id)
            first = await wire.call(OUTPUT, {**ids, "events": [event(0), event(1)]})
            assert first == {
                "channel": "runtime.task.output.reply",
                "id": first["id"],
                "payload": {"accepted": True},
            }
            # A re-publish after a reconnect overlaps what was stored: stored once.
            again = await wire.call(OUTPUT, {**ids, "events": [event(1), event(2)]})
            assert again["payload"] == {"accepted": True}
            gap = await wire.call(OUTPUT, {**ids, "events": [event(5)]})
            assert error_code(gap) == "seq_gap"
            assert "3" in gap["payload"]["message"]
        stored = await outputs(h, run_id)
        assert [e["seq"] for e in stored] == [0, 1, 2]
        assert [e["eventId"] for e in stored] == ["evt-0", "evt-1", "evt-2"]
        page = (await h.http.get(f"/v1/runs/{run_id}/outputs", params={"after": 1})).json()
        assert [e["seq"] for e in page["events"]] == [2]
        assert page["next"] == 2


async def test_secret_values_echoed_into_outputs_are_masked(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run(secrets={"TOKEN": "hunter2-very-secret"})
        async with h.wire(token) as wire:
            ids = await attached(h, wire, run_id)
            leak = event(0, "using token hunter2-very-secret now")
            assert (await wire.call(OUTPUT, {**ids, "events": [leak]}))["payload"]["accepted"]
        stored = await outputs(h, run_id)
        assert stored[0]["data"]["text"] == "using token *** now"


async def test_long_poll_returns_when_an_output_arrives(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run()
        got: list[Any] = []

        async def platform() -> None:
            response = await h.http.get(
                f"/v1/runs/{run_id}/outputs", params={"after": -1, "wait": 20}
            )
            got.append(response.json())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(platform)
            async with h.wire(token) as wire:
                ids = await attached(h, wire, run_id)
                await trio.sleep(0.2)
                await wire.call(OUTPUT, {**ids, "events": [event(0)]})
                with trio.fail_after(5):
                    while not got:
                        await trio.sleep(0.01)
        assert [e["seq"] for e in got[0]["events"]] == [0]


async def test_inputs_delivered_in_order_acked_and_redelivered(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run()
        posted = await h.http.post(
            f"/v1/runs/{run_id}/inputs",
            json={"events": [{"type": "task.input", "data": {"n": n}} for n in range(3)]},
        )
        assert posted.status_code == 202, posted.text
        assert posted.json()["seqs"] == [0, 1, 2]
        async with h.wire(token) as wire:
            ids = await attached(h, wire, run_id)
            delivery = await wire.recv()
            assert delivery["channel"] == INPUT
            assert delivery["payload"]["sessionId"] == ids["sessionId"]
            assert [e["seq"] for e in delivery["payload"]["events"]] == [0, 1, 2]
            assert [e["data"]["n"] for e in delivery["payload"]["events"]] == [0, 1, 2]
            ack = await wire.call(ACK, {**ids, "seq": 0})
            assert ack["payload"] == {"accepted": True}
            # On a live connection nothing is sent twice, acknowledged or not.
            await h.http.post(
                f"/v1/runs/{run_id}/inputs",
                json={"events": [{"type": "task.input", "data": {"n": 3}}]},
            )
            live = await wire.recv()
            assert [e["seq"] for e in live["payload"]["events"]] == [3]
            beyond = await wire.call(ACK, {**ids, "seq": 9})
            assert error_code(beyond) == "seq_gap"
        # After a reconnect, whatever was not acknowledged comes again.
        async with h.wire(token) as wire:
            await wire.attach(run_id, reconnect=True, connectionEpoch=1)
            again = await wire.recv()
            assert [e["seq"] for e in again["payload"]["events"]] == [1, 2, 3]


async def test_reconnect_resumes_the_session_and_supersedes_the_old_connection(
    tmp_path: Path,
) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run()
        async with h.wire(token) as old:
            first = await old.attach(run_id, connectionEpoch=0)
            async with h.wire(token) as new:
                second = await new.attach(run_id, reconnect=True, connectionEpoch=1)
                assert second["sessionId"] == first["sessionId"]
                with pytest.raises(ConnectionClosed) as closed:
                    await old.recv(timeout=5)
                assert close_code(closed.value) == 4001
                ids = {"sessionId": second["sessionId"], "runId": run_id}
                assert (await new.call(HEARTBEAT, ids))["payload"]["accepted"] is True
                view = (await h.http.get(f"/v1/runs/{run_id}/session")).json()
                assert view["connectionEpoch"] == 1
            async with h.wire(token) as stale:
                frame = await stale.call(
                    "runtime.session.attach.command",
                    {
                        "runId": run_id,
                        "runtimeInstanceId": "rt-old",
                        "protocolVersion": "v1",
                        "reconnect": True,
                        "connectionEpoch": 0,
                    },
                )
                assert error_code(frame) == "stale_epoch"


async def test_lease_expires_then_recovers_within_the_window(tmp_path: Path) -> None:
    async with gateway_for_test(
        tmp_path, heartbeat_interval_ms=1000, lease_misses=1, recovery_window_ms=30_000
    ) as h:
        run_id, token = await h.create_run()
        async with h.wire(token) as wire:
            ids = await attached(h, wire, run_id)
            await trio.sleep(1.3)
            view = (await h.http.get(f"/v1/runs/{run_id}/session")).json()
            assert view["state"] == "expired"
            assert error_code(await wire.call(HEARTBEAT, ids)) == "lease_expired"
            assert error_code(await wire.call(CONFIG, ids)) == "lease_expired"
            back = await wire.attach(run_id, reconnect=True, connectionEpoch=1)
            assert back["sessionId"] == ids["sessionId"]
            assert (await wire.call(HEARTBEAT, ids))["payload"]["accepted"] is True
        metrics = (await h.http.get("/metrics")).text
        assert "agent_gateway_lease_expiries_total 1.0" in metrics


async def test_recover_main_run_and_sub_runs_on_a_new_connection(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h:
        main_id, token = await h.create_run()
        sub_id, _ = await h.create_run(mainRunId=main_id)
        async with h.wire(token) as wire:
            main = await wire.attach(main_id)
            sub = await wire.attach(sub_id)
        async with h.wire(token) as wire:
            recovered = await wire.call(
                RECOVER,
                {
                    "sessionId": main["sessionId"],
                    "mainRunId": main_id,
                    "subRunIds": [sub_id],
                    "connectionEpoch": 1,
                },
            )
            assert recovered["payload"] == {"accepted": True}
            for run_id, reply in ((main_id, main), (sub_id, sub)):
                beat = await wire.call(
                    HEARTBEAT, {"sessionId": reply["sessionId"], "runId": run_id}
                )
                assert beat["payload"]["accepted"] is True


async def test_every_command_before_attach_is_not_attached(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run()
        ids = {"sessionId": "ses_0123456789abcdef", "runId": run_id}
        async with h.wire(token) as wire:
            for channel, payload in [
                (HEARTBEAT, ids),
                (SECRETS, ids),
                (CONFIG, ids),
                (KV_GET, {**ids, "keys": []}),
                (KV_SET, {**ids, "kv": {}}),
                (OUTPUT, {**ids, "events": []}),
                (ACK, {**ids, "seq": 0}),
            ]:
                assert error_code(await wire.call(channel, payload)) == "not_attached", channel


async def test_refusals_with_their_codes(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path, max_frame_bytes=4096) as h:
        run_id, token = await h.create_run()
        other_id, _ = await h.create_run()
        async with h.wire(token) as wire:
            await wire.ws.send_message("{not json")
            unreadable = await wire.recv()
            assert unreadable["id"] is None and error_code(unreadable) == "invalid_frame"
            await wire.ws.send_message(b"\x00\x01binary")
            assert error_code(await wire.recv()) == "invalid_frame"
            assert error_code(await wire.call("no.such.channel", {})) == "unknown_channel"
            assert error_code(await wire.call("runtime.session.attach.reply", {})) == (
                "unknown_channel"
            )
            missing = await wire.call("runtime.session.attach.command", {"runId": run_id})
            assert error_code(missing) == "invalid_frame"
            assert missing["payload"]["path"].startswith("/payload")
            assert error_code(
                await wire.call(
                    "runtime.session.attach.command",
                    {"runId": other_id, "runtimeInstanceId": "rt", "protocolVersion": "v1"},
                )
            ) == ("forbidden_run")
            assert error_code(
                await wire.call(
                    "runtime.session.attach.command",
                    {"runId": run_id, "runtimeInstanceId": "rt", "protocolVersion": "v9"},
                )
            ) == ("unsupported_version")
            reply = await wire.attach(run_id, replyExtensions=True)
            assert reply["maxFrameBytes"] == 4096  # so runtimes size their frames to fit
            ids = {"sessionId": reply["sessionId"], "runId": run_id}
            wrong = {"sessionId": "ses_ffffffffffffffff", "runId": run_id}
            assert error_code(await wire.call(HEARTBEAT, wrong)) == "session_mismatch"
            big = await wire.call(OUTPUT, {**ids, "events": [event(0, "y" * 5000)]})
            assert error_code(big) == "payload_too_large"
            # Still serving after every refusal:
            assert (await wire.call(HEARTBEAT, ids))["payload"]["accepted"] is True


async def test_a_kv_get_reply_over_max_frame_bytes_is_refused_not_sent(tmp_path: Path) -> None:
    """Each value fits a frame, all of them together do not: the runtime must ask for fewer."""
    async with gateway_for_test(tmp_path, max_frame_bytes=4096) as h:
        run_id, token = await h.create_run(capabilities=["kv.read", "kv.write"])
        async with h.wire(token) as wire:
            ids = await attached(h, wire, run_id, capabilities=["kv.read", "kv.write"])
            for key in ("a", "b", "c"):
                value = {**ids, "kv": {key: "\u00e9" * 900}}
                await wire.ws.send_message(utf8_frame(KV_SET, key, value))
                assert (await wire.answer(key))["payload"] == {"accepted": True}
            # 2 700 characters, but 5 400 bytes of value on the wire:
            too_big = await wire.call(KV_GET, {**ids, "keys": ["a", "b", "c"]})
            assert error_code(too_big) == "payload_too_large"
            assert too_big["payload"]["retryable"] is False
            fits = await wire.call(KV_GET, {**ids, "keys": ["a", "b"]})
            assert fits["payload"]["kv"] == {"a": "\u00e9" * 900, "b": "\u00e9" * 900}
        metrics = (await h.http.get("/metrics")).text
        assert 'code="payload_too_large"} 1.0' in metrics


async def test_a_frame_over_the_hard_limit_in_bytes_closes_with_1009(tmp_path: Path) -> None:
    """The hard limit (twice maxFrameBytes) is in bytes, though the transport counts characters."""
    async with gateway_for_test(tmp_path, max_frame_bytes=4096) as h:
        run_id, token = await h.create_run(capabilities=["kv.write"])
        async with h.wire(token) as wire:
            ids = await attached(h, wire, run_id, capabilities=["kv.write"])
            # 4 500 characters (under the transport's 8 192), 13 500 bytes (over the hard limit).
            big = {**ids, "kv": {"k": "\u20ac" * 4500}}
            await wire.ws.send_message(utf8_frame(KV_SET, "big", big))
            with pytest.raises(ConnectionClosed) as closed:
                await wire.ws.get_message()
            assert close_code(closed.value) == 1009


async def test_rate_limit(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path, command_rate=1.0, command_burst=3.0) as h:
        run_id, token = await h.create_run()
        async with h.wire(token) as wire:
            ids = await attached(h, wire, run_id)
            codes = []
            for _ in range(4):
                frame = await wire.call(HEARTBEAT, ids)
                codes.append(
                    frame["channel"] if "error" not in frame["channel"] else error_code(frame)
                )
            assert codes[-1] == "rate_limited"
            assert codes.count("rate_limited") >= 1


async def test_handshake_refusals(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run()
        for header in (None, "Bearer agt_wrong", "Bearer " + "x" * 300, f"Basic {token}",
                       f"Bearer {token}x", "Bearer", f"Bearer {token[:-1]}"):
            with pytest.raises(ConnectionRejected) as rejected:
                async with h.wire(None, authorization=header):
                    pass
            assert rejected.value.status_code == 401, header
            assert b"unauthorized" in (rejected.value.body or b"")
        assert (await h.http.delete(f"/v1/runs/{run_id}")).status_code == 204
        with pytest.raises(ConnectionRejected) as revoked:
            async with h.wire(token):
                pass
        assert revoked.value.status_code == 401


async def test_revocation_closes_the_connection(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run()
        async with h.wire(token) as wire:
            await wire.attach(run_id)
            assert (await h.http.delete(f"/v1/runs/{run_id}")).status_code == 204
            with pytest.raises(ConnectionClosed) as closed:
                await wire.recv(timeout=5)
            assert close_code(closed.value) == 4002


async def _write_held_at_the_store(
    wire: Wire, main_id: str, sub_id: str, write: str, at_door: trio.Event
) -> str:
    """Attach the main run and its sub-run on one link, send the sub-run's write (`publish` or
    `kv.set`), and return its request id once the store holds it at its door."""
    await wire.attach(main_id, connectionEpoch=1)
    sub = await wire.attach(sub_id, connectionEpoch=1, capabilities=["kv.write"])
    ids = {"sessionId": sub["sessionId"], "runId": sub_id}
    if write == "publish":
        event = {"eventId": "late", "seq": 0, "type": "t", "data": {},
                 "timestamp": "2026-01-01T00:00:00.000Z"}
        request = await wire.send(OUTPUT, {**ids, "events": [event]})
    else:
        request = await wire.send(KV_SET, {**ids, "kv": {"late": "1"}})
    with trio.fail_after(10):
        await at_door.wait()
    return request


@pytest.mark.parametrize("write", ["publish", "kv.set"])
async def test_a_write_waiting_on_the_store_when_its_sub_run_is_revoked_is_not_stored(
    tmp_path: Path, write: str
) -> None:
    # The sub-run rides on its main run's connection, which stays open after the sub-run's
    # revoke. A write the core decided before hearing of the revoke reaches the store after the
    # revoke committed (here held at the store's door until the platform has its 204): it must
    # be refused there, not stored for a dead run and answered accepted after the revoke.
    async with gateway_for_test(tmp_path) as h:
        main_id, token = await h.create_run(capabilities=["kv.read", "kv.write"])
        sub_id, _ = await h.create_run(capabilities=["kv.read", "kv.write"], mainRunId=main_id)
        store = h.running.service.store
        at_door, revoked = trio.Event(), trio.Event()
        name = "append_outputs" if write == "publish" else "kv_set"
        original = getattr(store, name)

        async def held(run_id: str, *args: Any) -> Any:
            if run_id == sub_id:
                at_door.set()
                await revoked.wait()
            return await original(run_id, *args)

        setattr(store, name, held)
        async with h.wire(token) as wire:
            request = await _write_held_at_the_store(wire, main_id, sub_id, write, at_door)
            assert (await h.http.delete(f"/v1/runs/{sub_id}")).status_code == 204
            revoked.set()
            answer = await wire.answer(request)
            assert error_code(answer) == "forbidden_run"
            # The main run's session on the same link goes on.
            assert (await wire.call(HEARTBEAT, {"sessionId": (await wire.attach(
                main_id, connectionEpoch=2))["sessionId"], "runId": main_id}))["channel"] \
                == "runtime.session.heartbeat.reply"
        assert await store.read_outputs(sub_id, -1, 10) == []
        assert await store.kv_get(sub_id, ["late"]) == {}


@pytest.mark.parametrize("write", ["publish", "kv.set"])
async def test_a_write_the_store_refuses_for_a_revoke_the_core_has_not_heard_of_is_forbidden(
    tmp_path: Path, write: str
) -> None:
    # The revoke and the write commit in one group (the revoke first) and both tasks wake in
    # the same turn, which trio may run in either order: here the write's answer reaches the
    # core before the revoke does. The store refused it for the revoke, not for an epoch, so the
    # runtime must hear forbidden_run (its run is gone), not stale_epoch (another instance
    # took it), which a client takes as superseded.
    async with gateway_for_test(tmp_path) as h:
        main_id, token = await h.create_run(capabilities=["kv.read", "kv.write"])
        sub_id, _ = await h.create_run(capabilities=["kv.read", "kv.write"], mainRunId=main_id)
        store = h.running.service.store
        at_door, committed, answered = trio.Event(), trio.Event(), trio.Event()
        name = "append_outputs" if write == "publish" else "kv_set"
        original, revoke_run = getattr(store, name), store.revoke_run

        async def held(run_id: str, *args: Any) -> Any:
            if run_id != sub_id:
                return await original(run_id, *args)
            at_door.set()
            await committed.wait()
            try:
                return await original(run_id, *args)
            finally:
                answered.set()  # the core hears this answer before this task yields again

        async def revoke_heard_late(run_id: str) -> bool:
            revoked = await revoke_run(run_id)
            committed.set()
            await answered.wait()
            return revoked

        setattr(store, name, held)
        setattr(store, "revoke_run", revoke_heard_late)  # noqa: B010
        async with h.wire(token) as wire:
            request = await _write_held_at_the_store(wire, main_id, sub_id, write, at_door)
            assert (await h.http.delete(f"/v1/runs/{sub_id}")).status_code == 204
            assert error_code(await wire.answer(request)) == "forbidden_run"
        assert await store.read_outputs(sub_id, -1, 10) == []
        assert await store.kv_get(sub_id, ["late"]) == {}


async def test_drain_tells_runtimes_to_reconnect(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run()
        async with h.wire(token) as wire:
            await wire.attach(run_id)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(h.running.service.drain)
                with pytest.raises(ConnectionClosed) as closed:
                    await wire.recv(timeout=5)
            assert close_code(closed.value) == 1012


@pytest.mark.parametrize("text", ["7" * 1500, "\U0001f600" * 700], ids=["ascii", "emoji"])
async def test_big_input_batches_are_split_into_frames_that_fit(
    tmp_path: Path, text: str
) -> None:
    """The limit is in bytes: 700 emoji are 700 characters but 2 800 bytes on the wire."""
    async with gateway_for_test(tmp_path, max_frame_bytes=4096) as h:
        run_id, token = await h.create_run()
        inputs = [{"type": "chunk", "data": {"text": text}} for n in range(10)]
        posted = await h.http.post(f"/v1/runs/{run_id}/inputs", json={"events": inputs})
        assert posted.status_code == 202, posted.text
        async with h.wire(token) as wire:
            await wire.attach(run_id)
            seqs: list[int] = []
            while len(seqs) < 10:
                raw = await wire.ws.get_message()
                assert isinstance(raw, str) and len(raw.encode("utf-8")) <= 4096
                frame = json.loads(raw)
                assert frame["channel"] == INPUT
                seqs += [e["seq"] for e in frame["payload"]["events"]]
            assert seqs == list(range(10))


async def test_deliveries_of_a_run_with_the_longest_id_have_valid_frame_ids(
    tmp_path: Path,
) -> None:
    """`in-<runId>-<seq>` would be 73 characters here; an envelope id holds 64."""
    long_run_id = "run_" + "A" * 64  # the longest runId identity.json allows
    async with gateway_for_test(tmp_path, max_frame_bytes=4096) as h:
        run_id, token = await h.create_run(runId=long_run_id)
        inputs = [{"type": "chunk", "data": {"text": "7" * 1500}} for n in range(4)]
        posted = await h.http.post(f"/v1/runs/{run_id}/inputs", json={"events": inputs})
        assert posted.status_code == 202, posted.text
        async with h.wire(token) as wire:
            await wire.attach(run_id)
            ids: list[str] = []
            seqs: list[int] = []
            while len(seqs) < 4:  # split into several frames: both ways of naming one are used
                raw = await wire.ws.get_message()
                channel, frame_id, delivery = decode_server_frame(raw)  # the runtime's check
                assert channel is Channel.INPUT and frame_id is not None
                ids.append(frame_id)
                seqs += [e.seq for e in delivery.events]
            assert seqs == list(range(4))
            assert len(ids) > 1 and len(set(ids)) == len(ids)


async def test_a_runtime_that_starts_over_learns_where_the_log_goes_on(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run()
        async with h.wire(token) as wire:
            reply = await wire.attach(run_id, replyExtensions=True)
            assert reply["nextOutputSeq"] == 0
            ids = {"sessionId": reply["sessionId"], "runId": run_id}
            await wire.call(OUTPUT, {**ids, "events": [event(0), event(1), event(2)]})
        # A new runtime process (a new attempt) that does not know the log's position:
        async with h.wire(token) as wire:
            reply = await wire.attach(
                run_id, runtimeInstanceId="rt-2", connectionEpoch=1, replyExtensions=True
            )
            assert reply["nextOutputSeq"] == 3
            ids = {"sessionId": reply["sessionId"], "runId": run_id}
            restart = {**event(0, "new work"), "eventId": "evt-fresh-0"}
            conflict = await wire.call(OUTPUT, {**ids, "events": [restart]})
            assert error_code(conflict) == "seq_conflict"
            assert "3" in conflict["payload"]["message"]
            resumed = {**restart, "seq": reply["nextOutputSeq"]}
            assert (await wire.call(OUTPUT, {**ids, "events": [resumed]}))["payload"]["accepted"]
        assert [e["eventId"] for e in await outputs(h, run_id)] == [
            "evt-0", "evt-1", "evt-2", "evt-fresh-0"]


# --- a connection closed while its task carries out the core's effects --------------------------


async def test_a_command_whose_connection_is_closed_midway_still_reaches_the_core(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Superseded (4001) while its kv.set waits on the store: the write's answer still reaches
    the core, which would otherwise keep the command pending (and its connection counted) forever.
    """
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run()
        service = h.running.service
        kv_set = service.store.kv_set

        async def busy_disk(*args: Any, **kwargs: Any) -> Any:
            await trio.sleep(0.3)
            return await kv_set(*args, **kwargs)

        monkeypatch.setattr(service.store, "kv_set", busy_disk)
        for round_ in range(3):
            async with h.wire(token) as old, h.wire(token) as new:
                reply = await old.attach(run_id, connectionEpoch=2 * round_ + 1,
                                         capabilities=["kv.write"])
                await old.send(KV_SET, {"sessionId": reply["sessionId"], "runId": run_id,
                                        "kv": {"round": str(round_)}})
                await trio.sleep(0.1)  # the write is on its way to the store
                await new.attach(run_id, connectionEpoch=2 * round_ + 2, reconnect=True)
                with trio.fail_after(10):
                    while service.hub.pending:
                        await trio.sleep(0.05)
        assert service.hub.pending == {}


async def test_effects_after_a_cancelled_send_are_still_carried_out(tmp_path: Path) -> None:
    """A reply stuck on a peer that does not read is cancelled (the connection is closing); the
    timer the core armed in the same step must still be armed, or the lease would never expire.
    """
    async with gateway_for_test(tmp_path) as h:
        service = h.running.service
        sending = trio.Event()

        class NeverReads:
            async def send_message(self, message: str) -> None:
                sending.set()
                await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            link = Link(999, NeverReads(), 4, nursery)  # type: ignore[arg-type]
            service.links[999] = link
            reply = SendReply(999, "r1", HeartbeatResponse(True, Millis(0)))
            later = Millis(service.clock.now() + 3_600_000)
            effects: list[Effect] = [reply, ArmTimer("run_armedAfterSend", later)]
            nursery.start_soon(service.execute, effects, 999)
            await sending.wait()
            nursery.cancel_scope.cancel()
        service.links.pop(999)
        assert "run_armedAfterSend" in service.timers._due


async def test_a_connection_whose_handling_fails_is_closed_1011_and_others_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with gateway_for_test(tmp_path) as h:
        doomed_run, doomed_token = await h.create_run()
        other_run, other_token = await h.create_run()
        hub = h.running.service.hub
        handle = hub.handle

        def fails_on_heartbeats(event: Any) -> Any:  # a bug, as any unexpected exception
            if isinstance(event, CommandReceived) and isinstance(event.command, HeartbeatCommand):
                raise RuntimeError("injected fault")
            return handle(event)

        async with h.wire(doomed_token) as doomed, h.wire(other_token) as other:
            ids = await attached(h, doomed, doomed_run)
            other_ids = await attached(h, other, other_run)
            monkeypatch.setattr(hub, "handle", fails_on_heartbeats)
            await doomed.send(HEARTBEAT, ids)
            with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
                await doomed.ws.get_message()
            reason = closed.value.reason
            assert reason is not None and reason.code == 1011  # reconnect, not "on purpose"
            monkeypatch.setattr(hub, "handle", handle)
            assert (await other.call(HEARTBEAT, other_ids))["payload"]["accepted"] is True
        assert "runtime connection failed" in caplog.text
        registry = h.running.service.metrics.registry
        assert registry.get_sample_value("agent_gateway_closes_total", {"code": "1011"}) == 1


# --- admission --------------------------------------------------------------------------------


async def test_handshakes_arriving_together_do_not_overshoot_max_sessions(tmp_path: Path) -> None:
    """The capacity check is followed by a token lookup and the upgrade: handshakes in between
    count too, or a burst is admitted whole (8 of 8 with --max-sessions 2)."""
    async with gateway_for_test(tmp_path, max_sessions=2) as h:
        # A run each: the per-run cap (half of --max-sessions) must not be what refuses them.
        tokens = [(await h.create_run())[1] for _ in range(8)]
        accepted: list[int] = []
        refused: list[int] = []
        peak = 0
        release = trio.Event()

        async def knock(token: str) -> None:
            try:
                async with open_websocket_url(
                    h.running.runtime_url, ssl_context=h.ca.client_context(),
                    extra_headers=[(b"authorization", f"Bearer {token}".encode())],
                ):
                    accepted.append(1)
                    await release.wait()
            except ConnectionRejected as rejected:
                refused.append(rejected.status_code)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for token in tokens:
                    nursery.start_soon(knock, token)
                while len(accepted) + len(refused) < 8:
                    peak = max(peak, len(h.running.service.links))
                    await trio.sleep(0.005)
                release.set()
        assert len(accepted) == 2 and peak <= 2
        assert refused == [503] * 6


async def test_a_store_failure_during_the_token_lookup_is_a_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run()

        async def failing(token_hash: bytes) -> str | None:
            raise StoreError("database is locked")

        lookup = h.running.service.store.run_for_token
        monkeypatch.setattr(h.running.service.store, "run_for_token", failing)
        with pytest.raises(ConnectionRejected) as refused:
            async with h.wire(token):
                pass  # pragma: no cover - the handshake must be refused
        assert refused.value.status_code == 503  # retry, not "your token is wrong" (401)
        assert b"store-unavailable" in (refused.value.body or b"")
        monkeypatch.setattr(h.running.service.store, "run_for_token", lookup)
        async with h.wire(token) as wire:
            await wire.attach(run_id)


async def test_a_runtime_admitted_as_the_drain_begins_is_told_to_reconnect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain closes the links it sees; one still in its upgrade then must not be served."""
    async with gateway_for_test(tmp_path) as h:
        _, token = await h.create_run()
        service = h.running.service
        authenticate = service.authenticate

        async def drain_begins_meanwhile(token: str) -> str | None:
            principal = await authenticate(token)
            service.draining = True
            return principal

        monkeypatch.setattr(service, "authenticate", drain_begins_meanwhile)
        async with h.wire(token) as wire:
            with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
                await wire.ws.get_message()
        reason = closed.value.reason
        assert reason is not None and reason.code == 1012
        assert not service.links
        service.draining = False


# --- metrics ------------------------------------------------------------------------------------


async def sessions_by_state(h: Harness) -> dict[str, float]:
    """The agent_gateway_sessions gauge, as /metrics shows it."""
    registry = h.running.service.metrics.registry
    return {state.value: registry.get_sample_value("agent_gateway_sessions",
                                                   {"state": state.value}) or 0.0
            for state in SessionState}


async def test_the_sessions_gauge_counts_new_and_restored_sessions(tmp_path: Path) -> None:
    """A tally kept by state changes went negative (a first attach has no 'old' state to leave)
    and missed sessions restored after a restart (restoring reports no change)."""
    timing = {"heartbeat_interval_ms": 1000, "lease_misses": 1, "recovery_window_ms": 60_000}
    async with gateway_for_test(tmp_path, **timing) as h:
        run_id, token = await h.create_run()
        for _ in range(3):
            other, other_token = await h.create_run()
            async with h.wire(other_token) as wire:
                await wire.attach(other)
        async with h.wire(token) as wire:
            await wire.attach(run_id)
            counts = await sessions_by_state(h)
            assert counts["leased"] == 4 and counts["detached"] == 0, counts
    async with gateway_for_test(tmp_path, **timing) as h:  # a restart on the same data
        assert (await sessions_by_state(h))["leased"] == 4
        await trio.sleep(1.5)  # the restored leases run out
        counts = await sessions_by_state(h)
        assert counts["expired"] == 4 and counts["leased"] == 0, counts


async def test_ipv6_hosts_are_bracketed_in_the_urls_given_out(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path, host="::", control_host="::1") as h:
        runtime, control = urlsplit(h.running.runtime_url), urlsplit(h.running.control_url)
        assert (runtime.hostname, control.hostname) == ("::", "::1")
        assert h.running.runtime_url == f"wss://[::]:{runtime.port}/runtime"
        assert h.running.control_url == f"http://[::1]:{control.port}"
        # Both URLs lead where the gateway listens (the harness's client uses the control URL).
        assert (await h.http.get("/healthz")).status_code == 200
        assert runtime.port is not None
        await (await trio.open_tcp_stream("::1", runtime.port)).aclose()


async def test_a_long_poll_in_flight_when_the_gateway_stops_is_answered(tmp_path: Path) -> None:
    """The drain answers it, and the control API stops only after that answer went out."""
    ca = CertificateAuthority(tmp_path)
    got: list[httpx.Response] = []
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    run: dict[str, Any] = {"capabilities": [], "secrets": {}, "config": {}}
    async with (
        httpx.AsyncClient(headers=headers, timeout=30) as http,
        trio.open_nursery() as outer,
        open_gateway(settings_for(tmp_path, ca)) as running,  # left first: drained, stopped
    ):
        url = running.control_url
        created = await http.post(f"{url}/v1/runs", json=run)
        run_id = created.json()["runId"]

        async def poll() -> None:
            outputs = f"{url}/v1/runs/{run_id}/outputs"
            got.append(await http.get(outputs, params={"wait": 60}))

        outer.start_soon(poll)
        with trio.fail_after(10):
            while run_id not in running.service._output_polls:
                await trio.sleep(0.01)
    assert got[0].status_code == 200
    assert got[0].json() == {"events": [], "next": -1}


async def test_a_session_attached_before_a_restart_can_be_recovered_after_it(
    tmp_path: Path,
) -> None:
    """With the real store: what it keeps of a granted attach lets the session be resumed."""
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run()
        async with h.wire(token) as wire:
            ids = await attached(h, wire, run_id)
            assert (await wire.call(HEARTBEAT, ids))["payload"]["accepted"] is True
    async with gateway_for_test(tmp_path) as h, h.wire(token) as wire:  # the same data dir
        command = {"sessionId": ids["sessionId"], "mainRunId": run_id, "connectionEpoch": 1}
        recovered = await wire.call(RECOVER, command)
        assert recovered["payload"] == {"accepted": True}
        assert (await wire.call(HEARTBEAT, ids))["payload"]["accepted"] is True


async def test_a_delivery_split_into_frames_is_not_overtaken_by_a_later_one(
    tmp_path: Path,
) -> None:
    """Input frames reach the runtime in seq order, whichever task delivers them.

    The redelivery after an attach is sent by the connection's own task, frame by frame when a
    batch is split to fit `maxFrameBytes`. While the runtime was slow to take its first frame,
    the platform posted another input, which the platform's task queued for the connection's
    writer: the writer got the stream between the own task's frames, and the runtime saw seqs
    0, 2, 1. The client takes a seq at or below the highest seen for a redelivery and drops it,
    then acknowledges past it: seq 1 would never be handled. Found by a randomized shell
    explorer (slow readers, inputs big enough to split, the platform posting all along).
    """
    async with gateway_for_test(tmp_path, max_frame_bytes=4096) as h:
        run_id, _ = await h.create_run()
        service = h.running.service
        now = service.clock.now()
        # Two inputs that fit a frame each but not together: a delivery of two frames.
        await service.post_inputs(run_id, [
            NewInput(f"in-{n}", "chunk", {"text": "x" * 2500}, now) for n in range(2)])
        peer = PeerReadingLater()
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(service.serve_connection, peer, run_id)
                attach = {"runId": run_id, "runtimeInstanceId": "rt-1", "protocolVersion": "v1"}
                await peer.inbox.send(json.dumps({"channel": "runtime.session.attach.command",
                                                  "id": "a1", "payload": attach}))
                await peer.stuck.wait()  # the first frame of the redelivery is on its way
                await service.post_inputs(run_id, [NewInput("in-2", "chunk", {"n": 2}, now)])
                await trio.testing.wait_all_tasks_blocked()  # everyone waits for the runtime
                peer.reading.set()
                while len(peer.delivered()) < 3:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        assert peer.delivered() == [0, 1, 2]


async def test_a_delivery_decided_first_is_sent_first_whichever_task_decided_it(
    tmp_path: Path,
) -> None:
    """A recover redelivers to each run in turn; the platform's posts must not jump the line.

    The connection's own task read the sub-run's unacked input while it was still waiting for
    the runtime to take the main run's redelivery, so the sub-run's delivery waited behind it
    in that task. Meanwhile the platform posted the sub-run another input, which its task
    delivered at once: the runtime saw the sub-run's seq 1 before its seq 0 (and the client
    drops a seq below the highest seen, acknowledging past it). Found by a randomized shell
    explorer (recovers of main runs with sub-runs, slow readers, the platform posting).
    """
    async with gateway_for_test(tmp_path) as h:
        main, token = await h.create_run()
        posted = await h.http.post("/v1/runs", json={
            "capabilities": [], "secrets": {}, "config": {}, "mainRunId": main})
        assert posted.status_code == 201, posted.text
        sub = posted.json()["runId"]
        async with h.wire(token) as wire:  # a connection that drops, leaving both recoverable
            session_id = (await wire.attach(main, connectionEpoch=1))["sessionId"]
            await wire.attach(sub, connectionEpoch=1)
        service = h.running.service
        now = service.clock.now()
        for run_id in (main, sub):
            await service.post_inputs(run_id, [NewInput(f"{run_id}-0", "t", {}, now)])
        peer = PeerReadingLater()
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(service.serve_connection, peer, main)
                recover = {"sessionId": session_id, "mainRunId": main, "subRunIds": [sub],
                           "connectionEpoch": 2}
                await peer.inbox.send(json.dumps({"channel": RECOVER, "id": "r1",
                                                  "payload": recover}))
                await peer.stuck.wait()  # the main run's redelivery is on its way
                await trio.testing.wait_all_tasks_blocked()  # the sub-run's input was read
                await service.post_inputs(sub, [NewInput(f"{sub}-1", "t", {}, now)])
                await trio.testing.wait_all_tasks_blocked()
                peer.reading.set()
                while len(peer.delivered()) < 3:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        assert peer.sent[0]["payload"] == {"accepted": True}
        subs = [e["seq"] for frame in peer.sent if frame["channel"] == INPUT
                and frame["payload"]["runId"] == sub for e in frame["payload"]["events"]]
        assert subs == [0, 1]


async def test_a_recover_of_more_runs_than_the_queue_holds_is_not_closed_as_a_slow_consumer(
    tmp_path: Path,
) -> None:
    """A recover's redeliveries go through the link's bounded queue one batch at a time.

    The connection's own task read every run's unacked inputs before waiting for the first
    delivery to be sent, queuing one delivery per run at store speed: a recover of more runs
    than `--outbound-queue` holds filled the queue before the runtime could take a frame, and
    the runtime, reading all along, was closed 4003 (again on every retry of the recover). When
    those deliveries were sent directly, the task waited for each. Found by review of the change
    that queues them as decided.
    """
    async with gateway_for_test(tmp_path, outbound_queue=2) as h:
        main, token = await h.create_run()
        subs = []
        for _ in range(3):
            posted = await h.http.post("/v1/runs", json={
                "capabilities": [], "secrets": {}, "config": {}, "mainRunId": main})
            assert posted.status_code == 201, posted.text
            subs.append(posted.json()["runId"])
        async with h.wire(token) as wire:  # a connection that drops, leaving all recoverable
            session_id = (await wire.attach(main, connectionEpoch=1))["sessionId"]
            for sub in subs:
                await wire.attach(sub, connectionEpoch=1)
        service = h.running.service
        now = service.clock.now()
        stored = {}
        for run_id in (main, *subs):
            await service.post_inputs(run_id, [NewInput(f"{run_id}-0", "t", {}, now)])
            stored[run_id] = await service.store.read_inputs(run_id, -1, 100)
        read_inputs = service.store.read_inputs

        async def read_without_threads(run_id: str, after_seq: int, limit: int) -> Any:
            # What the store answers, without a worker thread: wait_all_tasks_blocked then
            # means every read the gateway could start has been answered.
            await trio.lowlevel.checkpoint()
            return tuple(e for e in stored[run_id] if e.seq > after_seq)[:limit]

        setattr(service.store, "read_inputs", read_without_threads)  # noqa: B010
        peer = PeerReadingLater()
        try:
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(service.serve_connection, peer, main)
                    recover = {"sessionId": session_id, "mainRunId": main, "subRunIds": subs,
                               "connectionEpoch": 2}
                    await peer.inbox.send(json.dumps({"channel": RECOVER, "id": "r1",
                                                      "payload": recover}))
                    await peer.stuck.wait()  # the main run's redelivery is on its way
                    await trio.testing.wait_all_tasks_blocked()
                    peer.reading.set()  # a runtime that reads, only not at store speed
                    while len(peer.delivered()) < 4 and service.links:
                        await trio.sleep(0.01)
                    nursery.cancel_scope.cancel()
        finally:
            setattr(service.store, "read_inputs", read_inputs)  # noqa: B010
        assert not peer.torn, "the connection was closed 4003 mid-delivery"
        assert peer.sent[0]["payload"] == {"accepted": True}
        runs = [frame["payload"]["runId"] for frame in peer.sent if frame["channel"] == INPUT]
        assert runs == [main, *subs]


async def test_a_delivery_split_into_more_frames_than_the_queue_holds_reaches_a_reading_runtime(
    tmp_path: Path,
) -> None:
    """The connection's own frames do not count toward `--outbound-queue`: it waits for them.

    A redelivery split into three frames went into a queue of one frame all at once, before the
    writer could take any: the runtime, reading all along, was closed 4003 as a slow consumer,
    and again on every reconnect. Found by reviewing the change that queues every delivery.
    """
    async with gateway_for_test(tmp_path, max_frame_bytes=4096, outbound_queue=1) as h:
        run_id, _ = await h.create_run()
        service = h.running.service
        now = service.clock.now()
        await service.post_inputs(run_id, [
            NewInput(f"in-{n}", "chunk", {"text": "x" * 2500}, now) for n in range(3)])
        peer = PeerReadingLater()
        peer.reading.set()  # a runtime that takes every frame at once
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(service.serve_connection, peer, run_id)
                attach = {"runId": run_id, "runtimeInstanceId": "rt-1", "protocolVersion": "v1"}
                await peer.inbox.send(json.dumps({"channel": "runtime.session.attach.command",
                                                  "id": "a1", "payload": attach}))
                while len(peer.delivered()) < 3 and peer.close_code is None:
                    await trio.sleep(0.01)
                closed = peer.close_code  # before the test's own cancel closes it (1000)
                nursery.cancel_scope.cancel()
        assert closed is None
        assert peer.delivered() == [0, 1, 2]


async def test_a_posted_delivery_split_into_more_frames_than_the_queue_holds_reaches_the_runtime(
    tmp_path: Path,
) -> None:
    """A delivery the platform's post sends goes into the queue whole, however it was split.

    Its frames went in one by one, before the writer could take any, each checked against
    `--outbound-queue`: a delivery split into more frames than the queue holds closed a reading
    runtime 4003, on every such post. Found by reviewing the change that stopped counting the
    connection's own frames (the same delivery, sent by another task).
    """
    async with gateway_for_test(tmp_path, max_frame_bytes=4096, outbound_queue=1) as h:
        run_id, _ = await h.create_run()
        service = h.running.service
        peer = PeerReadingLater()
        peer.reading.set()  # a runtime that takes every frame at once
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(service.serve_connection, peer, run_id)
                attach = {"runId": run_id, "runtimeInstanceId": "rt-1", "protocolVersion": "v1"}
                await peer.inbox.send(json.dumps({"channel": "runtime.session.attach.command",
                                                  "id": "a1", "payload": attach}))
                while not peer.sent:  # attached: the post's task delivers, not the connection's
                    await trio.sleep(0.01)
                now = service.clock.now()
                await service.post_inputs(run_id, [
                    NewInput(f"in-{n}", "chunk", {"text": "x" * 2500}, now) for n in range(3)])
                while len(peer.delivered()) < 3 and peer.close_code is None:
                    await trio.sleep(0.01)
                closed = peer.close_code  # before the test's own cancel closes it (1000)
                nursery.cancel_scope.cancel()
        assert peer.sent[0]["payload"]["sessionId"]
        assert closed is None
        assert peer.delivered() == [0, 1, 2]
