"""Real-time data synchronisation: conflict resolvers, event streams and the sync engine.

The resolver half (vector clocks, writes, the resolver protocol and table) is pure and
synchronous; see :mod:`collaborative_blocks.core.sync.resolvers` and docs/sync-resolvers.md.
"""

from __future__ import annotations

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

__all__ = [
    "CONVERGENT",
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
