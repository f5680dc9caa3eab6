"""Shared pieces of the fault tests: runtimes under load, a platform posting inputs, the audit.

Every fault test asks the same question after a different fault (a SIGKILL, a cut or stalled
link, a drain): of everything the gateway acknowledged, is each piece stored exactly once and in
order? The runtimes here keep the books (what was published, written and delivered, and during
which fault), the platform task keeps the books of posted inputs, and `audit` compares both with
what the store holds at the end.
"""

from __future__ import annotations

import os
import random
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import trio
from e2e_support import ADMIN_TOKEN, CertificateAuthority, Wire
from process_support import GatewayProcess
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from gateway.chaos import ChaosProxy
from gateway.client import GatewaySession, connect
from gateway.store.base import Store

CAPABILITIES = ["kv.read", "kv.write"]
# Fast reconnects keep the tests short; the backoff logic itself is the client tests' business.
FAST_CLIENT: dict[str, Any] = {
    "reconnect_backoff": (0.02, 0.2),
    "ack_delay": 0.01,
    "connect_timeout": 2.0,
}
UNATTRIBUTED = -1  # a loss (a gap, an extra event) that no single fault can be blamed for


def fault_seed() -> int:
    """The seed of a random fault schedule: `FAULT_SEED=<n>` replays a run, else a fresh one."""
    raw = os.environ.get("FAULT_SEED")
    return int(raw) if raw else random.SystemRandom().randrange(2**32)


class Faults:
    """How many faults were injected so far; every acknowledgement is stamped with this count,
    so a loss found at the end can be traced to the fault it followed."""

    def __init__(self) -> None:
        self.injected = 0


@dataclass
class Book:
    """One runtime's record of what the gateway (and the platform) acknowledged to it."""

    run_id: str
    token: str
    published: list[dict[str, Any]] = field(default_factory=list)  # every draft, in call order
    outputs: list[tuple[int, dict[str, Any], int]] = field(default_factory=list)  # seq, data, fault
    kv: list[tuple[str, str, int]] = field(default_factory=list)  # acknowledged key, value, fault
    delivered: list[tuple[int, dict[str, Any], int]] = field(default_factory=list)  # handler saw
    posted: dict[int, tuple[dict[str, Any], int]] = field(default_factory=dict)  # 202 posts
    unknown_posts: int = 0  # posts whose answer never came (the gateway died mid-request)
    sentinel: int | None = None
    sentinel_seen: trio.Event = field(default_factory=trio.Event)
    session: GatewaySession | None = None
    first_session_id: str = ""

    def operations(self) -> int:
        """Acknowledged operations this runtime did: what a loss would be counted against."""
        return len(self.outputs) + len(self.kv) + len(self.delivered)


# --- the platform ------------------------------------------------------------------------------


def control_client(timeout: float = 10) -> httpx.AsyncClient:
    """The platform's HTTP client (base URLs are given per request: gateways restart)."""
    return httpx.AsyncClient(timeout=timeout, headers={"authorization": f"Bearer {ADMIN_TOKEN}"})


async def create_book(control_url: str, **body: Any) -> Book:
    """Register a run for one runtime and open its book."""
    body.setdefault("capabilities", CAPABILITIES)
    body.setdefault("secrets", {})
    body.setdefault("config", {})
    async with control_client() as http:
        response = await http.post(f"{control_url}/v1/runs", json=body)
    assert response.status_code == 201, response.text
    created = response.json()
    return Book(created["runId"], created["runtimeToken"])


async def post_inputs_until(
    books: list[Book],
    control_url: Callable[[], str],
    faults: Faults,
    stop: trio.Event,
    rng: random.Random,
    pause: tuple[float, float] = (0.01, 0.05),
) -> None:
    """Post small input batches to random runs until `stop`; only 202s count as acknowledged.

    A post whose answer is lost (the gateway died mid-request) is not retried: inputs carry no
    idempotency key, so a retry could queue them twice. Whether it was stored or not, the
    runtime must see a gapless, duplicate-free sequence, which the audit checks.
    """
    count = 0
    async with control_client() as http:
        while not stop.is_set():
            book = rng.choice(books)
            count += 1
            datas = [{"post": count, "i": i} for i in range(rng.randint(1, 3))]
            events = [{"type": "fault.input", "data": data} for data in datas]
            try:
                response = await http.post(
                    f"{control_url()}/v1/runs/{book.run_id}/inputs", json={"events": events}
                )
            except httpx.ConnectError:
                pass  # no gateway listening (it is restarting): nothing was sent
            except httpx.HTTPError:
                book.unknown_posts += 1
            else:
                assert response.status_code == 202, response.text
                for seq, data in zip(response.json()["seqs"], datas, strict=True):
                    book.posted[seq] = (data, faults.injected)
            await trio.sleep(rng.uniform(*pause))


async def post_sentinels(books: list[Book], control_url: str, faults: Faults) -> None:
    """Post one last input per run: once a runtime has it, it has everything posted before."""
    async with control_client(timeout=30) as http:
        for book in books:
            data = {"sentinel": True}
            response = await http.post(
                f"{control_url}/v1/runs/{book.run_id}/inputs",
                json={"events": [{"type": "fault.sentinel", "data": data}]},
            )
            assert response.status_code == 202, response.text
            (seq,) = response.json()["seqs"]
            book.sentinel = seq
            book.posted[seq] = (data, faults.injected)


async def session_view(http: httpx.AsyncClient, control_url: str, run_id: str) -> dict[str, Any]:
    """The control API's view of a run's session."""
    response = await http.get(f"{control_url}/v1/runs/{run_id}/session")
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


async def metric(control_url: str, name: str, **labels: str) -> float:
    """One sample of the gateway's /metrics (0 if it was never observed)."""
    async with control_client() as http:
        response = await http.get(f"{control_url}/metrics")
    assert response.status_code == 200, response.text
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


# --- the runtimes ------------------------------------------------------------------------------


async def drive_runtime(
    book: Book,
    url: str,
    ssl_context: ssl.SSLContext,
    faults: Faults,
    stop: trio.Event,
    rng: random.Random,
    *,
    pause: float = 0.0,
    **options: Any,
) -> None:
    """A runtime on our client: publish batches, write KV, consume inputs, until `stop`.

    It then waits for its sentinel input (so it has processed everything posted before) and
    leaves cleanly, which flushes its last acknowledgement. Every publish call completes (the
    client retries it across reconnects), so at the end the store must hold exactly
    `book.published`, in order.
    """
    values = {**FAST_CLIENT, **options}
    async with connect(
        url,
        token=book.token,
        run_id=book.run_id,
        capabilities=CAPABILITIES,
        ssl_context=ssl_context,
        **values,
    ) as session:
        book.session = session
        book.first_session_id = session.session_id
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_consume, book, session, faults)
            n = 0
            while not stop.is_set():
                n += 1
                drafts = [("fault.output", {"n": n, "i": i}) for i in range(rng.randint(1, 3))]
                book.published.extend(data for _, data in drafts)
                seqs = await session.publish(drafts)
                book.outputs.extend(
                    (seq, data, faults.injected)
                    for seq, (_, data) in zip(seqs, drafts, strict=True)
                )
                await session.kv_set({f"w{n}": str(n)})
                book.kv.append((f"w{n}", str(n), faults.injected))
                if pause:
                    await trio.sleep(pause)
            with trio.fail_after(60):
                await book.sentinel_seen.wait()
            nursery.cancel_scope.cancel()


async def _consume(book: Book, session: GatewaySession, faults: Faults) -> None:
    """The runtime's input handler: it only records what it is handed."""
    async for event in session.inputs():
        book.delivered.append((event.seq, dict(event.data), faults.injected))
        if event.data.get("sentinel") is True:
            # The loop asks for the next event right after this body, which marks the sentinel
            # processed before any other task runs: a clean close then acknowledges it.
            book.sentinel_seen.set()


# --- the audit ---------------------------------------------------------------------------------


@dataclass
class Audit:
    """What went wrong, and after which faults (empty when nothing was lost)."""

    problems: list[str] = field(default_factory=list)
    faults: set[int] = field(default_factory=set)

    def lost(self, fault: int, problem: str) -> None:
        """Note a loss, blamed on the fault it followed (or on none)."""
        self.faults.add(fault)
        if len(self.problems) < 40:  # enough to diagnose, not a wall of text
            self.problems.append(problem)

    def lost_cases(self, tried: int) -> int:
        """Fault cases after which something was lost (an unattributable loss counts as one)."""
        return min(tried, len(self.faults))


async def audit(store: Store, books: list[Book]) -> Audit:
    """Compare every book with the store: outputs, KV and inputs, exactly once and in order."""
    result = Audit()
    for book in books:
        await _audit_outputs(store, book, result)
        await _audit_kv(store, book, result)
        await _audit_inputs(store, book, result)
    return result


async def _audit_outputs(store: Store, book: Book, result: Audit) -> None:
    run = book.run_id
    stored = await store.read_outputs(run, -1, 10_000_000)
    seqs = [event.seq for event in stored]
    if seqs != list(range(len(seqs))):
        result.lost(UNATTRIBUTED, f"{run}: the output log is not gapless from 0: {seqs[:20]}...")
    by_seq = {event.seq: event.data for event in stored}
    for seq, data, fault in book.outputs:
        if by_seq.get(seq) != data:
            result.lost(fault, f"{run}: acknowledged output seq {seq} {data} is stored as "
                        f"{by_seq.get(seq)}")
    datas = [event.data for event in stored]
    if datas != book.published:
        # Every publish call returned, so the log must be exactly what was published, in order:
        # anything else is a duplicate, a reordering or an event nobody acknowledged.
        extra = len(datas) - len(book.published)
        result.lost(UNATTRIBUTED, f"{run}: the log differs from what was published "
                    f"({len(datas)} stored, {len(book.published)} published, {extra:+d})")


async def _audit_kv(store: Store, book: Book, result: Audit) -> None:
    stored = await store.kv_get(book.run_id, [key for key, _, _ in book.kv])
    for key, value, fault in book.kv:
        if stored.get(key) != value:
            result.lost(fault, f"{book.run_id}: acknowledged KV {key}={value} is {stored.get(key)}")


async def _audit_inputs(store: Store, book: Book, result: Audit) -> None:
    run = book.run_id
    assert book.sentinel is not None, "the sentinel was never posted"
    seqs = [seq for seq, _, _ in book.delivered]
    if seqs != list(range(book.sentinel + 1)):
        seen: set[int] = set()
        for seq, _, fault in book.delivered:
            if seq in seen:
                result.lost(fault, f"{run}: input {seq} was handed to the handler twice")
            seen.add(seq)
        result.lost(UNATTRIBUTED, f"{run}: the handler saw {len(seqs)} inputs, not 0.."
                    f"{book.sentinel} once each in order: {seqs[:30]}")
    delivered = {seq: data for seq, data, _ in book.delivered}
    for seq, (data, fault) in book.posted.items():
        if delivered.get(seq) != data:
            result.lost(fault, f"{run}: posted input {seq} {data} reached the handler as "
                        f"{delivered.get(seq)}")
    acked, last = await store.input_positions(run)
    if (acked, last) != (book.sentinel, book.sentinel):
        result.lost(UNATTRIBUTED, f"{run}: the store has inputs up to {last} acknowledged up to "
                    f"{acked}; everything up to the sentinel {book.sentinel} was processed")


# --- gateways ----------------------------------------------------------------------------------

NEVER = 1 << 62  # a cut_mid_frame budget no connection reaches: cutting is off


@asynccontextmanager
async def proxy_to(host: str, port: int) -> AsyncIterator[ChaosProxy]:
    """A chaos proxy in front of host:port, serving until the block ends."""
    proxy = ChaosProxy(host, port)
    async with trio.open_nursery() as own:
        await own.start(proxy.serve)
        yield proxy
        own.cancel_scope.cancel()


def proxy_url(proxy: ChaosProxy) -> str:
    """The runtime URL that goes through the proxy (TLS stays end to end: same host name)."""
    return f"wss://localhost:{proxy.port}/runtime"


def port_of(url: str) -> int:
    """The port of a URL (gateways here always listen on ephemeral ports)."""
    port = urlsplit(url).port
    assert port is not None, url
    return port


class RestartableGateway:
    """A gateway process behind a proxy whose target follows each restart.

    Ports are ephemeral, so every restart listens elsewhere; runtimes keep one URL (the proxy's)
    and simply find the gateway back, as they would behind a load balancer.
    """

    def __init__(self, data_dir: Path, ca: CertificateAuthority, *extra: str) -> None:
        self.data_dir = data_dir
        self.ca = ca
        self.extra = extra
        self.proxy = ChaosProxy("127.0.0.1", 1)  # retargeted on every start
        self.process: GatewayProcess | None = None
        self.starts = 0

    async def serve_proxy(self, nursery: trio.Nursery) -> None:
        """Start the proxy (once, before the first gateway)."""
        await nursery.start(self.proxy.serve)

    async def start(self, nursery: trio.Nursery) -> GatewayProcess:
        """Start a gateway process on the data directory and point the proxy at it."""
        process = GatewayProcess(self.data_dir, self.ca, *self.extra)
        await process.start(nursery)
        self.proxy.target_port = port_of(process.runtime_url)
        self.process = process
        self.starts += 1
        return process

    @property
    def url(self) -> str:
        """Where runtimes connect, across restarts."""
        return proxy_url(self.proxy)

    def control_url(self) -> str:
        """The control API of the current gateway process."""
        assert self.process is not None
        return self.process.control_url

    @property
    def database(self) -> Path:
        """The SQLite file every incarnation shares."""
        return self.data_dir / "gateway.sqlite3"


def rss(process: GatewayProcess) -> int:
    """Resident memory of a gateway process, in bytes."""
    assert process.process is not None
    return int(psutil.Process(process.process.pid).memory_info().rss)


# --- a well-behaved neighbour ------------------------------------------------------------------

HEARTBEAT = "runtime.session.heartbeat.command"


class HeartbeatProbe:
    """A runtime that only heartbeats and times each answer: is the gateway still on time for
    everyone else while one connection misbehaves?"""

    def __init__(self, run_id: str, token: str) -> None:
        self.run_id = run_id
        self.token = token
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.ready = trio.Event()

    async def run(self, url: str, ssl_context: ssl.SSLContext, stop: trio.Event,
                  every: float = 0.1) -> None:
        """Attach, then heartbeat every `every` seconds until `stop`."""
        headers = [(b"authorization", f"Bearer {self.token}".encode())]
        async with open_websocket_url(url, ssl_context=ssl_context, extra_headers=headers) as ws:
            wire = Wire(ws)
            reply = await wire.attach(self.run_id)
            ids = {"sessionId": reply["sessionId"], "runId": self.run_id}
            self.ready.set()
            while not stop.is_set():
                started = trio.current_time()
                frame = await wire.call(HEARTBEAT, ids)
                self.latencies.append(trio.current_time() - started)
                if frame["channel"] != "runtime.session.heartbeat.reply":
                    self.failures.append(f"heartbeat answered with {frame}")
                await trio.sleep(every)

    def worst(self) -> float:
        """The slowest heartbeat answer seen."""
        assert self.latencies, "the probe never heartbeat"
        return max(self.latencies)
