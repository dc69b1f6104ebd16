"""Over Redis, a consumer process SIGKILLed mid-retry does not take its attempts' errors along.

The attempt history lives in the event store (SQLite here, shared by the processes), the
messages in Redis Streams. The first worker fails attempts 1 and 2 and is killed with SIGKILL
while its third attempt runs; the second worker gets the message after the ack timeout
(XAUTOCLAIM), continues the count and fails until the retries are used up. The dead letter
it writes must hold the errors of both processes. Run as a script, this file is the worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from collaborative_blocks import load_settings
from collaborative_blocks.core.clock import SystemClock
from collaborative_blocks.core.messaging import (
    DeadLetterReason,
    Message,
    MessageBroker,
    MessageContext,
    MessageType,
    RetryPolicy,
)
from collaborative_blocks.stores import EventStore, open_store
from collaborative_blocks.testing.services import require_redis

GROUP = "workers"


def make_broker(url: str, store: EventStore) -> MessageBroker:
    return MessageBroker(
        url,
        store=store,
        clock=SystemClock(),
        settings=load_settings({}),
        tracing=False,
        handler_timeout=3.0,
        ack_timeout=4.0,
        retry=RetryPolicy(max_retries=3, base_delay=0.05, max_delay=0.2),
    )


async def work(role: str, url: str, store_url: str) -> None:
    store = await open_store(store_url)
    broker = make_broker(url, store)

    async def job(message: Message, ctx: MessageContext) -> None:
        if role == "first" and ctx.attempt == 3:
            print("stuck", flush=True)  # attempts 1 and 2 are recorded: kill me now
            await asyncio.Event().wait()
        raise RuntimeError(f"{role} failed attempt {ctx.attempt}")

    await broker.subscribe("job", job, group=GROUP)
    print("ready", flush=True)
    await broker.dead_letters().wait_for(1)
    print("dead-lettered", flush=True)
    await broker.close()
    await store.close()


async def expect(process: asyncio.subprocess.Process, wanted: str) -> None:
    assert process.stdout is not None
    while True:
        raw = await asyncio.wait_for(process.stdout.readline(), 60)
        assert raw, f"worker exited early with code {await process.wait()}"
        if raw.decode().strip() == wanted:
            return


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    require_redis()
    from redis.asyncio import Redis

    prefix = f"cbattempts:{uuid.uuid4().hex[:10]}:"
    yield f"redis://127.0.0.1:6379/0?prefix={prefix}"
    client = Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def test_dead_letter_lists_attempts_of_a_killed_worker(
    redis_url: str, tmp_path: Path
) -> None:
    store_url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    store = await open_store(store_url)
    publisher = make_broker(redis_url, store)
    processes: list[asyncio.subprocess.Process] = []

    async def spawn(role: str) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            role,
            redis_url,
            store_url,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        processes.append(process)
        await expect(process, "ready")
        return process

    try:
        first = await spawn("first")
        sent = await publisher.publish(Message(MessageType.EVENT, "job", 1, source="test"))
        await expect(first, "stuck")
        first.send_signal(signal.SIGKILL)
        assert await first.wait() == -signal.SIGKILL
        second = await spawn("second")
        await expect(second, "dead-lettered")
        assert await asyncio.wait_for(second.wait(), 60) == 0

        (letter,) = await publisher.dead_letters().list()
        assert letter.reason is DeadLetterReason.RETRIES_EXHAUSTED
        assert letter.message_id == sent.id
        # Attempt 3 was running when the first worker died: it left no error, but counts.
        assert [(e.attempt, e.error) for e in letter.errors] == [
            (1, "first failed attempt 1"),
            (2, "first failed attempt 2"),
            (3, "second failed attempt 3"),
            (4, "second failed attempt 4"),
        ]
        assert len({e.consumer for e in letter.errors}) == 2, "two processes made them"
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
        await publisher.close()
        await store.close()


if __name__ == "__main__":
    asyncio.run(work(*sys.argv[1:4]))
