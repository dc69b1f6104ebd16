"""Built-in conflict resolvers: ``last_write_wins``, ``vector_clock``,
``application_specific`` and the CRDTs ``g_counter``, ``pn_counter``, ``or_set``, ``lww_map``.

Pick one per key pattern on a
:class:`~collaborative_blocks.core.sync.resolvers.ResolverRegistry` (``registry.assign("cart:*",
"or_set")``); keys no pattern matches use ``last_write_wins``. A third-party resolver plugin
looks exactly like this module: a ``cb_conflict_resolvers`` hook returning objects that
implement :class:`~collaborative_blocks.core.extensions.ConflictResolver`, checked by
:class:`~collaborative_blocks.testing.resolver_conformance.ResolverConformance`.

Every state here is a join semi-lattice (merge = union or per-entry maximum), so all of them
claim commutativity, associativity and idempotence. What a write's ``value`` means:

- ``last_write_wins``, ``vector_clock``, ``application_specific``: the new value of the key.
- ``g_counter``: a non-negative int added to the counter; ``pn_counter``: any int.
- ``or_set``: ``{"add": element}`` or ``{"remove": element}``; a remove deletes the adds its
  vector clock has seen, so an add concurrent with a remove survives (add wins).
- ``lww_map``: an object of fields to set; a field set to ``null`` is deleted. Each field is a
  last-write-wins register of its own.
"""

from __future__ import annotations

import enum
import fnmatch
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from collaborative_blocks import hookimpl
from collaborative_blocks.core.sync.resolvers import (
    CONVERGENT,
    AnyResolver,
    Conflict,
    ConflictStatus,
    JSONValue,
    MergeFunction,
    Ordering,
    ResolverProperty,
    VectorClock,
    Write,
    canonical_json,
)
from collaborative_blocks.errors import (
    InvalidOperationError,
    InvalidWriteError,
    MergeFunctionError,
    UnresolvedConflictError,
)

__all__ = [
    "ApplicationSpecificResolver",
    "CounterState",
    "GCounterResolver",
    "HeadsState",
    "LWWMapResolver",
    "LWWMapState",
    "LastWriteWinsResolver",
    "LastWriteWinsState",
    "ORSetResolver",
    "ORSetState",
    "PNCounterResolver",
    "SiblingFallback",
    "VectorClockResolver",
]


def _maximal(writes: Iterable[Write]) -> frozenset[Write]:
    """The writes no other write causally follows: the concurrent heads of a key."""
    pool = frozenset(writes)
    if len(pool) <= 1:
        return pool
    return frozenset(
        write
        for write in pool
        if not any(other.clock.compare(write.clock) is Ordering.AFTER for other in pool)
    )


def _writes_from_json(data: object, what: str) -> list[Write]:
    if not isinstance(data, list):
        raise InvalidWriteError(f"{what} state: expected a list of writes, got {data!r}")
    return [Write.from_json(item) for item in data]


def _sorted(writes: Iterable[Write]) -> list[Write]:
    return sorted(writes, key=Write.order_key)


# -- last write wins --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LastWriteWinsState:
    winner: Write | None
    heads: frozenset[Write]  # kept to report concurrent writes the timestamp rule overrode


class LastWriteWinsResolver:
    """The write with the latest timestamp wins; ties go to the greater writer id.

    Causality is ignored on purpose (that is what the name promises): a causally later write
    with an earlier timestamp loses. Concurrent heads are still listed by ``conflicts`` as
    RESOLVED, so the override is visible.
    """

    name = "last_write_wins"
    properties: frozenset[ResolverProperty] = CONVERGENT

    def initial(self) -> LastWriteWinsState:
        return LastWriteWinsState(None, frozenset())

    def apply(self, state: LastWriteWinsState, write: Write) -> LastWriteWinsState:
        return self.merge(state, LastWriteWinsState(write, frozenset((write,))))

    def merge(self, left: LastWriteWinsState, right: LastWriteWinsState) -> LastWriteWinsState:
        if left.winner is None:
            winner = right.winner
        elif right.winner is None:
            winner = left.winner
        else:
            winner = max(left.winner, right.winner, key=Write.order_key)
        return LastWriteWinsState(winner, _maximal(left.heads | right.heads))

    def value(self, state: LastWriteWinsState) -> JSONValue:
        return None if state.winner is None else state.winner.value

    def conflicts(self, state: LastWriteWinsState) -> Sequence[Conflict]:
        if len(state.heads) < 2 or state.winner is None:
            return ()
        return (
            Conflict(
                key=state.winner.key,
                resolver=self.name,
                siblings=tuple(_sorted(state.heads)),
                status=ConflictStatus.RESOLVED,
                resolution=state.winner.value,
            ),
        )

    def to_json(self, state: LastWriteWinsState) -> JSONValue:
        return {
            "winner": None if state.winner is None else state.winner.to_json(),
            "heads": [write.to_json() for write in _sorted(state.heads)],
        }

    def from_json(self, data: JSONValue) -> LastWriteWinsState:
        if not isinstance(data, dict):
            raise InvalidWriteError(f"{self.name} state: expected an object, got {data!r}")
        winner = data.get("winner")
        return LastWriteWinsState(
            None if winner is None else Write.from_json(winner),
            frozenset(_writes_from_json(data.get("heads", []), self.name)),
        )


# -- vector clock (siblings) ------------------------------------------------------------------


class SiblingFallback(enum.Enum):
    """What ``vector_clock`` reads as the value of a key with concurrent writes and no merge
    function. The siblings stay in the state (and in ``conflicts``) whichever is chosen."""

    KEEP_SIBLINGS = "keep_siblings"  # the value is the list of sibling values, in write order
    LAST_WRITE_WINS = "last_write_wins"  # the value of the sibling with the latest timestamp
    RAISE = "raise"  # value() raises UnresolvedConflictError


@dataclass(frozen=True, slots=True)
class HeadsState:
    heads: frozenset[Write]  # writes that no other received write causally follows


class VectorClockResolver:
    """Causal order decides; concurrent writes are kept as siblings, never dropped.

    A write that causally follows others replaces them. Writes that are concurrent all stay
    in the state until a later write (whose clock merges theirs) supersedes them; meanwhile
    ``merge_function(key, siblings)`` picks the value, or else ``fallback`` does.
    """

    properties: frozenset[ResolverProperty] = CONVERGENT

    def __init__(
        self,
        merge_function: MergeFunction | None = None,
        *,
        fallback: SiblingFallback = SiblingFallback.KEEP_SIBLINGS,
        name: str = "vector_clock",
    ) -> None:
        self._merge_function = merge_function
        self.fallback = fallback
        self.name = name

    def merge_function_for(self, key: str) -> MergeFunction | None:
        return self._merge_function

    def initial(self) -> HeadsState:
        return HeadsState(frozenset())

    def apply(self, state: HeadsState, write: Write) -> HeadsState:
        return HeadsState(_maximal(state.heads | {write}))

    def merge(self, left: HeadsState, right: HeadsState) -> HeadsState:
        return HeadsState(_maximal(left.heads | right.heads))

    def _resolve(self, siblings: list[Write]) -> tuple[ConflictStatus, JSONValue]:
        key = siblings[0].key
        function = self.merge_function_for(key)
        if function is not None:
            try:
                result = function(key, tuple(siblings))
                canonical_json(result)  # a value every replica can store and compare
            except Exception as error:
                raise MergeFunctionError(self.name, key, len(siblings), error) from error
            return ConflictStatus.RESOLVED, result
        if self.fallback is SiblingFallback.LAST_WRITE_WINS:
            return ConflictStatus.RESOLVED, siblings[-1].value
        if self.fallback is SiblingFallback.RAISE:
            raise UnresolvedConflictError(self.name, key, len(siblings))
        return ConflictStatus.UNRESOLVED, [write.value for write in siblings]

    def value(self, state: HeadsState) -> JSONValue:
        siblings = _sorted(state.heads)
        if not siblings:
            return None
        if len(siblings) == 1:
            return siblings[0].value
        return self._resolve(siblings)[1]

    def conflicts(self, state: HeadsState) -> Sequence[Conflict]:
        siblings = _sorted(state.heads)
        if len(siblings) < 2:
            return ()
        key = siblings[0].key
        try:
            status, resolution = self._resolve(siblings)
            error = None
        except MergeFunctionError as failure:
            status, resolution, error = ConflictStatus.FAILED, None, str(failure)
        except UnresolvedConflictError:
            status, resolution, error = ConflictStatus.UNRESOLVED, None, None
        return (Conflict(key, self.name, tuple(siblings), status, resolution, error),)

    def to_json(self, state: HeadsState) -> JSONValue:
        return {"heads": [write.to_json() for write in _sorted(state.heads)]}

    def from_json(self, data: JSONValue) -> HeadsState:
        if not isinstance(data, dict):
            raise InvalidWriteError(f"{self.name} state: expected an object, got {data!r}")
        return HeadsState(_maximal(_writes_from_json(data.get("heads", []), self.name)))


class ApplicationSpecificResolver(VectorClockResolver):
    """``vector_clock`` whose siblings are merged by a user function chosen by key pattern.

    ``register("cart:*", merge_carts)``: ``merge_carts(key, siblings)`` gets the concurrent
    writes in a deterministic order (timestamp, writer) and returns the value. It must be
    a pure function of its arguments, or replicas disagree. A key with no function uses
    ``fallback``. A function that raises makes ``value`` raise :class:`MergeFunctionError`
    and ``conflicts`` list the siblings as FAILED; the state is unchanged.
    """

    def __init__(
        self,
        functions: Iterable[tuple[str, MergeFunction]] = (),
        *,
        fallback: SiblingFallback = SiblingFallback.KEEP_SIBLINGS,
        name: str = "application_specific",
    ) -> None:
        super().__init__(None, fallback=fallback, name=name)
        self._functions: list[tuple[str, MergeFunction]] = list(functions)

    def register(self, pattern: str, function: MergeFunction) -> None:
        """Merge siblings of keys matching ``pattern`` (first registered match wins)."""
        self._functions.append((pattern, function))

    def merge_function_for(self, key: str) -> MergeFunction | None:
        for pattern, function in self._functions:
            if fnmatch.fnmatchcase(key, pattern):
                return function
        return None


# -- counters ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CounterState:
    # (writer, counter, delta) per write: the dot makes a redelivered increment count once.
    increments: frozenset[tuple[str, int, int]]


class PNCounterResolver:
    """A counter: each write's value is an int added to it (negative decrements)."""

    name = "pn_counter"
    properties: frozenset[ResolverProperty] = CONVERGENT

    def _delta(self, write: Write) -> int:
        if isinstance(write.value, bool) or not isinstance(write.value, int):
            raise InvalidOperationError(
                f"{self.name}: write to {write.key!r} by {write.writer!r} has value "
                f"{write.value!r}; write the int to add"
            )
        return write.value

    def initial(self) -> CounterState:
        return CounterState(frozenset())

    def apply(self, state: CounterState, write: Write) -> CounterState:
        writer, counter = write.dot
        return CounterState(state.increments | {(writer, counter, self._delta(write))})

    def merge(self, left: CounterState, right: CounterState) -> CounterState:
        return CounterState(left.increments | right.increments)

    def value(self, state: CounterState) -> JSONValue:
        return sum(delta for _, _, delta in state.increments)

    def conflicts(self, state: CounterState) -> Sequence[Conflict]:
        return ()  # concurrent increments commute: nothing to resolve

    def to_json(self, state: CounterState) -> JSONValue:
        return [[writer, counter, delta] for writer, counter, delta in sorted(state.increments)]

    def from_json(self, data: JSONValue) -> CounterState:
        if not isinstance(data, list):
            raise InvalidWriteError(f"{self.name} state: expected a list, got {data!r}")
        increments: set[tuple[str, int, int]] = set()
        for item in data:
            if not (
                isinstance(item, list)
                and len(item) == 3
                and isinstance(item[0], str)
                and isinstance(item[1], int)
                and isinstance(item[2], int)
            ):
                raise InvalidWriteError(f"{self.name} state: bad increment {item!r}")
            increments.add((item[0], item[1], item[2]))
        return CounterState(frozenset(increments))


class GCounterResolver(PNCounterResolver):
    """A grow-only counter: like ``pn_counter`` but a negative value is rejected."""

    name = "g_counter"

    def _delta(self, write: Write) -> int:
        delta = super()._delta(write)
        if delta < 0:
            raise InvalidOperationError(
                f"{self.name}: write to {write.key!r} by {write.writer!r} adds {delta}; a "
                "grow-only counter only adds values >= 0 (use pn_counter to decrement)"
            )
        return delta


# -- observed-remove set ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ORSetState:
    adds: frozenset[tuple[str, str, int]]  # (element as canonical JSON, writer, counter)
    removes: frozenset[tuple[str, VectorClock]]  # element -> merged clocks of its removes


class ORSetResolver:
    """An add-wins observed-remove set of JSON elements; its value is a sorted list."""

    name = "or_set"
    properties: frozenset[ResolverProperty] = CONVERGENT

    def initial(self) -> ORSetState:
        return ORSetState(frozenset(), frozenset())

    def apply(self, state: ORSetState, write: Write) -> ORSetState:
        operation = write.value
        if isinstance(operation, dict) and len(operation) == 1:
            if "add" in operation:
                element = canonical_json(operation["add"])
                writer, counter = write.dot
                return ORSetState(state.adds | {(element, writer, counter)}, state.removes)
            if "remove" in operation:
                element = canonical_json(operation["remove"])
                removed = ORSetState(frozenset(), frozenset({(element, write.clock)}))
                return self.merge(state, removed)
        raise InvalidOperationError(
            f"{self.name}: write to {write.key!r} by {write.writer!r} has value "
            f"{operation!r}; write {{'add': element}} or {{'remove': element}}"
        )

    def merge(self, left: ORSetState, right: ORSetState) -> ORSetState:
        removes = dict(left.removes)
        for element, clock in right.removes:
            mine = removes.get(element)
            removes[element] = clock if mine is None else mine.merge(clock)
        return ORSetState(left.adds | right.adds, frozenset(removes.items()))

    def value(self, state: ORSetState) -> JSONValue:
        removes = dict(state.removes)
        present = set()
        for element, writer, counter in state.adds:
            seen = removes.get(element)
            # An add survives unless a remove had seen it (its dot is within the clock).
            if seen is None or seen[writer] < counter:
                present.add(element)
        return [json.loads(element) for element in sorted(present)]

    def conflicts(self, state: ORSetState) -> Sequence[Conflict]:
        return ()  # add-wins decides every concurrent add/remove the same way everywhere

    def to_json(self, state: ORSetState) -> JSONValue:
        removes: dict[str, JSONValue] = {}
        for element, clock in sorted(state.removes, key=lambda item: item[0]):
            removes[element] = dict(clock.to_json())
        return {
            "adds": [[element, writer, counter] for element, writer, counter in sorted(state.adds)],
            "removes": removes,
        }

    def from_json(self, data: JSONValue) -> ORSetState:
        if not isinstance(data, dict):
            raise InvalidWriteError(f"{self.name} state: expected an object, got {data!r}")
        adds: set[tuple[str, str, int]] = set()
        raw_adds = data.get("adds", [])
        raw_removes = data.get("removes", {})
        if not isinstance(raw_adds, list) or not isinstance(raw_removes, dict):
            raise InvalidWriteError(f"{self.name} state: bad adds/removes in {data!r}")
        for item in raw_adds:
            if not (
                isinstance(item, list)
                and len(item) == 3
                and isinstance(item[0], str)
                and isinstance(item[1], str)
                and isinstance(item[2], int)
            ):
                raise InvalidWriteError(f"{self.name} state: bad add {item!r}")
            adds.add((item[0], item[1], item[2]))
        removes = frozenset(
            (element, VectorClock.from_json(clock)) for element, clock in raw_removes.items()
        )
        return ORSetState(frozenset(adds), removes)


# -- last-write-wins map ----------------------------------------------------------------------

# (field, timestamp, writer, counter, value as canonical JSON; "null" = deleted)
_FieldEntry = tuple[str, float, str, int, str]


@dataclass(frozen=True, slots=True)
class LWWMapState:
    fields: tuple[_FieldEntry, ...]  # sorted by field, one entry per field


class LWWMapResolver:
    """A JSON object whose fields are last-write-wins registers of their own."""

    name = "lww_map"
    properties: frozenset[ResolverProperty] = CONVERGENT

    def initial(self) -> LWWMapState:
        return LWWMapState(())

    def apply(self, state: LWWMapState, write: Write) -> LWWMapState:
        if not isinstance(write.value, dict):
            raise InvalidOperationError(
                f"{self.name}: write to {write.key!r} by {write.writer!r} has value "
                f"{write.value!r}; write an object of fields to set (null deletes a field)"
            )
        writer, counter = write.dot
        entries = tuple(
            sorted(
                (field, write.timestamp, writer, counter, canonical_json(value))
                for field, value in write.value.items()
            )
        )
        return self.merge(state, LWWMapState(entries))

    def merge(self, left: LWWMapState, right: LWWMapState) -> LWWMapState:
        best: dict[str, _FieldEntry] = {entry[0]: entry for entry in left.fields}
        for entry in right.fields:
            mine = best.get(entry[0])
            # Tuple order = timestamp, then writer id, counter and value: a total tie-break.
            if mine is None or entry[1:] > mine[1:]:
                best[entry[0]] = entry
        return LWWMapState(tuple(best[field] for field in sorted(best)))

    def value(self, state: LWWMapState) -> JSONValue:
        return {entry[0]: json.loads(entry[4]) for entry in state.fields if entry[4] != "null"}

    def conflicts(self, state: LWWMapState) -> Sequence[Conflict]:
        return ()  # each field is decided by timestamp, like last_write_wins

    def to_json(self, state: LWWMapState) -> JSONValue:
        return [list(entry) for entry in state.fields]

    def from_json(self, data: JSONValue) -> LWWMapState:
        if not isinstance(data, list):
            raise InvalidWriteError(f"{self.name} state: expected a list, got {data!r}")
        entries: list[_FieldEntry] = []
        for item in data:
            if not (
                isinstance(item, list)
                and len(item) == 5
                and isinstance(item[0], str)
                and isinstance(item[1], int | float)
                and isinstance(item[2], str)
                and isinstance(item[3], int)
                and isinstance(item[4], str)
            ):
                raise InvalidWriteError(f"{self.name} state: bad field entry {item!r}")
            entries.append((item[0], float(item[1]), item[2], item[3], item[4]))
        return self.merge(LWWMapState(()), LWWMapState(tuple(sorted(entries))))


@hookimpl
def cb_conflict_resolvers() -> Sequence[AnyResolver]:
    return [
        LastWriteWinsResolver(),
        VectorClockResolver(),
        ApplicationSpecificResolver(),
        GCounterResolver(),
        PNCounterResolver(),
        ORSetResolver(),
        LWWMapResolver(),
    ]
