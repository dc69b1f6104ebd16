"""Event-sourced aggregates over the event store: an async :class:`Repository`.

The domain model is eventsourcing's: an aggregate is a subclass of
:class:`eventsourcing.domain.Aggregate` (or of this module's :class:`Aggregate`, which takes
its event timestamps from an injected :class:`~collaborative_blocks.core.clock.Clock`), its
commands are methods decorated with ``@event``, and each command records one event.
Persistence is ours: :class:`Repository` stores an aggregate's pending events atomically in an
:class:`~collaborative_blocks.stores.base.EventStore` with optimistic concurrency, and loads an
aggregate by replaying its stream (from its latest snapshot, when there is one).

```python
from eventsourcing.domain import event
from collaborative_blocks.core.aggregates import Aggregate, Repository

class Account(Aggregate):
    @event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.balance = 0

    @event("Deposited")
    def deposit(self, amount: int) -> None:
        self.balance += amount

repo = Repository(store, snapshot_interval=100)
account = Account(owner="ann")
account.deposit(amount=10)
await repo.save(account)
again = await repo.get(account.id, Account)
```

Streams and ids: an aggregate's stream is ``str(aggregate.id)`` (the canonical hyphenated
UUID, or the string id itself for string-id aggregates), exactly the ``originator_id`` that
eventsourcing's own SQL recorders store, so an eventsourcing application and this repository
can read each other's aggregates. Versions are eventsourcing's ``originator_version``.

``event`` here is eventsourcing's ``@event`` decorator, re-exported so one import brings the
whole domain-model vocabulary.

Encoding is eventsourcing's :class:`~eventsourcing.persistence.Mapper` (JSON transcoding,
optional compression and AES cipher, ``class_version`` upcasting), unchanged on the write
path. The read path decodes the same bytes with the same transcoder, cipher and compressor
but skips the per-event work that does not change the result: topic resolution is cached per
topic, and events whose class keeps eventsourcing's standard ``mutate``/``apply`` (every
``@event`` method) are applied to the aggregate straight from their decoded state, without
building the event object. Events whose class overrides ``mutate`` or ``apply`` go through
their own methods, so custom behaviour is kept.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import json.scanner
import logging
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar, cast, overload
from uuid import UUID

from eventsourcing import domain as _es_domain
from eventsourcing.domain import (
    BaseAggregate,
    CanMutateAggregate,
    DecoratedFuncCaller,
    OriginatorVersionError,
    event,
)
from eventsourcing.domain import Snapshot as DomainSnapshot
from eventsourcing.persistence import (
    Cipher,
    Compressor,
    DatetimeAsISO,
    DecimalAsStr,
    JSONTranscoder,
    Mapper,
    Transcoder,
    UUIDAsHex,
)
from eventsourcing.persistence import StoredEvent as MapperStoredEvent
from eventsourcing.utils import TopicError, get_topic, resolve_topic

from collaborative_blocks.core.clock import Clock, SystemClock
from collaborative_blocks.errors import (
    AggregateNotFoundError,
    ConcurrencyError,
    CorruptRecordError,
    EventSerializationError,
)
from collaborative_blocks.stores.base import (
    AppendRequest,
    EventStore,
    NewEvent,
    Snapshot,
    StoredEvent,
    Tracking,
)

__all__ = [
    "Aggregate",
    "AggregateId",
    "Repository",
    "default_mapper",
    "event",
    "event_clock",
    "stream_for",
]

_log = logging.getLogger(__name__)

AggregateId = UUID | str
"""What identifies an aggregate: a UUID (eventsourcing's default) or a string."""

A = TypeVar("A", bound=BaseAggregate[Any])
R = TypeVar("R")

# --------------------------------------------------------------------------------------------
# Timestamps from an injected clock
# --------------------------------------------------------------------------------------------

_event_clock: ContextVar[Clock | None] = ContextVar(
    "collaborative_blocks_event_clock", default=None
)
_SYSTEM_CLOCK = SystemClock()


@contextlib.contextmanager
def event_clock(clock: Clock) -> Iterator[Clock]:
    """Stamp the events that :class:`Aggregate` subclasses record in this context with ``clock``.

    eventsourcing stamps an event when it is created, in a static ``create_timestamp()`` that
    has no access to the aggregate, so the clock travels in a context variable: it is scoped to
    the ``with`` block and to the asyncio task that entered it (each task of a simulation can
    have its own clock)::

        with event_clock(VirtualClock(start=0.0)):
            account = Account(owner="ann")   # account.created_on is 1970-01-01T00:00:00+00:00

    Outside any ``event_clock`` block the system clock is used.
    """
    token = _event_clock.set(clock)
    try:
        yield clock
    finally:
        _event_clock.reset(token)


def _timestamp_now() -> datetime:
    clock = _event_clock.get() or _SYSTEM_CLOCK
    return datetime.fromtimestamp(clock.now(), tz=_es_domain.TZINFO)


class Aggregate(_es_domain.Aggregate):
    """eventsourcing's ``Aggregate`` whose events take their time from :func:`event_clock`.

    Use it exactly like :class:`eventsourcing.domain.Aggregate` (``@event`` methods, nested
    event classes, ``class_version`` and ``upcast_vX_vY`` for schema evolution). Plain
    eventsourcing aggregates work with :class:`Repository` too; they stamp events with the
    wall clock.
    """

    class Event(_es_domain.Aggregate.Event):
        @staticmethod
        def create_timestamp() -> datetime:
            return _timestamp_now()

    class Created(Event, _es_domain.Aggregate.Created):
        pass


# --------------------------------------------------------------------------------------------
# Mapping
# --------------------------------------------------------------------------------------------


def stream_for(aggregate_id: AggregateId) -> str:
    """The event store stream of the aggregate with ``aggregate_id``.

    ``str(uuid)`` (canonical, hyphenated, lower case) for UUID ids, the id itself for string
    ids: the same ``originator_id`` text that eventsourcing's SQL recorders store.
    """
    if isinstance(aggregate_id, UUID):
        return str(aggregate_id)
    if isinstance(aggregate_id, str) and aggregate_id:
        return aggregate_id
    raise AggregateNotFoundError(
        f"aggregate id must be a UUID or a non-empty string, got {aggregate_id!r}; "
        "pass the aggregate's .id"
    )


def default_mapper(
    *,
    transcoder: Transcoder | None = None,
    compressor: Compressor | None = None,
    cipher: Cipher | None = None,
) -> Mapper[Any]:
    """eventsourcing's ``Mapper`` with the transcodings an ``Application`` registers by default.

    The default transcoder is a ``JSONTranscoder`` that knows ``UUID``, ``Decimal`` and
    ``datetime``; register your own ``Transcoding`` on it for other types. ``compressor``
    (e.g. ``eventsourcing.compressor.ZlibCompressor()``) and ``cipher``
    (``eventsourcing.cipher.AESCipher``) are applied in the same order eventsourcing applies
    them, so stored bytes are interchangeable with an eventsourcing application's.
    """
    if transcoder is None:
        json_transcoder = JSONTranscoder()
        json_transcoder.register(UUIDAsHex())
        json_transcoder.register(DecimalAsStr())
        json_transcoder.register(DatetimeAsISO())
        transcoder = json_transcoder
    return Mapper(transcoder=transcoder, compressor=compressor, cipher=cipher)


# --------------------------------------------------------------------------------------------
# The fast read path
# --------------------------------------------------------------------------------------------

FastApply = Callable[[Any, dict[str, Any]], None]

_STANDARD_MUTATE = CanMutateAggregate.mutate
_STANDARD_APPLY_OWNERS = (CanMutateAggregate, DecoratedFuncCaller)


def _defining_classes(cls: type, name: str) -> list[type]:
    return [klass for klass in cls.__mro__ if name in klass.__dict__]


def _fast_apply_for(cls: type) -> FastApply | None:
    """A function applying an event of ``cls`` from its state dict, if that keeps semantics.

    Only for classes whose ``mutate`` is eventsourcing's standard one (version check, apply,
    then version and modified_on) and whose ``apply`` is the ``@event`` method call; anything
    else is replayed through the event object.
    """
    if not issubclass(cls, CanMutateAggregate) or cls.mutate is not _STANDARD_MUTATE:
        return None
    if _defining_classes(cls, "_as_dict") != [CanMutateAggregate]:
        return None
    apply_owners = _defining_classes(cls, "apply")
    if not issubclass(cls, DecoratedFuncCaller):
        return None
    if any(k not in _STANDARD_APPLY_OWNERS for k in apply_owners):
        return None
    func = _es_domain.decorated_funcs.get(cls)
    if func is None:
        return None
    names = tuple(name for name in inspect.signature(func).parameters if name != "self")
    if {"originator_id", "originator_version"} & set(names):
        return None  # the fast path's state dict does not carry these

    parameters = list(inspect.signature(func).parameters.values())[1:]
    if all(p.kind is p.POSITIONAL_OR_KEYWORD for p in parameters):

        def apply_positionally(aggregate: Any, state: dict[str, Any]) -> None:
            try:
                args = [state[name] for name in names]
            except KeyError:  # an absent field: let the method's default apply
                func(aggregate, **{name: state[name] for name in names if name in state})
            else:
                func(aggregate, *args)

        return apply_positionally

    def apply(aggregate: Any, state: dict[str, Any]) -> None:
        func(aggregate, **{name: state[name] for name in names if name in state})

    return apply


_BASE_PROPERTIES = {name: BaseAggregate.__dict__[name] for name in ("version", "modified_on")}


def _plain_attributes(aggregate: Any) -> dict[str, Any] | None:
    """The aggregate's ``__dict__`` when ``version``/``modified_on`` are eventsourcing's plain
    properties over ``_version``/``_modified_on`` (so writing the dict is the same as setting
    them); None when a class overrides them."""
    cls = type(aggregate)
    for name, prop in _BASE_PROPERTIES.items():
        if inspect.getattr_static(cls, name, None) is not prop:
            return None
    attributes = getattr(aggregate, "__dict__", None)
    if attributes is None or "_version" not in attributes:
        return None
    return cast(dict[str, Any], attributes)


@dataclass(slots=True)
class _TopicEntry:
    cls: type
    class_version: int
    id_convertor: Callable[[str], AggregateId]
    fast_apply: FastApply | None


Decode = Callable[[bytes], dict[str, Any]]


def _state_decoder(mapper: Mapper[Any]) -> Decode:
    """Bytes to event state, exactly as ``mapper`` decodes them, faster where that is safe.

    eventsourcing's JSON transcoder runs a Python ``object_hook`` on every JSON object to find
    transcoded values (``{"_type_": ..., "_data_": ...}``). An event stamped with a datetime
    holds one of those, its ``timestamp``; when the bytes mention ``"_type_"`` just once and
    that is the timestamp, decoding without the hook and converting the timestamp alone gives
    the same dict. Anything else goes through the mapper's own transcoder.
    """
    transcoder = mapper.transcoder
    generic: Decode = transcoder.decode
    stages: list[Callable[[bytes], bytes]] = []
    if mapper.cipher is not None:
        stages.append(mapper.cipher.decrypt)
    if mapper.compressor is not None:
        stages.append(mapper.compressor.decompress)
    decode = generic
    datetime_iso = (
        transcoder.names.get("datetime_iso") if type(transcoder) is JSONTranscoder else None
    )
    if type(datetime_iso) is DatetimeAsISO:
        # The C scanner without JSONDecoder.decode's Python wrapper; text it does not take
        # whole (leading or trailing whitespace, errors) goes to the generic path below.
        scan = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]
        from_iso = datetime.fromisoformat
        marker = b'"_type_"'

        def decode(data: bytes) -> dict[str, Any]:
            if data.count(marker) == 1:
                text = data.decode("utf8")
                try:
                    state, end = scan(text, 0)
                except StopIteration:
                    return generic(data)
                if end != len(text) or type(state) is not dict:
                    return generic(data)
                stamp = state.get("timestamp")
                if (
                    type(stamp) is dict
                    and len(stamp) == 2
                    and stamp.get("_type_") == "datetime_iso"
                    and type(data_ := stamp.get("_data_")) is str
                ):
                    state["timestamp"] = from_iso(data_)
                    return state
            return generic(data)

    if not stages:
        return decode

    def staged(data: bytes) -> dict[str, Any]:
        for stage in stages:
            data = stage(data)
        return decode(data)

    return staged


EncodeFast = Callable[[Any], "NewEvent | None"]


def _no_default(value: object) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _compact_json() -> Callable[[Any], str]:
    """``json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode`` without
    building a new C encoder on every call (what ``JSONEncoder.iterencode`` does): the same
    C encoder with the same arguments, made once. Same output, same errors."""
    make: Any = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has it
        return json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    markers: dict[int, Any] = {}  # circular-reference check; empty again after each call
    encoder = make(
        markers, _no_default, json.encoder.encode_basestring, None, ":", ",", False, False, True
    )

    def dumps(value: Any) -> str:
        try:
            return "".join(encoder(value, 0))
        except BaseException:
            markers.clear()  # an error leaves the containers it was in marked
            raise

    return dumps


def _state_encoder(mapper: Mapper[Any]) -> EncodeFast | None:
    """Event to stored bytes, byte for byte as ``mapper.to_stored_event`` encodes it, faster
    where that is safe; None when the mapper is not the default JSON one.

    eventsourcing's JSON encoder calls a Python ``default`` hook for every value JSON does not
    know; an event's own timestamp is one. Replacing the timestamp by the dict that hook
    returns (``{"_type_": "datetime_iso", "_data_": iso}``, at the same key) and encoding
    with the same C encoder without the hook gives the same bytes. Any other value JSON does
    not know (a UUID, a Decimal, a datetime elsewhere) makes the plain encoder raise, and the
    event goes through the mapper.
    """
    transcoder = mapper.transcoder
    if type(mapper) is not Mapper or mapper.compressor is not None or mapper.cipher is not None:
        return None
    if type(transcoder) is not JSONTranscoder:
        return None
    if type(transcoder.types.get(datetime)) is not DatetimeAsISO:
        return None
    theirs: Any = transcoder.encoder
    settings = tuple(
        getattr(theirs, name, None)
        for name in (
            "ensure_ascii",
            "indent",
            "sort_keys",
            "check_circular",
            "allow_nan",
            "skipkeys",
            "item_separator",
            "key_separator",
        )
    )
    if type(theirs) is not json.JSONEncoder or settings != (
        False,
        None,
        False,
        True,
        True,
        False,
        ",",
        ":",
    ):
        return None
    plain = _compact_json()
    topics: dict[type, str] = {}

    def encode(event: Any) -> NewEvent | None:
        cls = type(event)
        topic = topics.get(cls)
        if topic is None:
            topic = topics[cls] = get_topic(cls)
        state = dict(event.__dict__)
        del state["originator_id"], state["originator_version"]
        class_version = getattr(cls, "class_version", 1)
        if class_version > 1:
            state["class_version"] = class_version
        stamp = state.get("timestamp")
        if type(stamp) is datetime:
            state["timestamp"] = {"_type_": "datetime_iso", "_data_": stamp.isoformat()}
        try:
            text = plain(state)
        except (TypeError, ValueError):
            return None  # something only the mapper's transcodings encode
        return NewEvent(topic=topic, state=text.encode("utf8"))

    return encode


def _uuid_or_str(originator_id_type: object) -> Callable[[str], AggregateId]:
    if originator_id_type is str:
        return str
    return UUID


# --------------------------------------------------------------------------------------------
# The repository
# --------------------------------------------------------------------------------------------


class Repository:
    """Loads and saves event-sourced aggregates in an :class:`EventStore`.

    ``mapper``: eventsourcing's ``Mapper`` (default :func:`default_mapper`: JSON, no
    compression, no cipher). ``snapshot_interval``: take a snapshot whenever a save moves an
    aggregate past a multiple of this many versions (None: never automatically; see
    :meth:`take_snapshot`). ``clock``: stamps snapshots.

    All methods are coroutines; the aggregates themselves stay plain synchronous objects.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        mapper: Mapper[Any] | None = None,
        snapshot_interval: int | None = None,
        clock: Clock | None = None,
    ) -> None:
        if snapshot_interval is not None and (
            not isinstance(snapshot_interval, int)
            or isinstance(snapshot_interval, bool)
            or snapshot_interval < 1
        ):
            raise ValueError(
                f"snapshot_interval must be an int >= 1 or None, got {snapshot_interval!r}"
            )
        self.store = store
        self.mapper: Mapper[Any] = mapper if mapper is not None else default_mapper()
        self.snapshot_interval = snapshot_interval
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._topics: dict[str, _TopicEntry] = {}
        self._decode = _state_decoder(self.mapper)
        self._encode_state = _state_encoder(self.mapper)

    # -- writing ---------------------------------------------------------------------------

    async def save(
        self, *aggregates: BaseAggregate[Any], tracking: Tracking | None = None
    ) -> list[int]:
        """Append the pending events of ``aggregates`` in one atomic transaction.

        Returns the global positions of the appended events, in order. Each aggregate's
        events must follow the version its stream is at: when another writer appended to the
        stream since the aggregate was loaded, :class:`~collaborative_blocks.errors.
        ConcurrencyError` is raised, nothing is written, and the aggregates keep their pending
        events (reload, re-apply the command, save again). ``tracking`` (a consumer position or
        message id) is recorded in the same transaction.

        An event the mapper cannot encode raises
        :class:`~collaborative_blocks.errors.EventSerializationError` before anything is
        written.
        """
        requests: list[AppendRequest] = []
        saved: list[tuple[BaseAggregate[Any], int]] = []
        seen: set[int] = set()
        for aggregate in aggregates:
            if id(aggregate) in seen:
                continue
            seen.add(id(aggregate))
            if not isinstance(aggregate, BaseAggregate):
                raise EventSerializationError(
                    f"Repository.save() takes eventsourcing aggregates, got "
                    f"{type(aggregate).__name__}; subclass collaborative_blocks.Aggregate"
                )
            pending = list(aggregate.pending_events)
            if not pending:
                continue
            stream = stream_for(aggregate.id)
            new_events = [self._encode(stream, event) for event in pending]
            first = pending[0].originator_version
            if first >= 1:
                requests.append(AppendRequest(stream, new_events, expected_version=first - 1))
            else:
                requests.append(AppendRequest(stream, new_events, first_version=first))
            saved.append((aggregate, len(pending)))
        if not requests:
            return []
        results = await self.store.append_many(requests, tracking=tracking)
        for aggregate, count in saved:
            # Only now are the events durable: drop exactly those we stored.
            del aggregate.pending_events[:count]
        if self.snapshot_interval is not None:
            await self._snapshot_crossings(saved)
        return [position for positions in results for position in positions]

    def _encode(self, stream: str, event: Any) -> NewEvent:
        encode_state = self._encode_state
        if encode_state is not None:
            fast = encode_state(event)
            if fast is not None:
                return fast
        try:
            stored = self.mapper.to_stored_event(event)
        except Exception as error:
            raise EventSerializationError(
                f"cannot encode {type(event).__qualname__} (stream {stream!r}, version "
                f"{getattr(event, 'originator_version', '?')}): {error}. Register a "
                "Transcoding for the value's type on the mapper's transcoder, or store a "
                "JSON-compatible value."
            ) from error
        return NewEvent(topic=stored.topic, state=stored.state)

    async def _snapshot_crossings(self, saved: list[tuple[BaseAggregate[Any], int]]) -> None:
        interval = self.snapshot_interval
        assert interval is not None
        for aggregate, count in saved:
            last = aggregate.version
            if last // interval > (last - count) // interval:
                try:
                    await self.store.save_snapshot(self._snapshot_of(aggregate))
                except Exception:
                    # The events are committed; a missing snapshot only makes loading slower,
                    # so a snapshot failure must not turn a successful save into an error.
                    _log.warning(
                        "snapshot of %s at version %d failed", aggregate.id, last, exc_info=True
                    )

    def _snapshot_of(self, aggregate: BaseAggregate[Any]) -> Snapshot:
        state = dict(vars(aggregate))
        class_version = getattr(type(aggregate), "class_version", 1)
        if class_version > 1:
            state["class_version"] = class_version
        for private in ("_id", "_version", "_pending_events"):
            state.pop(private, None)
        snapshot = DomainSnapshot(
            originator_id=aggregate.id,
            originator_version=aggregate.version,
            timestamp=datetime.fromtimestamp(self.clock.now(), tz=_es_domain.TZINFO),
            topic=get_topic(type(aggregate)),
            state=state,
        )
        stream = stream_for(aggregate.id)
        encoded = self._encode(stream, snapshot)
        return Snapshot(
            stream=stream, version=aggregate.version, topic=encoded.topic, state=encoded.state
        )

    async def take_snapshot(self, aggregate_id: AggregateId, *, version: int | None = None) -> int:
        """Snapshot the aggregate (at ``version``, default latest); return the version."""
        aggregate = await self.get(aggregate_id, version=version)
        await self.store.save_snapshot(self._snapshot_of(aggregate))
        return aggregate.version

    # -- reading ---------------------------------------------------------------------------

    @overload
    async def get(
        self, aggregate_id: AggregateId, *, version: int | None = None
    ) -> BaseAggregate[Any]: ...

    @overload
    async def get(
        self, aggregate_id: AggregateId, expected_type: type[A], *, version: int | None = None
    ) -> A: ...

    async def get(
        self,
        aggregate_id: AggregateId,
        expected_type: type[BaseAggregate[Any]] | None = None,
        *,
        version: int | None = None,
    ) -> BaseAggregate[Any]:
        """Load the aggregate by replaying its events (from its latest snapshot if any).

        ``version``: the aggregate as it was at that version (snapshots newer than it are
        ignored). ``expected_type``: the class you expect; the result is typed as it, and a
        stream that holds another kind of aggregate raises
        :class:`~collaborative_blocks.errors.AggregateNotFoundError`, as does an id with no
        events.
        """
        stream = stream_for(aggregate_id)
        if version is not None and (not isinstance(version, int) or version < 0):
            raise AggregateNotFoundError(
                f"version must be an int >= 0 or None, got {version!r}; "
                f"aggregate {aggregate_id!r} was not loaded"
            )
        aggregate: BaseAggregate[Any] | None = None
        from_version = 0
        snapshot = await self.store.latest_snapshot(stream)
        if snapshot is not None and (version is None or snapshot.version <= version):
            aggregate = self._restore(snapshot)
            from_version = snapshot.version + 1
        events = await self.store.read(stream, from_version=from_version, to_version=version)
        aggregate = self._replay(aggregate, events)
        if aggregate is None:
            at = "" if version is None else f" at version {version}"
            raise AggregateNotFoundError(
                f"no aggregate {aggregate_id!r}{at}: stream {stream!r} has no events"
                f"{' up to that version' if version is not None else ''}. Check the id, "
                "or save the aggregate first."
            )
        if expected_type is not None and not isinstance(aggregate, expected_type):
            raise AggregateNotFoundError(
                f"aggregate {aggregate_id!r} is a {type(aggregate).__qualname__}, not a "
                f"{expected_type.__qualname__}; check the id"
            )
        return aggregate

    async def update(
        self,
        aggregate_id: AggregateId,
        expected_type: type[A],
        command: Callable[[A], R],
        *,
        attempts: int = 3,
        tracking: Tracking | None = None,
    ) -> R:
        """Load the aggregate, run ``command`` on it, save; on a conflict, do it all again.

        ``command`` is a plain function that calls the aggregate's command methods (and may
        return a value, which ``update`` returns). When another writer saved the aggregate in
        between, the aggregate is reloaded and ``command`` runs again on the fresh state, up
        to ``attempts`` times in all; then the last
        :class:`~collaborative_blocks.errors.ConcurrencyError` is raised. An exception from
        ``command`` itself (an illegal transition, say) propagates at once and nothing is
        saved. ``command`` may run more than once, so it must only act on the aggregate.
        """
        if not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"attempts must be an int >= 1, got {attempts!r}")
        for attempt in range(1, attempts + 1):
            aggregate = await self.get(aggregate_id, expected_type)
            result = command(aggregate)
            try:
                await self.save(aggregate, tracking=tracking)
            except ConcurrencyError:
                if attempt == attempts:
                    raise
                continue
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def contains(self, aggregate_id: AggregateId) -> bool:
        """Whether any event is stored for ``aggregate_id`` (no replay)."""
        return await self.store.stream_version(stream_for(aggregate_id)) > 0

    def _restore(self, snapshot: Snapshot) -> BaseAggregate[Any]:
        record = MapperStoredEvent(
            originator_id=snapshot.stream,
            originator_version=snapshot.version,
            topic=snapshot.topic,
            state=snapshot.state,
        )
        try:
            domain_snapshot = self.mapper.to_domain_event(record)
            aggregate = cast(Any, domain_snapshot).mutate(None)
        except Exception as error:
            raise CorruptRecordError(
                f"snapshot of stream {snapshot.stream!r} at version {snapshot.version} "
                f"(topic {snapshot.topic!r}) cannot be restored: {error}. Define the "
                "missing upcast_vX_vY on the aggregate class, or delete the snapshot."
            ) from error
        return cast(BaseAggregate[Any], aggregate)

    def _entry(self, event: StoredEvent) -> _TopicEntry:
        topic = event.topic
        entry = self._topics.get(topic)
        if entry is not None:
            return entry
        try:
            cls = resolve_topic(topic)
        except TopicError as error:
            raise CorruptRecordError(
                f"stream {event.stream!r} version {event.version}: topic {topic!r} names no "
                f"class ({error}). If the class was renamed or moved, register the old topic: "
                "eventsourcing.utils.register_topic(old_topic, NewClass)."
            ) from error
        if not isinstance(cls, type):
            raise CorruptRecordError(
                f"stream {event.stream!r} version {event.version}: topic {topic!r} resolves "
                f"to {cls!r}, not an event class"
            )
        entry = _TopicEntry(
            cls=cls,
            class_version=getattr(cls, "class_version", 1),
            id_convertor=_uuid_or_str(getattr(cls, "originator_id_type", UUID)),
            fast_apply=_fast_apply_for(cls),
        )
        self._topics[topic] = entry
        return entry

    def _decode_state(self, event: StoredEvent, entry: _TopicEntry) -> dict[str, Any]:
        try:
            state = self._decode(event.state)
        except Exception as error:
            raise CorruptRecordError(
                f"stream {event.stream!r} version {event.version} (topic {event.topic!r}) "
                f"cannot be decoded: {error}. Check that the mapper's cipher key, compressor "
                "and transcodings match the ones the event was written with."
            ) from error
        if type(state) is not dict:
            raise CorruptRecordError(
                f"stream {event.stream!r} version {event.version} (topic {event.topic!r}) "
                f"decodes to {type(state).__name__}, not an event's state (a JSON object)"
            )
        if entry.class_version > 1 or "class_version" in state:
            self._upcast(event, entry, state)
        return state

    @staticmethod
    def _upcast(event: StoredEvent, entry: _TopicEntry, state: dict[str, Any]) -> None:
        from_version = state.pop("class_version", 1)
        while from_version < entry.class_version:
            name = f"upcast_v{from_version}_v{from_version + 1}"
            upcast = getattr(entry.cls, name, None)
            if upcast is None:
                raise CorruptRecordError(
                    f"stream {event.stream!r} version {event.version}: "
                    f"{entry.cls.__qualname__} is at class_version {entry.class_version} but "
                    f"has no {name}(state) to upcast a version-{from_version} event; define it"
                )
            upcast(state)
            from_version += 1

    def _replay(
        self, aggregate: BaseAggregate[Any] | None, events: Sequence[StoredEvent]
    ) -> BaseAggregate[Any] | None:
        entries = self._topics
        decode = self._decode
        attributes: dict[str, Any] | None = None
        checked: Any = None  # the aggregate ``attributes`` belongs to
        for record in events:
            entry = entries.get(record.topic) or self._entry(record)
            try:
                state = decode(record.state)
            except Exception:
                state = self._decode_state(record, entry)  # raises the typed error
            if type(state) is not dict:
                state = self._decode_state(record, entry)  # raises the typed error
            if entry.class_version > 1 or "class_version" in state:
                self._upcast(record, entry, state)
            fast_apply = entry.fast_apply
            if aggregate is not None and fast_apply is not None:
                if checked is not aggregate:
                    checked = aggregate
                    attributes = _plain_attributes(aggregate)
                # Inlined CanMutateAggregate.mutate: same checks and the same order.
                version = record.version
                if attributes is not None:
                    if version != attributes["_version"] + 1:
                        raise OriginatorVersionError(version, attributes["_version"] + 1)
                    fast_apply(aggregate, state)
                    attributes["_version"] = version
                    attributes["_modified_on"] = state["timestamp"]
                else:
                    if version != aggregate.version + 1:
                        raise OriginatorVersionError(version, aggregate.version + 1)
                    fast_apply(aggregate, state)
                    aggregate.version = version
                    aggregate.modified_on = state["timestamp"]
                continue
            state["originator_id"] = entry.id_convertor(record.stream)
            state["originator_version"] = record.version
            domain_event: Any = object.__new__(entry.cls)
            object.__setattr__(domain_event, "__dict__", state)
            aggregate = cast(Any, domain_event).mutate(aggregate)
        return aggregate
