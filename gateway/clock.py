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
        # The run's clock object itself: reading it directly skips two layers of trio's public
        # `current_time()`, and the core asks for the time on every frame.
        self.trio_now = trio.lowlevel.current_clock().current_time
        # One offset relates the two clocks, fixed at start: wall = trio + offset.
        self._wall_minus_trio = time.time() - self.trio_now()

    def now(self) -> Millis:
        """The current time for the core."""
        return Millis(int((self.trio_now() + self._wall_minus_trio) * 1000))

    def trio_time(self, at: Millis) -> float:
        """The trio clock reading at which wall time `at` arrives (for deadlines and sleeps)."""
        return at / 1000 - self._wall_minus_trio
