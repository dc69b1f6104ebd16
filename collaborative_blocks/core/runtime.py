"""The runtime: owns the settings, the clock, the random source, the plugin manager and the
store, and hands them to the components. It wires parts together; behaviour lives in them."""

from __future__ import annotations

import random
from collections.abc import Iterable
from types import ModuleType

import pluggy

from collaborative_blocks.core.clock import Clock, SystemClock
from collaborative_blocks.core.plugins import make_plugin_manager, resolve_store_factory
from collaborative_blocks.core.randomness import new_random, random_id
from collaborative_blocks.core.settings import Settings, load_settings
from collaborative_blocks.stores.base import EventStore

__all__ = ["Runtime"]


class Runtime:
    """Everything a component needs from its environment, injected in one place.

    ```python
    async with Runtime(seed=7) as runtime:
        store = await runtime.store()
    ```
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        seed: int | None = None,
        plugins: Iterable[str | ModuleType | object] = (),
        plugin_manager: pluggy.PluginManager | None = None,
        store: EventStore | None = None,
    ) -> None:
        self.settings = settings if settings is not None else load_settings()
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.rng: random.Random = rng if rng is not None else new_random(seed)
        self.plugins = (
            plugin_manager if plugin_manager is not None else make_plugin_manager(plugins)
        )
        self._store = store
        self._owns_store = store is None
        self._started = False

    async def store(self) -> EventStore:
        """The runtime's event store, opened from ``EVENT_STORE_URL`` on first use."""
        if self._store is None:
            url = self.settings.event_store_url
            factory = resolve_store_factory(self.plugins, url, "EVENT_STORE_URL")
            self._store = await factory.open(url, clock=self.clock)
        if not self._started:
            self._started = True
            self.plugins.hook.cb_runtime_started(runtime=self)
        return self._store

    def new_id(self) -> str:
        """A unique, time-sortable id from the runtime's clock and random source."""
        return random_id(self.clock.now(), self.rng)

    async def close(self) -> None:
        if self._store is not None and self._owns_store:
            await self._store.close()
        self._store = None

    async def __aenter__(self) -> Runtime:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
