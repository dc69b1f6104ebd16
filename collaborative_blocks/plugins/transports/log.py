"""The log-backed transport: durable messaging on the event store, with no server.

``MESSAGE_BROKER_URL=log+sqlite+aiosqlite:///events.db`` (or ``log+postgresql+asyncpg://...``,
or ``log://`` for the runtime's own ``EVENT_STORE_URL`` store). Messages are events in the
log: one stream per subject (``cb-messages:SUBJECT``), each message one event whose state is
the versioned wire format. A consumer group is a stream too (``cb-group:SUBJECT:GROUP``)
holding its claims and settlements:

- a consumer *claims* the next messages (and any whose ack deadline passed, or whose nack
  delay ran out) by appending a ``Claimed`` event with optimistic concurrency on the group
  stream, so two consumers, in any processes, never hold the same message at once;
- ``ack``/``nack`` append a ``Settled`` event; a claim that is never settled (its consumer
  died) is claimed again by another consumer once its deadline, ``ack_timeout`` seconds of
  the clock's wall time, has passed.

So everything a group knows survives a crash of any process, and a group's state can be
read back from the log like any aggregate. New consumers of other processes are noticed by
polling every ``poll_interval`` seconds (``?poll_interval=0.2`` in the URL; commits in the
same process wake consumers at once). A new group starts at the first message of the
subject: the log keeps everything.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from collaborative_blocks import hookimpl
from collaborative_blocks.core.clock import Clock
from collaborative_blocks.core.extensions import TransportFactory
from collaborative_blocks.core.messaging.envelope import Message, encode
from collaborative_blocks.core.messaging.transport import (
    Delivery,
    Subscription,
    Transport,
    TransportCapabilities,
)
from collaborative_blocks.core.plugins import resolve_store_factory
from collaborative_blocks.errors import (
    ConcurrencyError,
    ConfigurationError,
    CorruptRecordError,
    StoreError,
    TransportUnavailableError,
)
from collaborative_blocks.stores import EventStore, NewEvent

if TYPE_CHECKING:
    from collaborative_blocks.core.runtime import Runtime

__all__ = ["LogTransport", "LogTransportFactory"]

MESSAGE_TOPIC = "collaborative_blocks.messaging:Message"
CLAIMED_TOPIC = "collaborative_blocks.messaging:Claimed"
SETTLED_TOPIC = "collaborative_blocks.messaging:Settled"


def message_stream(subject: str) -> str:
    return f"cb-messages:{subject}"


def group_stream(subject: str, group: str) -> str:
    return f"cb-group:{subject}:{group}"


class LogDelivery:
    __slots__ = ("_body", "_settled", "_subscription", "attempt", "subject", "version")

    def __init__(
        self,
        subscription: _LogSubscription,
        version: int,
        body: bytes,
        attempt: int,
        subject: str,
    ) -> None:
        self._subscription = subscription
        self.version = version
        self._body = body
        self.attempt = attempt
        self.subject = subject
        self._settled = False

    @property
    def body(self) -> Message | bytes:
        return self._body

    async def ack(self) -> None:
        if not self._settled:
            self._settled = True
            await self._subscription._settle(ack=[self.version], nack=[])

    async def nack(self, delay: float = 0.0) -> None:
        if not self._settled:
            self._settled = True
            due = self._subscription._clock.now() + max(delay, 0.0)
            await self._subscription._settle(ack=[], nack=[(self.version, due)])


class _GroupView:
    """The fold of a group stream: where the group is and who holds what."""

    def __init__(self) -> None:
        self.version = 0
        self.cursor = 1
        # message version -> (consumer, deadline, attempt)
        self.claimed: dict[int, tuple[str, float, int]] = {}
        # message version -> (due time, attempts so far), nacked or given back
        self.returned: dict[int, tuple[float, int]] = {}

    def apply(self, topic: str, data: dict[str, Any]) -> None:
        if topic == CLAIMED_TOPIC:
            consumer, deadline = data["c"], float(data["d"])
            for version, attempt in zip(data["v"], data["a"], strict=True):
                self.claimed[version] = (consumer, deadline, attempt)
                self.returned.pop(version, None)
                if version >= self.cursor:
                    self.cursor = version + 1
        elif topic == SETTLED_TOPIC:
            for version in data.get("ack", ()):
                self.claimed.pop(version, None)
                self.returned.pop(version, None)
            for version, due in data.get("nack", ()):
                held = self.claimed.pop(version, None)
                if held is not None:
                    self.returned[version] = (float(due), held[2])
        else:
            raise CorruptRecordError(f"unexpected event {topic!r} in a consumer group stream")


class _LogSubscription:
    def __init__(
        self,
        transport: LogTransport,
        subject: str,
        group: str,
        consumer: str,
        ack_timeout: float,
        prefetch: int,
    ) -> None:
        self._transport = transport
        self._store = transport.store
        self._clock = transport.clock
        self._subject = subject
        self._messages = message_stream(subject)
        self._group_stream = group_stream(subject, group)
        self._consumer = consumer
        self._ack_timeout = ack_timeout
        self._prefetch = prefetch
        self._view = _GroupView()
        self._held: dict[int, LogDelivery] = {}
        self._closed = False

    async def _refresh(self) -> None:
        events = await self._store.read(self._group_stream, from_version=self._view.version + 1)
        for event in events:
            self._view.apply(event.topic, _load(event.state))
            self._view.version = event.version

    async def fetch(self, max_messages: int) -> Sequence[Delivery]:
        while True:
            if self._stopped():
                return []
            waiter = self._store._new_events_waiter()
            try:
                deliveries = await self._try_claim(max_messages)
            except StoreError as error:
                if self._stopped():
                    return []
                raise TransportUnavailableError(
                    f"the event store behind {self._transport.url} failed: {error}"
                ) from error
            if deliveries:
                return deliveries
            await self._wait(waiter)

    def _stopped(self) -> bool:
        return self._closed or self._transport.closed

    async def _try_claim(self, max_messages: int) -> list[Delivery]:
        for _ in range(16):
            await self._refresh()
            view = self._view
            now = self._clock.now()
            for version, delivery in list(self._held.items()):
                held = view.claimed.get(version)
                if held is not None and held[0] == self._consumer and held[1] <= now:
                    # Our own claim ran out: that delivery is void, a new one follows.
                    delivery._settled = True
                    del self._held[version]
            room = min(max_messages, self._prefetch - len(self._held))
            if room <= 0:
                return []
            picks: list[tuple[int, int]] = []
            for version, (_, deadline, attempt) in sorted(view.claimed.items()):
                if len(picks) >= room:
                    break
                if deadline <= now:
                    picks.append((version, attempt + 1))
            for version, (due, attempt) in sorted(view.returned.items()):
                if len(picks) >= room:
                    break
                if due <= now:
                    picks.append((version, attempt + 1))
            if len(picks) < room:
                last = await self._store.stream_version(self._messages)
                stop = min(last, view.cursor + room - len(picks) - 1)
                picks.extend((version, 1) for version in range(view.cursor, stop + 1))
            if not picks:
                return []
            claim = {
                "c": self._consumer,
                "d": now + self._ack_timeout,
                "v": [v for v, _ in picks],
                "a": [a for _, a in picks],
            }
            try:
                await self._store.append(
                    self._group_stream,
                    [NewEvent(CLAIMED_TOPIC, _dump(claim))],
                    expected_version=view.version,
                )
            except ConcurrencyError:
                continue  # another consumer claimed first: look again
            low = min(v for v, _ in picks)
            high = max(v for v, _ in picks)
            events = {
                e.version: e
                for e in await self._store.read(self._messages, from_version=low, to_version=high)
            }
            out: list[Delivery] = []
            for version, attempt in picks:
                event = events.get(version)
                if event is None:
                    continue
                delivery = LogDelivery(self, version, event.state, attempt, self._subject)
                self._held[version] = delivery
                out.append(delivery)
            return out
        return []

    async def _wait(self, waiter: Any) -> None:
        view = self._view
        now = self._clock.now()
        deadlines = [d for _, d, _ in view.claimed.values()] + [
            due for due, _ in view.returned.values()
        ]
        pause = self._transport.poll_interval
        if deadlines:
            pause = min(pause, max(min(deadlines) - now, 0.0))
        if pause <= 0:
            pause = self._transport.poll_interval
        signal = asyncio.ensure_future(waiter.wait())
        sleeper = asyncio.ensure_future(self._clock.sleep(pause))
        closing = asyncio.ensure_future(self._transport.closing.wait())
        try:
            await asyncio.wait((signal, sleeper, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (signal, sleeper, closing):
                task.cancel()

    async def _settle(self, *, ack: list[int], nack: list[tuple[int, float]]) -> None:
        for version in ack:
            self._held.pop(version, None)
        for version, _ in nack:
            self._held.pop(version, None)
        await self._store.append(
            self._group_stream, [NewEvent(SETTLED_TOPIC, _dump({"ack": ack, "nack": nack}))]
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        held = [v for v, d in self._held.items() if not d._settled]
        for version in held:
            self._held[version]._settled = True
        self._held.clear()
        if held and not self._transport.closed:
            now = self._clock.now()
            await self._settle(ack=[], nack=[(v, now) for v in held])


class LogTransport:
    """Consumer groups over streams of the event store (see the module docstring)."""

    def __init__(
        self,
        store: EventStore,
        *,
        clock: Clock,
        url: str = "log://",
        owns_store: bool = False,
        poll_interval: float = 0.5,
    ) -> None:
        if poll_interval <= 0 or math.isnan(poll_interval):
            raise ConfigurationError(f"poll_interval must be > 0 seconds, got {poll_interval}")
        self.store = store
        self.clock = clock
        self.url = url
        self.poll_interval = poll_interval
        self.closed = False
        self.closing = asyncio.Event()
        self._owns_store = owns_store
        durable = not store.url.startswith("memory")
        self.capabilities = TransportCapabilities(durable=durable, survives_consumer_crash=durable)

    async def publish(self, subject: str, message: Message | bytes) -> None:
        if self.closed:
            raise TransportUnavailableError(f"transport {self.url} is closed")
        data = message if isinstance(message, bytes) else encode(message)
        await self.store.append(message_stream(subject), [NewEvent(MESSAGE_TOPIC, data)])

    async def subscribe(
        self,
        subject: str,
        *,
        group: str,
        consumer: str,
        ack_timeout: float = 30.0,
        prefetch: int = 100,
    ) -> Subscription:
        if self.closed:
            raise TransportUnavailableError(f"transport {self.url} is closed")
        if prefetch < 1:
            raise ConfigurationError(f"prefetch must be >= 1, got {prefetch}")
        return _LogSubscription(self, subject, group, consumer, ack_timeout, prefetch)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.closing.set()
        if self._owns_store:
            await self.store.close()


class LogTransportFactory:
    schemes = ("log",)

    async def open(self, url: str, *, runtime: Runtime) -> Transport:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        poll_interval = 0.5
        if "poll_interval" in query:
            try:
                poll_interval = float(query["poll_interval"][0])
            except ValueError:
                raise ConfigurationError(
                    f"poll_interval in {url!r} must be a number of seconds > 0"
                ) from None
        scheme = parts.scheme.lower()
        if scheme == "log":
            store = await runtime.store()
            return LogTransport(store, clock=runtime.clock, url=url, poll_interval=poll_interval)
        if not scheme.startswith("log+"):
            raise ConfigurationError(
                f"{url!r}: write log:// (the runtime's store) or log+STORE_URL, e.g. "
                "log+sqlite+aiosqlite:///events.db"
            )
        inner = url[len("log+") :]
        if "?" in inner:
            base, _, raw_query = inner.partition("?")
            kept = [p for p in raw_query.split("&") if not p.startswith("poll_interval=")]
            inner = base + ("?" + "&".join(kept) if kept else "")
        factory = resolve_store_factory(runtime.plugins, inner, "MESSAGE_BROKER_URL")
        store = await factory.open(inner, clock=runtime.clock)
        return LogTransport(
            store, clock=runtime.clock, url=url, owns_store=True, poll_interval=poll_interval
        )


@hookimpl
def cb_transport_factories() -> Sequence[TransportFactory]:
    return [LogTransportFactory()]


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _load(state: bytes) -> dict[str, Any]:
    try:
        data = json.loads(state)
    except ValueError as error:
        raise CorruptRecordError(f"a consumer group record is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise CorruptRecordError("a consumer group record is not a JSON object")
    return data
