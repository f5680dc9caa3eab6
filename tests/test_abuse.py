"""Abuse by a runtime that holds a valid token: whatever it sends, the cost it can put on the
gateway's shared parts (the store, the event loop, the connection slots) stays bounded, so every
other runtime is still served.

These tests drive `Gateway.on_message` directly, with a stub store that counts its calls and
trio's MockClock standing still, so "how much work did N frames cause" is exact.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import orjson
import trio
from trio_websocket import WebSocketConnection

from gateway.config import Settings
from gateway.links import Link
from gateway.service import Gateway
from gateway.store.base import Store
from statemachine.inputs import ConnectionOpened, RunRegistered
from statemachine.records import RunGrant

PRINCIPAL = "run_principal0001"


class CountingStore:
    """A store that knows no runs and counts how often it is asked for one."""

    def __init__(self) -> None:
        self.get_run_calls = 0

    async def get_run(self, run_id: str) -> RunGrant | None:
        """Nobody's run: the store has no such run."""
        self.get_run_calls += 1
        await trio.lowlevel.checkpoint()
        return None


class Peer:
    """The runtime's end of a connection: every frame the gateway sent it."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    async def send_message(self, message: str) -> None:
        """Keep the frame, decoded."""
        self.frames.append(orjson.loads(message))

    def codes(self) -> list[str]:
        """The error code of every frame received, in order ("" for a reply)."""
        return [f["payload"].get("code", "") if f["channel"] == "runtime.session.error" else ""
                for f in self.frames]


@asynccontextmanager
async def connection(
    tmp_path: Path, **settings: Any
) -> AsyncIterator[tuple[Gateway, Link, Peer, CountingStore]]:
    """A gateway on a counting store with one admitted connection of PRINCIPAL's token."""
    store = CountingStore()
    gateway = Gateway(Settings(data_dir=tmp_path, **settings), cast(Store, store))
    gateway.hub.handle(RunRegistered(RunGrant(PRINCIPAL, frozenset(), {}, {}, "cfg-1")))
    peer = Peer()
    async with trio.open_nursery() as nursery:
        link = Link(1, cast(WebSocketConnection, peer), 16, nursery)
        gateway.links[1] = link
        await gateway.feed(ConnectionOpened(1, PRINCIPAL, gateway.clock.now()), 1)
        yield gateway, link, peer, store
        nursery.cancel_scope.cancel()


_ids = itertools.count()


def attach(run_id: str) -> str:
    """An attach frame for `run_id`."""
    return orjson.dumps({
        "channel": "runtime.session.attach.command", "id": f"a{next(_ids)}",
        "payload": {"runId": run_id, "runtimeInstanceId": "rt-1", "protocolVersion": "v1"},
    }).decode()


def recover(sub_run_ids: list[str]) -> str:
    """A recover frame naming PRINCIPAL and these sub-runs."""
    return orjson.dumps({
        "channel": "runtime.session.recover.command", "id": f"r{next(_ids)}",
        "payload": {"sessionId": "ses_0123456789abcdef", "mainRunId": PRINCIPAL,
                    "subRunIds": sub_run_ids},
    }).decode()


async def test_commands_over_the_rate_cost_no_store_reads(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """An attach naming a run the core does not know makes the gateway ask the store. Past the
    connection's rate, the command is refused `rate_limited` whatever it names, so asking the
    store first is work the rate limit was meant to spare: a flood of attaches for made-up runs
    would otherwise cost one store read each, at whatever speed the runtime sends them."""
    async with connection(tmp_path, command_burst=5, command_rate=0.001) as (
        gateway, link, peer, store
    ):
        for number in range(50):
            await gateway.on_message(link, attach(f"run_madeUp{number:08d}"))
    assert peer.codes() == ["forbidden_run"] * 5 + ["rate_limited"] * 45
    assert store.get_run_calls == 5


async def test_a_recover_naming_unknown_runs_stops_at_the_first(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """A recover naming a run the store does not have is refused whole (`forbidden_run`), so the
    gateway need not look up the other 255 it names: one frame must not cost 256 store reads."""
    async with connection(tmp_path) as (gateway, link, peer, store):
        await gateway.on_message(link, recover([f"run_madeUp{n:08d}" for n in range(256)]))
        await gateway.on_message(link, recover([f"run_madeUp{0:08d}"] * 256))
    assert peer.codes() == ["forbidden_run"] * 2
    assert store.get_run_calls == 2
