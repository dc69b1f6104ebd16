"""RealTimeSyncEngine: topology, propagation through the broker in topological order,
awaitable consistency on the injected clock, restart from the log, conflicts, bad input.

The resolvers here are small test doubles written against the public resolver protocol, so
these tests exercise the engine alone (the built-in resolvers have their own tests).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from typer.testing import CliRunner

from collaborative_blocks.cli import app
from collaborative_blocks.core.clock import VirtualClock
from collaborative_blocks.core.messaging.broker import MessageBroker, MessageContext
from collaborative_blocks.core.messaging.envelope import Message
from collaborative_blocks.core.runtime import Runtime
from collaborative_blocks.core.settings import load_settings
from collaborative_blocks.core.sync.engine import RealTimeSyncEngine
from collaborative_blocks.core.sync.resolvers import (
    CONVERGENT,
    Conflict,
    ConflictStatus,
    JSONValue,
    Ordering,
    ResolverProperty,
    ResolverRegistry,
    VectorClock,
    Write,
)
from collaborative_blocks.errors import (
    ChangeOutcomeUnknownError,
    DependencyCycleError,
    DuplicateSystemError,
    FutureTimestampError,
    ResolverFailedError,
    StoreUnavailableError,
    SyncError,
    SyncSerializationError,
    TopologyError,
    TransportUnavailableError,
    UnknownDependencyError,
    UnknownNodeError,
    UnknownSystemError,
)
from collaborative_blocks.stores import EventStore, open_store
from collaborative_blocks.stores.memory import MemoryEventStore


class LatestWrites:
    """Last-write-wins over a grow-only set of writes: trivially a join semi-lattice.

    Concurrent writes among the newest ones are reported as a resolved conflict.
    """

    name = "test_lww"
    properties: frozenset[ResolverProperty] = CONVERGENT

    def initial(self) -> frozenset[Write]:
        return frozenset()

    def apply(self, state: frozenset[Write], write: Write) -> frozenset[Write]:
        return state | {write}

    def merge(self, left: frozenset[Write], right: frozenset[Write]) -> frozenset[Write]:
        return left | right

    def value(self, state: frozenset[Write]) -> JSONValue:
        return max(state, key=Write.order_key).value if state else None

    def conflicts(self, state: frozenset[Write]) -> Sequence[Conflict]:
        newest = [
            w for w in state if not any(o.compare(w) is Ordering.AFTER for o in state if o != w)
        ]
        if len(newest) < 2:
            return []
        siblings = tuple(sorted(newest, key=Write.order_key))
        return [
            Conflict(
                siblings[0].key, self.name, siblings, ConflictStatus.RESOLVED, self.value(state)
            )
        ]

    def to_json(self, state: frozenset[Write]) -> JSONValue:
        return [w.to_json() for w in sorted(state, key=Write.order_key)]

    def from_json(self, data: JSONValue) -> frozenset[Write]:
        assert isinstance(data, list)
        return frozenset(Write.from_json(w) for w in data)


class Exploding(LatestWrites):
    name = "exploding"

    def apply(self, state: frozenset[Write], write: Write) -> frozenset[Write]:
        if write.value == "boom":
            raise ZeroDivisionError("resolver bug")
        return super().apply(state, write)


def registry() -> ResolverRegistry:
    table = ResolverRegistry([LatestWrites(), Exploding()], default="test_lww")
    table.assign("fragile.*", "exploding")
    return table


@pytest.fixture
async def store(tmp_path: Path) -> EventStore:
    opened = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}")
    yield opened  # type: ignore[misc]
    await opened.close()


def engine_on(
    store: EventStore, clock: VirtualClock | None = None, **kwargs: object
) -> RealTimeSyncEngine:
    return RealTimeSyncEngine(
        store=store,
        clock=clock or VirtualClock(),
        resolvers=registry(),
        **kwargs,  # type: ignore[arg-type]
    )


async def chain(engine: RealTimeSyncEngine, systems: Sequence[str]) -> None:
    await engine.register_system(systems[0])
    for upstream, system in itertools.pairwise(systems):
        await engine.register_system(system, [upstream])


async def test_a_change_reaches_every_downstream_system_in_topological_order(
    store: EventStore,
) -> None:
    engine = engine_on(store)
    await chain(engine, ["crm", "billing", "ledger", "reports"])
    await engine.register_system("audit")  # not downstream of crm: never receives its data
    order: list[str] = []
    original = engine._receive

    async def spy(system_id: str, message: Message, ctx: MessageContext) -> None:
        order.append(system_id)
        await original(system_id, message, ctx)

    engine._receive = spy  # type: ignore[method-assign]
    record = await engine.propagate_change("crm", {"customer-1.email": "a@example.com"})
    assert record.change_id > 0
    assert await engine.ensure_consistency("customer-1.email", 5)
    assert order == ["billing", "ledger", "reports"]
    for system in ("crm", "billing", "ledger", "reports"):
        assert engine.value(system, "customer-1.email") == "a@example.com"
    assert engine.value("audit", "customer-1.email") is None
    assert engine.downstream("crm") == ["billing", "ledger", "reports"]
    assert dict(engine.vector_clock("reports")) == {"crm": 1}
    await engine.close()


async def test_a_diamond_delivers_once_per_system(store: EventStore) -> None:
    engine = engine_on(store)
    await engine.register_system("a")
    await engine.register_system("b", ["a"])
    await engine.register_system("c", ["a"])
    await engine.register_system("d", ["b", "c"])
    for n in range(3):
        await engine.propagate_change("a", {"k": n})
    assert await engine.ensure_consistency("k", 5)
    assert {engine.value(s, "k") for s in "abcd"} == {2}
    await engine.close()


async def test_topology_errors_register_nothing(store: EventStore) -> None:
    engine = engine_on(store)
    await engine.register_system("a")
    with pytest.raises(DuplicateSystemError, match="already registered"):
        await engine.register_system("a")
    with pytest.raises(UnknownDependencyError, match="register dependencies first"):
        await engine.register_system("b", ["a", "ghost"])
    with pytest.raises(DependencyCycleError, match="b -> b"):
        await engine.register_system("b", ["b"])
    with pytest.raises(TopologyError, match="list of system ids"):
        await engine.register_system("b", "a")
    with pytest.raises(TopologyError, match="must match"):
        await engine.register_system("b*", ["a"])
    assert engine.systems == ["a"]
    await engine.register_system("b", ["a"])  # the failures left no trace
    assert engine.systems == ["a", "b"]
    await engine.close()


async def test_bad_changes_write_nothing_and_change_no_replica(store: EventStore) -> None:
    engine = engine_on(store)
    await chain(engine, ["a", "b"])
    await engine.propagate_change("a", {"fragile.x": "ok"})
    assert await engine.ensure_consistency("fragile.x", 5)
    before = await store.max_position()
    with pytest.raises(UnknownSystemError, match="register_system"):
        await engine.propagate_change("nobody", {"k": 1})
    with pytest.raises(SyncSerializationError, match="not JSON"):
        await engine.propagate_change("a", {"k": 1, "j": {1, 2}})  # type: ignore[dict-item]
    with pytest.raises(SyncSerializationError):
        await engine.propagate_change("a", {"k": float("inf")})
    with pytest.raises(ResolverFailedError, match="ZeroDivisionError"):
        await engine.propagate_change("a", {"plain": 1, "fragile.x": "boom"})
    # All or nothing: "plain" was in the same change as the failing key.
    assert engine.value("a", "plain") is None
    assert engine.value("a", "fragile.x") == "ok"
    assert dict(engine.vector_clock("a")) == {"a": 1}
    failed = engine.conflicts("fragile.x")
    assert [c.status for c in failed] == [ConflictStatus.FAILED]
    assert "resolver bug" in (failed[0].error or "")
    # Only the failure record was written (a conflict event), no change.
    events = await store.read_all(from_position=before + 1)
    assert [e.stream for e in events] == ["cb-sync:sync:conflicts"]
    await engine.close()


async def test_ensure_consistency_times_out_on_the_clock_and_says_who_differs(
    store: EventStore,
) -> None:
    clock = VirtualClock()
    engine = engine_on(store, clock)
    await chain(engine, ["a", "b", "c"])
    gate = asyncio.Event()
    original = engine._receive

    async def slow_c(system_id: str, message: Message, ctx: MessageContext) -> None:
        if system_id == "c":
            await gate.wait()
        await original(system_id, message, ctx)

    engine._receive = slow_c  # type: ignore[method-assign]
    await engine.propagate_change("a", {"k": "v1"})
    waiting = asyncio.ensure_future(engine.ensure_consistency("k", 10))
    for _ in range(3):  # let it start its timer on the virtual clock (yields, not waits)
        await asyncio.sleep(0)
    assert clock.pending >= 1
    await clock.advance(9.9)
    assert not waiting.done()
    await clock.advance(0.1)
    assert await waiting is False
    difference = engine.last_inconsistency
    assert difference is not None
    assert difference.behind == {"c": 1}
    assert difference.values == {"a": "v1", "b": "v1", "c": None}
    assert difference.lagging == ["c"]
    gate.set()
    assert await engine.ensure_consistency("k", 10)  # woken by c's application, not time
    assert engine.last_inconsistency is None
    await engine.close()


async def test_replicas_survive_a_restart(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    store = await open_store(url)
    engine = engine_on(store)
    await chain(engine, ["a", "b", "c"])
    await engine.propagate_change("a", {"k": 1, "other": "x"})
    await engine.propagate_change("b", {"k": 2})
    assert await engine.ensure_consistency("k", 5)
    await engine.close()
    await store.close()

    store = await open_store(url)
    restarted = engine_on(store, VirtualClock(start=1_700_000_100.0))  # time went on
    await chain(restarted, ["a", "b", "c"])
    assert [restarted.value(s, "k") for s in "abc"] == [1, 2, 2]
    assert restarted.value("c", "other") == "x"
    assert dict(restarted.vector_clock("c")) == {"a": 2, "b": 1}  # one dot per write
    assert await restarted.ensure_consistency("k", 0)
    # The restarted source keeps counting where it stopped: no dot is reused.
    record = await restarted.propagate_change("a", {"k": 3})
    assert record.writes[0].dot == ("a", 3)
    assert await restarted.ensure_consistency("k", 5)
    assert [restarted.value(s, "k") for s in "abc"] == [3, 3, 3]
    await restarted.close()
    await store.close()


async def test_concurrent_writes_are_recorded_conflicts_and_metrics(store: EventStore) -> None:
    reader = InMemoryMetricReader()
    clock = VirtualClock()
    engine = engine_on(store, clock, meter_provider=MeterProvider(metric_readers=[reader]))
    await engine.register_system("a")
    await engine.register_system("b")
    await engine.register_system("c", ["a", "b"])
    await engine.propagate_change("a", {"k": "from a"})
    await clock.advance(1)
    await engine.propagate_change("b", {"k": "from b"})
    assert await engine.ensure_consistency("k", 5)
    assert engine.value("c", "k") == "from b"  # the later timestamp wins
    assert engine.value("a", "k") == "from a"  # a never receives b's changes
    [conflict] = engine.conflicts("k")
    assert conflict.status is ConflictStatus.RESOLVED
    assert sorted(w.writer for w in conflict.siblings) == ["a", "b"]
    stored = await store.read("cb-sync:sync:conflicts")
    assert len(stored) == 1

    points: dict[str, list[tuple[dict[str, object], object]]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    points.setdefault(metric.name, []).append(
                        (dict(point.attributes or {}), getattr(point, "value", None))
                    )
    assert ({"resolver": "test_lww", "status": "resolved"}, 1) in points["cb.sync.conflicts"]
    assert {"system": "c"} in [attrs for attrs, _ in points["cb.sync.replication.lag"]]
    assert "cb.sync.propagation.latency" in points
    await engine.close()


def test_bench_sync_quick_json_reports_both_cases() -> None:
    result = CliRunner().invoke(app, ["bench", "sync", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["benchmark"] == "sync"
    cases = {case["key"]: case for case in report["cases"]}
    assert set(cases) == {"chain", "chain-concurrent", "vector-clock"}
    clocks = cases["vector-clock"]
    assert clocks["measurements"]["ours"]["median"] > 0
    chain_case = cases["chain"]
    if chain_case["unavailable"] is None:  # the resolver plugin is installed
        assert chain_case["measurements"]["ours"]["median"] > 0


async def test_concurrent_changes_from_one_source_each_count_the_previous(
    store: EventStore,
) -> None:
    engine = engine_on(store)
    await chain(engine, ["a", "b", "c"])
    records = await asyncio.gather(*(engine.propagate_change("a", {"k": n}) for n in range(20)))
    dots = sorted(record.dot for record in records)
    assert dots == [("a", n) for n in range(1, 21)]  # no counter handed out twice
    assert await engine.ensure_consistency("k", 5)
    assert [engine.value(s, "k") for s in "abc"] == [19, 19, 19]
    assert engine.conflicts("k") == []  # one writer's writes are causally ordered
    await engine.close()


async def test_a_change_the_store_refuses_leaves_no_replica_changed(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_on(store)
    await chain(engine, ["a", "b"])
    await engine.propagate_change("a", {"k": "kept"})
    assert await engine.ensure_consistency("k", 5)

    async def refuse(*args: object, **kwargs: object) -> list[list[int]]:
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(store, "append_many", refuse)
        with pytest.raises(OSError, match="disk full"):
            await engine.propagate_change("a", {"k": "lost", "other": 1})
    assert engine.value("a", "k") == "kept"
    assert engine.value("a", "other") is None
    assert await engine.ensure_consistency("k", 0)  # nothing is waited for in vain
    record = await engine.propagate_change("a", {"k": "next"})
    assert await engine.ensure_consistency("k", 5)
    assert [engine.value(s, "k") for s in "ab"] == ["next", "next"]
    assert record.change_id == await store.max_position()
    await engine.close()


async def test_changes_travel_over_a_durable_broker_too(store: EventStore) -> None:
    runtime = Runtime(settings=load_settings({}), store=store)
    broker = MessageBroker("log://", runtime=runtime, store=store)
    engine = RealTimeSyncEngine(runtime, store=store, broker=broker, resolvers=registry())
    await chain(engine, ["a", "b", "c"])
    for n in range(5):
        await engine.propagate_change("a", {"k": n})
    assert await engine.ensure_consistency("k", 30)
    assert [engine.value(s, "k") for s in "abc"] == [4, 4, 4]
    await engine.close()
    await broker.close()


async def test_a_future_timestamp_or_a_clock_from_an_unknown_node_is_refused(
    store: EventStore,
) -> None:
    clock = VirtualClock()
    engine = engine_on(store, clock, max_clock_skew=60)
    await chain(engine, ["a", "b"])
    with pytest.raises(FutureTimestampError, match="clock skew"):
        await engine.propagate_change("a", {"k": 1}, timestamp=clock.now() + 3600)
    with pytest.raises(UnknownNodeError, match="'ghost'"):
        await engine.propagate_change("a", {"k": 1}, seen={"ghost": 3})
    assert await store.read("cb-sync:sync:changes") == []
    assert engine.value("a", "k") is None
    # Within the allowed skew, and with a clock of known systems, the change goes through.
    record = await engine.propagate_change("a", {"k": 2}, timestamp=clock.now() + 30, seen={"b": 1})
    assert record.writes[0].timestamp == clock.now() + 30
    assert dict(record.writes[0].clock) == {"a": 1, "b": 1}
    assert await engine.ensure_consistency("k", 5)
    await engine.close()


async def test_a_systems_own_change_during_a_conflict_append_is_not_lost(
    store: EventStore,
) -> None:
    clock = VirtualClock()
    engine = engine_on(store, clock)
    await engine.register_system("a")
    await engine.register_system("x")
    await engine.register_system("b", ["a", "x"])
    gate, recording = asyncio.Event(), asyncio.Event()
    original = engine._record_conflicts

    async def slow_record(conflicts: Sequence[Conflict]) -> None:
        if conflicts:
            recording.set()
            await gate.wait()
        await original(conflicts)

    engine._record_conflicts = slow_record  # type: ignore[method-assign]
    await engine.propagate_change("a", {"k": "from a"})
    await engine.propagate_change("x", {"k": "from x"})  # concurrent with a's: a conflict at b
    await recording.wait()  # b is storing that conflict, its replica not yet updated
    await clock.advance(1)
    await engine.propagate_change("b", {"k": "from b"})  # b's own, later write
    gate.set()
    assert await engine.ensure_consistency("k", 5)
    assert engine.value("b", "k") == "from b"  # b's own write survived the conflict fold
    await engine.close()


async def test_a_change_whose_delivery_is_lost_is_repaired_after_repair_after(
    store: EventStore,
) -> None:
    """A delivery that never arrives (dead-lettered, say) leaves a replica behind only until
    the repair task applies the change itself, ``repair_after`` seconds later."""
    clock = VirtualClock()
    provider_reader = InMemoryMetricReader()
    engine = engine_on(
        store,
        clock,
        repair_after=20,
        meter_provider=MeterProvider(metric_readers=[provider_reader]),
    )
    await chain(engine, ["a", "b", "c"])
    original = engine._receive
    lost: list[str] = []

    async def lose_c(system_id: str, message: Message, ctx: MessageContext) -> None:
        if system_id == "c":
            lost.append(message.id)  # acknowledged and gone, as if dead-lettered
            return
        await original(system_id, message, ctx)

    engine._receive = lose_c  # type: ignore[method-assign]
    await engine.propagate_change("a", {"k": "v1"})
    for _ in range(50):
        await asyncio.sleep(0)
    assert lost
    assert engine.value("b", "k") == "v1"
    assert engine.value("c", "k") is None
    await clock.advance(19.9)
    assert engine.value("c", "k") is None  # not before repair_after
    await clock.advance(0.2)
    for _ in range(10):
        await asyncio.sleep(0)
    assert engine.value("c", "k") == "v1"
    assert engine.inconsistency("k") is None
    assert await engine.ensure_consistency("k", 0)
    data = provider_reader.get_metrics_data()
    repairs = [
        point.value
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "cb.sync.repairs"
        for point in metric.data.data_points
    ]
    assert repairs == [1]
    await engine.close()


async def test_repair_applies_what_is_outstanding_and_conflicts_first(store: EventStore) -> None:
    """``repair()`` by hand (the background task off): lost deliveries to a diamond's sink
    are applied, in topological order, with the conflict they make stored first; a late
    delivery of a repaired change is a duplicate and changes nothing."""
    clock = VirtualClock()
    engine = engine_on(store, clock, repair_after=None)
    await engine.register_system("a")
    await engine.register_system("x")
    await engine.register_system("sink", ["a", "x"])
    original = engine._receive
    held: list[tuple[Message, MessageContext]] = []

    async def hold(system_id: str, message: Message, ctx: MessageContext) -> None:
        held.append((message, ctx))

    engine._receive = hold  # type: ignore[method-assign]
    await engine.propagate_change("a", {"k": "from a"})
    await engine.propagate_change("x", {"k": "from x"})  # concurrent: a conflict at sink
    for _ in range(50):
        await asyncio.sleep(0)
    assert len(held) == 2
    assert engine.value("sink", "k") is None
    assert engine.inconsistency("k") is not None
    assert await engine.repair(older_than=60) == 0  # nothing outstanding that long
    assert await engine.repair() == 2
    assert engine.inconsistency("k") is None
    assert engine.value("sink", "k") == "from x"  # later timestamp wins in test_lww
    assert [c.status for c in engine.conflicts("k")] == [ConflictStatus.RESOLVED]
    assert await engine.repair() == 0  # idempotent
    for message, ctx in held:  # the late deliveries: duplicates
        await original("sink", message, ctx)
    assert engine.value("sink", "k") == "from x"
    assert len(engine.conflicts("k")) == 1
    await engine.close()


async def test_a_redelivered_change_is_forwarded_even_if_its_replica_holds_it() -> None:
    """The first delivery applied the change and then failed before its forwards went out:
    the redelivery (attempt 2) forwards it although the replica already holds it.

    On the in-memory store: the broker records the failed attempt in the store before the
    retry, and a store doing real I/O on threads would race the virtual clock below."""
    clock = VirtualClock()
    engine = engine_on(MemoryEventStore(), clock, repair_after=None)
    await chain(engine, ["a", "b", "c"])
    original = engine._receive
    failed: list[str] = []

    async def fail_after_apply(system_id: str, message: Message, ctx: MessageContext) -> None:
        await original(system_id, message, ctx)
        if system_id == "b" and not failed:
            failed.append(message.id)
            raise ConnectionError("lost the connection before the forwards were sent")

    engine._receive = fail_after_apply  # type: ignore[method-assign]
    await engine.propagate_change("a", {"k": "v"})
    waiting = asyncio.ensure_future(engine.ensure_consistency("k", 30))
    for _ in range(400):  # the broker's retry backoff runs on the virtual clock
        if waiting.done():
            break
        await clock.advance(0.1)
        for _ in range(5):
            await asyncio.sleep(0)
    assert waiting.done()
    assert waiting.result() is True
    assert failed
    assert engine.value("c", "k") == "v"
    await engine.close()


async def test_repair_after_must_be_positive(store: EventStore) -> None:
    with pytest.raises(SyncError, match="repair_after"):
        engine_on(store, repair_after=0)
    with pytest.raises(SyncError, match="repair_after"):
        engine_on(store, repair_after=-5)


async def test_a_change_refused_during_an_outage_is_in_no_replica_and_settled_later(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store refuses reads as well as writes (a real outage): the engine cannot tell
    whether the change went through, says so (ChangeOutcomeUnknownError), shows it in no
    replica, and settles it from the log once the store answers: here it was not written, so
    it never appears (found by the replicas chaos scenario with store_read_fail: the undo
    re-read the log, failed, and left a value that was never written visible)."""
    engine = engine_on(store, repair_after=None)
    await chain(engine, ["a", "b"])
    await engine.propagate_change("a", {"k": "kept"})

    async def refuse_write(*args: object, **kwargs: object) -> list[list[int]]:
        raise StoreUnavailableError("write refused: the database is restarting")

    async def refuse_read(*args: object, **kwargs: object) -> list[object]:
        raise StoreUnavailableError("read refused: the database is restarting")

    with monkeypatch.context() as patch:
        patch.setattr(store, "append_many", refuse_write)
        patch.setattr(store, "read", refuse_read)
        with pytest.raises(ChangeOutcomeUnknownError, match="cannot be read"):
            await engine.propagate_change("a", {"k": "lost"})
    assert engine.value("a", "k") == "kept"
    assert await engine.ensure_consistency("k", 5)
    assert await engine.repair() == 0  # the store answers: the change is not in the log
    assert engine.value("a", "k") == "kept"
    assert engine.value("b", "k") == "kept"
    assert await engine.audit() == []
    # Refused outright (the log readable): the store's own error, nothing written.
    with monkeypatch.context() as patch:
        patch.setattr(store, "append_many", refuse_write)
        with pytest.raises(StoreUnavailableError, match="write refused"):
            await engine.propagate_change("a", {"k": "lost again"})
    assert engine.value("a", "k") == "kept"
    await engine.close()


async def test_a_change_in_doubt_that_went_through_reaches_every_replica_once_settled(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store commits the change, the connection drops, and the log cannot be read back:
    ChangeOutcomeUnknownError. Once the store answers, the repair finds the change in the
    log and applies it to its source and downstream."""
    engine = engine_on(store, repair_after=None)
    await chain(engine, ["a", "b", "c"])
    append_many, read = store.append_many, store.read

    async def commit_then_drop(requests: Any, *, tracking: Any = None) -> Any:
        await append_many(requests, tracking=tracking)
        raise StoreUnavailableError("connection lost after the commit (test)")

    async def refuse_read(*args: object, **kwargs: object) -> list[object]:
        raise StoreUnavailableError("read refused (test)")

    with monkeypatch.context() as patch:
        patch.setattr(store, "append_many", commit_then_drop)
        patch.setattr(store, "read", refuse_read)
        with pytest.raises(ChangeOutcomeUnknownError):
            await engine.propagate_change("a", {"k": "v"})
    assert store.read == read
    assert [engine.value(s, "k") for s in "abc"] == [None, None, None]
    assert await engine.repair() == 3  # found in the log: the source and both dependents
    assert [engine.value(s, "k") for s in "abc"] == ["v", "v", "v"]
    assert engine.inconsistency("k") is None
    assert await engine.audit() == []
    assert await engine.repair() == 0
    await engine.close()


async def test_the_repair_task_settles_a_change_in_doubt_by_itself() -> None:
    """The same, without calling repair(): the background task looks the change up
    repair_after seconds later and applies it everywhere."""
    clock = VirtualClock()
    store = MemoryEventStore()
    engine = engine_on(store, clock, repair_after=10)
    await chain(engine, ["a", "b"])
    append_many, read = store.append_many, store.read

    async def commit_then_drop(requests: Any, *, tracking: Any = None) -> Any:
        await append_many(requests, tracking=tracking)
        raise StoreUnavailableError("connection lost after the commit (test)")

    async def refuse_read(*args: object, **kwargs: object) -> list[object]:
        raise StoreUnavailableError("read refused (test)")

    store.append_many = commit_then_drop  # type: ignore[method-assign]
    store.read = refuse_read  # type: ignore[method-assign]
    with pytest.raises(ChangeOutcomeUnknownError):
        await engine.propagate_change("a", {"k": "v"})
    store.append_many = append_many  # type: ignore[method-assign]
    store.read = read  # type: ignore[method-assign]
    await clock.advance(9.9)
    assert engine.value("b", "k") is None
    await clock.advance(0.2)
    for _ in range(20):
        await asyncio.sleep(0)
    assert [engine.value(s, "k") for s in "ab"] == ["v", "v"]
    assert engine.inconsistency("k") is None
    await engine.close()


async def test_a_change_whose_acknowledgement_was_lost_is_recorded_and_delivered(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store commits the change, then the connection drops: StoreUnavailableError,
    although the change is in the log. The engine reads the log back and carries on as
    recorded, so the caller is not told 'failed' for a change every replica will show, and
    the next change takes a new dot (found with the store_lost_ack chaos fault: two changes
    with one dot, and replicas that differed from the log)."""
    engine = engine_on(store, repair_after=None)
    await chain(engine, ["a", "b"])
    append_many = store.append_many
    dropped: list[int] = []

    async def commit_then_drop(requests: Any, *, tracking: Any = None) -> Any:
        result = await append_many(requests, tracking=tracking)
        if not dropped:
            dropped.append(result[0][0])
            raise StoreUnavailableError("connection lost after the commit (test)")
        return result

    monkeypatch.setattr(store, "append_many", commit_then_drop)
    record = await engine.propagate_change("a", {"k": "v1"})
    assert dropped == [record.change_id]
    second = await engine.propagate_change("a", {"k": "v2"})
    assert second.dot != record.dot
    assert await engine.ensure_consistency("k", 5)
    assert [engine.value(s, "k") for s in "ab"] == ["v2", "v2"]
    assert await engine.audit() == []
    await engine.close()


async def test_a_conflict_record_whose_acknowledgement_was_lost_stays_known(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storing a conflict fails after the commit (the connection dropped): the conflict is in
    the log, so the engine must know it from then on (conflicts(key) lists it, the audit
    finds no logged conflict it does not know), and it is stored again with the next append
    in case it was not (found with the store_lost_ack chaos fault: a retried delivery found
    a different conflict and the logged one stayed unknown for good)."""
    engine = engine_on(store, repair_after=None)
    await engine.register_system("a")
    siblings = (
        Write("k", "from a", "a", 1.0, VectorClock({"a": 1})),
        Write("k", "from x", "x", 2.0, VectorClock({"x": 1})),
    )
    conflict = Conflict("k", "test_lww", siblings, ConflictStatus.RESOLVED, "from x")
    append_many = store.append_many

    async def commit_then_drop(requests: Any, *, tracking: Any = None) -> Any:
        await append_many(requests, tracking=tracking)
        raise StoreUnavailableError("connection lost after the commit (test)")

    with monkeypatch.context() as patch:
        patch.setattr(store, "append_many", commit_then_drop)
        with pytest.raises(StoreUnavailableError):
            await engine._record_conflicts([conflict])
    assert engine.conflicts("k") == [conflict]
    assert await engine.audit() == []
    await engine.propagate_change("a", {"other": 1})  # the next append stores it again
    assert len(await store.read(engine.conflicts_stream)) == 2
    assert engine.conflicts("k") == [conflict]
    await engine.close()


async def test_conflicts_are_loaded_once_the_read_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted engine whose first read of the conflict stream fails reads it again on the
    next call (it used to mark the stream loaded before reading it, and then never knew
    the recorded conflicts)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    store = await open_store(url)
    engine = engine_on(store, repair_after=None)
    await engine.register_system("a")
    await engine.register_system("x")
    await engine.register_system("b", ["a", "x"])
    await engine.propagate_change("a", {"k": "from a"})
    await engine.propagate_change("x", {"k": "from x"})
    assert await engine.ensure_consistency("k", 5)
    recorded = engine.conflicts("k")
    assert recorded
    await engine.close()

    restarted = engine_on(store, repair_after=None)
    read = store.read
    failures = []

    async def fail_once(stream: str, *args: object, **kwargs: object) -> object:
        if stream.endswith(":conflicts") and not failures:
            failures.append(stream)
            raise StoreUnavailableError("read refused once")
        return await read(stream, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "read", fail_once)
    with pytest.raises(StoreUnavailableError):
        await restarted.register_system("a")
    for system, deps in [("a", []), ("x", []), ("b", ["a", "x"])]:
        await restarted.register_system(system, deps)
    assert restarted.conflicts("k") == recorded
    await restarted.close()
    await store.close()


async def test_a_recorded_change_whose_sending_fails_is_returned_and_repaired_at_once() -> None:
    """The transport refuses the publish after the change is in the log: the change
    happened, so propagate_change returns it, and the repair applies it downstream without
    waiting repair_after (found with the chaos simulator's publish_fail fault: the caller
    was told the write failed although it was recorded)."""
    clock = VirtualClock()
    engine = engine_on(MemoryEventStore(), clock, repair_after=30)
    await chain(engine, ["a", "b", "c"])
    publish = engine.broker.publish
    refused: list[str] = []

    async def refuse(message: Message) -> Message:
        refused.append(message.name)
        raise TransportUnavailableError("the broker's server is restarting")

    engine.broker.publish = refuse  # type: ignore[method-assign]
    started = clock.now()
    record = await engine.propagate_change("a", {"k": "v"})
    assert refused
    assert record.change_id > 0
    engine.broker.publish = publish  # type: ignore[method-assign]
    for _ in range(20):
        await asyncio.sleep(0)
    assert clock.now() == started  # repaired at once, not repair_after later
    assert [engine.value(s, "k") for s in "abc"] == ["v", "v", "v"]
    assert engine.inconsistency("k") is None
    await engine.close()
