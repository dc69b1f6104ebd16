"""Event streams: append JSON events to a named stream, replay from any offset, follow live.

A stream's events live in the event store (one stream of the log each, topic
:data:`SYNC_EVENT_TOPIC`). An event's **offset** is its 0-based index in its stream (the
store's version minus one), so ``from_offset=0`` replays everything.

A subscription reads the log from the first position that can hold ``from_offset`` and then
follows new commits, so it sees every event in order, once. A **named** subscription
records how far it got with ``Tracking(consumer=name, position=...)`` in the same
transaction as the events its handler appended through its :class:`StreamContext`, so after
a crash or restart it resumes at the first unprocessed event and its own appends happen
exactly once per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from collaborative_blocks.core.clock import Clock, SystemClock
from collaborative_blocks.core.runtime import Runtime
from collaborative_blocks.errors import (
    StreamHandlerError,
    SyncError,
    SyncSerializationError,
    TrackingConflictError,
)
from collaborative_blocks.stores.base import (
    AppendRequest,
    EventStore,
    NewEvent,
    StoredEvent,
    Tracking,
)

__all__ = [
    "SYNC_EVENT_TOPIC",
    "EventStream",
    "StreamContext",
    "StreamEvent",
    "StreamHandler",
    "StreamSubscription",
    "encode_sync_event",
]

SYNC_EVENT_TOPIC = "collaborative_blocks.sync:StreamEvent"


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """An event as a subscriber receives it.

    ``data`` is the decoded JSON of what was appended (a dataclass arrives as a dict);
    ``event_type`` the appended object's class name (``"dict"`` for a mapping);
    ``recorded_at`` the stream's clock reading at append time.
    """

    stream_id: str
    offset: int
    position: int
    event_type: str
    data: Any
    recorded_at: float


class StreamContext:
    """What a two-argument handler gets besides the event.

    Appends made here are committed after the handler returns, in one transaction; for a
    named subscription that transaction also records the subscription's checkpoint, so a
    restarted subscription neither repeats nor loses them.
    """

    __slots__ = ("_clock", "_requests", "attempt", "event")

    def __init__(self, event: StreamEvent, attempt: int, clock: Clock) -> None:
        self.event = event
        self.attempt = attempt
        self._clock = clock
        self._requests: list[AppendRequest] = []

    def append_event(self, stream_id: str, sync_event: object) -> None:
        """Append ``sync_event`` to ``stream_id`` when the handler has finished."""
        self._requests.append(
            AppendRequest(stream_id, [encode_sync_event(sync_event, self._clock.now())])
        )

    def append(self, stream: str, events: Sequence[NewEvent]) -> None:
        """Append raw store events to ``stream`` when the handler has finished."""
        self._requests.append(AppendRequest(stream, list(events)))


StreamHandler: TypeAlias = (
    Callable[[StreamEvent], Awaitable[object]]
    | Callable[[StreamEvent, StreamContext], Awaitable[object]]
)


def _takes_context(handler: StreamHandler) -> bool:
    try:
        parameters = [
            p
            for p in inspect.signature(handler).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
    except (TypeError, ValueError):
        return False
    return len(parameters) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters)


def _plain(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def encode_sync_event(sync_event: object, recorded_at: float) -> NewEvent:
    """The store event for ``sync_event`` (a dataclass, a mapping or plain JSON data).

    Raises :class:`SyncSerializationError` when it is not JSON data (NaN included).
    """
    data = _plain(sync_event)
    event_type = "dict" if isinstance(sync_event, Mapping) else type(sync_event).__name__
    try:
        state = json.dumps(
            {"type": event_type, "at": recorded_at, "data": data},
            allow_nan=False,
            separators=(",", ":"),
        ).encode()
    except (TypeError, ValueError) as error:
        raise SyncSerializationError(
            f"cannot store a {type(sync_event).__name__} as a sync event: {error}. Give "
            "JSON data: dicts with str keys, lists, str, int, finite floats, bool, None, or a "
            "dataclass of those; nothing was written"
        ) from None
    return NewEvent(SYNC_EVENT_TOPIC, state)


def decode_stream_event(stored: StoredEvent) -> StreamEvent:
    body = json.loads(stored.state)
    return StreamEvent(
        stream_id=stored.stream,
        offset=stored.version - 1,
        position=stored.position,
        event_type=str(body.get("type", "dict")),
        data=body.get("data"),
        recorded_at=float(body.get("at", 0.0)),
    )


class StreamSubscription:
    """A running subscription: :meth:`cancel` stops it, :meth:`wait` waits for its end.

    ``wait()`` returns after a cancel and raises :class:`StreamHandlerError` when the handler
    kept failing. ``processed`` counts the events handled so far; ``last_offset`` is the
    offset of the last one (-1 before the first).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.processed = 0
        self.last_offset = -1
        self._task: asyncio.Task[None] | None = None
        self._progress = asyncio.Event()
        self._stop_requested = False

    def cancel(self) -> None:
        """Stop after the event being handled (if any); nothing is skipped or half-done."""
        self._stop_requested = True
        if self._task is not None:
            self._task.cancel()

    async def _until_stopped(self) -> None:
        # On Python 3.11 asyncio.wait_for (inside the store's commit waiter) swallows a
        # cancel that lands in the same loop turn as the commit signal, so one cancel() is
        # not always enough: repeat it, yielding in between, until the task has ended.
        assert self._task is not None
        while not self._task.done():
            self._task.cancel()
            await asyncio.sleep(0)

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    @property
    def error(self) -> BaseException | None:
        """The error that stopped the subscription, if it stopped on one."""
        if self._task is None or not self._task.done() or self._task.cancelled():
            return None
        return self._task.exception()

    async def wait(self) -> None:
        """Wait until the subscription ends; re-raise the error that ended it."""
        if self._task is None:
            return
        if self._stop_requested:
            await self._until_stopped()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._task)
        if not self._task.cancelled() and self._task.exception() is not None:
            raise self._task.exception()  # type: ignore[misc]

    async def close(self) -> None:
        """Cancel and wait; a failure that already ended it is not raised again."""
        self.cancel()
        if self._task is not None:
            await self._until_stopped()
            await asyncio.gather(self._task, return_exceptions=True)

    async def until_offset(self, offset: int) -> None:
        """Wait (on events, not time) until the event at ``offset`` has been handled.

        Raises the subscription's error if it stops first.
        """
        while self.last_offset < offset:
            if self.done:
                await self.wait()
                raise SyncError(
                    f"subscription {self.name!r} ended before offset {offset} (at "
                    f"{self.last_offset})"
                )
            self._progress.clear()
            waiter = asyncio.ensure_future(self._progress.wait())
            assert self._task is not None
            await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    def _advanced(self, offset: int) -> None:
        self.processed += 1
        self.last_offset = offset
        self._progress.set()


class EventStream:
    """Append-only named streams of JSON events with replayable, resumable subscriptions.

    ```python
    stream = EventStream(store=store)
    offset = await stream.append_event("orders", {"order": 7})
    subscription = await stream.subscribe_to_stream("orders", handler, 0)
    ```

    Without ``store``, the store comes from ``runtime`` (default: a new
    :class:`~collaborative_blocks.core.runtime.Runtime`, i.e. ``EVENT_STORE_URL``).
    ``max_retries`` (default ``MAX_RETRY_ATTEMPTS``) bounds how often a failing handler is
    retried on one event, waiting ``retry_delay * 2**n`` seconds of the injected clock
    between attempts.
    """

    def __init__(
        self,
        *,
        store: EventStore | None = None,
        runtime: Runtime | None = None,
        clock: Clock | None = None,
        max_retries: int | None = None,
        retry_delay: float = 0.1,
    ) -> None:
        self._runtime = runtime
        self._own_runtime: Runtime | None = None
        self._store = store
        if clock is None:
            if runtime is None and store is None:
                self._own_runtime = runtime = Runtime()
                self._runtime = runtime
            clock = runtime.clock if runtime is not None else None
        if clock is None:
            clock = SystemClock()
        self.clock: Clock = clock
        if max_retries is None:
            max_retries = (
                self._runtime.settings.max_retry_attempts if self._runtime is not None else 3
            )
        if max_retries < 0 or retry_delay < 0:
            raise SyncError(
                f"max_retries and retry_delay must be >= 0, got {max_retries}, {retry_delay}"
            )
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self._subscriptions: set[StreamSubscription] = set()

    async def store(self) -> EventStore:
        """The store the streams live in (opened on first use when it comes from settings)."""
        if self._store is None:
            if self._runtime is None:
                self._own_runtime = self._runtime = Runtime()
            self._store = await self._runtime.store()
        return self._store

    async def append_event(self, stream_id: str, sync_event: object) -> int:
        """Append ``sync_event`` to ``stream_id`` and return its offset (0-based).

        Raises :class:`SyncSerializationError` (nothing written) for data that is not JSON.
        """
        event = encode_sync_event(sync_event, self.clock.now())
        store = await self.store()
        position = (await store.append(stream_id, [event]))[0]
        # The version is what the offset is; one read by position keeps append to one write.
        stored = await store.read_all(from_position=position, to_position=position)
        return stored[0].version - 1

    async def read_stream(self, stream_id: str, from_offset: int = 0) -> list[StreamEvent]:
        """The stream's events from ``from_offset`` on, without subscribing."""
        store = await self.store()
        return [
            decode_stream_event(e)
            for e in await store.read(stream_id, from_version=max(from_offset, 0) + 1)
            if e.topic == SYNC_EVENT_TOPIC
        ]

    async def subscribe_to_stream(
        self,
        stream_id: str,
        handler: StreamHandler,
        from_offset: int = 0,
        *,
        name: str | None = None,
    ) -> StreamSubscription:
        """Deliver the stream's events from ``from_offset``, then live ones, to ``handler``.

        ``handler(event)`` or ``handler(event, ctx)`` (a :class:`StreamContext`). With
        ``name`` the subscription is durable: it resumes after its recorded checkpoint
        (``from_offset`` only applies to its very first run). Returns at once with a
        :class:`StreamSubscription`; the events are handled in a background task.
        """
        if not isinstance(from_offset, int) or from_offset < 0:
            raise SyncError(f"from_offset must be an int >= 0, got {from_offset!r}")
        if name is not None and not name:
            raise SyncError("a subscription name must be a non-empty string, or None")
        store = await self.store()
        # Read max_position before looking for the first event: an event at from_offset that
        # is not there yet will get a position above it, so starting there misses nothing.
        start = await store.max_position() + 1
        first = await store.read(stream_id, from_version=from_offset + 1, limit=1)
        if first:
            start = first[0].position
        if name is not None:
            checkpoint = await store.consumer_position(name)
            if checkpoint is not None:
                start = checkpoint + 1
        subscription = StreamSubscription(name or f"{stream_id}@{from_offset}")
        subscription._task = asyncio.ensure_future(
            self._run(store, stream_id, handler, from_offset, name, start, subscription)
        )
        self._subscriptions.add(subscription)
        subscription._task.add_done_callback(lambda _: self._subscriptions.discard(subscription))
        return subscription

    async def _run(
        self,
        store: EventStore,
        stream_id: str,
        handler: StreamHandler,
        from_offset: int,
        name: str | None,
        start: int,
        subscription: StreamSubscription,
    ) -> None:
        with_context = _takes_context(handler)
        events = store.subscribe(from_position=start, topics=[SYNC_EVENT_TOPIC])
        try:
            async for stored in events:
                if stored.stream != stream_id or stored.version - 1 < from_offset:
                    continue
                event = decode_stream_event(stored)
                await self._deliver(store, handler, with_context, event, name, subscription)
                subscription._advanced(event.offset)
                if subscription._stop_requested:
                    return
        finally:
            # Release the store's subscription at once rather than when it is collected.
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _deliver(
        self,
        store: EventStore,
        handler: StreamHandler,
        with_context: bool,
        event: StreamEvent,
        name: str | None,
        subscription: StreamSubscription,
    ) -> None:
        attempts = 0
        while True:
            attempts += 1
            ctx = StreamContext(event, attempts, self.clock)
            try:
                if with_context:
                    await handler(event, ctx)  # type: ignore[call-arg]
                else:
                    await handler(event)  # type: ignore[call-arg]
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if attempts > self.max_retries:
                    raise StreamHandlerError(
                        subscription.name, event.stream_id, event.offset, event.position, attempts
                    ) from error
                await self.clock.sleep(self.retry_delay * 2 ** (attempts - 1))
                continue
            break
        tracking = Tracking(name, position=event.position) if name is not None else None
        if ctx._requests or tracking is not None:
            try:
                await store.append_many(ctx._requests, tracking=tracking)
            except TrackingConflictError:
                # Another instance of this named subscription got here first: its commit
                # holds the effect, so ours is dropped rather than applied twice.
                pass

    async def close(self) -> None:
        """Stop every subscription of this stream object (and the store it opened)."""
        for subscription in list(self._subscriptions):
            await subscription.close()
        if self._own_runtime is not None:
            await self._own_runtime.close()
