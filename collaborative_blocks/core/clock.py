"""Time, injected.

Nothing in the framework reads the wall clock or sleeps on it directly: components take a
:class:`Clock`. :class:`SystemClock` is real time; :class:`VirtualClock` is time that moves
only when told to, so tests and the chaos simulator run hours of simulated time in
milliseconds and the same inputs give the same history.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "SystemClock", "VirtualClock"]


@runtime_checkable
class Clock(Protocol):
    """Where components get time from."""

    def now(self) -> float:
        """Seconds since the Unix epoch (wall time; may jump, may be skewed)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (for timeouts and durations)."""

    async def sleep(self, seconds: float) -> None:
        """Suspend the calling task for ``seconds`` of this clock's time."""


class SystemClock:
    """The real clock of this machine."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))


class VirtualClock:
    """A clock that only moves when :meth:`advance` (or :meth:`run_until_idle`) moves it.

    Sleepers wake in deadline order, ties in the order they went to sleep, so a run is
    deterministic. ``skew`` shifts :meth:`now` only (clock skew between systems), never the
    monotonic time that orders wake-ups.
    """

    def __init__(self, start: float = 1_700_000_000.0, *, skew: float = 0.0) -> None:
        self._start = start
        self._elapsed = 0.0
        self.skew = skew
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._start + self._elapsed + self.skew

    def monotonic(self) -> float:
        return self._elapsed

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._elapsed + seconds, next(self._seq), future))
        await future

    @property
    def pending(self) -> int:
        """How many sleepers are waiting (cancelled ones included until they are reached)."""
        return len(self._sleepers)

    def next_deadline(self) -> float | None:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        return self._sleepers[0][0] if self._sleepers else None

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking every sleeper whose deadline is passed.

        Between wake-ups the woken tasks get to run, so a task that sleeps again inside the
        window is woken again at its new deadline.
        """
        target = self._elapsed + max(seconds, 0.0)
        while True:
            deadline = self.next_deadline()
            if deadline is None or deadline > target:
                break
            self._elapsed = max(self._elapsed, deadline)
            while self._sleepers and self._sleepers[0][0] <= self._elapsed:
                _, _, future = heapq.heappop(self._sleepers)
                if not future.done():
                    future.set_result(None)
            await _let_others_run()
        self._elapsed = target
        await _let_others_run()

    async def run_until_idle(self, limit: float = 86_400.0) -> None:
        """Advance to each next deadline until nobody sleeps (or ``limit`` seconds passed)."""
        end = self._elapsed + limit
        while (deadline := self.next_deadline()) is not None and deadline <= end:
            await self.advance(deadline - self._elapsed)


async def _let_others_run(rounds: int = 8) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)
