"""The in-process transport (``memory://``, the default ``MESSAGE_BROKER_URL``).

Messages never leave the process and are not serialised: the broker hands
:class:`~collaborative_blocks.core.messaging.Message` objects over as they are. Consumer
groups, acknowledgements, nack delays and ack timeouts behave like a networked broker's, on
the injected clock, so code tested here behaves the same over Redis or NATS (the transport
conformance suite checks that). Nothing survives the process: it offers every delivery
guarantee, but is neither durable nor crash-safe across processes.

Configuration: ``memory://?max_backlog=N`` bounds how many messages of one subject wait
for the slowest group before publishers wait (backpressure; default 10,000). A subject with
no consumer group keeps nothing: a new group starts with the next message, and a group whose
last consumer closed its subscription is gone (a consumer that dies without closing keeps its
group, so its unacknowledged messages go to the next consumer of that group).

A third-party transport plugin has the same shape as this module: a factory with
``schemes`` and ``async open(url, *, runtime)``, returned from ``cb_transport_factories``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from collaborative_blocks import hookimpl
from collaborative_blocks.core.clock import Clock
from collaborative_blocks.core.extensions import TransportFactory
from collaborative_blocks.core.messaging.envelope import Message
from collaborative_blocks.core.messaging.transport import (
    Delivery,
    Subscription,
    Transport,
    TransportCapabilities,
)
from collaborative_blocks.errors import ConfigurationError, TransportUnavailableError

if TYPE_CHECKING:
    from collaborative_blocks.core.runtime import Runtime

__all__ = ["MemoryTransport", "MemoryTransportFactory"]

DEFAULT_MAX_BACKLOG = 10_000


class _Entry:
    __slots__ = ("body", "seq")

    def __init__(self, seq: int, body: Message | bytes) -> None:
        self.seq = seq
        self.body = body


class MemoryDelivery:
    __slots__ = ("_consumer", "_deadline", "_entry", "_group", "_settled", "attempt", "subject")

    def __init__(
        self, group: _Group, consumer: _Consumer, entry: _Entry, attempt: int, deadline: float
    ) -> None:
        self._group = group
        self._consumer = consumer
        self._entry = entry
        self._deadline = deadline
        self._settled = False
        self.attempt = attempt
        self.subject = group.subject.name

    @property
    def body(self) -> Message | bytes:
        return self._entry.body

    async def ack(self) -> None:
        self._group.settle(self, redeliver_at=None)

    async def nack(self, delay: float = 0.0) -> None:
        self._group.settle(self, redeliver_at=self._group.clock.monotonic() + max(delay, 0.0))


class _Consumer:
    __slots__ = ("name", "prefetch", "unsettled")

    def __init__(self, name: str, prefetch: int) -> None:
        self.name = name
        self.prefetch = prefetch
        self.unsettled = 0


class _Subject:
    __slots__ = ("entries", "groups", "name", "next_seq", "space")

    def __init__(self, name: str) -> None:
        self.name = name
        self.entries: deque[_Entry] = deque()
        self.groups: dict[str, _Group] = {}
        self.next_seq = 0
        self.space = asyncio.Event()

    def trim(self) -> None:
        """Drop what every group has moved past (delivered, not necessarily acked)."""
        if not self.groups:
            self.entries.clear()
        else:
            low = min(g.cursor for g in self.groups.values())
            entries = self.entries
            while entries and entries[0].seq < low:
                entries.popleft()
        self.space.set()


class _Group:
    __slots__ = (
        "ack_timeout",
        "clock",
        "cursor",
        "delayed",
        "members",
        "name",
        "pending",
        "ready",
        "subject",
        "tiebreak",
        "unsettled",
        "wakeup",
    )

    def __init__(self, subject: _Subject, name: str, clock: Clock) -> None:
        self.subject = subject
        self.name = name
        self.clock = clock
        self.cursor = subject.next_seq
        self.ready: deque[tuple[_Entry, int]] = deque()
        self.delayed: list[tuple[float, int, _Entry, int]] = []
        # Deadlines only grow within a group (one ack timeout per group, a monotonic clock),
        # so a deque ordered by hand-out time is also ordered by deadline.
        self.pending: deque[MemoryDelivery] = deque()
        self.ack_timeout: float | None = None
        self.members = 0
        self.wakeup = asyncio.Event()
        self.tiebreak = itertools.count()
        # Deliveries handed out and not settled (pending also holds settled ones behind an
        # unsettled one at its front): in_flight() reads this instead of scanning pending.
        self.unsettled = 0

    def settle(self, delivery: MemoryDelivery, redeliver_at: float | None) -> None:
        if delivery._settled:
            return
        delivery._settled = True
        delivery._consumer.unsettled -= 1
        self.unsettled -= 1
        if redeliver_at is None:
            # Deliveries settle roughly in hand-out order: drop them from the front now so
            # the pending deque stays short.
            pending = self.pending
            while pending and pending[0]._settled:
                pending.popleft()
        elif redeliver_at <= self.clock.monotonic():
            self.ready.append((delivery._entry, delivery.attempt))
        else:
            heapq.heappush(
                self.delayed,
                (redeliver_at, next(self.tiebreak), delivery._entry, delivery.attempt),
            )
        self.wakeup.set()

    def collect_due(self, now: float) -> None:
        delayed = self.delayed
        while delayed and delayed[0][0] <= now:
            _, _, entry, attempt = heapq.heappop(delayed)
            self.ready.append((entry, attempt))
        pending = self.pending
        while pending and (pending[0]._settled or pending[0]._deadline <= now):
            delivery = pending.popleft()
            if not delivery._settled:
                # Its consumer died or hung: the message goes to whoever fetches next.
                delivery._settled = True
                delivery._consumer.unsettled -= 1
                self.unsettled -= 1
                self.ready.append((delivery._entry, delivery.attempt))

    def next_deadline(self) -> float | None:
        pending = self.pending
        while pending and pending[0]._settled:
            pending.popleft()
        candidates = []
        if self.delayed:
            candidates.append(self.delayed[0][0])
        if pending:
            candidates.append(pending[0]._deadline)
        return min(candidates) if candidates else None


class _MemorySubscription:
    def __init__(
        self, transport: MemoryTransport, group: _Group, consumer: _Consumer, ack_timeout: float
    ) -> None:
        self._transport = transport
        self._group = group
        self._consumer = consumer
        self._ack_timeout = ack_timeout
        self._closed = False
        self._outstanding: list[MemoryDelivery] = []

    async def fetch(self, max_messages: int) -> Sequence[Delivery]:
        group = self._group
        consumer = self._consumer
        subject = group.subject
        clock = group.clock
        while True:
            if self._closed or self._transport._closed:
                return []
            now = clock.monotonic()
            group.collect_due(now)
            room = min(max_messages, consumer.prefetch - consumer.unsettled)
            out: list[MemoryDelivery] = []
            if room > 0:
                deadline = now + self._ack_timeout
                while group.ready and len(out) < room:
                    entry, previous = group.ready.popleft()
                    out.append(self._hand_out(entry, previous + 1, deadline))
                if len(out) < room and subject.entries:
                    entries = subject.entries
                    first_seq = entries[0].seq
                    index = group.cursor - first_seq
                    stop = min(len(entries), index + room - len(out))
                    while index < stop:
                        out.append(self._hand_out(entries[index], 1, deadline))
                        index += 1
                    group.cursor = first_seq + index
                    subject.trim()
            if out:
                return out
            group.wakeup.clear()
            await self._wait(group)

    def _hand_out(self, entry: _Entry, attempt: int, deadline: float) -> MemoryDelivery:
        group = self._group
        delivery = MemoryDelivery(group, self._consumer, entry, attempt, deadline)
        self._consumer.unsettled += 1
        group.unsettled += 1
        group.pending.append(delivery)
        return delivery

    async def _wait(self, group: _Group) -> None:
        deadline = group.next_deadline()
        if deadline is None:
            await group.wakeup.wait()
            return
        clock = group.clock
        wakeup = group.wakeup
        delay = max(deadline - clock.monotonic(), 0.0)
        # The deadline sets the group's wakeup like a publish or a settle does (whoever waits
        # then looks again); waiting is one Event.wait, not a race of two tasks.
        call_later = getattr(clock, "call_later", None)
        if call_later is not None:
            # A clock that schedules callbacks itself (the chaos simulator's) needs no task.
            handle = call_later(delay, wakeup.set)
            try:
                await wakeup.wait()
            finally:
                handle.cancel()
            return
        sleeper = asyncio.ensure_future(clock.sleep(delay))
        sleeper.add_done_callback(partial(_wake_unless_cancelled, wakeup))
        try:
            await wakeup.wait()
        finally:
            sleeper.cancel()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        group = self._group
        # A graceful leave gives back what this consumer still holds, now rather than after
        # the ack timeout.
        for delivery in list(group.pending):
            if delivery._consumer is self._consumer and not delivery._settled:
                group.settle(delivery, redeliver_at=group.clock.monotonic())
        group.members -= 1
        if group.members == 0:
            # Nothing outlives the process here, so a group nobody consumes any more would
            # only hold messages back (and, once the backlog is full, block publishers).
            subject = group.subject
            if subject.groups.get(group.name) is group:
                del subject.groups[group.name]
                subject.trim()
        group.wakeup.set()


def _wake_unless_cancelled(wakeup: asyncio.Event, sleeper: asyncio.Future[None]) -> None:
    if not sleeper.cancelled():
        wakeup.set()


class MemoryTransport:
    """In-process consumer groups with acks, nack delays, ack timeouts and backpressure."""

    def __init__(
        self, *, clock: Clock, max_backlog: int = DEFAULT_MAX_BACKLOG, url: str = "memory://"
    ) -> None:
        if max_backlog < 1:
            raise ConfigurationError(f"max_backlog must be >= 1, got {max_backlog}")
        self._clock = clock
        self._subjects: dict[str, _Subject] = {}
        self._max_backlog = max_backlog
        self._closed = False
        self.url = url
        self.capabilities = TransportCapabilities()

    def _subject(self, name: str) -> _Subject:
        subject = self._subjects.get(name)
        if subject is None:
            subject = self._subjects[name] = _Subject(name)
        return subject

    async def publish(self, subject: str, message: Message | bytes) -> None:
        if self._closed:
            raise TransportUnavailableError(f"transport {self.url} is closed")
        target = self._subjects.get(subject) or self._subject(subject)
        if not target.groups:
            target.next_seq += 1
            return
        while len(target.entries) >= self._max_backlog:
            target.space.clear()
            await target.space.wait()
            if self._closed:
                raise TransportUnavailableError(f"transport {self.url} is closed")
        target.entries.append(_Entry(target.next_seq, message))
        target.next_seq += 1
        for group in target.groups.values():
            group.wakeup.set()

    def publish_nowait(self, subject: str, message: Message | bytes) -> bool:
        """:meth:`publish` without waiting: False (nothing published) when the subject's
        backlog is full, so the caller must fall back to ``await publish(...)``. For callers
        that deliver from a timer callback (the chaos simulator's network delays)."""
        if self._closed:
            raise TransportUnavailableError(f"transport {self.url} is closed")
        target = self._subjects.get(subject) or self._subject(subject)
        if not target.groups:
            target.next_seq += 1
            return True
        if len(target.entries) >= self._max_backlog:
            return False
        target.entries.append(_Entry(target.next_seq, message))
        target.next_seq += 1
        for group in target.groups.values():
            group.wakeup.set()
        return True

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
        target = self._subject(subject)
        state = target.groups.get(group)
        if state is None:
            state = target.groups[group] = _Group(target, group, self._clock)
        state.members += 1
        if state.ack_timeout is None:
            state.ack_timeout = ack_timeout
        # One ack timeout per group (the first subscriber's) keeps deadlines ordered.
        return _MemorySubscription(self, state, _Consumer(consumer, prefetch), state.ack_timeout)

    def in_flight(self) -> int:
        """Messages not yet settled by every group: waiting to be handed out, held by a
        consumer without an ack, or waiting for a nack's delay (for metrics and the chaos
        simulator's timeline)."""
        total = 0
        for subject in self._subjects.values():
            entries = subject.entries
            last = subject.next_seq
            for group in subject.groups.values():
                waiting = last - max(group.cursor, entries[0].seq if entries else last)
                total += waiting + len(group.ready) + len(group.delayed) + group.unsettled
        return total

    def backlog(self, subject: str) -> int:
        """Messages of ``subject`` not yet handed to every group (for metrics and tests)."""
        found = self._subjects.get(subject)
        return len(found.entries) if found else 0

    async def close(self) -> None:
        self._closed = True
        for subject in self._subjects.values():
            subject.space.set()
            for group in subject.groups.values():
                group.wakeup.set()


class MemoryTransportFactory:
    schemes = ("memory",)

    async def open(self, url: str, *, runtime: Runtime) -> Transport:
        query = parse_qs(urlsplit(url).query)
        max_backlog = DEFAULT_MAX_BACKLOG
        if "max_backlog" in query:
            try:
                max_backlog = int(query["max_backlog"][0])
            except ValueError:
                raise ConfigurationError(
                    f"max_backlog in {url!r} must be an integer >= 1"
                ) from None
        return MemoryTransport(clock=runtime.clock, max_backlog=max_backlog, url=url)


@hookimpl
def cb_transport_factories() -> Sequence[TransportFactory]:
    return [MemoryTransportFactory()]
