"""The collector watch: pauses are counted by generation, long ones are logged, and it detaches."""

from __future__ import annotations

import gc
import logging

import pytest
from prometheus_client import CollectorRegistry, Counter

from gateway import gcwatch


def _seconds() -> tuple[CollectorRegistry, Counter]:
    registry = CollectorRegistry()
    return registry, Counter("gc_seconds", "pauses", ["generation"], registry=registry)


def test_every_collection_is_timed_by_generation() -> None:
    registry, seconds = _seconds()
    stop = gcwatch.watch_collections(seconds)
    try:
        gc.collect()
    finally:
        stop()
    timed = registry.get_sample_value("gc_seconds_total", {"generation": "2"})
    assert timed is not None and timed > 0
    gc.collect()  # detached: no longer counted
    assert registry.get_sample_value("gc_seconds_total", {"generation": "2"}) == timed


def test_a_pause_long_enough_to_delay_heartbeats_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(gcwatch, "SLOW_PAUSE_S", 0.0)
    _, seconds = _seconds()
    stop = gcwatch.watch_collections(seconds)
    with caplog.at_level(logging.WARNING, logger="agent_gateway.gc"):
        try:
            gc.collect()
        finally:
            stop()
    assert any("generation 2 paused the gateway" in r.getMessage() for r in caplog.records)
