"""Properties of the event log under random concurrent use, on the memory and SQLite stores.

Hypothesis draws a set of tasks, each a list of appends (stream, size, how it picks its
expected version, how often it yields to the others), and a subscriber that joins after a
random number of commits with a random batch size. Whatever the interleaving:

- stream versions stay contiguous and unique; positions strictly increase with no gaps;
- every acknowledged append is in the log exactly as acknowledged, and a refused one left
  nothing behind;
- the subscriber sees every committed event exactly once, in global order, including the
  ones committed while it was catching up.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collaborative_blocks.errors import ConcurrencyError
from collaborative_blocks.stores import EventStore, NewEvent, StoredEvent
from collaborative_blocks.stores.memory import MemoryEventStore
from collaborative_blocks.stores.sqlite import open_sqlite_store

STREAMS = ("a", "b", "c")
# A safety net so a lost wake-up fails the example instead of hanging the run.
HANG_GUARD_SECONDS = 30.0


@dataclass(frozen=True)
class Op:
    stream: str
    size: int
    # "none": no check; "fresh": read the version, yield, then append with it (races);
    # a number: a guess, usually wrong.
    expect: str | int
    yields: int


ops = st.builds(
    Op,
    stream=st.sampled_from(STREAMS),
    size=st.integers(1, 3),
    expect=st.one_of(st.just("none"), st.just("fresh"), st.integers(0, 4)),
    yields=st.integers(0, 3),
)
tasks_strategy = st.lists(st.lists(ops, min_size=1, max_size=5), min_size=1, max_size=6)


@dataclass
class Outcome:
    ids: list[str]
    positions: list[int] | None  # None: refused with ConcurrencyError
    expected: int | None = None


async def _run_task(store: EventStore, task_no: int, task: list[Op], log: list[Outcome]) -> None:
    for op_no, op in enumerate(task):
        ids = [f"{task_no}.{op_no}.{i}" for i in range(op.size)]
        events = [NewEvent("Happened", i.encode()) for i in ids]
        expected: int | None
        if op.expect == "none":
            expected = None
        elif op.expect == "fresh":
            expected = await store.stream_version(op.stream)
        else:
            assert isinstance(op.expect, int)
            expected = op.expect
        for _ in range(op.yields):
            await asyncio.sleep(0)
        try:
            positions = await store.append(op.stream, events, expected_version=expected)
        except ConcurrencyError:
            log.append(Outcome(ids, None, expected))
        else:
            log.append(Outcome(ids, positions, expected))


async def _subscribe(store: EventStore, batch_size: int, seen: list[StoredEvent]) -> None:
    async for event in store.subscribe(from_position=1, batch_size=batch_size):
        seen.append(event)
        if event.stream == "end":  # appended after every writer finished
            return


async def _scenario(
    store: EventStore, tasks: list[list[Op]], join_after: int, batch_size: int
) -> None:
    outcomes: list[Outcome] = []
    # Some history before the subscriber starts, so that it has to catch up.
    for i in range(join_after):
        event = NewEvent("Pre", f"pre.{i}".encode())
        outcomes.append(Outcome([f"pre.{i}"], await store.append("pre", [event])))
    seen: list[StoredEvent] = []
    subscriber = asyncio.ensure_future(_subscribe(store, batch_size, seen))
    await asyncio.gather(*(_run_task(store, n, task, outcomes) for n, task in enumerate(tasks)))
    # The subscriber stops at this marker, the last event ever committed here.
    outcomes.append(Outcome(["end"], await store.append("end", [NewEvent("End", b"end")])))
    await asyncio.wait_for(subscriber, HANG_GUARD_SECONDS)

    log = await store.read_all()
    positions = [e.position for e in log]
    assert positions == list(range(1, len(log) + 1)), "positions: strictly increasing, no gaps"
    for stream in {e.stream for e in log}:
        versions = [e.version for e in log if e.stream == stream]
        assert versions == list(range(1, len(versions) + 1)), f"versions of {stream}"
        assert versions == [e.version for e in await store.read(stream)]

    by_state = {e.state.decode(): e for e in log}
    assert len(by_state) == len(log), "each event stored once"
    acknowledged: set[str] = set()
    for outcome in outcomes:
        if outcome.positions is None:
            assert not any(i in by_state for i in outcome.ids), "a refused append left events"
            continue
        stored = [by_state[i] for i in outcome.ids]
        assert [e.position for e in stored] == outcome.positions
        assert len({e.stream for e in stored}) == 1
        versions = [e.version for e in stored]
        assert versions == list(range(versions[0], versions[0] + len(versions)))
        if outcome.expected is not None:
            # Optimistic concurrency: it went in right after the version it expected.
            assert versions[0] == outcome.expected + 1
        acknowledged.update(outcome.ids)
    assert acknowledged == set(by_state), "the log holds exactly the acknowledged appends"

    assert seen == log, "the subscriber saw every event once, in order"


async def _open(kind: str, folder: str) -> EventStore:
    if kind == "memory":
        return MemoryEventStore()
    return await open_sqlite_store(f"sqlite+aiosqlite:///{Path(folder) / 'events.db'}")


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    tasks=tasks_strategy,
    join_after=st.integers(0, 6),
    batch_size=st.integers(1, 4),
)
def test_concurrent_appends_keep_the_log_consistent(
    kind: str, tasks: list[list[Op]], join_after: int, batch_size: int
) -> None:
    async def run() -> None:
        with tempfile.TemporaryDirectory() as folder:
            store = await _open(kind, folder)
            try:
                await _scenario(store, tasks, join_after, batch_size)
            finally:
                await store.close()

    asyncio.run(run())


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=12),
    contenders=st.integers(2, 8),
)
def test_racing_writers_on_one_stream_never_fork_it(
    kind: str, sizes: list[int], contenders: int
) -> None:
    """Writers that all read the version and then append: exactly one wins each round."""

    async def run() -> None:
        with tempfile.TemporaryDirectory() as folder:
            store = await _open(kind, folder)
            try:
                for size in sizes:
                    version = await store.stream_version("hot")
                    results = await asyncio.gather(
                        *(
                            store.append(
                                "hot", [NewEvent("T", b"x")] * size, expected_version=version
                            )
                            for _ in range(contenders)
                        ),
                        return_exceptions=True,
                    )
                    winners = [r for r in results if isinstance(r, list)]
                    assert len(winners) == 1
                    assert all(isinstance(r, ConcurrencyError) for r in results if r not in winners)
                    assert await store.stream_version("hot") == version + size
                events = await store.read("hot")
                assert [e.version for e in events] == list(range(1, sum(sizes) + 1))
            finally:
                await store.close()

    asyncio.run(run())
