"""Planted bugs: what they are made of, and how long the checkers take to catch one.

A planted bug (a *mutant*) is a plugin implementing ``cb_chaos_component``: when the simulated
world builds a component (its durable store, its network, a scenario's resolvers or workflow
engine) the plugin returns a broken replacement. Running a scenario with it must violate an
invariant within a few seeds; if it never does, the checkers cannot see that bug. The
built-in mutants live in :mod:`collaborative_blocks.testing.mutants`.

- :class:`DelegatingStore` / :class:`DelegatingTransport`: wrappers that forward everything to
  the real component; subclass them and override the one method the bug is in.
- :func:`seeds_to_catch`: run seeds 0, 1, ... of a scenario with a plugin until one fails an
  invariant; the number of seeds that took (or ``None``).

```python
from collaborative_blocks.simulations.mutations import seeds_to_catch

caught = seeds_to_catch(
    "transfers", "collaborative_blocks.testing.mutants.forgetful_inbox", max_seeds=30
)
assert caught is not None
print("caught after", caught.seeds, "seeds by", caught.invariants)
```
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from collaborative_blocks.simulations.faults import FaultPlan
from collaborative_blocks.simulations.results import SimulationResult
from collaborative_blocks.simulations.runner import run_simulation
from collaborative_blocks.stores.base import (
    AppendRequest,
    CommitWaiter,
    EventStore,
    Snapshot,
    StoredEvent,
    StoreStats,
    StreamInfo,
    Tracking,
)

__all__ = ["Caught", "DelegatingStore", "DelegatingTransport", "seeds_to_catch"]


class DelegatingStore(EventStore):
    """An :class:`EventStore` that forwards every call to ``inner`` (override what breaks)."""

    def __init__(self, inner: EventStore) -> None:
        self.inner = inner
        self.url = inner.url

    async def append_many(
        self, requests: Sequence[AppendRequest], *, tracking: Tracking | None = None
    ) -> list[list[int]]:
        return await self.inner.append_many(requests, tracking=tracking)

    async def read(
        self,
        stream: str,
        *,
        from_version: int = 0,
        to_version: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
    ) -> list[StoredEvent]:
        return await self.inner.read(
            stream,
            from_version=from_version,
            to_version=to_version,
            limit=limit,
            backwards=backwards,
        )

    async def read_all(
        self,
        *,
        from_position: int = 1,
        to_position: int | None = None,
        limit: int | None = None,
        topics: Sequence[str] = (),
    ) -> list[StoredEvent]:
        return await self.inner.read_all(
            from_position=from_position, to_position=to_position, limit=limit, topics=topics
        )

    async def max_position(self) -> int:
        return await self.inner.max_position()

    async def stream_version(self, stream: str) -> int:
        return await self.inner.stream_version(stream)

    async def streams(self, *, prefix: str = "", limit: int = 100) -> list[StreamInfo]:
        return await self.inner.streams(prefix=prefix, limit=limit)

    async def stats(self) -> StoreStats:
        return await self.inner.stats()

    def _new_events_waiter(self) -> CommitWaiter:
        return self.inner._new_events_waiter()

    async def consumer_position(self, consumer: str) -> int | None:
        return await self.inner.consumer_position(consumer)

    async def has_processed(self, consumer: str, message_id: str) -> bool:
        return await self.inner.has_processed(consumer, message_id)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await self.inner.save_snapshot(snapshot)

    async def latest_snapshot(self, stream: str) -> Snapshot | None:
        return await self.inner.latest_snapshot(stream)

    async def close(self) -> None:
        await self.inner.close()


class DelegatingTransport:
    """The simulated network, forwarding everything to ``inner`` (override what breaks).

    ``publish``, ``publish_nowait``, ``subscribe``, ``in_flight``, ``capabilities``... are
    the inner transport's unless a subclass defines them."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclasses.dataclass(frozen=True)
class Caught:
    """A mutant was caught: after ``seeds`` runs, by the failing run ``result``."""

    seeds: int
    result: SimulationResult

    @property
    def invariants(self) -> list[str]:
        """The invariants the failing run violated."""
        return sorted({v.invariant for v in self.result.violations})


def seeds_to_catch(
    scenario: str,
    plugin: str,
    *,
    max_seeds: int = 30,
    first_seed: int = 0,
    faults: FaultPlan | str | None = None,
) -> Caught | None:
    """Run ``scenario`` with ``plugin`` on seeds ``first_seed``, ``first_seed + 1``, ... until
    a run violates an invariant (missing coverage does not count: a mutant must break an
    invariant); ``None`` if ``max_seeds`` runs all kept them."""
    for n in range(max_seeds):
        result = run_simulation(
            scenario, first_seed + n, faults, plugins=[plugin], check_coverage=False
        )
        if result.violations:
            return Caught(n + 1, result)
    return None
