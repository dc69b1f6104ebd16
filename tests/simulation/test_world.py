"""The simulated world: every fault kind really happens and is counted, crashes keep the
durable store and lose memory, a node that never recovers is a liveness violation, and the
coverage gate fails runs whose faults exercised nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import pytest

from collaborative_blocks.core.messaging.envelope import Message, MessageType
from collaborative_blocks.errors import FaultPlanError, SimulationError
from collaborative_blocks.simulations import (
    FaultPlan,
    OpType,
    SimulationResult,
    get_scenario,
    run_simulation,
)
from collaborative_blocks.simulations.checkers import Checker
from collaborative_blocks.simulations.scenarios import Scenario
from collaborative_blocks.simulations.scenarios.pipeline import PipelineScenario
from collaborative_blocks.simulations.world import Node, Phase, World
from collaborative_blocks.stores.base import NewEvent


@pytest.mark.parametrize(
    ("spec", "counted"),
    [
        ("drop=0.2", ("drop", "redelivery")),
        ("duplicate=0.2", ("duplicate",)),
        ("reorder=0.3", ("reorder",)),
        ("delay=0.1-0.5", ("delay",)),
        ("partition=4s@2s", ("partition", "partition_drop", "heal", "redelivery")),
        ("crash=0.05", ("crash", "restart")),
        ("crash=stage@3s", ("crash", "restart", "redelivery")),
        ("store_fail=0.1", ("store_fail",)),
        ("slow_write=0.5:1", ("slow_write",)),
        ("skew=5", ("skew",)),
        ("handler_error=0.2", ("handler_error", "retry", "handler_failure")),
        ("handler_hang=0.05", ("handler_hang", "handler_failure", "retry")),
    ],
)
def test_each_fault_happens_and_is_counted(spec: str, counted: Sequence[str]) -> None:
    result = run_simulation("pipeline", 2, spec, check_coverage=False)
    for name in counted:
        assert result.coverage.get(name, 0) > 0, (spec, name, dict(result.coverage))
    assert result.faults == FaultPlan.parse(spec).spec()
    assert not result.violations, [str(v) for v in result.violations]


def test_no_faults_injects_nothing() -> None:
    result = run_simulation("pipeline", 2, "none", check_coverage=False)
    injected = {"drop", "duplicate", "reorder", "delay", "partition", "crash", "store_fail"}
    assert not injected & set(result.coverage)
    assert result.ok


def test_duplicates_of_exactly_once_commands_are_deduplicated_by_the_inbox() -> None:
    result = run_simulation("transfers", 4, "duplicate=0.3", check_coverage=False)
    assert result.coverage["duplicate"] > 0
    assert result.coverage["deduplication"] > 0
    assert result.ok, [str(v) for v in result.violations]


class _Probe(Scenario):
    """One node that records a durable event and an in-memory mark on every boot and handles
    pings; the test crashes it and looks at what survived."""

    name = "probe"
    nodes = ("probe", "client")
    safety_seconds = 10.0
    liveness_seconds = 10.0
    seen: list[dict[str, Any]]

    async def setup(self, world: World) -> None:
        world.scenario_state["boots"] = []
        world.scenario_state["pings"] = []

    async def start_node(self, world: World, node: Node) -> None:
        if node.name != "probe":
            return
        events = await node.store.read("probe-boots")
        world.scenario_state["boots"].append(
            {
                "incarnation": node.incarnation,
                "durable_boots_before": len(events),
                "memory_before": dict(node.state),
            }
        )
        node.state["mark"] = node.incarnation
        await node.store.append("probe-boots", [NewEvent("probe:Booted", b"{}")])

        async def ping(message: Message) -> None:
            world.scenario_state["pings"].append((node.incarnation, message.payload))

        await node.broker.subscribe("ping", ping, group="probe")

    async def workload(self, world: World, phase: Phase) -> None:
        client = world.node("client")
        n = 0 if phase is Phase.SAFETY else 100
        for i in range(n, n + 8):
            message = Message(MessageType.EVENT, "ping", i, source="client")

            async def send(message: Message = message) -> Any:
                sent = await client.call(client.broker.publish(message))
                return sent.payload

            await world.operation("client", "ping", i, send)
            await world.clock.sleep(1.0)

    async def settled(self, world: World) -> bool:
        return world.network.in_flight() == 0

    def checkers(self) -> Sequence[Checker]:
        return ()


def test_a_crash_loses_memory_and_keeps_the_store_and_the_node_resubscribes() -> None:
    probe = _Probe()
    result = run_simulation(probe, 1, "crash=probe@3.5s", check_coverage=False)
    assert result.coverage["crash"] == 1
    assert result.coverage["restart"] == 1
    assert result.ok, [str(v) for v in result.violations]
    # The boots and pings were collected on the world; run again to look at them.
    loop_world: dict[str, Any] = {}

    class Recording(_Probe):
        async def final_reads(self, world: World) -> dict[str, Any]:
            loop_world.update(world.scenario_state)
            return {}

    run_simulation(Recording(), 1, "crash=probe@3.5s", check_coverage=False)
    boots = loop_world["boots"]
    assert [b["incarnation"] for b in boots] == [1, 2]
    assert boots[0]["durable_boots_before"] == 0
    assert boots[1]["durable_boots_before"] == 1  # the store kept the first boot's event
    assert boots[1]["memory_before"] == {}  # the crash dropped the node's memory
    pings_after_restart = [p for incarnation, p in loop_world["pings"] if incarnation == 2]
    assert 100 in pings_after_restart  # the restarted node subscribed again


class _NeverRecovers(PipelineScenario):
    name = "pipeline-sink-never-recovers"
    liveness_seconds = 20.0

    async def heal(self, world: World) -> None:
        world.heal_partition()  # ... but the crashed sink stays down

    async def workload(self, world: World, phase: Phase) -> None:
        if phase is Phase.SAFETY:
            await super().workload(world, phase)
        else:  # more work that needs the sink
            await asyncio.gather(
                *(self._publish(world, world.node("producer"), n) for n in range(1000, 1010))
            )


def test_a_node_that_never_recovers_is_a_liveness_violation() -> None:
    # At 14.5 s the sink would restart 1-5 s later, in the liveness phase: it never does.
    result = run_simulation(_NeverRecovers(), 3, "crash=sink@14.5s", check_coverage=False)
    invariants = {v.invariant for v in result.violations}
    assert "liveness" in invariants
    assert not result.ok
    assert result.phase_ends["liveness"] - result.phase_ends["safety"] == pytest.approx(20.0)
    # With the ordinary heal the same plan is fine.
    assert run_simulation("pipeline", 3, "crash=sink@14.5s", check_coverage=False).ok


def test_the_coverage_gate_fails_a_run_whose_faults_exercised_nothing() -> None:
    scenario = get_scenario("transfers")
    result = run_simulation(scenario, 1, "skew=1")
    assert set(result.missing_coverage) == set(scenario.required_coverage)
    assert not result.violations
    assert not result.ok
    assert run_simulation(scenario, 1, "skew=1", check_coverage=False).ok
    assert run_simulation(scenario, 1).ok  # the default faults exercise everything required


def test_the_result_serialises_and_says_how_to_replay() -> None:
    result = run_simulation("pipeline", 9, "drop=0.1")
    data = json.loads(json.dumps(result.to_json()))
    again = SimulationResult.from_json(data)
    assert again.digest == result.digest == again.history.digest()
    assert again.timeline == result.timeline
    assert result.replay_command == "cblocks chaos replay 9 --scenario pipeline --faults drop=0.1"
    assert result.timeline[0].time == 0.0
    assert result.timeline[-1].time <= result.simulated_seconds
    assert all(op.type in OpType for op in result.history)
    assert result.deliveries > 0
    assert result.cpu_seconds > 0


def test_a_process_has_one_operation_in_flight() -> None:
    class TwoAtOnce(_Probe):
        async def workload(self, world: World, phase: Phase) -> None:
            world.invoke("client", "ping", 1)
            world.invoke("client", "ping", 2)

    with pytest.raises(SimulationError, match="already has an operation in flight"):
        run_simulation(TwoAtOnce(), 1, "none", check_coverage=False)


async def test_run_simulation_from_async_code_says_to_use_a_thread() -> None:
    with pytest.raises(SimulationError, match="to_thread"):
        run_simulation("pipeline", 1)
    result = await asyncio.to_thread(run_simulation, "pipeline", 1, "none", check_coverage=False)
    assert result.ok


def test_the_timeline_has_a_sample_every_simulated_second() -> None:
    result = run_simulation("pipeline", 6)
    times = [sample.time for sample in result.timeline]
    assert times == [float(i) for i in range(len(times))]
    assert times[-1] >= result.phase_ends["safety"]
    assert max(sample.in_flight for sample in result.timeline) > 0
    delivered = [sample.delivered for sample in result.timeline]
    assert delivered == sorted(delivered)
    assert 0 < delivered[-1] <= result.deliveries


def test_a_plan_that_crashes_a_node_the_scenario_lacks_is_refused() -> None:
    with pytest.raises(FaultPlanError, match="bank-z"):
        run_simulation("transfers", 1, "crash=bank-z@2s")


def test_a_restart_that_fails_fails_the_run_instead_of_hiding() -> None:
    class BrokenRestart(_Probe):
        async def start_node(self, world: World, node: Node) -> None:
            if node.incarnation > 1:
                raise RuntimeError("cannot rebuild from the store")
            await super().start_node(world, node)

    with pytest.raises(SimulationError, match="cannot rebuild"):
        run_simulation(BrokenRestart(), 1, "crash=probe@2s", check_coverage=False)
