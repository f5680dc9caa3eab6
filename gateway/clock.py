"""Wall-clock milliseconds derived from trio's clock, so a MockClock drives leases in tests too."""

from __future__ import annotations

import time

import trio

from statemachine.messages import Millis


class Clock:
    """Anchors trio's monotonic clock to the wall clock once, then only reads trio's.

    The core's deadlines are wall-clock milliseconds (they go on the wire as RFC 3339). Reading
    `trio.current_time()` rather than `time.time()` keeps them monotonic, and lets tests move time
    with `trio.testing.MockClock`.
    """

    def __init__(self) -> None:
        self._wall_at_start = time.time()
        self._trio_at_start = trio.current_time()

    def now(self) -> Millis:
        """The current time for the core."""
        elapsed = trio.current_time() - self._trio_at_start
        return Millis(int((self._wall_at_start + elapsed) * 1000))

    def trio_time(self, at: Millis) -> float:
        """The trio clock reading at which wall time `at` arrives (for deadlines and sleeps)."""
        return self._trio_at_start + at / 1000 - self._wall_at_start
