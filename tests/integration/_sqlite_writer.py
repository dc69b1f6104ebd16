"""A writer process for test_sqlite_sigkill.py: appends until it is killed.

Usage: python _sqlite_writer.py SQLITE_URL

Four tasks append concurrently (so commits are grouped), alternating single events and
batches of 1-20 events. After each acknowledged append it prints, and flushes, one line:
``ack STREAM FIRST_POSITION COUNT BATCH_ID``. Every event's state is ``BATCH_ID/INDEX/COUNT``
so the test can check, after a SIGKILL, that no batch was stored in part.
"""

from __future__ import annotations

import asyncio
import random
import sys

from collaborative_blocks.stores import NewEvent
from collaborative_blocks.stores.sqlite import open_sqlite_store


async def writer(url: str) -> None:
    store = await open_sqlite_store(url)
    rng = random.Random(7)

    async def task(worker: int) -> None:
        stream = f"worker-{worker}"
        version = 0
        n = 0
        while True:
            n += 1
            batch_id = f"{worker}-{n}"
            count = 1 if n % 2 else rng.randint(1, 20)
            events = [NewEvent("Written", f"{batch_id}/{i}/{count}".encode()) for i in range(count)]
            positions = await store.append(stream, events, expected_version=version)
            version += count
            sys.stdout.write(f"ack {stream} {positions[0]} {count} {batch_id}\n")
            sys.stdout.flush()

    await asyncio.gather(*(task(w) for w in range(4)))


if __name__ == "__main__":
    asyncio.run(writer(sys.argv[1]))
