"""Vector clocks, writes, the resolver table and what each built-in resolver decides."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from collaborative_blocks import hookimpl
from collaborative_blocks.core.plugins import make_plugin_manager
from collaborative_blocks.core.sync import (
    ConflictResolver,
    ConflictStatus,
    JSONValue,
    Ordering,
    ResolverRegistry,
    VectorClock,
    Write,
    check_write,
)
from collaborative_blocks.errors import (
    FutureTimestampError,
    InvalidOperationError,
    InvalidWriteError,
    MergeFunctionError,
    PluginError,
    UnknownNodeError,
    UnknownResolverError,
    UnresolvedConflictError,
)
from collaborative_blocks.plugins.resolvers import (
    ApplicationSpecificResolver,
    GCounterResolver,
    LastWriteWinsResolver,
    LWWMapResolver,
    ORSetResolver,
    PNCounterResolver,
    SiblingFallback,
    VectorClockResolver,
)
from collaborative_blocks.testing.resolver_conformance import fold

BUILTIN_NAMES = [
    "application_specific",
    "g_counter",
    "last_write_wins",
    "lww_map",
    "or_set",
    "pn_counter",
    "vector_clock",
]


def vc(**counts: int) -> VectorClock:
    return VectorClock(counts)


def write(value: JSONValue, writer: str, timestamp: float, key: str = "k", **clock: int) -> Write:
    return Write(key, value, writer, timestamp, clock or {writer: 1})


# -- vector clocks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [
        (vc(), vc(), Ordering.EQUAL),
        (vc(a=1), vc(a=1), Ordering.EQUAL),
        (vc(a=1), vc(a=2), Ordering.BEFORE),
        (vc(a=2), vc(a=1), Ordering.AFTER),
        (vc(a=1), vc(a=1, b=1), Ordering.BEFORE),  # a missing node counts 0
        (vc(a=1, b=1), vc(a=1), Ordering.AFTER),
        (vc(a=1), vc(b=1), Ordering.CONCURRENT),
        (vc(a=2, b=1), vc(a=1, b=2), Ordering.CONCURRENT),
        (vc(a=2), vc(a=1, b=1), Ordering.CONCURRENT),
    ],
)
def test_compare(left: VectorClock, right: VectorClock, expected: Ordering) -> None:
    assert left.compare(right) is expected


def test_merge_is_the_elementwise_maximum_and_increment_returns_a_new_clock() -> None:
    a = vc(a=2, b=1)
    assert a.merge(vc(b=3, c=1)) == vc(a=2, b=3, c=1)
    bumped = a.increment("a")
    assert bumped == vc(a=3, b=1)
    assert a == vc(a=2, b=1)  # unchanged
    assert a.increment("z")["z"] == 1


def test_zero_counters_do_not_make_clocks_differ() -> None:
    assert VectorClock({"a": 1, "b": 0}) == vc(a=1)
    assert hash(VectorClock({"a": 1, "b": 0})) == hash(vc(a=1))
    assert len(VectorClock({"a": 0})) == 0


@pytest.mark.parametrize("bad", [{"a": -1}, {"a": 1.5}, {"a": True}, {"": 1}])
def test_a_malformed_clock_is_a_typed_error(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidWriteError, match="vector clock"):
        VectorClock(bad)


def test_clock_json_round_trip() -> None:
    clock = vc(b=2, a=1)
    assert VectorClock.from_json(clock.to_json()) == clock
    assert list(clock.to_json()) == ["a", "b"]
    with pytest.raises(InvalidWriteError):
        VectorClock.from_json([1, 2])


# -- writes -----------------------------------------------------------------------------------


def test_a_write_round_trips_through_json_and_equal_writes_hash_equal() -> None:
    original = write({"x": [1, 2]}, "a", 5.0, a=1, b=2)
    again = Write.from_json(original.to_json())
    assert again == original
    assert hash(again) == hash(original)
    assert original.dot == ("a", 1)
    assert write(1, "a", 5.0) != write(2, "a", 5.0)


def test_a_write_keeps_its_own_copy_of_the_value() -> None:
    value: dict[str, JSONValue] = {"items": [1]}
    made = write(value, "a", 1.0)
    items = value["items"]
    assert isinstance(items, list)
    items.append(2)
    assert made.value == {"items": [1]}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"value": {1, 2}}, "cannot be serialised as JSON"),
        ({"value": float("nan")}, "cannot be serialised as JSON"),
        ({"timestamp": float("inf")}, "finite number"),
        ({"clock": {"b": 1}}, "no entry for the writer"),
        ({"key": ""}, "key"),
        ({"writer": ""}, "writer"),
    ],
)
def test_a_malformed_write_is_a_typed_error(kwargs: dict[str, Any], match: str) -> None:
    fields: dict[str, Any] = {
        "key": "k",
        "value": 1,
        "writer": "a",
        "timestamp": 1.0,
        "clock": {"a": 1},
    }
    fields.update(kwargs)
    with pytest.raises(InvalidWriteError, match=match):
        Write(**fields)


def test_a_timestamp_far_in_the_future_is_refused() -> None:
    check_write(write(1, "a", 1_000.0 + 299.0), now=1_000.0)
    with pytest.raises(FutureTimestampError, match="clock skew") as refused:
        check_write(write(1, "a", 1_000.0 + 301.0), now=1_000.0)
    assert refused.value.writer == "a"
    check_write(write(1, "a", 2_000.0), now=1_000.0, max_clock_skew=1_000.0)


def test_a_clock_from_an_unknown_node_is_refused() -> None:
    check_write(write(1, "a", 1.0, a=1, b=1), now=1.0, known_nodes=["a", "b"])
    with pytest.raises(UnknownNodeError, match="'ghost'") as refused:
        check_write(write(1, "a", 1.0, a=1, ghost=3), now=1.0, known_nodes=["a", "b"])
    assert refused.value.unknown == ["ghost"]


# -- the resolver table -----------------------------------------------------------------------


def test_every_builtin_is_registered_through_the_plugin_manager() -> None:
    registry = ResolverRegistry.from_plugin_manager(make_plugin_manager(entry_points=False))
    assert registry.names == BUILTIN_NAMES
    for name in BUILTIN_NAMES:
        assert isinstance(registry.get(name), ConflictResolver)


def test_keys_pick_resolvers_by_glob_first_match_then_the_default() -> None:
    registry = ResolverRegistry.from_plugin_manager(make_plugin_manager(entry_points=False))
    registry.assign("cart:*:items", "or_set")
    registry.assign("cart:*", "lww_map")
    registry.assign("visits:?", "g_counter")
    assert registry.resolver_for("cart:7:items").name == "or_set"
    assert registry.resolver_for("cart:7").name == "lww_map"
    assert registry.resolver_for("visits:1").name == "g_counter"
    assert registry.resolver_for("visits:12").name == "last_write_wins"
    assert registry.rules == [
        ("cart:*:items", "or_set"),
        ("cart:*", "lww_map"),
        ("visits:?", "g_counter"),
    ]


def test_an_object_can_be_assigned_and_an_unknown_name_is_a_typed_error() -> None:
    registry = ResolverRegistry([LastWriteWinsResolver()], default="last_write_wins")
    mine = ApplicationSpecificResolver(name="carts")
    registry.assign("cart:*", mine)
    assert registry.resolver_for("cart:1") is mine
    with pytest.raises(UnknownResolverError, match="installed: carts, last_write_wins"):
        registry.assign("x", "no_such_resolver")
    with pytest.raises(PluginError, match="already registered"):
        registry.add(LastWriteWinsResolver())


class _Duplicate:
    @hookimpl
    def cb_conflict_resolvers(self) -> Sequence[Any]:
        return [LastWriteWinsResolver()]


class _NotAResolver:
    @hookimpl
    def cb_conflict_resolvers(self) -> Sequence[Any]:
        return [object()]


def test_a_name_provided_twice_names_both_plugins() -> None:
    pm = make_plugin_manager([_Duplicate()], entry_points=False)
    expected = r"provided by both 'collaborative_blocks\.plugins\.resolvers'"
    with pytest.raises(PluginError, match=expected):
        ResolverRegistry.from_plugin_manager(pm)


def test_a_plugin_returning_a_non_resolver_is_named() -> None:
    pm = make_plugin_manager([_NotAResolver()], entry_points=False)
    with pytest.raises(PluginError, match="does not implement ConflictResolver"):
        ResolverRegistry.from_plugin_manager(pm)


# -- last write wins --------------------------------------------------------------------------


def test_lww_the_latest_timestamp_wins_even_against_causal_order() -> None:
    resolver = LastWriteWinsResolver()
    early_but_later = write("second", "b", 1.0, a=1, b=1)  # saw a's write, clock behind
    late = write("first", "a", 2.0, a=1)
    assert resolver.value(fold(resolver, [late, early_but_later])) == "first"
    assert resolver.value(fold(resolver, [early_but_later, late])) == "first"
    assert resolver.conflicts(fold(resolver, [late, early_but_later])) == ()


def test_lww_a_timestamp_tie_goes_to_the_greater_writer_id_and_is_reported() -> None:
    resolver = LastWriteWinsResolver()
    from_a, from_b = write("A", "a", 5.0), write("B", "b", 5.0)
    for order in ([from_a, from_b], [from_b, from_a]):
        state = fold(resolver, order)
        assert resolver.value(state) == "B"
        (conflict,) = resolver.conflicts(state)
        assert conflict.status is ConflictStatus.RESOLVED
        assert conflict.siblings == (from_a, from_b)
        assert conflict.resolution == "B"
    assert resolver.value(resolver.initial()) is None


# -- vector clock -----------------------------------------------------------------------------


def test_vc_a_causal_successor_replaces_and_concurrent_writes_stay_as_siblings() -> None:
    resolver = VectorClockResolver()
    first = write(1, "a", 9.0, a=1)
    successor = write(2, "b", 1.0, a=1, b=1)
    concurrent = write(3, "c", 0.0, c=1)
    assert resolver.value(fold(resolver, [successor, first])) == 2
    state = fold(resolver, [first, successor, concurrent])
    assert resolver.value(state) == [3, 2]  # siblings in (timestamp, writer) order
    (conflict,) = resolver.conflicts(state)
    assert conflict.status is ConflictStatus.UNRESOLVED
    assert conflict.siblings == (concurrent, successor)
    # A write that saw both siblings supersedes them: the conflict is gone.
    resolving = write(4, "a", 2.0, a=2, b=1, c=1)
    resolved = resolver.apply(state, resolving)
    assert resolver.value(resolved) == 4
    assert resolver.conflicts(resolved) == ()


def test_vc_fallbacks_and_merge_function() -> None:
    siblings = [write("x", "a", 2.0), write("y", "b", 1.0)]
    lww = VectorClockResolver(fallback=SiblingFallback.LAST_WRITE_WINS)
    state = fold(lww, siblings)
    assert lww.value(state) == "x"
    assert lww.conflicts(state)[0].status is ConflictStatus.RESOLVED
    strict = VectorClockResolver(fallback=SiblingFallback.RAISE)
    with pytest.raises(UnresolvedConflictError, match="2 concurrent writes"):
        strict.value(fold(strict, siblings))
    assert strict.conflicts(fold(strict, siblings))[0].status is ConflictStatus.UNRESOLVED
    joined = VectorClockResolver(lambda key, writes: "+".join(str(w.value) for w in writes))
    assert joined.value(fold(joined, siblings)) == "y+x"


# -- application specific ---------------------------------------------------------------------


def _total(key: str, siblings: Sequence[Write]) -> JSONValue:
    return sum(int(str(w.value)) for w in siblings)


def _broken(key: str, siblings: Sequence[Write]) -> JSONValue:
    raise RuntimeError("bug in user code")


def test_application_specific_uses_the_function_registered_for_the_key() -> None:
    resolver = ApplicationSpecificResolver([("score:*", _total)])
    resolver.register("*", lambda key, writes: f"fallback for {key}")
    score = [write(2, "a", 1.0, key="score:1"), write(3, "b", 1.0, key="score:1")]
    assert resolver.value(fold(resolver, score)) == 5
    other = [write(2, "a", 1.0, key="name"), write(3, "b", 1.0, key="name")]
    assert resolver.value(fold(resolver, other)) == "fallback for name"
    assert ApplicationSpecificResolver().value(fold(resolver, other)) == [2, 3]


def test_a_raising_merge_function_is_a_typed_error_and_a_recorded_conflict() -> None:
    resolver = ApplicationSpecificResolver([("*", _broken)])
    siblings = [write(1, "a", 1.0), write(2, "b", 1.0)]
    state = fold(resolver, siblings)
    with pytest.raises(MergeFunctionError, match="RuntimeError: bug in user code") as failed:
        resolver.value(state)
    assert isinstance(failed.value.cause, RuntimeError)
    (conflict,) = resolver.conflicts(state)
    assert conflict.status is ConflictStatus.FAILED
    assert conflict.error is not None
    assert "bug in user code" in conflict.error
    assert state == fold(resolver, siblings)  # nothing dropped, nothing half-applied


def test_a_merge_function_returning_non_json_is_a_typed_error() -> None:
    resolver = ApplicationSpecificResolver([("*", lambda key, writes: {1, 2})])  # type: ignore[list-item, return-value]
    with pytest.raises(MergeFunctionError, match="cannot be serialised"):
        resolver.value(fold(resolver, [write(1, "a", 1.0), write(2, "b", 1.0)]))


# -- CRDTs ------------------------------------------------------------------------------------


def test_counters_count_each_write_once() -> None:
    resolver = PNCounterResolver()
    plus, minus = write(5, "a", 1.0), write(-2, "b", 1.0)
    assert resolver.value(fold(resolver, [plus, minus, plus, minus])) == 3
    grow = GCounterResolver()
    assert grow.value(fold(grow, [plus, plus, write(1, "a", 1.0, a=2)])) == 6
    with pytest.raises(InvalidOperationError, match="use pn_counter"):
        grow.apply(grow.initial(), minus)
    with pytest.raises(InvalidOperationError, match="write the int to add"):
        resolver.apply(resolver.initial(), write("five", "a", 1.0))


def test_or_set_a_remove_deletes_what_it_saw_and_a_concurrent_add_wins() -> None:
    resolver = ORSetResolver()
    add_a = write({"add": "x"}, "a", 1.0, a=1)
    remove_seen = write({"remove": "x"}, "b", 2.0, a=1, b=1)
    assert resolver.value(fold(resolver, [remove_seen, add_a])) == []
    add_concurrent = write({"add": "x"}, "c", 1.5, c=1)
    for order in ([add_a, remove_seen, add_concurrent], [add_concurrent, remove_seen, add_a]):
        assert resolver.value(fold(resolver, order)) == ["x"]
    add_more = write({"add": {"id": 2}}, "a", 3.0, a=2)
    assert resolver.value(fold(resolver, [add_a, add_more])) == ["x", {"id": 2}]
    with pytest.raises(InvalidOperationError, match="'add': element"):
        resolver.apply(resolver.initial(), write(["x"], "a", 1.0))


def test_lww_map_fields_are_registers_of_their_own_and_null_deletes() -> None:
    resolver = LWWMapResolver()
    writes = [
        write({"name": "Ada", "city": "Paris"}, "a", 1.0, a=1),
        write({"city": "Rome"}, "b", 2.0, b=1),
        write({"name": None}, "c", 3.0, c=1),
        write({"city": "Oslo"}, "a", 1.5, a=2),  # older than Rome: loses that field
    ]
    assert resolver.value(fold(resolver, writes)) == {"city": "Rome"}
    assert resolver.value(fold(resolver, writes[::-1])) == {"city": "Rome"}
    with pytest.raises(InvalidOperationError, match="object of fields"):
        resolver.apply(resolver.initial(), write(3, "a", 1.0))


@pytest.mark.parametrize(
    "resolver",
    [LastWriteWinsResolver(), VectorClockResolver(), LWWMapResolver(), ORSetResolver()],
    ids=lambda r: r.name,
)
def test_a_malformed_stored_state_is_a_typed_error(resolver: Any) -> None:
    with pytest.raises(InvalidWriteError, match=resolver.name):
        resolver.from_json(42)
