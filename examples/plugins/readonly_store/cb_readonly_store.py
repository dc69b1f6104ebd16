"""An example Collaborative Blocks plugin: read-only views of any event store.

``readonly+<URL>`` opens the store at ``<URL>`` and refuses every write, so a dashboard or a
reporting job can be pointed at the production log without any chance of changing it::

    EVENT_STORE_URL=readonly+sqlite+aiosqlite:///cb-data/events.db cblocks events stats

It implements one hook, ``cb_store_factories``, and imports only the public package.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from collaborative_blocks import Clock, CollaborativeBlocksError, hookimpl, open_store
from collaborative_blocks.stores import (
    AppendRequest,
    EventStore,
    Snapshot,
    StoredEvent,
    StoreStats,
    StreamInfo,
    Tracking,
)

PREFIX = "readonly+"


class ReadOnlyStoreError(CollaborativeBlocksError):
    """A write was attempted through a read-only store."""


class ReadOnlyStore(EventStore):
    """Delegates every read to ``inner``; every write raises :class:`ReadOnlyStoreError`."""

    def __init__(self, inner: EventStore, url: str) -> None:
        self.inner = inner
        self.url = url

    async def append_many(
        self, requests: Sequence[AppendRequest], *, tracking: Tracking | None = None
    ) -> list[list[int]]:
        streams = ", ".join(sorted({r.stream for r in requests})) or "(none)"
        raise ReadOnlyStoreError(
            f"{self.url} is read-only; the append to {streams} was refused. "
            f"Open the store without the {PREFIX!r} prefix to write."
        )

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        raise ReadOnlyStoreError(f"{self.url} is read-only; snapshots cannot be saved through it")

    async def read(
        self,
        stream: str,
        *,
        from_version: int = 0,
        to_version: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
    ) -> list[StoredEvent]:
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
        return await self.inner.read_all(
            from_position=from_position, to_position=to_position, limit=limit, topics=topics
        )

    def subscribe(
        self, *, from_position: int = 1, topics: Sequence[str] = (), batch_size: int = 500
    ) -> AsyncIterator[StoredEvent]:
        return self.inner.subscribe(
            from_position=from_position, topics=topics, batch_size=batch_size
        )

    async def max_position(self) -> int:
        return await self.inner.max_position()

    async def stream_version(self, stream: str) -> int:
        return await self.inner.stream_version(stream)

    async def streams(self, *, prefix: str = "", limit: int = 100) -> list[StreamInfo]:
        return await self.inner.streams(prefix=prefix, limit=limit)

    async def stats(self) -> StoreStats:
        return await self.inner.stats()

    async def consumer_position(self, consumer: str) -> int | None:
        return await self.inner.consumer_position(consumer)

    async def has_processed(self, consumer: str, message_id: str) -> bool:
        return await self.inner.has_processed(consumer, message_id)

    async def latest_snapshot(self, stream: str) -> Snapshot | None:
        return await self.inner.latest_snapshot(stream)

    async def close(self) -> None:
        await self.inner.close()


class ReadOnlyStoreFactory:
    """Opens ``readonly+<URL>`` for every scheme the other installed plugins provide."""

    schemes = (
        "readonly+memory",
        "readonly+sqlite+aiosqlite",
        "readonly+sqlite",
        "readonly+postgresql+asyncpg",
        "readonly+postgresql",
    )

    async def open(self, url: str, *, clock: Clock) -> EventStore:
        inner = await open_store(url.removeprefix(PREFIX), clock=clock)
        return ReadOnlyStore(inner, url)


@hookimpl
def cb_store_factories() -> list[ReadOnlyStoreFactory]:
    return [ReadOnlyStoreFactory()]
