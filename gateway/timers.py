"""One task that keeps every session's deadline: a heap, a cancel scope, no task per timer.

Sessions outlive connections (a lease runs on after a drop), so their timers cannot live in a
connection's nursery. One heap for all of them costs a few bytes per session instead of a task.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Awaitable, Callable

import trio

from gateway.clock import Clock
from statemachine.messages import Millis


class Timers:
    """Deadlines by run id; `run` reports each one when it comes."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._due: dict[str, Millis] = {}
        self._heap: list[tuple[Millis, str]] = []
        self._sleep: trio.CancelScope | None = None

    def arm(self, run_id: str, deadline: Millis) -> None:
        """Report `run_id` at `deadline`, replacing its earlier deadline."""
        self._due[run_id] = deadline
        heapq.heappush(self._heap, (deadline, run_id))
        if self._sleep is not None:
            self._sleep.deadline = min(self._sleep.deadline, self._clock.trio_time(deadline))

    def __len__(self) -> int:
        return len(self._due)

    async def run(self, fire: Callable[[str], Awaitable[None]]) -> None:
        """Call `fire(run_id)` as each deadline comes; runs until cancelled."""
        while True:
            wake = self._clock.trio_time(self._heap[0][0]) if self._heap else math.inf
            with trio.CancelScope(deadline=wake) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None
            now = self._clock.now()
            while self._heap and self._heap[0][0] <= now:
                deadline, run_id = heapq.heappop(self._heap)
                if self._due.get(run_id) == deadline:  # else: replaced by a later arm()
                    del self._due[run_id]
                    await fire(run_id)
