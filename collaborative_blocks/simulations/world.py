"""The simulated world: named systems (nodes) sharing one durable store and one faulty network.

- The **durable store** is one :class:`~collaborative_blocks.stores.memory.MemoryEventStore`
  (the "disk"): it survives every crash. Each node reaches it through a :class:`FaultyStore`
  (write failures, lost write acknowledgements, slow writes, read failures).
- The **network** is one :class:`~collaborative_blocks.plugins.transports.memory.MemoryTransport`
  (the broker server, which does not crash). Each node reaches it through a
  :class:`FaultyTransport`: deliveries are dropped (redelivered after the ack timeout),
  duplicated, delayed and reordered, and cut between the two halves of a partition; the
  node's connection to it fails now and then (``publish_fail``, ``fetch_fail``), as when
  Redis or NATS is briefly unreachable.
- A **node** runs the real framework: its own :class:`MessageBroker` on its own (skewed)
  clock and seeded RNG, plus whatever the scenario starts on it in ``start_node``. A crash
  cancels every task the node created and drops its in-memory state; a restart builds a new
  broker and calls ``start_node`` again, which resubscribes and rebuilds from the store.

Every injected fault and every behaviour it provokes is counted in :attr:`World.coverage`.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import enum
import math
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

from collaborative_blocks.core.messaging.broker import (
    ContextHandler,
    MessageBroker,
    MessageContext,
    RetryPolicy,
)
from collaborative_blocks.core.messaging.envelope import JSONValue, Message
from collaborative_blocks.core.messaging.transport import Delivery, Subscription
from collaborative_blocks.core.plugins import make_plugin_manager
from collaborative_blocks.core.settings import Settings, load_settings
from collaborative_blocks.core.sync.resolvers import ResolverRegistry
from collaborative_blocks.errors import (
    SimulationError,
    StoreUnavailableError,
    TransportUnavailableError,
)
from collaborative_blocks.plugins.transports.memory import MemoryTransport
from collaborative_blocks.simulations.faults import FaultPlan
from collaborative_blocks.simulations.loop import CURRENT_NODE, SimClock, SimulationLoop
from collaborative_blocks.simulations.results import History, Operation, OpType
from collaborative_blocks.stores.base import (
    AppendRequest,
    EventStore,
    StoredEvent,
    Tracking,
)
from collaborative_blocks.stores.delegating import DelegatingStore
from collaborative_blocks.stores.memory import MemoryEventStore

if TYPE_CHECKING:
    from collaborative_blocks.simulations.scenarios.base import Scenario

__all__ = [
    "FaultyStore",
    "FaultyTransport",
    "Node",
    "NodeCrashedError",
    "NodeDownError",
    "Phase",
    "SimulatedHandlerError",
    "World",
]

T = TypeVar("T")

#: The wall-clock time at which every simulated run starts (2023-11-14T22:13:20Z).
START_TIME = 1_700_000_000.0
#: How long a crashed node stays down before it restarts (uniform, simulated seconds).
RESTART_AFTER = (1.0, 5.0)
#: The network's clock tick: delayed messages arrive on multiples of it.
NETWORK_TICK = 0.05
#: How far ``reorder`` holds a message back (uniform, simulated seconds).
REORDER_WINDOW = 1.0
#: The owner of the simulator's own tasks (fault injection, network delays, clients).
SIMULATOR = "~simulator"
#: How long a hanging handler hangs: far past any handler timeout.
HANG_SECONDS = 3600.0


class Phase(enum.StrEnum):
    """The phases of a run: faults on, then faults healed."""

    SAFETY = "safety"
    LIVENESS = "liveness"


class NodeDownError(SimulationError):
    """The node a client wanted to use is crashed (the operation certainly did not run)."""


class NodeCrashedError(SimulationError):
    """The node crashed while running an operation (its outcome is unknown)."""


class SimulatedHandlerError(SimulationError):
    """Raised by a handler because the fault plan said so (``handler_error``)."""


def _settings() -> Settings:
    # Never the process environment: a run must not depend on MAX_RETRY_ATTEMPTS & co.
    return load_settings(environ={})


class Node:
    """One simulated system: a name, a clock, an RNG, a broker, and scenario state."""

    def __init__(self, world: World, name: str, skew: float) -> None:
        self.world = world
        self.name = name
        self.incarnation = 0
        self.up = False
        self.clock = SimClock(world.loop, start=START_TIME, skew=skew)
        self.rng = world.rng(f"node:{name}:0")
        self.store = FaultyStore(world, self)
        self.transport = FaultyTransport(world, self)
        self._broker: MessageBroker | None = None
        #: In-memory state the scenario keeps for this node; dropped by a crash.
        self.state: dict[str, Any] = {}
        context = contextvars.copy_context()
        context.run(CURRENT_NODE.set, name)
        self.context = context

    @property
    def broker(self) -> MessageBroker:
        if self._broker is None or not self.up:
            raise NodeDownError(f"node {self.name!r} is down (crashed); it restarts later")
        return self._broker

    def running(self, key: str, kind: type[T]) -> T:
        """The component the scenario keeps in :attr:`state` under ``key`` (an engine, say),
        or :class:`NodeDownError` while the node is down or still starting it."""
        component = self.state.get(key)
        if not self.up or not isinstance(component, kind):
            raise NodeDownError(f"node {self.name!r} is down (or still starting)")
        return component

    async def until_the_store_answers(
        self, operation: Callable[[], Awaitable[T]], pause: float = 0.2
    ) -> T:
        """Run ``operation`` again, ``pause`` seconds of this node's clock apart, while it
        fails with :class:`StoreUnavailableError`: what a supervisor does at start-up."""
        while True:
            try:
                return await operation()
            except StoreUnavailableError:
                await self.clock.sleep(pause)

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Run ``coro`` as a task of this node (a crash cancels it)."""
        return self.world.loop.create_task(coro, name=name, context=self.context.copy())

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this node and wait for it; :class:`NodeCrashedError` when the node
        crashes meanwhile (the caller is a client outside the node: it survives)."""
        if not self.up:
            coro.close()
            raise NodeDownError(f"node {self.name!r} is down (crashed); it restarts later")
        task = self.spawn(coro)
        try:
            return await task
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if task.cancelled() and (caller is None or not caller.cancelling()):
                # The node's task was cancelled by a crash, not the caller by its own.
                raise NodeCrashedError(f"node {self.name!r} crashed during the operation") from None
            raise

    def __repr__(self) -> str:
        return f"Node({self.name!r}, up={self.up}, incarnation={self.incarnation})"


class World:
    """Nodes, the durable store, the network, the fault plan, the history and coverage."""

    def __init__(
        self,
        loop: SimulationLoop,
        seed: int,
        plan: FaultPlan,
        scenario: Scenario,
        plugin_manager: pluggy.PluginManager | None = None,
    ) -> None:
        self.loop = loop
        #: The run's plugins (built-ins, entry points, ``plugins=``): for engines the
        #: scenario builds (conflict resolvers, ...).
        self.plugin_manager = (
            plugin_manager
            if plugin_manager is not None
            else make_plugin_manager(entry_points=False)
        )
        self.seed = seed
        self.plan = plan
        self.scenario = scenario
        self.history = History()
        self.coverage: Counter[str] = Counter()
        self.phase = Phase.SAFETY
        self.faults_active = not plan.is_empty
        self.clock = SimClock(loop, start=START_TIME)
        #: Components a plugin replaced (``cb_chaos_component``): told about crashes.
        self._replaced: list[object] = []
        self.durable: EventStore = self.component(
            "store", MemoryEventStore("memory://simulated-disk")
        )
        self.network: MemoryTransport = self.component(
            "network", MemoryTransport(clock=self.clock, url="memory://simulated-network")
        )
        self.settings = _settings()
        self.deliveries = 0
        self.delayed = 0
        self.partition: dict[str, int] | None = None
        self.broker_totals: Counter[str] = Counter()
        self._rngs: dict[str, random.Random] = {}
        network_context = contextvars.copy_context()
        network_context.run(CURRENT_NODE.set, SIMULATOR)
        self._network_context = network_context
        skew_rng = self.rng("skew")
        self.nodes: dict[str, Node] = {}
        for name in scenario.nodes:
            skew = skew_rng.uniform(-plan.skew, plan.skew) if plan.skew else 0.0
            self.nodes[name] = Node(self, name, skew)
        if plan.skew:
            self.coverage["skew"] += 1
        self._open: dict[int, Operation] = {}
        self._busy: dict[str, int] = {}  # process -> its operation in flight
        #: (task name, error) of simulator tasks that raised.
        self.errors: list[tuple[str, BaseException]] = []
        self._arrivals: dict[float, list[tuple[str, Message | bytes]]] = {}
        #: Per-run state a scenario keeps (set it in ``Scenario.setup``).
        self.scenario_state: dict[str, Any] = {}

    # -- seeded sources ----------------------------------------------------------------------

    def rng(self, purpose: str) -> random.Random:
        """The RNG for one purpose (a fault kind, a node, the workload), derived from the seed.

        Separate streams mean switching one fault off does not change the others' choices,
        which is what lets a failing plan shrink.
        """
        found = self._rngs.get(purpose)
        if found is None:
            # Seeding with a str hashes it with SHA-512: the same in every process,
            # whatever PYTHONHASHSEED says.
            found = self._rngs[purpose] = random.Random(f"cb-sim:{self.seed}:{purpose}")
        return found

    def now(self) -> float:
        """Simulated seconds since the run started."""
        return self.loop._now

    # -- components ----------------------------------------------------------------------------

    def component(self, kind: str, component: T, node: Node | None = None) -> T:
        """``component`` as the run's plugins want it (``cb_chaos_component``).

        The world builds its durable store (``"store"``) and its network (``"network"``)
        through this; scenarios build theirs too: the sync engine's resolver table
        (``"resolvers"``, :meth:`resolvers`), the workflow engine (``"workflow_engine"``).
        Each plugin implementing the hook gets the component the previous one returned and
        returns a replacement (usually a wrapper) or ``None`` to keep it. A replacement with
        a ``node_crashed(node_name)`` method is told about every crash (what a crash does to
        the component's memory is up to it). Without such plugins this returns
        ``component`` itself, at the cost of one attribute lookup.
        """
        impls = self.plugin_manager.hook.cb_chaos_component.get_hookimpls()
        if not impls:
            return component
        current: Any = component
        arguments = {"kind": kind, "world": self, "node": node}
        for impl in impls:
            replaced = impl.function(
                **{
                    name: current if name == "component" else arguments[name]
                    for name in impl.argnames
                }
            )
            if replaced is not None:
                current = replaced
        if current is not component and callable(getattr(current, "node_crashed", None)):
            self._replaced.append(current)
        found: T = current
        return found

    def resolvers(self, node: Node | None = None) -> ResolverRegistry:
        """The conflict resolvers of the run's plugins (``cb_conflict_resolvers``), through
        :meth:`component` as ``"resolvers"``: what a scenario's sync engine should use."""
        return self.component(
            "resolvers", ResolverRegistry.from_plugin_manager(self.plugin_manager), node
        )

    # -- history -------------------------------------------------------------------------------

    def invoke(self, process: str, f: str, value: JSONValue = None) -> Operation:
        """Record the start of a client operation.

        A process is one single-threaded client (as in Jepsen): it has at most one
        operation in flight, which is what lets checkers pair each completion with its
        invocation. Concurrent clients are separate processes (``client-1``, ``client-2``).
        """
        if process in self._busy:
            raise SimulationError(
                f"process {process!r} already has an operation in flight "
                f"(#{self._busy[process]}); give each concurrent client its own process name"
            )
        op = self.history.append(self.now(), process, OpType.INVOKE, f, value)
        self._open[op.index] = op
        self._busy[process] = op.index
        return op

    def complete(
        self,
        op: Operation,
        type: OpType,
        value: JSONValue = None,
        error: str | None = None,
    ) -> Operation:
        """Record how the operation ``op`` (an invocation) ended."""
        if self._open.pop(op.index, None) is None:
            raise SimulationError(f"operation #{op.index} was already completed")
        self._busy.pop(op.process, None)
        return self.history.append(self.now(), op.process, type, op.f, value, error)

    def record(
        self, process: str, type: OpType, f: str, value: JSONValue = None, error: str | None = None
    ) -> Operation:
        """Record an operation without an invocation (an observation, e.g. a final read)."""
        return self.history.append(self.now(), process, type, f, value, error)

    async def operation(
        self,
        process: str,
        f: str,
        value: JSONValue,
        action: Callable[[], Awaitable[JSONValue]],
        *,
        definite_failures: tuple[type[BaseException], ...] = (NodeDownError,),
    ) -> Operation:
        """Run ``action`` as one recorded operation: INVOKE, then OK with its result, FAIL
        for ``definite_failures`` (it certainly did not happen), INFO for anything else
        (a timeout, a crash: it may have happened)."""
        op = self.invoke(process, f, value)
        try:
            result = await action()
        except asyncio.CancelledError:
            self.complete(op, OpType.INFO, value, "cancelled (crash or end of phase)")
            raise
        except definite_failures as error:
            return self.complete(op, OpType.FAIL, value, f"{type(error).__name__}: {error}")
        except Exception as error:
            return self.complete(op, OpType.INFO, value, f"{type(error).__name__}: {error}")
        return self.complete(op, OpType.OK, result)

    def close_open_operations(self) -> None:
        """Operations never completed (their client was stopped) end as INFO."""
        for index in sorted(self._open):
            op = self._open[index]
            self.complete(op, OpType.INFO, op.value, "never completed")

    # -- nodes ---------------------------------------------------------------------------------

    def node(self, name: str) -> Node:
        found = self.nodes.get(name)
        if found is None:
            raise SimulationError(f"no node {name!r} (nodes: {', '.join(self.nodes)})")
        return found

    def new_broker(self, node: Node, **options: Any) -> MessageBroker:
        """A broker for ``node`` on the simulated network and store (called on every boot)."""
        defaults: dict[str, Any] = {
            "handler_timeout": 2.0,
            "ack_timeout": 10.0,
            "retry": RetryPolicy(max_retries=3, base_delay=0.2, max_delay=2.0),
            "max_in_flight": 64,
            "partitions": 2,
        }
        defaults.update(self.scenario.broker_options)
        defaults.update(options)
        return MessageBroker(
            transport=node.transport,
            store=node.store,
            clock=node.clock,
            rng=node.rng,
            settings=self.settings,
            tracing=False,
            **defaults,
        )

    async def boot(self, node: Node) -> None:
        """Start ``node`` (again): a new broker and RNG, then the scenario's ``start_node``."""
        node.incarnation += 1
        node.rng = self.rng(f"node:{node.name}:{node.incarnation}")
        node.state = {}
        node._broker = self.new_broker(node)
        node.up = True
        await node.spawn(self.scenario.start_node(self, node), name=f"boot {node.name}")

    async def crash(self, node: Node) -> None:
        """Kill ``node``: every task it created is cancelled, its memory is gone; the store
        and the network keep what they had (unacknowledged deliveries are redelivered after
        their ack timeout)."""
        if not node.up:
            return
        node.up = False
        self.coverage["crash"] += 1
        broker = node._broker
        node._broker = None
        if broker is not None:
            self._harvest(broker)
        tasks = self.loop.node_tasks(node.name)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        node.state = {}
        for component in self._replaced:
            component.node_crashed(node.name)  # type: ignore[attr-defined]

    async def restart(self, node: Node) -> None:
        if node.up:
            return
        self.coverage["restart"] += 1
        await self.boot(node)

    def _harvest(self, broker: MessageBroker) -> None:
        counts = broker.telemetry.counts
        for name in ("processed", "failed", "redeliveries", "dead_letters"):
            self.broker_totals[name] += sum(counts[name].values())
        for status, count in broker.receipt_counts.items():
            self.broker_totals[f"receipt:{status}"] += count

    def broker_counts(self) -> Counter[str]:
        """Totals over every broker incarnation so far (crashed ones included)."""
        totals = Counter(self.broker_totals)
        for node in self.nodes.values():
            broker = node._broker
            if broker is not None:
                counts = broker.telemetry.counts
                for name in ("processed", "failed", "redeliveries", "dead_letters"):
                    totals[name] += sum(counts[name].values())
                for status, count in broker.receipt_counts.items():
                    totals[f"receipt:{status}"] += count
        return totals

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Run ``coro`` as a task of the simulator itself (no node: a crash never stops it).

        If it raises, the run fails with that error (see :attr:`errors`): a simulator task
        that dies quietly would make a run look green."""
        task = self.loop.create_task(coro, name=name, context=self._network_context.copy())
        task.add_done_callback(self._check_task)
        return task

    def _check_task(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.errors.append((task.get_name(), task.exception()))  # type: ignore[arg-type]

    def exercised(self, behaviour: str, count: int = 1) -> None:
        """Count a behaviour the faults provoked (``"compensation"``, ``"breaker_open"``,
        ...) toward coverage; read it from the component that did it, do not guess."""
        self.coverage[behaviour] += count

    # -- faults --------------------------------------------------------------------------------

    def chance(self, kind: str, probability: float) -> bool:
        """Whether a fault of ``kind`` happens now (counted in coverage when it does)."""
        if not probability or not self.faults_active:
            return False
        if self.rng(kind).random() < probability:
            self.coverage[kind] += 1
            return True
        return False

    def cut(self, source: str | None, target: str | None) -> bool:
        """Whether a partition separates the systems ``source`` and ``target`` now."""
        sides = self.partition
        if sides is None or source is None or target is None:
            return False
        a, b = sides.get(source), sides.get(target)
        return a is not None and b is not None and a != b

    def start_partition(self) -> None:
        systems = list(self.scenario.systems or self.scenario.nodes)
        self.rng("partition").shuffle(systems)
        half = max(1, len(systems) // 2)
        self.partition = {s: (0 if i < half else 1) for i, s in enumerate(systems)}
        self.coverage["partition"] += 1

    def heal_partition(self) -> None:
        if self.partition is not None:
            self.partition = None
            self.coverage["heal"] += 1

    def chaotic(self, node: Node, handler: ContextHandler) -> ContextHandler:
        """Wrap a scenario handler so it raises (``handler_error``) or hangs past the
        broker's handler timeout (``handler_hang``) as often as the plan says."""
        plan = self.plan

        async def handle(message: Message, ctx: MessageContext) -> object:
            if self.chance("handler_error", plan.handler_error):
                raise SimulatedHandlerError(f"injected failure handling {message.name}")
            if self.chance("handler_hang", plan.handler_hang):
                await node.clock.sleep(HANG_SECONDS)
            return await handler(message, ctx)

        return handle

    def deliver_later(self, delay: float, subject: str, message: Message | bytes) -> None:
        """Hand ``message`` to the network's ``subject`` after ``delay`` simulated seconds
        (a timer, not a task: this runs for most messages of a run with delays)."""
        self.delayed += 1
        # Arrivals land on the network's tick (NETWORK_TICK): messages due in the same tick
        # arrive together, in the order they were sent, and consumers fetch them as a batch
        # (one wake-up per tick instead of one per message).
        due = math.ceil((self.loop._now + delay) / NETWORK_TICK) * NETWORK_TICK
        batch = self._arrivals.get(due)
        if batch is None:
            batch = self._arrivals[due] = []
            self.loop.call_at(due, self._arrive, due)
        batch.append((subject, message))

    def _arrive(self, due: float) -> None:
        for subject, message in self._arrivals.pop(due):
            self._arrive_one(subject, message)

    def _arrive_one(self, subject: str, message: Message | bytes) -> None:
        if self.network.publish_nowait(subject, message):
            self.delayed -= 1
            return

        async def wait_for_room() -> None:
            try:
                await self.network.publish(subject, message)
            finally:
                self.delayed -= 1

        self.spawn(wait_for_room(), name="network backpressure")

    @property
    def crashed(self) -> int:
        return sum(1 for node in self.nodes.values() if not node.up)


class FaultyTransport:
    """A node's view of the network: the shared memory transport, with the plan's faults.

    The network server itself never crashes, but the node's connection to it does fail
    for a moment: with ``publish_fail`` a publish raises :class:`TransportUnavailableError`
    before the message enters the network (nothing is sent, as when Redis or NATS refuses
    the connection), and with ``fetch_fail`` a consumer's fetch raises it before anything
    is taken from the network (nothing is delivered, nothing changes in the group).
    """

    def __init__(self, world: World, node: Node) -> None:
        self._world = world
        self._node = node
        self._inner = world.network
        # The network is one server all nodes share, and it never crashes: like Redis or
        # NATS, it keeps messages for targets served by other processes and redelivers a
        # dead consumer's deliveries to the next one.
        # (survives_consumer_crash stays False only because the broker then acknowledges
        # inline instead of in a background task: an in-memory ack has no round trip.)
        self.capabilities = dataclasses.replace(self._inner.capabilities, durable=True)
        self.url = self._inner.url

    async def publish(self, subject: str, message: Message | bytes) -> None:
        world = self._world
        if world.faults_active:
            plan = world.plan
            if world.chance("publish_fail", plan.publish_fail):
                raise TransportUnavailableError(
                    f"simulated publish failure on {self._node.name!r} to {subject!r} "
                    "(fault plan: publish_fail)"
                )
            delay = 0.0
            low, high = plan.delay
            if high:
                delay = world.rng("delay").uniform(low, high)
                world.coverage["delay"] += 1
            if world.chance("reorder", plan.reorder):
                delay += world.rng("reorder").uniform(0.0, REORDER_WINDOW)
            if delay > 0:
                # In the network now: the sender's crash no longer affects it.
                world.deliver_later(delay, subject, message)
                return
        await self._inner.publish(subject, message)

    async def subscribe(
        self,
        subject: str,
        *,
        group: str,
        consumer: str,
        ack_timeout: float = 30.0,
        prefetch: int = 100,
    ) -> Subscription:
        inner = await self._inner.subscribe(
            subject, group=group, consumer=consumer, ack_timeout=ack_timeout, prefetch=prefetch
        )
        system = self._world.scenario.consumer_system(group, self._node.name)
        return _FaultySubscription(self._world, inner, system, self._node.name)

    async def close(self) -> None:
        # The network belongs to the world; a node closing its broker only leaves it.
        return None


class _FaultySubscription:
    __slots__ = ("_inner", "_node", "_system", "_world")

    def __init__(self, world: World, inner: Subscription, system: str, node: str) -> None:
        self._world = world
        self._inner = inner
        self._system = system
        self._node = node

    async def fetch(self, max_messages: int) -> Sequence[Delivery]:
        world = self._world
        if world.chance("fetch_fail", world.plan.fetch_fail):
            # Before the inner fetch: nothing is taken from the group, nothing is lost.
            raise TransportUnavailableError(
                f"simulated fetch failure on {self._node!r} for {self._system!r} "
                "(fault plan: fetch_fail)"
            )
        while True:
            deliveries = await self._inner.fetch(max_messages)
            if not deliveries:
                return deliveries
            redelivered = sum(1 for d in deliveries if d.attempt > 1)
            if redelivered:
                world.coverage["redelivery"] += redelivered
            if not world.faults_active:
                world.deliveries += len(deliveries)
                return deliveries
            plan = world.plan
            out: list[Delivery] = []
            for delivery in deliveries:
                body = delivery.body
                if (
                    world.partition is not None
                    and isinstance(body, Message)
                    and world.cut(body.source, self._system)
                ):
                    # Unreachable: left unacknowledged, redelivered after the heal.
                    world.coverage["partition_drop"] += 1
                    continue
                if world.chance("drop", plan.drop):
                    continue
                out.append(delivery)
                if world.chance("duplicate", plan.duplicate):
                    out.append(delivery)
            if out:
                world.deliveries += len(out)
                return out

    async def close(self) -> None:
        await self._inner.close()


class FaultyStore(DelegatingStore):
    """A node's view of the durable store: failures and slow writes from the plan.

    A failed write (``store_fail``) changes nothing (it fails before the store is touched), a
    slow write waits on the node's clock first (a crash meanwhile means it never happened).
    With ``store_lost_ack`` a write is performed on the inner store and *then* the call raises
    :class:`StoreUnavailableError`, as often as the plan says: the caller cannot tell this
    ambiguous failure from a definite one, as when the database committed and the connection
    dropped before the reply. With
    ``store_read_fail`` every read method of the :class:`EventStore` protocol (``read``,
    ``read_all``, ``max_position``, ``stream_version``, ``streams``, ``stats``,
    ``consumer_position``, ``has_processed``, ``latest_snapshot``) fails as often as the plan
    says, before the store is touched. A subscription (``subscribe``) reads continuously; only
    its start can fail: its first step (the first read of its catch-up) raises, what follows
    is the inner store's own subscription, never failed.
    """

    def __init__(self, world: World, node: Node) -> None:
        super().__init__(world.durable)
        self._world = world
        self._node = node

    async def append_many(
        self, requests: Sequence[AppendRequest], *, tracking: Tracking | None = None
    ) -> list[list[int]]:
        world = self._world
        if world.faults_active:
            plan = world.plan
            if world.chance("store_fail", plan.store_fail):
                raise StoreUnavailableError(
                    f"simulated write failure on {self._node.name!r} (fault plan: store_fail)"
                )
            probability, seconds = plan.slow_write
            if world.chance("slow_write", probability):
                await self._node.clock.sleep(world.rng("slow_write_time").uniform(0.0, seconds))
        positions = await self.inner.append_many(requests, tracking=tracking)
        # Drawn only after the write went through: the events (and the tracking) are stored.
        if world.chance("store_lost_ack", world.plan.store_lost_ack):
            raise StoreUnavailableError(
                f"simulated lost acknowledgement on {self._node.name!r}: the write was "
                "committed, then the connection dropped (fault plan: store_lost_ack)"
            )
        return positions

    # -- reads ---------------------------------------------------------------------------------

    def before_read(self, method: str) -> None:
        """Every read method (DelegatingStore calls this first): fail it if the plan says so."""
        world = self._world
        if world.chance("store_read_fail", world.plan.store_read_fail):
            raise StoreUnavailableError(
                f"simulated read failure on {self._node.name!r} in {method}() "
                "(fault plan: store_read_fail)"
            )

    def subscribe(
        self, *, from_position: int = 1, topics: Sequence[str] = (), batch_size: int = 500
    ) -> AsyncIterator[StoredEvent]:
        inner = self.inner.subscribe(
            from_position=from_position, topics=topics, batch_size=batch_size
        )
        if not self._world.plan.store_read_fail:
            # The inner subscription itself: a plan without read faults runs exactly as before.
            return inner
        return self._failing_start(inner)

    async def _failing_start(self, inner: AsyncIterator[StoredEvent]) -> AsyncIterator[StoredEvent]:
        try:
            # The subscription starts (its catch-up reads) on the first step, so that is
            # where it fails, like the first query against a database that is down.
            self.before_read("subscribe")
            async for event in inner:
                yield event
        finally:
            aclose = getattr(inner, "aclose", None)
            if aclose is not None:
                await aclose()

    async def close(self) -> None:
        # The disk outlives the node.
        return None


def counts_as_json(counts: Mapping[str, int]) -> dict[str, JSONValue]:
    return {key: int(value) for key, value in sorted(counts.items())}
