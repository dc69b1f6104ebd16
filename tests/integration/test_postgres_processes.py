"""The PostgreSQL store across real processes.

- Several writer processes append concurrently while a subscriber in this process follows
  the log live: it sees every event, in global order, once, woken by NOTIFY alone.
- A writer process killed with SIGKILL mid-stream: every append it acknowledged is stored,
  and no batch is stored in part.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from collaborative_blocks.stores import NewEvent, StoredEvent
from collaborative_blocks.stores.postgres import PostgresEventStore, open_postgres_store
from collaborative_blocks.testing.services import temporary_postgres_database

# A safety net so a lost wake-up fails the test instead of hanging it; nothing asserts how
# long anything takes.
HANG_GUARD_SECONDS = 60.0
TASKS_PER_WRITER = 4

# The writer process: TASKS_PER_WRITER tasks, each appending to its own stream with its own
# expected version, alternating single events and batches, and printing every acknowledged
# append (flushed) before going on. Each event's state names its stream, version, append
# number and the size of its batch, so the log can be checked against what was acknowledged.
WRITER = """
import asyncio, sys
from collaborative_blocks.errors import ConcurrencyError
from collaborative_blocks.stores.base import NewEvent
from collaborative_blocks.stores.postgres import open_postgres_store

def batch_size(i: int) -> int:
    return 1 if i % 2 == 0 else 1 + i % 7

async def main(url: str, name: str, appends: int, tasks: int, shared: int) -> None:
    store = await open_postgres_store(url)
    try:
        async def write(k: int) -> None:
            stream = f"{name}-{k}"
            version = 0
            i = 0
            while appends < 0 or i < appends:
                size = batch_size(i)
                events = [
                    NewEvent("Written", f"{stream}:{version + j + 1}:{i}:{size}".encode())
                    for j in range(size)
                ]
                positions = await store.append(stream, events, expected_version=version)
                version += size
                print("ACK", stream, i, size, *positions, flush=True)
                i += 1

        async def contend() -> None:
            # Every writer process appends to one shared stream: read, append, retry on conflict.
            for i in range(shared):
                while True:
                    version = await store.stream_version("shared")
                    event = NewEvent("Written", f"shared:{version + 1}:{name}.{i}:1".encode())
                    try:
                        positions = await store.append("shared", [event], expected_version=version)
                    except ConcurrencyError:
                        continue
                    print("ACK", "shared", f"{name}.{i}", 1, *positions, flush=True)
                    break

        await asyncio.gather(contend(), *(write(k) for k in range(tasks)))
    finally:
        await store.close()

asyncio.run(main(*sys.argv[1:3], *map(int, sys.argv[3:6])))
"""


def batch_size(i: int) -> int:
    return 1 if i % 2 == 0 else 1 + i % 7


@dataclass(frozen=True)
class Ack:
    stream: str
    append: str
    size: int
    positions: tuple[int, ...]


def parse_ack(line: bytes) -> Ack:
    word, stream, append, size, *positions = line.decode().split()
    assert word == "ACK", line
    return Ack(stream, append, int(size), tuple(int(p) for p in positions))


async def start_writer(
    url: str, name: str, appends: int, shared: int = 0
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WRITER,
        url,
        name,
        str(appends),
        str(TASKS_PER_WRITER),
        str(shared),
        stdout=asyncio.subprocess.PIPE,
        env=dict(os.environ),
    )


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with temporary_postgres_database() as database_url:
        yield database_url


@pytest.fixture
async def store(url: str) -> AsyncIterator[PostgresEventStore]:
    # A huge poll interval: a subscriber of this store is woken by NOTIFY or not at all.
    opened = await open_postgres_store(url, poll_interval=3600)
    try:
        yield opened
    finally:
        await opened.close()


def check_event_matches_its_append(event: StoredEvent) -> tuple[str, str, int]:
    """The (stream, append id, batch size) an event's state claims; checks the version."""
    stream, version, append, size = event.state.decode().split(":")
    assert (stream, int(version)) == (event.stream, event.version)
    assert event.topic == "Written"
    return stream, append, int(size)


async def test_a_subscriber_sees_every_event_of_concurrent_writer_processes(
    url: str, store: PostgresEventStore
) -> None:
    appends_per_task = 12
    writers = 3
    shared_per_writer = 8
    expected_total = writers * (
        TASKS_PER_WRITER * sum(map(batch_size, range(appends_per_task))) + shared_per_writer
    )
    subscription = store.subscribe(from_position=1)
    seen: list[StoredEvent] = []

    async def follow() -> None:
        while len(seen) < expected_total:
            seen.append(await anext(subscription))

    try:
        async with asyncio.timeout(HANG_GUARD_SECONDS):
            following = asyncio.ensure_future(follow())
            processes = [
                await start_writer(url, f"writer{n}", appends_per_task, shared_per_writer)
                for n in range(writers)
            ]
            outputs = [await process.communicate() for process in processes]
            assert [process.returncode for process in processes] == [0] * writers
            await following
    finally:
        await subscription.aclose()  # type: ignore[attr-defined]

    positions = [event.position for event in seen]
    assert positions == sorted(set(positions)), "out of order or duplicated"
    assert seen == await store.read_all(), "the subscriber missed or invented events"
    acks = [parse_ack(line) for stdout, _ in outputs for line in stdout.splitlines()]
    assert len(acks) == writers * (TASKS_PER_WRITER * appends_per_task + shared_per_writer)
    by_position = {event.position: event for event in seen}
    for ack in acks:
        assert len(ack.positions) == ack.size
        for position in ack.positions:
            assert check_event_matches_its_append(by_position[position])[:2] == (
                ack.stream,
                ack.append,
            )
    streams: dict[str, list[int]] = defaultdict(list)
    for event in seen:
        streams[event.stream].append(event.version)
    assert len(streams) == writers * TASKS_PER_WRITER + 1
    # Optimistic concurrency held across processes: the contended stream has no gap or fork.
    assert len(streams["shared"]) == writers * shared_per_writer
    for versions in streams.values():
        assert versions == list(range(1, len(versions) + 1))


async def test_sigkill_mid_stream_keeps_every_acknowledged_append_and_no_partial_batch(
    url: str, store: PostgresEventStore
) -> None:
    process = await start_writer(url, "victim", -1)
    assert process.stdout is not None
    acks: list[Ack] = []
    try:
        async with asyncio.timeout(HANG_GUARD_SECONDS):
            while len(acks) < 60:
                line = await process.stdout.readline()
                assert line, "the writer exited before it was killed"
                acks.append(parse_ack(line))
    finally:
        process.send_signal(signal.SIGKILL)
    # Whatever it printed before dying was acknowledged too.
    rest = await process.stdout.read()
    acks.extend(parse_ack(line) for line in rest.splitlines())
    assert await process.wait() == -signal.SIGKILL

    log = {event.position: event for event in await store.read_all()}
    for ack in acks:
        assert len(ack.positions) == ack.size
        for position in ack.positions:
            assert position in log, f"acknowledged {ack} but position {position} is missing"
            assert check_event_matches_its_append(log[position])[:2] == (ack.stream, ack.append)

    batches: dict[tuple[str, str], list[StoredEvent]] = defaultdict(list)
    for event in log.values():
        stream, append, _ = check_event_matches_its_append(event)
        batches[stream, append].append(event)
    for (stream, append), events in batches.items():
        assert len(events) == batch_size(int(append)), f"partial batch {stream} #{append}"
        assert [e.position for e in events] == sorted(e.position for e in events)
    for k in range(TASKS_PER_WRITER):
        versions = [e.version for e in await store.read(f"victim-{k}")]
        assert versions == list(range(1, len(versions) + 1))
    # The store is still fully usable after a writer died mid-transaction.
    (position,) = await store.append("after", [NewEvent("After", b"x")], expected_version=0)
    assert position > max(log)
