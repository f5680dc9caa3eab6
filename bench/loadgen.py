"""A load-generator process: one scenario against a running server, results as JSON lines.

    python -m bench.loadgen SPEC.json

The orchestrator (`bench.suite`) writes the spec, starts this process, and reads its stdout;
commands that must reach several generators at the same moment (start measuring, stop) come on
stdin. Every scenario is bounded by a count and by `timeout_s`, and ends by itself.
"""

from __future__ import annotations

import gc
import math
import os
import ssl
import sys
import time
import traceback
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection

from bench.lines import LineReader, emit
from bench.wire import (
    ACCEPTED,
    HEARTBEAT_REPLY,
    AttachFailed,
    HeartbeatFrames,
    ack_frame,
    attach,
    attach_frame,
    connect,
    output_batch,
)
from gateway.limits import raise_nofile

Spec = dict[str, Any]
# A generator holding thousands of connections has a big, long-lived heap: with CPython's default
# thresholds its full collections pause it for seconds and the pauses show up as gateway latency.
# Fewer young collections promote fewer in-flight objects, so full collections become rare.
GC_THRESHOLDS = (50_000, 20, 100)
# What a runtime connection can fail with under load; counted by name, never fatal to the run.
FAILURES = (ConnectionClosed, HandshakeError, AttachFailed, OSError, trio.BrokenResourceError)
OUTPUT_REPLY = '"channel":"runtime.task.output.reply"'
INPUT_EVENT = '"channel":"service.task.input.event"'
ACK_REPLY = '"channel":"runtime.task.input.ack.reply"'
MAX_HEARTBEATS = 1_000_000  # a held session's heartbeats (it is stopped long before)


def _context(spec: Spec) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=spec["ca"])


def _stdin() -> LineReader:
    return LineReader(trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())))


def _cpu() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


def _instance(index: int) -> str:
    return f"rt-{os.getpid()}-{index}"


# --- heartbeat against echo, interleaved -----------------------------------------------------


async def _round(
    pairs: list[tuple[WebSocketConnection, HeartbeatFrames]], duration: float, cap: int,
    is_ok: Callable[[str, str | bytes], bool],
) -> tuple[int, int, float]:
    """Every connection does sequential round trips until the deadline (or `cap` each)."""
    good = bad = 0
    deadline = trio.current_time() + duration

    async def one(ws: WebSocketConnection, frames: HeartbeatFrames) -> None:
        nonlocal good, bad
        for _ in range(cap):
            if trio.current_time() >= deadline:
                return
            frame = frames.next()
            await ws.send_message(frame)
            if is_ok(frame, await ws.get_message()):
                good += 1
            else:
                bad += 1

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for ws, frames in pairs:
            nursery.start_soon(one, ws, frames)
    return good, bad, trio.current_time() - start


def _echoed(frame: str, reply: str | bytes) -> bool:
    return reply == frame


def _heartbeat_ok(frame: str, reply: str | bytes) -> bool:
    return isinstance(reply, str) and HEARTBEAT_REPLY in reply and ACCEPTED in reply


async def ratio(spec: Spec) -> None:
    """Alternate echo and gateway-heartbeat rounds over the same kind of connections."""
    context = _context(spec)
    servers = {name: psutil.Process(pid) for name, pid in spec["server_pids"].items()}
    with trio.fail_after(spec["timeout_s"]):  # connecting and attaching included
        async with trio.open_nursery() as nursery:
            echo: list[tuple[WebSocketConnection, HeartbeatFrames]] = []
            gateway: list[tuple[WebSocketConnection, HeartbeatFrames]] = []
            for index, (run_id, token) in enumerate(spec["runs"]):
                instance = _instance(index)
                ws = await connect(nursery, spec["gateway_url"], context, token)
                session_id = await attach(ws, run_id, instance)
                gateway.append((ws, HeartbeatFrames(session_id, run_id, instance)))
                # The echo connection sends the very same bytes as its gateway twin.
                ws = await connect(nursery, spec["echo_url"], context)
                echo.append((ws, HeartbeatFrames(session_id, run_id, instance)))
            targets = {"echo": (echo, _echoed), "gateway": (gateway, _heartbeat_ok)}
            for name in ("echo", "gateway"):  # warm-up: caches, allocator, branch predictors
                pairs, check = targets[name]
                await _round(pairs, spec["warmup_s"], spec["cap"], check)
            rounds = []
            for number in range(spec["rounds"]):
                order = ("echo", "gateway") if number % 2 == 0 else ("gateway", "echo")
                for name in order:
                    pairs, check = targets[name]
                    server = servers[name]
                    server_cpu, client_cpu = sum(server.cpu_times()[:2]), _cpu()
                    good, bad, elapsed = await _round(pairs, spec["round_s"], spec["cap"], check)
                    rounds.append({
                        "target": name, "round_trips": good, "bad": bad, "elapsed_s": elapsed,
                        "server_cpu_s": sum(server.cpu_times()[:2]) - server_cpu,
                        "client_cpu_s": _cpu() - client_cpu,
                    })
            emit(event="result", rounds=rounds)
            nursery.cancel_scope.cancel()


# --- many sessions held, heartbeating at their interval --------------------------------------


def due_time(first_due: float, interval: float, number: int) -> float:
    """When a session's heartbeat `number` (from 0) is due: one formula for the session's loop
    and for `unanswered_waits`, so both place a heartbeat on the same side of a window's edge."""
    return first_due + number * interval


def dues_in_window(first_due: float, interval: float, start: float, end: float) -> list[float]:
    """The due times of a session's heartbeats that fall in [start, end), in order."""
    number = max(0, math.floor((start - first_due) / interval) - 1)
    dues = []
    while (due := due_time(first_due, interval, number)) < end:
        if due >= start:
            dues.append(due)
        number += 1
    return dues


class Schedule:
    """One live session's heartbeat schedule and how many of its window's heartbeats were timed."""

    __slots__ = ("first_due", "timed")

    def __init__(self, first_due: float) -> None:
        self.first_due = first_due
        self.timed = 0


def unanswered_waits(schedules: Iterable[Schedule], interval: float, start: float, end: float,
                     now: float) -> list[float]:
    """How long each heartbeat due in [start, end) but not answered by `now` has waited.

    A session's heartbeats go one at a time and in order, so the first `timed` of its window's
    heartbeats are the answered ones; the others are in flight or still unsent behind a reply
    that has not come. Each has waited at least `now - due`: leaving them out would take the
    slowest heartbeats out of the p99.
    """
    waits = []
    for schedule in schedules:
        dues = dues_in_window(schedule.first_due, interval, start, end)
        waits += [now - due for due in dues[schedule.timed:]]
    return waits


class _Hold:
    """Shared tallies of one generator's held sessions."""

    def __init__(self, runs: int) -> None:
        self.remaining = runs
        self.attached = 0
        self.failures: Counter[str] = Counter()
        self.all_tried = trio.Event()
        self.window = (math.inf, math.inf)
        self.schedules: dict[int, Schedule] = {}  # live sessions, by index
        self.latencies: list[float] = []
        self.lags: list[float] = []
        self.refused = 0
        self.lost = 0

    def tried(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.all_tried.set()


async def hold(spec: Spec) -> None:
    """Attach every run, heartbeat each at its own phase of the interval, time a window of it."""
    context = _context(spec)
    interval = spec["interval_ms"] / 1000
    origin = trio.current_time() + (spec["origin_wall"] - time.time())
    tally = _Hold(len(spec["runs"]))
    limiter = trio.Semaphore(spec["connect_concurrency"])
    commands = _stdin()

    async def session(nursery: trio.Nursery, index: int, run_id: str, token: str) -> None:
        instance = _instance(index)
        async with limiter:
            try:
                with trio.fail_after(spec["connect_timeout_s"]):
                    ws = await connect(nursery, spec["url"], context, token)
                    session_id = await attach(ws, run_id, instance)
            except (*FAILURES, trio.TooSlowError) as failure:
                tally.failures[type(failure).__name__] += 1
                tally.tried()
                return
        tally.attached += 1
        tally.tried()
        frames = HeartbeatFrames(session_id, run_id, instance)
        phase = (spec["offset"] + index) / spec["total"] * interval
        ticks = math.ceil((trio.current_time() - origin - phase) / interval)
        schedule = tally.schedules[index] = Schedule(origin + phase + ticks * interval)
        try:
            for number in range(MAX_HEARTBEATS):
                due = due_time(schedule.first_due, interval, number)
                await trio.sleep_until(due)
                sent = trio.current_time()
                await ws.send_message(frames.next())
                reply = await ws.get_message()
                start, end = tally.window
                if start <= due < end:
                    tally.latencies.append(trio.current_time() - sent)
                    tally.lags.append(sent - due)
                    schedule.timed += 1
                    if not _heartbeat_ok("", reply):
                        tally.refused += 1
        except FAILURES:
            tally.lost += 1
            del tally.schedules[index]

    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        for index, (run_id, token) in enumerate(spec["runs"]):
            nursery.start_soon(session, nursery, index, run_id, token)
        with trio.fail_after(spec["timeout_s"]):
            await tally.all_tried.wait()
        emit(event="attached", attached=tally.attached, failures=dict(tally.failures),
             elapsed_s=trio.current_time() - started)
        gc.freeze()  # the held connections are permanent now: keep them out of every collection
        command = await commands.read_json()
        if command is not None and command.get("cmd") == "measure":
            window = float(command["window_s"])
            now = trio.current_time()
            tally.window = (now, now + window)
            cpu = _cpu()
            await trio.sleep(window + min(interval, 5.0))  # heartbeats due late in it finish
            waits = unanswered_waits(tally.schedules.values(), interval, *tally.window,
                                     trio.current_time())
            emit(event="result", latencies_ms=[round(x * 1000, 3) for x in tally.latencies],
                 unanswered_ms=[round(x * 1000, 3) for x in waits],
                 lag_ms_max=round(max(tally.lags, default=0.0) * 1000, 3), refused=tally.refused,
                 lost=tally.lost, attached=tally.attached, client_cpu_s=_cpu() - cpu,
                 window_s=window)
            await commands.read_json()  # "stop", or end of stdin
        nursery.cancel_scope.cancel()


async def idle(spec: Spec) -> None:
    """Open connections and leave them idle: the transport's own cost per connection."""
    context = _context(spec)
    limiter = trio.Semaphore(spec["connect_concurrency"])
    failures: Counter[str] = Counter()
    opened = 0
    async with trio.open_nursery() as nursery:

        async def one() -> None:
            nonlocal opened
            async with limiter:
                try:
                    with trio.fail_after(spec["connect_timeout_s"]):
                        await connect(nursery, spec["url"], context)
                    opened += 1
                except (*FAILURES, trio.TooSlowError) as failure:
                    failures[type(failure).__name__] += 1

        with trio.fail_after(spec["timeout_s"]):
            async with trio.open_nursery() as openers:
                for _ in range(spec["connections"]):
                    openers.start_soon(one)
        emit(event="attached", attached=opened, failures=dict(failures))
        await _stdin().read_json()  # "stop", or end of stdin
        nursery.cancel_scope.cancel()


# --- many runtimes attaching at once ---------------------------------------------------------


async def attach_burst(spec: Spec) -> None:
    """At one agreed instant, every run connects, authenticates and attaches.

    Against the echo server (`"echo": true`) the same connections send the same attach frame
    and wait for its echo: the transport's own share of an attach.
    """
    context = _context(spec)
    echo = bool(spec.get("echo"))
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    async with trio.open_nursery() as connections:
        await trio.sleep(max(0.0, spec["start_wall"] - time.time()))
        start = trio.current_time()

        async def one(index: int, run_id: str, token: str) -> None:
            try:
                ws = await connect(connections, spec["url"], context, None if echo else token)
                if echo:
                    frame = attach_frame(run_id, _instance(index))
                    await ws.send_message(frame)
                    if await ws.get_message() != frame:
                        raise AttachFailed("the echo server changed the frame")
                else:
                    await attach(ws, run_id, _instance(index))
                latencies.append(trio.current_time() - start)
            except FAILURES as failure:
                failures[type(failure).__name__] += 1

        cpu = _cpu()
        with trio.move_on_after(spec["timeout_s"]) as bounded:
            async with trio.open_nursery() as attaches:
                for index, (run_id, token) in enumerate(spec["runs"]):
                    attaches.start_soon(one, index, run_id, token)
        if bounded.cancelled_caught:
            failures["timeout"] += len(spec["runs"]) - len(latencies) - sum(failures.values())
        emit(event="result", latencies_ms=[round(x * 1000, 3) for x in latencies],
             failures=dict(failures), client_cpu_s=_cpu() - cpu)
        # Connections stay open until the orchestrator has read the server's CPU.
        await _stdin().read_json()  # "stop", or end of stdin
        connections.cancel_scope.cancel()


# --- output events, durably ------------------------------------------------------------------


async def _attach_all(
    nursery: trio.Nursery, spec: Spec, url: str
) -> list[tuple[WebSocketConnection, str, str]]:
    context = _context(spec)
    attached: list[tuple[WebSocketConnection, str, str]] = []
    for index, (run_id, token) in enumerate(spec["runs"]):
        ws = await connect(nursery, url, context, token)
        attached.append((ws, run_id, await attach(ws, run_id, _instance(index))))
    return attached


async def outputs(spec: Spec) -> None:
    """Each runtime publishes batches of events back to back, each awaiting its durable reply."""
    size, text = spec["batch"], "x" * spec["text_bytes"]
    acked = bad = 0

    async def publish(ws: WebSocketConnection, run_id: str, session_id: str, until: float) -> None:
        nonlocal acked, bad
        for number in range(spec["batches"]):
            if trio.current_time() >= until:
                return
            await ws.send_message(output_batch(session_id, run_id, number * size, size, text))
            reply = await ws.get_message()
            if isinstance(reply, str) and OUTPUT_REPLY in reply and ACCEPTED in reply:
                acked += size
            else:
                bad += 1
                return

    # Attaching included: a gateway that never answers an attach must not hold the run.
    with trio.fail_after(spec["timeout_s"]):
        async with trio.open_nursery() as nursery:
            runtimes = await _attach_all(nursery, spec, spec["url"])
            cpu, start = _cpu(), trio.current_time()
            async with trio.open_nursery() as publishers:
                for ws, run_id, session_id in runtimes:
                    publishers.start_soon(publish, ws, run_id, session_id,
                                          start + spec["duration_s"])
            elapsed = trio.current_time() - start
            emit(event="result", acked_events=acked, bad=bad, elapsed_s=elapsed,
                 client_cpu_s=_cpu() - cpu, runs=[run_id for _, run_id, _ in runtimes])
            nursery.cancel_scope.cancel()


# --- input events, posted over HTTP and acknowledged by runtimes -----------------------------


async def _acknowledge(ws: WebSocketConnection, run_id: str, session_id: str, last: int,
                       done: trio.Event) -> None:
    """Ack every delivery cumulatively; `done` is set once the ack of `last` is durable."""
    sent: deque[int] = deque()
    while not done.is_set():
        message = await ws.get_message()
        if not isinstance(message, str):
            continue
        if INPUT_EVENT in message:
            seq = orjson.loads(message)["payload"]["events"][-1]["seq"]
            sent.append(seq)
            await ws.send_message(ack_frame(session_id, run_id, seq))
        elif ACK_REPLY in message and ACCEPTED in message and sent and sent.popleft() == last:
            done.set()


async def inputs(spec: Spec) -> None:
    """Post input events through the control API; runtimes acknowledge what they receive."""
    per_post, posts = spec["events_per_post"], spec["posts"]
    body = orjson.dumps({"events": [
        {"type": "task.input", "data": {"text": "y" * spec["text_bytes"], "n": n}}
        for n in range(per_post)
    ]})
    headers = {"authorization": f"Bearer {spec['admin_token']}",
               "content-type": "application/json"}
    posted = 0

    async def post_all(http: httpx.AsyncClient, run_id: str) -> None:
        nonlocal posted
        for _ in range(posts):
            response = await http.post(f"/v1/runs/{run_id}/inputs", content=body)
            if response.status_code != 202:
                raise RuntimeError(f"POST inputs answered {response.status_code}")
            posted += per_post

    with trio.fail_after(spec["timeout_s"]):  # attaching included, as for outputs
        async with (
            httpx.AsyncClient(base_url=spec["control_url"], headers=headers, timeout=60) as http,
            trio.open_nursery() as nursery,
        ):
            runtimes = await _attach_all(nursery, spec, spec["url"])
            cpu, start = _cpu(), trio.current_time()
            async with trio.open_nursery() as work:
                for ws, run_id, session_id in runtimes:
                    done = trio.Event()
                    work.start_soon(_acknowledge, ws, run_id, session_id, per_post * posts - 1,
                                    done)
                    work.start_soon(post_all, http, run_id)
            elapsed = trio.current_time() - start
            emit(event="result", acked_events=posted, elapsed_s=elapsed,
                 client_cpu_s=_cpu() - cpu)
            nursery.cancel_scope.cancel()


SCENARIOS: dict[str, Callable[[Spec], Awaitable[None]]] = {
    "ratio": ratio,
    "hold": hold,
    "idle": idle,
    "attach": attach_burst,
    "outputs": outputs,
    "inputs": inputs,
}


def main() -> None:
    """Run the scenario the spec file names; report a failure as an `error` line."""
    spec: Spec = orjson.loads(Path(sys.argv[1]).read_bytes())
    raise_nofile()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        trio.run(SCENARIOS[spec["scenario"]], spec)
    except BaseException as failure:  # the orchestrator must hear why, whatever it was
        emit(event="error", message="; ".join(_leaves(failure)),
             trace=traceback.format_exc(limit=12))
        sys.exit(1)


def _leaves(failure: BaseException) -> list[str]:
    """The individual failures inside (possibly nested) exception groups."""
    if isinstance(failure, BaseExceptionGroup):
        return [leaf for inner in failure.exceptions for leaf in _leaves(inner)]
    return [f"{type(failure).__name__}: {failure}"]


if __name__ == "__main__":
    main()
