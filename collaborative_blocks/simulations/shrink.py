"""Shrinking: from a failing run to the smallest fault plan and witness that still fail.

- :func:`fault_plans` is a hypothesis strategy of :class:`FaultPlan` objects built so that
  hypothesis shrinks towards fewer and milder faults (every fault is off in the simplest
  example), so a property such as "scenario X holds for every plan" reports a minimal plan.
- :func:`shrink_plan` does the same without hypothesis: starting from a failing plan, it
  switches faults off, drops scheduled partitions and crashes and halves rates while the run
  still fails, and returns the smallest plan it found.
- :func:`shrink_witness` reduces a violation's witness to the operations its checker still
  needs to report it (see :func:`~collaborative_blocks.simulations.checkers.minimise_witness`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from collaborative_blocks.simulations.checkers import Checker, minimise_witness
from collaborative_blocks.simulations.faults import PROBABILITIES, CrashAt, FaultPlan, Partition
from collaborative_blocks.simulations.results import History, Operation, Violation

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

__all__ = ["fault_plans", "shrink_plan", "shrink_witness"]


def fault_plans(
    *, max_probability: float = 0.3, horizon: float = 15.0, nodes: tuple[str, ...] = ()
) -> SearchStrategy[FaultPlan]:
    """A hypothesis strategy of fault plans (needs ``hypothesis``).

    Probabilities go up to ``max_probability``; partitions and scheduled crashes happen
    within ``horizon`` simulated seconds; a scheduled crash names one of ``nodes`` (or lets
    the seed choose). Every field shrinks to "off".
    """
    from hypothesis import strategies as st

    probability = st.one_of(
        st.just(0.0), st.floats(0.0, max_probability, allow_nan=False).map(lambda p: round(p, 3))
    )
    seconds = st.floats(0.0, horizon, allow_nan=False).map(lambda s: round(s, 2))
    duration = st.floats(0.5, horizon, allow_nan=False).map(lambda s: round(s, 2))
    node = st.sampled_from((None, *nodes)) if nodes else st.none()
    delay = st.tuples(seconds, seconds).map(lambda pair: (min(pair) / 10, max(pair) / 10))
    return st.builds(
        FaultPlan,
        drop=probability,
        duplicate=probability,
        reorder=probability,
        delay=st.one_of(st.just((0.0, 0.0)), delay),
        partitions=st.lists(st.builds(Partition, seconds, duration), max_size=2).map(tuple),
        crash_rate=st.one_of(st.just(0.0), st.floats(0.0, 0.05).map(lambda r: round(r, 3))),
        crashes=st.lists(st.builds(CrashAt, seconds, node), max_size=2).map(tuple),
        publish_fail=probability,
        fetch_fail=probability,
        store_fail=probability,
        store_read_fail=probability,
        store_lost_ack=probability,
        slow_write=st.one_of(st.just((0.0, 0.0)), st.tuples(probability, seconds)),
        skew=st.one_of(st.just(0.0), seconds),
        handler_error=probability,
        handler_hang=st.one_of(st.just(0.0), st.floats(0.0, 0.05).map(lambda p: round(p, 3))),
    )


def shrink_plan(
    plan: FaultPlan, fails: Callable[[FaultPlan], bool], *, max_runs: int = 200
) -> FaultPlan:
    """The smallest plan (greedily) for which ``fails`` is still true.

    ``fails`` usually runs the scenario with the same seed: ``lambda p:
    not run_simulation(name, seed, p).ok``. Stops after ``max_runs`` calls.
    """
    runs = 0

    def still_fails(candidate: FaultPlan) -> bool:
        nonlocal runs
        if runs >= max_runs:
            return False
        runs += 1
        return fails(candidate)

    current = plan
    changed = True
    while changed and runs < max_runs:
        changed = False
        for candidate in _simpler(current):
            if still_fails(candidate):
                current = candidate
                changed = True
                break
    return current


def _simpler(plan: FaultPlan) -> list[FaultPlan]:
    """Plans one step simpler than ``plan``: a fault off, one event fewer, a rate halved."""
    out = [plan.without(name) for name in plan.faults()]
    for index in range(len(plan.partitions)):
        out.append(
            dataclasses.replace(
                plan, partitions=plan.partitions[:index] + plan.partitions[index + 1 :]
            )
        )
    for index in range(len(plan.crashes)):
        out.append(
            dataclasses.replace(plan, crashes=plan.crashes[:index] + plan.crashes[index + 1 :])
        )
    for name in PROBABILITIES:
        value = getattr(plan, name)
        if value > 0.001:
            out.append(dataclasses.replace(plan, **{name: round(value / 2, 4)}))
    if plan.crash_rate > 0.001:
        out.append(dataclasses.replace(plan, crash_rate=round(plan.crash_rate / 2, 4)))
    return [candidate for candidate in out if candidate != plan]


def shrink_witness(
    violation: Violation, checker: Checker, history: History, facts: Mapping[str, Any]
) -> Violation:
    """``violation`` with its witness cut down to what ``checker`` still reports on.

    A candidate witness keeps the history's observations (final reads) and drops the
    other operations not in the candidate; the checker must still report the same invariant.
    """
    witness_indexes = {op.index for op in violation.witness}
    kept_always = [op for op in history if op.index not in witness_indexes]

    def still_shows(candidate: Sequence[Operation]) -> bool:
        ops = sorted([*kept_always, *candidate], key=lambda op: op.index)
        found = checker.check(History(ops), facts)
        return any(v.invariant == violation.invariant for v in found)

    smaller = minimise_witness(violation.witness, still_shows)
    return Violation(violation.invariant, violation.message, tuple(smaller))
