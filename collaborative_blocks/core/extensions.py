"""The Protocols that plugin objects implement (one small method each, where possible).

The hooks in :mod:`collaborative_blocks.core.hookspecs` return lists of these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from collaborative_blocks.core.clock import Clock
    from collaborative_blocks.core.messaging.transport import Transport
    from collaborative_blocks.core.runtime import Runtime
    from collaborative_blocks.core.sync.resolvers import (
        Conflict,
        JSONValue,
        ResolverProperty,
        Write,
    )
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


StateT = TypeVar("StateT")


@runtime_checkable
class ConflictResolver(Protocol[StateT]):
    """Folds the writes to one key into a state that every replica agrees on.

    A replica starts from ``initial()`` and folds each write it receives with ``apply``;
    two replicas' states combine with ``merge``. When ``merge`` is commutative, associative
    and idempotent (the ``properties`` it claims; the resolver conformance suite in
    :mod:`collaborative_blocks.testing` checks them) and ``apply(s, w) == merge(s,
    apply(initial(), w))``, replicas that received the same writes in any order, with
    duplicates, hold equal states. ``value`` is what readers see; ``conflicts`` lists the
    concurrent writes the state holds and how they were resolved (never dropped silently).
    States are immutable and compare with ``==``; ``to_json``/``from_json`` store them.
    All methods are synchronous and I/O-free. See docs/sync-resolvers.md.
    """

    @property
    def name(self) -> str: ...

    @property
    def properties(self) -> frozenset[ResolverProperty]: ...

    def initial(self) -> StateT: ...

    def apply(self, state: StateT, write: Write) -> StateT: ...

    def merge(self, left: StateT, right: StateT) -> StateT: ...

    def value(self, state: StateT) -> JSONValue: ...

    def conflicts(self, state: StateT) -> Sequence[Conflict]: ...

    def to_json(self, state: StateT) -> JSONValue: ...

    def from_json(self, data: JSONValue) -> StateT: ...


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
