"""``orders``: an order saga across inventory, payments and shipping, run by the workflow engine.

Four systems. ``inventory``, ``payments`` and ``shipping`` are targets: their command
handlers (registered with a :class:`~collaborative_blocks.core.messaging.SystemConnector` on
the node's broker) keep durable effects in the store, one event per decision. ``orders`` runs
the :class:`~collaborative_blocks.core.workflows.WorkflowCoordinationEngine` (its runs resume
when the node restarts). Every order is one run of the workflow::

    reserve (inventory) -> charge (payments) -> ship (shipping)
    fraud   (payments)  ----------------------/

``ship`` waits for ``charge`` and the parallel ``fraud`` check; ``reserve``, ``charge`` and
``ship`` have compensations (``release``, ``refund``, ``cancel``).

**Targets decide once per idempotency key.** Steps are at-least-once (an attempt whose reply
was lost is attempted again), so a target records its decision for the step's
``idempotency-key`` header, ``<run>:<step>``, in the same optimistic-concurrency append as the
effect (``Reserved``, ``Charged``, ``Shipped``), or records a refusal (``Refused``: out of
stock, card declined, undeliverable, or an injected handler failure). A repeated attempt gets
the recorded answer (the same output, or the same refusal) whatever arrives in between, so
an effect happens at most once and an old, slow attempt can never apply an effect after a
newer one was refused. Compensations do the same with ``<run>:<step>:compensate``; an
injected failure of a compensation is transient (``Unavailable``) and retried.

**The orders node reconciles, as a second line of defence.** The engine itself now
compensates steps whose outcome is uncertain (an attempt timed out or was interrupted) and
retries failed saves; the node's supervisor still sends the compensation of every such step
of a run that did not complete (the target undoes the effect, or refuses the step for good if
it never decided it: a tombstone a late request will find; a second compensation of the same
key is a no-op) and resumes runs whose driver stopped after a store outage outlasted the
engine's retries. Before the engine did this itself, about one seed in ten left a reservation
or a charge behind without the supervisor.

Faults: the plan's drops, duplicates, delays, crashes (of targets and of the engine's node),
partitions, store failures and slow writes; ``handler_error`` makes a target refuse a step
(the run compensates) or fail a compensation once (it is retried); business failures come
from the orders themselves (stock runs out, some cards are declined, some orders look
fraudulent or cannot be delivered). The engine's circuit breakers have a small window, so
refusals open them now and then.

Invariants (checked over the final ``read``, which holds every run's status and events and
every effect the targets recorded):

- ``saga_atomicity``: a finished run is ``completed`` with each of reserve, charge and ship
  applied exactly once and nothing undone, or ``compensated``/``failed`` with every effect it
  caused undone exactly once (no effect of a step left behind, none applied twice);
- ``dependency_order``: no step's attempt started before its dependencies completed (from the
  run's events), and the targets applied reserve before charge before ship (from the
  positions of their effects in the log);
- ``stock_never_negative``: no SKU's available stock ever went below zero;
- ``money_conserved``: charges - refunds = the totals of the completed orders;
- ``every_run_finishes``: every run that started has finished by the end of the liveness phase.

Coverage: ``compensation`` (runs that compensated) and ``breaker_open`` (transitions of the
engine's breakers to open) must happen in every run with the default faults.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar

from collaborative_blocks.core.messaging.broker import MessageContext
from collaborative_blocks.core.messaging.connector import IDEMPOTENCY_KEY, SystemConnector
from collaborative_blocks.core.messaging.envelope import JSONValue, Message
from collaborative_blocks.core.runtime import Runtime
from collaborative_blocks.core.workflows import (
    BreakerConfig,
    BreakerRegistry,
    BreakerState,
    BreakerTransition,
    RetryPolicy,
    RunStatus,
    StepStatus,
    WorkflowCoordinationEngine,
    WorkflowDefinition,
    WorkflowStep,
)
from collaborative_blocks.core.workflows.engine import index_stream
from collaborative_blocks.errors import (
    ConcurrencyError,
    MessagingError,
    RemoteHandlerError,
    StoreUnavailableError,
    UnknownRunError,
    WorkflowError,
)
from collaborative_blocks.simulations.checkers import Checker, FunctionChecker, reads
from collaborative_blocks.simulations.results import History, Operation, OpType, Violation
from collaborative_blocks.simulations.scenarios.base import Scenario
from collaborative_blocks.simulations.world import HANG_SECONDS, Node, NodeDownError, Phase, World
from collaborative_blocks.stores.base import EventStore, NewEvent

__all__ = [
    "BREAKER_CONFIG",
    "STEP_POLICY",
    "OrdersScenario",
    "order_workflow",
]

WORKFLOW_ID = "order"
ENGINE_ID = "orders"
#: SKU -> unit price; every SKU starts with ``INITIAL_STOCK`` units.
PRICES: Mapping[str, int] = {"tea": 5, "cups": 8, "pot": 20}
INITIAL_STOCK = 10
#: Seconds a step attempt waits for its reply (longer than the network's redelivery of a
#: dropped message, so a lost delivery rarely turns into a timeout).
STEP_TIMEOUT = 8.0
#: Seconds between two rounds of the orders node's supervisor (see ``_supervise``).
SUPERVISE_EVERY = 2.0

STOCKED = "orders:Stocked"
RESERVED = "orders:Reserved"
RELEASED = "orders:Released"
CHARGED = "orders:Charged"
REFUNDED = "orders:Refunded"
SHIPPED = "orders:Shipped"
CANCELLED = "orders:Cancelled"
REFUSED = "orders:Refused"
NOTHING = "orders:NothingToUndo"
RECONCILED = "orders:Reconciled"

#: Forward effect topic -> (step, the topic that undoes it).
EFFECTS: Mapping[str, tuple[str, str]] = {
    RESERVED: ("reserve", RELEASED),
    CHARGED: ("charge", REFUNDED),
    SHIPPED: ("ship", CANCELLED),
}
UNDO_STEP: Mapping[str, str] = {RELEASED: "reserve", REFUNDED: "charge", CANCELLED: "ship"}
EFFECT_STEPS = ("reserve", "charge", "ship")
STEP_TARGETS: Mapping[str, str] = {
    "reserve": "inventory",
    "fraud": "payments",
    "charge": "payments",
    "ship": "shipping",
}
#: Step -> (its compensation action, the parameter naming the forward decision).
UNDO_ACTIONS: Mapping[str, tuple[str, str]] = {
    "reserve": ("release", "reservation"),
    "charge": ("refund", "charge"),
    "ship": ("cancel", "shipment"),
}
DEPENDENCIES: Mapping[str, tuple[str, ...]] = {
    "reserve": (),
    "fraud": (),
    "charge": ("reserve",),
    "ship": ("charge", "fraud"),
}


class Refused(Exception):
    """The target refused the step (an injected handler failure): final, recorded."""


class OutOfStock(Exception):
    """Not enough stock left for the reservation."""


class CardDeclined(Exception):
    """The card was declined."""


class FraudSuspected(Exception):
    """The fraud check flagged the order."""


class Undeliverable(Exception):
    """Shipping cannot deliver to the order's address."""


class Unavailable(Exception):
    """A compensation failed for a moment (an injected handler failure): retried."""


REFUSALS: Mapping[str, type[Exception]] = {
    cls.__name__: cls for cls in (Refused, OutOfStock, CardDeclined, FraudSuspected, Undeliverable)
}

#: Every step's retry policy: transient failures (timeouts, crashes, store failures, an open
#: breaker) are retried for long enough to outlast any fault of the safety phase; a refusal
#: is final, so the run compensates at once.
STEP_POLICY = RetryPolicy(
    max_retries=25,
    delay=0.2,
    backoff=2.0,
    max_delay=2.0,
    jitter=0.1,
    non_retryable=("ConditionError", *REFUSALS),
)
#: Small windows, so that a few refusals in a row open a target's breaker.
BREAKER_CONFIG = BreakerConfig(
    failure_rate_threshold=50.0,
    window_size=2,
    minimum_number_of_calls=2,
    permitted_calls_in_half_open=1,
    wait_duration_in_open=1.0,
    ignore_errors=("OutOfStock", "CardDeclined", "FraudSuspected", "Undeliverable"),
)


def order_workflow() -> WorkflowDefinition:
    """The saga: reserve -> charge -> ship, with a parallel fraud check."""

    def step(step_id: str, target: str, action: str, **fields: Any) -> WorkflowStep:
        return WorkflowStep(
            step_id=step_id,
            system_target=target,
            action=action,
            retry_policy=STEP_POLICY,
            timeout=STEP_TIMEOUT,
            dependencies=list(DEPENDENCIES[step_id]),
            **fields,
        )

    order = "${input.order}"
    return WorkflowDefinition(
        WORKFLOW_ID,
        "order saga",
        inputs=["order", "sku", "qty", "amount", "card", "fraud", "address"],
        steps=[
            step(
                "reserve",
                "inventory",
                "reserve",
                parameters={"order": order, "sku": "${input.sku}", "qty": "${input.qty}"},
                compensation="release",
                compensation_parameters={
                    "order": order,
                    "sku": "${input.sku}",
                    "reservation": "${input.order}:reserve",
                },
            ),
            step(
                "fraud",
                "payments",
                "screen",
                parameters={"order": order, "fraud": "${input.fraud}"},
            ),
            step(
                "charge",
                "payments",
                "charge",
                parameters={"order": order, "amount": "${input.amount}", "card": "${input.card}"},
                compensation="refund",
                compensation_parameters={
                    "order": order,
                    "charge": "${input.order}:charge",
                },
            ),
            step(
                "ship",
                "shipping",
                "ship",
                parameters={"order": order, "address": "${input.address}"},
                compensation="cancel",
                compensation_parameters={
                    "order": order,
                    "shipment": "${input.order}:ship",
                },
            ),
        ],
    )


def reconciled_stream(order: str) -> str:
    return f"reconciled:{order}"


async def _run_sku(engine: WorkflowCoordinationEngine, run_id: str) -> JSONValue:
    """The SKU the run's input names (from its first event, which holds the input)."""
    for event in await engine.history(run_id):
        data: Any = event.data.get("input_data")
        if isinstance(data, Mapping):
            return data.get("sku")
    return None


def stock_stream(sku: str) -> str:
    return f"stock:{sku}"


def payments_stream(order: str) -> str:
    return f"payments:{order}"


def shipping_stream(order: str) -> str:
    return f"shipping:{order}"


def _encode(data: Mapping[str, JSONValue]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


class _Fold:
    """A target's view of one stream: its version, the decision per key, the stock level."""

    __slots__ = ("decided", "level", "version")

    def __init__(self) -> None:
        self.version = 0
        self.level = 0
        self.decided: dict[str, tuple[str, dict[str, Any]]] = {}


async def _fold(store: EventStore, stream: str, cache: dict[str, _Fold]) -> _Fold:
    """The node's cached fold of ``stream`` plus the events after it (a crash loses the
    cache; it only ever holds what the store returned)."""
    fold = cache.get(stream)
    if fold is None:
        fold = cache[stream] = _Fold()
    for event in await store.read(stream, from_version=fold.version + 1):
        data = json.loads(event.state)
        fold.version = event.version
        if event.topic in (STOCKED, RELEASED):
            fold.level += int(data.get("qty", 0))
        elif event.topic == RESERVED:
            fold.level -= int(data["qty"])
        key = data.get("key")
        if key is not None:
            fold.decided.setdefault(str(key), (event.topic, data))
    return fold


def _answer(topic: str, data: Mapping[str, Any]) -> JSONValue:
    """What a decision answers, every time it is asked: the output, or the refusal."""
    if topic == REFUSED:
        error = REFUSALS.get(str(data["error_type"]), Refused)
        raise error(str(data["error"]))
    out: dict[str, JSONValue] = {"order": data["order"]}
    if topic == RESERVED:
        out["reservation"] = data["key"]
    elif topic == CHARGED:
        out["charge"] = data["key"]
    elif topic == SHIPPED:
        out["shipment"] = data["key"]
    return out


Decide = Callable[[_Fold], list[tuple[str, dict[str, Any]]]]


class _Target:
    """One target system's handlers on a node: decide once per idempotency key."""

    def __init__(self, world: World, node: Node) -> None:
        self.world = world
        self.node = node
        self.cache: dict[str, _Fold] = node.state.setdefault("folds", {})

    async def _chaos(self) -> None:
        if self.world.chance("handler_hang", self.world.plan.handler_hang):
            await self.node.clock.sleep(HANG_SECONDS)

    def _injected(self) -> bool:
        return self.world.chance("handler_error", self.world.plan.handler_error)

    async def decide(self, stream: str, key: str, decide: Decide) -> JSONValue:
        """The decision recorded for ``key`` on ``stream``, made now if there is none.

        ``decide`` returns the events to append (the last one is the decision for ``key``;
        an earlier one may decide another key, e.g. a tombstone), in one append that fails
        if anything was decided on the stream meanwhile."""
        store = self.node.store
        while True:
            fold = await _fold(store, stream, self.cache)
            earlier = fold.decided.get(key)
            if earlier is not None:
                return _answer(*earlier)
            decided = decide(fold)
            topic, data = decided[-1]
            data["key"] = key
            try:
                await store.append(
                    stream,
                    [NewEvent(t, _encode(d)) for t, d in decided],
                    expected_version=fold.version,
                )
            except ConcurrencyError:
                continue  # someone decided meanwhile (a duplicate delivery): read it back
            return _answer(topic, data)

    def forward(
        self, stream_of: Callable[[Any], str], decide: Callable[[Any, _Fold], tuple[str, Any]]
    ) -> Callable[[Message, MessageContext], Awaitable[JSONValue]]:
        """A forward step's handler: refusals (injected or business) are recorded."""

        async def handle(message: Message, ctx: MessageContext) -> JSONValue:
            await self._chaos()
            payload: Any = message.payload
            key = message.headers[IDEMPOTENCY_KEY]

            def choose(fold: _Fold) -> list[tuple[str, dict[str, Any]]]:
                if self._injected():
                    return [
                        (
                            REFUSED,
                            {
                                "order": payload["order"],
                                "error_type": "Refused",
                                "error": f"injected failure handling {message.name}",
                            },
                        )
                    ]
                topic, data = decide(payload, fold)
                return [(topic, {"order": payload["order"], **data})]

            return await self.decide(stream_of(payload), key, choose)

        return handle

    def undo(
        self, stream_of: Callable[[Any], str], topic: str, undoes: str, amount_field: str
    ) -> Callable[[Message, MessageContext], Awaitable[JSONValue]]:
        """A compensation's handler: undo the effect recorded under the forward key."""

        async def handle(message: Message, ctx: MessageContext) -> JSONValue:
            await self._chaos()
            if self._injected():
                raise Unavailable(f"injected failure handling {message.name}")
            payload: Any = message.payload
            key = message.headers[IDEMPOTENCY_KEY]
            forward = str(payload[undoes])

            def choose(fold: _Fold) -> list[tuple[str, dict[str, Any]]]:
                order = payload["order"]
                found = fold.decided.get(forward)
                if found is None:
                    # Not decided yet (its request is late, or never came): refuse it now,
                    # so that a late request finds the refusal instead of applying it.
                    return [
                        (
                            REFUSED,
                            {
                                "order": order,
                                "key": forward,
                                "error_type": "Refused",
                                "error": "cancelled before it was decided",
                            },
                        ),
                        (NOTHING, {"order": order, "undoes": forward}),
                    ]
                if found[0] == REFUSED:
                    return [(NOTHING, {"order": order, "undoes": forward})]
                amount = int(found[1].get(amount_field, 0))
                return [(topic, {"order": order, "undoes": forward, amount_field: amount})]

            return await self.decide(stream_of(payload), key, choose)

        return handle


def _reserve(payload: Any, fold: _Fold) -> tuple[str, dict[str, Any]]:
    qty = int(payload["qty"])
    if fold.level < qty:
        return REFUSED, {
            "error_type": "OutOfStock",
            "error": f"{payload['sku']}: {qty} wanted, {fold.level} left",
        }
    return RESERVED, {"sku": payload["sku"], "qty": qty}


def _charge(payload: Any, fold: _Fold) -> tuple[str, dict[str, Any]]:
    if payload["card"] == "declined":
        return REFUSED, {"error_type": "CardDeclined", "error": "the card was declined"}
    return CHARGED, {"amount": int(payload["amount"])}


def _ship(payload: Any, fold: _Fold) -> tuple[str, dict[str, Any]]:
    if payload["address"] == "nowhere":
        return REFUSED, {"error_type": "Undeliverable", "error": "no courier goes there"}
    return SHIPPED, {}


class OrdersScenario(Scenario):
    name = "orders"
    description = (
        "an order saga (workflow engine) across inventory, payments and shipping: "
        "all-or-compensated, no step before its dependencies, stock >= 0, money conserved"
    )
    default_faults = (
        "drop=0.03,duplicate=0.05,reorder=0.05,delay=0.01-0.2,crash=0.01,store_fail=0.01,"
        "slow_write=0.03:0.3,handler_error=0.1,handler_hang=0.005,partition=3s@6s"
    )
    invariants = (
        "saga_atomicity",
        "dependency_order",
        "stock_never_negative",
        "money_conserved",
        "every_run_finishes",
        "liveness",
    )
    required_coverage = ("compensation", "breaker_open")
    nodes = ("orders", "inventory", "payments", "shipping")
    safety_seconds = 20.0
    liveness_seconds = 120.0
    # A dropped delivery comes back after 2.5 s, well within a step's 8 s timeout.
    broker_options: ClassVar[Mapping[str, Any]] = {"ack_timeout": 2.5, "handler_timeout": 1.5}
    #: Concurrent clients, the orders each places in the safety phase, their mean pause.
    clients = 4
    orders_per_client = 6
    interval = 0.5

    # -- nodes ---------------------------------------------------------------------------------

    async def setup(self, world: World) -> None:
        for sku in PRICES:
            await world.durable.append(
                stock_stream(sku), [NewEvent(STOCKED, _encode({"sku": sku, "qty": INITIAL_STOCK}))]
            )

    async def start_node(self, world: World, node: Node) -> None:
        if node.name == "orders":
            await self._start_engine(world, node)
            return
        target = _Target(world, node)
        connector = SystemConnector(node.name, node.broker)
        if node.name == "inventory":
            connector.on_command(
                "reserve", target.forward(lambda p: stock_stream(p["sku"]), _reserve)
            )
            connector.on_command(
                "release",
                target.undo(lambda p: stock_stream(p["sku"]), RELEASED, "reservation", "qty"),
            )
        elif node.name == "payments":
            connector.on_command(
                "charge", target.forward(lambda p: payments_stream(p["order"]), _charge)
            )
            connector.on_command(
                "refund",
                target.undo(lambda p: payments_stream(p["order"]), REFUNDED, "charge", "amount"),
            )

            async def screen(message: Message) -> JSONValue:
                await target._chaos()
                payload: Any = message.payload
                if target._injected():
                    raise Refused("injected failure handling screen")
                if payload["fraud"]:
                    raise FraudSuspected(f"order {payload['order']} looks fraudulent")
                return {"order": payload["order"], "verdict": "clear"}

            connector.on_command("screen", screen)
        else:
            connector.on_command(
                "ship", target.forward(lambda p: shipping_stream(p["order"]), _ship)
            )
            connector.on_command(
                "cancel",
                target.undo(lambda p: shipping_stream(p["order"]), CANCELLED, "shipment", "qty"),
            )
        await connector.start()

    async def _start_engine(self, world: World, node: Node) -> None:
        runtime = Runtime(
            world.settings,
            clock=node.clock,
            rng=node.rng,
            store=node.store,
            plugin_manager=world.plugin_manager,
        )
        breakers = BreakerRegistry(BREAKER_CONFIG, clock=node.clock, store=node.store)

        def opened(transition: BreakerTransition) -> None:
            if transition.to_state is BreakerState.OPEN:
                world.exercised("breaker_open")

        breakers.subscribe(opened)
        engine = WorkflowCoordinationEngine(
            runtime,
            store=node.store,
            broker=node.broker,
            breakers=breakers,
            clock=node.clock,
            rng=node.rng,
            settings=world.settings,
            engine_id=ENGINE_ID,
            step_timeout=STEP_TIMEOUT,
        )
        engine = world.component("workflow_engine", engine, node)

        # The store may fail a write now and then: keep trying until the engine is up (a
        # run resumed before the failure is not resumed twice).
        async def start() -> None:
            await engine.define_workflow(order_workflow())
            await engine.resume()

        await node.until_the_store_answers(start)
        node.state["engine"] = engine
        node.spawn(self._supervise(node, engine), name="orders supervisor")

    async def _supervise(self, node: Node, engine: WorkflowCoordinationEngine) -> None:
        """The orders node's housekeeping, every ``SUPERVISE_EVERY`` seconds.

        1. Resume the runs whose driver stopped on a failed store write: the engine drops a
           run from memory when saving it fails (the log keeps it, unfinished, and only
           ``resume()`` continues it, normally after a restart). It skips a round while a
           client is starting a run (registered in the index before the engine drives it).
        2. Reconcile the runs that did not complete: the engine compensates the steps that
           *completed*, but a step whose outcome is uncertain (its attempt timed out, or it
           was waiting for a retry when a sibling failed) may have taken effect at its target
           all the same. Such a step's compensation is sent here too: the target undoes the
           effect, or refuses the step for good if it has not decided it yet (a late request
           then finds the refusal). A marker in the store says a run is reconciled.
        """
        connector = SystemConnector("orders-reconciler", node.broker, query_timeout=STEP_TIMEOUT)
        await connector.start()
        done: set[str] = set()
        while True:
            await node.clock.sleep(SUPERVISE_EVERY)
            try:
                if not node.state.get("starting", 0):
                    await engine.resume()
                await self._reconcile(node, engine, connector, done)
            except (StoreUnavailableError, MessagingError, RemoteHandlerError):
                continue

    async def _reconcile(
        self,
        node: Node,
        engine: WorkflowCoordinationEngine,
        connector: SystemConnector,
        done: set[str],
    ) -> None:
        store = node.store
        for stored in await store.read(index_stream(ENGINE_ID)):
            run_id = str(json.loads(stored.state)["run_id"])
            if run_id in done:
                continue
            try:
                result = await engine.get_result(run_id)
            except UnknownRunError:
                continue
            if not result.finished:
                continue
            if result.status is RunStatus.COMPLETED or await store.stream_version(
                reconciled_stream(run_id)
            ):
                done.add(run_id)
                continue
            uncertain = [
                step_id
                for step_id in EFFECT_STEPS
                if result.steps[step_id].attempts
                and result.steps[step_id].status
                not in (StepStatus.COMPLETED, StepStatus.COMPENSATED)
            ]
            if uncertain:
                sku = await _run_sku(engine, run_id)
                for step_id in uncertain:
                    action, field = UNDO_ACTIONS[step_id]
                    await connector.request(
                        STEP_TARGETS[step_id],
                        action,
                        {"order": run_id, "sku": sku, field: f"{run_id}:{step_id}"},
                        timeout=STEP_TIMEOUT,
                        headers={IDEMPOTENCY_KEY: f"{run_id}:{step_id}:compensate"},
                    )
            with contextlib.suppress(ConcurrencyError):
                await store.append(
                    reconciled_stream(run_id),
                    [NewEvent(RECONCILED, _encode({"order": run_id, "steps": uncertain}))],
                    expected_version=0,
                )
            done.add(run_id)

    @staticmethod
    def _engine(world: World) -> WorkflowCoordinationEngine:
        return world.node("orders").running("engine", WorkflowCoordinationEngine)

    # -- clients -------------------------------------------------------------------------------

    async def workload(self, world: World, phase: Phase) -> None:
        if phase is not Phase.SAFETY:
            return
        clients = [
            world.spawn(self._client(world, c), name=f"client {c}") for c in range(self.clients)
        ]
        for client in clients:
            await client

    async def _client(self, world: World, number: int) -> None:
        rng = world.rng(f"client:{number}")
        node = world.node("orders")
        process = f"client-{number}"
        skus = sorted(PRICES)
        for j in range(self.orders_per_client):
            await world.clock.sleep(rng.uniform(0.0, 2 * self.interval))
            while not (node.up and "engine" in node.state):
                await world.clock.sleep(0.25)  # a client waits for the shop to come back
            sku = rng.choice(skus)
            qty = rng.randint(1, 3)
            order: dict[str, JSONValue] = {
                "order": f"o-{number}-{j}",
                "sku": sku,
                "qty": qty,
                "amount": qty * PRICES[sku],
                "card": "declined" if rng.random() < 0.1 else "ok",
                "fraud": rng.random() < 0.07,
                "address": "nowhere" if rng.random() < 0.05 else "street",
            }

            async def place(order: dict[str, JSONValue] = order) -> JSONValue:
                engine = self._engine(world)
                run_id = str(order["order"])
                result = await node.call(self._place(node, engine, run_id, order))
                return {"order": run_id, "status": result}

            await world.operation(process, "order", order, place)

    @staticmethod
    async def _place(
        node: Node, engine: WorkflowCoordinationEngine, run_id: str, order: dict[str, JSONValue]
    ) -> str:
        state = node.state
        state["starting"] = state.get("starting", 0) + 1
        try:
            await engine.start_workflow(WORKFLOW_ID, order, run_id=run_id)
        finally:
            state["starting"] -= 1
        while True:
            try:
                result = await engine.wait_for(run_id)
            except WorkflowError:
                # Its driver stopped on a failed store write; the supervisor resumes it.
                await node.clock.sleep(SUPERVISE_EVERY)
                continue
            return result.status.value

    # -- the outcome ---------------------------------------------------------------------------

    def _orders(self, world: World) -> list[str]:
        return [
            str(op.value["order"])
            for op in world.history.invocations()
            if op.f == "order" and isinstance(op.value, Mapping)
        ]

    async def _runs(self, world: World, engine: WorkflowCoordinationEngine) -> dict[str, Any]:
        """Every invoked order's run: its status, step statuses and events."""
        runs: dict[str, Any] = {}
        for order in self._orders(world):
            try:
                result = await engine.get_result(order)
            except UnknownRunError:
                continue
            events = [
                [event.name, str(event.data.get("step_id") or ""), event.position]
                for event in await engine.history(order)
                if event.name in ("AttemptStarted", "StepCompleted")
            ]
            runs[order] = {
                "status": result.status.value,
                "finished": result.finished,
                "steps": {s: r.status.value for s, r in sorted(result.steps.items())},
                "compensated": list(result.compensated),
                "events": events,
            }
        return runs

    async def _effects(self, world: World) -> tuple[dict[str, Any], dict[str, Any]]:
        """The targets' effects per order (topic -> [[key, position, amount]]) and the stock."""
        effects: dict[str, dict[str, list[list[JSONValue]]]] = {}
        stock: dict[str, Any] = {}
        for sku in PRICES:
            level = lowest = 0
            for event in await world.durable.read(stock_stream(sku)):
                data = json.loads(event.state)
                if event.topic in (STOCKED, RELEASED):
                    level += int(data.get("qty", 0))
                elif event.topic == RESERVED:
                    level -= int(data["qty"])
                lowest = min(lowest, level)
                if event.topic in (RESERVED, RELEASED):
                    effects.setdefault(str(data["order"]), {}).setdefault(event.topic, []).append(
                        [data["key"], event.position, int(data.get("qty", 0))]
                    )
            stock[sku] = {"level": level, "lowest": lowest}
        for order in self._orders(world):
            for stream in (payments_stream(order), shipping_stream(order)):
                for event in await world.durable.read(stream):
                    if event.topic in (REFUSED, NOTHING):
                        continue
                    data = json.loads(event.state)
                    effects.setdefault(order, {}).setdefault(event.topic, []).append(
                        [data["key"], event.position, int(data.get("amount", 0))]
                    )
        return effects, stock

    async def settled(self, world: World) -> bool:
        # Not "nothing in flight": replies addressed to a crashed engine's connector stay in
        # the network for good. Every run finished and reconciled is what must happen.
        try:
            engine = self._engine(world)
        except NodeDownError:
            return False
        finished: set[str] = world.scenario_state.setdefault("finished", set())
        for order in self._orders(world):
            if order in finished:
                continue
            try:
                result = await engine.get_result(order)
            except UnknownRunError:
                continue  # never started (its client failed before the run was saved)
            if not result.finished:
                return False
            if result.status is not RunStatus.COMPLETED and not await world.durable.stream_version(
                reconciled_stream(order)
            ):
                return False
            finished.add(order)
        return True

    def unsettled(self, world: World) -> str:
        return "a run has not finished, or a run that did not complete was not reconciled"

    async def final_reads(self, world: World) -> dict[str, Any]:
        try:
            engine = self._engine(world)
        except NodeDownError:
            runs: dict[str, Any] = {}
        else:
            runs = await self._runs(world, engine)
        effects, stock = await self._effects(world)
        compensated = sum(1 for run in runs.values() if run["compensated"])
        if compensated:
            world.exercised("compensation", compensated)
        value = {"runs": runs, "effects": effects, "stock": stock}
        world.record("checker", OpType.OK, "read", value)
        return value

    def checkers(self) -> Sequence[Checker]:
        return (
            FunctionChecker("saga_atomicity", check_saga_atomicity),
            FunctionChecker("dependency_order", check_dependency_order),
            FunctionChecker("stock_never_negative", check_stock_never_negative),
            FunctionChecker("money_conserved", check_money_conserved),
            FunctionChecker("every_run_finishes", check_every_run_finishes),
        )


# -- checkers ------------------------------------------------------------------------------------


def _value(op: Operation) -> Any:
    """An operation's JSON value, to be read by key (the scenario wrote it)."""
    return op.value


def _final(history: History) -> tuple[Operation, Any] | None:
    found = reads(history)
    return (found[-1], found[-1].value) if found else None


def _order_ops(history: History) -> dict[str, list[Operation]]:
    done = history.completions()
    out: dict[str, list[Operation]] = {}
    for op in history.invocations():
        value: Any = op.value
        if op.f == "order" and isinstance(value, Mapping):
            completion = done.get(op.index)
            out[str(value["order"])] = [op] if completion is None else [op, completion]
    return out


def _witness(history: History, order: str, read: Operation) -> tuple[Operation, ...]:
    return (*_order_ops(history).get(order, []), read)


def check_saga_atomicity(history: History, facts: Mapping[str, Any]) -> list[Violation]:
    final = _final(history)
    if final is None:
        return [Violation("saga_atomicity", "no final read was recorded")]
    read, state = final
    runs: Mapping[str, Any] = state["runs"]
    effects: Mapping[str, Any] = state["effects"]
    violations = []

    def violation(order: str, text: str) -> None:
        violations.append(
            Violation("saga_atomicity", f"order {order}: {text}", _witness(history, order, read))
        )

    for order in sorted(set(runs) | set(effects)):
        run = runs.get(order)
        done: Mapping[str, Any] = effects.get(order, {})
        counts = {topic: len(done.get(topic, ())) for topic in (*EFFECTS, *UNDO_STEP)}
        for topic, count in counts.items():
            if count > 1:
                violation(order, f"{count} {topic} effects (one step, one effect)")
        if run is None:
            if any(counts.values()):
                violation(
                    order, f"effects {sorted(t for t, c in counts.items() if c)} without a run"
                )
            continue
        status = run["status"]
        if not run["finished"]:
            continue  # every_run_finishes reports it
        if status == "compensation_failed":
            violation(order, "ended compensation_failed: an effect was never undone")
        for topic, (step, undo) in EFFECTS.items():
            applied, undone = counts[topic], counts[undo]
            if status == "completed":
                if applied != 1 or undone:
                    violation(
                        order,
                        f"completed, but step {step} has {applied} {topic} and {undone} {undo}",
                    )
            elif applied and not undone:
                violation(
                    order,
                    f"{status}, but the {topic} effect of step {step} (step "
                    f"{run['steps'].get(step)}) was never undone",
                )
            elif undone and not applied:
                violation(order, f"{status}: {undo} without any {topic} (undid nothing)")
    return violations


def check_dependency_order(history: History, facts: Mapping[str, Any]) -> list[Violation]:
    final = _final(history)
    if final is None:
        return []
    read, state = final
    violations = []
    for order, run in sorted(state["runs"].items()):
        completed: dict[str, int] = {}
        for name, step, position in run["events"]:
            if name == "StepCompleted":
                completed.setdefault(step, position)
        for name, step, position in run["events"]:
            if name != "AttemptStarted":
                continue
            for dependency in DEPENDENCIES.get(step, ()):
                done = completed.get(dependency)
                if done is None or done > position:
                    violations.append(
                        Violation(
                            "dependency_order",
                            f"order {order}: step {step} started (log position {position}) "
                            f"before its dependency {dependency} completed ({done})",
                            _witness(history, order, read),
                        )
                    )
        done_effects: Mapping[str, Any] = state["effects"].get(order, {})
        first = {
            EFFECTS[topic][0]: min(entry[1] for entry in entries)
            for topic, entries in done_effects.items()
            if topic in EFFECTS and entries
        }
        for step, dependency in (("charge", "reserve"), ("ship", "charge")):
            if step in first and (dependency not in first or first[dependency] > first[step]):
                violations.append(
                    Violation(
                        "dependency_order",
                        f"order {order}: the target applied {step} (position {first[step]}) "
                        f"before {dependency} ({first.get(dependency)})",
                        _witness(history, order, read),
                    )
                )
    return violations


def check_stock_never_negative(history: History, facts: Mapping[str, Any]) -> list[Violation]:
    final = _final(history)
    if final is None:
        return []
    read, state = final
    return [
        Violation(
            "stock_never_negative",
            f"stock of {sku} went down to {level['lowest']}",
            (read,),
        )
        for sku, level in sorted(state["stock"].items())
        if level["lowest"] < 0
    ]


def check_money_conserved(history: History, facts: Mapping[str, Any]) -> list[Violation]:
    final = _final(history)
    if final is None:
        return [Violation("money_conserved", "no final read was recorded")]
    read, state = final
    charged = refunded = 0
    for done in state["effects"].values():
        charged += sum(int(entry[2]) for entry in done.get(CHARGED, ()))
        refunded += sum(int(entry[2]) for entry in done.get(REFUNDED, ()))
    amounts = {
        str(value["order"]): int(value["amount"])
        for op in history.invocations()
        if op.f == "order" and isinstance(value := _value(op), Mapping)
    }
    completed = sorted(o for o, run in state["runs"].items() if run["status"] == "completed")
    owed = sum(amounts.get(order, 0) for order in completed)
    if charged - refunded == owed:
        return []
    wrong = [
        order
        for order, done in sorted(state["effects"].items())
        if sum(int(e[2]) for e in done.get(CHARGED, ()))
        - sum(int(e[2]) for e in done.get(REFUNDED, ()))
        != (amounts.get(order, 0) if order in completed else 0)
    ]
    witness = tuple(op for order in wrong[:2] for op in _order_ops(history).get(order, []))
    return [
        Violation(
            "money_conserved",
            f"charged {charged} - refunded {refunded} = {charged - refunded}, but the completed "
            f"orders total {owed} (orders off: {', '.join(wrong[:5]) or 'none'})",
            (*witness, read),
        )
    ]


def check_every_run_finishes(history: History, facts: Mapping[str, Any]) -> list[Violation]:
    final = _final(history)
    if final is None:
        return []
    read, state = final
    return [
        Violation(
            "every_run_finishes",
            f"order {order}'s run is still {run['status']} at the end of the liveness phase",
            _witness(history, order, read),
        )
        for order, run in sorted(state["runs"].items())
        if not run["finished"]
    ]
