"""The :class:`Scenario` base class every chaos scenario derives from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from collaborative_blocks.simulations.checkers import Checker

if TYPE_CHECKING:
    from collaborative_blocks.simulations.world import Node, Phase, World

__all__ = ["Scenario"]


class Scenario:
    """A workload on a simulated world, the invariants it must keep, and how to check them.

    Class attributes describe it: ``name``, ``description``, ``default_faults`` (a
    :class:`~collaborative_blocks.simulations.faults.FaultPlan` spec), ``invariants`` (the
    names of its checkers), ``required_coverage`` (behaviours a run must exercise, or it
    fails), ``nodes`` (the simulated systems), ``systems`` (the names partitions split,
    default: the nodes), ``safety_seconds`` / ``liveness_seconds`` (phase lengths in
    simulated seconds), ``broker_options`` (keyword arguments for every node's broker).

    The runner calls, in order: :meth:`setup` once, :meth:`start_node` for every node (and
    again after each restart), :meth:`workload` for the safety phase (faults on; cancelled
    when the phase ends), :meth:`workload` for the liveness phase (faults healed), then
    :meth:`settled` until it is true (or the liveness phase runs out: a violation),
    :meth:`final_reads`, and finally every checker of :meth:`checkers` over the history.

    Coverage: the world counts the faults it injects and the broker behaviours they provoke
    (``redelivery``, ``retry``, ``deduplication``, ``dead_letter``, ...). Count your own
    components' behaviours with ``world.exercised("compensation")`` (read from what the
    component reports, e.g. a workflow run's compensated steps or a breaker's transitions)
    and list the ones a run must show in ``required_coverage``.

    A scenario object may be reused across runs: keep per-run state on the world
    (``world.scenario_state``, or ``node.state`` for what a crash must lose), never on the
    scenario itself.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    default_faults: ClassVar[str] = "none"
    invariants: ClassVar[tuple[str, ...]] = ()
    required_coverage: ClassVar[tuple[str, ...]] = ()
    nodes: ClassVar[tuple[str, ...]] = ("node-a", "node-b", "node-c")
    systems: ClassVar[tuple[str, ...]] = ()
    safety_seconds: ClassVar[float] = 20.0
    liveness_seconds: ClassVar[float] = 120.0
    broker_options: ClassVar[Mapping[str, Any]] = {}

    async def setup(self, world: World) -> None:
        """Before any node starts: reset per-run state, seed the store (accounts, ...)."""

    async def start_node(self, world: World, node: Node) -> None:
        """Start ``node``'s components (subscribe handlers on ``node.broker``, build
        engines from the store). Called at boot and after every restart, as a task of the
        node, so what it starts dies with the node."""

    async def workload(self, world: World, phase: Phase) -> None:
        """Drive clients (record each operation with ``world.operation``)."""

    async def settled(self, world: World) -> bool:
        """Liveness: whether everything the workload started has finished."""
        return True

    def unsettled(self, world: World) -> str:
        """What is still unfinished (for the liveness violation's message)."""
        return "the scenario did not settle"

    async def final_reads(self, world: World) -> dict[str, Any]:
        """Read the outcome from the store; record it as ``read`` operations and return it
        as the checkers' facts."""
        return {}

    def checkers(self) -> Sequence[Checker]:
        """The invariants' checkers."""
        return ()

    def consumer_system(self, group: str, node: str) -> str:
        """Which system (for partitions) consumes with ``group`` on ``node``."""
        return node

    async def heal(self, world: World) -> None:
        """Start of the liveness phase: heal the partition, restart crashed nodes.

        Override to model a system that never comes back (a liveness violation)."""
        world.heal_partition()
        for node in world.nodes.values():
            if not node.up:
                await world.restart(node)
