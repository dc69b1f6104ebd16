from __future__ import annotations

import asyncio
import random

from collaborative_blocks import SystemClock, VirtualClock
from collaborative_blocks.core.clock import Clock
from collaborative_blocks.core.randomness import new_random, random_id


def test_both_clocks_satisfy_the_protocol() -> None:
    assert isinstance(SystemClock(), Clock)
    assert isinstance(VirtualClock(), Clock)


async def test_virtual_sleepers_wake_in_deadline_order_without_wall_time() -> None:
    clock = VirtualClock(start=1000.0)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.monotonic()))

    tasks = [
        asyncio.create_task(sleeper("c", 3600)),
        asyncio.create_task(sleeper("a", 1)),
        asyncio.create_task(sleeper("b", 60)),
    ]
    await asyncio.sleep(0)
    await clock.advance(59)
    assert woke == [("a", 1)]
    await clock.run_until_idle()
    await asyncio.gather(*tasks)
    assert woke == [("a", 1), ("b", 60), ("c", 3600)]
    assert clock.now() == 1000.0 + 3600


async def test_a_task_that_sleeps_again_within_an_advance_is_woken_again() -> None:
    clock = VirtualClock()
    ticks: list[float] = []

    async def ticker() -> None:
        for _ in range(5):
            await clock.sleep(10)
            ticks.append(clock.monotonic())

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    await clock.advance(100)
    await task
    assert ticks == [10, 20, 30, 40, 50]
    assert clock.monotonic() == 100


async def test_cancelled_sleeper_does_not_block_others() -> None:
    clock = VirtualClock()
    slow = asyncio.create_task(clock.sleep(5))
    fast = asyncio.create_task(clock.sleep(10))
    await asyncio.sleep(0)
    slow.cancel()
    await clock.advance(10)
    assert fast.done()
    assert slow.cancelled()


def test_skew_moves_wall_time_only() -> None:
    clock = VirtualClock(start=100.0, skew=-5.0)
    assert clock.now() == 95.0
    assert clock.monotonic() == 0.0


def test_ids_are_time_sortable_and_reproducible_from_a_seed() -> None:
    first = [random_id(t, random.Random(1)) for t in (1.0, 2.0, 3.0)]
    assert first == sorted(first)
    assert all(len(i) == 26 for i in first)
    assert random_id(5.0, new_random(42)) == random_id(5.0, new_random(42))
    assert random_id(5.0, new_random(42)) != random_id(5.0, new_random(43))
