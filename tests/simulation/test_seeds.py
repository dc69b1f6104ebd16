"""Many seeds of every built-in scenario under its default faults: the CI gate of issue 6.

>= 500 seeds in all, in chunks so a failure names its scenario and seeds (and prints each
failing run's violations and replay command). Every run must keep its invariants and
exercise the behaviours its scenario requires (the coverage gate)."""

from __future__ import annotations

import pytest

from collaborative_blocks.simulations import run_simulation

SEEDS_PER_SCENARIO = 130
CHUNK = 13
SCENARIOS = ("transfers", "pipeline", "replicas", "orders")


@pytest.mark.parametrize("first", range(0, SEEDS_PER_SCENARIO, CHUNK))
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_default_faults_keep_every_invariant(scenario: str, first: int) -> None:
    failures = []
    for seed in range(first, first + CHUNK):
        result = run_simulation(scenario, seed)
        if not result.ok:
            failures.append(
                f"seed {seed}: missing coverage {list(result.missing_coverage)}\n"
                + "\n".join(str(v) for v in result.violations[:3])
                + f"\n  replay: {result.replay_command}"
            )
    assert not failures, "\n\n".join(failures)
