"""Chaos simulator throughput, for ``cblocks bench chaos``.

Issue 6 asks for >= 50,000 simulated message deliveries per CPU-second and a CI gate of
>= 500 seeds across the scenarios in under 5 minutes. Cases, each measured over ``rounds``
interleaved rounds:

- ``<scenario>``: :func:`~collaborative_blocks.simulations.run_simulation` of every built-in
  scenario (whatever :func:`~collaborative_blocks.simulations.scenario_names` lists) over a
  fixed set of seeds with the scenario's default faults, reported as deliveries per
  CPU-second (the runs' own ``cpu_seconds``: ``time.process_time`` around the simulated run);
  the baseline row is the target, 50,000 deliveries/CPU-s;
- ``<scenario>-no-faults``: the same seeds with no faults (what the simulator and the
  framework cost without the fault machinery);
- ``ci``: the CI gate's mix, :data:`CI_SEEDS` seeds spread evenly over the scenarios with
  their default faults, as seeds per CPU-minute (computed from the default-fault runs of the
  same round) against 102 seeds/min, i.e. 510 seeds in 5 minutes on one CPU.

Every run's digest must be the same in every round (a run is a pure function of its inputs);
a difference raises :class:`~collaborative_blocks.errors.NondeterminismError`. Run it with
``python -m collaborative_blocks.bench.chaos``.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
from dataclasses import dataclass, field
from typing import Any

from collaborative_blocks.bench._stats import CaseResult, Measurement, ProgressCallback, interleave
from collaborative_blocks.errors import NondeterminismError
from collaborative_blocks.simulations import run_simulation, scenario_names

__all__ = [
    "CI_BUDGET_SECONDS",
    "CI_SEEDS",
    "DELIVERY_TARGET",
    "ChaosBenchConfig",
    "planned_measurements",
    "run_chaos_bench",
]

#: Issue 6: simulated message deliveries per CPU-second.
DELIVERY_TARGET = 50_000.0
#: The CI gate (tests/simulation/test_seeds.py): 170 seeds of each of 3 scenarios.
CI_SEEDS = 510
#: ... in under 5 minutes.
CI_BUDGET_SECONDS = 300.0
OURS = "ours"
UNIT = "deliveries/CPU-s"
NO_FAULTS = "none"
#: The seed of the unmeasured warm-up run of each scenario (outside the measured seeds).
WARM_UP_SEED = 1_000_003


@dataclass(frozen=True)
class ChaosBenchConfig:
    """Seeds and rounds; :meth:`quick` gives a tiny run for tests. ``scenarios`` empty: every
    installed scenario."""

    rounds: int = 3
    seeds: tuple[int, ...] = tuple(range(10))
    scenarios: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def quick(cls, **overrides: Any) -> ChaosBenchConfig:
        sizes: dict[str, Any] = {"rounds": 1, "seeds": (0, 1)}
        sizes.update(overrides)
        return cls(**sizes)

    def chosen(self) -> tuple[str, ...]:
        return self.scenarios or tuple(scenario_names())


def planned_measurements(cfg: ChaosBenchConfig) -> int:
    return 2 * len(cfg.chosen()) * cfg.rounds


@dataclass
class _Totals:
    """What one measurement (every seed of one scenario, one fault setting) added up to."""

    deliveries: int = 0
    cpu: float = 0.0
    runs: int = 0
    per_round_cpu_per_seed: list[float] = field(default_factory=list)
    digests: list[str] | None = None


def _run_seeds(
    scenario: str, faults: str | None, seeds: tuple[int, ...]
) -> tuple[int, float, list[str]]:
    deliveries = 0
    cpu = 0.0
    digests: list[str] = []
    for seed in seeds:
        result = run_simulation(scenario, seed, faults, check_coverage=faults is None)
        deliveries += result.deliveries
        cpu += result.cpu_seconds
        digests.append(result.digest)
    return deliveries, cpu, digests


def _contender(scenario: str, faults: str | None, seeds: tuple[int, ...], totals: _Totals) -> Any:
    async def run() -> float:
        # A clean heap per measurement; run_simulation runs its own loop, so in a thread.
        gc.collect()
        deliveries, cpu, digests = await asyncio.to_thread(_run_seeds, scenario, faults, seeds)
        if totals.digests is None:
            totals.digests = digests
        elif digests != totals.digests:
            changed = [s for s, a, b in zip(seeds, digests, totals.digests, strict=True) if a != b]
            raise NondeterminismError(
                f"scenario {scenario!r} (faults {faults or 'default'}): seeds {changed} gave "
                "other digests than in the first round; a run must be a pure function of "
                "(scenario, seed, fault plan): replay them with cblocks chaos replay"
            )
        totals.deliveries += deliveries
        totals.cpu += cpu
        totals.runs += len(seeds)
        totals.per_round_cpu_per_seed.append(cpu / len(seeds))
        return deliveries / cpu if cpu > 0 else 0.0

    return run


def _seeds_text(seeds: tuple[int, ...]) -> str:
    if seeds and list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"seeds {seeds[0]}..{seeds[-1]}"
    return "seeds " + ", ".join(str(s) for s in seeds)


async def run_chaos_bench(
    cfg: ChaosBenchConfig, progress: ProgressCallback | None = None
) -> list[CaseResult]:
    """Per scenario: default faults, then no faults, ``cfg.rounds`` interleaved rounds each;
    then the CI projection from the default-fault rounds."""
    from collaborative_blocks.simulations import get_scenario

    baseline = f"target {DELIVERY_TARGET:,.0f} {UNIT}"
    # One unmeasured run per scenario first: a process's first run also loads the plugins
    # (entry points) and the modules a scenario imports lazily, which no CI seed after the
    # first pays.
    for scenario in cfg.chosen():
        await asyncio.to_thread(run_simulation, scenario, WARM_UP_SEED)
    results: list[CaseResult] = []
    per_seed: dict[str, list[float]] = {}
    for scenario in cfg.chosen():
        spec = get_scenario(scenario).default_faults
        for key, faults, how in (
            (scenario, None, "default faults"),
            (f"{scenario}-no-faults", NO_FAULTS, "no faults"),
        ):
            case = CaseResult(key, f"{scenario}: {how}", UNIT, OURS, baseline, 1.0)
            totals = _Totals()
            await interleave(
                case,
                [(OURS, _contender(scenario, faults, cfg.seeds, totals))],
                cfg.rounds,
                progress,
            )
            case.measurements[baseline] = Measurement(baseline, [DELIVERY_TARGET] * cfg.rounds)
            cpu_per_seed = statistics.median(totals.per_round_cpu_per_seed)
            if faults is None:
                per_seed[scenario] = totals.per_round_cpu_per_seed
            case.notes.append(
                f"faults {spec if faults is None else faults}; {_seeds_text(cfg.seeds)}: "
                f"{totals.deliveries / max(1, cfg.rounds):,.0f} "
                f"deliveries per round, {cpu_per_seed * 1000:,.1f} ms CPU per seed, "
                f"{60 / cpu_per_seed if cpu_per_seed else 0:,.0f} seeds per CPU-minute; same "
                "digests in every round"
            )
            results.append(case)
    if per_seed:
        target = CI_SEEDS / (CI_BUDGET_SECONDS / 60)
        ci_baseline = (
            f"target {target:,.0f} seeds/min ({CI_SEEDS} seeds in {CI_BUDGET_SECONDS / 60:g} min)"
        )
        ci = CaseResult(
            "ci",
            f"CI gate: {CI_SEEDS} seeds over the scenarios, one CPU",
            "seeds/CPU-min",
            OURS,
            ci_baseline,
            1.0,
        )
        rounds = min(len(v) for v in per_seed.values())
        samples = [60 / statistics.mean(v[r] for v in per_seed.values()) for r in range(rounds)]
        ci.measurements[OURS] = Measurement(OURS, samples)
        ci.measurements[ci_baseline] = Measurement(ci_baseline, [target] * rounds)
        minutes = CI_SEEDS / statistics.median(samples) if samples else 0.0
        ci.notes.append(
            f"projected CI time for {CI_SEEDS} seeds: {minutes * 60:,.0f} CPU-s "
            f"({minutes:.1f} min on one CPU; the budget is {CI_BUDGET_SECONDS / 60:g} min), "
            f"{CI_SEEDS // len(per_seed)} seeds each of {', '.join(per_seed)} with default faults, "
            "from the default-fault rounds above"
        )
        results.append(ci)
    return results


if __name__ == "__main__":
    from collaborative_blocks.cli.bench import results_markdown

    print(results_markdown(asyncio.run(run_chaos_bench(ChaosBenchConfig()))))
