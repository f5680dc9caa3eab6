"""`agent-gateway demo`: one runtime's whole life against a real gateway, narrated.

A gateway starts on a temporary data directory (SQLite, self-signed TLS). The platform registers
a run through the control API and reads its outputs as they arrive. A runtime, connected through
a loopback proxy that can fail, attaches, heartbeats, reads its config and a secret, uses KV,
streams outputs and receives an input. Then the network stalls long enough for its lease to
expire, while the runtime goes on publishing (the client holds the events until they are durable);
the network comes back, the runtime recovers the same session with a higher epoch, and the
platform ends up with every event exactly once.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from gateway.chaos import ChaosProxy
from gateway.client import ConnectionState, GatewaySession, connect
from gateway.config import Settings
from gateway.embedded import RunningGateway, open_gateway
from statemachine.effects import SessionChanged

EVENTS_BEFORE_CUT = 5
EVENTS_DURING_CUT = 5


def say(who: str, text: str) -> None:
    """One line of narration, tagged with who speaks."""
    print(f"[{who:>8}] {text}", flush=True)


async def run_demo(data_dir: Path | None) -> int:
    """Run the demo; return the process exit code (0 when nothing was lost)."""
    if data_dir is not None:
        return await _demo(data_dir)
    with tempfile.TemporaryDirectory(prefix="agent-gateway-demo-") as scratch:
        return await _demo(Path(scratch))


async def _demo(data_dir: Path) -> int:
    settings = Settings(
        data_dir=data_dir,
        port=0,
        control_port=0,
        dev=True,
        heartbeat_interval_ms=1000,
        lease_misses=2,
        recovery_window_ms=30_000,
        store_sync="normal",
    )
    async with open_gateway(settings) as running:
        say("gateway", f"runtimes: {running.runtime_url}; control API: {running.control_url}")
        say("gateway", f"data directory {data_dir}")
        running.service.observers.append(_narrate)
        async with (
            httpx.AsyncClient(
                base_url=running.control_url,
                headers={"authorization": f"Bearer {running.admin_token}"},
                timeout=30,
            ) as http,
            trio.open_nursery() as nursery,
        ):
            proxy = ChaosProxy("127.0.0.1", urlsplit(running.runtime_url).port or 0)
            await nursery.start(proxy.serve)
            lost = await _story(running, http, proxy, nursery)
            nursery.cancel_scope.cancel()
    say("demo", "nothing lost" if lost == 0 else f"{lost} events LOST")
    return 0 if lost == 0 else 1


def _narrate(change: SessionChanged) -> None:
    say("gateway", f"session of {change.run_id}: {change.old.value} -> {change.new.value}")


async def _story(
    running: RunningGateway, http: httpx.AsyncClient, proxy: ChaosProxy, nursery: trio.Nursery
) -> int:
    created = await http.post(
        "/v1/runs",
        json={
            "capabilities": ["secrets.read", "kv.read", "kv.write"],
            "secrets": {"API_KEY": "sk-demo-0123456789"},
            "config": {"model": "demo-model", "max_steps": 10},
        },
    )
    created.raise_for_status()
    run_id, token = created.json()["runId"], created.json()["runtimeToken"]
    say("platform", f"registered {run_id}")
    received: list[dict[str, Any]] = []
    nursery.start_soon(_platform_reads_outputs, http, run_id, received)

    def on_state(state: ConnectionState) -> None:
        say("runtime", f"connection {state}")

    url = f"wss://localhost:{proxy.port}/runtime"
    async with connect(
        url,
        token=token,
        run_id=run_id,
        capabilities=["secrets.read", "kv.read", "kv.write"],
        ssl_context=running.client_ssl_context,
        on_state=on_state,
        reconnect_backoff=(0.2, 1.0),
    ) as session:
        say("runtime", f"attached: session {session.session_id}, epoch {session.connection_epoch}")
        await _use_the_session(session, http, run_id)
        await _publish(session, 0, EVENTS_BEFORE_CUT)

        say("network", "stalls (half-open: no FIN, no RST) for longer than the lease")
        proxy.stall()
        async with trio.open_nursery() as during:
            during.start_soon(_publish, session, EVENTS_BEFORE_CUT, EVENTS_DURING_CUT)
            await trio.sleep(3.5)
            say("network", "comes back")
            proxy.resume()
        say("runtime", f"session {session.session_id}, epoch {session.connection_epoch}")

    total = EVENTS_BEFORE_CUT + EVENTS_DURING_CUT
    with trio.move_on_after(10):
        while len(received) < total:
            await trio.sleep(0.05)
    seqs = [event["seq"] for event in received]
    say("platform", f"received seqs {seqs}")
    missing = set(range(total)) - set(seqs)
    duplicates = len(seqs) - len(set(seqs))
    return len(missing) + duplicates


async def _use_the_session(session: GatewaySession, http: httpx.AsyncClient, run_id: str) -> None:
    config = await session.get_config()
    say("runtime", f"config {config} (version {session.config_version})")
    secrets = await session.get_secrets(["API_KEY"])
    say("runtime", f"secret API_KEY read ({len(secrets['API_KEY'])} characters, not shown)")
    await session.kv_set({"step": "1", "phase": "planning"})
    say("runtime", f"kv {await session.kv_get(['step', 'phase'])}")
    posted = await http.post(
        f"/v1/runs/{run_id}/inputs",
        json={"events": [{"type": "user.message", "data": {"text": "please summarise"}}]},
    )
    say("platform", f"posted an input, seqs {posted.json()['seqs']}")
    async for event in session.inputs():
        say("runtime", f"input seq {event.seq}: {event.type} {event.data}")
        break


async def _publish(session: GatewaySession, first: int, count: int) -> None:
    for n in range(first, first + count):
        await session.publish([("progress", {"step": n, "text": f"working on step {n}"})])
        say("runtime", f"output {n} accepted (durable)")
        await trio.sleep(0.1)


async def _platform_reads_outputs(
    http: httpx.AsyncClient, run_id: str, received: list[dict[str, Any]]
) -> None:
    after = -1
    while True:
        page = await http.get(f"/v1/runs/{run_id}/outputs", params={"after": after, "wait": 5})
        body = page.json()
        for event in body["events"]:
            say("platform", f"output seq {event['seq']}: {event['data']['text']}")
            received.append(event)
        after = body["next"]
