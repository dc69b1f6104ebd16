"""SIGKILL a process that is writing to a SQLite store: what it acknowledged survives.

A real writer process (``_sqlite_writer.py``) appends single events and batches from four
concurrent tasks and prints every acknowledged append. The test kills it with SIGKILL in the
middle of the stream, reopens the store and checks that every acknowledged append is there,
exactly as acknowledged, and that no batch was stored in part (also among the appends that
committed but were not yet acknowledged when the process died).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from collaborative_blocks.stores import NewEvent
from collaborative_blocks.stores.sqlite import open_sqlite_store

WRITER = Path(__file__).with_name("_sqlite_writer.py")
# A safety net against a writer that stops printing; never part of what is asserted.
HANG_GUARD_SECONDS = 60.0


async def _kill_after(url: str, acks_wanted: int) -> list[tuple[str, int, int, str]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WRITER),
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    acks: list[tuple[str, int, int, str]] = []
    try:

        async def read_acks() -> None:
            assert process.stdout is not None
            while len(acks) < acks_wanted:
                line = await process.stdout.readline()
                if not line:
                    assert process.stderr is not None
                    error = await process.stderr.read()
                    pytest.fail(f"the writer exited early: {error.decode()}")
                _, stream, first, count, batch_id = line.decode().split()
                acks.append((stream, int(first), int(count), batch_id))

        await asyncio.wait_for(read_acks(), HANG_GUARD_SECONDS)
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()
    assert process.returncode == -signal.SIGKILL
    return acks


@pytest.mark.parametrize("acks_wanted", [50, 400])
async def test_acknowledged_appends_survive_sigkill(tmp_path: Path, acks_wanted: int) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    acks = await _kill_after(url, acks_wanted)

    store = await open_sqlite_store(url)
    try:
        log = await store.read_all()
        by_position = {e.position: e for e in log}
        for stream, first, count, batch_id in acks:
            stored = [by_position.get(p) for p in range(first, first + count)]
            assert all(e is not None for e in stored), f"acknowledged {batch_id} is missing"
            assert [e.state.decode() for e in stored if e is not None] == [
                f"{batch_id}/{i}/{count}" for i in range(count)
            ]
            assert {e.stream for e in stored if e is not None} == {stream}

        # No partial batch, acknowledged or not.
        batches: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for event in log:
            batch_id, index, total = event.state.decode().split("/")
            batches[batch_id].append((int(index), int(total)))
        for batch_id, parts in batches.items():
            size = parts[0][1]
            assert sorted(i for i, _ in parts) == list(range(size)), f"partial batch {batch_id}"

        # The log itself is intact: dense positions, contiguous versions per stream.
        assert [e.position for e in log] == list(range(1, len(log) + 1))
        for stream in {e.stream for e in log}:
            versions = [e.version for e in log if e.stream == stream]
            assert versions == list(range(1, len(versions) + 1))
        assert len(log) >= sum(size for _, _, size, _ in acks)
        # And it takes new appends where it left off.
        version = await store.stream_version("worker-0")
        positions = await store.append(
            "worker-0", [NewEvent("After", b"")], expected_version=version
        )
        assert positions == [len(log) + 1]
    finally:
        await store.close()
