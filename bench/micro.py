"""In-process micro benchmarks: the core's step rate, the codec's and the shell's cost per frame."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from bench.codec_bench import measure as measure_codec
from bench.wire import HeartbeatFrames, attach_frame, session_of
from gateway.config import Settings
from gateway.links import Link
from gateway.service import Gateway
from gateway.store.sqlite import open_sqlite_store
from statemachine.effects import ClaimEpoch, SendReply
from statemachine.hub import Hub
from statemachine.inputs import (
    CommandReceived,
    ConnectionOpened,
    EpochClaimed,
    RunRegistered,
    StoreAnswered,
)
from statemachine.messages import (
    HeartbeatCommand,
    HeartbeatResponse,
    Millis,
    RuntimeAttachRequest,
    RuntimeAttachResponse,
)
from statemachine.policy import Policy
from statemachine.records import RunGrant

START = Millis(1_767_225_600_000)  # 2026-01-01T00:00:00Z: any fixed instant will do


def attached_hub(sessions: int) -> tuple[Hub, list[CommandReceived]]:
    """A hub with `sessions` leased sessions, one per connection, and a heartbeat for each."""
    hub = Hub(Policy())
    heartbeats = []
    for conn in range(sessions):
        run_id = f"run_micro{conn:08d}"
        grant = RunGrant(run_id, frozenset(), {}, {}, "cfg_bench")
        hub.handle(RunRegistered(grant))
        hub.handle(ConnectionOpened(conn, run_id, START))
        attach = RuntimeAttachRequest(run_id, f"rt-{conn}", "v1")
        effects = hub.handle(
            CommandReceived(conn, "attach-1", attach, START, f"ses_micro{conn:08d}")
        )
        claim = next(e for e in effects if isinstance(e, ClaimEpoch))
        answer = EpochClaimed(True, {run_id: -1}, {run_id: -1})
        replies = hub.handle(StoreAnswered(claim.ticket, answer, START))
        reply = next(e for e in replies if isinstance(e, SendReply))
        assert isinstance(reply.payload, RuntimeAttachResponse)
        command = HeartbeatCommand(reply.payload.session_id, run_id, f"rt-{conn}")
        heartbeats.append(CommandReceived(conn, "hb-1", command, START))
    return hub, heartbeats


def statemachine_steps_per_s(steps: int, sessions: int = 1000, repeats: int = 3) -> float:
    """`Hub.handle` on heartbeat commands, round-robin over leased sessions (best of repeats).

    Each connection heartbeats once per `sessions` steps and the clock moves 1 ms per step, so no
    lease expires and no connection hits its rate limit: every step is a granted heartbeat, which
    the last step's effects confirm.
    """
    best = 0.0
    for _ in range(repeats):
        hub, heartbeats = attached_hub(sessions)
        events = [
            CommandReceived(hb.conn, hb.request_id, hb.command, Millis(START + 1000 + step))
            for step, hb in zip(range(steps), _cycle(heartbeats, steps), strict=True)
        ]
        handle = hub.handle
        last: list[Any] = []
        start = time.perf_counter()
        for event in events:
            last = handle(event)
        elapsed = time.perf_counter() - start
        if not (len(last) == 1 and isinstance(last[0].payload, HeartbeatResponse)):
            raise RuntimeError(f"a heartbeat step did not grant the heartbeat: {last}")
        best = max(best, steps / elapsed)
    return best


def _cycle(items: list[CommandReceived], count: int) -> list[CommandReceived]:
    return [items[i % len(items)] for i in range(count)]


def codec_us(loops: int, repeats: int) -> tuple[float, float]:
    """(our codec, jsonschema) microseconds per heartbeat frame, from `bench/codec_bench.py`."""
    return measure_codec(loops, repeats)


class _NoTransport:
    """A WebSocket that takes every frame at once: what is left is the gateway's own work."""

    def __init__(self) -> None:
        self.last = ""

    async def send_message(self, message: str) -> None:
        self.last = message


async def shell_us_per_heartbeat(heartbeats: int, repeats: int) -> float:
    """`Gateway.on_message` per heartbeat frame, transport left out (best of repeats).

    The whole shell path of one frame (decode, core, encode, metrics, the direct send) on an
    attached session, with a real SQLite store behind it: the gateway's own cost per heartbeat,
    which `heartbeat_ratio` adds to the transport's. Async, because the suite runs it inside its
    own trio run (`trio.run(shell_us_per_heartbeat, 20_000, 5)` from a shell).
    """
    with tempfile.TemporaryDirectory(prefix="bench-shell-") as scratch:
        settings = Settings(data_dir=Path(scratch), command_rate=1e9, command_burst=1e9)
        async with open_sqlite_store(settings.database) as store, trio.open_nursery() as nursery:
            gateway = Gateway(settings, store)
            await gateway.load()
            grant, _ = await gateway.create_run()
            transport = _NoTransport()
            link = Link(1, transport, settings.outbound_queue, nursery)  # type: ignore[arg-type]
            gateway.links[1] = link
            await gateway.feed(ConnectionOpened(1, grant.run_id, gateway.clock.now()), 1)
            await gateway.on_message(link, attach_frame(grant.run_id, "rt-1"))
            # The very frames the ratio scenario sends, built before the clock starts.
            heartbeat = HeartbeatFrames(session_of(transport.last), grant.run_id, "rt-1")
            frames = [heartbeat.next() for _ in range(heartbeats)]
            best = math.inf
            for _ in range(repeats):
                start = time.perf_counter()
                for frame in frames:
                    await gateway.on_message(link, frame)
                best = min(best, (time.perf_counter() - start) / heartbeats)
            if '"accepted":true' not in transport.last:
                raise RuntimeError(f"the last heartbeat was not granted: {transport.last}")
            nursery.cancel_scope.cancel()
    return best * 1e6


async def store_read_cpu_us(lookups: int, concurrency: int) -> float:
    """Process CPU (every thread) per token lookup on the SQLite store, `concurrency` at a time.

    A read's trip to a worker thread costs more than the read; reads waiting together share one
    trip (`gateway.store.sqlite`), which is what a reconnect storm of attaches needs. Comparing
    concurrency 1 and 100 shows whether they do.
    """
    with tempfile.TemporaryDirectory(prefix="bench-store-") as scratch:
        async with open_sqlite_store(Path(scratch) / "store.sqlite3") as store:
            digests = [bytes([n]) * 32 for n in range(100)]
            for number, digest in enumerate(digests):
                await store.create_run(RunGrant(f"run-{number}", frozenset(), {}, {}, "v1"), digest)

            each = max(1, lookups // concurrency)

            async def lookups_of(task: int) -> None:
                for n in range(each):
                    if await store.run_for_token(digests[(task + n) % len(digests)]) is None:
                        raise RuntimeError("a seeded token was not found")

            start = time.process_time()
            async with trio.open_nursery() as nursery:
                for task in range(concurrency):
                    nursery.start_soon(lookups_of, task)
            spent = time.process_time() - start
    return spent / (each * concurrency) * 1e6
