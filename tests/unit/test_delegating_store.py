"""DelegatingStore: forwards everything to the inner store; before_read sees every read."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from collaborative_blocks.errors import StoreUnavailableError
from collaborative_blocks.stores import DelegatingStore, NewEvent
from collaborative_blocks.stores.memory import MemoryEventStore

READS = (
    "read",
    "read_all",
    "max_position",
    "stream_version",
    "streams",
    "stats",
    "consumer_position",
    "has_processed",
    "latest_snapshot",
)


class Recording(DelegatingStore):
    def __init__(self) -> None:
        super().__init__(MemoryEventStore())
        self.reads: list[str] = []
        self.refuse = False

    def before_read(self, method: str) -> None:
        self.reads.append(method)
        if self.refuse:
            raise StoreUnavailableError(f"{method} refused (test)")


async def call_every_read(store: DelegatingStore) -> None:
    await store.read("s")
    await store.read_all()
    await store.max_position()
    await store.stream_version("s")
    await store.streams()
    await store.stats()
    await store.consumer_position("c")
    await store.has_processed("c", "m")
    await store.latest_snapshot("s")


async def test_every_read_passes_before_read_and_writes_do_not() -> None:
    store = Recording()
    await store.append("s", [NewEvent("Happened", b"{}")], expected_version=0)
    assert store.reads == []
    await call_every_read(store)
    assert store.reads == list(READS)
    assert [e.topic for e in await store.read("s")] == ["Happened"]
    await store.close()


@pytest.mark.parametrize("method", READS)
async def test_before_read_can_refuse_a_read_and_the_data_stays(method: str) -> None:
    store = Recording()
    await store.append("s", [NewEvent("Happened", b"{}")], expected_version=0)
    store.refuse = True
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "read": lambda: store.read("s"),
        "read_all": lambda: store.read_all(),
        "max_position": lambda: store.max_position(),
        "stream_version": lambda: store.stream_version("s"),
        "streams": lambda: store.streams(),
        "stats": lambda: store.stats(),
        "consumer_position": lambda: store.consumer_position("c"),
        "has_processed": lambda: store.has_processed("c", "m"),
        "latest_snapshot": lambda: store.latest_snapshot("s"),
    }
    call = calls[method]
    with pytest.raises(StoreUnavailableError, match=method):
        await call()
    store.refuse = False
    assert await store.stream_version("s") == 1
    await store.close()
