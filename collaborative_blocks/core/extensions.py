"""The Protocols that plugin objects implement (one small method each, where possible).

The hooks in :mod:`collaborative_blocks.core.hookspecs` return lists of these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collaborative_blocks.core.clock import Clock
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
    """Opens a message transport for the URL schemes it names."""

    @property
    def schemes(self) -> Sequence[str]: ...

    async def open(self, url: str, **options: Any) -> Any: ...


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
