"""The event log: one async :class:`EventStore` interface, opened by URL.

```python
from collaborative_blocks.stores import open_store, NewEvent
store = await open_store("sqlite+aiosqlite:///data.db")
positions = await store.append("account-1", [NewEvent("Deposited", b"...")], expected_version=0)
events = await store.read("account-1", from_version=1)
async for event in store.subscribe(from_position=1): ...
await store.close()
```
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING

from collaborative_blocks.stores.base import (
    AppendRequest,
    EventStore,
    NewEvent,
    Snapshot,
    StoredEvent,
    StoreStats,
    StreamInfo,
    Tracking,
)
from collaborative_blocks.stores.delegating import DelegatingStore

if TYPE_CHECKING:
    import pluggy

    from collaborative_blocks.core.clock import Clock

__all__ = [
    "AppendRequest",
    "DelegatingStore",
    "EventStore",
    "NewEvent",
    "Snapshot",
    "StoreStats",
    "StoredEvent",
    "StreamInfo",
    "Tracking",
    "open_store",
]


async def open_store(
    url: str | None = None,
    *,
    plugins: Iterable[str | ModuleType | object] = (),
    plugin_manager: pluggy.PluginManager | None = None,
    clock: Clock | None = None,
) -> EventStore:
    """Open the event store at ``url`` (default: ``EVENT_STORE_URL`` from the settings).

    The URL's scheme picks the store among those the plugins provide (built in: ``memory``,
    ``sqlite+aiosqlite``, ``postgresql+asyncpg``). An unknown scheme raises
    :class:`~collaborative_blocks.errors.UnknownSchemeError`; an unreachable database raises
    :class:`~collaborative_blocks.errors.StoreUnavailableError`.
    """
    from collaborative_blocks.core.clock import SystemClock
    from collaborative_blocks.core.plugins import make_plugin_manager, resolve_store_factory
    from collaborative_blocks.core.settings import load_settings

    setting: str | None = None
    if url is None:
        url = load_settings().event_store_url
        setting = "EVENT_STORE_URL"
    pm = plugin_manager if plugin_manager is not None else make_plugin_manager(plugins)
    factory = resolve_store_factory(pm, url, setting)
    return await factory.open(url, clock=clock or SystemClock())
