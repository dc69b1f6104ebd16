"""Consumer processes killed with SIGKILL mid-batch lose nothing (Redis Streams, NATS).

A worker process holds a batch of deliveries, acknowledges part of it and is then killed
with SIGKILL while it still holds the rest. A restarted worker (another process, another
consumer name in the same group) must end up acknowledging every published message: the
killed worker's unacknowledged deliveries come back after the ack timeout (XAUTOCLAIM on
Redis, ack_wait on JetStream).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from collaborative_blocks.core.clock import SystemClock
from collaborative_blocks.core.messaging.transport import Transport
from collaborative_blocks.testing.services import require_nats, require_redis

WORKER = textwrap.dedent(
    """
    import asyncio
    import sys

    from collaborative_blocks.core.clock import SystemClock


    async def open_transport(url):
        if url.startswith("nats"):
            from collaborative_blocks.plugins.transports.nats import open_nats_transport

            return await open_nats_transport(url, clock=SystemClock())
        from collaborative_blocks.plugins.transports.redis import open_redis_transport

        return await open_redis_transport(url, clock=SystemClock())


    async def main():
        url, subject, consumer, mode = sys.argv[1:5]
        transport = await open_transport(url)
        subscription = await transport.subscribe(
            subject, group="workers", consumer=consumer, ack_timeout=1.0, prefetch=20
        )
        print("ready", flush=True)
        while True:
            batch = await subscription.fetch(20)
            for index, delivery in enumerate(batch):
                if mode == "doomed" and index == len(batch) // 2:
                    # Holding the rest of the batch, unacknowledged: the test kills us here.
                    print(f"holding {len(batch) - index}", flush=True)
                    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
                await delivery.ack()
                print("acked", delivery.body.decode(), flush=True)


    asyncio.run(main())
    """
)


class Worker:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        #: Bodies this worker reported acknowledged, from every line read so far.
        self.acked: set[str] = set()

    def _note(self, line: str) -> str:
        if line.startswith("acked "):
            self.acked.add(line.split(" ", 1)[1])
        return line

    async def line(self) -> str:
        assert self.process.stdout is not None
        raw = await asyncio.wait_for(self.process.stdout.readline(), 60)
        assert raw, f"worker exited early with code {await self.process.wait()}"
        return self._note(raw.decode().strip())

    async def rest(self) -> None:
        """Read what a dead worker printed before it died."""
        assert self.process.stdout is not None
        for line in (await self.process.stdout.read()).decode().splitlines():
            self._note(line.strip())

    async def expect(self, prefix: str) -> str:
        while True:
            line = await self.line()
            if line.startswith(prefix):
                return line

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()


@pytest.fixture
def worker_script(tmp_path: Path) -> Path:
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


@pytest.fixture
async def spawn(worker_script: Path) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    started: list[Worker] = []

    async def start(url: str, subject: str, consumer: str, mode: str) -> Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(worker_script),
            url,
            subject,
            consumer,
            mode,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        worker = Worker(process)
        started.append(worker)
        assert await worker.expect("ready") == "ready"
        return worker

    yield start
    for worker in started:
        await worker.stop()


async def _nothing_lost_when_a_worker_is_killed_mid_batch(
    transport: Transport, url: str, spawn: Callable[..., Awaitable[Worker]]
) -> None:
    subject = "jobs"
    bodies = [f"job-{n}" for n in range(200)]

    doomed = await spawn(url, subject, "doomed", "doomed")
    for body in bodies[:20]:
        await transport.publish(subject, body.encode())
    holding = await doomed.expect("holding")
    assert int(holding.split()[1]) > 0
    doomed.process.send_signal(signal.SIGKILL)
    assert await doomed.process.wait() == -signal.SIGKILL
    await doomed.rest()

    restarted = await spawn(url, subject, "restarted", "normal")
    for body in bodies[20:]:
        await transport.publish(subject, body.encode())
    while not (doomed.acked | restarted.acked).issuperset(bodies):
        await restarted.expect("acked")
    assert doomed.acked | restarted.acked == set(bodies)
    # What the killed worker held came back: the restarted one acked some of the first batch.
    assert restarted.acked & set(bodies[:20])
    await restarted.stop()


async def test_redis_worker_killed_mid_batch_loses_nothing(
    spawn: Callable[..., Awaitable[Worker]],
) -> None:
    require_redis()
    from redis.asyncio import Redis

    from collaborative_blocks.plugins.transports.redis import open_redis_transport

    prefix = f"cbtest:{uuid.uuid4().hex[:10]}:"
    url = f"redis://127.0.0.1:6379/0?prefix={prefix}"
    transport = await open_redis_transport(url, clock=SystemClock())
    client = Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        await _nothing_lost_when_a_worker_is_killed_mid_batch(transport, url, spawn)
        key = transport.stream_key("jobs")
        # Every entry the killed worker held was taken over and acknowledged.
        assert (await client.xpending(key, "workers"))["pending"] == 0
    finally:
        await transport.close()
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_nats_worker_killed_mid_batch_loses_nothing(
    spawn: Callable[..., Awaitable[Worker]],
) -> None:
    require_nats()
    import nats

    from collaborative_blocks.plugins.transports.nats import open_nats_transport

    tag = uuid.uuid4().hex[:10]
    url = f"nats://127.0.0.1:4222?stream=CBTEST_{tag}&prefix=cbtest{tag}"
    transport = await open_nats_transport(url, clock=SystemClock())
    try:
        # The group must exist before the first publish: interest retention keeps messages
        # only for groups that exist.
        await (await transport.subscribe("jobs", group="workers", consumer="setup")).close()
        await _nothing_lost_when_a_worker_is_killed_mid_batch(transport, url, spawn)
    finally:
        await transport.close()
        nc = await nats.connect("nats://127.0.0.1:4222")
        try:
            await nc.jetstream().delete_stream(f"CBTEST_{tag}")
        finally:
            await nc.close()
