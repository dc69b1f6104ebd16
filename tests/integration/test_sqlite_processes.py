"""A subscriber follows commits that another process makes to the same SQLite file."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from collaborative_blocks.stores import StoredEvent, open_store

WRITER = """
import asyncio, sys
from collaborative_blocks.stores import NewEvent, open_store

async def main() -> None:
    store = await open_store(sys.argv[1])
    for i in range(int(sys.argv[2])):
        await store.append("remote", [NewEvent("Remote", str(i).encode())], expected_version=i)
    await store.close()

asyncio.run(main())
"""


async def test_live_subscriber_sees_another_processes_commits(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    store = await open_store(url)
    seen: list[StoredEvent] = []
    subscribed = asyncio.Event()

    async def follow() -> None:
        iterator = store.subscribe(from_position=1)
        subscribed.set()
        async for event in iterator:
            seen.append(event)
            if len(seen) == 5:
                return

    follower = asyncio.create_task(follow())
    await subscribed.wait()
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, url, "5", stderr=subprocess.PIPE
    )
    _, stderr = await writer.communicate()
    assert writer.returncode == 0, stderr.decode()
    try:
        # No local commit ever wakes this subscriber: only the poll for other processes can.
        await asyncio.wait_for(follower, timeout=30)
    finally:
        follower.cancel()
        await store.close()
    assert [(e.stream, e.version, e.position, e.state) for e in seen] == [
        ("remote", i + 1, i + 1, str(i).encode()) for i in range(5)
    ]
