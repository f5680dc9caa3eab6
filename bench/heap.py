"""Where an idle connection's memory goes: `python -m bench.heap [--server echo|gateway] [-n N]`.

`session_kib` and `echo_conn_kib` say how much RSS a connection costs; this says who allocated
it. The server runs under `bench.traced`; a load generator opens N idle TLS WebSockets (attached,
leased sessions for the gateway); the Python heap before and after is compared, and each
allocation is charged to the innermost frame of its stack that belongs to a known owner (the
gateway, trio-websocket, wsproto, h11, trio's TLS and socket layers, trio itself). What OpenSSL
and the allocator hold is outside Python's heap: the untraced RSS per connection (`nox -s bench`'s
`echo_conn_kib` and `session_kib`) minus the traced heap.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import ssl
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import ModuleType

import h11
import orjson
import trio
import trio_websocket
import wsproto

import gateway
import statemachine
from bench import echo_server
from bench.procs import ECHO_LINE, RUNTIME_LINE, Child, child, gateway_command, module_command
from bench.seed import seed_runs
from bench.tls import make_tls
from gateway.limits import raise_nofile

ROOT = Path(__file__).resolve().parent.parent


def _where(module: ModuleType) -> str:
    """The directory a package's files live in (as the traced server imports them too)."""
    return str(Path(str(module.__file__)).parent) + os.sep


# Path prefixes, most specific first: an allocation is charged to the first one found, walking
# its stack from the allocating frame outwards. The server runs on this interpreter and
# checkout, so its frames carry these very paths.
OWNERS: tuple[tuple[str, str], ...] = (
    (_where(gateway), "gateway"),
    (_where(statemachine), "gateway (core)"),
    (str(Path(echo_server.__file__)), "echo server"),
    (_where(trio_websocket), "trio-websocket"),
    (_where(wsproto), "wsproto"),
    (_where(h11), "h11"),
    (_where(trio) + "_ssl.py", "trio TLS stream"),
    (str(ssl.__file__), "ssl module"),
    (_where(trio) + "_highlevel", "trio sockets and listeners"),
    (_where(trio), "trio core"),
)


def owning_frame(trace: tracemalloc.Traceback) -> tuple[str, tracemalloc.Frame | None]:
    """Who caused an allocation, and their line that did: its stack's innermost owned frame.

    trio's own frames count only when nothing else is on the stack: a task, a nursery or an
    event is charged to the library that asked trio for it (at the line that asked).
    """
    found: tuple[str, tracemalloc.Frame | None] = ("other", None)
    for frame in reversed(trace):  # tracemalloc lists the outermost frame first
        name = next((name for prefix, name in OWNERS if frame.filename.startswith(prefix)), None)
        if name == "trio core":
            found = (name, frame)
        elif name is not None:
            return name, frame
    return found


def owner(trace: tracemalloc.Traceback) -> str:
    """Who caused an allocation (see `owning_frame`)."""
    return owning_frame(trace)[0]


def breakdown(
    before: Path, after: Path, connections: int
) -> tuple[dict[str, float], dict[str, list[str]]]:
    """KiB per connection by owner, and each owner's own lines that caused the most of it."""
    growth = tracemalloc.Snapshot.load(str(after)).compare_to(
        tracemalloc.Snapshot.load(str(before)), "traceback"
    )
    owners: collections.Counter[str] = collections.Counter()
    lines: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for stat in growth:
        name, frame = owning_frame(stat.traceback)
        owners[name] += stat.size_diff
        if frame is not None:
            where = f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}"
            lines[name][where.removeprefix(str(ROOT) + os.sep)] += stat.size_diff
    per = 1024 * connections
    top = {
        name: [f"{size / per:6.2f} KiB  {line}" for line, size in lines[name].most_common(4)]
        for name in owners
    }
    return {name: size / per for name, size in owners.most_common()}, top


async def _snapshot(server: Child, directory: Path, number: int) -> Path:
    server.process.send_signal(signal.SIGUSR1)  # bench.traced writes heap-<number>.snapshot
    done = directory / f"heap-{number}.done"
    with trio.fail_after(120):
        while not done.exists():
            await trio.sleep(0.2)
    return done.with_suffix(".snapshot")


async def measure(server_kind: str, connections: int, work: Path) -> None:
    """Start the server traced, open the connections, and print the breakdown."""
    tls = make_tls(work)
    traced = [sys.executable, "-m", "bench.traced", str(work)]
    spec: dict[str, object] = {"ca": str(tls.ca), "connect_concurrency": 32,
                               "connect_timeout_s": 30, "timeout_s": 120 + connections / 20}
    if server_kind == "echo":
        command = [*traced, "bench.echo_server", "--cert", str(tls.cert), "--key", str(tls.key)]
        ready, env = ECHO_LINE, None
        spec |= {"scenario": "idle", "connections": connections}
    else:
        seeded = await seed_runs(work / "gateway" / "gateway.sqlite3", {"heap": connections})
        runs = [[run.run_id, run.token] for run in seeded["heap"]]
        command = [*traced, *gateway_command(work / "gateway", tls)[2:]]  # from "gateway serve"
        ready, env = RUNTIME_LINE, {"AGENT_GATEWAY_ADMIN_TOKEN": "bench-heap-admin-token-0123"}
        spec |= {"scenario": "hold", "runs": runs, "offset": 0, "total": connections,
                 "interval_ms": 10_000, "origin_wall": time.time()}
    async with child(server_kind, command, env=env, stderr=work / "server.log") as server:
        spec["url"] = (await server.expect(ready, 120)).decode()
        await trio.sleep(1.0)
        rss_before = server.rss_bytes()
        before = await _snapshot(server, work, 0)
        (work / "spec.json").write_bytes(orjson.dumps(spec))
        loadgen = module_command("bench.loadgen", str(work / "spec.json"))
        async with child("loadgen", loadgen, stderr=work / "loadgen.log") as generator:
            opened = (await generator.event("attached", 120 + connections / 20))["attached"]
            await trio.sleep(3.0)  # let the ramp's garbage go
            rss_after = server.rss_bytes()
            after = await _snapshot(server, work, 1)
            await generator.send(cmd="stop")
    owners, top = breakdown(before, after, opened)
    print(f"{server_kind}: {opened} idle connections; the Python heap grew"
          f" {sum(owners.values()):.1f} KiB per connection. (RSS grew"
          f" {(rss_after - rss_before) / 1024 / opened:.1f} KiB, inflated by tracemalloc's own"
          " records; untraced, `nox -s bench` reports it as echo_conn_kib and session_kib. The"
          " difference is what OpenSSL and the allocator hold outside Python's heap.)")
    for name, kib in owners.items():
        if abs(kib) >= 0.01:
            print(f"  {kib:6.2f} KiB  {name}, most of it from:")
            print("\n".join(f"      {line}" for line in top[name]))


def main() -> None:
    """Parse the flags and measure."""
    parser = argparse.ArgumentParser(prog="python -m bench.heap",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--server", choices=("echo", "gateway"), default="gateway")
    parser.add_argument("-n", "--connections", type=int, default=1000)
    args = parser.parse_args()
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="agent-gateway-heap-") as scratch:
        trio.run(measure, args.server, args.connections, Path(scratch))


if __name__ == "__main__":
    main()
