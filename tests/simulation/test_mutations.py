"""Issue 6, item 7: planted bugs must be caught. Each mutant of
``collaborative_blocks.testing.mutants`` (a ``cb_chaos_component`` plugin) runs under its
scenario's default faults until a seed violates an invariant; it must take at most
``MAX_SEEDS`` seeds. The seeds each took are printed (``pytest -s``) and in docs/chaos.md."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from collaborative_blocks.cli.app import app
from collaborative_blocks.simulations import run_simulation
from collaborative_blocks.simulations.mutations import seeds_to_catch
from collaborative_blocks.simulations.scenarios.transfers import TransfersScenario
from collaborative_blocks.testing.mutants import MUTANTS

MAX_SEEDS = 30
PACKAGE = "collaborative_blocks.testing.mutants"

#: mutant -> the invariants that may catch it (a violation of another one is a wrong catch).
EXPECTED = {
    "forgetful_inbox": {"no_double_apply", "conservation", "transfer_completes", "liveness"},
    "noncommutative_resolver": {"converged", "matches_log"},
    "skipped_compensation": {"saga_atomicity", "money_conserved"},
    "early_ack_transport": {"no_lost_message", "accounting", "liveness"},
    "lossy_store": {"conservation", "transfer_completes", "no_double_apply", "liveness"},
}


def test_every_mutant_has_an_expectation() -> None:
    assert set(MUTANTS) == set(EXPECTED)


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_the_planted_bug_is_caught_within_a_few_seeds(mutant: str) -> None:
    scenario = MUTANTS[mutant]
    caught = seeds_to_catch(scenario, f"{PACKAGE}.{mutant}", max_seeds=MAX_SEEDS)
    assert caught is not None, f"{mutant} survived {MAX_SEEDS} seeds of {scenario}"
    print(f"\n{mutant}: caught by {scenario} after {caught.seeds} seed(s): {caught.invariants}")
    assert set(caught.invariants) <= EXPECTED[mutant], caught.invariants
    assert caught.result.replay_command.endswith(f"-p {PACKAGE}.{mutant}")
    # The same seed without the planted bug keeps every invariant: the bug is what failed.
    clean = run_simulation(scenario, caught.result.seed, check_coverage=False)
    assert not clean.violations, [str(v) for v in clean.violations]


@pytest.mark.parametrize("mutant", ["forgetful_inbox", "lossy_store"])
def test_memory_bugs_need_a_crash_to_show(mutant: str) -> None:
    """Both only lose what a crash wipes: without crashes they must look correct (so a catch
    with crashes is the planted bug's doing, not a side effect of the wrapper)."""
    faults = TransfersScenario.default_faults.replace("crash=0.01,", "")
    assert "crash" not in faults
    for seed in range(3):
        result = run_simulation(
            "transfers", seed, faults, plugins=[f"{PACKAGE}.{mutant}"], check_coverage=False
        )
        assert not result.violations, [str(v) for v in result.violations]


def test_a_mutant_fails_cblocks_chaos_run_with_a_replay_command() -> None:
    plugin = f"{PACKAGE}.skipped_compensation"
    result = CliRunner().invoke(
        app, ["chaos", "run", "--scenario", "orders", "--seeds", "2", "-p", plugin]
    )
    assert result.exit_code == 1, result.output
    assert "saga_atomicity" in result.output
    assert "cblocks chaos replay" in result.output
    assert plugin in result.output
