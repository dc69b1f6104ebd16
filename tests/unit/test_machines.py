"""State-machine aggregates: transitions validate triggers, each transition is an event,
illegal ones record nothing, replay rebuilds the state."""

from __future__ import annotations

import enum
import json
import sys
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from eventsourcing.domain import event
from eventsourcing.utils import _topic_cache, _type_cache

from collaborative_blocks.core.aggregates import Repository
from collaborative_blocks.core.machines import StateMachineAggregate, transition
from collaborative_blocks.errors import (
    CommandArgumentsError,
    GuardRejectedError,
    IllegalTransitionError,
)
from collaborative_blocks.stores import EventStore, open_store
from collaborative_blocks.stores.memory import MemoryEventStore


class OrderState(enum.Enum):
    NEW = "new"
    PAID = "paid"
    SHIPPED = "shipped"
    CANCELLED = "cancelled"


class Order(StateMachineAggregate[OrderState]):
    initial = OrderState.NEW

    @event("Placed")
    def __init__(self, customer: str) -> None:
        self.customer = customer
        self.items: list[str] = []
        self.paid = 0
        self.reason = ""

    def covers_total(self, amount: int) -> bool:
        return amount >= 10

    @property
    def has_items(self) -> bool:
        return bool(self.items)

    @transition(source=OrderState.NEW, dest=None)
    def add_item(self, sku: str) -> None:
        self.items.append(sku)

    @transition(
        source=OrderState.NEW,
        dest=OrderState.PAID,
        conditions=[covers_total, "has_items"],
    )
    def pay(self, amount: int) -> None:
        self.paid = amount

    @transition(source=OrderState.PAID, dest=OrderState.SHIPPED, event="Shipped")
    def ship(self) -> None:
        pass

    @transition(source=[OrderState.NEW, OrderState.PAID], dest=OrderState.CANCELLED)
    def cancel(self, reason: str = "no reason") -> None:
        self.reason = reason


class Light(enum.Enum):
    GREEN = "green"
    YELLOW = "yellow"
    RED = "red"
    OFF = "off"


class TrafficLight(StateMachineAggregate[Light]):
    """Stacked transitions for one trigger, guards with ``unless``, and a wildcard source."""

    initial = Light.RED

    @event("Installed")
    def __init__(self) -> None:
        self.changes = 0

    def in_maintenance(self, maintenance: bool = False) -> bool:
        return maintenance

    @transition(source=Light.RED, dest=Light.GREEN, unless=[in_maintenance])
    @transition(source=Light.GREEN, dest=Light.YELLOW)
    @transition(source=Light.YELLOW, dest=Light.RED)
    def next(self, maintenance: bool = False) -> None:
        self.changes += 1

    @transition(source="*", dest=Light.OFF)
    def switch_off(self) -> None:
        pass


class ExpressOrder(Order):
    """Inherits Order's lifecycle and adds a trigger."""

    @transition(source=OrderState.PAID, dest=OrderState.SHIPPED)
    def ship_express(self, courier: str) -> None:
        self.courier = courier


class Fragile(enum.Enum):
    OK = "ok"
    BROKEN = "broken"


class Vase(StateMachineAggregate[Fragile]):
    initial = Fragile.OK

    @event("Made")
    def __init__(self) -> None:
        self.drops = 0

    @transition(source=Fragile.OK, dest=Fragile.BROKEN)
    def drop(self, height: int) -> None:
        if height < 0:
            raise ValueError("height must be >= 0")
        self.drops += 1


class Heat(enum.Enum):
    COLD = "cold"
    HOT = "hot"


def below_boiling(kettle: Kettle, celsius: int) -> bool:
    """A module-level guard: any function taking the aggregate first."""
    return celsius <= 100


class Kettle(StateMachineAggregate[Heat]):
    initial = Heat.COLD
    max_celsius = 90

    @event("Bought")
    def __init__(self) -> None:
        self.celsius = 20

    @staticmethod
    def sane(celsius: int) -> bool:
        return celsius > 0

    @classmethod
    def within_model_limit(cls, celsius: int) -> bool:
        return celsius <= cls.max_celsius

    @transition(
        source=Heat.COLD,
        dest=Heat.HOT,
        conditions=["sane", "within_model_limit", below_boiling],
    )
    def boil(self, celsius: int) -> None:
        self.celsius = celsius


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, cb_sqlite_url: str) -> AsyncIterator[EventStore]:
    opened = MemoryEventStore() if request.param == "memory" else await open_store(cb_sqlite_url)
    try:
        yield opened
    finally:
        await opened.close()


def paid_order() -> Order:
    order = Order(customer="ann")
    order.add_item(sku="cup")
    order.pay(amount=12)
    return order


def test_legal_triggers_move_the_state_and_record_one_event_each() -> None:
    order = Order(customer="ann")
    assert order.state is OrderState.NEW
    assert order.allowed_triggers == ["add_item", "cancel", "pay"]
    order.add_item(sku="cup")
    assert order.state is OrderState.NEW  # internal transition: dest=None
    order.pay(amount=12)
    order.ship()
    assert order.state is OrderState.SHIPPED
    assert [type(e).__name__ for e in order.pending_events] == [
        "Placed",
        "AddItem",
        "Pay",
        "Shipped",
    ]
    assert order.pending_events[2].to_state == "paid"  # type: ignore[attr-defined]
    assert order.pending_events[2].amount == 12  # type: ignore[attr-defined]


def test_illegal_transition_names_machine_trigger_state_allowed_and_records_nothing() -> None:
    order = paid_order()
    order.ship()
    events_before = list(order.pending_events)
    version_before = order.version

    with pytest.raises(IllegalTransitionError) as caught:
        order.cancel(reason="late")

    error = caught.value
    assert (error.machine, error.trigger, error.state, error.allowed) == (
        "Order",
        "cancel",
        "shipped",
        [],
    )
    assert "Order: cannot 'cancel' in state 'shipped'" in str(error)
    assert order.pending_events == events_before
    assert order.version == version_before
    assert order.state is OrderState.SHIPPED


def test_illegal_transition_lists_the_allowed_triggers() -> None:
    order = Order(customer="ann")
    with pytest.raises(IllegalTransitionError, match="allowed here: add_item, cancel, pay"):
        order.ship()


def test_guard_rejection_names_the_guards_and_records_nothing() -> None:
    order = Order(customer="ann")
    with pytest.raises(GuardRejectedError) as caught:
        order.pay(amount=5)
    assert caught.value.rejected_by == ["covers_total", "has_items"]
    assert isinstance(caught.value, IllegalTransitionError)
    assert order.state is OrderState.NEW
    assert order.version == 1
    order.add_item(sku="cup")
    with pytest.raises(GuardRejectedError, match="covers_total"):
        order.pay(amount=5)
    assert order.may("pay", amount=10)
    assert not order.may("pay", amount=9)
    assert not order.may("ship")
    order.pay(amount=10)
    assert order.state is OrderState.PAID


def test_unless_guard_and_stacked_transitions() -> None:
    light = TrafficLight()
    with pytest.raises(GuardRejectedError, match="not in_maintenance"):
        light.next(maintenance=True)
    assert light.state is Light.RED
    light.next()
    light.next()
    light.next()
    assert (light.state, light.changes) == (Light.RED, 3)
    light.switch_off()
    assert light.state is Light.OFF
    with pytest.raises(IllegalTransitionError, match="allowed here: switch_off"):
        light.next()


def test_bad_arguments_and_unknown_triggers_are_typed_errors() -> None:
    order = Order(customer="ann")
    with pytest.raises(
        CommandArgumentsError, match=r"Order\.pay\(amount\): missing a required argument"
    ):
        order.pay()  # type: ignore[call-arg]
    with pytest.raises(CommandArgumentsError, match="unexpected keyword argument 'amont'"):
        order.fire("pay", amount=1, amont=2)
    with pytest.raises(IllegalTransitionError, match="cannot 'refund' in state 'new'"):
        order.fire("refund")
    assert not order.may("refund")
    assert order.version == 1


def test_a_body_that_raises_records_nothing_and_keeps_the_state() -> None:
    vase = Vase()
    with pytest.raises(ValueError, match="height"):
        vase.drop(height=-1)
    assert (vase.state, vase.version, len(vase.pending_events)) == (Fragile.OK, 1, 1)
    vase.drop(height=2)
    assert vase.state is Fragile.BROKEN


def test_fire_is_the_same_as_calling_the_trigger_method() -> None:
    by_method = Order(customer="ann")
    by_name = Order(customer="ann")
    by_method.cancel()
    by_name.fire("cancel")
    assert by_method.state is by_name.state is OrderState.CANCELLED
    assert by_method.reason == by_name.reason == "no reason"


def test_the_machine_is_compiled_once_per_class_and_holds_no_instances() -> None:
    first, second = Order(customer="a"), Order(customer="b")
    first.cancel()
    assert Order.lifecycle is type(second).lifecycle
    assert Order.lifecycle.machine.models == []
    assert "_cb_state" in vars(first)
    assert second.state is OrderState.NEW
    assert ExpressOrder.lifecycle is not Order.lifecycle


def test_subclass_inherits_the_lifecycle_and_adds_triggers() -> None:
    order = ExpressOrder(customer="ann")
    order.add_item(sku="cup")
    order.pay(amount=20)
    assert "ship_express" in order.allowed_triggers
    assert "ship_express" not in Order.lifecycle.triggers
    order.ship_express(courier="bike")
    assert (order.state, order.courier) == (OrderState.SHIPPED, "bike")


async def test_replay_rebuilds_the_state(store: EventStore) -> None:
    repo = Repository(store)
    order = paid_order()
    await repo.save(order)
    loaded = await repo.get(order.id, Order)
    assert loaded.state is OrderState.PAID
    assert (loaded.items, loaded.paid) == (["cup"], 12)
    loaded.ship()
    await repo.save(loaded)
    again = await repo.get(order.id, Order)
    assert again.state is OrderState.SHIPPED
    assert again == loaded

    stored = await store.read(str(order.id))
    payloads = [json.loads(e.state) for e in stored]
    assert [p.get("to_state") for p in payloads] == [None, "new", "paid", "shipped"]


async def test_replay_trusts_history_and_skips_guards(store: EventStore) -> None:
    """A guard that would now say no does not stop replay: the stored event is a fact."""
    repo = Repository(store)
    order = paid_order()
    await repo.save(order)
    loaded = await repo.get(order.id, Order)
    loaded.items.clear()  # has_items is now false, yet the Pay event replays
    reloaded = await repo.get(order.id, Order)
    assert reloaded.state is OrderState.PAID


async def test_thousands_of_transitions_replay_and_snapshot(store: EventStore) -> None:
    repo = Repository(store, snapshot_interval=500)
    light = TrafficLight()
    for _ in range(2_000):
        light.next()
    await repo.save(light)
    assert (await store.latest_snapshot(str(light.id))) is not None
    light.next()
    await repo.save(light)
    loaded = await repo.get(light.id, TrafficLight)
    assert (loaded.state, loaded.changes, loaded.version) == (light.state, 2_001, 2_002)
    assert (await repo.get(light.id, TrafficLight, version=3)).state is Light.YELLOW


def test_declaration_mistakes_are_reported_when_the_class_is_defined() -> None:
    with pytest.raises(TypeError, match="no initial state"):

        class NoInitial(StateMachineAggregate[OrderState]):
            @transition(source=OrderState.NEW, dest=OrderState.PAID)
            def pay(self) -> None:
                pass

    class Numbered(enum.Enum):
        ONE = 1

    with pytest.raises(TypeError, match="non-string value"):

        class NumberedMachine(StateMachineAggregate[Numbered]):
            initial = Numbered.ONE

    with pytest.raises(TypeError, match="not a member of OrderState"):

        class Mixed(StateMachineAggregate[OrderState]):
            initial = OrderState.NEW

            @transition(source=Light.RED, dest=OrderState.PAID)
            def pay(self) -> None:
                pass

    with pytest.raises(TypeError, match="reserved"):

        class Reserved(StateMachineAggregate[OrderState]):
            initial = OrderState.NEW

            @transition(source=OrderState.NEW, dest=OrderState.PAID)
            def pay(self, to_state: str) -> None:
                pass

    def needs_amount(self: object, amount: int) -> bool:
        return amount > 0

    with pytest.raises(TypeError, match="guard 'needs_amount' needs amount, which pay"):

        class WrongGuard(StateMachineAggregate[OrderState]):
            initial = OrderState.NEW

            @transition(source=OrderState.NEW, dest=OrderState.PAID, conditions=needs_amount)
            def pay(self, total: int) -> None:
                pass

    with pytest.raises(TypeError, match="guard 'nope' is not an attribute"):

        class UnknownGuard(StateMachineAggregate[OrderState]):
            initial = OrderState.NEW

            @transition(source=OrderState.NEW, dest=OrderState.PAID, conditions="nope")
            def pay(self) -> None:
                pass


BANK_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "bank.py"


async def test_bank_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("cb_example_bank", BANK_EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cb_example_bank"] = module
    try:
        spec.loader.exec_module(module)
        assert await module.main() == 70  # on a temporary SQLite log
    finally:
        del sys.modules["cb_example_bank"]
    out = capsys.readouterr().out
    assert "rejected by its guard(s) covered" in out
    assert "cannot 'deposit' in state 'frozen'" in out
    assert "snapshot at version 125" in out


def test_static_class_and_module_level_guards() -> None:
    kettle = Kettle()
    with pytest.raises(GuardRejectedError) as caught:
        kettle.boil(celsius=-3)
    assert caught.value.rejected_by == ["sane"]
    with pytest.raises(GuardRejectedError) as caught:
        kettle.boil(celsius=95)
    assert caught.value.rejected_by == ["within_model_limit"]
    with pytest.raises(GuardRejectedError) as caught:
        kettle.boil(celsius=120)
    assert caught.value.rejected_by == ["within_model_limit", "below_boiling"]
    assert kettle.state is Heat.COLD
    kettle.boil(celsius=80)
    assert (kettle.state, kettle.celsius) == (Heat.HOT, 80)


# -- schema evolution of transition events ------------------------------------------------------

MACHINE_MODULE = "cb_test_machine_evolution"

TICKET_V1 = """
import enum
from collaborative_blocks.core.machines import StateMachineAggregate, transition

class Stage(enum.Enum):
    OPEN = "open"
    SOLD = "sold"

class Ticket(StateMachineAggregate[Stage]):
    initial = Stage.OPEN

    @transition(source=Stage.OPEN, dest=Stage.SOLD)
    def sell(self, price: int) -> None:
        self.price = price
"""

# Version 2 prices in cents with a currency; version 3 renames the buyer field.
TICKET_V3 = """
import enum
from typing import Any
from collaborative_blocks.core.machines import StateMachineAggregate, transition

class Stage(enum.Enum):
    OPEN = "open"
    SOLD = "sold"

def to_cents(state: dict[str, Any]) -> None:
    state["cents"] = state.pop("price") * 100
    state["currency"] = "EUR"

def add_buyer(state: dict[str, Any]) -> None:
    state["buyer"] = "unknown"

class Ticket(StateMachineAggregate[Stage]):
    initial = Stage.OPEN

    @transition(source=Stage.OPEN, dest=Stage.SOLD, upcasters=[to_cents, add_buyer])
    def sell(self, cents: int, currency: str, buyer: str) -> None:
        self.cents = cents
        self.currency = currency
        self.buyer = buyer
"""


def _install_machine_module(source: str) -> types.ModuleType:
    for topic in [t for t in _topic_cache if t.startswith(MACHINE_MODULE)]:
        del _topic_cache[topic]
    for cls in [c for c in _type_cache if getattr(c, "__module__", "") == MACHINE_MODULE]:
        del _type_cache[cls]
    module = types.ModuleType(MACHINE_MODULE)
    sys.modules[MACHINE_MODULE] = module
    exec(compile(source, f"<{MACHINE_MODULE}>", "exec"), module.__dict__)
    return module


@pytest.fixture
def machine_module() -> Iterator[None]:
    yield
    sys.modules.pop(MACHINE_MODULE, None)
    for topic in [t for t in _topic_cache if t.startswith(MACHINE_MODULE)]:
        del _topic_cache[topic]


@pytest.mark.usefixtures("machine_module")
async def test_transition_events_of_an_old_version_load_through_upcasters(
    store: EventStore,
) -> None:
    v1 = _install_machine_module(TICKET_V1)
    ticket = v1.Ticket()
    ticket.sell(price=12)
    await Repository(store).save(ticket)

    v3 = _install_machine_module(TICKET_V3)
    assert v3.Ticket.lifecycle.triggers["sell"].event_class.class_version == 3
    repo = Repository(store)
    loaded = await repo.get(ticket.id, v3.Ticket)
    assert loaded.state.value == "sold"
    assert (loaded.cents, loaded.currency, loaded.buyer) == (1200, "EUR", "unknown")

    # New events are written at version 3 and load without upcasting.
    fresh = v3.Ticket()
    fresh.sell(cents=500, currency="USD", buyer="bo")
    await repo.save(fresh)
    stored = await store.read(str(fresh.id))
    assert json.loads(stored[-1].state)["class_version"] == 3
    again = await repo.get(fresh.id, v3.Ticket)
    assert (again.cents, again.currency, again.buyer) == (500, "USD", "bo")


def test_upcasters_are_given_once_per_trigger() -> None:
    with pytest.raises(TypeError, match="upcasters given on two"):

        class Twice(StateMachineAggregate[OrderState]):
            initial = OrderState.NEW

            @transition(source=OrderState.NEW, dest=OrderState.PAID, upcasters=[dict.clear])
            @transition(source=OrderState.PAID, dest=OrderState.NEW, upcasters=[dict.clear])
            def flip(self) -> None:
                pass


class Shape(enum.Enum):
    IDLE = "idle"


class Bindings(StateMachineAggregate[Shape]):
    initial = Shape.IDLE

    @event("Made")
    def __init__(self) -> None:
        self.seen: list[dict[str, object]] = []

    @transition(source=Shape.IDLE)
    def plain(self, a: int, b: str = "x", *, c: float = 1.5, d: int) -> None:
        self.seen.append({"a": a, "b": b, "c": c, "d": d})


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {"a": 1, "d": 4}),
        ((1,), {"d": 4}),
        ((1, "y"), {"c": 2.5, "d": 4}),
        ((), {"d": 4, "c": 0.5, "b": "z", "a": 9}),
        ((), {"a": 1}),  # d missing
        ((1,), {"a": 1, "d": 4}),  # a twice
        ((1, "y", 2.0), {"d": 4}),  # c is keyword-only
        ((), {"a": 1, "d": 4, "e": 5}),  # unknown
    ],
)
def test_trigger_arguments_bind_exactly_as_the_signature_says(
    args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    import inspect

    signature = inspect.signature(Bindings.plain)
    try:
        bound = signature.bind(None, *args, **kwargs)
    except TypeError:
        expected = None
    else:
        bound.apply_defaults()
        expected = dict(bound.arguments)
        expected.pop("self")
    model = Bindings()
    if expected is None:
        with pytest.raises(CommandArgumentsError):
            model.plain(*args, **kwargs)  # type: ignore[arg-type]
        assert model.version == 1
        return
    model.plain(*args, **kwargs)  # type: ignore[arg-type]
    assert model.seen == [expected]
    (recorded,) = model.pending_events[1:]
    assert {k: getattr(recorded, k) for k in expected} == expected


def test_recorded_events_are_the_ones_eventsourcing_would_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dataclasses

    from collaborative_blocks.core.aggregates import event_clock
    from collaborative_blocks.core.clock import VirtualClock

    def history(order: Order) -> list[tuple[type, dict[str, object]]]:
        return [(type(e), dict(vars(e))) for e in order.pending_events]

    def drive() -> Order:
        with event_clock(VirtualClock(start=100.0)):
            order = Order(customer="ann")
            with pytest.raises(GuardRejectedError):
                order.pay(amount=1)  # no items yet: nothing recorded
            order.add_item(sku="a")
            order.pay(amount=12)
            order.cancel(reason="x")
        return order

    assert all(t.fast_apply is not None for t in Order.lifecycle.triggers.values())
    fast = drive()
    for name, trigger in list(Order.lifecycle.triggers.items()):
        monkeypatch.setitem(
            Order.lifecycle.triggers, name, dataclasses.replace(trigger, fast_apply=None)
        )
    slow = drive()  # eventsourcing's own trigger_event
    assert [(cls, list(fields)) for cls, fields in history(fast)] == [
        (cls, list(fields)) for cls, fields in history(slow)
    ]
    for (_, a), (_, b) in zip(history(fast), history(slow), strict=True):
        a.pop("originator_id")
        b.pop("originator_id")
        assert a == b
    assert (fast.version, fast.modified_on, fast.state, fast.items, fast.paid) == (
        slow.version,
        slow.modified_on,
        slow.state,
        slow.items,
        slow.paid,
    )
