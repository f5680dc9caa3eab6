"""The orchestrator: seed runs, start servers and load generators, turn their reports into metrics.

Phases, in order (each bounded in time, each with its own processes):

1. micro: the pure core and the codec, in this process, before anything else competes for CPU;
2. throughput: one gateway and the echo server; interleaved echo/heartbeat rounds, 1 000
   runtimes attaching at once, durable output events, input events, `POST /v1/runs`;
3. hold: a fresh gateway; thousands of sessions attached and heartbeating at their interval,
   the gateway's RSS before and after, heartbeat latency under that load.
"""

from __future__ import annotations

import math
import re
import sqlite3
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio
from attrs import frozen

from bench import micro
from bench.procs import (
    CONTROL_LINE,
    ECHO_LINE,
    RUNTIME_LINE,
    STARTUP_S,
    Child,
    child,
    gateway_command,
    module_command,
)
from bench.report import HELD_SESSIONS
from bench.seed import SeededRun, seed_runs
from bench.tls import TlsFiles, make_tls
from gateway.limits import session_capacity

ADMIN_TOKEN = "bench-admin-token-not-a-secret-0123456789"
ATTACH_TIMEOUT_S = 60  # how long a runtime of the attach burst has to attach


@frozen
class Plan:
    """How big each phase is: `quick` fits in under 3 minutes on 2 cores, `full` is the real one."""

    mode: str
    statemachine_steps: int
    codec_loops: int
    codec_repeats: int
    ratio_connections: int
    ratio_pairs: int
    ratio_round_s: float
    ratio_warmup_s: float
    attach_runtimes: int
    attach_generators: int
    attach_rounds: int
    output_runtimes: int
    output_batches: int
    output_duration_s: float
    input_runtimes: int
    input_posts: int
    http_runs: int
    hold_sessions: int
    hold_generators: int
    hold_window_s: float
    heartbeat_interval_ms: int


QUICK = Plan(
    mode="quick", statemachine_steps=200_000, codec_loops=20_000, codec_repeats=3,
    ratio_connections=100, ratio_pairs=3, ratio_round_s=2.0, ratio_warmup_s=1.0,
    attach_runtimes=1000, attach_generators=2, attach_rounds=1,
    output_runtimes=16, output_batches=100, output_duration_s=6.0,
    input_runtimes=8, input_posts=10, http_runs=100,
    hold_sessions=HELD_SESSIONS["quick"], hold_generators=2, hold_window_s=10.0,
    heartbeat_interval_ms=10_000,
)
FULL = Plan(
    mode="full", statemachine_steps=1_000_000, codec_loops=50_000, codec_repeats=7,
    ratio_connections=100, ratio_pairs=6, ratio_round_s=5.0, ratio_warmup_s=2.0,
    attach_runtimes=1000, attach_generators=2, attach_rounds=3,
    output_runtimes=16, output_batches=1000, output_duration_s=20.0,
    input_runtimes=8, input_posts=40, http_runs=500,
    hold_sessions=HELD_SESSIONS["full"], hold_generators=4, hold_window_s=30.0,
    heartbeat_interval_ms=10_000,
)
SMOKE = Plan(
    mode="smoke", statemachine_steps=2_000, codec_loops=200, codec_repeats=1,
    # As many connections as the real runs: fewer would each go past the gateway's default
    # per-connection rate limit (200 commands/s) on a fast machine, and get refusals.
    ratio_connections=100, ratio_pairs=1, ratio_round_s=0.5, ratio_warmup_s=0.2,
    attach_runtimes=20, attach_generators=1, attach_rounds=1,
    output_runtimes=2, output_batches=5, output_duration_s=1.0,
    input_runtimes=2, input_posts=2, http_runs=5,
    hold_sessions=HELD_SESSIONS["smoke"], hold_generators=1, hold_window_s=2.0,
    heartbeat_interval_ms=1_000,
)
"""Every phase, every process and every file the suite writes, at toy sizes (under a minute):
what `nox` runs so a change that breaks the suite is caught before anyone needs a real run."""


class Results:
    """Metrics as they are measured, plus the details and notes that explain them."""

    def __init__(self) -> None:
        self.metrics: dict[str, dict[str, Any]] = {}
        self.details: dict[str, Any] = {}
        self.notes: list[str] = []

    def put(self, name: str, value: float, unit: str) -> None:
        """Record one metric (rounded for the reader: no figure here has 6 significant digits)."""
        self.metrics[name] = {"value": round(value, 3), "unit": unit}
        print(f"  {name:28s} {value:14,.3f} {unit}", flush=True)


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (p99 of 1 000 samples is the 990th smallest)."""
    if not values:
        raise ValueError("no samples")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@frozen
class RatioFigures:
    """What the interleaved echo and heartbeat rounds measured, pooled per target."""

    echo_rate: float
    heartbeat_rate: float
    echo_cpu_us: float
    gateway_cpu_us: float
    details: dict[str, Any]


def ratio_figures(rounds: Sequence[Mapping[str, Any]]) -> RatioFigures:
    """Each target's rate over all its rounds, and the server's CPU per round trip.

    The issue defines heartbeat_ratio as heartbeat_rt_per_s / echo_rt_per_s, so the two rates
    and the ratio must come from the same figures: each rate is its round trips over its time,
    summed over every round of that target. The rounds alternate ABBA, so a host whose speed
    drifts steadily through the phase slows both sums alike. The ratio of each pair of
    back-to-back rounds is kept in the details, to show how much one pair can move.
    """
    totals = {target: {"trips": 0.0, "elapsed": 0.0, "server": 0.0, "client": 0.0}
              for target in ("echo", "gateway")}
    rates: dict[str, list[float]] = {"echo": [], "gateway": []}
    for entry in rounds:
        if entry["bad"]:
            raise RuntimeError(f"{entry['bad']} bad replies in a {entry['target']} round")
        total = totals[entry["target"]]
        total["trips"] += entry["round_trips"]
        total["elapsed"] += entry["elapsed_s"]
        total["server"] += entry["server_cpu_s"]
        total["client"] += entry["client_cpu_s"]
        rates[entry["target"]].append(entry["round_trips"] / entry["elapsed_s"])
    for target, total in totals.items():
        if not total["trips"]:
            raise RuntimeError(f"no {target} round trip was measured")
    # Round n of each target ran back to back with the other's round n (ABBA order).
    pair_ratios = [gw / echo for gw, echo in zip(rates["gateway"], rates["echo"], strict=True)]
    details: dict[str, Any] = {
        target: {
            "server_cores": total["server"] / total["elapsed"],
            "client_cores": total["client"] / total["elapsed"],
            "rates": [round(x) for x in rates[target]],
        }
        for target, total in totals.items()
    }
    details["pair_ratios"] = [round(x, 3) for x in pair_ratios]
    echo, gateway = totals["echo"], totals["gateway"]
    return RatioFigures(
        echo_rate=echo["trips"] / echo["elapsed"],
        heartbeat_rate=gateway["trips"] / gateway["elapsed"],
        echo_cpu_us=echo["server"] / echo["trips"] * 1e6,
        gateway_cpu_us=gateway["server"] / gateway["trips"] * 1e6,
        details=details,
    )


def burst_percentile(latencies_ms: Sequence[float], failed: int, fraction: float) -> float:
    """A percentile of a burst's attach latencies, its failed runtimes counted in.

    A runtime that was refused, cut off or timed out did not attach within the burst's
    `ATTACH_TIMEOUT_S`: it ranks as that long, never as absent. Leaving it out would let a
    gateway that sheds part of the burst report the latency of the part it kept.
    """
    censored = [ATTACH_TIMEOUT_S * 1000.0] * failed
    return percentile([*latencies_ms, *censored], fraction)


def _pairs(runs: Sequence[SeededRun]) -> list[list[str]]:
    return [[run.run_id, run.token] for run in runs]


class Bench:
    """One bench run: its directory, certificate, plan and results."""

    def __init__(self, plan: Plan, work: Path, nofile: int) -> None:
        self.plan = plan
        self.work = work
        self.nofile = nofile
        self.tls: TlsFiles = make_tls(work)
        self.results = Results()
        self._specs = 0

    # --- processes ------------------------------------------------------------------------------

    @asynccontextmanager
    async def gateway(self, name: str, *flags: str) -> AsyncIterator[tuple[Child, str, str]]:
        """A gateway child on its own data dir; yields it with its runtime and control URLs."""
        data_dir = self.work / name
        command = gateway_command(data_dir, self.tls, *flags)
        env = {"AGENT_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
        async with child(name, command, env=env, stderr=self.work / f"{name}.log") as gateway:
            runtime_url = (await gateway.expect(RUNTIME_LINE, STARTUP_S)).decode()
            control_url = (await gateway.expect(CONTROL_LINE, STARTUP_S)).decode()
            yield gateway, runtime_url, control_url

    @asynccontextmanager
    async def loadgen(self, spec: dict[str, Any]) -> AsyncIterator[Child]:
        """A load generator running `spec` (written to a file: run lists can be large)."""
        self._specs += 1
        path = self.work / f"spec-{self._specs}-{spec['scenario']}.json"
        path.write_bytes(orjson.dumps({"ca": str(self.tls.ca), **spec}))
        name = f"loadgen-{spec['scenario']}-{self._specs}"
        log = self.work / f"{name}.log"
        async with child(name, module_command("bench.loadgen", str(path)), stderr=log) as generator:
            yield generator

    # --- phase 1: in process --------------------------------------------------------------------

    async def run_micro(self) -> None:
        """The pure core's step rate, the codec's per-frame cost and the whole shell's."""
        print("micro benchmarks", flush=True)
        steps = micro.statemachine_steps_per_s(self.plan.statemachine_steps)
        self.results.put("statemachine_steps_per_s", steps, "steps/s")
        ours, theirs = micro.codec_us(self.plan.codec_loops, self.plan.codec_repeats)
        self.results.put("codec_us_per_frame", ours, "us")
        self.results.put("jsonschema_us_per_frame", theirs, "us")
        shell = await micro.shell_us_per_heartbeat(self.plan.codec_loops, self.plan.codec_repeats)
        self.results.put("shell_us_per_heartbeat", shell, "us")
        lookups = self.plan.codec_loops // 5
        alone = await micro.store_read_cpu_us(lookups, 1)
        self.results.put("store_read_cpu_us", alone, "us")
        together = await micro.store_read_cpu_us(lookups, 100)
        self.results.put("store_read_cpu_us_x100", together, "us")

    # --- phase 2: throughput --------------------------------------------------------------------

    async def run_throughput(self) -> None:
        """Echo next to the gateway, then outputs, inputs, run creation and, last, attach bursts."""
        plan = self.plan
        print("seeding runs for the throughput gateway", flush=True)
        runs = await seed_runs(
            self.work / "throughput" / "gateway.sqlite3",
            # Fresh runs for every attach round: a run attached in an earlier round would be a
            # re-attach within its recovery window, not the first attach the metric is about.
            {"ratio": plan.ratio_connections, "attach": plan.attach_runtimes * plan.attach_rounds,
             "out": plan.output_runtimes, "in": plan.input_runtimes},
            with_secret=frozenset({"out", "in"}),
        )
        echo_command = module_command("bench.echo_server", "--cert", str(self.tls.cert),
                                      "--key", str(self.tls.key))
        async with (
            child("echo", echo_command, stderr=self.work / "echo.log") as echo,
            self.gateway("throughput") as (gateway, runtime_url, control_url),
        ):
            echo_url = (await echo.expect(ECHO_LINE, 30)).decode()
            await self._ratio(runs["ratio"], echo, echo_url, gateway, runtime_url)
            await self._outputs(runs["out"], gateway, runtime_url)
            await self._inputs(runs["in"], gateway, runtime_url, control_url)
            await self._http_create(gateway, control_url)
            # Last: the bursts leave thousands of sessions whose leases then expire, and saving
            # each expiry is store work that would compete with the phases after it.
            await self._attach_burst(runs["attach"], echo, echo_url, gateway, runtime_url)

    async def _ratio(self, runs: list[SeededRun], echo: Child, echo_url: str, gateway: Child,
                     runtime_url: str) -> None:
        plan = self.plan
        print(f"echo vs heartbeat: {plan.ratio_connections} connections,"
              f" {plan.ratio_pairs} x 2 rounds of {plan.ratio_round_s} s", flush=True)
        # Connecting 2 x 100, the warm-up, then 2 x 2 x pairs rounds (each with its tail).
        timeout_s = 60 + 2 * plan.ratio_warmup_s + plan.ratio_pairs * 4 * (plan.ratio_round_s + 5)
        spec = {
            "scenario": "ratio", "runs": _pairs(runs), "gateway_url": runtime_url,
            "echo_url": echo_url, "server_pids": {"echo": echo.pid, "gateway": gateway.pid},
            "rounds": plan.ratio_pairs * 2, "round_s": plan.ratio_round_s,
            "warmup_s": plan.ratio_warmup_s, "cap": 1_000_000, "timeout_s": timeout_s,
        }
        async with self.loadgen(spec) as generator:
            result = await generator.event("result", timeout_s + 60)
        figures = ratio_figures(result["rounds"])
        self.results.put("echo_rt_per_s", figures.echo_rate, "round trips/s")
        self.results.put("heartbeat_rt_per_s", figures.heartbeat_rate, "round trips/s")
        self.results.put("heartbeat_ratio", figures.heartbeat_rate / figures.echo_rate, "ratio")
        self.results.details["ratio"] = figures.details
        self.results.put("gateway_cpu_us_per_heartbeat", figures.gateway_cpu_us, "us")
        self.results.put("echo_cpu_us_per_round_trip", figures.echo_cpu_us, "us")

    async def _burst(self, runs: list[SeededRun], url: str, server: Child,
                     echo: bool) -> dict[str, Any]:
        """Every run's runtime connects and attaches (or, to the echo server, echoes its attach
        frame) at one instant, from several generators; latencies from that instant."""
        plan = self.plan
        start_wall = time.time() + 4.0  # every generator has started and imported by then
        share = math.ceil(len(runs) / plan.attach_generators)
        cpu = server.cpu_seconds()
        async with AsyncExitStack() as stack:
            generators = [
                await stack.enter_async_context(self.loadgen({
                    "scenario": "attach", "url": url, "start_wall": start_wall, "echo": echo,
                    "runs": _pairs(runs[i * share:(i + 1) * share]),
                    "timeout_s": ATTACH_TIMEOUT_S,
                }))
                for i in range(plan.attach_generators)
            ]
            reports = [await g.event("result", ATTACH_TIMEOUT_S + 30) for g in generators]
            # Read before the generators hang up: the server's work on a thousand disconnects
            # is not part of an attach.
            server_cpu = server.cpu_seconds() - cpu
            for generator in generators:
                await generator.send(cmd="stop")
        latencies = [x for r in reports for x in r["latencies_ms"]]
        failures: dict[str, int] = {}
        for report in reports:
            for name, count in report["failures"].items():
                failures[name] = failures.get(name, 0) + count
        failed = sum(failures.values())
        if len(latencies) + failed != len(runs):
            raise RuntimeError(f"{len(runs)} runtimes in the burst, but {len(latencies)} attached"
                               f" and {failed} failed")
        if not latencies:
            raise RuntimeError(f"no runtime attached in the burst: {failures}")
        return {
            "p99_ms": burst_percentile(latencies, failed, 0.99),
            "p50_ms": burst_percentile(latencies, failed, 0.5),
            "max_ms": max(latencies), "done": len(latencies), "failures": failures,
            "server_cpu_s": round(server_cpu, 3),
            "client_cpu_s": [round(r["client_cpu_s"], 3) for r in reports],
        }

    async def _attach_burst(self, runs: list[SeededRun], echo: Child, echo_url: str,
                            gateway: Child, runtime_url: str) -> None:
        rounds, each = self.plan.attach_rounds, self.plan.attach_runtimes
        print(f"attach burst: {each} runtimes at once from {self.plan.attach_generators}"
              f" generators, echo server then gateway, {rounds} time(s)", flush=True)
        bursts: dict[str, list[dict[str, Any]]] = {"echo": [], "gateway": []}
        for number in range(rounds):
            fresh = runs[number * each:(number + 1) * each]
            bursts["echo"].append(await self._burst(fresh, echo_url, echo, echo=True))
            bursts["gateway"].append(await self._burst(fresh, runtime_url, gateway, echo=False))

        def median(name: str, key: str) -> float:
            return statistics.median(float(b[key]) for b in bursts[name])

        def cpu_s_each(name: str) -> float:
            per = [float(b["server_cpu_s"]) / max(int(b["done"]), 1) for b in bursts[name]]
            return statistics.median(per)

        self.results.put("attach_p99_ms", median("gateway", "p99_ms"), "ms")
        self.results.put("attach_p50_ms", median("gateway", "p50_ms"), "ms")
        self.results.put("echo_connect_p99_ms", median("echo", "p99_ms"), "ms")
        self.results.put("gateway_cpu_ms_per_attach", cpu_s_each("gateway") * 1000, "ms")
        self.results.put("echo_cpu_ms_per_connect", cpu_s_each("echo") * 1000, "ms")
        self.results.details["attach"] = bursts
        for name, outcomes in bursts.items():
            failed = sum(sum(outcome["failures"].values()) for outcome in outcomes)
            if failed:
                self.results.notes.append(
                    f"attach burst ({name}): {failed} of {each * rounds} runtimes failed;"
                    f" the percentiles count them as not attached within the burst's"
                    f" {ATTACH_TIMEOUT_S} s (details.attach has the reasons)")

    async def _outputs(self, runs: list[SeededRun], gateway: Child, runtime_url: str) -> None:
        plan = self.plan
        print(f"outputs: {len(runs)} runtimes publishing batches of 100 events", flush=True)
        spec = {
            "scenario": "outputs", "url": runtime_url, "runs": _pairs(runs), "batch": 100,
            "batches": plan.output_batches, "duration_s": plan.output_duration_s,
            "text_bytes": 84, "timeout_s": plan.output_duration_s + 60,
        }
        cpu = gateway.cpu_seconds()
        async with self.loadgen(spec) as generator:
            report = await generator.event("result", plan.output_duration_s + 120)
        gateway_cpu = gateway.cpu_seconds() - cpu
        stored = count_outputs(self.work / "throughput" / "gateway.sqlite3", report["runs"])
        if stored < report["acked_events"]:
            raise RuntimeError(f"{report['acked_events']} events acknowledged but only {stored}"
                               " found in the store")
        self.results.put("output_events_per_s", stored / report["elapsed_s"], "events/s")
        self.results.details["outputs"] = {
            "stored": stored, "acknowledged": report["acked_events"], "bad": report["bad"],
            "elapsed_s": round(report["elapsed_s"], 3), "gateway_cpu_s": round(gateway_cpu, 3),
            "client_cpu_s": round(report["client_cpu_s"], 3),
        }

    async def _inputs(self, runs: list[SeededRun], gateway: Child, runtime_url: str,
                      control_url: str) -> None:
        plan = self.plan
        print(f"inputs: {plan.input_posts} posts of 100 events to each of {len(runs)} runs",
              flush=True)
        spec = {
            "scenario": "inputs", "url": runtime_url, "control_url": control_url,
            "admin_token": ADMIN_TOKEN, "runs": _pairs(runs), "posts": plan.input_posts,
            "events_per_post": 100, "text_bytes": 120, "timeout_s": 120,
        }
        cpu = gateway.cpu_seconds()
        async with self.loadgen(spec) as generator:
            report = await generator.event("result", 180)
        self.results.put("input_events_per_s", report["acked_events"] / report["elapsed_s"],
                         "events/s")
        self.results.details["inputs"] = {
            "acknowledged": report["acked_events"], "elapsed_s": round(report["elapsed_s"], 3),
            "gateway_cpu_s": round(gateway.cpu_seconds() - cpu, 3),
            "client_cpu_s": round(report["client_cpu_s"], 3),
        }

    async def _http_create(self, gateway: Child, control_url: str) -> None:
        count = self.plan.http_runs
        print(f"POST /v1/runs x {count}", flush=True)
        headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        body = {"capabilities": [], "secrets": {}, "config": {"model": "bench"}}
        async with httpx.AsyncClient(base_url=control_url, headers=headers, timeout=30) as http:
            start = trio.current_time()
            with trio.fail_after(60 + count / 10):
                for _ in range(count):
                    response = await http.post("/v1/runs", json=body)
                    if response.status_code != 201:
                        raise RuntimeError(f"POST /v1/runs answered {response.status_code}")
            elapsed = trio.current_time() - start
        self.results.put("create_run_http_per_s", count / elapsed, "runs/s")

    # --- phase 3: holding sessions --------------------------------------------------------------

    async def _echo_memory(self, count: int, module: str, metric: str) -> None:
        """RSS growth of an echo server per idle TLS WebSocket: the transport's floor."""
        print(f"{module} memory: {count} idle connections", flush=True)
        command = module_command(module, "--cert", str(self.tls.cert), "--key", str(self.tls.key))
        async with child(metric, command, stderr=self.work / f"{metric}.log") as echo:
            url = (await echo.expect(ECHO_LINE, 30)).decode()
            await trio.sleep(1.0)
            before = echo.rss_bytes()
            spec = {"scenario": "idle", "url": url, "connections": count,
                    "connect_concurrency": 32, "connect_timeout_s": 30,
                    "timeout_s": 60 + count / 20}
            async with self.loadgen(spec) as generator:
                opened = (await generator.event("attached", 120 + count / 20))["attached"]
                await trio.sleep(3.0)
                after = echo.rss_bytes()
                await generator.send(cmd="stop")
        self.results.put(metric, (after - before) / max(opened, 1) / 1024, "KiB")

    async def run_hold(self) -> None:
        """A fresh gateway holding as many sessions as the plan (and the fd limit) allows."""
        plan = self.plan
        wanted = plan.hold_sessions
        capacity = session_capacity(wanted, self.nofile)
        count = min(wanted, capacity)
        if count < wanted:
            self.results.notes.append(
                f"sessions_held: this box's RLIMIT_NOFILE hard limit is {self.nofile}, so one"
                f" gateway process can hold at most ~{capacity} runtime sockets; the run tried"
                f" {count} of the {wanted} asked (the limit, not the gateway, is the cap here)")
        # As many connections as the gateway will hold: a process's fixed costs spread over more
        # connections at scale (72 KiB each at 40, 39 at 2 000), so only the same count compares.
        await self._echo_memory(count, "bench.echo_server", "echo_conn_kib")
        # The proposal to trio-websocket (read in the connection's own task), on the same TLS.
        await self._echo_memory(count, "bench.direct_echo", "direct_echo_conn_kib")
        print(f"seeding {count} runs for the hold gateway", flush=True)
        runs = (await seed_runs(self.work / "hold" / "gateway.sqlite3", {"hold": count}))["hold"]
        interval = str(plan.heartbeat_interval_ms)
        async with self.gateway("hold", "--heartbeat-interval-ms", interval) as (
            gateway, runtime_url, control_url,
        ):
            await trio.sleep(1.0)
            rss_before = gateway.rss_bytes()
            cpu = gateway.cpu_seconds()
            generators = plan.hold_generators
            share = math.ceil(count / generators)
            origin = time.time()
            print(f"holding {count} sessions from {generators} generators, heartbeat every"
                  f" {plan.heartbeat_interval_ms} ms", flush=True)
            async with AsyncExitStack() as stack:
                children = [
                    await stack.enter_async_context(self.loadgen({
                        "scenario": "hold", "url": runtime_url, "offset": i * share,
                        "total": count, "runs": _pairs(runs[i * share:(i + 1) * share]),
                        "interval_ms": plan.heartbeat_interval_ms, "origin_wall": origin,
                        "connect_concurrency": 32, "connect_timeout_s": 30,
                        "timeout_s": 60 + count / 20,
                    }))
                    for i in range(generators)
                ]
                ramp = [await g.event("attached", 120 + count / 20) for g in children]
                attached = sum(r["attached"] for r in ramp)
                ramp_s = max(r["elapsed_s"] for r in ramp)
                ramp_cpu = gateway.cpu_seconds() - cpu
                await trio.sleep(3.0)  # let the allocator settle after the ramp
                rss_after = gateway.rss_bytes()
                print(f"  attached {attached} in {ramp_s:.1f} s; measuring"
                      f" {plan.hold_window_s} s of heartbeats", flush=True)
                cpu, began = gateway.cpu_seconds(), trio.current_time()
                for generator in children:
                    await generator.send(cmd="measure", window_s=plan.hold_window_s)
                reports = [await g.event("result", plan.hold_window_s + 60) for g in children]
                window_cpu = gateway.cpu_seconds() - cpu
                window_s = trio.current_time() - began  # the window and its grace, as waited
                leased = await leased_sessions(control_url)
                for generator in children:
                    await generator.send(cmd="stop")
        answered = [x for r in reports for x in r["latencies_ms"]]
        # Heartbeats due in the window with no reply when it closed rank by how long they had
        # waited: without them, the slowest heartbeats would be missing from the p99.
        unanswered = [x for r in reports for x in r["unanswered_ms"]]
        latencies = answered + unanswered
        refused = sum(r["refused"] for r in reports)
        lost = sum(r["lost"] for r in reports)
        held = attached - lost if refused == 0 else 0
        held = min(held, leased)
        self.results.put("sessions_held", held, "sessions")
        self.results.put("session_kib", (rss_after - rss_before) / max(attached, 1) / 1024, "KiB")
        if latencies:
            self.results.put("heartbeat_p99_ms", percentile(latencies, 0.99), "ms")
        if unanswered:
            self.results.notes.append(
                f"heartbeat_p99_ms: {len(unanswered)} of the {len(latencies)} heartbeats due in the"
                f" window had no reply when it closed (up to {max(unanswered):.0f} ms after they"
                " were due); they count in the p99 at that wait, a lower bound")
        self.results.put("hold_attach_per_s", attached / ramp_s, "sessions/s")
        failures: dict[str, int] = {}
        for report in ramp:
            for name, n in report["failures"].items():
                failures[name] = failures.get(name, 0) + n
        self.results.details["hold"] = {
            "asked": wanted, "tried": count, "attached": attached, "attach_failures": failures,
            "lost_in_window": lost, "refused_heartbeats": refused, "leased_gauge": leased,
            "heartbeats_timed": len(answered), "heartbeats_unanswered": len(unanswered),
            "heartbeat_p50_ms": percentile(latencies, 0.5) if latencies else None,
            "heartbeat_max_ms": max(latencies, default=None),
            "generator_lag_ms_max": max(r["lag_ms_max"] for r in reports),
            "rss_before_mib": round(rss_before / 2**20, 1),
            "rss_after_mib": round(rss_after / 2**20, 1),
            "ramp_s": round(ramp_s, 2), "ramp_gateway_cpu_s": round(ramp_cpu, 2),
            "window_gateway_cores": round(window_cpu / window_s, 3),
            "generator_cpu_s": [round(r["client_cpu_s"], 2) for r in reports],
        }
        if not latencies:
            raise RuntimeError("no heartbeat was timed in the hold window")


async def leased_sessions(control_url: str) -> int:
    """The gateway's own count of leased sessions, from its Prometheus exposition."""
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(base_url=control_url, headers=headers, timeout=30) as http:
        response = await http.get("/metrics")
    response.raise_for_status()
    match = re.search(r'^agent_gateway_sessions\{state="leased"\} (\S+)$', response.text, re.M)
    if match is None:
        raise RuntimeError("the gateway's /metrics has no leased-sessions gauge")
    return int(float(match.group(1)))


def count_outputs(database: Path, run_ids: Sequence[str]) -> int:
    """Output events stored for these runs, read from the SQLite file (read-only)."""
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        marks = ",".join("?" * len(run_ids))
        row = connection.execute(
            f"SELECT count(*) FROM outputs WHERE run_id IN ({marks})", tuple(run_ids)
        ).fetchone()
        return int(row[0])
    finally:
        connection.close()


def interpret(results: Results, cores: int, load: float) -> None:
    """Notes that put each gateway figure next to its bare-transport twin from the same run."""
    value = {name: entry["value"] for name, entry in results.metrics.items()}
    notes = results.notes
    if load > cores:
        notes.append(
            f"the box was shared: load average {load:.1f} on {cores} cores when the run began, so"
            " absolute rates are lower than on an idle machine; the ratios and the per-operation"
            " CPU figures compare the gateway with the echo server under the same conditions")
    if {"gateway_cpu_us_per_heartbeat", "echo_cpu_us_per_round_trip"} <= set(value):
        gateway, echo = value["gateway_cpu_us_per_heartbeat"], value["echo_cpu_us_per_round_trip"]
        notes.append(
            f"CPU per round trip: gateway {gateway:.0f} us per heartbeat, echo server {echo:.0f} us"
            f" per echo; the gateway's own work is {gateway - echo:.0f} us per heartbeat (the"
            f" ratio of the two is {echo / gateway:.2f})")
    pairs = sorted(results.details.get("ratio", {}).get("pair_ratios", []))
    if len(pairs) >= 4:
        quarter = len(pairs) // 4
        notes.append(
            "heartbeat_ratio is heartbeat_rt_per_s / echo_rt_per_s, each the rate over all"
            f" {len(pairs)} of its rounds, interleaved back to back with the other's (ABBA);"
            f" the ratio of one pair of rounds ranged from {pairs[0]:.2f} to {pairs[-1]:.2f}"
            f" (middle half {pairs[quarter]:.2f}-{pairs[-1 - quarter]:.2f}): on a shared host"
            " a short measurement moves by about that much, so read it with the CPU ratio above")
    outputs = results.details.get("outputs")
    if outputs and outputs["stored"] and "echo_cpu_us_per_round_trip" in value:
        notes.append(
            f"outputs: the gateway spent {outputs['gateway_cpu_s'] / outputs['stored'] * 1e6:.1f}"
            f" us of CPU per durable event, {outputs['gateway_cpu_s'] / outputs['elapsed_s']:.2f}"
            " cores busy: one process bound by its own CPU, so the rate follows the host's speed"
            " (read that speed from the echo server's CPU per round trip in the same run,"
            f" {value['echo_cpu_us_per_round_trip']:.0f} us here)")
    if {"session_kib", "echo_conn_kib"} <= set(value):
        notes.append(
            f"memory: a bare trio-websocket TLS connection costs {value['echo_conn_kib']:.1f} KiB"
            f" in the echo server; the gateway's session costs {value['session_kib']:.1f} KiB, so"
            f" its own share is {value['session_kib'] - value['echo_conn_kib']:.1f} KiB")
    if {"direct_echo_conn_kib", "echo_conn_kib"} <= set(value):
        notes.append(
            f"the transport's own memory: an echo server that reads in each connection's own task"
            f" (wsproto on the same TLS, no reader task or channel; bench/direct_echo.py, the"
            f" change proposed to trio-websocket) holds {value['direct_echo_conn_kib']:.1f} KiB"
            f" per idle connection, {value['echo_conn_kib'] - value['direct_echo_conn_kib']:.1f}"
            " KiB less than trio-websocket's echo server")
    if {"attach_p99_ms", "echo_connect_p99_ms"} <= set(value):
        notes.append(
            f"attach burst: the bare transport's p99 for the same 1 000 connections (TCP, TLS,"
            f" upgrade, one round trip) is {value['echo_connect_p99_ms']:.0f} ms against the"
            f" gateway's {value['attach_p99_ms']:.0f} ms; server CPU per connection is"
            f" {value.get('echo_cpu_ms_per_connect', math.nan):.2f} ms (echo) and"
            f" {value.get('gateway_cpu_ms_per_attach', math.nan):.2f} ms (gateway)")


async def run_plan(plan: Plan, nofile: int, phases: Sequence[str]) -> Results:
    """Run the chosen phases in a scratch directory; return what they measured."""
    with tempfile.TemporaryDirectory(prefix="agent-gateway-bench-") as scratch:
        bench = Bench(plan, Path(scratch), nofile)
        if "micro" in phases:
            await bench.run_micro()
        if "throughput" in phases:
            await bench.run_throughput()
        if "hold" in phases:
            await bench.run_hold()
        return bench.results
