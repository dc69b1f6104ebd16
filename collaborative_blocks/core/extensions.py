"""The Protocols that plugin objects implement (one small method each, where possible).

The hooks in :mod:`collaborative_blocks.core.hookspecs` return lists of these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collaborative_blocks.core.clock import Clock
    from collaborative_blocks.core.messaging.transport import Transport
    from collaborative_blocks.core.runtime import Runtime
    from collaborative_blocks.stores.base import EventStore

__all__ = [
    "ConflictResolver",
    "HealingStrategy",
    "Router",
    "SecurityPolicy",
    "StoreFactory",
    "TransportFactory",
]


@runtime_checkable
class StoreFactory(Protocol):
    """Opens an event store for the URL schemes it names."""

    @property
    def schemes(self) -> Sequence[str]: ...

    async def open(self, url: str, *, clock: Clock) -> EventStore:
        """Connect (creating the schema if needed) and return a ready store.

        Raise :class:`~collaborative_blocks.errors.StoreUnavailableError` when the database
        cannot be reached.
        """
        ...


@runtime_checkable
class TransportFactory(Protocol):
    """Opens a message transport for the URL schemes it names.

    ``open`` takes the URL (e.g. ``redis://localhost:6379``) and the runtime, which supplies
    the clock (ack timeouts, nack delays), the random source, the settings and the event
    store (the log-backed transport uses it). It returns a connected
    :class:`~collaborative_blocks.core.messaging.transport.Transport`; raise
    :class:`~collaborative_blocks.errors.TransportUnavailableError` when the server cannot be
    reached.
    """

    @property
    def schemes(self) -> Sequence[str]: ...

    async def open(self, url: str, *, runtime: Runtime) -> Transport: ...


@runtime_checkable
class ConflictResolver(Protocol):
    """Chooses the value of a key when replicas disagree."""

    @property
    def name(self) -> str: ...

    def resolve(self, key: str, candidates: Sequence[Any]) -> Any: ...


@runtime_checkable
class Router(Protocol):
    """Chooses where a request goes."""

    @property
    def name(self) -> str: ...

    def route(self, request: Mapping[str, Any], candidates: Sequence[str]) -> str: ...


@runtime_checkable
class HealingStrategy(Protocol):
    """Recovers a component from an anomaly."""

    @property
    def name(self) -> str: ...

    async def heal(self, anomaly: Mapping[str, Any]) -> bool: ...


@runtime_checkable
class SecurityPolicy(Protocol):
    """Decides whether a request may proceed."""

    @property
    def name(self) -> str: ...

    def check(self, request: Mapping[str, Any]) -> bool: ...
