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
from typing import Any

from collaborative_blocks.simulations.faults import FaultPlan
from collaborative_blocks.simulations.results import SimulationResult
from collaborative_blocks.simulations.runner import run_simulation
from collaborative_blocks.stores.delegating import DelegatingStore

__all__ = ["Caught", "DelegatingStore", "DelegatingTransport", "seeds_to_catch"]


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
