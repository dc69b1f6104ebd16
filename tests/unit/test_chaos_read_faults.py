"""The ``store_read_fail`` fault: a store read fails like a write does when the database is
down. It parses and writes back, rejects bad values naming the entry, fails every read method
of the store protocol (and the start of a subscription) only while the plan says so, is
counted in coverage, and keeps runs deterministic."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from collaborative_blocks.errors import FaultPlanError, StoreUnavailableError
from collaborative_blocks.simulations import FaultPlan, OpType, run_simulation
from collaborative_blocks.simulations import faults as faults_module
from collaborative_blocks.simulations.checkers import Checker
from collaborative_blocks.simulations.faults import ACCEPTED_FORMS
from collaborative_blocks.simulations.scenarios import Scenario
from collaborative_blocks.simulations.world import Node, Phase, World
from collaborative_blocks.stores.base import EventStore, NewEvent
from collaborative_blocks.stores.memory import MemoryEventStore

STREAM = "reader-stream"
CONSUMER = "reader"

# -- the spec --------------------------------------------------------------------------------


def test_store_read_fail_parses_and_writes_back() -> None:
    plan = FaultPlan.parse("store_read_fail=0.2")
    assert plan.store_read_fail == 0.2
    assert plan.store_fail == 0.0
    assert plan.spec() == "store_read_fail=0.2"
    assert FaultPlan.parse(plan.spec()) == plan
    assert plan.faults() == ["store_read_fail"]
    assert plan.without("store_read_fail").is_empty
    assert plan.healed() == FaultPlan()


def test_store_read_fail_has_its_canonical_place_next_to_store_fail() -> None:
    plan = FaultPlan.parse("handler_error=0.1, store_read_fail=0.05, drop=0.1, store_fail=0.01")
    assert plan.spec() == "drop=0.1,store_fail=0.01,store_read_fail=0.05,handler_error=0.1"
    assert FaultPlan.parse(plan.spec()) == plan


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("store_read_fail=1.5", "store_read_fail=1.5"),
        ("store_read_fail=-0.1", "store_read_fail=-0.1"),
        ("store_read_fail=often", "store_read_fail=often"),
        ("store_read_fail=nan", "store_read_fail=nan"),
        ("store_read_fail=0.1,store_read_fail=0.2", "store_read_fail"),
        ("store_read_fail", "store_read_fail"),
    ],
)
def test_a_bad_store_read_fail_entry_is_a_fault_plan_error_naming_it(spec: str, named: str) -> None:
    with pytest.raises(FaultPlanError, match="Accepted") as caught:
        FaultPlan.parse(spec)
    assert named in str(caught.value)


@pytest.mark.parametrize("value", [1.01, -0.5, float("nan"), float("inf")])
def test_a_plan_built_with_a_bad_store_read_fail_is_a_fault_plan_error(value: float) -> None:
    with pytest.raises(FaultPlanError, match="store_read_fail"):
        FaultPlan(store_read_fail=value)


def test_the_accepted_forms_and_the_tables_list_store_read_fail() -> None:
    assert "store_read_fail=P" in ACCEPTED_FORMS
    assert "``store_read_fail=P``" in (faults_module.__doc__ or "")
    with pytest.raises(FaultPlanError) as caught:
        FaultPlan.parse("store_reed_fail=0.1")
    assert "store_read_fail=P" in str(caught.value)


# -- the fault -------------------------------------------------------------------------------


async def _first_event(store: EventStore) -> Any:
    events = store.subscribe(from_position=1)
    try:
        async for event in events:
            return event.stream
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
    return None


def _reads(store: EventStore) -> dict[str, Callable[[], Awaitable[Any]]]:
    """One call of every read method of the store protocol, as a JSON-able result."""

    async def read() -> Any:
        return len(await store.read(STREAM))

    async def read_all() -> Any:
        return len(await store.read_all())

    async def max_position() -> Any:
        return await store.max_position()

    async def stream_version() -> Any:
        return await store.stream_version(STREAM)

    async def streams() -> Any:
        return [info.stream for info in await store.streams()]

    async def stats() -> Any:
        return (await store.stats()).events

    async def consumer_position() -> Any:
        return await store.consumer_position(CONSUMER)

    async def has_processed() -> Any:
        return await store.has_processed(CONSUMER, "message-1")

    async def latest_snapshot() -> Any:
        return await store.latest_snapshot(STREAM) is not None

    async def subscribe() -> Any:
        return await _first_event(store)

    return {
        "read": read,
        "read_all": read_all,
        "max_position": max_position,
        "stream_version": stream_version,
        "streams": streams,
        "stats": stats,
        "consumer_position": consumer_position,
        "has_processed": has_processed,
        "latest_snapshot": latest_snapshot,
        "subscribe": subscribe,
    }


#: The read methods of the EventStore protocol (subscribe: its start).
READ_METHODS = tuple(_reads(MemoryEventStore("memory://")))


class _Reader(Scenario):
    """One node whose client calls every read method of its store, and appends, in both
    phases; a failed call is recorded as a FAIL operation named after the method."""

    name = "reader"
    nodes = ("reader",)
    safety_seconds = 10.0
    liveness_seconds = 5.0
    rounds = 10

    async def setup(self, world: World) -> None:
        await world.durable.append(STREAM, [NewEvent("reader:Happened", b"{}")])

    async def start_node(self, world: World, node: Node) -> None:
        return None

    async def workload(self, world: World, phase: Phase) -> None:
        node = world.node("reader")
        for _ in range(self.rounds):
            for f, action in _reads(node.store).items():
                await world.operation(
                    "client", f, None, action, definite_failures=(StoreUnavailableError,)
                )

            async def append(store: EventStore = node.store) -> Any:
                await store.append("reader-writes", [NewEvent("reader:Wrote", b"{}")])
                return None

            await world.operation(
                "client", "append", None, append, definite_failures=(StoreUnavailableError,)
            )
            await world.clock.sleep(0.5)

    async def settled(self, world: World) -> bool:
        return True

    def checkers(self) -> Sequence[Checker]:
        return ()


def _failed(spec: str, seed: int = 1) -> tuple[Counter[str], Counter[str], dict[str, int]]:
    """Failed calls per method in the safety and the liveness phase, and the coverage."""
    result = run_simulation(_Reader(), seed, spec, check_coverage=False)
    safety_end = result.phase_ends["safety"]
    safety: Counter[str] = Counter()
    liveness: Counter[str] = Counter()
    for op in result.history:
        if op.type is OpType.FAIL:
            assert op.error is not None, op
            assert "StoreUnavailableError" in op.error, op
            (safety if op.time <= safety_end else liveness)[op.f] += 1
    return safety, liveness, dict(result.coverage)


def test_without_the_fault_no_read_ever_fails() -> None:
    for spec in ("none", "store_fail=0.5", "drop=0.2,slow_write=0.5:0.1"):
        safety, liveness, coverage = _failed(spec)
        assert not set(READ_METHODS) & set(safety), spec
        assert not liveness, spec
        assert "store_read_fail" not in coverage


def test_a_certain_read_fault_fails_every_read_method_and_only_reads() -> None:
    safety, liveness, coverage = _failed("store_read_fail=1")
    rounds = _Reader.rounds
    assert safety == Counter({f: rounds for f in READ_METHODS})
    assert "append" not in safety  # writes are store_fail's
    assert not liveness  # the liveness phase injects nothing
    assert coverage["store_read_fail"] == rounds * len(READ_METHODS)


def test_some_reads_fail_and_each_failure_is_counted() -> None:
    safety, liveness, coverage = _failed("store_read_fail=0.3", seed=4)
    failed = sum(safety.values())
    calls = _Reader.rounds * len(READ_METHODS)
    assert 0 < failed < calls
    assert not liveness
    assert coverage["store_read_fail"] == failed


def test_read_faults_are_deterministic() -> None:
    spec = "store_read_fail=0.3"
    first = run_simulation(_Reader(), 7, spec, check_coverage=False)
    again = run_simulation(_Reader(), 7, spec, check_coverage=False)
    other = run_simulation(_Reader(), 8, spec, check_coverage=False)
    assert first.digest == again.digest
    assert first.coverage == again.coverage
    assert first.digest != other.digest


def test_a_scenario_under_read_faults_replays_to_the_same_digest() -> None:
    spec = "drop=0.05,store_fail=0.02,store_read_fail=0.1"
    first = run_simulation("transfers", 3, spec, check_coverage=False)
    again = run_simulation("transfers", 3, spec, check_coverage=False)
    assert first.coverage.get("store_read_fail", 0) > 0
    assert first.digest == again.digest
    assert first.coverage == again.coverage
    assert first.faults == FaultPlan.parse(spec).spec()
