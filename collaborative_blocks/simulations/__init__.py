"""Chaos simulations: the framework's real code on a deterministic, fault-injected world.

```python skip
from collaborative_blocks.simulations import run_simulation

result = run_simulation("transfers", seed=7)          # the scenario's default faults
print(result.digest, result.ok, result.replay_command)
for violation in result.violations:
    print(violation)                                  # invariant, message, witness
```

A run is a pure function of (scenario, seed, fault plan, plugins): :mod:`.loop` runs it on
virtual time with a seeded scheduler, :mod:`.faults` says what goes wrong and when,
:mod:`.world` holds the simulated systems (nodes) sharing one durable store and one faulty
network, :mod:`.checkers` judge the recorded :class:`History`, and :mod:`.scenarios` holds the
built-in workloads (and how to write your own).
"""

from __future__ import annotations

from collaborative_blocks.simulations.faults import FaultPlan
from collaborative_blocks.simulations.results import (
    History,
    Operation,
    OpType,
    Sample,
    SimulationResult,
    Violation,
)
from collaborative_blocks.simulations.runner import run_simulation
from collaborative_blocks.simulations.scenarios import Scenario, get_scenario, scenario_names

__all__ = [
    "FaultPlan",
    "History",
    "OpType",
    "Operation",
    "Sample",
    "Scenario",
    "SimulationResult",
    "Violation",
    "get_scenario",
    "run_simulation",
    "scenario_names",
]
