"""The in-memory event store (``memory://``): the reference implementation, for tests.

Same semantics as the SQL store, nothing survives the process. Every operation completes
without yielding to the event loop, so an append is atomic with respect to other tasks.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence

from collaborative_blocks.errors import (
    ConcurrencyError,
    DuplicateMessageError,
    StoreClosedError,
    TrackingConflictError,
)
from collaborative_blocks.stores.base import (
    AppendRequest,
    CommitSignal,
    CommitWaiter,
    EventStore,
    Snapshot,
    StoredEvent,
    StoreStats,
    StreamInfo,
    Tracking,
    validate_request,
)


def _version_of(event: StoredEvent) -> int:
    return event.version


class MemoryEventStore(EventStore):
    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._log: list[StoredEvent] = []
        self._streams: dict[str, list[StoredEvent]] = {}
        self._positions: dict[str, int] = {}
        self._inbox: dict[str, set[str]] = {}
        self._snapshots: dict[str, Snapshot] = {}
        self._signal = CommitSignal()
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"the store {self.url} is closed; open a new one")

    async def append_many(
        self, requests: Sequence[AppendRequest], *, tracking: Tracking | None = None
    ) -> list[list[int]]:
        self._check_open()
        # Validate everything before changing anything: all or nothing.
        planned: dict[str, int] = {}
        for request in requests:
            validate_request(request)
            current = planned.get(request.stream)
            if current is None:
                current = self._version(request.stream)
            if request.expected_version is not None and request.expected_version != current:
                raise ConcurrencyError(request.stream, request.expected_version, current)
            if request.first_version is not None:
                if self._has_events(request.stream, planned) and request.first_version <= current:
                    raise ConcurrencyError(
                        request.stream,
                        request.first_version - 1,
                        current,
                        first_version=request.first_version,
                    )
                current = request.first_version - 1
            if request.events:
                planned[request.stream] = current + len(request.events)
        if tracking is not None:
            self._check_tracking(tracking)
            if tracking.position is not None:
                self._positions[tracking.consumer] = tracking.position
            if tracking.message_id is not None:
                self._inbox.setdefault(tracking.consumer, set()).add(tracking.message_id)
        results: list[list[int]] = []
        for request in requests:
            positions: list[int] = []
            if not request.events:
                results.append(positions)
                continue
            stream_events = self._streams.setdefault(request.stream, [])
            next_version = (
                request.first_version
                if request.first_version is not None
                else (stream_events[-1].version + 1 if stream_events else 1)
            )
            for event in request.events:
                stored = StoredEvent(
                    stream=request.stream,
                    version=next_version,
                    position=len(self._log) + 1,
                    topic=event.topic,
                    state=bytes(event.state),
                )
                next_version += 1
                self._log.append(stored)
                stream_events.append(stored)
                positions.append(stored.position)
            results.append(positions)
        if any(results):
            self._signal.notify()
        return results

    def _version(self, stream: str) -> int:
        events = self._streams.get(stream)
        return events[-1].version if events else 0

    def _has_events(self, stream: str, planned: dict[str, int]) -> bool:
        return stream in planned or bool(self._streams.get(stream))

    def _check_tracking(self, tracking: Tracking) -> None:
        if tracking.position is not None:
            recorded = self._positions.get(tracking.consumer)
            if recorded is not None and tracking.position <= recorded:
                raise TrackingConflictError(tracking.consumer, tracking.position, recorded)
        if tracking.message_id is not None and tracking.message_id in self._inbox.get(
            tracking.consumer, ()
        ):
            raise DuplicateMessageError(tracking.consumer, tracking.message_id)

    async def read(
        self,
        stream: str,
        *,
        from_version: int = 0,
        to_version: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
    ) -> list[StoredEvent]:
        self._check_open()
        events = self._streams.get(stream)
        if not events:
            return []
        # Most reads want a whole stream (or its tail): skip the searches then.
        start = (
            0
            if from_version <= events[0].version
            else bisect_left(events, from_version, key=_version_of)
        )
        stop = (
            len(events)
            if to_version is None or to_version >= events[-1].version
            else bisect_left(events, to_version + 1, key=_version_of)
        )
        selected = events[start:stop]
        if backwards:
            selected = selected[::-1]
        return selected if limit is None else selected[:limit]

    async def read_all(
        self,
        *,
        from_position: int = 1,
        to_position: int | None = None,
        limit: int | None = None,
        topics: Sequence[str] = (),
    ) -> list[StoredEvent]:
        self._check_open()
        start = bisect_left(self._log, max(from_position, 1), key=lambda e: e.position)
        stop = len(self._log) if to_position is None else max(min(to_position, len(self._log)), 0)
        wanted = set(topics)
        out: list[StoredEvent] = []
        if limit is not None and limit <= 0:
            return out
        for event in self._log[start:stop]:
            if wanted and event.topic not in wanted:
                continue
            out.append(event)
            if limit is not None and len(out) >= limit:
                break
        return out

    async def max_position(self) -> int:
        self._check_open()
        return len(self._log)

    async def stream_version(self, stream: str) -> int:
        self._check_open()
        return self._version(stream)

    async def streams(self, *, prefix: str = "", limit: int = 100) -> list[StreamInfo]:
        self._check_open()
        names = sorted(name for name in self._streams if name.startswith(prefix))[:limit]
        return [
            StreamInfo(
                name,
                self._version(name),
                self._streams[name][0].position,
                self._streams[name][-1].position,
            )
            for name in names
        ]

    async def stats(self) -> StoreStats:
        self._check_open()
        return StoreStats(
            events=len(self._log),
            streams=len(self._streams),
            max_position=len(self._log),
            topics=dict(Counter(e.topic for e in self._log)),
            consumers={
                **{c: None for c in self._inbox},
                **{c: p for c, p in self._positions.items()},
            },
        )

    def _new_events_waiter(self) -> CommitWaiter:
        return self._signal.waiter()

    async def consumer_position(self, consumer: str) -> int | None:
        self._check_open()
        return self._positions.get(consumer)

    async def has_processed(self, consumer: str, message_id: str) -> bool:
        self._check_open()
        return message_id in self._inbox.get(consumer, ())

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        self._check_open()
        current = self._snapshots.get(snapshot.stream)
        if current is None or current.version <= snapshot.version:
            self._snapshots[snapshot.stream] = snapshot

    async def latest_snapshot(self, stream: str) -> Snapshot | None:
        self._check_open()
        return self._snapshots.get(stream)

    async def close(self) -> None:
        self._closed = True
        # Wake live subscribers so they see StoreClosedError instead of waiting forever.
        self._signal.notify()
