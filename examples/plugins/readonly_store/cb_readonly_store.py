"""An example Collaborative Blocks plugin: read-only views of any event store.

``readonly+<URL>`` opens the store at ``<URL>`` and refuses every write, so a dashboard or a
reporting job can be pointed at the production log without any chance of changing it::

    EVENT_STORE_URL=readonly+sqlite+aiosqlite:///cb-data/events.db cblocks events stats

It implements one hook, ``cb_store_factories``, and imports only the public package.
"""

from __future__ import annotations

from collections.abc import Sequence

from collaborative_blocks import Clock, CollaborativeBlocksError, hookimpl, open_store
from collaborative_blocks.stores import (
    AppendRequest,
    DelegatingStore,
    EventStore,
    Snapshot,
    Tracking,
)

PREFIX = "readonly+"


class ReadOnlyStoreError(CollaborativeBlocksError):
    """A write was attempted through a read-only store."""


class ReadOnlyStore(DelegatingStore):
    """Delegates every read to ``inner``; every write raises :class:`ReadOnlyStoreError`."""

    def __init__(self, inner: EventStore, url: str) -> None:
        super().__init__(inner)
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
