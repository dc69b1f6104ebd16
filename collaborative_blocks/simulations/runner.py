"""Running one simulation: setup, safety phase, liveness phase, checkers, coverage.

:func:`run_simulation` is synchronous: it builds its own
:class:`~collaborative_blocks.simulations.loop.SimulationLoop`, so a run is a pure function
of (scenario, seed, fault plan, plugins). It is also the edge that measures the CPU time a
run took (``time.process_time``, which the run itself never sees).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import pluggy

from collaborative_blocks.core.plugins import make_plugin_manager
from collaborative_blocks.errors import FaultPlanError, SimulationError
from collaborative_blocks.simulations.checkers import run_checkers
from collaborative_blocks.simulations.faults import FaultPlan
from collaborative_blocks.simulations.loop import SimulationLoop
from collaborative_blocks.simulations.results import Sample, SimulationResult, Violation
from collaborative_blocks.simulations.scenarios import Scenario, get_scenario
from collaborative_blocks.simulations.world import RESTART_AFTER, SIMULATOR, Node, Phase, World

__all__ = ["run_simulation"]

#: Simulated seconds between two timeline samples.
SAMPLE_INTERVAL = 1.0
#: Simulated seconds between two checks of ``Scenario.settled`` in the liveness phase.
SETTLE_POLL = 0.5
# The framework logs every dead letter and failed settle at WARNING; in a simulation those
# are the expected effects of the fault plan, reported through coverage instead.
_QUIET_LOGGERS = ("collaborative_blocks",)


def run_simulation(
    scenario: str | Scenario,
    seed: int,
    faults: FaultPlan | str | None = None,
    *,
    plugins: Sequence[str] = (),
    check_coverage: bool = True,
) -> SimulationResult:
    """Run ``scenario`` once with ``seed`` under ``faults`` (default: the scenario's own).

    Same arguments, same :attr:`SimulationResult.digest`. ``check_coverage=False`` skips the
    coverage gate (a run without faults then passes on its invariants alone).
    """
    if asyncio._get_running_loop() is not None:
        raise SimulationError(
            "run_simulation is synchronous and runs its own event loop; from async code call "
            "it in a thread: await asyncio.to_thread(run_simulation, ...)"
        )
    chosen = get_scenario(scenario, plugins) if isinstance(scenario, str) else scenario
    if faults is None:
        plan = FaultPlan.parse(chosen.default_faults)
    elif isinstance(faults, str):
        plan = FaultPlan.parse(faults)
    else:
        plan = faults
    unknown = sorted({c.node for c in plan.crashes if c.node and c.node not in chosen.nodes})
    if unknown:
        raise FaultPlanError(
            f"the fault plan crashes {', '.join(unknown)}, which scenario {chosen.name!r} does "
            f"not have; its nodes are {', '.join(chosen.nodes)}"
        )
    loop = SimulationLoop(seed)
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    started = time.process_time()
    try:
        outcome = loop.run_until_complete(
            _run(loop, chosen, seed, plan, _plugin_manager(tuple(plugins)))
        )
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        with contextlib.suppress(Exception):
            loop.close()
    cpu = time.process_time() - started
    world, violations, timeline, phase_ends = outcome
    coverage = dict(sorted(world.coverage.items()))
    missing = (
        tuple(name for name in chosen.required_coverage if not coverage.get(name))
        if check_coverage
        else ()
    )
    return SimulationResult(
        scenario=chosen.name,
        seed=seed,
        faults=plan.spec(),
        digest=world.history.digest(),
        history=world.history,
        violations=tuple(violations),
        coverage=coverage,
        missing_coverage=missing,
        timeline=tuple(timeline),
        deliveries=world.deliveries,
        simulated_seconds=world.now(),
        cpu_seconds=cpu,
        phase_ends=phase_ends,
        plugins=tuple(plugins),
    )


_plugin_managers: dict[tuple[str, ...], pluggy.PluginManager] = {}


def _plugin_manager(plugins: tuple[str, ...]) -> pluggy.PluginManager:
    # Built once per set of plugins (loading entry points costs more than a short run); a
    # plugin manager only holds registrations, so runs cannot leak state through it.
    found = _plugin_managers.get(plugins)
    if found is None:
        found = _plugin_managers[plugins] = make_plugin_manager(plugins)
    return found


async def _run(
    loop: SimulationLoop,
    scenario: Scenario,
    seed: int,
    plan: FaultPlan,
    plugin_manager: pluggy.PluginManager,
) -> tuple[World, list[Violation], list[Sample], dict[str, float]]:
    world = World(loop, seed, plan, scenario, plugin_manager)
    timeline: list[Sample] = []
    phase_ends: dict[str, float] = {}
    await scenario.setup(world)
    for node in world.nodes.values():
        await world.boot(node)
    background = [
        world.spawn(_sample(world, timeline), name="sampler"),
        world.spawn(_inject(world), name="fault injector"),
    ]
    # Safety: faults on for safety_seconds; a workload still running then is stopped.
    workload = world.spawn(scenario.workload(world, Phase.SAFETY), name="workload safety")
    done, _ = await asyncio.wait({workload}, timeout=scenario.safety_seconds)
    if done and world.now() < scenario.safety_seconds:
        await world.clock.sleep(scenario.safety_seconds - world.now())
    if not done:
        workload.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await workload
    _raise_simulator_error(workload)
    phase_ends[Phase.SAFETY.value] = world.now()
    # Liveness: nothing new goes wrong; everything must finish in time.
    world.phase = Phase.LIVENESS
    world.faults_active = False
    background[1].cancel()
    await scenario.heal(world)
    deadline = world.now() + scenario.liveness_seconds
    violations: list[Violation] = []
    finishing = world.spawn(scenario.workload(world, Phase.LIVENESS), name="workload liveness")
    await asyncio.wait({finishing}, timeout=scenario.liveness_seconds)
    _raise_simulator_error(finishing)
    settled = False
    while True:
        if finishing.done() and await scenario.settled(world):
            settled = True
            break
        if world.now() >= deadline:
            break
        await world.clock.sleep(min(SETTLE_POLL, deadline - world.now()))
    if not finishing.done():
        finishing.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await finishing
    phase_ends[Phase.LIVENESS.value] = world.now()
    if not settled:
        violations.append(
            Violation(
                "liveness",
                f"not settled {scenario.liveness_seconds:g} simulated seconds after the faults "
                f"healed: {scenario.unsettled(world)}",
            )
        )
    facts = dict(await scenario.final_reads(world))
    # Stop everything, in a fixed order: the simulator's own tasks, then each node's.
    remaining = loop.node_tasks(SIMULATOR)
    for node in world.nodes.values():
        if node.up:
            world._harvest(node.broker)
            node.up = False
            node._broker = None
        remaining.extend(loop.node_tasks(node.name))
    for task in remaining:
        task.cancel()
    if remaining:
        await asyncio.wait(remaining, timeout=1.0)
    world.close_open_operations()
    if world.errors:
        name, error = world.errors[0]
        raise SimulationError(
            f"the simulator task {name!r} raised {type(error).__name__}: {error} (a bug in the "
            "scenario or the simulator, not a finding)"
        ) from error
    facts.setdefault("broker", dict(world.broker_counts()))
    _count_behaviours(world)
    violations.extend(run_checkers(scenario.checkers(), world.history, facts))
    _mark_violations(timeline, violations)
    return world, violations, timeline, phase_ends


def _raise_simulator_error(task: asyncio.Task[Any]) -> None:
    """A workload that raised is a broken scenario, not a finding: say so."""
    if task.done() and not task.cancelled() and task.exception() is not None:
        error = task.exception()
        raise SimulationError(
            f"the scenario's workload raised {type(error).__name__}: {error}; a workload "
            "must record failures as operations (world.operation), not raise"
        ) from error


def _count_behaviours(world: World) -> None:
    """What the faults provoked, read from the brokers' own counters."""
    totals = world.broker_counts()
    behaviours = {
        "retry": totals["redeliveries"],
        "dead_letter": totals["dead_letters"],
        "deduplication": totals["receipt:duplicate"],
        "handler_failure": totals["failed"],
    }
    for name, count in behaviours.items():
        if count:
            world.coverage[name] += count


async def _sample(world: World, timeline: list[Sample]) -> None:
    while True:
        totals = world.broker_counts()
        coverage = world.coverage
        timeline.append(
            Sample(
                time=world.now(),
                in_flight=world.network.in_flight() + world.delayed,
                delivered=world.deliveries,
                redelivered=coverage["redelivery"] + totals["redeliveries"],
                dead_lettered=totals["dead_letters"],
                dropped=coverage["drop"] + coverage["partition_drop"],
                duplicated=coverage["duplicate"],
                violations=0,
                crashed_nodes=world.crashed,
                partitioned=world.partition is not None,
            )
        )
        await world.clock.sleep(SAMPLE_INTERVAL)


def _mark_violations(timeline: list[Sample], violations: list[Violation]) -> None:
    """Each sample counts the violations whose witness had happened by its time."""
    if not violations or not timeline:
        return
    times = sorted(
        max((op.time for op in v.witness), default=timeline[-1].time) for v in violations
    )
    for index, sample in enumerate(timeline):
        seen = sum(1 for t in times if t <= sample.time)
        if seen:
            timeline[index] = Sample(
                time=sample.time,
                in_flight=sample.in_flight,
                delivered=sample.delivered,
                redelivered=sample.redelivered,
                dead_lettered=sample.dead_lettered,
                dropped=sample.dropped,
                duplicated=sample.duplicated,
                violations=seen,
                crashed_nodes=sample.crashed_nodes,
                partitioned=sample.partitioned,
            )


async def _inject(world: World) -> None:
    """Crashes and partitions on their schedules and rates, during the safety phase."""
    plan = world.plan
    events: list[tuple[float, int, str, str | None]] = []
    for order, partition in enumerate(plan.partitions):
        events.append((partition.start, order, "partition", None))
        events.append((partition.end, order, "heal", None))
    for order, crash in enumerate(plan.crashes):
        events.append((crash.time, order, "crash", crash.node))
    if plan.crash_rate:
        tick = 1.0
        steps = int(world.scenario.safety_seconds / tick)
        rng = world.rng("crash")
        for step in range(1, steps + 1):
            for name in world.nodes:
                if rng.random() < plan.crash_rate * tick:
                    events.append((step * tick, 0, "crash", name))
    events.sort(key=lambda e: (e[0], e[1], e[2], e[3] or ""))
    restart_rng = world.rng("restart")
    pick = world.rng("crash_node")
    names = list(world.nodes)
    for when, _, kind, target in events:
        if when > world.now():
            await world.clock.sleep(when - world.now())
        if kind == "partition":
            world.start_partition()
        elif kind == "heal":
            world.heal_partition()
        else:
            node = world.node(target) if target is not None else world.node(pick.choice(names))
            if node.up:
                await world.crash(node)
                world.spawn(
                    _restart_later(world, node, restart_rng.uniform(*RESTART_AFTER)),
                    name=f"restart {node.name}",
                )


async def _restart_later(world: World, node: Node, delay: float) -> None:
    await world.clock.sleep(delay)
    if world.faults_active:
        await world.restart(node)
