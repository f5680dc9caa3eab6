"""Crash: SIGKILL the gateway at random points under load; restart it; nothing acknowledged is lost.

Three runtimes (our client) publish output batches, write KV and consume inputs that a platform
task keeps posting, while the gateway process is killed and restarted on the same data directory
again and again. The runtimes reach it through a proxy that follows each restart (ports are
ephemeral), and reconnect on their own. At the end the store must hold every acknowledged output
exactly once and in order, every acknowledged KV write, and every input delivered (gapless, once
to the handler) and acknowledged.

The kill points come from a seeded generator; the seed is printed and recorded, and
`FAULT_SEED=<seed>` replays the same schedule.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
from e2e_support import CertificateAuthority
from fault_support import (
    Faults,
    RestartableGateway,
    audit,
    create_book,
    drive_runtime,
    fault_seed,
    post_inputs_until,
    post_sentinels,
)
from reliability_ledger import record

from gateway.store.sqlite import open_sqlite_store

RUNTIMES = 3


async def crash_cycles(tmp_path: Path, kills: int) -> None:
    """Start the gateway, load it for a random 0.2-1.5 s, SIGKILL it, restart: `kills` times."""
    seed = fault_seed()
    rng = random.Random(seed)
    print(f"crash schedule seed {seed} (FAULT_SEED={seed} replays it)")
    ca = CertificateAuthority(tmp_path)
    gateway = RestartableGateway(tmp_path / "data", ca)
    faults = Faults()
    stop = trio.Event()
    context = ca.client_context()
    async with trio.open_nursery() as nursery:
        await gateway.serve_proxy(nursery)
        process = await gateway.start(nursery)
        books = [await create_book(process.control_url) for _ in range(RUNTIMES)]
        async with trio.open_nursery() as runtimes:
            for book in books:
                runtimes.start_soon(
                    drive_runtime, book, gateway.url, context, faults, stop,
                    random.Random(rng.random()),
                )
            async with trio.open_nursery() as platform:
                platform.start_soon(
                    post_inputs_until, books, gateway.control_url, faults, stop,
                    random.Random(rng.random()),
                )
                for _ in range(kills):
                    await trio.sleep(rng.uniform(0.2, 1.5))
                    process.kill()
                    assert await process.wait() != 0
                    faults.injected += 1
                    process = await gateway.start(nursery)
                stop.set()
            await post_sentinels(books, process.control_url, faults)
        process.terminate()
        exit_code = await process.wait()
        assert exit_code == 0, "the drained gateway said:\n" + "\n".join(process.output[-60:])
        nursery.cancel_scope.cancel()

    async with open_sqlite_store(gateway.database, synchronous="normal") as store:
        result = await audit(store, books)
    outputs = sum(len(book.outputs) for book in books)
    writes = sum(len(book.kv) for book in books)
    inputs = sum(len(book.delivered) for book in books)
    unknown = sum(book.unknown_posts for book in books)
    record(
        "crash",
        tried=kills,
        lost=result.lost_cases(kills),
        detail=f"{kills} SIGKILLs (seed {seed}); audited {outputs} acknowledged outputs, "
        f"{writes} KV writes, {inputs} delivered inputs ({unknown} posts cut off by a kill)",
    )
    assert not result.problems, f"seed {seed}:\n" + "\n".join(result.problems)
    # The schedule must really have put load on every incarnation, or the test proves little.
    assert all(book.outputs and book.kv and len(book.delivered) > 1 for book in books)
    assert gateway.starts == kills + 1


async def test_sigkill_at_random_points_loses_nothing_acknowledged(tmp_path: Path) -> None:
    await crash_cycles(tmp_path, kills=20)


@pytest.mark.slow
async def test_sigkill_at_many_random_points_loses_nothing_acknowledged(tmp_path: Path) -> None:
    await crash_cycles(tmp_path, kills=100)
