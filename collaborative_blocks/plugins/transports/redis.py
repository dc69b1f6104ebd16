"""Redis Streams transport (``redis://HOST:PORT/DB``, ``rediss://`` for TLS).

Each subject is one Redis stream (key ``PREFIX + subject``); each consumer group of the
protocol is a Redis consumer group on it (``XGROUP CREATE ... MKSTREAM``, starting at the
oldest retained entry). Consumers read with ``XREADGROUP ... BLOCK``, settle with ``XACK``,
and take over the pending entries of a consumer that died or hung with ``XAUTOCLAIM`` once
they have been idle for the ack timeout; the delivery count Redis keeps for every pending
entry is the delivery's ``attempt``. Publishes and acks issued concurrently are sent together
in one pipeline round trip.

A ``nack(delay)`` keeps the entry pending and sets its idle time (``XCLAIM ... IDLE ...
JUSTID``, which does not count as a delivery) so that it becomes claimable exactly ``delay``
seconds later; a delay longer than the ack timeout is held by the consumer, which keeps the
entry fresh until then (if that consumer dies the ack timeout wins and it comes back early,
never late or never).

Configuration, in the URL's query string (every other parameter goes to redis-py)::

    redis://localhost:6379/0?prefix=cb:&trim_every=1000&maxlen=0&retry_for=30

- ``prefix`` (``cb:``): prepended to subjects to make stream keys.
- ``trim_every`` (``1000``): after this many publishes to a stream, entries that every group
  has acknowledged are trimmed (``XTRIM MINID ~``). ``0`` never trims.
- ``maxlen`` (``0`` = none): hard cap on a stream's length (``XADD MAXLEN ~``). Redis drops
  the oldest entries even when a group has not acknowledged them, so use it only for
  AT_MOST_ONCE traffic or as a disk guard.
- ``retry_for`` (``30``): seconds to retry, with exponential backoff, when Redis stops
  answering before :class:`~collaborative_blocks.errors.TransportUnavailableError` is raised.
- ``max_block`` (``2``): longest single ``XREADGROUP BLOCK`` in seconds.
- ``max_message_bytes`` (1 MiB): the largest message accepted.

Guarantees: AT_MOST_ONCE, AT_LEAST_ONCE and (with the broker's inbox on the event store)
EXACTLY_ONCE. Messages are as durable as the Redis server's persistence (AOF/RDB) makes them.
redis-py is imported only when a ``redis://`` URL is opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from collaborative_blocks import hookimpl
from collaborative_blocks.core.clock import Clock
from collaborative_blocks.core.extensions import TransportFactory
from collaborative_blocks.core.messaging.envelope import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DeliveryGuarantee,
    Message,
    encode,
)
from collaborative_blocks.core.messaging.transport import (
    Delivery,
    Subscription,
    Transport,
    TransportCapabilities,
)
from collaborative_blocks.errors import ConfigurationError, TransportUnavailableError
from collaborative_blocks.errors import redact_url as _redact

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from collaborative_blocks.core.runtime import Runtime

__all__ = ["RedisStreamsTransport", "RedisTransportFactory", "RedisOptions"]

log = logging.getLogger(__name__)

_BODY = b"b"
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """The transport's own URL options (see the module docstring)."""

    prefix: str = "cb:"
    trim_every: int = 1000
    maxlen: int = 0
    retry_for: float = 30.0
    max_block: float = 2.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    @classmethod
    def from_query(cls, url: str, query: dict[str, str]) -> RedisOptions:
        def number(name: str, kind: Callable[[str], _T], default: _T) -> _T:
            if name not in query:
                return default
            try:
                return kind(query.pop(name))
            except ValueError:
                raise ConfigurationError(
                    f"{name} in {_redact(url)!r} must be a number (see docs/transports.md)"
                ) from None

        base = cls()
        options = cls(
            prefix=query.pop("prefix", base.prefix),
            trim_every=number("trim_every", int, base.trim_every),
            maxlen=number("maxlen", int, base.maxlen),
            retry_for=number("retry_for", float, base.retry_for),
            max_block=number("max_block", float, base.max_block),
            max_message_bytes=number("max_message_bytes", int, base.max_message_bytes),
        )
        if (
            options.trim_every < 0
            or options.maxlen < 0
            or options.retry_for < 0
            or options.max_block <= 0
            or options.max_message_bytes < 1
        ):
            raise ConfigurationError(
                f"invalid option in {_redact(url)!r}: trim_every, maxlen, retry_for must be "
                ">= 0, max_block > 0 and max_message_bytes >= 1"
            )
        return options


def _is_connection_error(error: BaseException) -> bool:
    from redis.exceptions import BusyLoadingError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return isinstance(error, RedisConnectionError | RedisTimeoutError | BusyLoadingError | OSError)


def _is_nogroup(error: BaseException) -> bool:
    from redis.exceptions import ResponseError

    return isinstance(error, ResponseError) and str(error).startswith("NOGROUP")


class _Pipeliner:
    """Sends the commands that callers submit while a round trip is in flight together.

    A lone caller pays one round trip, as with a plain command; many concurrent publishers
    or ackers share round trips, which is where most of Redis' throughput comes from. Acks of
    one group are merged into a single XACK, as a hand-written consumer would send them.
    """

    def __init__(self, transport: RedisStreamsTransport) -> None:
        self._transport = transport
        self._commands: list[tuple[Callable[[Pipeline], object], asyncio.Future[Any]]] = []
        self._acks: dict[tuple[str, str], list[tuple[bytes, asyncio.Future[Any]]]] = {}
        self._flusher: asyncio.Task[None] | None = None

    def submit(self, command: Callable[[Pipeline], object]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._commands.append((command, future))
        self._kick()
        return future

    def ack(self, key: str, group: str, entry_id: bytes) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        pending = self._acks.get((key, group))
        if pending is None:
            pending = self._acks[(key, group)] = []
        pending.append((entry_id, future))
        self._kick()
        return future

    def _kick(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while self._commands or self._acks:
            batch: list[tuple[Callable[[Pipeline], object], list[asyncio.Future[Any]]]] = [
                (command, [future]) for command, future in self._commands
            ]
            for (key, group), entries in self._acks.items():
                ids = [entry_id for entry_id, _ in entries]
                batch.append(
                    (
                        functools.partial(_xack, key=key, group=group, ids=ids),
                        [future for _, future in entries],
                    )
                )
            self._commands, self._acks = [], {}
            try:
                results = await self._transport._retrying(functools.partial(self._execute, batch))
            except BaseException as error:
                for _, futures in batch:
                    for future in futures:
                        if not future.done():
                            future.set_exception(error)
                if isinstance(error, asyncio.CancelledError):
                    raise
                continue
            for (_, futures), result in zip(batch, results, strict=True):
                for future in futures:
                    if future.done():
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)

    async def _execute(
        self, batch: list[tuple[Callable[[Pipeline], object], list[asyncio.Future[Any]]]]
    ) -> list[Any]:
        async with self._transport._client.pipeline(transaction=False) as pipe:
            for command, _ in batch:
                command(pipe)
            return list(await pipe.execute(raise_on_error=False))

    async def close(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            with contextlib.suppress(BaseException):
                await self._flusher


def _xack(pipe: Pipeline, *, key: str, group: str, ids: list[bytes]) -> object:
    return pipe.xack(key, group, *ids)


class RedisDelivery:
    """One entry of a stream handed to one consumer of a group."""

    __slots__ = ("_settled", "_subscription", "attempt", "body", "entry_id", "subject")

    def __init__(
        self, subscription: _RedisSubscription, entry_id: bytes, body: bytes, attempt: int
    ) -> None:
        self._subscription = subscription
        self._settled = False
        self.entry_id = entry_id
        self.body: Message | bytes = body
        self.attempt = attempt
        self.subject = subscription.subject

    async def ack(self) -> None:
        if self._settled:
            return
        self._settled = True
        subscription = self._subscription
        subscription._release(self.entry_id)
        key, group, entry = subscription.key, subscription.group, self.entry_id
        await subscription.transport._pipeliner.ack(key, group, entry)

    async def nack(self, delay: float = 0.0) -> None:
        if self._settled:
            return
        self._settled = True
        subscription = self._subscription
        subscription._release(self.entry_id)
        await subscription._give_back(self.entry_id, max(delay, 0.0))

    async def in_progress(self) -> None:
        """Tell the group the handler is still working: restarts this delivery's ack timeout.

        (Resets the entry's idle time, so XAUTOCLAIM leaves it alone for another ack timeout.)
        """
        if self._settled:
            return
        subscription = self._subscription
        subscription._held[self.entry_id] = (
            self,
            subscription._clock.monotonic() + subscription.ack_timeout,
        )
        await subscription._set_idle(self.entry_id, 0.0)


class _RedisSubscription:
    def __init__(
        self,
        transport: RedisStreamsTransport,
        subject: str,
        group: str,
        consumer: str,
        ack_timeout: float,
        prefetch: int,
    ) -> None:
        self.transport = transport
        self.subject = subject
        self.key = transport._key(subject)
        self.group = group
        self.consumer = consumer
        self.ack_timeout = ack_timeout
        self.prefetch = prefetch
        self._clock = transport._clock
        self._ack_timeout_ms = max(int(ack_timeout * 1000), 1)
        # Reclaiming is a scan of the group's pending entries: often enough that a dead
        # consumer's messages come back soon after their ack timeout, rarely enough to cost
        # nothing next to the reads.
        self._reclaim_interval = min(max(ack_timeout / 4, 0.05), 5.0)
        self._next_reclaim = 0.0
        self._reclaim_cursor: bytes | str = "0-0"
        self._held: dict[bytes, tuple[RedisDelivery, float]] = {}
        self._closed = False
        self._wake = asyncio.Event()
        # Only closing interrupts a blocked XREADGROUP: cancelling one costs a reconnect.
        self._closing = asyncio.Event()
        self._delayed: list[tuple[float, bytes]] = []
        self._keeper: asyncio.Task[None] | None = None

    # -- bookkeeping -----------------------------------------------------------------------

    def _room(self, now: float) -> int:
        held = self._held
        if len(held) >= self.prefetch:
            # A delivery past its ack timeout may already be another consumer's: it no
            # longer counts against this consumer's prefetch.
            for entry_id in [i for i, (d, deadline) in held.items() if deadline <= now]:
                del held[entry_id]
        return self.prefetch - len(held)

    def _release(self, entry_id: bytes) -> None:
        # Settled deliveries leave the held set here, one at a time, so a fetch never has
        # to scan every held delivery for the settled ones.
        self._held.pop(entry_id, None)
        self._wake.set()

    def _track(self, delivery: RedisDelivery, deadline: float) -> None:
        self._held[delivery.entry_id] = (delivery, deadline)

    def _untrack(self, entry_id: bytes) -> None:
        self._held.pop(entry_id, None)

    # -- fetch -----------------------------------------------------------------------------

    async def fetch(self, max_messages: int) -> Sequence[Delivery]:
        try:
            return await self._fetch(max_messages)
        except TransportUnavailableError:
            if self._closed or self.transport._closed:
                return []
            raise

    async def _fetch(self, max_messages: int) -> Sequence[Delivery]:
        clock = self._clock
        transport = self.transport
        while True:
            if self._closed or transport._closed:
                return []
            now = clock.monotonic()
            room = min(max_messages, self._room(now))
            if room <= 0:
                self._wake.clear()
                await self._wait(self._ack_timeout_ms / 1000)
                continue
            deliveries: list[Delivery] = []
            if now >= self._next_reclaim:
                deliveries.extend(await self._reclaim(room, now))
                room -= len(deliveries)
            if room > 0 and not deliveries:
                block = max(self._next_reclaim - clock.monotonic(), 0.0)
                block = min(block, transport._options.max_block)
                deliveries.extend(await self._read(room, block))
            if deliveries:
                return deliveries

    async def _wait(self, seconds: float) -> None:
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleeper, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    async def _read(self, count: int, block: float) -> list[Delivery]:
        client = self.transport._client
        block_ms = max(int(block * 1000), 1)

        async def read() -> Any:
            return await client.xreadgroup(
                self.group, self.consumer, {self.key: ">"}, count=count, block=block_ms
            )

        reader = asyncio.ensure_future(self._call(read))
        waker = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((reader, waker), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # Our caller was cancelled (a broker stopping): the read must not outlive it.
            reader.cancel()
            raise
        finally:
            waker.cancel()
        if not reader.done():
            # Closed while blocked. Entries Redis handed over in that instant stay in this
            # consumer's pending list and come back to the group after the ack timeout.
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            return []
        reply = reader.result()
        if not reply:
            return []
        deadline = self._clock.monotonic() + self.ack_timeout
        out: list[Delivery] = []
        for _, entries in reply:
            for entry_id, fields in entries:
                out.append(self._deliver(entry_id, fields, 1, deadline))
        return out

    def _deliver(
        self, entry_id: bytes, fields: dict[bytes, bytes] | None, attempt: int, deadline: float
    ) -> RedisDelivery:
        body = (fields or {}).get(_BODY, b"")
        delivery = RedisDelivery(self, entry_id, body, attempt)
        self._track(delivery, deadline)
        return delivery

    async def _reclaim(self, count: int, now: float) -> list[Delivery]:
        client = self.transport._client
        cursor = self._reclaim_cursor

        async def claim() -> Any:
            return await client.xautoclaim(
                self.key,
                self.group,
                self.consumer,
                min_idle_time=self._ack_timeout_ms,
                start_id=cursor,
                count=count,
            )

        reply = await self._call(claim)
        next_cursor, entries = reply[0], reply[1]
        deleted = reply[2] if len(reply) > 2 else []
        finished = next_cursor in (b"0-0", "0-0")
        self._reclaim_cursor = "0-0" if finished else next_cursor
        # Scan on at once while the cursor says there is more, else after the interval.
        self._next_reclaim = now + self._reclaim_interval if finished else now
        if deleted:
            # Trimmed away while pending (only a MAXLEN cap does that): nothing to deliver.
            log.warning(
                "redis stream %s: %d pending entries of group %s were trimmed before being "
                "acknowledged (lower maxlen?)",
                self.key,
                len(deleted),
                self.group,
            )
            key, group = self.key, self.group
            await self.transport._pipeliner.submit(lambda p: p.xack(key, group, *deleted))
        live = [(entry_id, fields) for entry_id, fields in entries if fields is not None]
        if not live:
            return []
        attempts = await self._attempts([entry_id for entry_id, _ in live])
        deadline = self._clock.monotonic() + self.ack_timeout
        return [
            self._deliver(entry_id, fields, attempts.get(entry_id, 2), deadline)
            for entry_id, fields in live
        ]

    async def _attempts(self, entry_ids: list[bytes]) -> dict[bytes, int]:
        """Delivery counts of entries this consumer just claimed (XAUTOCLAIM omits them)."""
        client = self.transport._client
        low, high = min(entry_ids, key=_stream_id), max(entry_ids, key=_stream_id)

        async def pending() -> Any:
            return await client.xpending_range(
                self.key,
                self.group,
                low,
                high,
                # The range may also hold this consumer's other in-flight entries.
                len(entry_ids) + len(self._held) + 16,
                consumername=self.consumer,
            )

        rows = await self._call(pending)
        return {row["message_id"]: int(row["times_delivered"]) for row in rows}

    async def _call(self, command: Callable[[], Awaitable[_T]]) -> _T:
        """Run a group command; recreate the group if Redis forgot it (flushed, restarted
        without persistence, or the stream was deleted)."""
        try:
            return await self.transport._retrying(command)
        except Exception as error:
            if not _is_nogroup(error):
                raise
            log.warning(
                "redis consumer group %s on %s vanished; recreating it", self.group, self.key
            )
            await self.transport._create_group(self.key, self.group)
            return await self.transport._retrying(command)

    # -- nack ------------------------------------------------------------------------------

    async def _give_back(self, entry_id: bytes, delay: float) -> None:
        self._untrack(entry_id)
        if delay > self.ack_timeout:
            heapq.heappush(self._delayed, (self._clock.monotonic() + delay, entry_id))
            if self._keeper is None or self._keeper.done():
                self._keeper = asyncio.create_task(self._keep_delayed())
            return
        await self._set_idle(entry_id, self.ack_timeout - delay)
        due = self._clock.monotonic() + delay
        for subscription in self.transport._subscriptions:
            if subscription.key == self.key and subscription.group == self.group:
                subscription._next_reclaim = min(subscription._next_reclaim, due)

    async def _set_idle(self, entry_id: bytes, idle: float) -> None:
        """Make ``entry_id`` claimable by XAUTOCLAIM ``ack_timeout - idle`` seconds from now.

        JUSTID keeps Redis' delivery counter as it is: giving back is not a delivery.
        """
        key, group, consumer = self.key, self.group, self.consumer
        idle_ms = max(int(idle * 1000), 0)
        await self.transport._pipeliner.submit(
            lambda p: p.xclaim(key, group, consumer, 0, [entry_id], idle=idle_ms, justid=True)
        )

    async def _keep_delayed(self) -> None:
        """Hold entries nacked with a delay longer than the ack timeout until they are due."""
        try:
            await self._keep_delayed_loop()
        except Exception as error:
            # The entries stay pending: the ack timeout brings them back, only earlier.
            log.warning("redis stream %s: holding delayed entries failed: %s", self.key, error)

    async def _keep_delayed_loop(self) -> None:
        clock = self._clock
        refresh = self.ack_timeout / 2
        while self._delayed and not self._closed:
            now = clock.monotonic()
            while self._delayed and self._delayed[0][0] - now <= self.ack_timeout:
                due, entry_id = heapq.heappop(self._delayed)
                await self._set_idle(entry_id, self.ack_timeout - max(due - now, 0.0))
                self._next_reclaim = min(self._next_reclaim, due)
            keep = [entry_id for _, entry_id in self._delayed]
            for entry_id in keep:
                await self._set_idle(entry_id, 0.0)
            if self._delayed:
                await clock.sleep(
                    min(refresh, max(self._delayed[0][0] - now - self.ack_timeout, 0.01))
                )
            self._wake.set()

    # -- close -----------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._closing.set()
        if self._keeper is not None:
            self._keeper.cancel()
        self.transport._subscriptions.discard(self)
        # A graceful leave gives back what this consumer still holds (and what it was keeping
        # for later), now rather than after the ack timeout.
        unsettled: list[Any] = [
            entry_id for entry_id, (d, _) in self._held.items() if not d._settled
        ]
        unsettled.extend(entry_id for _, entry_id in self._delayed)
        self._held.clear()
        self._delayed.clear()
        if unsettled and not self.transport._client_closed:
            key, group, consumer = self.key, self.group, self.consumer
            idle = self._ack_timeout_ms
            with contextlib.suppress(Exception):
                await self.transport._pipeliner.submit(
                    lambda p: p.xclaim(key, group, consumer, 0, unsettled, idle=idle, justid=True)
                )


def _stream_id(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class RedisStreamsTransport:
    """Consumer groups on Redis Streams (see the module docstring)."""

    def __init__(
        self, client: Redis, *, url: str, clock: Clock, options: RedisOptions | None = None
    ) -> None:
        self._client = client
        self._clock = clock
        self._options = options or RedisOptions()
        self.url = _redact(url)
        self.capabilities = TransportCapabilities(
            guarantees=frozenset(DeliveryGuarantee),
            durable=True,
            survives_consumer_crash=True,
            max_message_bytes=self._options.max_message_bytes,
        )
        self._closed = False
        self._client_closed = False
        self._pipeliner = _Pipeliner(self)
        self._subscriptions: set[_RedisSubscription] = set()
        self._published: dict[str, int] = {}
        self._trims: set[asyncio.Task[None]] = set()

    def _key(self, subject: str) -> str:
        return self._options.prefix + subject

    def stream_key(self, subject: str) -> str:
        """The Redis key of ``subject``'s stream (for operations and tests)."""
        return self._key(subject)

    async def _retrying(self, command: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``command``, retrying lost connections with exponential backoff on the clock.

        Redis may have executed a command whose reply was lost; a repeated XADD is a
        duplicate, which at-least-once delivery allows and the inbox absorbs.
        """
        clock = self._clock
        give_up = clock.monotonic() + self._options.retry_for
        delay = 0.05
        while True:
            if self._client_closed:
                raise TransportUnavailableError(f"transport {self.url} is closed")
            try:
                return await command()
            except Exception as error:
                if not _is_connection_error(error):
                    raise
                if clock.monotonic() + delay > give_up:
                    raise TransportUnavailableError(
                        f"Redis at {self.url} stopped answering ({error}) and did not come back "
                        f"within {self._options.retry_for:g}s; check that the server runs and is "
                        "reachable (unacknowledged messages stay pending in Redis and are "
                        "redelivered once it is back)"
                    ) from error
                log.warning("Redis at %s: %s; retrying in %.2fs", self.url, error, delay)
                await clock.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _create_group(self, key: str, group: str) -> None:
        from redis.exceptions import ResponseError

        async def create() -> Any:
            return await self._client.xgroup_create(key, group, id="0", mkstream=True)

        try:
            await self._retrying(create)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def publish(self, subject: str, message: Message | bytes) -> None:
        if self._closed:
            raise TransportUnavailableError(f"transport {self.url} is closed")
        if isinstance(message, Message):
            body = encode(message, max_bytes=self._options.max_message_bytes)
        else:
            body = bytes(message)
        key = self._key(subject)
        maxlen = self._options.maxlen or None
        await self._pipeliner.submit(
            lambda p: p.xadd(key, {_BODY: body}, maxlen=maxlen, approximate=True)
        )
        every = self._options.trim_every
        if every:
            count = self._published.get(key, 0) + 1
            self._published[key] = count
            if count % every == 0:
                task = asyncio.create_task(self._trim_acknowledged(key))
                self._trims.add(task)
                task.add_done_callback(self._trims.discard)

    async def _trim_acknowledged(self, key: str) -> None:
        """Drop the entries every group of ``key`` has acknowledged (XTRIM MINID ~)."""
        try:
            groups = await self._client.xinfo_groups(key)
            if not groups:
                return  # nobody has joined yet: keep everything for the first group
            low: tuple[int, int] | None = None
            for info in groups:
                if int(info["pending"]) > 0:
                    summary = await self._client.xpending(key, info["name"])
                    # Acked since XINFO: then nothing of this group is pending any more.
                    low_pending = summary.get("min")
                    keep = _stream_id(low_pending or info["last-delivered-id"])
                else:
                    keep = _stream_id(info["last-delivered-id"])
                low = keep if low is None else min(low, keep)
            if low is not None and low > (0, 0):
                await self._client.xtrim(key, minid=f"{low[0]}-{low[1]}", approximate=True)
        except Exception as error:  # trimming is housekeeping: the next round tries again
            log.warning("trimming redis stream %s failed: %s", key, error)

    async def subscribe(
        self,
        subject: str,
        *,
        group: str,
        consumer: str,
        ack_timeout: float = 30.0,
        prefetch: int = 100,
    ) -> Subscription:
        if self._closed:
            raise TransportUnavailableError(f"transport {self.url} is closed")
        if prefetch < 1:
            raise ConfigurationError(f"prefetch must be >= 1, got {prefetch}")
        if ack_timeout <= 0:
            raise ConfigurationError(f"ack_timeout must be > 0, got {ack_timeout}")
        await self._create_group(self._key(subject), group)
        subscription = _RedisSubscription(self, subject, group, consumer, ack_timeout, prefetch)
        self._subscriptions.add(subscription)
        return subscription

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for subscription in list(self._subscriptions):
            await subscription.close()
        for task in list(self._trims):
            task.cancel()
        await self._pipeliner.close()
        self._client_closed = True
        with contextlib.suppress(Exception):
            await self._client.aclose()


class RedisTransportFactory:
    schemes = ("redis", "rediss")

    async def open(self, url: str, *, runtime: Runtime) -> Transport:
        return await open_redis_transport(url, clock=runtime.clock)


async def open_redis_transport(url: str, *, clock: Clock) -> RedisStreamsTransport:
    """Connect to Redis at ``url`` and return the transport.

    Raises :class:`TransportUnavailableError` when the server does not answer.
    """
    try:
        from redis.asyncio import Redis
    except ImportError as error:  # pragma: no cover - depends on the installation
        raise ConfigurationError(
            f"MESSAGE_BROKER_URL={_redact(url)!r} needs redis-py: pip install "
            "'collaborative-blocks[redis]'"
        ) from error

    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    options = RedisOptions.from_query(url, query)
    client_url = urlunsplit(parts._replace(query=urlencode(query)))
    client = Redis.from_url(
        client_url,
        decode_responses=False,
        socket_connect_timeout=5.0,
        # Longer than the longest BLOCK, so a blocked read is never mistaken for a dead server.
        socket_timeout=options.max_block + 10.0,
    )
    try:
        await client.ping()
    except Exception as error:
        with contextlib.suppress(Exception):
            await client.aclose()
        raise TransportUnavailableError(
            f"Redis at {_redact(url)} is not reachable ({error}); start it (e.g. `redis-server`) "
            "or point MESSAGE_BROKER_URL at a running server"
        ) from error
    return RedisStreamsTransport(client, url=url, clock=clock, options=options)


@hookimpl
def cb_transport_factories() -> Sequence[TransportFactory]:
    return [RedisTransportFactory()]
