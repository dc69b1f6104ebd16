"""The store conformance suite, run against the built-in embedded stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from collaborative_blocks.stores import EventStore
from collaborative_blocks.stores.memory import MemoryEventStore
from collaborative_blocks.stores.sqlite import open_sqlite_store
from collaborative_blocks.testing import StoreConformance


class TestMemoryStoreConformance(StoreConformance):
    durable = False

    async def open_store(self) -> EventStore:
        return MemoryEventStore()


class TestSQLiteStoreConformance(StoreConformance):
    durable = True

    @pytest.fixture(autouse=True)
    def _database(self, tmp_path: Path) -> None:
        self.url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"

    async def open_store(self) -> EventStore:
        return await open_sqlite_store(self.url)
