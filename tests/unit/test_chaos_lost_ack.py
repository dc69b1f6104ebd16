"""The ``store_lost_ack`` fault: a store write commits, then the connection drops and the
caller hears :class:`StoreUnavailableError` (an ambiguous failure). It parses and writes
back, rejects bad values naming the entry, stores the write although the call raised, fails
writes only while the plan says so, is counted in coverage, and keeps runs deterministic."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from collaborative_blocks.errors import FaultPlanError, StoreUnavailableError
from collaborative_blocks.simulations import FaultPlan, OpType, SimulationResult, run_simulation
from collaborative_blocks.simulations import faults as faults_module
from collaborative_blocks.simulations.checkers import Checker
from collaborative_blocks.simulations.faults import ACCEPTED_FORMS
from collaborative_blocks.simulations.scenarios import Scenario
from collaborative_blocks.simulations.world import Node, Phase, World
from collaborative_blocks.stores.base import EventStore, NewEvent, Tracking

CONSUMER = "writer"

# -- the spec --------------------------------------------------------------------------------


def test_store_lost_ack_parses_and_writes_back() -> None:
    plan = FaultPlan.parse("store_lost_ack=0.2")
    assert plan.store_lost_ack == 0.2
    assert plan.store_fail == 0.0
    assert plan.spec() == "store_lost_ack=0.2"
    assert FaultPlan.parse(plan.spec()) == plan
    assert plan.faults() == ["store_lost_ack"]
    assert not plan.network_faults
    assert plan.without("store_lost_ack").is_empty
    assert plan.healed() == FaultPlan()
    assert FaultPlan.parse("store_lost_ack=0") == FaultPlan()


def test_store_lost_ack_has_its_canonical_place_after_the_other_store_faults() -> None:
    plan = FaultPlan.parse(
        "handler_error=0.1, store_lost_ack=0.05, slow_write=0.1:0.5, drop=0.1, "
        "store_read_fail=0.02, store_fail=0.01"
    )
    assert plan.spec() == (
        "drop=0.1,store_fail=0.01,store_read_fail=0.02,store_lost_ack=0.05,"
        "slow_write=0.1:0.5,handler_error=0.1"
    )
    assert FaultPlan.parse(plan.spec()) == plan


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("store_lost_ack=1.5", "store_lost_ack=1.5"),
        ("store_lost_ack=-0.1", "store_lost_ack=-0.1"),
        ("store_lost_ack=often", "store_lost_ack=often"),
        ("store_lost_ack=nan", "store_lost_ack=nan"),
        ("store_lost_ack=inf", "store_lost_ack=inf"),
        ("store_lost_ack=0.1,store_lost_ack=0.2", "store_lost_ack"),
        ("store_lost_ack", "store_lost_ack"),
        ("store_lost_ack=", "store_lost_ack"),
    ],
)
def test_a_bad_store_lost_ack_entry_is_a_fault_plan_error_naming_it(spec: str, named: str) -> None:
    with pytest.raises(FaultPlanError, match="Accepted") as caught:
        FaultPlan.parse(spec)
    assert named in str(caught.value)


@pytest.mark.parametrize("value", [1.01, -0.5, float("nan"), float("inf")])
def test_a_plan_built_with_a_bad_store_lost_ack_is_a_fault_plan_error(value: float) -> None:
    with pytest.raises(FaultPlanError, match="store_lost_ack"):
        FaultPlan(store_lost_ack=value)


def test_the_accepted_forms_and_the_tables_list_store_lost_ack() -> None:
    assert "store_lost_ack=P" in ACCEPTED_FORMS
    assert "``store_lost_ack=P``" in (faults_module.__doc__ or "")
    with pytest.raises(FaultPlanError) as caught:
        FaultPlan.parse("store_lost_acks=0.1")
    assert "store_lost_ack=P" in str(caught.value)


# -- the fault -------------------------------------------------------------------------------


class _Writer(Scenario):
    """One node whose client appends one event (with a tracking record) to a stream of its
    own per round, in both phases. A write that raises StoreUnavailableError is a FAIL, as a
    naive caller would record it; the test then looks at what the store really holds."""

    name = "writer"
    nodes = ("writer",)
    safety_seconds = 10.0
    liveness_seconds = 5.0
    rounds = 20

    def __init__(self) -> None:
        self.next = 0
        self.stored: set[int] = set()
        self.tracked: set[int] = set()

    async def start_node(self, world: World, node: Node) -> None:
        return None

    async def workload(self, world: World, phase: Phase) -> None:
        node = world.node("writer")
        for _ in range(self.rounds):
            n = self.next
            self.next += 1

            async def append(n: int = n, store: EventStore = node.store) -> Any:
                await store.append(
                    f"writes-{n}",
                    [NewEvent("writer:Wrote", b"{}")],
                    expected_version=0,
                    tracking=Tracking(CONSUMER, message_id=f"message-{n}"),
                )
                return n

            await world.operation(
                "client", "append", n, append, definite_failures=(StoreUnavailableError,)
            )
            await world.clock.sleep(0.2)

    async def settled(self, world: World) -> bool:
        # What the durable store holds, read past the faults.
        for n in range(self.next):
            if await world.durable.stream_version(f"writes-{n}") == 1:
                self.stored.add(n)
            if await world.durable.has_processed(CONSUMER, f"message-{n}"):
                self.tracked.add(n)
        return True

    def checkers(self) -> Sequence[Checker]:
        return ()


def _run(spec: str, seed: int = 1) -> tuple[_Writer, SimulationResult, set[Any], set[Any]]:
    """The scenario, the result, and the numbers whose append raised in the safety and in
    the liveness phase."""
    scenario = _Writer()
    result = run_simulation(scenario, seed, spec, check_coverage=False)
    safety_end = result.phase_ends["safety"]
    safety: set[Any] = set()
    liveness: set[Any] = set()
    for op in result.history:
        if op.type is OpType.FAIL:
            assert op.error is not None, op
            assert "StoreUnavailableError" in op.error, op
            (safety if op.time <= safety_end else liveness).add(op.value)
    return scenario, result, safety, liveness


def test_without_the_fault_no_write_raises_after_committing() -> None:
    everything = set(range(2 * _Writer.rounds))
    for spec in ("none", "drop=0.2,slow_write=0.5:0.1", "store_read_fail=0.5"):
        scenario, result, safety, liveness = _run(spec)
        assert not safety, spec
        assert not liveness, spec
        assert scenario.stored == scenario.tracked == everything, spec
        assert "store_lost_ack" not in result.coverage, spec


def test_a_certain_lost_ack_fails_every_write_and_every_write_is_stored() -> None:
    scenario, result, safety, liveness = _run("store_lost_ack=1")
    rounds = _Writer.rounds
    assert safety == set(range(rounds))
    assert not liveness  # the liveness phase injects nothing
    # Every call raised, and every write is in the store, with its tracking record.
    assert scenario.stored == scenario.tracked == set(range(2 * rounds))
    assert result.coverage["store_lost_ack"] == rounds
    for op in result.history:
        if op.type is OpType.FAIL:
            assert "store_lost_ack" in (op.error or "")


def test_some_acks_are_lost_and_each_is_counted() -> None:
    scenario, result, safety, liveness = _run("store_lost_ack=0.3", seed=4)
    assert 0 < len(safety) < _Writer.rounds
    assert not liveness
    assert result.coverage["store_lost_ack"] == len(safety)
    assert scenario.stored == scenario.tracked == set(range(2 * _Writer.rounds))


def test_a_definite_failure_comes_first_and_writes_nothing() -> None:
    # store_fail fails before the store is touched: no write, so no ack to lose.
    scenario, result, safety, _ = _run("store_fail=0.3,store_lost_ack=0.3", seed=2)
    definite = {
        op.value
        for op in result.history
        if op.type is OpType.FAIL and "store_fail" in (op.error or "")
    }
    lost = safety - definite
    assert definite
    assert lost
    assert result.coverage["store_fail"] == len(definite)
    assert result.coverage["store_lost_ack"] == len(lost)
    assert not definite & scenario.stored
    assert lost <= scenario.stored
    assert scenario.stored == set(range(2 * _Writer.rounds)) - definite


def test_a_failed_conditional_write_loses_no_ack() -> None:
    # The inner store refuses the write (ConcurrencyError): nothing committed, nothing drawn.
    class _Twice(_Writer):
        async def workload(self, world: World, phase: Phase) -> None:
            if phase is Phase.SAFETY:
                await world.durable.append("writes-0", [NewEvent("writer:Wrote", b"{}")])
            await super().workload(world, phase)

    scenario = _Twice()
    result = run_simulation(scenario, 1, "store_lost_ack=1", check_coverage=False)
    errors = [op.error or "" for op in result.history if op.f == "append" and op.error]
    assert any("ConcurrencyError" in error for error in errors)
    assert result.coverage["store_lost_ack"] == _Writer.rounds - 1


def test_lost_acks_are_deterministic() -> None:
    spec = "store_lost_ack=0.3"
    _, first, _, _ = _run(spec, seed=7)
    _, again, _, _ = _run(spec, seed=7)
    _, other, _, _ = _run(spec, seed=8)
    assert first.digest == again.digest
    assert first.coverage == again.coverage
    assert first.digest != other.digest


def test_a_scenario_under_lost_acks_replays_to_the_same_digest() -> None:
    spec = "drop=0.05,store_fail=0.02,store_lost_ack=0.1"
    first = run_simulation("transfers", 3, spec, check_coverage=False)
    again = run_simulation("transfers", 3, spec, check_coverage=False)
    assert first.coverage.get("store_lost_ack", 0) > 0
    assert first.digest == again.digest
    assert first.coverage == again.coverage
    assert first.faults == FaultPlan.parse(spec).spec()
