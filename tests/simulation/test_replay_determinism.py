"""A run is a pure function of (scenario, seed, fault plan): same inputs, same digest, in this
process and in another one with a different PYTHONHASHSEED (set iteration order differs
there); different seeds give different histories."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from collaborative_blocks.simulations import run_simulation

SCENARIOS = ("transfers", "pipeline", "replicas")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_same_seed_gives_the_same_digest_and_history(scenario: str) -> None:
    first = run_simulation(scenario, 11)
    second = run_simulation(scenario, 11)
    assert first.digest == second.digest
    assert list(first.history.lines()) == list(second.history.lines())
    assert first.coverage == second.coverage
    assert first.timeline == second.timeline


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_different_seeds_give_different_histories(scenario: str) -> None:
    digests = {run_simulation(scenario, seed).digest for seed in range(4)}
    assert len(digests) == 4


def test_the_fault_plan_is_part_of_the_identity() -> None:
    assert (
        run_simulation("pipeline", 5, "drop=0.1").digest
        != run_simulation("pipeline", 5, "drop=0.2").digest
    )


def test_another_process_with_another_hash_seed_gives_the_same_digests() -> None:
    here = {name: run_simulation(name, 3).digest for name in SCENARIOS}
    code = (
        "import json\n"
        "from collaborative_blocks.simulations import run_simulation\n"
        f"print(json.dumps({{n: run_simulation(n, 3).digest for n in {SCENARIOS!r}}}))\n"
    )
    for hash_seed in ("1", "987654"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert json.loads(out.stdout) == here, f"PYTHONHASHSEED={hash_seed}"
