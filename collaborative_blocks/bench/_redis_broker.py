"""The Redis Streams contenders of ``cblocks bench broker``: ours, FastStream, raw redis-py.

Every contender does the same work on the same Redis: a consumer group exists on a fresh
stream, ``PUBLISHERS`` concurrent tasks publish ``messages`` messages between them, a
consumer handles each one (the handler counts) and acknowledges it (``XACK``). A measurement
ends when the handler has seen every message *and* the group has nothing pending, so an ack
still in flight is part of the time. Each measurement uses streams of its own (a unique
name) and deletes them afterwards, done or failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from collaborative_blocks.core.messaging.broker import MessageBroker, event_subject
from collaborative_blocks.core.messaging.envelope import Message, MessageType, encode
from collaborative_blocks.core.settings import load_settings
from collaborative_blocks.errors import redact_url

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "PUBLISHERS",
    "READ_COUNT",
    "faststream_over_redis",
    "ours_over_redis",
    "raw_pipeline",
    "transport_only",
    "redis_unreachable",
]

#: Concurrent publishing tasks: a service publishes from many requests at once, and one
#: sequential publisher would measure the network round trip rather than the library.
PUBLISHERS = 64
#: Entries per XREADGROUP of the raw loop: what our broker's consumer asks for (its fetch
#: batch is ``min(max_in_flight, 256)``).
READ_COUNT = 256
GROUP = "bench"
#: How long the end-of-measurement check waits between XPENDING polls: acks are not
#: observable from the handler, and this is far below a measurement's length.
DRAIN_POLL = 0.0005
#: A measurement that has not finished after this long has lost messages: fail loudly.
STALL_TIMEOUT = 120.0


def _client(url: str) -> Redis:
    from redis.asyncio import Redis

    return Redis.from_url(url, decode_responses=False, socket_connect_timeout=2.0)


async def redis_unreachable(url: str) -> str | None:
    """``None`` when Redis at ``url`` answers PING, else why not (for the "n/a" row)."""
    try:
        import redis.asyncio  # noqa: F401
    except ImportError:
        return "n/a: redis-py is not installed (pip install 'collaborative-blocks[redis]')"
    client = _client(url)
    try:
        await asyncio.wait_for(client.ping(), 3.0)
    except Exception as error:
        return f"n/a: Redis not reachable at {redact_url(url)} ({error})"
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
    return None


def _with_query(url: str, **options: str) -> str:
    extra = "&".join(f"{k}={v}" for k, v in options.items())
    return f"{url}{'&' if '?' in url else '?'}{extra}"


async def _publish_all(messages: int, publish: Callable[[int], Awaitable[object]]) -> None:
    async def publisher(first: int) -> None:
        for n in range(first, messages, PUBLISHERS):
            await publish(n)

    await asyncio.gather(*(publisher(i) for i in range(min(PUBLISHERS, messages))))


async def _drained(client: Redis, key: str) -> None:
    while True:
        summary = await client.xpending(key, GROUP)
        if not summary["pending"]:
            return
        await asyncio.sleep(DRAIN_POLL)


async def _delete_keys(client: Redis, pattern: str) -> None:
    keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
    if keys:
        await client.delete(*keys)


async def ours_over_redis(url: str, messages: int) -> float:
    """Our MessageBroker over ``redis://``: AT_LEAST_ONCE events, a counting handler."""
    prefix = f"cbbench:{uuid.uuid4().hex[:12]}:"
    broker = MessageBroker(_with_query(url, prefix=prefix), settings=load_settings({}))
    client = _client(url)
    done = asyncio.Event()
    handled = 0

    async def handler(message: Message) -> None:
        nonlocal handled
        handled += 1
        if handled == messages:
            done.set()

    def publish(n: int) -> Awaitable[Message]:
        return broker.publish(
            Message(MessageType.EVENT, "bench.tick", n, source="bench", key=str(n % 64))
        )

    try:
        await broker.subscribe("bench.*", handler, group=GROUP)
        start = time.perf_counter()
        await _publish_all(messages, publish)
        await asyncio.wait_for(done.wait(), STALL_TIMEOUT)
        await _drained(client, prefix + event_subject())
        elapsed = time.perf_counter() - start
    finally:
        await broker.close()
        with contextlib.suppress(Exception):
            await _delete_keys(client, prefix + "*")
        await client.aclose()
    return messages / elapsed


async def faststream_over_redis(url: str, messages: int) -> float:
    """FastStream's stream subscriber: a consumer group, ``AckPolicy.MANUAL``, ``msg.ack()``."""
    from faststream import AckPolicy
    from faststream.redis import RedisBroker, StreamSub
    from faststream.redis.annotations import RedisStreamMessage

    stream = f"cbbench:{uuid.uuid4().hex[:12]}:faststream"
    # No log line per message: ours writes none, and the terminal is not what is measured.
    # FastStream documents logger=None for that; its typed parameters do not admit it.
    broker = RedisBroker(url, logger=None)  # type: ignore[arg-type]
    client = _client(url)
    done = asyncio.Event()
    handled = 0

    @broker.subscriber(
        stream=StreamSub(stream, group=GROUP, consumer="bench-1"),
        ack_policy=AckPolicy.MANUAL,
    )
    async def handler(body: int, msg: RedisStreamMessage) -> None:
        nonlocal handled
        await msg.ack()
        handled += 1
        if handled == messages:
            done.set()

    def publish(n: int) -> Awaitable[object]:
        return broker.publish(n, stream=stream)

    try:
        await broker.start()
        start = time.perf_counter()
        await _publish_all(messages, publish)
        await asyncio.wait_for(done.wait(), STALL_TIMEOUT)
        await _drained(client, stream)
        elapsed = time.perf_counter() - start
    finally:
        await broker.stop()
        with contextlib.suppress(Exception):
            await client.delete(stream)
        await client.aclose()
    return messages / elapsed


async def transport_only(url: str, messages: int) -> float:
    """Context: our Redis transport without the broker (no routing, envelope, handler, retry).

    Publishes one encoded envelope's bytes as they are, like the raw loop, and acks each
    fetched batch concurrently, as the broker's partition workers do.
    """
    from collaborative_blocks.core.clock import SystemClock
    from collaborative_blocks.plugins.transports.redis import open_redis_transport

    prefix = f"cbbench:{uuid.uuid4().hex[:12]}:"
    transport = await open_redis_transport(_with_query(url, prefix=prefix), clock=SystemClock())
    client = _client(url)
    body = _sample_body()
    acks: set[asyncio.Future[list[None]]] = set()

    async def consume() -> None:
        handled = 0
        while handled < messages:
            deliveries = await subscription.fetch(READ_COUNT)
            handled += len(deliveries)
            task = asyncio.ensure_future(asyncio.gather(*(d.ack() for d in deliveries)))
            acks.add(task)
            task.add_done_callback(acks.discard)

    def publish(n: int) -> Awaitable[None]:
        return transport.publish("bench", body)

    try:
        subscription = await transport.subscribe(
            "bench", group=GROUP, consumer="bench-1", prefetch=1000
        )
        start = time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(_publish_all(messages, publish), consume()), STALL_TIMEOUT
        )
        await asyncio.gather(*acks)
        await _drained(client, prefix + "bench")
        elapsed = time.perf_counter() - start
    finally:
        await transport.close()
        with contextlib.suppress(Exception):
            await _delete_keys(client, prefix + "*")
        await client.aclose()
    return messages / elapsed


def _sample_body() -> bytes:
    """One encoded envelope like those ours publishes, so every XADD carries as many bytes."""
    broker = MessageBroker(settings=load_settings({}))
    message = broker.stamp(
        Message(MessageType.EVENT, "bench.tick", 12345, source="bench", key="17")
    )
    return encode(message)


async def raw_pipeline(url: str, messages: int) -> float:
    """The limit: redis-py asyncio, XADD pipelined per batch, XREADGROUP, one XACK per read.

    No envelope is built or parsed and nothing is routed: the bytes are one encoded message
    of ours, sent as they are.
    """
    from redis.exceptions import ResponseError

    key = f"cbbench:{uuid.uuid4().hex[:12]}:raw"
    body = _sample_body()
    producer, consumer = _client(url), _client(url)
    handled = 0

    async def produce() -> None:
        for first in range(0, messages, PUBLISHERS):
            async with producer.pipeline(transaction=False) as pipe:
                for _ in range(first, min(first + PUBLISHERS, messages)):
                    pipe.xadd(key, {b"b": body})
                await pipe.execute()

    async def consume() -> None:
        nonlocal handled
        while handled < messages:
            reply = cast(
                "list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]",
                await consumer.xreadgroup(
                    GROUP, "bench-1", {key: ">"}, count=READ_COUNT, block=100
                ),
            )
            for _, entries in reply:
                ids = [entry_id for entry_id, _ in entries]
                handled += len(ids)
                if ids:
                    await consumer.xack(key, GROUP, *ids)

    try:
        with contextlib.suppress(ResponseError):
            await consumer.xgroup_create(key, GROUP, id="0", mkstream=True)
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(produce(), consume()), STALL_TIMEOUT)
        await _drained(consumer, key)
        elapsed = time.perf_counter() - start
    finally:
        with contextlib.suppress(Exception):
            await consumer.delete(key)
        await producer.aclose()
        await consumer.aclose()
    return messages / elapsed
