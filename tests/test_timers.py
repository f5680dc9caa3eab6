"""The shell's one timer task: every run's deadline reported once, on time, whichever way it moved.

Driven by trio's MockClock (pytest-trio's `autojump_clock`), so the times checked are exact.
"""

from __future__ import annotations

import trio

from gateway.clock import Clock
from gateway.timers import Timers
from statemachine.messages import Millis


class _Fired:
    """Timers under test, running in `nursery`, with the wall time each run was reported at."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.clock = Clock()
        self.timers = Timers(self.clock)
        self.start = self.clock.now()
        self.at: list[tuple[str, int]] = []
        self.then: dict[str, int] = {}  # run id -> its next deadline, armed as it fires
        nursery.start_soon(self.timers.run, self._fire)

    async def _fire(self, run_id: str) -> None:
        self.at.append((run_id, self.clock.now() - self.start))
        if run_id in self.then:  # what the core does when a lease expires: a new deadline
            self.arm(run_id, self.then.pop(run_id))

    def arm(self, run_id: str, after_ms: int) -> None:
        """Arm `run_id` for `after_ms` after the test began."""
        self.timers.arm(run_id, Millis(self.start + after_ms))

    async def until(self, after_ms: int) -> None:
        """Let the clock run to `after_ms` after the test began."""
        await trio.sleep((self.start + after_ms - self.clock.now()) / 1000)


async def test_a_deadline_moved_later_a_thousand_times_fires_once_at_the_last(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with trio.open_nursery() as nursery:
        fired = _Fired(nursery)
        for beat in range(1_000):  # every 10 ms, the deadline moves to 30 ms ahead
            fired.arm("run-a", beat * 10 + 30)
            fired.arm("run-b", 50_000)  # another run, armed again without moving
            await fired.until(beat * 10 + 10)
            assert fired.at == []
        await fired.until(60_000)
        nursery.cancel_scope.cancel()
    assert fired.at == [("run-a", 10_020), ("run-b", 50_000)]
    assert len(fired.timers) == 0


async def test_a_deadline_moved_earlier_fires_at_the_earlier_time_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with trio.open_nursery() as nursery:
        fired = _Fired(nursery)
        fired.arm("run-a", 5_000)
        await fired.until(100)
        fired.arm("run-a", 1_000)  # the timer task is asleep until 5 000: it must wake earlier
        await fired.until(10_000)
        nursery.cancel_scope.cancel()
    assert fired.at == [("run-a", 1_000)]


async def test_earlier_then_later_than_the_first_deadline_fires_once_at_the_last(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with trio.open_nursery() as nursery:
        fired = _Fired(nursery)
        fired.arm("run-a", 2_000)
        fired.arm("run-a", 1_000)
        fired.arm("run-a", 3_000)  # both earlier entries come due before this one
        await fired.until(10_000)
        nursery.cancel_scope.cancel()
    assert fired.at == [("run-a", 3_000)]


async def test_runs_fire_in_deadline_order_and_may_be_armed_again_while_firing(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with trio.open_nursery() as nursery:
        fired = _Fired(nursery)
        fired.then["run-b"] = 4_000
        for run_id, after in (("run-c", 3_000), ("run-a", 1_000), ("run-b", 2_000)):
            fired.arm(run_id, after)
        await fired.until(10_000)
        nursery.cancel_scope.cancel()
    assert fired.at == [("run-a", 1_000), ("run-b", 2_000), ("run-c", 3_000), ("run-b", 4_000)]
