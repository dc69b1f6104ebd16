"""Fault plans driven by hypothesis: the spec grammar round-trips for every plan, the
scenarios keep their invariants under every plan drawn, and a failing plan shrinks to a
minimal one (shown with a planted bug that only a duplicate delivery exposes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collaborative_blocks.core.messaging.broker import MessageContext
from collaborative_blocks.core.messaging.envelope import Message
from collaborative_blocks.simulations import FaultPlan, get_scenario, run_simulation
from collaborative_blocks.simulations.checkers import Checker, FunctionChecker
from collaborative_blocks.simulations.results import History, OpType, Violation
from collaborative_blocks.simulations.scenarios.pipeline import PipelineScenario
from collaborative_blocks.simulations.shrink import fault_plans, shrink_plan
from collaborative_blocks.simulations.world import Node, World

PLANS = fault_plans(nodes=("producer", "stage", "sink"))


@given(PLANS)
@settings(max_examples=200, deadline=None)
def test_every_plan_round_trips_through_its_spec(plan: FaultPlan) -> None:
    assert FaultPlan.parse(plan.spec()) == plan


SCENARIO_PLANS = st.sampled_from(["transfers", "pipeline", "replicas", "orders"]).flatmap(
    lambda name: st.tuples(st.just(name), fault_plans(nodes=get_scenario(name).nodes))
)


@given(scenario_and_plan=SCENARIO_PLANS, seed=st.integers(0, 10_000))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_built_in_scenarios_hold_under_every_plan(
    scenario_and_plan: tuple[str, FaultPlan], seed: int
) -> None:
    scenario, plan = scenario_and_plan
    result = run_simulation(scenario, seed, plan, check_coverage=False)
    assert not result.violations, (
        "\n".join(str(v) for v in result.violations) + "\n" + result.replay_command
    )


class _CountsDuplicatesAsNew(PipelineScenario):
    """A planted bug: the sink's own count of processed jobs must equal the jobs it stored;
    a handler that counts before it appends counts a duplicate delivery twice."""

    name = "pipeline-planted-duplicate-bug"
    jobs = 40
    burst = 10
    poison_every = 1000  # no poison: only the planted bug can fail the run

    async def start_node(self, world: World, node: Node) -> None:
        await super().start_node(world, node)
        if node.name == "sink":
            counted: dict[int, int] = world.scenario_state.setdefault("counted", {})

            async def count(message: Message, ctx: MessageContext) -> None:
                n: Any = message.payload
                counted[n["n"]] = counted.get(n["n"], 0) + 1

            await node.broker.subscribe("job.staged", count, group="counter", system="sink")

    async def final_reads(self, world: World) -> dict[str, Any]:
        facts = await super().final_reads(world)
        counted = world.scenario_state.get("counted", {})
        world.record(
            "checker", OpType.OK, "counted", {str(k): v for k, v in sorted(counted.items())}
        )
        return facts

    def checkers(self) -> Sequence[Checker]:
        def counted_once(history: History, facts: Mapping[str, Any]) -> list[Violation]:
            counts = [op for op in history if op.f == "counted"]
            value: Any = counts[-1].value if counts else {}
            return [
                Violation("counted_once", f"job {n} counted {c} times", (counts[-1],))
                for n, c in value.items()
                if c > 1
            ]

        return [FunctionChecker("counted_once", counted_once)]


def test_a_failing_plan_shrinks_to_the_fault_that_matters() -> None:
    scenario = _CountsDuplicatesAsNew()
    noisy = FaultPlan.parse(
        "drop=0.1,duplicate=0.3,reorder=0.2,delay=0.01-0.3,skew=1,store_fail=0.05"
    )
    seed = 1
    assert not run_simulation(scenario, seed, noisy, check_coverage=False).ok

    def fails(plan: FaultPlan) -> bool:
        return not run_simulation(scenario, seed, plan, check_coverage=False).ok

    smallest = shrink_plan(noisy, fails)
    assert fails(smallest)
    assert smallest.faults() == ["duplicate"]  # only duplicates expose a double count
    assert not fails(smallest.without("duplicate"))


@given(PLANS)
@settings(max_examples=10, deadline=None)
def test_hypothesis_shrinks_a_plan_that_breaks_the_planted_bug(plan: FaultPlan) -> None:
    """The shape a user's property takes; here restricted to plans without duplicates, which
    the planted bug survives (with duplicates hypothesis would shrink to duplicate=...)."""
    plan = plan.without("duplicate").without("crash_rate").without("crashes")
    result = run_simulation(_CountsDuplicatesAsNew(), 0, plan, check_coverage=False)
    assert not [v for v in result.violations if v.invariant == "counted_once"]
