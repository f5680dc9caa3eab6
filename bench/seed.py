"""Runs for the benchmark, written into the gateway's store before the gateway starts.

Registering 20 000 runs one `POST /v1/runs` at a time would dominate a quick run, so the suite
seeds them through the store's own API (`create_run` with the token's digest, exactly what the
control API stores) and measures the HTTP path separately, on a few hundred runs.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path

import trio
from attrs import frozen

from gateway.service import token_digest
from gateway.store.sqlite import open_sqlite_store
from statemachine.messages import Capability
from statemachine.records import RunGrant

CONCURRENCY = 2048  # queued creates: enough to fill the store's group commits


@frozen
class SeededRun:
    """A run the load generators can attach to: its id and its runtime token."""

    run_id: str
    token: str


def _token() -> str:
    return "agt_" + secrets.token_urlsafe(32)


def _grant(run_id: str, with_secret: bool) -> RunGrant:
    return RunGrant(
        run_id=run_id,
        capabilities=frozenset(Capability),
        secrets={"API_KEY": "sk-" + secrets.token_hex(16)} if with_secret else {},
        config={"model": "bench", "temperature": 0},
        config_version="cfg_bench",
    )


async def seed_runs(
    database: Path, groups: Mapping[str, int], *, with_secret: frozenset[str] = frozenset()
) -> dict[str, list[SeededRun]]:
    """Create `count` fresh runs per group name; groups in `with_secret` get one secret each.

    Group names must be alphanumeric: they become part of run ids (`run_[A-Za-z0-9]{8,64}`).
    """
    plan = {
        name: [
            SeededRun(f"run_{name}{index:06d}x{secrets.token_hex(4)}", _token())
            for index in range(count)
        ]
        for name, count in groups.items()
    }
    database.parent.mkdir(parents=True, exist_ok=True)
    work = iter([(run, name in with_secret) for name, runs in plan.items() for run in runs])
    async with open_sqlite_store(database, synchronous="normal") as store:

        async def worker() -> None:
            for run, secret in work:  # workers share one iterator: each run is created once
                await store.create_run(_grant(run.run_id, secret), token_digest(run.token))

        async with trio.open_nursery() as nursery:
            for _ in range(CONCURRENCY):
                nursery.start_soon(worker)
    return plan
