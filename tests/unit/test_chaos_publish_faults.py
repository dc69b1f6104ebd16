"""The ``publish_fail`` and ``fetch_fail`` faults: the node's connection to the broker's
server (Redis, NATS) goes away for a moment. They parse and write back, reject bad values
naming the entry, fail publishes (nothing sent) and fetches (nothing taken) only while the
plan says so, are counted in coverage, and keep runs deterministic."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from collaborative_blocks.core.messaging.broker import MessageContext
from collaborative_blocks.core.messaging.envelope import (
    DeliveryGuarantee,
    JSONValue,
    Message,
    MessageType,
)
from collaborative_blocks.errors import FaultPlanError, TransportUnavailableError
from collaborative_blocks.simulations import FaultPlan, OpType, SimulationResult, run_simulation
from collaborative_blocks.simulations import faults as faults_module
from collaborative_blocks.simulations.checkers import Checker
from collaborative_blocks.simulations.faults import ACCEPTED_FORMS
from collaborative_blocks.simulations.scenarios import Scenario
from collaborative_blocks.simulations.world import Node, Phase, World

NEW_FAULTS = ("publish_fail", "fetch_fail")

# -- the spec --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW_FAULTS)
def test_the_fault_parses_and_writes_back(name: str) -> None:
    plan = FaultPlan.parse(f"{name}=0.2")
    assert getattr(plan, name) == 0.2
    assert plan.spec() == f"{name}=0.2"
    assert FaultPlan.parse(plan.spec()) == plan
    assert plan.faults() == [name]
    assert plan.network_faults
    assert plan.without(name).is_empty
    assert plan.healed() == FaultPlan()
    assert FaultPlan.parse(f"{name}=0") == FaultPlan()


def test_the_transport_faults_have_their_canonical_place_after_the_partitions() -> None:
    plan = FaultPlan.parse(
        "store_fail=0.01, fetch_fail=0.1, crash=0.01, publish_fail=0.05, partition=3s@6s, drop=0.1"
    )
    assert plan.spec() == (
        "drop=0.1,partition=3s@6s,publish_fail=0.05,fetch_fail=0.1,crash=0.01,store_fail=0.01"
    )
    assert FaultPlan.parse(plan.spec()) == plan


@pytest.mark.parametrize("name", NEW_FAULTS)
@pytest.mark.parametrize("value", ["1.5", "-0.1", "often", "nan"])
def test_a_bad_value_is_a_fault_plan_error_naming_the_entry(name: str, value: str) -> None:
    with pytest.raises(FaultPlanError, match="Accepted") as caught:
        FaultPlan.parse(f"{name}={value}")
    assert f"{name}={value}" in str(caught.value)


@pytest.mark.parametrize("name", NEW_FAULTS)
@pytest.mark.parametrize("spec", ["{name}=0.1,{name}=0.2", "{name}"])
def test_a_repeated_or_valueless_entry_is_a_fault_plan_error(name: str, spec: str) -> None:
    with pytest.raises(FaultPlanError, match="Accepted") as caught:
        FaultPlan.parse(spec.format(name=name))
    assert name in str(caught.value)


@pytest.mark.parametrize("name", NEW_FAULTS)
@pytest.mark.parametrize("value", [1.01, -0.5, float("nan"), float("inf")])
def test_a_plan_built_with_a_bad_value_is_a_fault_plan_error(name: str, value: float) -> None:
    with pytest.raises(FaultPlanError, match=name):
        FaultPlan(**{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NEW_FAULTS)
def test_the_accepted_forms_and_the_tables_list_the_fault(name: str) -> None:
    assert f"{name}=P" in ACCEPTED_FORMS
    assert f"``{name}=P``" in (faults_module.__doc__ or "")
    with pytest.raises(FaultPlanError) as caught:
        FaultPlan.parse(f"{name}s=0.1")
    assert f"{name}=P" in str(caught.value)


# -- the faults ------------------------------------------------------------------------------


class _Pinger(Scenario):
    """A sender publishes numbered events in both phases; a receiver's consumer records the
    numbers it handles. A publish that raises TransportUnavailableError is a FAIL."""

    name = "pinger"
    nodes = ("sender", "receiver")
    safety_seconds = 10.0
    liveness_seconds = 20.0
    rounds = 20

    def __init__(self) -> None:
        self.received: list[int] = []
        self.sent: set[int] = set()
        self.next = 0

    async def start_node(self, world: World, node: Node) -> None:
        if node.name != "receiver":
            return

        async def receive(message: Message, ctx: MessageContext) -> None:
            payload = message.payload
            assert isinstance(payload, dict)
            n = payload["n"]
            assert isinstance(n, int)
            self.received.append(n)

        await node.broker.subscribe("ping", receive, group="receiver", system="receiver")

    async def workload(self, world: World, phase: Phase) -> None:
        sender = world.node("sender")
        for _ in range(self.rounds):
            n = self.next
            self.next += 1
            message = Message(
                MessageType.EVENT,
                "ping",
                {"n": n},
                source="sender",
                guarantee=DeliveryGuarantee.AT_LEAST_ONCE,
            )

            async def publish(n: int = n, message: Message = message) -> JSONValue:
                await sender.call(sender.broker.publish(message))
                self.sent.add(n)
                return n

            await world.operation(
                "sender", "publish", n, publish, definite_failures=(TransportUnavailableError,)
            )
            await world.clock.sleep(0.2)

    async def settled(self, world: World) -> bool:
        return self.sent <= set(self.received)

    def checkers(self) -> Sequence[Checker]:
        return ()


def _run(spec: str, seed: int = 1) -> tuple[_Pinger, SimulationResult]:
    scenario = _Pinger()
    return scenario, run_simulation(scenario, seed, spec, check_coverage=False)


def _failed(result: SimulationResult) -> tuple[set[Any], set[Any], set[Any]]:
    """The numbers whose publish failed in the safety and the liveness phase, and the
    numbers published."""
    safety_end = result.phase_ends["safety"]
    safety: set[Any] = set()
    liveness: set[Any] = set()
    ok: set[Any] = set()
    for op in result.history:
        if op.type is OpType.FAIL:
            assert op.error is not None, op
            assert "TransportUnavailableError" in op.error, op
            assert "publish_fail" in op.error, op
            (safety if op.time <= safety_end else liveness).add(op.value)
        elif op.type is OpType.OK:
            ok.add(op.value)
    return safety, liveness, ok


def test_without_the_faults_nothing_fails_and_every_ping_arrives() -> None:
    for spec in ("none", "drop=0.2", "store_fail=0.5,store_read_fail=0.5"):
        scenario, result = _run(spec)
        safety, liveness, ok = _failed(result)
        assert not safety, spec
        assert not liveness, spec
        assert ok == set(range(2 * _Pinger.rounds)), spec
        assert set(scenario.received) == ok, spec
        assert not set(NEW_FAULTS) & set(result.coverage), spec
        assert not result.violations, spec


def test_a_certain_publish_fault_fails_every_publish_and_sends_nothing() -> None:
    scenario, result = _run("publish_fail=1")
    safety, liveness, ok = _failed(result)
    rounds = _Pinger.rounds
    assert safety == set(range(rounds))
    assert not liveness  # the liveness phase injects nothing
    assert ok == set(range(rounds, 2 * rounds))
    assert set(scenario.received) == ok  # a failed publish never reaches the network
    assert result.coverage["publish_fail"] == rounds
    assert not result.violations


def test_some_publishes_fail_and_only_the_others_are_sent() -> None:
    scenario, result = _run("publish_fail=0.3", seed=4)
    safety, liveness, ok = _failed(result)
    assert 0 < len(safety) < _Pinger.rounds
    assert not liveness
    assert result.coverage["publish_fail"] == len(safety)
    assert set(scenario.received) == ok
    assert not safety & set(scenario.received)


def test_a_failed_publish_that_is_delayed_or_reordered_is_still_not_sent() -> None:
    # The fault comes first: a failed publish draws no delay and never enters the network.
    scenario, result = _run("publish_fail=0.5,delay=0.1-0.5,reorder=0.5", seed=2)
    safety, _, ok = _failed(result)
    assert safety
    assert set(scenario.received) == ok


def test_a_certain_fetch_fault_delivers_nothing_until_the_faults_heal() -> None:
    scenario, result = _run("fetch_fail=1")
    safety, liveness, ok = _failed(result)
    assert not safety  # publishing works
    assert not liveness
    assert ok == set(range(2 * _Pinger.rounds))
    # The broker's fetch loop backs off and retries; after the heal everything arrives.
    assert set(scenario.received) == ok
    assert result.coverage["fetch_fail"] > 0
    assert not result.violations


def test_fetch_faults_lose_nothing() -> None:
    scenario, result = _run("fetch_fail=0.5,drop=0.1", seed=3)
    assert result.coverage["fetch_fail"] > 0
    _, _, ok = _failed(result)
    assert set(scenario.received) == ok
    assert not result.violations


@pytest.mark.parametrize("spec", ["publish_fail=0.3", "fetch_fail=0.3"])
def test_transport_faults_are_deterministic(spec: str) -> None:
    _, first = _run(spec, seed=7)
    _, again = _run(spec, seed=7)
    _, other = _run(spec, seed=8)
    assert first.digest == again.digest
    assert first.coverage == again.coverage
    if spec.startswith("publish"):
        assert first.digest != other.digest


def test_a_scenario_under_transport_faults_replays_to_the_same_digest() -> None:
    spec = "drop=0.05,publish_fail=0.05,fetch_fail=0.05"
    first = run_simulation("transfers", 3, spec, check_coverage=False)
    again = run_simulation("transfers", 3, spec, check_coverage=False)
    assert first.coverage.get("publish_fail", 0) > 0
    assert first.coverage.get("fetch_fail", 0) > 0
    assert first.digest == again.digest
    assert first.coverage == again.coverage
    assert first.faults == FaultPlan.parse(spec).spec()
