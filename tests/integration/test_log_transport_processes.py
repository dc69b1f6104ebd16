"""Worker processes over the log-backed transport on PostgreSQL; SIGKILLed workers lose nothing.

The test publishes EXACTLY_ONCE jobs into the log, starts three worker processes that
compete in one consumer group, kills two of them with SIGKILL in the middle of the work and
starts replacements. Every job must end up handled, each effect exactly once, nothing
dead-lettered. Run as a script, this file is the worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from collaborative_blocks import load_settings
from collaborative_blocks.core.clock import SystemClock
from collaborative_blocks.core.messaging import (
    DeliveryGuarantee,
    Message,
    MessageBroker,
    MessageContext,
    MessageType,
)
from collaborative_blocks.plugins.transports.log import CLAIMED_TOPIC, LogTransport, group_stream
from collaborative_blocks.stores import EventStore, NewEvent, open_store

pytestmark = pytest.mark.postgres

JOBS = 150
GROUP = "workers"
ACK_TIMEOUT = 3.0


def make_broker(store: EventStore) -> MessageBroker:
    clock = SystemClock()
    return MessageBroker(
        transport=LogTransport(store, clock=clock, poll_interval=0.05),
        store=store,
        clock=clock,
        settings=load_settings({}),
        tracing=False,
        handler_timeout=ACK_TIMEOUT / 2,
        ack_timeout=ACK_TIMEOUT,
        max_in_flight=10,
        partitions=4,
    )


async def work(url: str, slow: bool) -> None:
    store = await open_store(url)
    broker = make_broker(store)

    async def job(message: Message, ctx: MessageContext) -> None:
        if slow:
            # Simulated work, so that a worker killed mid-run is sure to hold claims it has
            # not settled: the takeover below is then exercised on every run, not by luck.
            await asyncio.sleep(0.3)
        ctx.append(f"effect-{message.payload}", [NewEvent("JobDone", str(os.getpid()).encode())])

    await broker.subscribe("job", job, group=GROUP)
    await asyncio.Event().wait()  # serve until killed


async def effects_reach(store: EventStore, count: int) -> None:
    """Follow the log (LISTEN/NOTIFY driven) until ``count`` effects are committed."""
    seen = 0
    async for _event in store.subscribe(topics=["JobDone"]):
        seen += 1
        if seen >= count:
            return


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def spawn(
    url: str, workers: list[subprocess.Popen[bytes]], *, slow: bool = False
) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, __file__, url, "slow" if slow else "fast"])
    workers.append(process)
    return process


async def test_killed_workers_lose_nothing(
    cb_postgres_url: str, workers: list[subprocess.Popen[bytes]]
) -> None:
    store = await open_store(cb_postgres_url)
    publisher = make_broker(store)
    try:
        sent = [
            await publisher.publish(
                Message(
                    MessageType.EVENT,
                    "job",
                    n,
                    source="test",
                    guarantee=DeliveryGuarantee.EXACTLY_ONCE,
                )
            )
            for n in range(JOBS)
        ]
        # The two workers that will be killed are slow; the third keeps the work flowing.
        first = [spawn(cb_postgres_url, workers, slow=n < 2) for n in range(3)]
        await asyncio.wait_for(effects_reach(store, JOBS // 4), 120)
        for process in first[:2]:
            os.kill(process.pid, signal.SIGKILL)  # mid-batch: claims held, nothing settled
        for _ in range(2):
            spawn(cb_postgres_url, workers)
        await asyncio.wait_for(effects_reach(store, JOBS), 180)
        for n in range(JOBS):
            effects = await store.read(f"effect-{n}")
            assert len(effects) == 1, f"job {n} took effect {len(effects)} times"
        for message in sent:
            assert await store.has_processed(GROUP, message.id)
        assert await publisher.dead_letters().list() == []
        # The kills happened mid-batch: some claims of the dead workers were taken over.
        claims = await store.read(group_stream("cb.events", GROUP))
        retried = [
            attempt
            for event in claims
            if event.topic == CLAIMED_TOPIC
            for attempt in json.loads(event.state)["a"]
            if attempt > 1
        ]
        assert retried, "no delivery of a killed worker was taken over"
        assert [p.wait(timeout=30) for p in first[:2]] == [-signal.SIGKILL] * 2
    finally:
        await publisher.close()
        await store.close()


if __name__ == "__main__":
    asyncio.run(work(sys.argv[1], sys.argv[2] == "slow"))
