"""The store conformance suite, run against the built-in embedded stores."""

from __future__ import annotations

from collaborative_blocks.stores import EventStore
from collaborative_blocks.stores.memory import MemoryEventStore
from collaborative_blocks.testing import StoreConformance


class TestMemoryStoreConformance(StoreConformance):
    durable = False

    async def open_store(self) -> EventStore:
        return MemoryEventStore()
