"""Prometheus metrics: what operators watch.

Label values are channel names, codes and states only, never ids or payloads, so no secret and no
unbounded label set can reach the exposition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from statemachine.messages import Channel, ErrorCode
from statemachine.records import SessionState


class FrameCounts(Collector):
    """Frames in and out by channel, as plain integers read only when /metrics is scraped.

    Every frame counts twice (in and out); a prometheus_client Counter takes a lock per
    increment, which costs more than the dictionary update the hot path needs.
    """

    def __init__(self) -> None:
        self.received = dict.fromkeys(Channel, 0)
        self.sent = dict.fromkeys(Channel, 0)

    def collect(self) -> Iterator[Metric]:
        """The two counter families, one sample per channel."""
        for name, documentation, counts in (
            ("agent_gateway_frames_in", "Frames received, by channel.", self.received),
            ("agent_gateway_frames_out", "Frames sent, by channel.", self.sent),
        ):
            family = CounterMetricFamily(name, documentation, labels=["channel"])
            for channel, count in counts.items():
                family.add_metric([channel.value], count)
            yield family


class SessionCounts(Collector):
    """Sessions by state, counted from the core when /metrics is scraped.

    Counted, not kept up to date change by change: sessions also appear (a first attach) and
    come back (a restart restores them) without a change of state, and a tally kept by changes
    drifted (negative `detached`, restored sessions missing). A scrape walks every session once.
    """

    def __init__(self) -> None:
        self.states: Callable[[], Iterable[SessionState]] = tuple

    def collect(self) -> Iterator[Metric]:
        """One gauge sample per state, zeros included."""
        counts = dict.fromkeys(SessionState, 0)
        for state in self.states():
            counts[state] += 1
        family = GaugeMetricFamily("agent_gateway_sessions", "Sessions by state.",
                                   labels=["state"])
        for state, count in counts.items():
            family.add_metric([state.value], count)
        yield family


class Metrics:
    """The gateway's instruments, in a registry of its own (gateways may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sessions = SessionCounts()  # the gateway tells it where its sessions are
        self.registry.register(self.sessions)
        self.frames = FrameCounts()
        self.registry.register(self.frames)
        self.errors = Counter(
            "agent_gateway_errors", "Error frames sent, by code.", ["code"], registry=self.registry
        )
        self.lease_expiries = Counter(
            "agent_gateway_lease_expiries", "Leases that ran out.", registry=self.registry
        )
        self.attempts_lost = Counter(
            "agent_gateway_attempts_lost",
            "Recovery windows that closed with no runtime back.",
            registry=self.registry,
        )
        self.connections = Gauge(
            "agent_gateway_connections", "Open runtime connections.", registry=self.registry
        )
        self.closes = Counter(
            "agent_gateway_closes",
            "Connections the gateway closed, by close code.",
            ["code"],
            registry=self.registry,
        )
        self.gc_seconds = Counter(
            "agent_gateway_gc_seconds",
            "Time the garbage collector paused the gateway, by generation.",
            ["generation"],
            registry=self.registry,
        )
        self.tls_expiry = Gauge(
            "agent_gateway_tls_certificate_expiry_timestamp_seconds",
            "When the runtime endpoint's certificate expires (Unix time): alert well before it.",
            registry=self.registry,
        )
        self.tls_reloads = Counter(
            "agent_gateway_tls_reloads",
            "Certificate reloads (SIGHUP), by outcome; a failed one keeps the old certificate.",
            ["outcome"],
            registry=self.registry,
        )
        self.store_seconds = Histogram(
            "agent_gateway_store_seconds",
            "Store operation latency, by operation.",
            ["op"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        # Children resolved once: a labelled lookup per frame would be wasted work.
        self.error = {code: self.errors.labels(code.value) for code in ErrorCode}
        self.store_op = {
            op: self.store_seconds.labels(op)
            for op in ("claim", "append", "read_kv", "write_kv", "read_inputs", "ack", "save")
        }
