"""Every built-in resolver converges under any delivery schedule, and obeys its claimed laws.

Hypothesis draws a causal history of writes to one key by three systems, then, per replica, a
delivery schedule: the writes in a random order, some delivered twice, some held back until
the end (delay), and a restart at a random point after which the replica's state is rebuilt
from the writes it had received (in a different order). Once everything is delivered:

- all replicas hold equal states and read the same value and the same conflicts;
- the result equals folding the writes in the order they were made (order does not matter:
  every built-in resolver claims commutativity);
- replicas exchanging whole states (anti-entropy) reach the same state as well.

Then each built-in resolver runs the resolver conformance suite, and the suite is shown to
catch a deliberately non-commutative resolver with a minimal counterexample.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collaborative_blocks.core.sync.resolvers import (
    CONVERGENT,
    AnyResolver,
    Conflict,
    JSONValue,
    Ordering,
    ResolverProperty,
    VectorClock,
    Write,
)
from collaborative_blocks.plugins.resolvers import (
    ApplicationSpecificResolver,
    GCounterResolver,
    LastWriteWinsResolver,
    LWWMapResolver,
    ORSetResolver,
    PNCounterResolver,
    VectorClockResolver,
)
from collaborative_blocks.testing.resolver_conformance import (
    ResolverConformance,
    fold,
    histories,
)


def _largest(key: str, siblings: Sequence[Write]) -> JSONValue:
    return max(json_int(write.value) for write in siblings)


def json_int(value: JSONValue) -> int:
    assert isinstance(value, int)
    return value


small_values = st.integers(0, 4)
set_operations = st.one_of(
    st.builds(lambda element: {"add": element}, st.integers(0, 3)),
    st.builds(lambda element: {"remove": element}, st.integers(0, 3)),
)
field_values: st.SearchStrategy[JSONValue] = st.none() | st.integers(0, 3)
map_updates: st.SearchStrategy[JSONValue] = st.dictionaries(
    st.sampled_from(["x", "y", "z"]), field_values, max_size=3
)

#: name -> (a fresh resolver, the values its writes carry)
BUILTINS: dict[str, tuple[Callable[[], AnyResolver], st.SearchStrategy[JSONValue]]] = {
    "last_write_wins": (LastWriteWinsResolver, small_values),
    "vector_clock": (VectorClockResolver, small_values),
    "application_specific": (
        lambda: ApplicationSpecificResolver([("*", _largest)]),
        small_values,
    ),
    "g_counter": (GCounterResolver, st.integers(0, 5)),
    "pn_counter": (PNCounterResolver, st.integers(-5, 5)),
    "or_set": (ORSetResolver, set_operations),
    "lww_map": (LWWMapResolver, map_updates),
}

CONVERGENCE = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def schedules(draw: st.DrawFn, writes: list[Write]) -> tuple[list[Write], int]:
    """A replica's deliveries (reordered, duplicated, delayed) and where it restarts."""
    order = draw(st.permutations(writes))
    duplicates = draw(st.lists(st.sampled_from(writes), max_size=4)) if writes else []
    delayed = draw(st.sets(st.integers(0, max(len(order) - 1, 0)), max_size=3)) if order else set()
    on_time = [write for index, write in enumerate(order) if index not in delayed]
    late = [order[index] for index in sorted(delayed)]
    deliveries = on_time + duplicates + late
    deliveries = draw(st.permutations(deliveries)) if draw(st.booleans()) else deliveries
    restart_at = draw(st.integers(0, len(deliveries)))
    return deliveries, restart_at


def replicate(resolver: AnyResolver, deliveries: list[Write], restart_at: int) -> Any:
    state = fold(resolver, deliveries[:restart_at])
    # Restarted: the replica lost its state and rebuilds it from the writes it had received
    # (in another order: a log read back, deduplicated), then receives the rest.
    received = list(dict.fromkeys(deliveries[:restart_at]))
    rebuilt = fold(resolver, list(reversed(received)))
    assert rebuilt == state, "a replica rebuilt from its writes differs from before the restart"
    return fold_onto(resolver, rebuilt, deliveries[restart_at:])


def fold_onto(resolver: AnyResolver, state: Any, writes: list[Write]) -> Any:
    for write in writes:
        state = resolver.apply(state, write)
    return state


def _conflicts(resolver: AnyResolver, state: Any) -> Sequence[Conflict]:
    return resolver.conflicts(state)


@pytest.mark.parametrize("name", sorted(BUILTINS))
@CONVERGENCE
@given(data=st.data())
def test_replicas_converge_whatever_the_delivery_schedule(name: str, data: st.DataObject) -> None:
    make, values = BUILTINS[name]
    resolver = make()
    writes = data.draw(histories(values), label="writes")
    states = []
    for replica in range(3):
        deliveries, restart_at = data.draw(schedules(writes), label=f"replica_{replica}")
        states.append(replicate(resolver, deliveries, restart_at))
    in_order = fold(resolver, writes)
    for state in states:
        assert state == in_order
        assert resolver.value(state) == resolver.value(in_order)
        assert resolver.conflicts(state) == _conflicts(resolver, in_order)
    # Anti-entropy: replicas that swap whole states instead of writes end up the same too.
    halves = [fold(resolver, writes[::2]), fold(resolver, writes[1::2])]
    assert resolver.merge(halves[0], halves[1]) == in_order


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_every_builtin_claims_the_convergent_laws(name: str) -> None:
    assert BUILTINS[name][0]().properties == CONVERGENT


# -- the conformance suite on every built-in ---------------------------------------------------


class TestLastWriteWinsConformance(ResolverConformance):
    def make_resolver(self) -> AnyResolver:
        return LastWriteWinsResolver()

    def write_values(self) -> st.SearchStrategy[JSONValue]:
        return small_values


class TestVectorClockConformance(ResolverConformance):
    def make_resolver(self) -> AnyResolver:
        return VectorClockResolver()

    def write_values(self) -> st.SearchStrategy[JSONValue]:
        return small_values


class TestApplicationSpecificConformance(ResolverConformance):
    def make_resolver(self) -> AnyResolver:
        return ApplicationSpecificResolver([("*", _largest)])

    def write_values(self) -> st.SearchStrategy[JSONValue]:
        return small_values


class TestGCounterConformance(ResolverConformance):
    def make_resolver(self) -> AnyResolver:
        return GCounterResolver()

    def write_values(self) -> st.SearchStrategy[JSONValue]:
        return st.integers(0, 5)


class TestPNCounterConformance(ResolverConformance):
    def make_resolver(self) -> AnyResolver:
        return PNCounterResolver()

    def write_values(self) -> st.SearchStrategy[JSONValue]:
        return st.integers(-5, 5)


class TestORSetConformance(ResolverConformance):
    def make_resolver(self) -> AnyResolver:
        return ORSetResolver()

    def write_values(self) -> st.SearchStrategy[JSONValue]:
        return set_operations


class TestLWWMapConformance(ResolverConformance):
    def make_resolver(self) -> AnyResolver:
        return LWWMapResolver()

    def write_values(self) -> st.SearchStrategy[JSONValue]:
        return map_updates


# -- the suite catches a resolver that breaks its claims ---------------------------------------


class LeftWins(LastWriteWinsResolver):
    """Claims commutativity but keeps the left state's winner: order now decides."""

    name = "left_wins"

    def merge(self, left: Any, right: Any) -> Any:
        return left if left.winner is not None else right


class _LeftWinsSuite(ResolverConformance):  # not collected: run by the test below
    def make_resolver(self) -> AnyResolver:
        return LeftWins()

    def write_values(self) -> st.SearchStrategy[JSONValue]:
        return small_values


def test_the_suite_catches_a_non_commutative_resolver_with_a_minimal_counterexample() -> None:
    assert ResolverProperty.COMMUTATIVE in LeftWins().properties
    with pytest.raises(AssertionError) as failure:
        _LeftWinsSuite().test_merge_is_commutative()
    message = str(failure.value)
    assert "left_wins: merge is not commutative" in message
    # Shrunk to the smallest witness: one write on each side, with different values.
    sides = re.findall(r"= fold of (\[.*\])", message)
    assert len(sides) == 2
    assert all(side.count('"writer"') == 1 for side in sides), message


class CountsDuplicates(PNCounterResolver):
    """Claims idempotence but counts a redelivered write again."""

    name = "counts_duplicates"

    def apply(self, state: Any, write: Write) -> Any:
        writer, counter = write.dot
        # A fresh tag per fold: the duplicate is no longer recognised.
        tag = counter + 1000 * len(state.increments)
        return type(state)(state.increments | {(writer, tag, self._delta(write))})


class _CountsDuplicatesSuite(ResolverConformance):  # not collected: run by the test below
    def make_resolver(self) -> AnyResolver:
        return CountsDuplicates()

    def write_values(self) -> st.SearchStrategy[JSONValue]:
        return st.integers(1, 5)


def test_the_suite_catches_a_resolver_that_counts_duplicates() -> None:
    with pytest.raises(AssertionError, match="counts_duplicates: folding the same writes again"):
        _CountsDuplicatesSuite().test_merge_is_idempotent()
    with pytest.raises(AssertionError, match=r"counts_duplicates: apply\(s, w\) != merge"):
        _CountsDuplicatesSuite().test_apply_agrees_with_merge()


# -- vector clocks ------------------------------------------------------------------------------

clocks = st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 3)).map(VectorClock)
MIRROR = {
    Ordering.BEFORE: Ordering.AFTER,
    Ordering.AFTER: Ordering.BEFORE,
    Ordering.EQUAL: Ordering.EQUAL,
    Ordering.CONCURRENT: Ordering.CONCURRENT,
}


@given(left=clocks, right=clocks)
def test_compare_agrees_with_the_elementwise_order_and_merge_is_the_join(
    left: VectorClock, right: VectorClock
) -> None:
    nodes = set(left) | set(right)
    at_most = all(left[node] <= right[node] for node in nodes)
    at_least = all(left[node] >= right[node] for node in nodes)
    expected = {
        (True, True): Ordering.EQUAL,
        (True, False): Ordering.BEFORE,
        (False, True): Ordering.AFTER,
        (False, False): Ordering.CONCURRENT,
    }[(at_most, at_least)]
    assert left.compare(right) is expected
    assert right.compare(left) is MIRROR[expected]
    joined = left.merge(right)
    assert joined == right.merge(left)
    assert joined.dominates(left)
    assert joined.dominates(right)
    assert all(joined[node] == max(left[node], right[node]) for node in nodes)
