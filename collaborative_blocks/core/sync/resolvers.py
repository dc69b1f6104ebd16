"""Conflict resolution: vector clocks, writes, the resolver protocol and the resolver table.

Every replica of a key folds the writes it receives into a resolver **state**
(``state = resolver.apply(state, write)``); two replicas' states combine with
``resolver.merge(a, b)``. A resolver is correct when its states form a join semi-lattice:
``merge`` is commutative, associative and idempotent, and ``apply(s, w)`` equals
``merge(s, apply(initial(), w))``. Then replicas that have received the same set of writes,
in any order and with any duplicates, hold **equal states**, and convergence is a plain
``==`` on states. ``value(state)`` is what a reader sees; ``conflicts(state)`` lists the
concurrent writes (siblings) the state holds and how they were resolved.

Everything here is synchronous and I/O-free: no clock, no randomness. Time enters only as
the ``timestamp`` a :class:`Write` carries, which the sync engine takes from its injected
clock, and :func:`check_write` compares it to a ``now`` it is given.
"""

from __future__ import annotations

import enum
import fnmatch
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from collaborative_blocks.core.extensions import ConflictResolver
from collaborative_blocks.errors import (
    FutureTimestampError,
    InvalidWriteError,
    PluginError,
    UnknownNodeError,
    UnknownResolverError,
)

if TYPE_CHECKING:
    import pluggy

__all__ = [
    "CONVERGENT",
    "AnyResolver",
    "Conflict",
    "ConflictResolver",
    "ConflictStatus",
    "JSONValue",
    "MergeFunction",
    "Ordering",
    "ResolverProperty",
    "ResolverRegistry",
    "VectorClock",
    "Write",
    "canonical_json",
    "check_write",
    "resolver_table",
]

#: What a write's value and a state's JSON form may hold.
JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None

#: A resolver whatever its state type (the registry holds resolvers of different states).
AnyResolver: TypeAlias = ConflictResolver[Any]


def canonical_json(value: object) -> str:
    """One spelling per JSON value (sorted keys, no spaces): identity and tie-breaks use it.

    Raises :class:`InvalidWriteError` for something JSON cannot hold (a set, an object, NaN).
    """
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise InvalidWriteError(
            f"value {value!r} cannot be serialised as JSON ({error}); give plain data: dict "
            "with str keys, list, str, int, finite float, bool or None"
        ) from error


# -- vector clocks ----------------------------------------------------------------------------


class Ordering(enum.Enum):
    """How two vector clocks (or the writes carrying them) relate causally."""

    BEFORE = "before"  # the left one happened before the right one
    AFTER = "after"  # the left one happened after the right one
    EQUAL = "equal"
    CONCURRENT = "concurrent"  # neither saw the other: a conflict if they wrote the same key


class VectorClock(Mapping[str, int]):
    """An immutable map node -> counter; a missing node counts 0.

    Zero entries are not stored, so equal clocks have equal dicts and hashes. Operations
    return new clocks. ``compare`` and ``merge`` are plain dict loops over the few nodes of a
    topology (well over 100,000 compare-and-merge per second).
    """

    __slots__ = ("_counts", "_hash")

    _counts: dict[str, int]
    _hash: int | None

    def __init__(self, counts: Mapping[str, int] | Iterable[tuple[str, int]] = ()) -> None:
        items = counts.items() if isinstance(counts, Mapping) else counts
        cleaned: dict[str, int] = {}
        for node, count in items:
            if not isinstance(node, str) or not node:
                raise InvalidWriteError(f"vector clock node {node!r} must be a non-empty str")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise InvalidWriteError(
                    f"vector clock counter for {node!r} is {count!r}; counters are ints >= 0"
                )
            if count:
                cleaned[node] = count
        self._counts = cleaned
        self._hash = None

    @classmethod
    def _trusted(cls, counts: dict[str, int]) -> VectorClock:
        # Skips validation for dicts built here from already-valid clocks (the hot path).
        clock = cls.__new__(cls)
        clock._counts = counts
        clock._hash = None
        return clock

    def __getitem__(self, node: str) -> int:
        return self._counts.get(node, 0)

    def __contains__(self, node: object) -> bool:
        return node in self._counts

    def __iter__(self) -> Iterator[str]:
        return iter(self._counts)

    def __len__(self) -> int:
        return len(self._counts)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, VectorClock):
            return self._counts == other._counts
        return NotImplemented

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._counts.items()))
        return self._hash

    def __repr__(self) -> str:
        inner = ", ".join(f"{node!r}: {count}" for node, count in sorted(self._counts.items()))
        return f"VectorClock({{{inner}}})"

    def increment(self, node: str) -> VectorClock:
        """This clock with ``node``'s counter one higher (a new event at ``node``)."""
        if not isinstance(node, str) or not node:
            raise InvalidWriteError(f"vector clock node {node!r} must be a non-empty str")
        counts = dict(self._counts)
        counts[node] = counts.get(node, 0) + 1
        return VectorClock._trusted(counts)

    def merge(self, other: VectorClock) -> VectorClock:
        """The least clock at or after both (element-wise maximum)."""
        mine, theirs = self._counts, other._counts
        if len(theirs) > len(mine):
            mine, theirs = theirs, mine
        counts = dict(mine)
        for node, count in theirs.items():
            if count > counts.get(node, 0):
                counts[node] = count
        return VectorClock._trusted(counts)

    def compare(self, other: VectorClock) -> Ordering:
        """Whether this clock is BEFORE, AFTER, EQUAL to or CONCURRENT with ``other``."""
        mine, theirs = self._counts, other._counts
        less = greater = False
        for node, count in mine.items():
            their = theirs.get(node, 0)
            if count < their:
                less = True
            elif count > their:
                greater = True
        if not less:
            for node in theirs:
                if node not in mine:
                    less = True  # stored counters are > 0
                    break
        if less:
            return Ordering.CONCURRENT if greater else Ordering.BEFORE
        return Ordering.AFTER if greater else Ordering.EQUAL

    def dominates(self, other: VectorClock) -> bool:
        """True when every counter is >= ``other``'s (AFTER or EQUAL)."""
        return self.compare(other) in (Ordering.AFTER, Ordering.EQUAL)

    def to_json(self) -> dict[str, int]:
        return dict(sorted(self._counts.items()))

    @classmethod
    def from_json(cls, data: object) -> VectorClock:
        if not isinstance(data, dict):
            raise InvalidWriteError(f"a vector clock is a JSON object node -> int, got {data!r}")
        return cls(data)


# -- writes -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, init=False)
class Write:
    """One change to one key, as it travels between replicas.

    ``writer`` is the id of the system that made the change; ``clock`` is that system's
    vector clock *after* counting this write, so ``(writer, clock[writer])`` (the **dot**)
    identifies the write. ``timestamp`` is seconds since the epoch from the writer's clock.
    ``value`` is JSON data; what it means depends on the resolver (a replacement value, a
    counter delta, an OR-set operation, ...).

    Writes are equal when all of that is equal (values compared as canonical JSON), so a
    duplicate delivery is recognised and folding it again changes nothing.
    """

    key: str
    value: JSONValue = field(compare=False)
    writer: str
    timestamp: float
    clock: VectorClock
    value_json: str = field(repr=False)

    def __init__(
        self,
        key: str,
        value: JSONValue,
        writer: str,
        timestamp: float,
        clock: VectorClock | Mapping[str, int],
    ) -> None:
        if not isinstance(key, str) or not key:
            raise InvalidWriteError(f"a write's key must be a non-empty str, got {key!r}")
        if not isinstance(writer, str) or not writer:
            raise InvalidWriteError(f"a write's writer must be a system id (str), got {writer!r}")
        if (
            isinstance(timestamp, bool)
            or not isinstance(timestamp, int | float)
            or not math.isfinite(timestamp)
        ):
            raise InvalidWriteError(
                f"write {key!r} by {writer!r}: timestamp {timestamp!r} must be a finite number "
                "of seconds since the epoch (take it from the injected Clock.now())"
            )
        vclock = clock if isinstance(clock, VectorClock) else VectorClock(clock)
        if vclock[writer] < 1:
            raise InvalidWriteError(
                f"write {key!r} by {writer!r}: its vector clock {vclock!r} has no entry for the "
                "writer; increment the writer's own counter for every write"
            )
        encoded = canonical_json(value)
        # The stored value is a decoded copy, so later mutation of the caller's object cannot
        # change a write that replicas already compared by its JSON.
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "value", json.loads(encoded))
        object.__setattr__(self, "writer", writer)
        object.__setattr__(self, "timestamp", float(timestamp))
        object.__setattr__(self, "clock", vclock)
        object.__setattr__(self, "value_json", encoded)

    @property
    def dot(self) -> tuple[str, int]:
        """``(writer, counter)``: unique per write when writers count every write."""
        return (self.writer, self.clock[self.writer])

    def order_key(self) -> tuple[float, str, int, str, str]:
        """A total order used for last-write-wins and deterministic listings.

        Timestamp first; ties broken by writer id, then the writer's counter, then the value,
        so every replica picks the same winner without talking to the others.
        """
        return (self.timestamp, self.writer, self.clock[self.writer], self.value_json, self.key)

    def compare(self, other: Write) -> Ordering:
        """Causal order of the two writes (by their vector clocks)."""
        return self.clock.compare(other.clock)

    def to_json(self) -> dict[str, JSONValue]:
        return {
            "key": self.key,
            "value": self.value,
            "writer": self.writer,
            "timestamp": self.timestamp,
            "clock": dict(self.clock.to_json()),
        }

    @classmethod
    def from_json(cls, data: object) -> Write:
        if not isinstance(data, dict):
            raise InvalidWriteError(f"a write is a JSON object, got {data!r}")
        try:
            return cls(
                key=data["key"],
                value=data["value"],
                writer=data["writer"],
                timestamp=data["timestamp"],
                clock=VectorClock.from_json(data["clock"]),
            )
        except KeyError as error:
            raise InvalidWriteError(
                f"a write's JSON needs key, value, writer, timestamp and clock; missing {error}"
            ) from error


def check_write(
    write: Write,
    *,
    now: float,
    known_nodes: Iterable[str] | None = None,
    max_clock_skew: float = 300.0,
) -> None:
    """Reject a write that a replica must not fold; call it before ``apply``.

    - a timestamp more than ``max_clock_skew`` seconds after ``now`` (it would win every
      last-write-wins comparison until then) -> :class:`FutureTimestampError`;
    - a vector clock naming a node that is not in ``known_nodes`` (when given) ->
      :class:`UnknownNodeError`.
    """
    if write.timestamp > now + max_clock_skew:
        raise FutureTimestampError(write.key, write.writer, write.timestamp, now, max_clock_skew)
    if known_nodes is not None:
        known = set(known_nodes)
        unknown = sorted(node for node in write.clock if node not in known)
        if unknown:
            raise UnknownNodeError(write.key, write.writer, unknown, sorted(known))


# -- the resolver protocol --------------------------------------------------------------------


class ResolverProperty(enum.Enum):
    """Algebraic laws a resolver's ``merge`` claims; the conformance suite checks them."""

    COMMUTATIVE = "commutative"  # merge(a, b) == merge(b, a)
    ASSOCIATIVE = "associative"  # merge(merge(a, b), c) == merge(a, merge(b, c))
    IDEMPOTENT = "idempotent"  # merge(a, a) == a


#: What a convergent (state-based CRDT-like) resolver claims.
CONVERGENT = frozenset(ResolverProperty)


class ConflictStatus(enum.Enum):
    """What became of concurrent writes to one key."""

    UNRESOLVED = "unresolved"  # kept as siblings; the value shows all of them
    RESOLVED = "resolved"  # a rule or a merge function chose the value
    FAILED = "failed"  # the merge function raised; siblings kept, error recorded


@dataclass(frozen=True, slots=True)
class Conflict:
    """Concurrent writes (siblings) one key's state holds, and how they were resolved."""

    key: str
    resolver: str
    siblings: tuple[Write, ...]
    status: ConflictStatus
    resolution: JSONValue = None
    error: str | None = None

    def to_json(self) -> dict[str, JSONValue]:
        return {
            "key": self.key,
            "resolver": self.resolver,
            "siblings": [write.to_json() for write in self.siblings],
            "status": self.status.value,
            "resolution": self.resolution,
            "error": self.error,
        }


# -- the resolver table -----------------------------------------------------------------------


def resolver_table(pm: pluggy.PluginManager) -> dict[str, AnyResolver]:
    """Name -> resolver, from every plugin's ``cb_conflict_resolvers``; a name twice is an error."""
    found: dict[str, AnyResolver] = {}
    owners: dict[str, str] = {}
    # Called per implementation (not through pm.hook) so an error can name the plugin.
    for impl in pm.hook.cb_conflict_resolvers.get_hookimpls():
        resolvers = impl.function()
        if not isinstance(resolvers, list | tuple):
            raise PluginError(
                f"plugin {impl.plugin_name!r}: cb_conflict_resolvers must return a list, got "
                f"{type(resolvers).__name__}"
            )
        for resolver in resolvers:
            if not isinstance(resolver, ConflictResolver):
                raise PluginError(
                    f"plugin {impl.plugin_name!r}: cb_conflict_resolvers returned {resolver!r}, "
                    "which does not implement ConflictResolver (name, properties, initial, "
                    "apply, merge, value, conflicts, to_json, from_json)"
                )
            name = resolver.name
            if name in found:
                raise PluginError(
                    f"conflict resolver {name!r} is provided by both {owners[name]!r} and "
                    f"{impl.plugin_name!r}; unregister one of them"
                )
            found[name] = resolver
            owners[name] = impl.plugin_name
    return found


class ResolverRegistry:
    """Which resolver handles which key: glob patterns, first match in assignment order.

    Built from a plugin manager (every plugin's ``cb_conflict_resolvers``) or from resolver
    objects. Keys no pattern matches use ``default`` (``last_write_wins`` unless told).
    Patterns use :func:`fnmatch.fnmatchcase` (``*``, ``?``, ``[abc]``), case-sensitively.
    """

    def __init__(
        self, resolvers: Iterable[AnyResolver], *, default: str = "last_write_wins"
    ) -> None:
        self._resolvers: dict[str, AnyResolver] = {}
        for resolver in resolvers:
            self.add(resolver)
        self._rules: list[tuple[str, AnyResolver]] = []
        self._default_name = default

    @classmethod
    def from_plugin_manager(
        cls, pm: pluggy.PluginManager, *, default: str = "last_write_wins"
    ) -> ResolverRegistry:
        return cls(resolver_table(pm).values(), default=default)

    def add(self, resolver: AnyResolver) -> None:
        """Make ``resolver`` available by its name (a name twice is a :class:`PluginError`)."""
        if not isinstance(resolver, ConflictResolver):
            raise PluginError(f"{resolver!r} does not implement ConflictResolver")
        if resolver.name in self._resolvers and self._resolvers[resolver.name] is not resolver:
            raise PluginError(
                f"a conflict resolver named {resolver.name!r} is already registered; give "
                "yours another name"
            )
        self._resolvers[resolver.name] = resolver

    @property
    def names(self) -> list[str]:
        return sorted(self._resolvers)

    def get(self, name: str) -> AnyResolver:
        try:
            return self._resolvers[name]
        except KeyError:
            raise UnknownResolverError(name, self.names) from None

    def assign(self, pattern: str, resolver: str | AnyResolver) -> None:
        """Use ``resolver`` (a name, or an object, then added) for keys matching ``pattern``."""
        if isinstance(resolver, str):
            chosen = self.get(resolver)
        else:
            self.add(resolver)
            chosen = resolver
        self._rules.append((pattern, chosen))

    @property
    def rules(self) -> list[tuple[str, str]]:
        """``(pattern, resolver name)`` in matching order."""
        return [(pattern, resolver.name) for pattern, resolver in self._rules]

    def resolver_for(self, key: str) -> AnyResolver:
        for pattern, resolver in self._rules:
            if fnmatch.fnmatchcase(key, pattern):
                return resolver
        return self.get(self._default_name)


# A callable that picks one value for a key from its sibling writes (``application_specific``
# and ``vector_clock``'s merge function).
MergeFunction: TypeAlias = Callable[[str, Sequence[Write]], JSONValue]
