"""The Redis Streams transport against the Redis server on this machine."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator

import pytest

from collaborative_blocks.core.clock import Clock, SystemClock
from collaborative_blocks.core.messaging.envelope import DeliveryGuarantee
from collaborative_blocks.core.messaging.transport import Delivery, Subscription, Transport
from collaborative_blocks.core.runtime import Runtime
from collaborative_blocks.errors import TransportUnavailableError
from collaborative_blocks.plugins.transports.redis import (
    RedisStreamsTransport,
    RedisTransportFactory,
    open_redis_transport,
)
from collaborative_blocks.testing.services import require_redis
from collaborative_blocks.testing.transport_conformance import (
    TransportConformance,
    body_message,
)

pytestmark = pytest.mark.redis

REDIS_URL = "redis://127.0.0.1:6379/0"


def _test_url() -> str:
    # A prefix per test keeps keys apart and lets the cleanup find every key it made.
    return f"{REDIS_URL}?prefix=cbtest:{uuid.uuid4().hex[:10]}:"


async def _delete_keys(url: str) -> None:
    from redis.asyncio import Redis

    prefix = url.split("prefix=", 1)[1]
    client = Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


class TestRedisConformance(TransportConformance):
    virtual_time = False
    ack_timeout = 1.0

    url: str | None = None

    def process_url(self) -> str | None:
        return self.url

    @pytest.fixture
    async def transport(self, clock: Clock) -> AsyncIterator[Transport]:
        require_redis()
        url = self.url = _test_url()
        transport = await RedisTransportFactory().open(url, runtime=Runtime(clock=clock))
        try:
            yield transport
        finally:
            await transport.close()
            await _delete_keys(url)


@pytest.fixture
async def redis_transport() -> AsyncIterator[RedisStreamsTransport]:
    require_redis()
    url = _test_url()
    transport = await open_redis_transport(url, clock=SystemClock())
    try:
        yield transport
    finally:
        await transport.close()
        await _delete_keys(url)


def _message(n: int) -> bytes:
    # Raw bodies are enough here: the transport does not look inside.
    return f"message-{n}".encode()


async def _fetch(subscription: Subscription, count: int = 1) -> list[Delivery]:
    return list(await asyncio.wait_for(subscription.fetch(count), 20))


async def test_declares_every_guarantee_and_crash_safety(
    redis_transport: RedisStreamsTransport,
) -> None:
    capabilities = redis_transport.capabilities
    assert capabilities.guarantees == frozenset(DeliveryGuarantee)
    assert capabilities.durable
    assert capabilities.survives_consumer_crash


async def test_unreachable_server_at_start_up_is_a_typed_error_naming_the_url() -> None:
    with pytest.raises(TransportUnavailableError, match=r"127\.0\.0\.1:1") as caught:
        await open_redis_transport("redis://127.0.0.1:1/0", clock=SystemClock())
    assert "MESSAGE_BROKER_URL" in str(caught.value)


async def test_password_is_hidden_in_the_url_and_errors() -> None:
    with pytest.raises(TransportUnavailableError) as caught:
        await open_redis_transport("redis://user:secret@127.0.0.1:1/0", clock=SystemClock())
    assert "secret" not in str(caught.value)


async def test_redelivery_after_ack_timeout_counts_attempts_from_redis(
    redis_transport: RedisStreamsTransport,
) -> None:
    subject = "orders"
    subscription = await redis_transport.subscribe(
        subject, group="g", consumer="c1", ack_timeout=0.3
    )
    await redis_transport.publish(subject, _message(1))
    first = (await _fetch(subscription))[0]
    assert first.attempt == 1
    second = (await _fetch(subscription))[0]  # never acked: it comes back
    assert second.body == first.body
    assert second.attempt == 2
    third = (await _fetch(subscription))[0]
    assert third.attempt == 3
    await third.ack()


async def test_competing_consumers_each_get_a_share_and_none_twice(
    redis_transport: RedisStreamsTransport,
) -> None:
    subject = "work"
    workers = [
        await redis_transport.subscribe(subject, group="g", consumer=f"c{i}", prefetch=5)
        for i in range(3)
    ]
    total = 60
    for n in range(total):
        await redis_transport.publish(subject, _message(n))
    seen: dict[int, list[bytes]] = {i: [] for i in range(3)}
    while sum(len(v) for v in seen.values()) < total:
        for index, worker in enumerate(workers):
            batch = await asyncio.wait_for(worker.fetch(5), 20)
            for delivery in batch:
                assert isinstance(delivery.body, bytes)
                seen[index].append(delivery.body)
                await delivery.ack()
            if sum(len(v) for v in seen.values()) >= total:
                break
    everything = [body for bodies in seen.values() for body in bodies]
    assert len(everything) == len(set(everything)) == total
    assert all(seen[i] for i in range(3)), f"a consumer got no share: {seen}"


async def test_pending_entries_of_a_dead_consumer_are_reclaimed_with_xautoclaim(
    redis_transport: RedisStreamsTransport,
) -> None:
    from redis.asyncio import Redis

    subject = "reclaim"
    key = redis_transport.stream_key(subject)
    dead = await redis_transport.subscribe(subject, group="g", consumer="dead", ack_timeout=0.5)
    for n in range(5):
        await redis_transport.publish(subject, _message(n))
    taken = await _fetch(dead, 5)
    assert len(taken) == 5
    # The dead consumer never settles; Redis shows its entries pending under its name.
    client = Redis.from_url(REDIS_URL)
    try:
        summary = await client.xpending(key, "g")
        assert summary["pending"] == 5
        assert {c["name"]: c["pending"] for c in summary["consumers"]} == {b"dead": 5}
        survivor = await redis_transport.subscribe(
            subject, group="g", consumer="survivor", ack_timeout=0.5
        )
        rescued: list[Delivery] = []
        while len(rescued) < 5:
            rescued.extend(await _fetch(survivor, 5))
        assert sorted(d.body for d in rescued) == sorted(d.body for d in taken)  # type: ignore[type-var]
        assert all(d.attempt == 2 for d in rescued)
        for delivery in rescued:
            await delivery.ack()
        summary = await client.xpending(key, "g")
        assert summary["pending"] == 0
    finally:
        await client.aclose()


async def test_nack_longer_than_the_ack_timeout_is_held_until_due(
    redis_transport: RedisStreamsTransport,
) -> None:
    subject = "delayed"
    subscription = await redis_transport.subscribe(
        subject, group="g", consumer="c1", ack_timeout=0.3
    )
    other = await redis_transport.subscribe(subject, group="g", consumer="c2", ack_timeout=0.3)
    await redis_transport.publish(subject, _message(1))
    first = (await _fetch(subscription))[0]
    await first.nack(delay=1.2)
    await redis_transport.publish(subject, _message(2))
    # Several ack timeouts pass while it is held; the other consumer sees only the new one.
    fresh = (await _fetch(other))[0]
    assert fresh.body == _message(2)
    await fresh.ack()
    again = (await _fetch(other))[0]
    assert again.body == _message(1)
    assert again.attempt == 2
    await again.ack()


async def test_acknowledged_entries_are_trimmed(redis_transport: RedisStreamsTransport) -> None:
    from redis.asyncio import Redis

    subject = "trimmed"
    key = redis_transport.stream_key(subject)
    subscription = await redis_transport.subscribe(subject, group="g", consumer="c1")
    total = 3000
    for n in range(total):
        await redis_transport.publish(subject, _message(n))
    acked = 0
    while acked < total:
        for delivery in await _fetch(subscription, 500):
            await delivery.ack()
            acked += 1
    await redis_transport._trim_acknowledged(key)
    client = Redis.from_url(REDIS_URL)
    try:
        length = await client.xlen(key)
    finally:
        await client.aclose()
    # MINID ~ trims whole macro nodes, so a few acknowledged entries may stay.
    assert length < total // 2


async def test_messages_survive_the_transport_being_reopened(
    redis_transport: RedisStreamsTransport,
) -> None:
    url = f"{REDIS_URL}?prefix={redis_transport.stream_key('')}"
    subject = "durable"
    await redis_transport.subscribe(subject, group="g", consumer="c1")
    sent = [_message(n) for n in range(3)]
    for body in sent:
        await redis_transport.publish(subject, body)
    reopened = await open_redis_transport(url, clock=SystemClock())
    try:
        subscription = await reopened.subscribe(subject, group="g", consumer="c2")
        got: list[Delivery] = []
        while len(got) < len(sent):
            got.extend(await _fetch(subscription, 3))
        assert [d.body for d in got] == sent
        for delivery in got:
            await delivery.ack()
    finally:
        await reopened.close()


async def test_concurrent_publishes_share_round_trips_and_keep_order(
    redis_transport: RedisStreamsTransport,
) -> None:
    subject = "burst"
    subscription = await redis_transport.subscribe(subject, group="g", consumer="c1", prefetch=200)
    sent = [_message(n) for n in range(200)]
    await asyncio.gather(*(redis_transport.publish(subject, body) for body in sent))
    got: list[Delivery] = []
    while len(got) < len(sent):
        got.extend(await _fetch(subscription, 200))
    assert [d.body for d in got] == sent
    await asyncio.gather(*(d.ack() for d in got))


def test_conformance_helper_decodes_bytes() -> None:
    from collaborative_blocks.core.messaging.envelope import Message, MessageType, encode

    message = Message.new(
        MessageType.EVENT, "x.y", {"n": 1}, now=1_700_000_000.0, rng=random.Random(1), source="t"
    )
    assert body_message(encode(message)) == message


async def test_in_progress_keeps_a_long_handler_s_message(
    redis_transport: RedisStreamsTransport,
) -> None:
    from redis.asyncio import Redis

    subject = "slow"
    key = redis_transport.stream_key(subject)
    mine = await redis_transport.subscribe(subject, group="g", consumer="c1", ack_timeout=1.0)
    await redis_transport.publish(subject, b"slow")
    delivery = (await _fetch(mine))[0]
    client = Redis.from_url(REDIS_URL)
    try:
        before = await client.xpending_range(key, "g", "-", "+", 1)
        await delivery.in_progress()  # type: ignore[attr-defined]
        after = await client.xpending_range(key, "g", "-", "+", 1)
    finally:
        await client.aclose()
    # Still ours, not counted as a new delivery, and idle again from now.
    assert after[0]["consumer"] == b"c1"
    assert after[0]["times_delivered"] == before[0]["times_delivered"] == 1
    assert after[0]["time_since_delivered"] <= before[0]["time_since_delivered"]
    await delivery.ack()


class _PrivateRedis:
    """A redis-server of this test alone, which it can kill and restart."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            "redis-server",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.process.stdout is not None
        while True:
            line = await asyncio.wait_for(self.process.stdout.readline(), 20)
            assert line, "redis-server exited during start-up"
            if b"Ready to accept connections" in line:
                return

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@pytest.fixture
async def private_redis() -> AsyncIterator[_PrivateRedis]:
    import shutil
    import socket

    require_redis()
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = _PrivateRedis(port)
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


async def test_redis_restarting_mid_run_is_retried_and_the_group_recreated(
    private_redis: _PrivateRedis,
) -> None:
    transport = await open_redis_transport(f"{private_redis.url}?retry_for=30", clock=SystemClock())
    try:
        subscription = await transport.subscribe("jobs", group="g", consumer="c1")
        await private_redis.kill()
        # The publish retries with backoff while the server is away ...
        publishing = asyncio.ensure_future(transport.publish("jobs", b"after the restart"))
        await private_redis.start()
        await asyncio.wait_for(publishing, 30)
        # ... and the restarted server, which lost everything, gets its group back.
        delivery = (await _fetch(subscription))[0]
        assert delivery.body == b"after the restart"
        await delivery.ack()
    finally:
        await transport.close()


async def test_redis_gone_for_longer_than_retry_for_is_a_typed_error(
    private_redis: _PrivateRedis,
) -> None:
    transport = await open_redis_transport(
        f"{private_redis.url}?retry_for=0.5", clock=SystemClock()
    )
    try:
        await private_redis.kill()
        with pytest.raises(TransportUnavailableError, match=str(private_redis.port)):
            await transport.publish("jobs", b"lost?")
    finally:
        await transport.close()


async def test_the_broker_runs_over_redis_events_and_queries() -> None:
    from collaborative_blocks.core.messaging.broker import MessageBroker
    from collaborative_blocks.core.messaging.connector import SystemConnector
    from collaborative_blocks.core.messaging.envelope import Message

    require_redis()
    url = _test_url()
    broker = MessageBroker(url)
    received: asyncio.Queue[str] = asyncio.Queue()

    async def on_order(message: Message) -> None:
        await received.put(message.name)

    async def total(message: Message) -> dict[str, int]:
        return {"total": 42}

    try:
        await broker.subscribe("orders.*", on_order)
        shop = SystemConnector("shop", broker)
        billing = SystemConnector("billing", broker)
        billing.on_query("total", total)
        await billing.start()
        await shop.publish_event("orders.created", {"id": 1})
        assert await asyncio.wait_for(received.get(), 20) == "orders.created"
        assert await shop.query("billing", "total", {}, timeout=20) == {"total": 42}
    finally:
        await broker.close()
        await _delete_keys(url)
