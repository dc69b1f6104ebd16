"""Planted bug: a conflict resolver that is not commutative (catch it with ``replicas``).

``last_write_wins`` is replaced by a resolver that keeps the write that *arrived* last
instead of the one with the latest timestamp: applying writes A then B gives B, B then A
gives A. Replicas that receive concurrent writes in different orders (the faulty network
reorders and delays them) end with different values, and the replicas scenario's
``converged`` invariant fails.

``cblocks chaos run --scenario replicas -p
collaborative_blocks.testing.mutants.noncommutative_resolver``
"""

from __future__ import annotations

from typing import Any

from collaborative_blocks import hookimpl
from collaborative_blocks.core.sync.resolvers import ResolverRegistry, Write, resolver_table
from collaborative_blocks.plugins.resolvers import LastWriteWinsResolver, LastWriteWinsState

__all__ = ["ArrivalOrderWins", "cb_chaos_component"]


class ArrivalOrderWins(LastWriteWinsResolver):
    """Named ``last_write_wins``, but the last write *applied* wins (order-dependent)."""

    def apply(self, state: LastWriteWinsState, write: Write) -> LastWriteWinsState:
        return LastWriteWinsState(write, state.heads | {write})

    def merge(self, left: LastWriteWinsState, right: LastWriteWinsState) -> LastWriteWinsState:
        winner = right.winner if right.winner is not None else left.winner
        return LastWriteWinsState(winner, left.heads | right.heads)


@hookimpl
def cb_chaos_component(kind: str, component: Any, world: Any) -> Any:
    if kind != "resolvers":
        return None
    resolvers = [
        ArrivalOrderWins() if resolver.name == "last_write_wins" else resolver
        for resolver in resolver_table(world.plugin_manager).values()
    ]
    return ResolverRegistry(resolvers)
