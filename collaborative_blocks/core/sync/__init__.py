"""Real-time data synchronisation: conflict resolvers, event streams and the sync engine.

The resolver half (vector clocks, writes, the resolver protocol and table) is pure and
synchronous; see :mod:`collaborative_blocks.core.sync.resolvers` and docs/sync-resolvers.md.
``EventStream`` and ``RealTimeSyncEngine`` are the I/O edges; see docs/sync.md.
"""

from __future__ import annotations

from collaborative_blocks.core.sync.engine import (
    CHANGE_MESSAGE,
    CHANGE_TOPIC,
    CONFLICT_TOPIC,
    ChangeRecord,
    Inconsistency,
    RealTimeSyncEngine,
)
from collaborative_blocks.core.sync.resolvers import (
    CONVERGENT,
    AnyResolver,
    Conflict,
    ConflictResolver,
    ConflictStatus,
    JSONValue,
    MergeFunction,
    Ordering,
    ResolverProperty,
    ResolverRegistry,
    VectorClock,
    Write,
    canonical_json,
    check_write,
    resolver_table,
)
from collaborative_blocks.core.sync.stream import (
    SYNC_EVENT_TOPIC,
    EventStream,
    StreamContext,
    StreamEvent,
    StreamHandler,
    StreamSubscription,
)

__all__ = [
    "CHANGE_MESSAGE",
    "CHANGE_TOPIC",
    "CONFLICT_TOPIC",
    "CONVERGENT",
    "SYNC_EVENT_TOPIC",
    "ChangeRecord",
    "EventStream",
    "Inconsistency",
    "RealTimeSyncEngine",
    "StreamContext",
    "StreamEvent",
    "StreamHandler",
    "StreamSubscription",
    "AnyResolver",
    "Conflict",
    "ConflictResolver",
    "ConflictStatus",
    "JSONValue",
    "MergeFunction",
    "Ordering",
    "ResolverProperty",
    "ResolverRegistry",
    "VectorClock",
    "Write",
    "canonical_json",
    "check_write",
    "resolver_table",
]
