"""Built-in event stores: ``memory://``, ``sqlite+aiosqlite:///PATH`` and
``postgresql+asyncpg://USER@HOST:PORT/DB``.

Configure with ``EVENT_STORE_URL`` (or pass the URL to ``open_store``). A third-party store
plugin looks exactly like this module: a ``cb_store_factories`` hook returning objects with
``schemes`` and ``async open(url, *, clock)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from collaborative_blocks import hookimpl
from collaborative_blocks.core.clock import Clock
from collaborative_blocks.core.extensions import StoreFactory
from collaborative_blocks.stores import EventStore


class MemoryStoreFactory:
    schemes = ("memory",)

    async def open(self, url: str, *, clock: Clock) -> EventStore:
        from collaborative_blocks.stores.memory import MemoryEventStore

        return MemoryEventStore(url)


class SQLiteStoreFactory:
    schemes = ("sqlite+aiosqlite", "sqlite")

    async def open(self, url: str, *, clock: Clock) -> EventStore:
        from collaborative_blocks.stores.sqlite import open_sqlite_store

        return await open_sqlite_store(url)


class PostgresStoreFactory:
    schemes = ("postgresql+asyncpg", "postgresql", "postgres")

    async def open(self, url: str, *, clock: Clock) -> EventStore:
        from collaborative_blocks.stores.postgres import open_postgres_store

        return await open_postgres_store(url, clock=clock)


@hookimpl
def cb_store_factories() -> Sequence[StoreFactory]:
    return [MemoryStoreFactory(), SQLiteStoreFactory(), PostgresStoreFactory()]
