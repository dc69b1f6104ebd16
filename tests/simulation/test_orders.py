"""The ``orders`` scenario: the workflow engine's saga under the simulator's faults, and its
checkers, which must fail on histories that break their invariants."""

from __future__ import annotations

from typing import Any

import pytest

from collaborative_blocks.core.messaging.connector import IDEMPOTENCY_KEY
from collaborative_blocks.core.messaging.envelope import Message, MessageType
from collaborative_blocks.simulations import FaultPlan, run_simulation
from collaborative_blocks.simulations.results import History, OpType
from collaborative_blocks.simulations.scenarios.orders import (
    CHARGED,
    REFUNDED,
    RELEASED,
    RESERVED,
    SHIPPED,
    STOCKED,
    OrdersScenario,
    OutOfStock,
    Refused,
    _reserve,
    _Target,
    check_dependency_order,
    check_every_run_finishes,
    check_money_conserved,
    check_saga_atomicity,
    check_stock_never_negative,
    stock_stream,
)
from collaborative_blocks.stores.base import EventStore, NewEvent
from collaborative_blocks.stores.memory import MemoryEventStore

ORDER: Any = {
    "order": "o-0-0",
    "sku": "tea",
    "qty": 2,
    "amount": 10,
    "card": "ok",
    "fraud": False,
    "address": "street",
}


@pytest.mark.parametrize("seed", range(8))
def test_default_faults_keep_the_saga_invariants(seed: int) -> None:
    result = run_simulation("orders", seed)
    assert result.ok, "\n".join(str(v) for v in result.violations[:3]) + str(
        result.missing_coverage
    )
    assert result.coverage["compensation"]
    assert result.coverage["breaker_open"]
    orders = [op for op in result.history if op.f == "order" and op.type is OpType.INVOKE]
    # Clients wait for each order to finish, so the safety phase may stop the last ones.
    assert len(orders) >= OrdersScenario.clients * OrdersScenario.orders_per_client // 2


def test_the_same_seed_gives_the_same_digest() -> None:
    first = run_simulation("orders", 11)
    again = run_simulation("orders", 11)
    assert first.digest == again.digest
    assert first.digest != run_simulation("orders", 12).digest


def test_without_faults_only_business_failures_compensate() -> None:
    result = run_simulation("orders", 5, "none", check_coverage=False)
    assert result.ok, [str(v) for v in result.violations]
    read: Any = [op for op in result.history if op.f == "read"][-1].value
    invoked: dict[str, Any] = {
        str(value["order"]): value
        for op in result.history
        if op.f == "order" and op.type is OpType.INVOKE and isinstance(value := op.value, dict)
    }
    for order, run in read["runs"].items():
        asked = invoked[order]
        doomed = asked["card"] == "declined" or asked["fraud"] or asked["address"] == "nowhere"
        if not doomed and run["status"] != "completed":
            # Only running out of stock may stop an order that asked for nothing wrong.
            assert run["steps"]["reserve"] == "failed", (order, run)
        if doomed:
            assert run["status"] in ("compensated", "failed"), (order, run)
    assert result.coverage.get("breaker_open", 0) == 0  # nothing failed that opens one


# -- the checkers fail on bad histories ------------------------------------------------------------


def _history(runs: dict[str, Any], effects: dict[str, Any], stock: Any = None) -> History:
    history = History()
    invoke = history.append(0.0, "client-0", OpType.INVOKE, "order", ORDER)
    history.append(1.0, "client-0", OpType.OK, "order", {"order": "o-0-0", "status": "x"})
    assert invoke.index == 0
    value: Any = {
        "runs": runs,
        "effects": effects,
        "stock": stock or {"tea": {"level": 8, "lowest": 0}},
    }
    history.append(2.0, "checker", OpType.OK, "read", value)
    return history


def _run(status: str, steps: dict[str, str], events: list[list[Any]] | None = None) -> Any:
    return {
        "status": status,
        "finished": status not in ("running", "pending"),
        "steps": steps,
        "compensated": [s for s, v in steps.items() if v == "compensated"],
        "events": events or [],
    }


COMPLETE = {
    "reserve": "completed",
    "fraud": "completed",
    "charge": "completed",
    "ship": "completed",
}
APPLIED = {
    RESERVED: [["o-0-0:reserve", 10, 2]],
    CHARGED: [["o-0-0:charge", 20, 10]],
    SHIPPED: [["o-0-0:ship", 30, 0]],
}


def test_a_complete_consistent_history_passes() -> None:
    history = _history({"o-0-0": _run("completed", COMPLETE)}, {"o-0-0": APPLIED})
    for check in (
        check_saga_atomicity,
        check_dependency_order,
        check_stock_never_negative,
        check_money_conserved,
        check_every_run_finishes,
    ):
        assert check(history, {}) == [], check.__name__


def test_atomicity_catches_an_effect_left_behind_and_a_double_effect() -> None:
    steps = {"reserve": "compensated", "fraud": "completed", "charge": "compensated"}
    left = {RESERVED: APPLIED[RESERVED], CHARGED: APPLIED[CHARGED], RELEASED: [["k", 40, 2]]}
    found = check_saga_atomicity(
        _history({"o-0-0": _run("compensated", steps)}, {"o-0-0": left}), {}
    )
    assert [v.invariant for v in found] == ["saga_atomicity"]
    assert "orders:Charged effect of step charge" in found[0].message
    assert found[0].witness[0].f == "order"  # the order's own operations are the witness

    twice = {**APPLIED, CHARGED: APPLIED[CHARGED] * 2}
    found = check_saga_atomicity(
        _history({"o-0-0": _run("completed", COMPLETE)}, {"o-0-0": twice}), {}
    )
    assert any("2 orders:Charged effects" in v.message for v in found)


def test_dependency_order_catches_a_step_started_too_early() -> None:
    events = [
        ["AttemptStarted", "reserve", 1],
        ["AttemptStarted", "charge", 2],  # before reserve completed
        ["StepCompleted", "reserve", 3],
        ["StepCompleted", "charge", 4],
    ]
    history = _history({"o-0-0": _run("completed", COMPLETE, events)}, {"o-0-0": APPLIED})
    found = check_dependency_order(history, {})
    assert len(found) == 1
    assert "charge started" in found[0].message

    swapped = {**APPLIED, SHIPPED: [["o-0-0:ship", 5, 0]]}  # shipped before it was charged
    found = check_dependency_order(
        _history({"o-0-0": _run("completed", COMPLETE)}, {"o-0-0": swapped}), {}
    )
    assert len(found) == 1
    assert "applied ship" in found[0].message


def test_stock_money_and_liveness_checkers_fail_when_they_should() -> None:
    negative = _history({}, {}, {"tea": {"level": 0, "lowest": -1}})
    assert [v.invariant for v in check_stock_never_negative(negative, {})] == [
        "stock_never_negative"
    ]
    refunded_too_much = {**APPLIED, REFUNDED: [["o-0-0:charge:compensate", 40, 10]]}
    history = _history({"o-0-0": _run("completed", COMPLETE)}, {"o-0-0": refunded_too_much})
    found = check_money_conserved(history, {})
    assert found
    assert "completed orders total 10" in found[0].message
    running = _history({"o-0-0": _run("running", {"reserve": "running"})}, {})
    assert [v.invariant for v in check_every_run_finishes(running, {})] == ["every_run_finishes"]


# -- the targets decide once per idempotency key ----------------------------------------------


class _QuietWorld:
    """What a target asks of the world: its fault plan never fires here."""

    plan = FaultPlan.parse("none")

    def chance(self, kind: str, probability: float) -> bool:
        return False


class _Node:
    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.state: dict[str, Any] = {}


def _command(name: str, key: str, **payload: Any) -> Message:
    return Message(MessageType.COMMAND, name, payload, headers={IDEMPOTENCY_KEY: key})


async def test_a_target_decides_each_key_once_and_a_tombstone_refuses_a_late_request() -> None:
    store = MemoryEventStore()
    await store.append(stock_stream("tea"), [NewEvent(STOCKED, b'{"sku":"tea","qty":3}')])
    target = _Target(_QuietWorld(), _Node(store))  # type: ignore[arg-type]
    reserve = target.forward(lambda p: stock_stream(p["sku"]), _reserve)
    release = target.undo(lambda p: stock_stream(p["sku"]), RELEASED, "reservation", "qty")
    ctx: Any = None

    first = await reserve(_command("reserve", "a:reserve", order="a", sku="tea", qty=2), ctx)
    again = await reserve(_command("reserve", "a:reserve", order="a", sku="tea", qty=2), ctx)
    assert first == again == {"order": "a", "reservation": "a:reserve"}
    with pytest.raises(OutOfStock):  # 1 left: refused, and the refusal is recorded
        await reserve(_command("reserve", "b:reserve", order="b", sku="tea", qty=2), ctx)
    await release(
        _command("release", "a:reserve:compensate", order="a", sku="tea", reservation="a:reserve"),
        ctx,
    )
    with pytest.raises(OutOfStock):  # stock is back, but b's answer stays the same
        await reserve(_command("reserve", "b:reserve", order="b", sku="tea", qty=2), ctx)

    # c's compensation arrives before c's request (never decided): a tombstone refuses it.
    await release(
        _command("release", "c:reserve:compensate", order="c", sku="tea", reservation="c:reserve"),
        ctx,
    )
    with pytest.raises(Refused):
        await reserve(_command("reserve", "c:reserve", order="c", sku="tea", qty=1), ctx)
    topics = [e.topic for e in await store.read(stock_stream("tea"))]
    assert topics.count(RESERVED) == 1
    assert topics.count(RELEASED) == 1  # a's, once; c undid nothing
