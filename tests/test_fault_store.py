"""Store faults: the database cannot grow (SQLITE_FULL, what a full disk gives) while runtimes work.

`PRAGMA max_page_count` caps the SQLite file at its current size, so every write that needs a new
page fails inside SQLite, which then rolls back the whole group transaction it ran in (the other
writes of that group fail with it). The cap is set and lifted again and again while runtimes
attach, publish outputs, set KV, heartbeat and acknowledge inputs, and while the platform posts
inputs. Runtimes treat a refusal as `errors.md` says: back off, then retry. What must hold:

- a command the fault hits is refused with `internal` (retryable), and what it asked for did not
  happen: the output's `seq` is not in the log;
- everything acknowledged is stored: each run's log ends gapless with every `eventId` once, KV
  holds each key's last acknowledged value, the inputs' acknowledged position is the last one;
- runtimes stay attached and heartbeats are accepted throughout;
- every error logged says why the store failed (the disk is full), so an operator knows what
  to fix.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import pytest
import trio
from e2e_support import Harness, Wire, gateway_for_test
from reliability_ledger import record

from gateway.store.base import StoreError
from gateway.store.sqlite import SQLiteStore

OUTPUT = "runtime.task.output.event"
KV_SET = "runtime.session.kv.set.command"
HEARTBEAT = "runtime.session.heartbeat.command"
INPUT_ACK = "runtime.task.input.ack.command"
INPUT = "service.task.input.event"
PAD = "x" * 900  # a new page every few events, so a capped file refuses appends often
BACKOFF_S = 0.005


class DiskFull:
    """Caps and uncaps the store's file size through its own writer (so between transactions)."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.flips = 0

    async def set(self, full: bool) -> None:
        """Make the file unable to grow (True) or give it room again (False)."""

        def apply(conn: Any) -> None:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages if full else 1 << 30}")

        while True:  # a group that hit the cap fails whole, this write with it: write again
            try:
                await self.store._write(apply)
                break
            except StoreError:
                await trio.sleep(0)
        self.flips += 1

    async def flap(self, stop: trio.Event, period_s: float) -> None:
        """Full and not full by turns until `stop`, ending with room (bounded in time)."""
        with trio.move_on_after(60):
            while not stop.is_set():
                await self.set(True)
                await trio.sleep(period_s)
                await self.set(False)
                await trio.sleep(period_s)
        await self.set(False)


class Runtime:
    """One run's runtime: retries what the fault refuses, records what was acknowledged."""

    def __init__(self, harness: Harness, run_id: str, token: str) -> None:
        self.harness = harness
        self.run_id = run_id
        self.token = token
        self.refused: dict[str, int] = {}
        self.wrong: list[str] = []  # refusals that were not `internal`, or broke a guarantee
        self.acked_outputs: list[int] = []
        self.acked_kv: dict[str, str] = {}
        self.inputs_acked = -1

    async def until_accepted(self, wire: Wire, channel: str, payload: dict[str, Any]) -> Any:
        """Send until the reply comes (not an error); count and check each refusal on the way."""
        while True:
            frame = await wire.call(channel, payload)
            if frame["channel"] != "runtime.session.error":
                return frame["payload"]
            error = frame["payload"]
            self.refused[channel] = self.refused.get(channel, 0) + 1
            if (error["code"], error.get("retryable")) != ("internal", True):
                self.wrong.append(f"{channel}: {error}")
                return None
            if channel == OUTPUT:
                seq = payload["events"][0]["seq"]
                store = self.harness.running.service.store
                if await store.read_outputs(self.run_id, seq - 1, 1):
                    self.wrong.append(f"refused seq {seq} is in the log")
            await trio.sleep(BACKOFF_S)

    async def work(self, steps: int, inputs: int) -> None:
        """Publish, set KV and heartbeat `steps` times, re-attaching (a higher epoch) halfway;
        acknowledge `inputs` inputs as they come."""
        half = steps // 2
        await self._connection(range(half), inputs, epoch=1)
        await self._connection(range(half, steps), inputs, epoch=2)

    async def _connection(self, steps: range, inputs: int, epoch: int) -> None:
        async with self.harness.wire(self.token) as wire:
            attach = {"runId": self.run_id, "runtimeInstanceId": "rt-1", "protocolVersion": "v1",
                      "capabilities": ["kv.write"], "connectionEpoch": epoch,
                      "reconnect": epoch > 1}
            attached = await self.until_accepted(wire, "runtime.session.attach.command", attach)
            assert attached is not None, self.wrong
            ids = {"sessionId": attached["sessionId"], "runId": self.run_id}
            for step in steps:
                event = {"eventId": f"e{step}", "seq": step, "type": "t",
                         "data": {"n": step, "pad": PAD}, "timestamp": "2026-11-22T10:00:00Z"}
                if await self.until_accepted(wire, OUTPUT, {**ids, "events": [event]}):
                    self.acked_outputs.append(step)
                key, value = f"k{step % 4}", str(step)
                if await self.until_accepted(wire, KV_SET, {**ids, "kv": {key: value}}):
                    self.acked_kv[key] = value
                beat = await wire.call(HEARTBEAT, ids)
                if beat["channel"] != "runtime.session.heartbeat.reply":
                    self.wrong.append(f"heartbeat refused: {beat['payload']}")
                while wire.stash:
                    await self._acknowledge(wire, ids, wire.stash.pop(0))
            if epoch == 1:
                return
            with trio.fail_after(30):  # inputs posted late may still be on their way
                while self.inputs_acked < inputs - 1:
                    await self._acknowledge(wire, ids, await wire.recv())

    async def _acknowledge(self, wire: Wire, ids: dict[str, str], delivered: Any) -> None:
        assert delivered["channel"] == INPUT, delivered
        last = delivered["payload"]["events"][-1]["seq"]
        if await self.until_accepted(wire, INPUT_ACK, {**ids, "seq": last}):
            self.inputs_acked = max(self.inputs_acked, last)


async def post_inputs(harness: Harness, run_id: str, count: int) -> int:
    """Post `count` inputs one by one, retrying the 503s a full store gives; return the 503s."""
    refused = 0
    for n in range(count):
        while True:
            response = await harness.http.post(
                f"/v1/runs/{run_id}/inputs", json={"events": [{"type": "t", "data": {"n": n}}]}
            )
            if response.status_code == 202:
                break
            assert response.status_code == 503, response.text
            assert response.json()["type"].endswith("/store-unavailable"), response.text
            refused += 1
            await trio.sleep(BACKOFF_S)
    return refused


async def _drill(tmp_path: Path, runs: int, steps: int, inputs: int, period_s: float,
                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="agent_gateway")
    # No rate limit: retries after each refusal would otherwise meet it on a fast machine.
    unlimited = {"command_rate": 1e6, "command_burst": 1e6}
    async with gateway_for_test(tmp_path, **unlimited) as harness:
        store = cast(SQLiteStore, harness.running.service.store)
        disk = DiskFull(store)
        runtimes = [Runtime(harness, *await harness.create_run()) for _ in range(runs)]
        posts_refused = 0
        stop = trio.Event()
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(disk.flap, stop, period_s)
                async with trio.open_nursery() as working:
                    for runtime in runtimes:
                        working.start_soon(runtime.work, steps, inputs)

                        async def post(run_id: str = runtime.run_id) -> None:
                            nonlocal posts_refused
                            posts_refused += await post_inputs(harness, run_id, inputs)

                        working.start_soon(post)
                stop.set()

        problems: list[str] = []  # acknowledged data missing, or a guarantee broken
        for runtime in runtimes:
            stored = await store.read_outputs(runtime.run_id, -1, steps + 10)
            if [(e.seq, e.event_id) for e in stored] != [(s, f"e{s}") for s in range(steps)]:
                problems.append(f"{runtime.run_id} log: {[e.seq for e in stored]}")
            if runtime.acked_outputs != list(range(steps)):
                problems.append(f"{runtime.run_id} acknowledged: {runtime.acked_outputs}")
            kv = await store.kv_get(runtime.run_id, sorted(runtime.acked_kv))
            if kv != runtime.acked_kv:
                problems.append(f"{runtime.run_id} kv: {kv} != {runtime.acked_kv}")
            acked, _ = await store.input_positions(runtime.run_id)
            if acked != inputs - 1:
                problems.append(f"{runtime.run_id} inputs acknowledged up to {acked}")
            problems += runtime.wrong
        refused = sum(sum(r.refused.values()) for r in runtimes) + posts_refused
        record("store full", max(refused, len(problems)), len(problems))
        assert problems == [], problems[:5]
        # The fault must really have been hit (an output needs new pages most often).
        assert sum(r.refused.get(OUTPUT, 0) for r in runtimes) > 0, disk.flips
        # Every error logged names the cause, in one line (no traceback for a known failure).
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("store failed" in r.getMessage() for r in errors)
        unclear = [r.getMessage() for r in errors
                   if "database or disk is full" not in r.getMessage() or r.exc_info]
        assert unclear == [], unclear[:3]


async def test_a_full_disk_refuses_with_internal_and_loses_nothing_acknowledged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await _drill(tmp_path, runs=3, steps=40, inputs=6, period_s=0.03, caplog=caplog)


@pytest.mark.slow
async def test_a_full_disk_long(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    await _drill(tmp_path, runs=8, steps=200, inputs=20, period_s=0.02, caplog=caplog)


async def test_a_session_state_the_store_cannot_save_is_logged_with_its_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Saving a session's state is best effort (the next change saves it whole again), so a
    # failure is only logged: in one line that names the cause.
    async with gateway_for_test(tmp_path, heartbeat_interval_ms=1000, lease_misses=1) as harness:
        run_id, token = await harness.create_run()
        store = harness.running.service.store
        failed = trio.Event()

        async def full_disk(*_: Any) -> None:
            failed.set()
            raise StoreError("sqlite: OperationalError: database or disk is full")

        monkeypatch.setattr(store, "save_session", full_disk)
        async with harness.wire(token) as wire:
            await wire.attach(run_id)
            with trio.fail_after(10):
                await failed.wait()  # the lease ran out (no heartbeats): EXPIRED is saved
        [record] = [r for r in caplog.records if "could not save session state" in r.getMessage()]
        assert record.getMessage() == (
            f"could not save session state of run {run_id}:"
            " sqlite: OperationalError: database or disk is full"
        )
        assert record.levelno == logging.ERROR and record.exc_info is None
