"""The event store interface: one append-only, globally ordered log.

Rows keep eventsourcing's stored-event shape: a stream (``originator_id``), a version in the
stream (``originator_version``), a topic, opaque state bytes, and a global position
(eventsourcing's notification id). Transcoding, compression, encryption and upcasting happen
above the store, in eventsourcing's ``Mapper``; the store only moves bytes.

Every implementation passes :class:`collaborative_blocks.testing.StoreConformance`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from collaborative_blocks.errors import EventSerializationError

__all__ = [
    "AppendRequest",
    "CommitSignal",
    "CommitWaiter",
    "EventStore",
    "NewEvent",
    "Snapshot",
    "StoreStats",
    "StoredEvent",
    "StreamInfo",
    "Tracking",
    "validate_append",
    "validate_request",
]

MAX_STREAM_ID_LENGTH = 255
MAX_TOPIC_LENGTH = 255


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append: its topic (usually ``module:Class``) and its encoded state."""

    topic: str
    state: bytes


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as it sits in the log.

    ``stream``/``version``/``position`` are also readable under eventsourcing's names
    ``originator_id``/``originator_version``/``id``.
    """

    stream: str
    version: int
    position: int
    topic: str
    state: bytes

    @property
    def originator_id(self) -> str:
        return self.stream

    @property
    def originator_version(self) -> int:
        return self.version

    @property
    def id(self) -> int:
        return self.position


@dataclass(frozen=True, slots=True)
class Tracking:
    """What a consumer records atomically with the events it appends.

    ``position``: the global position it has processed up to (strictly increasing per
    consumer; a resumable projection stores this). ``message_id``: a message it has handled
    (the durable inbox behind EXACTLY_ONCE; each id at most once per consumer). Either or both.
    """

    consumer: str
    position: int | None = None
    message_id: str | None = None

    def __post_init__(self) -> None:
        if not self.consumer:
            raise EventSerializationError("Tracking.consumer must be a non-empty string")
        if self.position is None and self.message_id is None:
            raise EventSerializationError(
                f"Tracking for {self.consumer!r} needs a position, a message_id, or both"
            )
        if self.position is not None and (not isinstance(self.position, int) or self.position < 0):
            raise EventSerializationError(
                f"Tracking.position must be an int >= 0, got {self.position!r}"
            )


@dataclass(frozen=True, slots=True)
class AppendRequest:
    """One stream's part of an atomic multi-stream append.

    Normally the events get versions ``current + 1, current + 2, ...``. ``first_version``
    numbers them explicitly instead (``first_version, first_version + 1, ...``; eventsourcing
    aggregates may start at 0) and requires the stream to be below it: appending at or under
    an existing version is a :class:`~collaborative_blocks.errors.ConcurrencyError`.
    """

    stream: str
    events: Sequence[NewEvent]
    expected_version: int | None = None
    first_version: int | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An aggregate's state at ``version``, so loading replays only what came after."""

    stream: str
    version: int
    topic: str
    state: bytes


@dataclass(frozen=True, slots=True)
class StreamInfo:
    stream: str
    version: int
    first_position: int
    last_position: int


@dataclass(frozen=True, slots=True)
class StoreStats:
    events: int
    streams: int
    max_position: int
    topics: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, int | None] = field(default_factory=dict)


def validate_request(request: AppendRequest) -> None:
    """:func:`validate_append` for an :class:`AppendRequest`, including ``first_version``."""
    validate_append(request.stream, request.events, request.expected_version)
    if request.first_version is not None:
        if not isinstance(request.first_version, int) or request.first_version < 0:
            raise EventSerializationError(
                f"first_version must be an int >= 0 or None, got {request.first_version!r}"
            )
        if request.expected_version is not None:
            raise EventSerializationError(
                f"stream {request.stream!r}: give expected_version or first_version, not both"
            )


def validate_append(stream: str, events: Sequence[NewEvent], expected_version: int | None) -> None:
    """Reject bad input before it reaches the database (shared by every store).

    Raises :class:`EventSerializationError` naming the offending field.
    """
    if not isinstance(stream, str) or not stream:
        raise EventSerializationError(f"stream id must be a non-empty string, got {stream!r}")
    if len(stream) > MAX_STREAM_ID_LENGTH:
        raise EventSerializationError(
            f"stream id {stream[:40]!r}... is {len(stream)} characters; "
            f"the limit is {MAX_STREAM_ID_LENGTH}"
        )
    if expected_version is not None and (
        not isinstance(expected_version, int) or expected_version < 0
    ):
        raise EventSerializationError(
            f"expected_version must be an int >= 0 or None, got {expected_version!r}"
        )
    for i, event in enumerate(events):
        if not isinstance(event, NewEvent):
            raise EventSerializationError(
                f"event #{i} for stream {stream!r} is {type(event).__name__}, not NewEvent"
            )
        if not isinstance(event.topic, str) or not event.topic:
            raise EventSerializationError(
                f"event #{i} for stream {stream!r} has no topic; give a non-empty string"
            )
        if len(event.topic) > MAX_TOPIC_LENGTH:
            raise EventSerializationError(
                f"event #{i} for stream {stream!r}: topic is longer than {MAX_TOPIC_LENGTH}"
            )
        if not isinstance(event.state, bytes | bytearray | memoryview):
            raise EventSerializationError(
                f"event #{i} ({event.topic}) for stream {stream!r}: state must be bytes, got "
                f"{type(event.state).__name__}; encode it first (e.g. with eventsourcing's Mapper)"
            )


class EventStore(abc.ABC):
    """The async event store.

    Positions start at 1 and increase in commit order; versions in a stream start at 1
    (unless an append numbers them with ``first_version``). A stream's version is the
    version of its last event, 0 when it has none.
    """

    #: Human-readable URL this store was opened with (password hidden).
    url: str = ""

    # -- writing ---------------------------------------------------------------------------

    async def append(
        self,
        stream: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None = None,
        tracking: Tracking | None = None,
    ) -> list[int]:
        """Append ``events`` to ``stream`` atomically and return their global positions.

        ``expected_version`` is the version the stream must be at (0 = must be new, None =
        don't check); a mismatch raises :class:`~collaborative_blocks.errors.ConcurrencyError`
        and writes nothing. ``tracking`` is recorded in the same transaction.
        """
        result = await self.append_many(
            [AppendRequest(stream, events, expected_version)], tracking=tracking
        )
        return result[0]

    @abc.abstractmethod
    async def append_many(
        self, requests: Sequence[AppendRequest], *, tracking: Tracking | None = None
    ) -> list[list[int]]:
        """Append to several streams in one transaction: all requests commit or none does.

        Returns the positions per request, in request order.
        """

    # -- reading ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def read(
        self,
        stream: str,
        *,
        from_version: int = 0,
        to_version: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
    ) -> list[StoredEvent]:
        """Events of one stream with ``from_version <= version <= to_version``.

        ``backwards=True`` returns the newest first (with ``limit``, the last N).
        """

    @abc.abstractmethod
    async def read_all(
        self,
        *,
        from_position: int = 1,
        to_position: int | None = None,
        limit: int | None = None,
        topics: Sequence[str] = (),
    ) -> list[StoredEvent]:
        """Events of the whole log, in global order, from ``from_position`` (inclusive)."""

    @abc.abstractmethod
    async def max_position(self) -> int:
        """The highest committed position, 0 for an empty log."""

    @abc.abstractmethod
    async def stream_version(self, stream: str) -> int:
        """The stream's current version, 0 if it has no events."""

    @abc.abstractmethod
    async def streams(self, *, prefix: str = "", limit: int = 100) -> list[StreamInfo]:
        """Streams (optionally those starting with ``prefix``), ordered by id."""

    @abc.abstractmethod
    async def stats(self) -> StoreStats:
        """Counts for operators: events, streams, events per topic, consumer positions."""

    def subscribe(
        self,
        *,
        from_position: int = 1,
        topics: Sequence[str] = (),
        batch_size: int = 500,
    ) -> AsyncIterator[StoredEvent]:
        """Catch up from ``from_position`` (inclusive), then follow live commits.

        Global order, no gaps among committed positions, no duplicates. Stop by breaking out
        of the ``async for`` (or calling ``aclose()`` on the iterator).
        """
        return self._subscribe(from_position, tuple(topics), batch_size)

    async def _subscribe(
        self, from_position: int, topics: tuple[str, ...], batch_size: int
    ) -> AsyncIterator[StoredEvent]:
        next_position = max(from_position, 1)
        while True:
            # Take the "something new" signal before reading, so a commit that lands
            # between the read and the wait is not missed.
            waiter = self._new_events_waiter()
            batch = await self.read_all(
                from_position=next_position, limit=batch_size, topics=topics
            )
            for event in batch:
                yield event
                next_position = event.position + 1
            if len(batch) < batch_size:
                await waiter.wait()

    def _new_events_waiter(self) -> CommitWaiter:
        """A one-shot signal that fires when events are committed after this call.

        Used by the default :meth:`subscribe`; a store that overrides ``subscribe`` (for
        example one that delegates to another store) need not implement it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement _new_events_waiter() or override subscribe()"
        )

    # -- tracking (consumers) --------------------------------------------------------------

    @abc.abstractmethod
    async def consumer_position(self, consumer: str) -> int | None:
        """The last position the consumer recorded, or None."""

    @abc.abstractmethod
    async def has_processed(self, consumer: str, message_id: str) -> bool:
        """Whether the consumer's inbox holds ``message_id``."""

    # -- snapshots -------------------------------------------------------------------------

    @abc.abstractmethod
    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Keep ``snapshot`` (replacing any older one for the stream)."""

    @abc.abstractmethod
    async def latest_snapshot(self, stream: str) -> Snapshot | None:
        """The newest snapshot of the stream, or None."""

    # -- lifecycle -------------------------------------------------------------------------

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads; pending appends finish first."""

    async def __aenter__(self) -> EventStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class CommitWaiter(abc.ABC):
    @abc.abstractmethod
    async def wait(self) -> None:
        """Return once new events may be available (or after a poll interval)."""


class CommitSignal:
    """Wakes subscribers of one event loop when a commit lands.

    ``waiter()`` hands out the current one-shot event; ``notify()`` fires it and starts a new
    one. ``notify_threadsafe()`` is for writer threads. ``poll_interval`` bounds each wait, for
    stores whose commits may come from other processes.
    """

    def __init__(self, poll_interval: float | None = None) -> None:
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.poll_interval = poll_interval

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def waiter(self) -> CommitWaiter:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return _EventWaiter(self._event, self.poll_interval)

    def notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    def notify_threadsafe(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self.notify)
            except RuntimeError:  # loop closed between the check and the call
                pass


class _EventWaiter(CommitWaiter):
    __slots__ = ("_event", "_timeout")

    def __init__(self, event: asyncio.Event, timeout: float | None) -> None:
        self._event = event
        self._timeout = timeout

    async def wait(self) -> None:
        if self._timeout is None:
            await self._event.wait()
            return
        # A bounded wait is a poll interval, not a sleep on wall time: it returns early on
        # every local commit and only bounds how late a remote commit is noticed.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), self._timeout)
