"""The runtime client against a real gateway over TLS: every method, and every way a link ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
from e2e_support import Harness, gateway_for_test

from gateway.chaos import ChaosProxy
from gateway.client import (
    ConnectError,
    ConnectionState,
    GatewayError,
    GatewaySession,
    OutputDraft,
    Rejected,
    Revoked,
    Superseded,
    connect,
)
from statemachine.messages import ErrorCode, InputEvent

FAST: dict[str, Any] = {"reconnect_backoff": (0.02, 0.2), "ack_delay": 0.01}
ALL = ["secrets.read", "kv.read", "kv.write"]


@asynccontextmanager
async def client(h: Harness, token: str, run_id: str, url: str | None = None,
                 **options: Any) -> AsyncIterator[GatewaySession]:
    values: dict[str, Any] = {"capabilities": ALL, **FAST, **options}
    async with connect(url or h.running.runtime_url, token=token, run_id=run_id,
                       ssl_context=h.ca.client_context(), **values) as session:
        yield session


async def post_inputs(h: Harness, run_id: str, *numbers: int) -> None:
    response = await h.http.post(f"/v1/runs/{run_id}/inputs", json={
        "events": [{"type": "task.input", "data": {"n": n}} for n in numbers]})
    assert response.status_code == 202, response.text


async def stored_outputs(h: Harness, run_id: str) -> list[dict[str, Any]]:
    response = await h.http.get(f"/v1/runs/{run_id}/outputs", params={"after": -1})
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


async def take(session: GatewaySession, count: int, timeout: float = 10) -> list[InputEvent]:
    """The next `count` inputs; the last one stays unprocessed (the loop breaks on it)."""
    got: list[InputEvent] = []
    with trio.fail_after(timeout):
        async for event in session.inputs():
            got.append(event)
            if len(got) == count:
                break
    return got


async def test_every_method_against_a_real_gateway(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run(
            capabilities=ALL,
            secrets={"API_KEY": "s3cr3t", "OTHER": "other"},
            config={"model": "m1", "temperature": 0.5},
            configVersion="cfg-9",
        )
        states: list[ConnectionState] = []
        async with client(h, token, run_id, on_state=states.append) as s:
            assert s.session_id.startswith("ses_")
            assert s.run_id == run_id
            assert s.config_version == "cfg-9"
            assert await s.get_config() == {"model": "m1", "temperature": 0.5}
            assert await s.get_secrets(["API_KEY", "MISSING"]) == {"API_KEY": "s3cr3t"}
            assert await s.get_secrets() == {"API_KEY": "s3cr3t", "OTHER": "other"}
            await s.kv_set({"a": "1", "b": "2"})
            assert await s.kv_get(["a", "b", "c"]) == {"a": "1", "b": "2"}

            assert await s.publish([("log.line", {"text": "a"}),
                                    OutputDraft("log.line", {"text": "b"})]) == [0, 1]
            assert await s.publish(OutputDraft("result", {"ok": True})) == [2]
            stored = await stored_outputs(h, run_id)
            assert [(e["seq"], e["type"], e["data"]) for e in stored] == [
                (0, "log.line", {"text": "a"}), (1, "log.line", {"text": "b"}),
                (2, "result", {"ok": True})]

            await post_inputs(h, run_id, 0, 1, 2)
            got = await take(s, 3)
            assert [e.data["n"] for e in got] == [0, 1, 2]
            assert [e.seq for e in got] == sorted(e.seq for e in got)
        assert states == ["connecting", "attached", "closed"]

        # 0 and 1 were processed and acknowledged; the loop broke on 2, so 2 comes again.
        await post_inputs(h, run_id, 3)
        # A new process knows nothing of the log (the gateway tells it where the log goes on) nor
        # of its predecessor's epoch (its default, the wall clock in ms, is higher).
        async with client(h, token, run_id) as s:
            assert [e.data["n"] for e in await take(s, 2)] == [2, 3]
            assert await s.publish([("log.line", {"text": "c"})]) == [3]
        assert [e["seq"] for e in await stored_outputs(h, run_id)] == [0, 1, 2, 3]


async def test_capability_not_granted_is_a_gateway_error(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run(capabilities=["kv.read"])
        async with client(h, token, run_id, capabilities=["kv.read"]) as s:
            with pytest.raises(GatewayError) as caught:
                await s.kv_set({"a": "1"})
            assert caught.value.code is ErrorCode.CAPABILITY_DENIED
            assert caught.value.retryable is False
            assert await s.kv_get(["a"]) == {}


async def test_wrong_token_is_rejected(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_id, _ = await h.create_run()
        with pytest.raises(Rejected) as caught:
            async with client(h, "agt_not-the-token", run_id):
                raise AssertionError("must not attach")
        assert caught.value.status_code == 401


async def test_an_untrusted_certificate_says_to_pass_an_ssl_context(tmp_path: Path) -> None:
    """trio-websocket reports a refused certificate as a handshake that never comes."""
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run()
        with pytest.raises(ConnectError) as caught:
            async with connect(h.running.runtime_url, token=token, run_id=run_id,
                               connect_timeout=0.5):  # the system's CAs: not the test's
                raise AssertionError("must not attach")
        assert "pass an ssl_context" in str(caught.value.__cause__)


@asynccontextmanager
async def proxied(h: Harness) -> AsyncIterator[tuple[ChaosProxy, str]]:
    """A chaos proxy in front of the gateway's runtime port, and the URL that goes through it."""
    target = urlsplit(h.running.runtime_url)
    assert target.port is not None
    proxy = ChaosProxy("127.0.0.1", target.port)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve)
        yield proxy, f"wss://localhost:{port}/runtime"
        nursery.cancel_scope.cancel()


async def test_cut_connection_reconnects_and_loses_nothing(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h, proxied(h) as (proxy, url):
        run_id, token = await h.create_run(capabilities=ALL)
        states: list[ConnectionState] = []
        async with client(h, token, run_id, url, on_state=states.append) as s:
            session_id = s.session_id
            assert await s.publish([("log.line", {"i": i}) for i in range(3)]) == [0, 1, 2]
            proxy.cut()
            await post_inputs(h, run_id, 10, 11)  # posted while the runtime may be away
            await s.kv_set({"after": "cut"})
            assert await s.publish([("log.line", {"i": 3})]) == [3]
            assert [e.data["n"] for e in await take(s, 2)] == [10, 11]
            assert s.session_id == session_id  # resumed, not replaced
            assert s.connection_epoch >= 1
        assert "reconnecting" in states
        assert [e["data"]["i"] for e in await stored_outputs(h, run_id)] == [0, 1, 2, 3]
        assert proxy.connections_made >= 2


async def test_stalled_link_is_noticed_by_heartbeats(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path, heartbeat_interval_ms=1000) as h, \
            proxied(h) as (proxy, url):
        run_id, token = await h.create_run(capabilities=ALL)
        async with client(h, token, run_id, url) as s:
            proxy.stall()
            with trio.fail_after(10):
                while s.state != "reconnecting":
                    await trio.sleep(0.05)
            proxy.resume()
            with trio.fail_after(10):
                await s.kv_set({"k": "v"})
                assert await s.kv_get(["k"]) == {"k": "v"}
            assert s.connection_epoch >= 1


async def test_revoking_the_run_stops_the_client(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run()
        async with client(h, token, run_id) as s:
            assert (await h.http.delete(f"/v1/runs/{run_id}")).status_code == 204
            with trio.fail_after(10):
                while s.state != "closed":
                    await trio.sleep(0.02)
            with pytest.raises(Revoked):
                await s.get_config()


async def test_revoking_a_sub_run_stops_its_client_on_the_main_runs_token(
    tmp_path: Path,
) -> None:
    # A main run's token acts for its sub-runs, and revoking only the sub-run leaves that
    # token's link open (no 4002): the client hears forbidden_run instead, and must stop as
    # revoked, not stay attached heartbeating into refusals with its inputs() never ending.
    async with gateway_for_test(tmp_path) as h:
        main_id, token = await h.create_run()
        sub_id, _ = await h.create_run(mainRunId=main_id)
        async with client(h, token, sub_id) as s:
            await s.kv_set({"step": "1"})
            assert (await h.http.delete(f"/v1/runs/{sub_id}")).status_code == 204
            with pytest.raises(Revoked):
                await s.get_config()
            assert s.state == "closed"
            assert isinstance(s.failure, Revoked)
            with pytest.raises(Revoked):
                await take(s, 1)


async def test_a_higher_epoch_supersedes_the_old_client(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path) as h:
        run_id, token = await h.create_run(capabilities=ALL)
        async with client(h, token, run_id) as old:
            await old.kv_set({"owner": "old"})
            # Started later, so its default epoch (the wall clock in ms) is the higher one.
            async with client(h, token, run_id, start_seq=0) as new:
                with trio.fail_after(10):
                    while old.state != "closed":
                        await trio.sleep(0.02)
                with pytest.raises(Superseded):
                    await old.kv_set({"owner": "old again"})
                await new.kv_set({"owner": "new"})
                assert await new.kv_get(["owner"]) == {"owner": "new"}


async def test_publishes_fit_the_gateways_frame_limit(tmp_path: Path) -> None:
    async with gateway_for_test(tmp_path, max_frame_bytes=4096) as h:
        run_id, token = await h.create_run(capabilities=ALL)
        states: list[ConnectionState] = []
        async with client(h, token, run_id, on_state=states.append) as s:
            # About 5.5 KB in all: over the limit in one frame (payload_too_large), so cut in two.
            with trio.fail_after(10):
                drafts = [("log.line", {"text": "x" * 400, "i": i}) for i in range(12)]
                assert await s.publish(drafts) == list(range(12))
                # One event over twice the limit would close the connection with 1009.
                with pytest.raises(GatewayError) as caught:
                    await s.publish([("log.line", {"blob": "y" * 20_000})])
                assert caught.value.code is ErrorCode.PAYLOAD_TOO_LARGE
                assert "4096" in caught.value.message
                assert await s.publish([("log.line", {"i": 12})]) == [12]
        assert [e["data"]["i"] for e in await stored_outputs(h, run_id)] == list(range(13))
        assert "reconnecting" not in states
