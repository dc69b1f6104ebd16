"""The async Repository: save with optimistic concurrency, load by replay, snapshots,
schema evolution, bad input; on the memory store and (once it exists) SQLite."""

from __future__ import annotations

import sys
import types
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.cipher import AESCipher
from eventsourcing.compressor import ZlibCompressor
from eventsourcing.domain import Aggregate as PlainAggregate
from eventsourcing.domain import event
from eventsourcing.utils import Environment, _topic_cache

from collaborative_blocks.core.aggregates import (
    Aggregate,
    Repository,
    default_mapper,
    event_clock,
    stream_for,
)
from collaborative_blocks.core.clock import VirtualClock
from collaborative_blocks.errors import (
    AggregateNotFoundError,
    ConcurrencyError,
    CorruptRecordError,
    EventSerializationError,
    TrackingConflictError,
)
from collaborative_blocks.stores import EventStore, NewEvent, Tracking, open_store
from collaborative_blocks.stores.memory import MemoryEventStore


class Account(Aggregate):
    @event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.balance = 0

    @event("Deposited")
    def deposit(self, amount: int) -> None:
        self.balance += amount

    @event("Withdrawn")
    def withdraw(self, amount: int) -> None:
        if amount > self.balance:
            raise ValueError("insufficient funds")
        self.balance -= amount


class Ledger(PlainAggregate):
    """A plain eventsourcing aggregate with hand-written event classes (no @event)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.entries: list[str] = []

    class Posted(PlainAggregate.Event):
        entry: str

        def apply(self, aggregate: Any) -> None:
            aggregate.entries.append(self.entry)

    def post(self, entry: str) -> None:
        self.trigger_event(self.Posted, entry=entry)


class Wallet(Aggregate):
    @event("Created")
    def __init__(self) -> None:
        self.amount = Decimal("0")
        self.note: Any = None

    @event("Credited")
    def credit(self, amount: Decimal) -> None:
        self.amount += amount

    @event("Noted")
    def annotate(self, note: Any) -> None:
        self.note = note


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, cb_sqlite_url: str) -> AsyncIterator[EventStore]:
    if request.param == "memory":
        opened: EventStore = MemoryEventStore()
    else:
        opened = await open_store(cb_sqlite_url)
    try:
        yield opened
    finally:
        await opened.close()


async def test_save_then_get_replays_the_same_state(store: EventStore) -> None:
    repo = Repository(store)
    account = Account(owner="ann")
    account.deposit(amount=30)
    account.withdraw(amount=5)
    positions = await repo.save(account)

    assert len(positions) == 3
    assert account.pending_events == []
    loaded = await repo.get(account.id, Account)
    assert (loaded.owner, loaded.balance, loaded.version) == ("ann", 25, 3)
    assert loaded == account
    assert loaded.modified_on == account.modified_on


async def test_stream_is_the_canonical_uuid_text(store: EventStore) -> None:
    repo = Repository(store)
    account = Account(owner="ann")
    await repo.save(account)
    assert stream_for(account.id) == str(account.id)
    events = await store.read(str(account.id))
    assert [(e.version, e.topic) for e in events] == [
        (1, f"{__name__}:Account.Opened"),
    ]


async def test_get_at_an_older_version(store: EventStore) -> None:
    repo = Repository(store)
    account = Account(owner="ann")
    for amount in (1, 2, 3):
        account.deposit(amount=amount)
    await repo.save(account)
    assert (await repo.get(account.id, Account, version=2)).balance == 1
    assert (await repo.get(account.id, Account, version=4)).balance == 6


async def test_missing_aggregate_and_wrong_type_are_not_found(store: EventStore) -> None:
    repo = Repository(store)
    account = Account(owner="ann")
    await repo.save(account)
    with pytest.raises(AggregateNotFoundError, match="has no events"):
        await repo.get(uuid4())
    with pytest.raises(AggregateNotFoundError, match="is a Account, not a Ledger"):
        await repo.get(account.id, Ledger)
    assert await repo.contains(account.id)
    assert not await repo.contains(uuid4())


async def test_concurrent_writer_gets_concurrency_error_and_nothing_is_written(
    store: EventStore,
) -> None:
    repo = Repository(store)
    account = Account(owner="ann")
    await repo.save(account)
    first = await repo.get(account.id, Account)
    second = await repo.get(account.id, Account)
    first.deposit(amount=10)
    second.deposit(amount=99)
    await repo.save(first)
    before = await store.read(str(account.id))

    with pytest.raises(ConcurrencyError):
        await repo.save(second)

    assert await store.read(str(account.id)) == before
    # The loser keeps its pending event: nothing was silently dropped.
    assert len(second.pending_events) == 1
    assert (await repo.get(account.id, Account)).balance == 10


async def test_multi_aggregate_save_is_all_or_nothing(store: EventStore) -> None:
    repo = Repository(store)
    stale_target = Account(owner="bob")
    await repo.save(stale_target)
    stale = await repo.get(stale_target.id, Account)
    fresh = await repo.get(stale_target.id, Account)
    fresh.deposit(amount=1)
    await repo.save(fresh)
    newcomer = Account(owner="new")
    stale.deposit(amount=2)
    max_before = await store.max_position()

    with pytest.raises(ConcurrencyError):
        await repo.save(newcomer, stale)

    assert await store.max_position() == max_before
    assert not await repo.contains(newcomer.id)
    await repo.save(newcomer)
    assert await repo.contains(newcomer.id)


async def test_tracking_is_recorded_with_the_events(store: EventStore) -> None:
    repo = Repository(store)
    account = Account(owner="ann")
    await repo.save(account, tracking=Tracking("projector", position=7))
    assert await store.consumer_position("projector") == 7
    account.deposit(amount=1)
    with pytest.raises(TrackingConflictError):
        await repo.save(account, tracking=Tracking("projector", position=7))
    assert (await repo.get(account.id, Account)).version == 1


async def test_saving_nothing_writes_nothing(store: EventStore) -> None:
    repo = Repository(store)
    account = Account(owner="ann")
    await repo.save(account)
    assert await repo.save(account) == []
    assert await repo.save() == []
    assert await store.max_position() == 1


async def test_snapshot_every_n_events_and_load_from_it(store: EventStore) -> None:
    repo = Repository(store, snapshot_interval=5)
    account = Account(owner="ann")
    for _ in range(3):
        account.deposit(amount=1)
    await repo.save(account)  # version 4: no multiple of 5 crossed
    assert await store.latest_snapshot(str(account.id)) is None
    for _ in range(8):
        account.deposit(amount=1)
    await repo.save(account)  # version 12: crossed 5 and 10

    snapshot = await store.latest_snapshot(str(account.id))
    assert snapshot is not None
    assert snapshot.version == 12
    loaded = await repo.get(account.id, Account)
    assert (loaded.balance, loaded.version) == (11, 12)
    assert loaded == account

    # Events after the snapshot are replayed on top of it.
    account.deposit(amount=100)
    await repo.save(account)
    assert (await repo.get(account.id, Account)).balance == 111
    # An older version ignores the newer snapshot and replays from the start.
    assert (await repo.get(account.id, Account, version=3)).balance == 2


async def test_snapshot_is_used_when_loading(store: EventStore) -> None:
    repo = Repository(store)
    account = Account(owner="ann")
    account.deposit(amount=5)
    await repo.save(account)
    assert await repo.take_snapshot(account.id) == 2
    # Rewrite the snapshot's state: if loading replayed from the start, this would not show.
    snapshot = await store.latest_snapshot(str(account.id))
    assert snapshot is not None
    doctored = type(snapshot)(
        snapshot.stream,
        snapshot.version,
        snapshot.topic,
        snapshot.state.replace(b'"balance":5', b'"balance":500'),
    )
    await store.save_snapshot(doctored)
    assert (await repo.get(account.id, Account)).balance == 500


async def test_invalid_snapshot_interval_is_rejected() -> None:
    with pytest.raises(ValueError, match="snapshot_interval"):
        Repository(MemoryEventStore(), snapshot_interval=0)


async def test_plain_eventsourcing_aggregate_with_custom_apply(store: EventStore) -> None:
    repo = Repository(store, snapshot_interval=2)
    ledger = Ledger(name="main")
    ledger.post("a")
    ledger.post("b")
    await repo.save(ledger)
    ledger.post("c")
    await repo.save(ledger)
    loaded = await repo.get(ledger.id, Ledger)
    assert loaded.entries == ["a", "b", "c"]
    assert loaded == ledger


async def test_event_timestamps_come_from_the_injected_clock(store: EventStore) -> None:
    repo = Repository(store)
    clock = VirtualClock(start=1_000.0)
    with event_clock(clock):
        account = Account(owner="ann")
        await clock.advance(60)
        account.deposit(amount=1)
    assert account.created_on == datetime.fromtimestamp(1_000.0, tz=UTC)
    assert account.modified_on == datetime.fromtimestamp(1_060.0, tz=UTC)
    await repo.save(account)
    loaded = await repo.get(account.id, Account)
    assert loaded.modified_on == datetime.fromtimestamp(1_060.0, tz=UTC)


async def test_unencodable_event_is_rejected_before_anything_is_written(
    store: EventStore,
) -> None:
    repo = Repository(store)
    good = Account(owner="ann")
    wallet = Wallet()
    wallet.annotate(note=object())
    with pytest.raises(EventSerializationError, match=r"Wallet\.Noted.*Transcoding"):
        await repo.save(good, wallet)
    assert await store.max_position() == 0
    assert len(wallet.pending_events) == 2


async def test_decimals_uuids_and_datetimes_round_trip(store: EventStore) -> None:
    repo = Repository(store)
    wallet = Wallet()
    wallet.credit(amount=Decimal("1.10"))
    wallet.annotate(note={"by": UUID(int=5), "at": datetime(2020, 1, 1, tzinfo=UTC)})
    await repo.save(wallet)
    loaded = await repo.get(wallet.id, Wallet)
    assert loaded.amount == Decimal("1.10")
    assert loaded.note == {"by": UUID(int=5), "at": datetime(2020, 1, 1, tzinfo=UTC)}


async def test_compressed_and_encrypted_events(store: EventStore) -> None:
    key = AESCipher.create_key(16)
    cipher = AESCipher(Environment(env={"CIPHER_KEY": key}))
    repo = Repository(store, mapper=default_mapper(compressor=ZlibCompressor(), cipher=cipher))
    account = Account(owner="secret-owner")
    account.deposit(amount=3)
    await repo.save(account)
    raw = await store.read(str(account.id))
    assert all(b"secret-owner" not in e.state for e in raw)
    assert (await repo.get(account.id, Account)).owner == "secret-owner"

    plain = Repository(store)
    with pytest.raises(CorruptRecordError, match="cannot be decoded"):
        await plain.get(account.id)


async def test_corrupt_state_and_unknown_topic_are_typed_errors(store: EventStore) -> None:
    repo = Repository(store)
    account = Account(owner="ann")
    await repo.save(account)
    account_id = str(account.id)
    await store.append(
        account_id,
        [NewEvent(topic=f"{__name__}:Account.Deposited", state=b"{not json")],
        expected_version=1,
    )
    with pytest.raises(CorruptRecordError, match="version 2"):
        await repo.get(account.id)

    other = uuid4()
    await store.append(str(other), [NewEvent(topic="nowhere.module:Gone", state=b"{}")])
    with pytest.raises(CorruptRecordError, match="register_topic"):
        await repo.get(other)


async def test_interoperates_with_eventsourcing_mapper(store: EventStore) -> None:
    """Our stored rows decode with eventsourcing's own Mapper into the same events."""
    from eventsourcing.persistence import StoredEvent as ESStoredEvent

    repo = Repository(store)
    account = Account(owner="ann")
    account.deposit(amount=4)
    expected = list(account.pending_events)
    await repo.save(account)
    mapper = default_mapper()
    decoded = [
        mapper.to_domain_event(
            ESStoredEvent(
                originator_id=e.stream, originator_version=e.version, topic=e.topic, state=e.state
            )
        )
        for e in await store.read(str(account.id))
    ]
    assert decoded == expected


# -- schema evolution: a v1 class writes, a v2 class reads -------------------------------------

SCHEMA_MODULE = "cb_test_schema_evolution_accounts"

ACCOUNT_V1 = """
from eventsourcing.domain import event
from collaborative_blocks.core.aggregates import Aggregate

class Customer(Aggregate):
    @event("Registered")
    def __init__(self, name: str) -> None:
        self.name = name

    @event("Moved")
    def move(self, address: str) -> None:
        self.address = address
"""

# Version 2 splits the name, records a country on moves, and upcasts the old events
# (and old snapshots of the aggregate itself).
ACCOUNT_V2 = """
from typing import Any
from eventsourcing.domain import event
from collaborative_blocks.core.aggregates import Aggregate

class Customer(Aggregate):
    class_version = 2

    class Registered(Aggregate.Created):
        class_version = 2
        first: str
        last: str

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            first, _, last = state.pop("name").partition(" ")
            state["first"] = first
            state["last"] = last

    @event(Registered)
    def __init__(self, first: str, last: str) -> None:
        self.first = first
        self.last = last

    class Moved(Aggregate.Event):
        class_version = 2
        address: str
        country: str

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["country"] = "unknown"

    @event(Moved)
    def move(self, address: str, country: str) -> None:
        self.address = address
        self.country = country

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        first, _, last = state.pop("name").partition(" ")
        state["first"] = first
        state["last"] = last
        state.setdefault("country", "unknown")
"""


def _install_module(source: str) -> types.ModuleType:
    """(Re)define the module, forgetting topics resolved for its previous definition."""
    for topic in [t for t in _topic_cache if t.startswith(SCHEMA_MODULE)]:
        del _topic_cache[topic]
    from eventsourcing.utils import _type_cache

    for cls in [c for c in _type_cache if getattr(c, "__module__", "") == SCHEMA_MODULE]:
        del _type_cache[cls]
    module = types.ModuleType(SCHEMA_MODULE)
    sys.modules[SCHEMA_MODULE] = module
    exec(compile(source, f"<{SCHEMA_MODULE}>", "exec"), module.__dict__)
    return module


@pytest.fixture
def schema_module() -> Iterator[None]:
    yield
    sys.modules.pop(SCHEMA_MODULE, None)
    for topic in [t for t in _topic_cache if t.startswith(SCHEMA_MODULE)]:
        del _topic_cache[topic]


@pytest.mark.usefixtures("schema_module")
async def test_v1_events_load_into_v2_through_upcasters(store: EventStore) -> None:
    v1 = _install_module(ACCOUNT_V1)
    customer = v1.Customer(name="Ada Lovelace")
    customer.move(address="London")
    await Repository(store).save(customer)

    v2 = _install_module(ACCOUNT_V2)
    loaded = await Repository(store).get(customer.id, v2.Customer)
    assert (loaded.first, loaded.last) == ("Ada", "Lovelace")
    assert (loaded.address, loaded.country) == ("London", "unknown")
    assert not hasattr(loaded, "name")

    # v2 writes v2 events after the upcast ones, and both replay.
    loaded.move(address="Paris", country="FR")
    repo = Repository(store)
    await repo.save(loaded)
    again = await repo.get(customer.id, v2.Customer)
    assert (again.address, again.country, again.version) == ("Paris", "FR", 3)


@pytest.mark.usefixtures("schema_module")
async def test_v1_snapshot_loads_into_v2_through_the_aggregate_upcaster(
    store: EventStore,
) -> None:
    v1 = _install_module(ACCOUNT_V1)
    customer = v1.Customer(name="Grace Hopper")
    customer.move(address="NYC")
    repo = Repository(store)
    await repo.save(customer)
    await repo.take_snapshot(customer.id)

    v2 = _install_module(ACCOUNT_V2)
    loaded = await Repository(store).get(customer.id, v2.Customer)
    assert (loaded.first, loaded.last, loaded.address) == ("Grace", "Hopper", "NYC")
    assert loaded.country == "unknown"


@pytest.mark.usefixtures("schema_module")
async def test_missing_upcaster_is_a_typed_error(store: EventStore) -> None:
    v1 = _install_module(ACCOUNT_V1)
    customer = v1.Customer(name="Ada Lovelace")
    await Repository(store).save(customer)
    _install_module(ACCOUNT_V2.replace("def upcast_v1_v2", "def upcast_gone"))
    with pytest.raises(CorruptRecordError, match="upcast_v1_v2"):
        await Repository(store).get(customer.id)


# -- the fast read path keeps eventsourcing's semantics ---------------------------------------


class Gauge(Aggregate):
    """Keyword-only and defaulted parameters, a nested transcoded value, an overridden
    version property: each takes a different branch of the fast path."""

    @event("Mounted")
    def __init__(self, *, label: str) -> None:
        self.label = label
        self.readings: list[Any] = []
        self.seen_versions: list[int] = []

    @event("Read")
    def read(self, *, value: Any, unit: str = "C") -> None:
        self.readings.append((value, unit))
        self.seen_versions.append(self.version)

    @event("Stamped")
    def stamp(self, at: datetime, note: str = "") -> None:
        self.readings.append((at, note))


class CountingGauge(Gauge):
    bumps = 0

    @property
    def version(self) -> int:
        return self._version

    @version.setter
    def version(self, value: int) -> None:
        type(self).bumps += 1
        self._version = value


def eventsourcing_replay(events: list[Any]) -> Any:
    """What eventsourcing itself would rebuild from the same rows."""
    from eventsourcing.application import project_aggregate
    from eventsourcing.persistence import StoredEvent as ESStoredEvent

    mapper = default_mapper()
    domain_events = [
        mapper.to_domain_event(ESStoredEvent(e.stream, e.version, e.topic, e.state)) for e in events
    ]
    return project_aggregate(None, domain_events)


@pytest.mark.parametrize("cls", [Gauge, CountingGauge])
async def test_fast_replay_equals_eventsourcing_replay(cls: type[Gauge]) -> None:
    store = MemoryEventStore()
    repo = Repository(store)
    gauge = cls(label="g")
    # (eventsourcing requires keyword-only arguments even when they have defaults)
    gauge.read(value=1.5, unit="C")
    gauge.read(value={"nested": datetime(2021, 5, 6, tzinfo=UTC)}, unit="K")
    gauge.stamp(at=datetime(2022, 1, 1, tzinfo=UTC))
    gauge.read(value='text with "_type_" in it', unit="C")
    gauge.read(value={"_type_": "user data", "_data_": 1, "more": 2}, unit="C")
    await repo.save(gauge)
    stream = str(gauge.id)
    # A row written by an older program that did not know the field "unit": its default
    # applies, as it would in eventsourcing.
    first_read = (await store.read(stream))[1]
    older = first_read.state.replace(b',"unit":"C"', b"")
    assert b'"unit"' not in older
    await store.append(stream, [NewEvent(topic=first_read.topic, state=older)])

    events = await store.read(stream)
    bumps_before = CountingGauge.bumps
    ours = await repo.get(gauge.id, cls)
    our_bumps = CountingGauge.bumps - bumps_before
    theirs = eventsourcing_replay(events)
    # An overridden version setter runs on replay as often as it does in eventsourcing.
    assert our_bumps == CountingGauge.bumps - bumps_before - our_bumps
    assert (our_bumps > 0) == (cls is CountingGauge)
    assert vars(ours) == vars(theirs)
    assert ours.seen_versions == [1, 2, 4, 5, 6]
    assert ours.readings[-1] == (1.5, "C")


async def test_version_gap_in_a_stream_is_detected() -> None:
    from eventsourcing.domain import OriginatorVersionError

    store = MemoryEventStore()
    repo = Repository(store)
    account = Account(owner="ann")
    account.deposit(amount=1)
    await repo.save(account)
    rows = await store.read(str(account.id))
    with pytest.raises(OriginatorVersionError):
        repo._replay(None, [rows[0], rows[1], rows[1]])


async def test_an_eventsourcing_application_and_the_repository_share_aggregates(
    cb_sqlite_url: str,
) -> None:
    """An unmodified eventsourcing Application on our store and our Repository read and
    extend each other's aggregates: same streams, versions and encoding."""
    from eventsourcing.application import Application

    env = {
        "PERSISTENCE_MODULE": "collaborative_blocks.stores.eventsourcing",
        "EVENT_STORE_URL": cb_sqlite_url,
    }
    app: Application[UUID] = Application(env=env)
    try:
        account = Account(owner="ann")
        account.deposit(amount=5)
        app.save(account)
    finally:
        app.close()

    store = await open_store(cb_sqlite_url)
    try:
        repo = Repository(store)
        ours = await repo.get(account.id, Account)
        assert (ours.balance, ours.version) == (5, 2)
        ours.deposit(amount=7)
        await repo.save(ours)
    finally:
        await store.close()

    app = Application(env=env)
    try:
        theirs = app.repository.get(account.id)
        assert isinstance(theirs, Account)
        assert (theirs.balance, theirs.version) == (12, 3)
    finally:
        app.close()


class Counter(Aggregate):
    """eventsourcing aggregates may number their events from 0."""

    INITIAL_VERSION = 0

    @event("Started")
    def __init__(self) -> None:
        self.count = 0

    @event("Incremented")
    def increment(self) -> None:
        self.count += 1


async def test_aggregates_numbered_from_zero(store: EventStore) -> None:
    repo = Repository(store)
    counter = Counter()
    counter.increment()
    await repo.save(counter)
    assert [e.version for e in await store.read(str(counter.id))] == [0, 1]
    loaded = await repo.get(counter.id, Counter)
    assert (loaded.count, loaded.version) == (1, 1)

    # A second "creation" under the same id conflicts instead of overwriting.
    twin = Counter._create(Counter.Started, id=counter.id)
    with pytest.raises(ConcurrencyError):
        await repo.save(twin)
    assert (await repo.get(counter.id, Counter)).count == 1


async def test_update_retries_the_command_on_a_fresh_aggregate_after_a_conflict(
    store: EventStore,
) -> None:
    repo = Repository(store)
    account = Account(owner="ann")
    await repo.save(account)
    runs: list[int] = []

    def deposit_once_someone_else_wrote(loaded: Account) -> int:
        runs.append(loaded.version)
        loaded.deposit(amount=10)
        return loaded.balance

    # A competing writer lands between our load and our save, the first time only.
    original_save = repo.save

    async def racing_save(*aggregates: Any, tracking: Tracking | None = None) -> list[int]:
        if len(runs) == 1:
            rival = await repo.get(account.id, Account)
            rival.deposit(amount=1)
            await original_save(rival)
        return await original_save(*aggregates, tracking=tracking)

    repo.save = racing_save  # type: ignore[method-assign]
    balance = await repo.update(account.id, Account, deposit_once_someone_else_wrote)

    assert runs == [1, 2]  # re-run on the reloaded aggregate
    assert balance == 11
    assert (await repo.get(account.id, Account)).balance == 11


async def test_update_gives_up_after_the_attempts_and_propagates_command_errors(
    store: EventStore,
) -> None:
    repo = Repository(store)
    account = Account(owner="ann")
    await repo.save(account)

    tries: list[int] = []

    async def always_conflicting(*aggregates: Any, tracking: Tracking | None = None) -> list[int]:
        tries.append(1)
        raise ConcurrencyError(str(account.id), 1, 2)

    plain_save = repo.save
    repo.save = always_conflicting  # type: ignore[method-assign]
    with pytest.raises(ConcurrencyError):
        await repo.update(account.id, Account, lambda a: a.deposit(amount=1), attempts=2)
    assert len(tries) == 2
    repo.save = plain_save  # type: ignore[method-assign]

    with pytest.raises(ValueError, match="insufficient funds"):
        await repo.update(account.id, Account, lambda a: a.withdraw(amount=5))
    with pytest.raises(ValueError, match="attempts"):
        await repo.update(account.id, Account, lambda a: None, attempts=0)
    assert (await repo.get(account.id, Account)).version == 1


def test_events_are_encoded_byte_for_byte_as_the_mapper_encodes_them() -> None:
    from collaborative_blocks.core.workflows.run import WorkflowRun

    with event_clock(VirtualClock(start=1_700_000_000.123456)):
        run = WorkflowRun(
            run_id="r",
            workflow_id="w",
            version=1,
            fingerprint="f",
            step_ids=["a"],
            input_data={"text": "naïve ☃", "n": 1.5, "list": [1, None, True]},
            trace_id=None,
            engine_id="e",
            at=1.0,
        )
        run.start(at=2.0)
        run.schedule_step(step_id="a", at=3.0)
        wallet = Wallet()
        wallet.credit(amount=Decimal("1.25"))  # a Decimal: only the mapper encodes it
        wallet.annotate(note={"id": uuid4(), "when": datetime(2024, 1, 2, tzinfo=UTC)})
        wallet.annotate(note={"plain": ["x"]})
        ledger = Ledger(name="l")
        ledger.post(entry="e1")
    repository = Repository(MemoryEventStore())
    mapper = default_mapper()
    events = [*run.pending_events, *wallet.pending_events, *ledger.pending_events]
    for domain_event in events:
        expected = mapper.to_stored_event(domain_event)
        encoded = repository._encode("s", domain_event)
        assert (encoded.topic, encoded.state) == (expected.topic, expected.state)
    fast = repository._encode_state
    assert fast is not None
    assert all(fast(e) is not None for e in run.pending_events)
    assert fast(wallet.pending_events[1]) is None  # the Decimal went through the mapper
    # ...and they load back as before.
    state = repository._decode(repository._encode("s", run.pending_events[-1]).state)
    assert state["step_id"] == "a"
    assert state["timestamp"] == run.pending_events[-1].timestamp


async def test_a_mapper_with_a_compressor_is_used_as_it_is() -> None:
    repository = Repository(MemoryEventStore(), mapper=default_mapper(compressor=ZlibCompressor()))
    account = Account(owner="ann")
    account.deposit(amount=5)
    await repository.save(account)
    again = await repository.get(account.id, Account)
    assert again.balance == 5
    stored = await repository.store.read(stream_for(account.id))
    assert not stored[0].state.startswith(b"{")  # compressed: the mapper's path


def test_the_compact_json_encoder_matches_the_standard_one_and_recovers_from_errors() -> None:
    import json

    from collaborative_blocks.core.aggregates import _compact_json

    dumps = _compact_json()
    standard = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    values: list[Any] = [{"a": [1, 2.5, None, True], "é": '☃\n"x"'}, [], "s", 1e300, {"n": {}}]
    for value in values:
        assert dumps(value) == standard(value)
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        dumps({"x": loop})
    with pytest.raises(TypeError, match="Object of type UUID is not JSON serializable"):
        dumps({"id": [uuid4()]})
    assert dumps({"x": [1]}) == '{"x":[1]}'  # still usable after the failures
