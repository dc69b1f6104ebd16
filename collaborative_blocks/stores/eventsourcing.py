"""An eventsourcing persistence module over our event store.

An unmodified eventsourcing ``Application`` persists in a Collaborative Blocks store when it
is configured with two environment variables::

    PERSISTENCE_MODULE=collaborative_blocks.stores.eventsourcing
    EVENT_STORE_URL=sqlite+aiosqlite:///bank.db      # or postgresql+asyncpg://..., memory://

eventsourcing finds :class:`EventStoreFactory` (the one infrastructure factory here) by
scanning this module. ``EVENT_STORE_URL`` is read from the application's environment
(``<APPNAME>_EVENT_STORE_URL`` first, as eventsourcing does), then from our settings. The
other eventsourcing variables (``CIPHER_KEY``, ``COMPRESSOR_TOPIC``, ``TRANSCODER_TOPIC``,
``IS_SNAPSHOTTING_ENABLED``, ``*_RECORDER_TOPIC``) work as usual, because transcoding,
compression, encryption and upcasting happen in eventsourcing's ``Mapper`` above the store.
``ORIGINATOR_ID_TYPE`` is ``uuid`` (default: stream ids that are canonical UUID strings come
back as ``UUID`` objects) or ``text`` (ids always come back as ``str``).

eventsourcing's recorders are synchronous and our store is async: each factory runs its store
on one private event-loop thread (:class:`StoreBridge`) and every recorder call is a coroutine
submitted to it, so recorders may be used from any number of threads and concurrent writes
still reach the store's group commit. What maps to what:

- a stored event ``(originator_id, originator_version, topic, state)`` is an event of stream
  ``str(originator_id)`` at that version; its notification id is the global position;
- ``insert_events`` is one atomic ``append_many``, one :class:`AppendRequest` per run of
  consecutive versions of one originator, numbered with ``first_version`` (so versions may start
  at 0); a version at or below the stream's current version raises a
  :class:`~collaborative_blocks.errors.ConcurrencyError`, which is eventsourcing's
  ``IntegrityError``;
- a ``Tracking(application_name, notification_id)`` is our ``Tracking(consumer=application_name,
  position=notification_id)``, recorded in the same transaction as the events;
- snapshots (``aggregate_recorder(purpose="snapshots")``) live in the store's snapshot table,
  outside the log: they are not notifications. The table keeps the newest snapshot per stream,
  so a historical ``get(version=N)`` older than it replays from the first event instead. With
  ``EVENT_STORE_SNAPSHOTS_URL`` set, snapshots go to the log of that second store instead,
  which keeps every snapshot (eventsourcing's own semantics).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Generic, Literal, TypeVar, cast
from uuid import UUID

from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    InfrastructureFactory,
    Notification,
    ProcessRecorder,
    Recorder,
    StoredEvent,
    Subscription,
    TrackingRecorder,
)
from eventsourcing.persistence import Tracking as ESTracking
from eventsourcing.utils import Environment, EnvType, resolve_topic

from collaborative_blocks.errors import (
    ConfigurationError,
    EventSerializationError,
    StoreClosedError,
)
from collaborative_blocks.stores import open_store
from collaborative_blocks.stores.base import (
    AppendRequest,
    EventStore,
    NewEvent,
    Snapshot,
    Tracking,
    validate_append,
)
from collaborative_blocks.stores.base import StoredEvent as CBStoredEvent

__all__ = [
    "EventStoreAggregateRecorder",
    "EventStoreApplicationRecorder",
    "EventStoreFactory",
    "EventStoreProcessRecorder",
    "EventStoreRecorder",
    "EventStoreSnapshotRecorder",
    "EventStoreSubscription",
    "EventStoreTrackingRecorder",
    "StoreBridge",
]

T = TypeVar("T")

OriginatorIdType = Literal["uuid", "text"]

#: How many notifications a subscription fetches from the bridge thread per round trip, and
#: how many it buffers ahead of the consumer.
SUBSCRIPTION_BATCH = 500


class StoreBridge:
    """One async :class:`EventStore`, run on a private event-loop thread, called synchronously.

    :meth:`call` submits a coroutine to that loop and blocks the calling thread until it
    finishes, so any number of threads can share the store; their writes arrive concurrently
    and the store group-commits them. :meth:`close` closes the store (pending appends finish
    first), cancels what is still running on the loop and ends the thread.
    """

    def __init__(self, url: str, *, name: str = "") -> None:
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._closed = False
        self._store: EventStore | None = None
        self._close_error: BaseException | None = None
        #: The store's URL with any password hidden (known once the store is open).
        self.url = ""
        self._thread = threading.Thread(
            target=self._run, name=f"cb-eventsourcing-bridge{'-' + name if name else ''}"
        )
        # A daemon thread, so an application that is never closed does not hang interpreter
        # exit; close() is still the way to release the store.
        self._thread.daemon = True
        self._thread.start()
        try:
            self._store = self.call(open_store(url))
        except BaseException:
            self.close()
            raise
        self.url = self._store.url

    @property
    def store(self) -> EventStore:
        """The bridged store. Its coroutines must run on this bridge (use :meth:`call`)."""
        if self._store is None:
            raise self._closed_error()
        return self._store

    @property
    def closed(self) -> bool:
        return self._closed

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the bridge's loop and return its result (or raise its error)."""
        handoff: _Handoff[T] = _Handoff()
        self._submit(coroutine, handoff)
        task = handoff.wait()
        if task.cancelled():
            raise StoreClosedError(
                f"the store {self.url} was closed while this call was running; construct a "
                "new application (or infrastructure factory)"
            )
        return task.result()

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Schedule ``callback`` on the loop; nothing happens once the bridge has stopped."""
        try:
            self._loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed: there is nothing left to act on
            pass

    def _submit(self, coroutine: Coroutine[Any, Any, T], handoff: _Handoff[T]) -> None:
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError(
                "a synchronous eventsourcing recorder was called from its own bridge thread; "
                "call it from any other thread (it blocks until the store answers)"
            )
        with self._lock:
            if self._closed:
                coroutine.close()
                raise self._closed_error()
            # Under the lock: every call submitted before close() is queued ahead of the
            # shutdown, so it starts, and is cancelled at worst, never left waiting.
            self._loop.call_soon_threadsafe(self._start, coroutine, handoff)

    def _start(self, coroutine: Coroutine[Any, Any, T], handoff: _Handoff[T]) -> None:
        self._loop.create_task(coroutine).add_done_callback(handoff.finish)

    def _closed_error(self) -> StoreClosedError:
        return StoreClosedError(
            f"the store {self.url} behind this eventsourcing recorder is "
            "closed; construct a new application (or infrastructure factory)"
        )

    def close(self) -> None:
        """Close the store and stop the thread (idempotent; safe from any thread)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        except RuntimeError:  # the loop already stopped
            return
        if threading.current_thread() is not self._thread:
            self._thread.join()
            if self._close_error is not None:
                raise self._close_error

    async def _shutdown(self) -> None:
        try:
            if self._store is not None:
                await self._store.close()
        except Exception as error:
            self._close_error = error
        finally:
            self._store = None
            asyncio.get_running_loop().stop()

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                # Whatever still runs (subscriptions, calls caught by close) is cancelled, so
                # its waiting caller gets StoreClosedError instead of blocking forever.
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()


# -- mapping between eventsourcing's shapes and ours ----------------------------------------


def stream_id(originator_id: UUID | str) -> str:
    """The stream of an eventsourcing originator id (a UUID is stored as ``str(uuid)``)."""
    if isinstance(originator_id, UUID):
        return str(originator_id)
    if isinstance(originator_id, str):
        return originator_id
    raise EventSerializationError(
        f"originator_id must be a UUID or a str, got {type(originator_id).__name__} "
        f"{originator_id!r}"
    )


def _looks_like_uuid(stream: str) -> bool:
    return len(stream) == 36 and stream[8] == stream[13] == stream[18] == stream[23] == "-"


def append_requests(stored_events: Sequence[StoredEvent]) -> list[AppendRequest]:
    """Group eventsourcing's stored events into our append requests, keeping their order.

    Each run of consecutive versions of one originator is one request numbered from its first
    version, so positions come out in the order the events were given.
    """
    requests: list[AppendRequest] = []
    stream = ""
    first_version = 0
    next_version = 0
    batch: list[NewEvent] = []
    for index, stored in enumerate(stored_events):
        current = stream_id(stored.originator_id)
        version = stored.originator_version
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise EventSerializationError(
                f"stored event #{index} of {current!r}: originator_version must be an int "
                f">= 0, got {version!r}"
            )
        event = NewEvent(topic=stored.topic, state=stored.state)
        if batch and current == stream and version == next_version:
            batch.append(event)
            next_version += 1
            continue
        if batch:
            requests.append(AppendRequest(stream, batch, first_version=first_version))
        stream, first_version, next_version, batch = current, version, version + 1, [event]
    if batch:
        requests.append(AppendRequest(stream, batch, first_version=first_version))
    return requests


def tracking_of(tracking: object) -> Tracking | None:
    """Our :class:`Tracking` for eventsourcing's ``Tracking`` (``None`` stays ``None``)."""
    if tracking is None:
        return None
    if not isinstance(tracking, ESTracking):
        raise EventSerializationError(
            f"tracking must be an eventsourcing.persistence.Tracking, got {type(tracking).__name__}"
        )
    return Tracking(consumer=tracking.application_name, position=tracking.notification_id)


# -- recorders --------------------------------------------------------------------------------


class EventStoreRecorder(Recorder):
    """What every recorder here shares: the bridge and the originator id conversion."""

    def __init__(self, bridge: StoreBridge, *, originator_id_type: OriginatorIdType = "uuid"):
        self.bridge = bridge
        self.originator_id_type: OriginatorIdType = originator_id_type

    def originator_id(self, stream: str) -> UUID | str:
        if self.originator_id_type == "uuid" and _looks_like_uuid(stream):
            try:
                value = UUID(stream)
            except ValueError:
                return stream
            # Only the canonical spelling round-trips; anything else was a str id.
            if str(value) == stream:
                return value
        return stream

    def stored_event(self, event: CBStoredEvent) -> StoredEvent:
        return StoredEvent(
            originator_id=self.originator_id(event.stream),
            originator_version=event.version,
            topic=event.topic,
            state=event.state,
        )

    def notification(self, event: CBStoredEvent) -> Notification:
        return Notification(
            id=event.position,
            originator_id=self.originator_id(event.stream),
            originator_version=event.version,
            topic=event.topic,
            state=event.state,
        )


class EventStoreAggregateRecorder(EventStoreRecorder, AggregateRecorder):
    """Stored events in the store's log; ``insert_events`` returns ``None`` (no ids)."""

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        self._insert_events(stored_events, tracking_of(kwargs.get("tracking")))
        return None

    def _insert_events(
        self, stored_events: Sequence[StoredEvent], tracking: Tracking | None
    ) -> list[int]:
        requests = append_requests(stored_events)
        if not requests and tracking is None:
            return []
        store = self.bridge.store
        results = self.bridge.call(store.append_many(requests, tracking=tracking))
        return [position for positions in results for position in positions]

    def select_events(
        self,
        originator_id: UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[StoredEvent]:
        if limit is not None and limit <= 0:
            return []
        store = self.bridge.store
        events = self.bridge.call(
            store.read(
                stream_id(originator_id),
                from_version=0 if gt is None else gt + 1,
                to_version=lte,
                limit=limit,
                backwards=desc,
            )
        )
        return [self.stored_event(event) for event in events]


class EventStoreApplicationRecorder(EventStoreAggregateRecorder, ApplicationRecorder):
    """The log as eventsourcing's application sequence: notification id = global position."""

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        return self._insert_events(stored_events, tracking_of(kwargs.get("tracking")))

    def select_notifications(
        self,
        start: int | None,
        limit: int,
        stop: int | None = None,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
    ) -> Sequence[Notification]:
        if limit <= 0:
            return []
        from_position = 1 if start is None else start + (0 if inclusive_of_start else 1)
        if stop is not None and stop < from_position:
            return []
        store = self.bridge.store
        events = self.bridge.call(
            store.read_all(
                from_position=max(from_position, 1),
                to_position=stop,
                limit=limit,
                topics=tuple(topics),
            )
        )
        return [self.notification(event) for event in events]

    def max_notification_id(self) -> int | None:
        position = self.bridge.call(self.bridge.store.max_position())
        return position or None

    def subscribe(
        self, gt: int | None = None, topics: Sequence[str] = ()
    ) -> Subscription[ApplicationRecorder]:
        return EventStoreSubscription(self, gt=gt, topics=topics)


class EventStoreTrackingRecorder(EventStoreRecorder, TrackingRecorder):
    """Tracking as our consumer positions: ``application_name`` is the consumer.

    A notification id at or below the recorded one raises
    :class:`~collaborative_blocks.errors.TrackingConflictError` (eventsourcing's
    ``IntegrityError``): positions only move forward, so a gap cannot be filled in later.
    """

    def insert_tracking(self, tracking: ESTracking) -> None:
        ours = tracking_of(tracking)
        store = self.bridge.store
        self.bridge.call(store.append_many([], tracking=ours))

    def max_tracking_id(self, application_name: str) -> int | None:
        return self.bridge.call(self.bridge.store.consumer_position(application_name))


class EventStoreProcessRecorder(
    EventStoreTrackingRecorder, EventStoreApplicationRecorder, ProcessRecorder
):
    """Events and the tracking of what caused them, in one transaction."""


class EventStoreSnapshotRecorder(EventStoreRecorder, AggregateRecorder):
    """Snapshots in the store's snapshot table, outside the log (never notifications).

    The table keeps one snapshot per stream, the newest: inserting one at or above the kept
    version replaces it, an older one is ignored. ``select_events`` therefore finds at most
    that one, when it lies within ``gt``/``lte``; eventsourcing then replays the events after
    it, or all of them when it is too new for the version asked for.
    """

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        newest: dict[str, StoredEvent] = {}
        for stored in stored_events:
            stream = stream_id(stored.originator_id)
            kept = newest.get(stream)
            if kept is None or kept.originator_version <= stored.originator_version:
                newest[stream] = stored
        snapshots = [
            Snapshot(stream=stream, version=s.originator_version, topic=s.topic, state=s.state)
            for stream, s in newest.items()
        ]
        if snapshots:
            self.bridge.call(_save_snapshots(self.bridge.store, snapshots))
        return None

    def select_events(
        self,
        originator_id: UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[StoredEvent]:
        if limit is not None and limit <= 0:
            return []
        stream = stream_id(originator_id)
        snapshot = self.bridge.call(self.bridge.store.latest_snapshot(stream))
        if snapshot is None:
            return []
        if (gt is not None and snapshot.version <= gt) or (
            lte is not None and snapshot.version > lte
        ):
            return []
        return [
            StoredEvent(
                originator_id=self.originator_id(snapshot.stream),
                originator_version=snapshot.version,
                topic=snapshot.topic,
                state=snapshot.state,
            )
        ]


class _Handoff(Generic[T]):
    """Hands a finished task from the bridge loop to the one thread waiting for it.

    A pre-acquired lock is the cheapest cross-thread signal: about 10 microseconds less per
    call than ``run_coroutine_threadsafe`` and its ``concurrent.futures.Future``.
    """

    __slots__ = ("_done", "_task")

    def __init__(self) -> None:
        self._done = threading.Lock()
        self._done.acquire()
        self._task: asyncio.Task[T] | None = None

    def finish(self, task: asyncio.Task[T]) -> None:
        self._task = task
        self._done.release()

    def wait(self) -> asyncio.Task[T]:
        self._done.acquire()
        assert self._task is not None  # set before the release
        return self._task


async def _save_snapshots(store: EventStore, snapshots: Sequence[Snapshot]) -> None:
    for snapshot in snapshots:
        # The same checks as for events (stream id, topic, bytes), before anything is saved.
        validate_append(snapshot.stream, [NewEvent(snapshot.topic, snapshot.state)], None)
    for snapshot in snapshots:
        await store.save_snapshot(snapshot)


# -- subscriptions ----------------------------------------------------------------------------


class _NotificationPipe:
    """Carries notifications from a task on the bridge loop to a consuming thread.

    Lives on the bridge loop: :meth:`fill` follows the store's subscription and keeps at most
    ``capacity`` notifications buffered; :meth:`take` hands a batch to the consumer.
    """

    def __init__(self, convert: Callable[[CBStoredEvent], Notification], capacity: int) -> None:
        self._convert = convert
        self._capacity = capacity
        self._items: deque[Notification] = deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._finished = False
        self.error: BaseException | None = None

    async def fill(self, store: EventStore, from_position: int, topics: Sequence[str]) -> None:
        events = store.subscribe(
            from_position=from_position, topics=topics, batch_size=self._capacity
        )
        try:
            async for event in events:
                while len(self._items) >= self._capacity:
                    self._writable.clear()
                    await self._writable.wait()
                self._items.append(self._convert(event))
                self._readable.set()
        except Exception as error:
            self.error = error
        finally:
            self.finish()
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    def finish(self) -> None:
        self._finished = True
        self._readable.set()

    async def take(self, limit: int) -> list[Notification]:
        while not self._items and not self._finished:
            self._readable.clear()
            await self._readable.wait()
        batch: list[Notification] = []
        while self._items and len(batch) < limit:
            batch.append(self._items.popleft())
        self._writable.set()
        return batch


async def _start_filling(
    pipe: _NotificationPipe, store: EventStore, from_position: int, topics: Sequence[str]
) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(pipe.fill(store, from_position, topics))


async def _wait_for(task: asyncio.Task[None]) -> None:
    await asyncio.wait([task])


class EventStoreSubscription(Subscription[EventStoreApplicationRecorder]):
    """eventsourcing's blocking subscription over the store's async ``subscribe``.

    Catches up from ``gt`` (exclusive), then follows new commits; topics filter. A task on the
    bridge loop follows the store and buffers up to :data:`SUBSCRIPTION_BATCH` notifications;
    ``__next__`` fetches them in batches. ``stop()`` may be called from any thread.
    """

    def __init__(
        self,
        recorder: EventStoreApplicationRecorder,
        gt: int | None = None,
        topics: Sequence[str] = (),
    ) -> None:
        super().__init__(recorder=recorder, gt=gt, topics=topics)
        self._bridge = recorder.bridge
        self._batch: list[Notification] = []
        self._index = 0
        self._pipe = _NotificationPipe(recorder.notification, SUBSCRIPTION_BATCH)
        from_position = (gt or 0) + 1
        self._task = self._bridge.call(
            _start_filling(self._pipe, self._bridge.store, from_position, tuple(topics))
        )

    def stop(self) -> None:
        super().stop()
        task, pipe = self._task, self._pipe
        self._bridge.call_soon(task.cancel)
        # Wakes a consumer blocked in take() even if the task is cancelled before it starts.
        self._bridge.call_soon(pipe.finish)

    def __exit__(self, *args: object, **kwargs: Any) -> None:
        try:
            super().__exit__(*args, **kwargs)
        finally:
            if not self._bridge.closed:
                try:
                    self._bridge.call(_wait_for(self._task))
                except StoreClosedError:
                    pass

    def __next__(self) -> Notification:
        if self._index == len(self._batch) and not self._has_been_stopped:
            self._batch = self._bridge.call(self._pipe.take(SUBSCRIPTION_BATCH))
            self._index = 0
            if not self._batch and not self._has_been_stopped:
                # The store's subscription ended on its own: an error, or the store closed.
                self.stop()
                if self._pipe.error is not None:
                    raise self._pipe.error
                raise StopIteration
        if self._has_been_stopped:
            raise StopIteration
        notification = self._batch[self._index]
        self._index += 1
        self._last_notification_id = notification.id
        return notification


# -- the factory ------------------------------------------------------------------------------


class EventStoreFactory(InfrastructureFactory[EventStoreTrackingRecorder]):
    """The infrastructure factory eventsourcing constructs for this persistence module.

    Opens the store named by ``EVENT_STORE_URL`` once, when the first recorder is made, on its
    own bridge thread; every recorder it makes shares it. :meth:`close` closes the store and
    ends the thread.
    """

    EVENT_STORE_URL = "EVENT_STORE_URL"
    EVENT_STORE_SNAPSHOTS_URL = "EVENT_STORE_SNAPSHOTS_URL"
    ORIGINATOR_ID_TYPE = "ORIGINATOR_ID_TYPE"

    aggregate_recorder_class: type[EventStoreAggregateRecorder] = EventStoreAggregateRecorder
    snapshot_recorder_class: type[EventStoreSnapshotRecorder] = EventStoreSnapshotRecorder
    application_recorder_class: type[EventStoreApplicationRecorder] = EventStoreApplicationRecorder
    tracking_recorder_class: type[EventStoreTrackingRecorder] = EventStoreTrackingRecorder
    process_recorder_class: type[EventStoreProcessRecorder] = EventStoreProcessRecorder

    def __init__(self, env: Environment | EnvType | None):
        super().__init__(env)
        url = self.env.get(self.EVENT_STORE_URL)
        if not url:
            # Only then: the settings read and validate the whole process environment.
            from collaborative_blocks.core.settings import load_settings

            url = load_settings().event_store_url
        id_type = (self.env.get(self.ORIGINATOR_ID_TYPE) or "uuid").strip().lower()
        if id_type not in ("uuid", "text"):
            raise ConfigurationError(
                f"{self.ORIGINATOR_ID_TYPE}={id_type!r} is not valid; accepted: 'uuid' "
                "(canonical UUID stream ids come back as UUID objects, the default) or 'text'"
            )
        self.originator_id_type = cast(OriginatorIdType, id_type)
        self.url = url
        self.snapshots_url = self.env.get(self.EVENT_STORE_SNAPSHOTS_URL) or None
        if self.snapshots_url == url and not url.startswith("memory:"):
            raise ConfigurationError(
                f"{self.EVENT_STORE_SNAPSHOTS_URL} names the same store as "
                f"{self.EVENT_STORE_URL}; snapshots in the application's log would become "
                "notifications. Give a different store, or unset it to use the snapshot table."
            )
        self._bridges: dict[str, StoreBridge] = {}
        self._bridge_lock = threading.Lock()
        self._closed = False

    @property
    def bridge(self) -> StoreBridge:
        """The store's bridge, opened by the first recorder.

        Lazily, because eventsourcing also constructs factories only to make a mapper (a
        ``Follower`` does so for each application it follows) and never closes them.
        """
        return self._open("events", self.url)

    def _open(self, role: str, url: str) -> StoreBridge:
        with self._bridge_lock:
            if self._closed:
                raise StoreClosedError(
                    "this eventsourcing infrastructure factory is closed; construct a new "
                    "application (or factory) to use the store again"
                )
            bridge = self._bridges.get(role)
            if bridge is None:
                name = self.env.name if role == "events" else f"{self.env.name}-{role}"
                bridge = self._bridges[role] = StoreBridge(url, name=name)
            return bridge

    def aggregate_recorder(self, purpose: str = "events") -> AggregateRecorder:
        if purpose == "snapshots":
            if self.snapshots_url is not None:
                # A store of its own: its log holds every snapshot, as eventsourcing's
                # snapshot tables do, and its notifications are nobody's concern.
                return self.aggregate_recorder_class(
                    self._open("snapshots", self.snapshots_url),
                    originator_id_type=self.originator_id_type,
                )
            return self.snapshot_recorder_class(
                self.bridge, originator_id_type=self.originator_id_type
            )
        if purpose == "events":
            return self.aggregate_recorder_class(
                self.bridge, originator_id_type=self.originator_id_type
            )
        raise ConfigurationError(
            f"aggregate_recorder(purpose={purpose!r}) is not supported by "
            f"{__name__}; accepted purposes: 'events' (the log) and 'snapshots' "
            "(the snapshot table)"
        )

    def application_recorder(self) -> ApplicationRecorder:
        recorder_class = self._recorder_class(
            self.APPLICATION_RECORDER_TOPIC, self.application_recorder_class
        )
        return recorder_class(self.bridge, originator_id_type=self.originator_id_type)

    def tracking_recorder(
        self, tracking_recorder_class: type[EventStoreTrackingRecorder] | None = None
    ) -> EventStoreTrackingRecorder:
        recorder_class = tracking_recorder_class or self._recorder_class(
            self.TRACKING_RECORDER_TOPIC, self.tracking_recorder_class
        )
        if not (
            isinstance(recorder_class, type) and issubclass(recorder_class, EventStoreRecorder)
        ):
            raise ConfigurationError(
                f"tracking recorder class {recorder_class!r} is not an EventStoreRecorder; "
                f"subclass {EventStoreTrackingRecorder.__qualname__} from {__name__}"
            )
        return recorder_class(self.bridge, originator_id_type=self.originator_id_type)

    def process_recorder(self) -> ProcessRecorder:
        recorder_class = self._recorder_class(
            self.PROCESS_RECORDER_TOPIC, self.process_recorder_class
        )
        return recorder_class(self.bridge, originator_id_type=self.originator_id_type)

    def _recorder_class(self, setting: str, default: type[T]) -> type[T]:
        topic = self.env.get(setting)
        if not topic:
            return default
        resolved = resolve_topic(topic)
        if not (isinstance(resolved, type) and issubclass(resolved, default)):
            raise ConfigurationError(
                f"{setting}={topic!r} resolves to {resolved!r}, which is not a subclass of "
                f"{default.__qualname__}; give the topic of such a subclass"
            )
        return resolved

    def close(self) -> None:
        with self._bridge_lock:
            self._closed = True
            bridges, self._bridges = list(self._bridges.values()), {}
        errors: list[BaseException] = []
        for bridge in bridges:
            try:
                bridge.close()
            except Exception as error:
                errors.append(error)
        if errors:
            raise errors[0]
