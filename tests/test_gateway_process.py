"""The gateway as a process: an independent client speaks to it, and SIGKILL loses nothing acked."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import httpx
import trio
from e2e_support import ADMIN_TOKEN, CertificateAuthority, rotate, served_name
from process_support import GatewayProcess
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

ATTACH = "runtime.session.attach.command"
OUTPUT = "runtime.task.output.event"
KV_SET = "runtime.session.kv.set.command"
KV_GET = "runtime.session.kv.get.command"
HEARTBEAT = "runtime.session.heartbeat.command"


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    """The handshake header that authenticates a runtime."""
    return [(b"authorization", f"Bearer {token}".encode())]


def attach_payload(run_id: str, capabilities: list[str], **more: Any) -> dict[str, Any]:
    """An attach command's payload for the runtime instance these tests play."""
    return {"runId": run_id, "runtimeInstanceId": "rt", "protocolVersion": "v1",
            "capabilities": capabilities, **more}


async def ask(
    ws: WebSocketConnection, channel: str, request_id: str, payload: dict[str, Any]
) -> dict[str, Any]:
    """Send one command as raw JSON; the payload of the frame that answers it (the next one)."""
    await ws.send_message(json.dumps({"channel": channel, "id": request_id, "payload": payload}))
    answer = json.loads(await ws.get_message())
    assert answer["id"] == request_id, answer
    reply: dict[str, Any] = answer["payload"]
    return reply


async def register(control_url: str, **body: Any) -> tuple[str, str]:
    """Create a run through the control API of a gateway process."""
    body.setdefault("capabilities", ["secrets.read", "kv.read", "kv.write"])
    body.setdefault("secrets", {})
    body.setdefault("config", {})
    async with httpx.AsyncClient(
        base_url=control_url, timeout=30, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as http:
        response = await http.post("/v1/runs", json=body)
    assert response.status_code == 201, response.text
    created = response.json()
    return created["runId"], created["runtimeToken"]


def independent_runtime(url: str, token: str, run_id: str, ca_file: str) -> list[dict[str, Any]]:
    """A runtime written with the `websockets` library on asyncio: not our code, not our codec."""
    from websockets.asyncio.client import connect

    async def session() -> list[dict[str, Any]]:
        context = ssl.create_default_context(cafile=ca_file)
        frames: list[dict[str, Any]] = []
        async with connect(
            url, ssl=context, additional_headers={"Authorization": f"Bearer {token}"}
        ) as ws:

            async def call(channel: str, request_id: str, payload: dict[str, Any]) -> None:
                await ws.send(
                    json.dumps({"channel": channel, "id": request_id, "payload": payload})
                )
                while True:
                    frame = json.loads(await ws.recv())
                    frames.append(frame)
                    if frame["id"] == request_id:
                        return

            await call(
                "runtime.session.attach.command",
                "a1",
                {
                    "runId": run_id,
                    "runtimeInstanceId": "independent-1",
                    "protocolVersion": "v1",
                    "capabilities": ["secrets.read", "kv.read", "kv.write"],
                },
            )
            ids = {"sessionId": frames[-1]["payload"]["sessionId"], "runId": run_id}
            await call("runtime.session.heartbeat.command", "h1", ids)
            await call("runtime.session.config.get.command", "c1", ids)
            await call("runtime.session.secrets.get.command", "s1", {**ids, "names": ["PW"]})
            await call("runtime.session.kv.set.command", "k1", {**ids, "kv": {"a": "1"}})
            await call("runtime.session.kv.get.command", "k2", {**ids, "keys": ["a"]})
            await call(
                "runtime.task.output.event",
                "o1",
                {
                    **ids,
                    "events": [
                        {
                            "eventId": "e0",
                            "seq": 0,
                            "type": "log",
                            "data": {"line": "hi"},
                            "timestamp": "2026-11-21T10:00:00Z",
                        }
                    ],
                },
            )
            await call("runtime.session.heartbeat.command", "bad", {"sessionId": 7})
        return frames

    return asyncio.run(session())


async def test_an_independent_websockets_client_speaks_the_protocol(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    gateway = GatewayProcess(tmp_path / "data", ca)
    async with trio.open_nursery() as nursery:
        await gateway.start(nursery)
        run_id, token = await register(
            gateway.control_url, secrets={"PW": "pw-value-1"}, config={"k": "v"}
        )
        frames = await trio.to_thread.run_sync(
            independent_runtime, gateway.runtime_url, token, run_id, str(ca.ca_file)
        )
        by_id = {frame["id"]: frame for frame in frames}
        assert by_id["a1"]["channel"] == "runtime.session.attach.reply"
        assert by_id["h1"]["payload"]["accepted"] is True
        assert by_id["c1"]["payload"] == {"config": {"k": "v"}}
        assert by_id["s1"]["payload"] == {"secrets": {"PW": "pw-value-1"}}
        assert by_id["k1"]["payload"] == {"accepted": True}
        assert by_id["k2"]["payload"] == {"kv": {"a": "1"}}
        assert by_id["o1"]["payload"] == {"accepted": True}
        assert by_id["bad"]["channel"] == "runtime.session.error"
        assert by_id["bad"]["payload"]["code"] == "invalid_frame"
        gateway.terminate()
        assert await gateway.wait() == 0


async def test_sighup_serves_a_rotated_certificate_without_dropping_anyone(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    gateway = GatewayProcess(tmp_path / "data", ca, "--log-format", "json")
    async with trio.open_nursery() as nursery:
        await gateway.start(nursery)
        run_id, token = await register(gateway.control_url)
        async with open_websocket_url(
            gateway.runtime_url, ssl_context=ca.client_context(), extra_headers=bearer(token)
        ) as ws:
            attached = await ask(ws, ATTACH, "a", attach_payload(run_id, []))
            rotate(ca, "rotated")
            gateway.hangup()
            with trio.fail_after(10):
                while not any("SIGHUP: certificate reloaded" in line for line in gateway.output):
                    await trio.sleep(0.02)
            assert await served_name(gateway.runtime_url, ca) == "rotated"
            beat = {"sessionId": attached["sessionId"], "runId": run_id}
            assert (await ask(ws, HEARTBEAT, "h", beat))["accepted"] is True
        gateway.terminate()
        assert await gateway.wait() == 0
    # The log said it too, as JSON lines (`--log-format json`), like every other record.
    records = [json.loads(line) for line in gateway.output if line.startswith("{")]
    assert {"logger": "agent_gateway.tls", "level": "INFO"}.items() <= next(
        r for r in records if r["message"].startswith("certificate reloaded from")
    ).items()
    assert any(r["logger"] == "agent_gateway" and "-> leased" in r["message"] for r in records)


async def test_sigkill_and_restart_lose_nothing_acknowledged(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    data = tmp_path / "data"
    acked_outputs: list[int] = []
    acked_kv: dict[str, str] = {}
    context = ca.client_context()

    async with trio.open_nursery() as nursery:
        first = GatewayProcess(data, ca)
        await first.start(nursery)
        run_id, token = await register(first.control_url)

        async def runtime() -> None:
            try:
                async with open_websocket_url(
                    first.runtime_url, ssl_context=context, extra_headers=bearer(token)
                ) as ws:
                    attached = await ask(ws, ATTACH, "a", attach_payload(run_id, ["kv.write"]))
                    ids = {"sessionId": attached["sessionId"], "runId": run_id}
                    for seq in range(100_000):
                        event = {"eventId": f"e{seq}", "seq": seq, "type": "t",
                                 "data": {"n": seq}, "timestamp": "2026-11-21T10:00:00Z"}
                        payload = {**ids, "events": [event]}
                        if await ask(ws, OUTPUT, f"o{seq}", payload) == {"accepted": True}:
                            acked_outputs.append(seq)
                        key = f"k{seq % 7}"
                        payload = {**ids, "kv": {key: str(seq)}}
                        if await ask(ws, KV_SET, f"k{seq}", payload) == {"accepted": True}:
                            acked_kv[key] = str(seq)
            except (ConnectionClosed, OSError, trio.BrokenResourceError):
                return  # the gateway died under us: that is the point

        async with trio.open_nursery() as inner:
            inner.start_soon(runtime)
            with trio.fail_after(30):
                while len(acked_outputs) < 50:
                    await trio.sleep(0.01)
            first.kill()
        assert await first.wait() != 0

        second = GatewayProcess(data, ca)
        await second.start(nursery)
        async with httpx.AsyncClient(
            base_url=second.control_url,
            timeout=30,
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as http:
            stored = (await http.get(f"/v1/runs/{run_id}/outputs", params={"limit": 1000})).json()[
                "events"
            ]
            seqs = [event["seq"] for event in stored]
            assert seqs == list(range(len(seqs))), "the log is gapless and ordered"
            assert set(acked_outputs) <= set(seqs), "every acknowledged event survived"
            assert len(seqs) == len(set(seqs)), "and exactly once"
        # The runtime comes back (higher epoch) and finds every acknowledged KV write.
        async with open_websocket_url(
            second.runtime_url, ssl_context=context, extra_headers=bearer(token)
        ) as ws:
            comeback = attach_payload(run_id, ["kv.read"], reconnect=True, connectionEpoch=1)
            attached = await ask(ws, ATTACH, "a", comeback)
            ids = {"sessionId": attached["sessionId"], "runId": run_id}
            kv = (await ask(ws, KV_GET, "g", {**ids, "keys": sorted(acked_kv)}))["kv"]
            for key, value in acked_kv.items():
                assert int(kv[key]) >= int(value), f"{key}: acknowledged {value}, found {kv[key]}"
        second.terminate()
        assert await second.wait() == 0
