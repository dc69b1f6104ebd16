"""The real-time sync engine: systems with replicas of keyed data, a dependency topology,
changes recorded in the log and delivered through the broker, awaitable consistency.

- A **system** holds a replica: key -> resolver state (see
  :mod:`collaborative_blocks.core.sync.resolvers`). It **depends on** the systems whose
  changes it receives; the topology is a DAG, registered dependencies first.
- ``propagate_change(source, {key: value, ...})`` makes one :class:`Write` per key (the
  source's vector clock after counting it, the engine clock's timestamp), folds them into the
  source's replica, appends them as one ``ChangeRecorded`` event to the engine's change
  stream, and publishes them on the broker. Each dependent system folds them and forwards
  them to its own dependents, so a change reaches every system downstream of its source in
  topological order.
- The change stream is the truth: a restarted engine (same store, same registrations)
  rebuilds every replica by folding the logged changes. Conflicts a replica detects are
  appended to the engine's conflict stream.
- Anti-entropy: a delivery can be lost for good (dead-lettered after its retries ran out
  while the store was down, or a forward that failed after its replica had applied the
  change). The engine keeps every change of its own that some system has not applied yet;
  one still outstanding ``repair_after`` seconds after it was recorded is applied to those
  systems directly from the record, as the broker would have (:meth:`repair`). Replicas
  therefore converge without a restart, whatever the broker lost.

Folding a change into a replica computes every key's new state before storing any, so a
resolver that raises leaves the replica as it was (no half-applied change).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics

from collaborative_blocks.core.clock import Clock
from collaborative_blocks.core.messaging.broker import MessageBroker, MessageContext
from collaborative_blocks.core.messaging.envelope import DeliveryGuarantee, Message, MessageType
from collaborative_blocks.core.runtime import Runtime
from collaborative_blocks.core.sync.resolvers import (
    Conflict,
    ConflictStatus,
    JSONValue,
    ResolverRegistry,
    VectorClock,
    Write,
    canonical_json,
    check_write,
)
from collaborative_blocks.errors import (
    ChangeOutcomeUnknownError,
    DependencyCycleError,
    DuplicateSystemError,
    ResolverError,
    ResolverFailedError,
    StoreUnavailableError,
    SyncError,
    SyncSerializationError,
    TopologyError,
    UnknownDependencyError,
    UnknownSystemError,
)
from collaborative_blocks.stores.base import AppendRequest, EventStore, NewEvent

__all__ = [
    "CHANGE_TOPIC",
    "CONFLICT_TOPIC",
    "ChangeRecord",
    "Inconsistency",
    "RealTimeSyncEngine",
]

CHANGE_TOPIC = "collaborative_blocks.sync:ChangeRecorded"
CONFLICT_TOPIC = "collaborative_blocks.sync:ConflictRecorded"
#: The name of the command that carries a change to a system's replica.
CHANGE_MESSAGE = "cb.sync.change"
_INSTRUMENTATION = "collaborative_blocks.sync"
log = logging.getLogger(__name__)
# System ids become message names and broker subscription patterns: no glob characters.
_SYSTEM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")


@dataclass(frozen=True, slots=True)
class ChangeRecord:
    """A change as recorded: its id (log position), its source and one write per key."""

    change_id: int
    source: str
    writes: tuple[Write, ...]

    @property
    def dot(self) -> tuple[str, int]:
        """The first write's dot: identifies the change before it has a log position."""
        return self.writes[0].dot

    @property
    def recorded_at(self) -> float:
        return self.writes[0].timestamp if self.writes else 0.0


_MISSING = object()


@dataclass(slots=True)
class _Outstanding:
    """A change of this engine that some downstream systems have not applied yet."""

    since: float  # when it was recorded (engine clock, monotonic)
    systems: set[str]  # the systems still to apply it
    record: ChangeRecord | None = None  # set once the change is in the log
    repair_at: float = 0.0  # when the repair task applies it itself, if still outstanding


@dataclass(slots=True)
class _InDoubt:
    """A change whose append failed with the store unreachable and whose presence in the log
    could not be checked: settled from the log once the store answers."""

    record: ChangeRecord  # as proposed (change_id 0)
    body: bytes  # the event's exact bytes: found in the log, or not
    conflicts: list[Conflict]
    check_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Inconsistency:
    """Why ``ensure_consistency(key)`` returned False.

    ``values`` maps every system that should hold the key (a writer of it, or downstream of
    one) to its current resolved value (None when it has none yet); ``behind`` maps each
    system still missing writes to the key to how many changes it has not applied.
    """

    key: str
    values: dict[str, JSONValue]
    behind: dict[str, int]

    @property
    def lagging(self) -> list[str]:
        """The systems that have not applied every change to the key."""
        return list(self.behind)


def _stored_conflict(state: bytes) -> Conflict:
    """A conflict as the conflict stream stores it."""
    data = json.loads(state)
    return Conflict(
        key=data["key"],
        resolver=data["resolver"],
        siblings=tuple(Write.from_json(w) for w in data["siblings"]),
        status=ConflictStatus(data["status"]),
        resolution=data.get("resolution"),
        error=data.get("error"),
    )


@dataclass
class _Replica:
    system: str
    dependencies: tuple[str, ...]
    dependents: list[str] = field(default_factory=list)
    states: dict[str, Any] = field(default_factory=dict)
    clock: VectorClock = field(default_factory=VectorClock)
    applied: set[tuple[str, int]] = field(default_factory=set)  # dots of applied changes
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    version: int = 0  # how many changes it has applied (a change of it, in memory)


class RealTimeSyncEngine:
    """Keeps replicas of keyed data in several systems consistent.

    ```python
    sync_engine = RealTimeSyncEngine(store=store)
    await sync_engine.register_system("crm")
    await sync_engine.register_system("billing", ["crm"])
    await sync_engine.propagate_change("crm", {"customer-1.email": "a@example.com"})
    assert await sync_engine.ensure_consistency("customer-1.email", 5)
    ```

    Everything it needs can be injected: ``runtime`` (settings, clock, plugins, store),
    ``store``, ``broker`` (default: an in-process broker on the same clock), ``resolvers``
    (default: every plugin's ``cb_conflict_resolvers``, ``last_write_wins`` for keys no
    pattern matches), ``meter_provider`` for OpenTelemetry metrics. ``name`` separates
    engines sharing one store (streams ``cb-sync:<name>:changes`` and
    ``cb-sync:<name>:conflicts``). ``max_clock_skew``: a write whose timestamp is further in
    the future is refused.
    """

    def __init__(
        self,
        runtime: Runtime | None = None,
        *,
        store: EventStore | None = None,
        broker: MessageBroker | None = None,
        resolvers: ResolverRegistry | None = None,
        clock: Clock | None = None,
        name: str = "sync",
        guarantee: DeliveryGuarantee = DeliveryGuarantee.AT_LEAST_ONCE,
        max_clock_skew: float = 300.0,
        repair_after: float | None = 30.0,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        if not _SYSTEM_ID.match(name):
            raise SyncError(f"engine name {name!r} must match {_SYSTEM_ID.pattern}")
        if repair_after is not None and not repair_after > 0:
            raise SyncError(
                f"repair_after must be a number of seconds > 0 (or None to turn repairs off), "
                f"got {repair_after!r}"
            )
        self._own_runtime = runtime is None
        self.runtime = runtime if runtime is not None else Runtime(store=store, clock=clock)
        self.clock: Clock = clock if clock is not None else self.runtime.clock
        self._store = store
        self._own_broker = broker is None
        self.broker = (
            broker
            if broker is not None
            else MessageBroker(runtime=self.runtime, clock=self.clock, store=store)
        )
        self._resolvers = resolvers
        self.name = name
        self.guarantee = guarantee
        self.max_clock_skew = max_clock_skew
        self.repair_after = repair_after
        self.changes_stream = f"cb-sync:{name}:changes"
        self.conflicts_stream = f"cb-sync:{name}:conflicts"
        self._replicas: dict[str, _Replica] = {}
        # key -> (change id, source) of every change that wrote it, in log order
        self._key_changes: dict[str, list[tuple[tuple[str, int], str]]] = {}
        self._targets: dict[str, tuple[str, ...]] = {}  # source -> itself + downstream
        self._conflicts: dict[str, list[Conflict]] = {}
        self._conflicts_seen: set[str] = set()
        self._unsaved: list[Conflict] = []
        self._conflicts_loaded = False
        self._indexed = False
        self._changed = asyncio.Event()
        # change (its dot) -> when recorded, systems still to apply it, the record
        self._pending: dict[tuple[str, int], _Outstanding] = {}
        self._in_doubt: list[_InDoubt] = []
        self._repairer: asyncio.Task[None] | None = None
        self._repair_wanted = asyncio.Event()
        # What the repair task sleeps until (None: until woken); only an earlier due wakes it.
        self._repair_sleeps_until: float | None = None
        # key -> deliveries still to apply, so a waiter checks a counter, not every change
        self._key_pending: dict[str, int] = {}
        self.last_inconsistency: Inconsistency | None = None
        meter = metrics.get_meter(_INSTRUMENTATION, meter_provider=meter_provider)
        self._lag = meter.create_histogram(
            "cb.sync.replication.lag",
            unit="s",
            description="time from a change's timestamp to its application at a system",
        )
        self._latency = meter.create_histogram(
            "cb.sync.propagation.latency",
            unit="s",
            description="time from recording a change to its application at the last system",
        )
        self._conflict_counter = meter.create_counter(
            "cb.sync.conflicts",
            description="conflicts detected and resolved, per resolver (strategy) and status",
        )
        self._repair_counter = meter.create_counter(
            "cb.sync.repairs",
            description="changes applied to a system by the repair task (its delivery was lost)",
        )

    # -- wiring ----------------------------------------------------------------------------

    async def store(self) -> EventStore:
        if self._store is None:
            self._store = await self.runtime.store()
        return self._store

    @property
    def resolvers(self) -> ResolverRegistry:
        """Which resolver folds which key (``resolvers.assign(pattern, name)`` to choose)."""
        if self._resolvers is None:
            self._resolvers = ResolverRegistry.from_plugin_manager(self.runtime.plugins)
        return self._resolvers

    @property
    def systems(self) -> list[str]:
        """Registered system ids in registration (a topological) order."""
        return list(self._replicas)

    # -- topology --------------------------------------------------------------------------

    async def register_system(self, system_id: str, dependencies: Iterable[str] = ()) -> None:
        """Add ``system_id``, which receives the changes of every system in ``dependencies``.

        Dependencies must be registered first, so the topology stays acyclic; a duplicate id,
        an unknown dependency or a cycle (a system depending on itself) is a
        :class:`TopologyError` and registers nothing. The system's replica is rebuilt from
        the change log (everything its upstream systems changed), so registering the same
        systems after a restart restores the replicas.
        """
        if isinstance(dependencies, str):
            raise TopologyError(
                f"dependencies of {system_id!r} must be a list of system ids, not the string "
                f"{dependencies!r}; write [{dependencies!r}]"
            )
        deps = tuple(dict.fromkeys(dependencies))
        if not isinstance(system_id, str) or not _SYSTEM_ID.match(system_id):
            raise TopologyError(
                f"system id {system_id!r} must match {_SYSTEM_ID.pattern} (letters, digits, "
                "_ . : -; it becomes a message name)"
            )
        if system_id in self._replicas:
            raise DuplicateSystemError(
                f"system {system_id!r} is already registered with this engine; register each "
                "system once"
            )
        if system_id in deps:
            raise DependencyCycleError([system_id, system_id])
        unknown = [dep for dep in deps if dep not in self._replicas]
        if unknown:
            raise UnknownDependencyError(
                f"system {system_id!r} depends on {', '.join(map(repr, unknown))}, not "
                f"registered (registered: {', '.join(self._replicas) or 'none'}); register "
                "dependencies first. Nothing was registered."
            )
        store = await self.store()
        await self._load_conflicts(store)
        records = await self._read_changes(store)
        if not self._indexed:
            # The first registration after a (re)start learns which changes wrote which keys.
            self._indexed = True
            for record in records:
                self._index(record)
        replica = _Replica(system_id, deps)
        upstream = self._upstream(deps) | {system_id}
        for record in records:
            if record.source in upstream:
                self._fold(replica, record, raise_errors=False)
        self._replicas[system_id] = replica
        for dep in deps:
            self._replicas[dep].dependents.append(system_id)
        self._targets.clear()

        async def receive(message: Message, ctx: MessageContext) -> None:
            await self._receive(system_id, message, ctx)

        # Each system's replica is fed through its own inbox on the broker (commands to
        # one target), so a change is handed only to the systems that take it.
        await self.broker.subscribe(
            CHANGE_MESSAGE,
            receive,
            target=self._inbox(system_id),
            group=f"cb-sync:{self.name}:{system_id}",
            system=system_id,
        )
        self._changed.set()
        if self.repair_after is not None and self._repairer is None:
            self._repairer = asyncio.ensure_future(self._repair_loop(self.repair_after))

    def _upstream(self, deps: Iterable[str]) -> set[str]:
        seen: set[str] = set()
        todo = list(deps)
        while todo:
            system = todo.pop()
            if system not in seen:
                seen.add(system)
                todo.extend(self._replicas[system].dependencies)
        return seen

    def downstream(self, system_id: str) -> list[str]:
        """Every system that receives ``system_id``'s changes, transitively, in topological
        (registration) order."""
        self._require(system_id)
        reached = {system_id}
        for system, replica in self._replicas.items():
            if any(dep in reached for dep in replica.dependencies):
                reached.add(system)
        return [s for s in self._replicas if s in reached and s != system_id]

    def _inbox(self, system_id: str) -> str:
        return f"cb-sync.{self.name}.{system_id}"

    def _require(self, system_id: str) -> _Replica:
        replica = self._replicas.get(system_id)
        if replica is None:
            raise UnknownSystemError(
                f"system {system_id!r} is not registered with sync engine {self.name!r} "
                f"(registered: {', '.join(self._replicas) or 'none'}); call "
                "register_system first. Nothing was written."
            )
        return replica

    # -- changes ---------------------------------------------------------------------------

    async def propagate_change(
        self,
        source: str,
        change_data: Mapping[str, JSONValue],
        *,
        timestamp: float | None = None,
        seen: Mapping[str, int] | None = None,
    ) -> ChangeRecord:
        """Record ``change_data`` (key -> value) as ``source``'s change and deliver it.

        ``timestamp``: when the source made the change by its own clock (default: now, by
        the engine's clock). ``seen``: a vector clock of what the source had seen when it
        made the change, merged into its replica's (for systems that track causality
        themselves).

        Returns the :class:`ChangeRecord` (its ``change_id`` is the log position). Raises
        :class:`UnknownSystemError` for an unregistered source,
        :class:`SyncSerializationError` for data that is not JSON,
        :class:`~collaborative_blocks.errors.FutureTimestampError` for a timestamp more than
        ``max_clock_skew`` ahead, :class:`~collaborative_blocks.errors.UnknownNodeError` for
        a ``seen`` clock naming an unregistered system, another
        :class:`~collaborative_blocks.errors.ResolverError` for a write a resolver refuses,
        :class:`ResolverFailedError` when a resolver raises, or the store's error when it
        refuses the append; in each case nothing is written and no replica changes (the
        source's vector clock may keep the refused change's dot unused). When the append
        fails with the store unreachable, the engine reads the log back: a change that went
        through all the same (the connection dropped after the commit) is returned as
        recorded; if the log cannot be read either,
        :class:`~collaborative_blocks.errors.ChangeOutcomeUnknownError`, and the engine
        settles the change once the store answers. Once the change is in the log it is
        returned, even if sending it to the dependents fails (the transport is down): the
        repair applies it to them at once (see :meth:`repair`).
        """
        replica = self._require(source)
        if not isinstance(change_data, Mapping) or not change_data:
            raise SyncSerializationError(
                f"change_data must be a non-empty mapping of key -> JSON value, got {change_data!r}"
            )
        store = await self.store()
        await self._load_conflicts(store)
        # From here to the append nothing awaits: the writes' vector clocks, the new states
        # and the replica update are one step, so concurrent changes from one source each
        # count the previous ones, and their appends can share a commit.
        now = self.clock.now()
        clock = replica.clock if seen is None else replica.clock.merge(VectorClock(seen))
        stamp = now if timestamp is None else timestamp
        writes: list[Write] = []
        for key, value in change_data.items():
            if not isinstance(key, str) or not key:
                raise SyncSerializationError(f"a key must be a non-empty string, got {key!r}")
            try:
                canonical_json(value)
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as error:
                raise SyncSerializationError(
                    f"the value of {key!r} from {source!r} is not JSON data ({error}); give "
                    "dicts with str keys, lists, str, int, finite floats, bool or None. "
                    "Nothing was written."
                ) from None
            clock = clock.increment(source)
            write = Write(key, value, source, stamp, clock)
            check_write(
                write, now=now, known_nodes=self._replicas, max_clock_skew=self.max_clock_skew
            )
            writes.append(write)
        # The new states are computed before the change is in the log: a resolver that
        # raises must stop it here, or every replica would fail on it later.
        provisional = ChangeRecord(0, source, tuple(writes))
        try:
            updated, conflicts = self._compute(replica, provisional)
        except ResolverFailedError:
            await self._record_conflicts(())  # the failure is a conflict event too
            raise
        targets = self.downstream(source)
        keys = list(dict.fromkeys(write.key for write in writes))
        # The writes' dots are taken now: the replica's clock counts them, so a concurrent
        # change from this source is causally after this one. Its states change only once
        # the change is in the log, so a failed append leaves nothing to undo (and needs no
        # read of the log, which may be failing too). A dot of a failed change stays unused.
        replica.clock = clock
        computed_at = replica.version
        outstanding = None
        if targets:
            outstanding = self._pending[provisional.dot] = _Outstanding(
                self.clock.monotonic(), set(targets)
            )
            for key in keys:
                self._key_pending[key] = self._key_pending.get(key, 0) + len(targets)
        body = canonical_json({"source": source, "writes": [w.to_json() for w in writes]})
        carried = list(self._unsaved)
        fresh = self._fresh_conflicts(conflicts)
        requests = [AppendRequest(self.changes_stream, [NewEvent(CHANGE_TOPIC, body.encode())])]
        if fresh:
            requests.append(self._conflict_request(fresh))
        try:
            # The change and the conflicts it makes are one transaction.
            position = (await store.append_many(requests))[0][0]
        except BaseException as error:
            found: int | None = None
            known = True
            if isinstance(error, StoreUnavailableError):
                # It may have gone through all the same (the connection dropped after the
                # commit): the log says.
                found, known = await self._read_back(store, body.encode())
            if found is None:
                # Not in the log (or nobody can tell yet): in no replica, nothing to deliver.
                if self._pending.pop(provisional.dot, None) is not None:
                    for key in keys:
                        self._key_pending[key] -= len(targets)
                self._unsaved = carried + self._unsaved
                if not known:
                    self._in_doubt.append(
                        _InDoubt(
                            provisional,
                            body.encode(),
                            fresh,
                            self.clock.monotonic() + (self.repair_after or 0.0),
                        )
                    )
                    self._want_repair(self._in_doubt[-1].check_at)
                    raise ChangeOutcomeUnknownError(
                        f"the store failed while recording {source!r}'s change ({error}) and "
                        "cannot be read to tell whether it went through; the engine settles it "
                        "from the log once the store answers (it then reaches every replica, "
                        "or it never happened). Do not propagate it again blindly."
                    ) from error
                raise
            position = found
        for conflict in fresh:
            self._remember_conflict(conflict)
        record = ChangeRecord(position, source, tuple(writes))
        holds = True
        if replica.version != computed_at:
            # The replica changed during the append (a delivery, another change of this
            # source): fold the change into what it holds now.
            try:
                updated, conflicts = self._compute(replica, record)
            except ResolverFailedError as error:
                # Logged and sent, but this replica cannot hold it: as at any replica whose
                # resolver raises, the failure is a conflict of the key (stored with the
                # next append).
                log.error("sync engine %r: %s", self.name, error)
                holds = False
            else:
                for conflict in conflicts:
                    if self._remember_conflict(conflict):
                        self._unsaved.append(conflict)  # stored with the next append
        if holds:
            self._commit(replica, record, updated)
        if outstanding is not None:
            outstanding.record = record
            if self.repair_after is not None:
                outstanding.repair_at = outstanding.since + self.repair_after
                self._want_repair(outstanding.repair_at)
        self._index(record)
        self._changed.set()
        try:
            for message in self._messages(source, record):
                await self.broker.publish(message)
        except Exception as error:
            # The change is in the log and its source's replica: it happened. Delivering it
            # is the engine's job from here (an outbox): the repair applies it to the
            # systems still missing it, now rather than repair_after from now.
            log.warning(
                "sync engine %r: change %s is recorded but could not be sent (%s); the "
                "repair applies it downstream",
                self.name,
                record.change_id,
                error,
            )
            if outstanding is not None and self.repair_after is not None:
                outstanding.repair_at = self.clock.monotonic()
                self._want_repair(outstanding.repair_at)
        return record

    async def _read_back(self, store: EventStore, body: bytes) -> tuple[int | None, bool]:
        """Where the change event ``body`` is in the log (None: absent), and whether the log
        could be read to tell (newest first: a change just appended is near the end)."""
        page = 256
        to_version: int | None = None
        try:
            while True:
                events = await store.read(
                    self.changes_stream, to_version=to_version, limit=page, backwards=True
                )
                for event in events:
                    if event.state == body:
                        return event.position, True
                if len(events) < page or events[-1].version <= 1:
                    return None, True
                to_version = events[-1].version - 1
        except Exception as error:
            log.warning("sync engine %r: cannot read the change log back: %s", self.name, error)
            return None, False

    async def _settle_in_doubt(self, *, every: bool) -> None:
        """Look up the changes whose recording is in doubt (``every``, or those due): one
        found in the log is adopted (the repair applies it to its source and downstream);
        one absent is dropped; one still unknown waits for the next look."""
        now = self.clock.monotonic()
        due = [doubt for doubt in self._in_doubt if every or doubt.check_at <= now]
        self._in_doubt = [doubt for doubt in self._in_doubt if doubt not in due]
        store = await self.store()
        for doubt in due:
            position, known = await self._read_back(store, doubt.body)
            if not known:
                doubt.check_at = now + (self.repair_after or 0.0)
                self._in_doubt.append(doubt)
            elif position is not None:
                self._adopt(doubt, position)

    def _adopt(self, doubt: _InDoubt, position: int) -> None:
        """A change found in the log after all: outstanding at its source and downstream,
        due for the repair now."""
        for conflict in doubt.conflicts:
            self._remember_conflict(conflict)
        proposed = doubt.record
        record = ChangeRecord(position, proposed.source, proposed.writes)
        systems = {record.source, *self.downstream(record.source)}
        now = self.clock.monotonic()
        self._index(record)
        self._pending[record.dot] = _Outstanding(now, systems, record, now)
        for key in dict.fromkeys(write.key for write in record.writes):
            self._key_pending[key] = self._key_pending.get(key, 0) + len(systems)
        self._want_repair(now)
        self._changed.set()

    def _messages(self, sender: str, record: ChangeRecord) -> list[Message]:
        """One command per system that takes ``sender``'s changes."""
        payload: JSONValue = {
            "change": record.change_id,
            "source": record.source,
            "writes": [w.to_json() for w in record.writes],
        }
        return [
            Message(
                MessageType.COMMAND,
                CHANGE_MESSAGE,
                payload,
                source=sender,
                target=self._inbox(dependent),
                key=record.source,
                guarantee=self.guarantee,
            )
            for dependent in self._replicas[sender].dependents
        ]

    async def _receive(self, system_id: str, message: Message, ctx: MessageContext) -> None:
        payload = message.payload
        if not isinstance(payload, dict):
            raise SyncError(f"sync message {message.id} has no change payload")
        writes = payload.get("writes")
        record = ChangeRecord(
            int(payload["change"]),
            str(payload["source"]),
            tuple(Write.from_json(w) for w in writes) if isinstance(writes, list) else (),
        )
        if await self._apply(system_id, record) or ctx.attempt > 1:
            # A redelivery forwards even a change its replica already holds: the first
            # delivery may have applied it and then failed before its forwards went out.
            # (Dependents drop what they hold; a diamond's second copy is not forwarded.)
            for forward in self._messages(system_id, record):
                ctx.publish(forward)

    async def _apply(self, system_id: str, record: ChangeRecord) -> bool:
        """Fold ``record`` into ``system_id``'s replica unless it holds it already (then
        False); conflicts it makes are stored first, then the replica shows the change."""
        replica = self._replicas[system_id]
        # One change at a time per replica: the conflict append below awaits, and a second
        # change computed meanwhile from the old state would undo the first.
        async with replica.lock:
            if record.dot in replica.applied:
                self._delivered(system_id, record)  # a diamond's second copy, a redelivery
                return False
            try:
                updated, conflicts = self._compute(replica, record)
            except ResolverFailedError:
                await self._record_conflicts(())
                raise
            # Conflicts are stored before the replica shows the change, so whoever sees the
            # replicas agree also finds the conflicts that agreement involved.
            if conflicts:
                await self._record_conflicts(conflicts)
                if record.dot in replica.applied:
                    self._delivered(system_id, record)
                    return False  # applied meanwhile (a rebuild)
                # The system's own propagate_change may have changed the replica during the
                # append (it does not take the lock): fold again from what is there now.
                updated, _ = self._compute(replica, record)
            self._commit(replica, record, updated)
        now = self.clock.now()
        for write in record.writes:
            self._lag.record(max(now - write.timestamp, 0.0), {"system": system_id})
        self._delivered(system_id, record)
        self._changed.set()
        return True

    def _delivered(self, system_id: str, record: ChangeRecord, *, applied: bool = True) -> None:
        """``system_id`` holds ``record`` now (or never will: ``applied=False``): it is no
        longer waited for there."""
        outstanding = self._pending.get(record.dot)
        if outstanding is None or system_id not in outstanding.systems:
            return
        outstanding.systems.discard(system_id)
        for key in dict.fromkeys(write.key for write in record.writes):
            self._key_pending[key] -= 1
        if not outstanding.systems:
            del self._pending[record.dot]
            if applied:
                self._latency.record(max(self.clock.monotonic() - outstanding.since, 0.0))

    # -- anti-entropy ------------------------------------------------------------------------

    async def repair(self, *, older_than: float = 0.0) -> int:
        """Apply this engine's changes that some system still has not applied, recorded at
        least ``older_than`` seconds ago, to those systems directly (in topological order).

        A delivery is normally what applies a change to a system; this is for the ones that
        never arrive: a message dead-lettered after its retries ran out (while the store was
        down, say), or a forward that failed after its replica had applied the change. The
        engine calls it by itself every ``repair_after`` seconds for changes outstanding that
        long; a late delivery of a repaired change is then a duplicate and changes nothing.
        Returns how many (system, change) applications it made. A system it cannot repair now
        (the store refuses the conflict record) is tried again on the next call; one whose
        resolver raises on the change is given up, and the failure is in ``conflicts(key)``.
        """
        if self._in_doubt:
            await self._settle_in_doubt(every=True)
        now = self.clock.monotonic()
        return await self._repair(
            [
                outstanding
                for outstanding in self._pending.values()
                if outstanding.record is not None and outstanding.since + older_than <= now
            ]
        )

    async def _repair(self, due: list[_Outstanding]) -> int:
        now = self.clock.monotonic()
        repaired = 0
        for outstanding in due:
            record = outstanding.record
            assert record is not None
            for system in [s for s in self._replicas if s in outstanding.systems]:
                try:
                    applied = await self._apply(system, record)
                except ResolverFailedError:
                    # Recorded as a FAILED conflict; waiting for it again would change nothing.
                    self._delivered(system, record, applied=False)
                    continue
                if applied:
                    repaired += 1
                    self._repair_counter.add(1, {"system": system})
            if self.repair_after is not None:
                outstanding.repair_at = now + self.repair_after
        return repaired

    def _want_repair(self, at: float) -> None:
        """Wake the repair task if something is due at ``at``, before what it sleeps until
        (a change recorded now is due after the ones already waiting: no wake-up)."""
        until = self._repair_sleeps_until
        if until is None or at < until:
            self._repair_wanted.set()

    async def _repair_loop(self, repair_after: float) -> None:
        """Wait for the first outstanding change to be due (``repair_after`` seconds old, or
        at once when its sending failed), repair what is due, repeat; a failed repair is
        tried again ``repair_after`` later."""
        while True:
            self._repair_wanted.clear()
            due = min(
                [
                    *(o.repair_at for o in self._pending.values() if o.record is not None),
                    *(doubt.check_at for doubt in self._in_doubt),
                ],
                default=None,
            )
            if due is None:
                self._repair_sleeps_until = None
                await self._repair_wanted.wait()
                continue
            now = self.clock.monotonic()
            if due > now:
                # Until then, or until a change is due sooner (its sending failed).
                self._repair_sleeps_until = due
                timer = asyncio.ensure_future(self.clock.sleep(due - now))
                wanted = asyncio.ensure_future(self._repair_wanted.wait())
                try:
                    await asyncio.wait({timer, wanted}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    timer.cancel()
                    wanted.cancel()
                continue
            self._repair_sleeps_until = now
            try:
                if self._in_doubt:
                    await self._settle_in_doubt(every=False)
                await self._repair(
                    [
                        o
                        for o in self._pending.values()
                        if o.record is not None and o.repair_at <= now
                    ]
                )
            except Exception as error:  # the store is down, say: the next round retries
                log.warning("sync engine %r: repair failed (%s); retrying", self.name, error)
                now = self.clock.monotonic()
                for outstanding in self._pending.values():
                    outstanding.repair_at = max(outstanding.repair_at, now + repair_after)

    def _fold(
        self, replica: _Replica, record: ChangeRecord, *, raise_errors: bool
    ) -> list[Conflict]:
        """Fold all writes of ``record`` into ``replica``, all or nothing; conflicts out."""
        if record.dot in replica.applied:
            return []
        try:
            updated, conflicts = self._compute(replica, record)
        except SyncError:
            if raise_errors:
                raise
            return []
        self._commit(replica, record, updated)
        return conflicts

    def _compute(
        self, replica: _Replica, record: ChangeRecord
    ) -> tuple[dict[str, Any], list[Conflict]]:
        """The new state of every key ``record`` writes, without storing any of them."""
        updated: dict[str, Any] = {}
        conflicts: list[Conflict] = []
        for write in record.writes:
            resolver = self.resolvers.resolver_for(write.key)
            state = updated.get(write.key, replica.states.get(write.key, _MISSING))
            if state is _MISSING:
                state = resolver.initial()
            try:
                state = resolver.apply(state, write)
                found = list(resolver.conflicts(state))
            except ResolverError:
                raise
            except Exception as error:
                failure = Conflict(
                    write.key,
                    resolver.name,
                    (write,),
                    ConflictStatus.FAILED,
                    error=f"{type(error).__name__}: {error}",
                )
                if self._remember_conflict(failure):
                    self._unsaved.append(failure)  # stored by the caller, which can await
                raise ResolverFailedError(
                    f"resolver {resolver.name!r} raised {type(error).__name__}: {error} "
                    f"on a write to {write.key!r} by {write.writer!r}; the change was not "
                    "applied and is listed by conflicts(key). Fix the resolver (or choose "
                    "another for this key) and propagate the change again."
                ) from error
            conflicts.extend(found)
            updated[write.key] = state
        return updated, conflicts

    @staticmethod
    def _commit(replica: _Replica, record: ChangeRecord, updated: dict[str, Any]) -> None:
        replica.states.update(updated)
        for write in record.writes:
            replica.clock = replica.clock.merge(write.clock)
        replica.applied.add(record.dot)
        replica.version += 1

    # -- conflicts -------------------------------------------------------------------------

    @staticmethod
    def _conflict_id(conflict: Conflict) -> str:
        return canonical_json(
            [conflict.key, conflict.status.value, sorted(w.dot for w in conflict.siblings)]
        )

    def _remember_conflict(self, conflict: Conflict) -> bool:
        ident = self._conflict_id(conflict)
        if ident in self._conflicts_seen:
            return False
        self._conflicts_seen.add(ident)
        self._conflicts.setdefault(conflict.key, []).append(conflict)
        self._conflict_counter.add(
            1, {"resolver": conflict.resolver, "status": conflict.status.value}
        )
        return True

    def _fresh_conflicts(self, conflicts: Iterable[Conflict]) -> list[Conflict]:
        """Conflicts not recorded yet (each once), plus recorded failures not yet stored."""
        fresh, idents = list(self._unsaved), set()
        self._unsaved = []
        for conflict in conflicts:
            ident = self._conflict_id(conflict)
            if ident not in self._conflicts_seen and ident not in idents:
                idents.add(ident)
                fresh.append(conflict)
        return fresh

    def _conflict_request(self, conflicts: Iterable[Conflict]) -> AppendRequest:
        return AppendRequest(
            self.conflicts_stream,
            [NewEvent(CONFLICT_TOPIC, canonical_json(c.to_json()).encode()) for c in conflicts],
        )

    async def _record_conflicts(self, conflicts: Iterable[Conflict]) -> None:
        """Append the conflicts not recorded yet to the conflict stream, then remember them."""
        fresh = self._fresh_conflicts(conflicts)
        if fresh:
            store = await self.store()
            try:
                await store.append_many([self._conflict_request(fresh)])
            except BaseException:
                # Stored or not (the connection may have dropped after the commit): known
                # from now on, and stored (again) with the next append; the conflict stream
                # is read back deduplicated.
                for conflict in fresh:
                    self._remember_conflict(conflict)
                self._unsaved = fresh + self._unsaved
                raise
            for conflict in fresh:
                self._remember_conflict(conflict)

    async def _load_conflicts(self, store: EventStore) -> None:
        if self._conflicts_loaded:
            return
        # Loaded once, and only once the read worked: a failed read is tried again by the
        # next caller, or conflicts(key) would miss every recorded conflict for good.
        found = await store.read(self.conflicts_stream)
        self._conflicts_loaded = True
        for stored in found:
            conflict = _stored_conflict(stored.state)
            ident = self._conflict_id(conflict)
            if ident not in self._conflicts_seen:
                self._conflicts_seen.add(ident)
                self._conflicts.setdefault(conflict.key, []).append(conflict)

    def conflicts(self, key: str) -> list[Conflict]:
        """Conflicts detected on ``key`` (unresolved, resolved or failed), oldest first."""
        return list(self._conflicts.get(key, []))

    # -- reading and consistency -------------------------------------------------------------

    async def _read_changes(self, store: EventStore) -> list[ChangeRecord]:
        records = []
        for stored in await store.read(self.changes_stream):
            body = json.loads(stored.state)
            records.append(
                ChangeRecord(
                    stored.position,
                    body["source"],
                    tuple(Write.from_json(w) for w in body["writes"]),
                )
            )
        return records

    def _index(self, record: ChangeRecord) -> None:
        for key in dict.fromkeys(write.key for write in record.writes):
            self._key_changes.setdefault(key, []).append((record.dot, record.source))

    def _targets_of(self, source: str) -> tuple[str, ...]:
        targets = self._targets.get(source)
        if targets is None:
            targets = self._targets[source] = (source, *self.downstream(source))
        return targets

    async def audit(self) -> list[str]:
        """Check every replica against the change log, the truth it is a view of.

        A replica must hold only changes that are in the log, and be exactly the fold of the
        logged changes it holds (in log order: resolvers are order-independent); every
        conflict in the conflict stream must be known to the engine (``conflicts(key)``).
        Returns the differences found, one line each (empty: all is well). It holds at any
        time, deliveries in flight or not: a replica that is merely behind is not a
        difference (``inconsistency(key)`` reports those). Reads the whole log: a check for
        tests, chaos runs and operators, not for the hot path.
        """
        store = await self.store()
        records = {record.dot: record for record in await self._read_changes(store)}
        differences: list[str] = []
        for system, replica in self._replicas.items():
            unknown = sorted(dot for dot in replica.applied if dot not in records)
            if unknown:
                differences.append(
                    f"{system} holds {len(unknown)} change(s) that are not in the log, e.g. "
                    f"{unknown[0][0]}@{unknown[0][1]}"
                )
            fresh = _Replica(system, replica.dependencies)
            for dot, record in records.items():
                if dot in replica.applied:
                    self._fold(fresh, record, raise_errors=False)
            for key in sorted(set(replica.states) | set(fresh.states)):
                held = replica.states.get(key, _MISSING)
                logged = fresh.states.get(key, _MISSING)
                if held != logged:
                    differences.append(
                        f"{system}: {key!r} is {self._shown(key, held)} in the replica but "
                        f"{self._shown(key, logged)} by the log"
                    )
        logged_conflicts = 0
        missing = 0
        for stored in await store.read(self.conflicts_stream):
            logged_conflicts += 1
            if self._conflict_id(_stored_conflict(stored.state)) not in self._conflicts_seen:
                missing += 1
        if missing:
            differences.append(
                f"{missing} of the {logged_conflicts} conflicts in {self.conflicts_stream} are "
                "unknown to the engine (conflicts(key) misses them)"
            )
        return differences

    def _shown(self, key: str, state: Any) -> str:
        if state is _MISSING:
            return "absent"
        return repr(self.resolvers.resolver_for(key).value(state))

    def value(self, system_id: str, key: str) -> JSONValue:
        """``key``'s resolved value in ``system_id``'s replica (None when it has none)."""
        replica = self._require(system_id)
        state = replica.states.get(key, _MISSING)
        if state is _MISSING:
            return None
        return self.resolvers.resolver_for(key).value(state)

    def vector_clock(self, system_id: str) -> VectorClock:
        """What ``system_id``'s replica has seen, as a vector clock."""
        return self._require(system_id).clock

    def inconsistency(self, key: str) -> Inconsistency | None:
        """How the replicas that should hold ``key`` differ now, or None when they agree.

        A replica should hold every change to ``key`` made by itself or by a system it
        receives from (transitively); replicas that hold the same changes hold the same
        state, whatever order they came in.
        """
        behind: dict[str, int] = {}
        holders: set[str] = set()
        for dot, source in self._key_changes.get(key, ()):
            for system in self._targets_of(source):
                replica = self._replicas.get(system)
                if replica is None:
                    continue
                holders.add(system)
                if dot not in replica.applied:
                    behind[system] = behind.get(system, 0) + 1
        if not behind:
            return None
        ordered = [s for s in self._replicas if s in holders]
        return Inconsistency(key, {s: self.value(s, key) for s in ordered}, behind)

    async def ensure_consistency(
        self,
        data_key: str,
        timeout: float,  # noqa: ASYNC109 -- the seed API; runs on the injected clock
    ) -> bool:
        """Wait until every replica that should hold ``data_key`` holds the same state.

        Returns True as soon as they agree (at once if they already do, or if no system has
        written the key). After ``timeout`` seconds of the engine's clock it returns False
        and sets :attr:`last_inconsistency` to an :class:`Inconsistency` naming the replicas
        that differ and their values (also available any time as ``inconsistency(key)``).
        """
        if timeout < 0:
            raise SyncError(f"timeout must be >= 0 seconds, got {timeout}")
        timer = asyncio.ensure_future(self.clock.sleep(timeout))
        try:
            while True:
                self._changed.clear()
                # Deliveries of this engine still in flight: not consistent, and no need to
                # look at every change of the key to know it.
                busy = self._key_pending.get(data_key, 0) > 0 and not timer.done()
                if not busy:
                    difference = self.inconsistency(data_key)
                    if difference is None:
                        self.last_inconsistency = None
                        return True
                    if timer.done():
                        self.last_inconsistency = difference
                        return False
                changed = asyncio.ensure_future(self._changed.wait())
                await asyncio.wait({changed, timer}, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
        finally:
            timer.cancel()

    # -- lifecycle -------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the repair task and the broker subscriptions (and the broker/runtime the
        engine created)."""
        if self._repairer is not None:
            self._repairer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._repairer
            self._repairer = None
        if self._own_broker:
            await self.broker.close()
        if self._own_runtime:
            await self.runtime.close()

    async def __aenter__(self) -> RealTimeSyncEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
