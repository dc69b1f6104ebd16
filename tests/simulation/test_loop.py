"""The simulation loop: virtual time, seeded interleavings, no real I/O."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from collaborative_blocks.errors import NondeterminismError, SimulationError
from collaborative_blocks.simulations.loop import CURRENT_NODE, SimClock, SimulationLoop


def run(loop: SimulationLoop, coro: object) -> object:
    try:
        return loop.run_until_complete(coro)  # type: ignore[arg-type]
    finally:
        loop.close()


def test_an_hour_of_sleeping_and_timeouts_runs_on_virtual_time() -> None:
    loop = SimulationLoop(1)
    clock = SimClock(loop, start=1000.0, skew=2.5)

    async def main() -> tuple[float, float, float]:
        await asyncio.sleep(3600)
        after_sleep = loop.time()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(clock.sleep(100), 10)
        return after_sleep, clock.monotonic(), clock.now()

    result: Any = run(loop, main())
    after_sleep, monotonic, now = result
    assert after_sleep == 3600
    assert monotonic == 3610
    assert now == 1000.0 + 3610 + 2.5


def _interleaving(seed: int) -> list[int]:
    loop = SimulationLoop(seed)
    order: list[int] = []

    async def worker(n: int) -> None:
        for _ in range(3):
            await asyncio.sleep(0)
            order.append(n)

    async def main() -> None:
        await asyncio.gather(*(worker(n) for n in range(6)))

    run(loop, main())
    return order


def test_ready_tasks_run_in_a_seeded_order() -> None:
    assert _interleaving(1) == _interleaving(1)
    orders = {tuple(_interleaving(seed)) for seed in range(10)}
    assert len(orders) > 1
    fifo = SimulationLoop(0, shuffle=False)
    seen: list[int] = []

    async def worker(n: int) -> None:
        await asyncio.sleep(0)
        seen.append(n)

    async def main() -> None:
        await asyncio.gather(*(worker(n) for n in range(5)))

    run(fifo, main())
    assert seen == [0, 1, 2, 3, 4]


def test_each_task_keeps_its_own_order() -> None:
    for seed in range(5):
        order = _interleaving(seed)
        for n in range(6):
            assert order.count(n) == 3


def test_threads_and_real_io_are_refused() -> None:
    loop = SimulationLoop(0)

    async def main() -> None:
        with pytest.raises(NondeterminismError, match="thread"):
            await loop.run_in_executor(None, print)
        with pytest.raises(NondeterminismError, match="network"):
            await asyncio.open_connection("127.0.0.1", 6379)
        with pytest.raises(NondeterminismError, match="subprocess"):
            await asyncio.create_subprocess_exec("true")
        sock = socket.socket()
        try:
            with pytest.raises(NondeterminismError):
                loop.add_reader(sock.fileno(), print)
        finally:
            sock.close()

    run(loop, main())


def test_a_deadlock_is_reported_instead_of_hanging() -> None:
    loop = SimulationLoop(0)

    async def main() -> None:
        await loop.create_future()

    with pytest.raises(SimulationError, match="deadlocked"):
        run(loop, main())


def test_tasks_remember_which_node_created_them() -> None:
    loop = SimulationLoop(0)

    async def child() -> None:
        await asyncio.sleep(10)

    children: list[asyncio.Task[None]] = []

    async def on_node() -> None:
        CURRENT_NODE.set("n1")
        children.append(asyncio.create_task(child()))
        children.append(asyncio.create_task(child()))
        await asyncio.sleep(0)

    async def main() -> int:
        await asyncio.create_task(on_node())
        tasks = loop.node_tasks("n1")
        assert tasks == children
        for task in tasks:
            task.cancel()
        await asyncio.sleep(0)
        return len(tasks)

    assert run(loop, main()) == 2
