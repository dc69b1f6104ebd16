"""A store that forwards every call to another store: the base of store wrappers.

Subclass :class:`DelegatingStore` and override the one method whose behaviour you change (a
read-only view, fault injection, a planted bug, metrics around writes); everything else,
subscriptions included, is the inner store's.

```python
from collaborative_blocks.stores import DelegatingStore, open_store


class CountingStore(DelegatingStore):
    appends = 0

    async def append_many(self, requests, *, tracking=None):
        self.appends += 1
        return await super().append_many(requests, tracking=tracking)


store = CountingStore(await open_store("memory://"))
await store.append("s", [NewEvent("Happened", b"{}")], expected_version=0)
assert store.appends == 1 and await store.stream_version("s") == 1
await store.close()
```
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from collaborative_blocks.stores.base import (
    AppendRequest,
    CommitWaiter,
    EventStore,
    Snapshot,
    StoredEvent,
    StoreStats,
    StreamInfo,
    Tracking,
)

__all__ = ["DelegatingStore"]


class DelegatingStore(EventStore):
    """An :class:`EventStore` that forwards every call to ``inner``.

    Every read method (``read``, ``read_all``, ``max_position``, ``stream_version``,
    ``streams``, ``stats``, ``consumer_position``, ``has_processed``, ``latest_snapshot``)
    first calls :meth:`before_read` with its name: override that one method to act before
    any read (fail it, count it) instead of overriding each.

    ``subscribe`` is the inner store's own (catch-up, then its live notifications), so it
    does not pass through an overridden ``read_all``: override ``subscribe`` too if a
    subscription must see what your ``read_all`` changes.
    """

    def __init__(self, inner: EventStore) -> None:
        self.inner = inner
        self.url = inner.url

    def before_read(self, method: str) -> None:
        """Called before every read method is forwarded (``method``: its name); may raise.
        Does nothing here."""

    async def append_many(
        self, requests: Sequence[AppendRequest], *, tracking: Tracking | None = None
    ) -> list[list[int]]:
        return await self.inner.append_many(requests, tracking=tracking)

    async def read(
        self,
        stream: str,
        *,
        from_version: int = 0,
        to_version: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
    ) -> list[StoredEvent]:
        self.before_read("read")
        return await self.inner.read(
            stream,
            from_version=from_version,
            to_version=to_version,
            limit=limit,
            backwards=backwards,
        )

    async def read_all(
        self,
        *,
        from_position: int = 1,
        to_position: int | None = None,
        limit: int | None = None,
        topics: Sequence[str] = (),
    ) -> list[StoredEvent]:
        self.before_read("read_all")
        return await self.inner.read_all(
            from_position=from_position, to_position=to_position, limit=limit, topics=topics
        )

    async def max_position(self) -> int:
        self.before_read("max_position")
        return await self.inner.max_position()

    async def stream_version(self, stream: str) -> int:
        self.before_read("stream_version")
        return await self.inner.stream_version(stream)

    async def streams(self, *, prefix: str = "", limit: int = 100) -> list[StreamInfo]:
        self.before_read("streams")
        return await self.inner.streams(prefix=prefix, limit=limit)

    async def stats(self) -> StoreStats:
        self.before_read("stats")
        return await self.inner.stats()

    def subscribe(
        self, *, from_position: int = 1, topics: Sequence[str] = (), batch_size: int = 500
    ) -> AsyncIterator[StoredEvent]:
        return self.inner.subscribe(
            from_position=from_position, topics=topics, batch_size=batch_size
        )

    def _new_events_waiter(self) -> CommitWaiter:
        return self.inner._new_events_waiter()

    async def consumer_position(self, consumer: str) -> int | None:
        self.before_read("consumer_position")
        return await self.inner.consumer_position(consumer)

    async def has_processed(self, consumer: str, message_id: str) -> bool:
        self.before_read("has_processed")
        return await self.inner.has_processed(consumer, message_id)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await self.inner.save_snapshot(snapshot)

    async def latest_snapshot(self, stream: str) -> Snapshot | None:
        self.before_read("latest_snapshot")
        return await self.inner.latest_snapshot(stream)

    async def close(self) -> None:
        await self.inner.close()
