"""The conflict resolver conformance suite: the laws a resolver claims, checked with hypothesis.

Subclass :class:`ResolverConformance` in a test module (the subclass's name must start with
``Test``), give it your resolver and a hypothesis strategy for the values your writes carry::

    from hypothesis import strategies as st
    from collaborative_blocks.testing.resolver_conformance import ResolverConformance
    from my_plugin import MaxWins

    class TestMaxWins(ResolverConformance):
        def make_resolver(self):
            return MaxWins()

        def write_values(self):
            return st.integers(-5, 5)

The suite generates causal histories (a few systems writing one key, sometimes after
receiving each other's writes, with colliding timestamps), folds random subsets of them into
states and checks, for each law in ``resolver.properties``:

- COMMUTATIVE: ``merge(a, b) == merge(b, a)``
- ASSOCIATIVE: ``merge(merge(a, b), c) == merge(a, merge(b, c))``
- IDEMPOTENT: ``merge(a, a) == a`` and folding a write twice changes nothing

and always that ``apply(s, w) == merge(s, apply(initial(), w))`` (else replicas that
exchange states disagree with replicas that exchange writes), that states survive
``to_json``/``from_json`` and that equal states read the same ``value``. A failure names the
law and shows the writes behind each state; hypothesis shrinks them to a minimal
counterexample first.

This module needs ``hypothesis`` (the ``dev`` extra); that is why it is not re-exported from
:mod:`collaborative_blocks.testing`, which the pytest plugin imports.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collaborative_blocks.core.sync.resolvers import (
    AnyResolver,
    JSONValue,
    ResolverProperty,
    VectorClock,
    Write,
)

__all__ = ["ResolverConformance", "fold", "histories"]

T = TypeVar("T")

KEY = "conformance:key"

# One suite class runs under many subclasses; hypothesis would flag that as a smell otherwise.
_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.differing_executors, HealthCheck.too_slow],
)


@st.composite
def histories(
    draw: st.DrawFn,
    values: st.SearchStrategy[JSONValue],
    *,
    nodes: Sequence[str] = ("a", "b", "c"),
    key: str = KEY,
    max_writes: int = 8,
) -> list[Write]:
    """Writes to ``key`` that ``nodes`` could really have made, in the order they were made.

    Each step: a node may first receive another node's clock (so later writes causally follow
    earlier ones, or not), then writes a value. Timestamps come from a tiny range, so
    last-write-wins ties (broken by writer id) are common.
    """
    clocks = {node: VectorClock() for node in nodes}
    writes: list[Write] = []
    for _ in range(draw(st.integers(0, max_writes))):
        node = draw(st.sampled_from(list(nodes)))
        heard = draw(st.none() | st.sampled_from(list(nodes)))
        if heard is not None and heard != node:
            clocks[node] = clocks[node].merge(clocks[heard])
        clocks[node] = clocks[node].increment(node)
        timestamp = float(draw(st.integers(0, 3)))
        writes.append(Write(key, draw(values), node, timestamp, clocks[node]))
    return writes


def fold(resolver: AnyResolver, writes: Sequence[Write]) -> Any:
    """The state a replica holds after applying ``writes`` in this order."""
    state = resolver.initial()
    for write in writes:
        state = resolver.apply(state, write)
    return state


def _show(writes: Sequence[Write]) -> str:
    return json.dumps([write.to_json() for write in writes])


class ResolverConformance(abc.ABC):
    """Abstract test case; subclass it once per resolver (see the module docstring)."""

    @abc.abstractmethod
    def make_resolver(self) -> AnyResolver:
        """A fresh resolver (called once per generated example)."""

    @abc.abstractmethod
    def write_values(self) -> st.SearchStrategy[JSONValue]:
        """Values a write to your resolver's keys may carry (what ``apply`` accepts)."""

    def _claims(self, resolver: AnyResolver, law: ResolverProperty) -> bool:
        return law in resolver.properties

    def _states(self, data: st.DataObject, count: int) -> tuple[AnyResolver, list[list[Write]]]:
        resolver = self.make_resolver()
        history = data.draw(histories(self.write_values()), label="history")
        subsets = [
            data.draw(st.lists(st.sampled_from(history), max_size=6), label=f"writes_{n}")
            if history
            else []
            for n in range(count)
        ]
        return resolver, subsets

    @_SETTINGS
    @given(data=st.data())
    def test_merge_is_commutative(self, data: st.DataObject) -> None:
        resolver, (left, right) = self._states(data, 2)
        if not self._claims(resolver, ResolverProperty.COMMUTATIVE):
            return
        a, b = fold(resolver, left), fold(resolver, right)
        assert resolver.merge(a, b) == resolver.merge(b, a), (
            f"{resolver.name}: merge is not commutative: merge(a, b) != merge(b, a) where\n"
            f"  a = fold of {_show(left)}\n  b = fold of {_show(right)}\n"
            f"  merge(a, b) = {resolver.merge(a, b)!r}\n  merge(b, a) = {resolver.merge(b, a)!r}"
        )

    @_SETTINGS
    @given(data=st.data())
    def test_merge_is_associative(self, data: st.DataObject) -> None:
        resolver, (first, second, third) = self._states(data, 3)
        if not self._claims(resolver, ResolverProperty.ASSOCIATIVE):
            return
        a, b, c = (fold(resolver, writes) for writes in (first, second, third))
        grouped_left = resolver.merge(resolver.merge(a, b), c)
        grouped_right = resolver.merge(a, resolver.merge(b, c))
        assert grouped_left == grouped_right, (
            f"{resolver.name}: merge is not associative: merge(merge(a, b), c) != "
            f"merge(a, merge(b, c)) where\n  a = fold of {_show(first)}\n"
            f"  b = fold of {_show(second)}\n  c = fold of {_show(third)}"
        )

    @_SETTINGS
    @given(data=st.data())
    def test_merge_is_idempotent(self, data: st.DataObject) -> None:
        resolver, (writes,) = self._states(data, 1)
        if not self._claims(resolver, ResolverProperty.IDEMPOTENT):
            return
        a = fold(resolver, writes)
        assert resolver.merge(a, a) == a, (
            f"{resolver.name}: merge is not idempotent: merge(a, a) != a where a = fold of "
            f"{_show(writes)}"
        )
        twice = fold(resolver, [*writes, *writes])
        assert twice == a, (
            f"{resolver.name}: folding the same writes again changed the state (a duplicate "
            f"delivery would count twice): writes {_show(writes)}"
        )

    @_SETTINGS
    @given(data=st.data())
    def test_apply_agrees_with_merge(self, data: st.DataObject) -> None:
        resolver, (writes,) = self._states(data, 1)
        history = data.draw(histories(self.write_values(), max_writes=1), label="extra")
        state = fold(resolver, writes)
        for write in history:
            via_apply = resolver.apply(state, write)
            via_merge = resolver.merge(state, resolver.apply(resolver.initial(), write))
            assert via_apply == via_merge, (
                f"{resolver.name}: apply(s, w) != merge(s, apply(initial(), w)) where s = fold "
                f"of {_show(writes)} and w = {_show([write])}"
            )

    @_SETTINGS
    @given(data=st.data())
    def test_state_survives_json(self, data: st.DataObject) -> None:
        resolver, (writes,) = self._states(data, 1)
        state = fold(resolver, writes)
        encoded = json.dumps(resolver.to_json(state))
        restored = resolver.from_json(json.loads(encoded))
        assert restored == state, (
            f"{resolver.name}: from_json(to_json(s)) != s where s = fold of {_show(writes)}"
        )
        assert resolver.value(restored) == resolver.value(state)
