"""``replicas``: the real-time sync engine under concurrent writes, a partition and crashes.

One node runs a :class:`~collaborative_blocks.core.sync.engine.RealTimeSyncEngine` with five
systems: ``east`` and ``west`` take writes concurrently (to the same keys); ``hub-1`` and
``hub-2`` both depend on ``east`` and ``west``, so they receive every write, in whatever
order the faulty network delivers them; ``archive`` depends on ``hub-1`` (a forwarding hop).
Keys ``lww.*`` use the ``last_write_wins`` resolver, ``vc.*`` the ``vector_clock`` one. A
partition splits the systems (deliveries across it wait for the heal); a crash of the node
loses the engine, and the restarted engine rebuilds every replica from the change log.
Invariants:

- ``converged``: once settled, every system that receives both writers holds the same value
  of every key, and the engine finds no inconsistency;
- ``no_invented_value``: every value a replica holds was written by some client, by a write
  that did not definitely fail (the store refused it: it is in no log, so in no replica);
- ``matches_log``: every replica is exactly the fold of the logged changes it holds, holds
  nothing the log lacks, and the engine knows every logged conflict
  (:meth:`RealTimeSyncEngine.audit`): the views agree with the one log.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from collaborative_blocks.core.runtime import Runtime
from collaborative_blocks.core.sync.engine import RealTimeSyncEngine
from collaborative_blocks.errors import StoreUnavailableError
from collaborative_blocks.simulations.checkers import Checker, FunctionChecker, reads
from collaborative_blocks.simulations.results import History, Operation, OpType, Violation
from collaborative_blocks.simulations.scenarios.base import Scenario
from collaborative_blocks.simulations.world import Node, NodeDownError, Phase, World

__all__ = ["ReplicasScenario"]

WRITERS = ("east", "west")
#: system -> its dependencies, in registration (topological) order.
TOPOLOGY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("east", ()),
    ("west", ()),
    ("hub-1", ("east", "west")),
    ("hub-2", ("east", "west")),
    ("archive", ("hub-1",)),
)
#: The systems that receive every writer's changes: they must agree.
CONVERGING = ("hub-1", "hub-2", "archive")
KEYS = ("lww.a", "lww.b", "vc.a", "vc.b")


class ReplicasScenario(Scenario):
    name = "replicas"
    description = (
        "sync engine replicas under concurrent writes on two systems, a partition that heals "
        "and crashes: converged afterwards (last_write_wins and vector_clock keys)"
    )
    default_faults = (
        "drop=0.05,duplicate=0.05,reorder=0.2,delay=0.01-0.5,partition=5s@3s,crash=0.02,"
        "store_fail=0.02"
    )
    invariants = ("converged", "no_invented_value", "matches_log", "liveness")
    required_coverage = ("partition", "redelivery")
    nodes = ("sync",)
    systems = tuple(system for system, _ in TOPOLOGY)
    safety_seconds = 15.0
    liveness_seconds = 120.0
    writes_per_writer = 60
    interval = 0.2

    def consumer_system(self, group: str, node: str) -> str:
        # The engine's groups are "cb-sync:<engine>:<system>".
        return group.rsplit(":", 1)[-1] if group.startswith("cb-sync:") else node

    async def start_node(self, world: World, node: Node) -> None:
        runtime = Runtime(
            world.settings,
            clock=node.clock,
            rng=node.rng,
            store=node.store,
            plugin_manager=world.plugin_manager,
        )
        resolvers = world.resolvers(node)  # a plugin may replace them (cb_chaos_component)
        resolvers.assign("lww.*", "last_write_wins")
        resolvers.assign("vc.*", "vector_clock")
        engine = RealTimeSyncEngine(
            runtime, store=node.store, broker=node.broker, resolvers=resolvers, clock=node.clock
        )
        for system, dependencies in TOPOLOGY:
            # Registration reads the log; the store may refuse a read now and then. A failed
            # registration registers nothing: try it again, as a supervisor would.
            await node.until_the_store_answers(
                functools.partial(engine.register_system, system, dependencies)
            )
        node.state["engine"] = engine

    @staticmethod
    def _engine(world: World) -> RealTimeSyncEngine:
        return world.node("sync").running("engine", RealTimeSyncEngine)

    async def workload(self, world: World, phase: Phase) -> None:
        if phase is not Phase.SAFETY:
            return
        clients = [world.spawn(self._writer(world, system)) for system in WRITERS]
        for client in clients:
            await client

    async def _writer(self, world: World, system: str) -> None:
        rng = world.rng(f"writer:{system}")
        node = world.node("sync")
        for i in range(self.writes_per_writer):
            await world.clock.sleep(rng.uniform(0.0, 2 * self.interval))
            key = rng.choice(KEYS)
            value = f"{system}-{i}"

            async def write(key: str = key, value: str = value) -> Any:
                engine = self._engine(world)
                record = await node.call(engine.propagate_change(system, {key: value}))
                return {"system": system, "key": key, "value": value, "change": record.change_id}

            await world.operation(
                f"client-{system}",
                "write",
                {"system": system, "key": key, "value": value},
                write,
                definite_failures=(NodeDownError, StoreUnavailableError),
            )

    async def settled(self, world: World) -> bool:
        if world.network.in_flight() or world.delayed:
            return False
        try:
            engine = self._engine(world)
        except NodeDownError:
            return False
        return all(engine.inconsistency(key) is None for key in KEYS)

    def unsettled(self, world: World) -> str:
        try:
            engine = self._engine(world)
        except NodeDownError:
            return "the sync node is down"
        behind = {key: found.behind for key in KEYS if (found := engine.inconsistency(key))}
        return (
            f"{world.network.in_flight()} messages in flight; replicas behind per key: "
            f"{behind or 'none'}"
        )

    async def final_reads(self, world: World) -> dict[str, Any]:
        try:
            engine = self._engine(world)
        except NodeDownError:
            value: dict[str, Any] = {"values": {}, "consistent": {}}
        else:
            value = {
                "values": {
                    key: {system: engine.value(system, key) for system in self.systems}
                    for key in KEYS
                },
                "consistent": {key: engine.inconsistency(key) is None for key in KEYS},
                # Read after the faults healed: the store answers.
                "audit": await engine.audit(),
            }
        world.record("checker", OpType.OK, "read", value)
        return value

    def checkers(self) -> Sequence[Checker]:
        return (
            FunctionChecker("converged", check_converged),
            FunctionChecker("no_invented_value", check_no_invented_value),
            FunctionChecker("matches_log", check_matches_log),
        )


def _writes(history: History, key: str) -> list[Operation]:
    return [
        op
        for op in history
        if op.f == "write"
        and op.type is not OpType.INVOKE
        and isinstance(op.value, Mapping)
        and op.value.get("key") == key
    ]


def _final_read(history: History) -> Operation | None:
    """The checker's read of every replica at the end of the run (None if there is none)."""
    found = reads(history)
    return found[-1] if found else None


def check_converged(history: History, facts: Mapping[str, Any]) -> list[Violation]:
    read = _final_read(history)
    if read is None:
        return [Violation("converged", "no final read was recorded")]
    state: Any = read.value
    violations = []
    for key, values in sorted(state["values"].items()):
        seen = {system: values.get(system) for system in CONVERGING}
        if len({repr(v) for v in seen.values()}) > 1 or not state["consistent"].get(key, False):
            writes = [op for op in _writes(history, key) if op.type is OpType.OK]
            violations.append(
                Violation(
                    "converged",
                    f"replicas of {key!r} disagree after settling: {seen}",
                    (*writes[-2:], read),
                )
            )
    return violations


def check_no_invented_value(history: History, facts: Mapping[str, Any]) -> list[Violation]:
    read = _final_read(history)
    if read is None:
        return []
    state: Any = read.value
    violations = []
    written = {
        op.value.get("value")
        for op in history
        if op.f == "write" and op.type is OpType.INVOKE and isinstance(op.value, Mapping)
    }
    # Every client writes a value of its own, so a value identifies its write.
    failed = {
        op.value.get("value"): op
        for op in history
        if op.f == "write" and op.type is OpType.FAIL and isinstance(op.value, Mapping)
    }
    for key, values in sorted(state["values"].items()):
        for system, value in sorted(values.items()):
            # An unresolved vector-clock key holds its concurrent siblings as a list.
            for held in value if isinstance(value, list) else [value]:
                if held is None:
                    continue
                if held not in written:
                    violations.append(
                        Violation(
                            "no_invented_value",
                            f"{system} holds {value!r} for {key!r}, which no client wrote",
                            (read,),
                        )
                    )
                elif held in failed:
                    violations.append(
                        Violation(
                            "no_invented_value",
                            f"{system} holds {held!r} for {key!r}, whose write failed "
                            f"({failed[held].error})",
                            (failed[held], read),
                        )
                    )
    return violations


def check_matches_log(history: History, facts: Mapping[str, Any]) -> list[Violation]:
    read = _final_read(history)
    if read is None:
        return []
    state: Any = read.value
    differences = state.get("audit") or []
    if not differences:
        return []
    shown = "; ".join(differences[:5])
    more = f" (and {len(differences) - 5} more)" if len(differences) > 5 else ""
    message = f"replicas differ from the change log: {shown}{more}"
    return [Violation("matches_log", message, (read,))]
