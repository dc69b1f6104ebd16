"""The PostgreSQL event store: the conformance suite, plus what only PostgreSQL has.

PostgreSQL specifics: positions from a sequence made visible in order by the append advisory
lock (a subscriber never skips a late commit), group commit with per-caller errors, a
connection killed by the server, an unreachable server, corrupt rows.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collaborative_blocks.errors import (
    ConcurrencyError,
    ConfigurationError,
    CorruptRecordError,
    DuplicateMessageError,
    EventSerializationError,
    StoreError,
    StoreUnavailableError,
    TrackingConflictError,
)
from collaborative_blocks.stores import (
    EventStore,
    NewEvent,
    Snapshot,
    StoredEvent,
    Tracking,
    open_store,
)
from collaborative_blocks.stores.postgres import (
    APPEND_LOCK_KEY,
    PostgresEventStore,
    open_postgres_store,
    parse_postgres_url,
)
from collaborative_blocks.testing import StoreConformance
from collaborative_blocks.testing.services import (
    postgres_admin_dsn,
    require_postgres,
    temporary_postgres_database,
)


class TestPostgresStoreConformance(StoreConformance):
    durable = True
    # Positions come from a sequence, but versions, tracking and inbox are checked before
    # anything is inserted, so rejected appends draw no positions: only a transaction the
    # database itself aborts leaves a gap, and the suite never provokes one.
    dense_positions = True

    @pytest.fixture(autouse=True)
    async def _database(self) -> AsyncIterator[None]:
        async with temporary_postgres_database() as url:
            self.url = url
            yield

    async def open_store(self) -> EventStore:
        return await open_postgres_store(self.url)


# -- PostgreSQL specifics ---------------------------------------------------------------------

# A safety net so a store that fails to wake a subscriber fails the test instead of hanging;
# nothing asserts how long anything takes.
HANG_GUARD_SECONDS = 30.0


def _events(n: int, tag: str = "e") -> list[NewEvent]:
    return [NewEvent("Happened", f"{tag}-{i}".encode()) for i in range(n)]


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with temporary_postgres_database() as database_url:
        yield database_url


@pytest.fixture
async def store(url: str) -> AsyncIterator[PostgresEventStore]:
    opened = await open_postgres_store(url)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def raw(url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection to the test database: the slow writer, the saboteur."""
    connection = await asyncpg.connect(_dsn(url))
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def observer(url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection that only looks at pg_locks / pg_stat_activity (never in a transaction,
    so it sees their current state rather than a per-transaction snapshot)."""
    connection = await asyncpg.connect(_dsn(url))
    try:
        yield connection
    finally:
        await connection.close()


async def _eventually(observer: asyncpg.Connection, query: str) -> None:
    """Wait until ``query`` returns true.

    PostgreSQL has no notification for "a backend started waiting on a lock" or "a backend
    connected", so the test watches the statistics views for the state it needs.
    """
    async with asyncio.timeout(HANG_GUARD_SECONDS):
        while True:
            if await observer.fetchval(query):
                return
            await asyncio.sleep(0.01)


_WRITER_WAITS_FOR_APPEND_LOCK = f"""
SELECT EXISTS (
  SELECT 1 FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid
   WHERE l.locktype = 'advisory' AND NOT l.granted AND a.datname = current_database()
     AND a.application_name = 'collaborative_blocks/writer'
     AND ((l.classid::bigint << 32) | l.objid::bigint) = {APPEND_LOCK_KEY})
"""


def _backends(role: str) -> str:
    return (
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        f"AND application_name = 'collaborative_blocks/{role}'"
    )


async def _collect(
    subscription: AsyncIterator[StoredEvent], count: int, into: list[StoredEvent]
) -> None:
    async with asyncio.timeout(HANG_GUARD_SECONDS):
        while len(into) < count:
            into.append(await anext(subscription))


def _assert_in_order_once(seen: Sequence[StoredEvent]) -> None:
    positions = [event.position for event in seen]
    assert positions == sorted(set(positions)), f"out of order or duplicated: {positions}"


async def _insert_and_hold(raw: asyncpg.Connection, stream: str, *, take_lock: bool) -> int:
    """Begin a transaction that inserts one event, and leave it open (a slow writer)."""
    await raw.execute("BEGIN")
    if take_lock:
        await raw.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
    position: int = await raw.fetchval(
        "INSERT INTO cb_events (stream, version, topic, state) "
        "VALUES ($1, 1, 'Late', 'late') RETURNING position",
        stream,
    )
    return position


async def test_a_late_commit_is_never_skipped(
    store: PostgresEventStore, raw: asyncpg.Connection, observer: asyncpg.Connection
) -> None:
    await store.append("early", _events(1))
    subscription = store.subscribe(from_position=1)
    seen: list[StoredEvent] = []
    try:
        await _collect(subscription, 1, seen)
        # A slow writer that follows the lock protocol drew position P and has not committed.
        late_position = await _insert_and_hold(raw, "late", take_lock=True)
        append = asyncio.ensure_future(store.append("fast", _events(1)))
        await _eventually(observer, _WRITER_WAITS_FOR_APPEND_LOCK)
        # The fast append waits for the slow one instead of committing a higher position
        # first; readers are not blocked meanwhile.
        assert [e.stream for e in await store.read_all()] == ["early"]
        assert await store.max_position() == seen[0].position
        assert not append.done()
        await raw.execute("COMMIT")
        (fast_position,) = await append
        assert fast_position > late_position
        await _collect(subscription, 3, seen)
        assert [(e.stream, e.position) for e in seen[1:]] == [
            ("late", late_position),
            ("fast", fast_position),
        ]
        _assert_in_order_once(seen)
    finally:
        await subscription.aclose()  # type: ignore[attr-defined]


async def test_without_the_lock_a_late_commit_would_be_skipped(
    store: PostgresEventStore, raw: asyncpg.Connection
) -> None:
    """Why the lock exists: a writer that bypasses it lets a reader skip its row.

    This is the hazard the previous test rules out; it also shows that test can fail.
    """
    rogue_position = await _insert_and_hold(raw, "rogue", take_lock=False)
    (fast_position,) = await store.append("fast", _events(1))
    assert fast_position > rogue_position
    last_seen = (await store.read_all())[-1].position
    await raw.execute("COMMIT")
    after = await store.read_all(from_position=last_seen + 1)
    assert after == []  # the rogue row is committed but behind the reader's position
    assert rogue_position in [e.position for e in await store.read_all()]


async def test_two_stores_append_concurrently_while_a_subscriber_runs(url: str) -> None:
    one = await open_postgres_store(url)
    two = await open_postgres_store(url)
    # A huge poll interval: only NOTIFY can wake this subscriber in time.
    reader = await open_postgres_store(url, poll_interval=3600)
    subscription = reader.subscribe()
    seen: list[StoredEvent] = []
    try:
        collecting = asyncio.ensure_future(_collect(subscription, 4 * 20 * 3, seen))

        async def write(target: PostgresEventStore, name: str) -> None:
            for i in range(20):
                await target.append(f"{name}-{i % 4}", _events(3, f"{name}{i}"))

        await asyncio.gather(
            write(one, "one-a"), write(one, "one-b"), write(two, "two-a"), write(two, "two-b")
        )
        await collecting
        _assert_in_order_once(seen)
        assert seen == await reader.read_all()
        for name in ("one-a", "one-b", "two-a", "two-b"):
            for k in range(4):
                stream = [e for e in seen if e.stream == f"{name}-{k}"]
                assert [e.version for e in stream] == list(range(1, len(stream) + 1))
    finally:
        await subscription.aclose()  # type: ignore[attr-defined]
        for opened in (one, two, reader):
            await opened.close()


async def test_polling_finds_a_commit_that_sent_no_notification(
    url: str, raw: asyncpg.Connection
) -> None:
    reader = await open_postgres_store(f"{url}?poll_interval=0.05&pool_size=2")
    assert (reader.poll_interval, reader.pool_size) == (0.05, 2)
    subscription = reader.subscribe()
    seen: list[StoredEvent] = []
    try:
        collecting = asyncio.ensure_future(_collect(subscription, 1, seen))
        # A writer that follows the lock protocol but does not NOTIFY (a lost notification).
        async with raw.transaction():
            await raw.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
            await raw.execute(
                "INSERT INTO cb_events (stream, version, topic, state) "
                "VALUES ('quiet', 1, 'Quiet', 'q')"
            )
        await collecting
        assert [(e.stream, e.topic) for e in seen] == [("quiet", "Quiet")]
    finally:
        await subscription.aclose()  # type: ignore[attr-defined]
        await reader.close()


async def test_concurrent_appends_are_group_committed(store: PostgresEventStore) -> None:
    before = store.transactions_committed
    results = await asyncio.gather(
        *(store.append(f"s-{i}", _events(1, str(i)), expected_version=0) for i in range(64))
    )
    positions = [p for result in results for p in result]
    assert len(set(positions)) == 64
    assert store.transactions_committed - before < 64
    for i, (position,) in enumerate(results):
        (event,) = await store.read(f"s-{i}")
        assert (event.position, event.state) == (position, f"{i}-0".encode())


async def test_each_caller_in_a_batch_gets_its_own_outcome(store: PostgresEventStore) -> None:
    await store.append("taken", _events(2))
    await store.append("other", [], tracking=Tracking("proj", position=10, message_id="m-1"))
    before = store.transactions_committed
    outcomes = await asyncio.gather(
        store.append("fresh-1", _events(2), expected_version=0),
        store.append("taken", _events(1), expected_version=0),  # stale
        store.append("fresh-2", _events(1), tracking=Tracking("proj", message_id="m-1")),
        store.append("fresh-3", _events(1), tracking=Tracking("proj", position=9)),
        store.append("taken", _events(1), expected_version=2),
        store.append("taken", _events(1), expected_version=2),  # loses to the previous one
        store.append("fresh-4", _events(1), tracking=Tracking("proj", position=11)),
        return_exceptions=True,
    )
    assert store.transactions_committed - before < len(outcomes)
    ok_1, stale, duplicate, behind, winner, loser, ok_4 = outcomes
    assert isinstance(stale, ConcurrencyError)
    assert (stale.expected, stale.actual) == (0, 2)
    assert isinstance(duplicate, DuplicateMessageError)
    assert isinstance(behind, TrackingConflictError)
    assert isinstance(loser, ConcurrencyError)
    assert (loser.expected, loser.actual) == (2, 3)
    for result in (ok_1, winner, ok_4):
        assert isinstance(result, list)
    assert [e.version for e in await store.read("taken")] == [1, 2, 3]
    assert await store.read("fresh-2") == []
    assert await store.read("fresh-3") == []
    assert len(await store.read("fresh-1")) == 2
    assert await store.consumer_position("proj") == 11


async def test_a_batch_the_database_rejects_is_retried_caller_by_caller(
    store: PostgresEventStore, raw: asyncpg.Connection
) -> None:
    # Something we do not check ourselves (a constraint an operator added) rejects one
    # caller's rows; the others in the same batch must still commit.
    await raw.execute("ALTER TABLE cb_events ADD CONSTRAINT no_poison CHECK (topic <> 'Poison')")
    outcomes = await asyncio.gather(
        store.append("good-1", _events(2)),
        store.append("bad", [NewEvent("Fine", b"1"), NewEvent("Poison", b"2")]),
        store.append("good-2", _events(1)),
        return_exceptions=True,
    )
    good_1, bad, good_2 = outcomes
    assert isinstance(bad, StoreError)
    assert "no_poison" in str(bad)
    assert "Nothing was written" in str(bad)
    assert isinstance(good_1, list)
    assert isinstance(good_2, list)
    assert await store.read("bad") == []
    assert [e.position for e in await store.read("good-1")] == good_1
    assert await store.append("bad", _events(1), expected_version=0)


async def test_a_killed_writer_connection_fails_that_call_and_the_store_recovers(
    store: PostgresEventStore, raw: asyncpg.Connection, observer: asyncpg.Connection
) -> None:
    await store.append("s", _events(1))
    await _insert_and_hold(raw, "held", take_lock=True)
    doomed = asyncio.ensure_future(store.append("s", _events(1), expected_version=1))
    await _eventually(observer, _WRITER_WAITS_FOR_APPEND_LOCK)
    await observer.execute(f"SELECT pg_terminate_backend(pid) FROM ({_backends('writer')}) w")
    with pytest.raises(StoreUnavailableError) as caught:
        await doomed
    message = str(caught.value)
    assert store.location.database in message
    assert "reconnects" in message
    await raw.execute("COMMIT")
    assert [e.version for e in await store.read("s")] == [1]
    (position,) = await store.append("s", _events(1), expected_version=1)
    assert [e.position for e in await store.read("s")][-1] == position


async def test_killed_reader_and_listener_connections_are_replaced(
    url: str, store: PostgresEventStore, observer: asyncpg.Connection
) -> None:
    await store.append("s", _events(1))
    subscription = store.subscribe(from_position=1)
    seen: list[StoredEvent] = []
    other = await open_postgres_store(url)
    try:
        await _collect(subscription, 1, seen)
        old = {row[0] for row in await observer.fetch(_backends("listener"))}
        assert len(old) == 1
        await observer.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name IN ('collaborative_blocks/listener', "
            "'collaborative_blocks/reader')"
        )
        # A new LISTEN connection appears without anyone asking for it.
        excluded = ",".join(str(pid) for pid in old)
        await _eventually(
            observer,
            f"SELECT EXISTS ({_backends('listener')} AND pid NOT IN ({excluded}))",
        )
        (position,) = await other.append("s", _events(1), expected_version=1)
        await _collect(subscription, 2, seen)
        assert seen[-1].position == position
        # Reads work again (a pooled connection killed while idle is replaced).
        for _ in range(3):
            try:
                assert len(await store.read("s")) == 2
            except StoreUnavailableError:
                continue
            break
        else:
            pytest.fail("reads did not recover after the reader connections were killed")
    finally:
        await subscription.aclose()  # type: ignore[attr-defined]
        await other.close()


async def test_unreachable_server_names_host_port_and_database() -> None:
    # Port 1 on localhost: nothing listens there (no server needed for this test).
    with pytest.raises(StoreUnavailableError) as caught:
        await open_postgres_store(
            "postgresql+asyncpg://app:s3cret@127.0.0.1:1/orders", connect_timeout=5
        )
    message = str(caught.value)
    assert "127.0.0.1" in message
    assert "port 1" in message
    assert "'orders'" in message
    assert "s3cret" not in message
    assert "pg_isready" in message


async def test_missing_database_says_create_it() -> None:
    require_postgres()
    admin = postgres_admin_dsn().rsplit("/", 1)[0]
    with pytest.raises(StoreUnavailableError) as caught:
        await open_postgres_store(f"{admin}/cb_no_such_database_xyz")
    message = str(caught.value)
    assert "cb_no_such_database_xyz" in message
    assert "createdb" in message


@pytest.mark.parametrize(
    "bad_url",
    ["mysql://root@localhost/db", "postgresql+asyncpg://u@host:notaport/db", "no-scheme"],
)
def test_malformed_url_is_a_configuration_error(bad_url: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_postgres_url(bad_url)


def test_url_parsing_and_redaction() -> None:
    location = parse_postgres_url("postgres://bob:pw@db.example:6543/ledger?sslmode=require")
    assert (location.host, location.port, location.database, location.user) == (
        "db.example",
        6543,
        "ledger",
        "bob",
    )
    assert location.dsn == "postgresql://bob:pw@db.example:6543/ledger?sslmode=require"
    assert "pw" not in location.display_url
    assert parse_postgres_url("postgresql://alice@h/").database == "alice"


def test_store_options_in_the_url_are_taken_out_of_the_dsn() -> None:
    location = parse_postgres_url(
        "postgresql+asyncpg://u@h/db?sslmode=disable&poll_interval=0.25&pool_size=3"
    )
    assert (location.poll_interval, location.pool_size) == (0.25, 3)
    assert location.dsn == "postgresql://u@h/db?sslmode=disable"


@pytest.mark.parametrize("query", ["poll_interval=soon", "poll_interval=0", "pool_size=1.5"])
def test_bad_store_options_in_the_url_are_configuration_errors(query: str) -> None:
    with pytest.raises(ConfigurationError, match=query.split("=")[0]):
        parse_postgres_url(f"postgresql+asyncpg://u@h/db?{query}")


@pytest.mark.parametrize("column", ["state", "topic"])
async def test_a_corrupt_row_is_a_typed_error_and_the_rest_stays_readable(
    store: PostgresEventStore, raw: asyncpg.Connection, column: str
) -> None:
    await store.append("s", _events(2))
    await raw.execute(f"ALTER TABLE cb_events ALTER COLUMN {column} DROP NOT NULL")
    await raw.execute(f"UPDATE cb_events SET {column} = NULL WHERE stream = 's' AND version = 2")
    with pytest.raises(CorruptRecordError) as caught:
        await store.read("s")
    assert "position 2" in str(caught.value)
    with pytest.raises(CorruptRecordError):
        await store.read_all()
    assert [e.version for e in await store.read("s", to_version=1)] == [1]
    assert await store.append("t", _events(1)) == [3]


async def test_a_corrupt_snapshot_is_a_typed_error(
    store: PostgresEventStore, raw: asyncpg.Connection
) -> None:
    await store.save_snapshot(Snapshot("agg", 3, "mod:Agg", b"s"))
    await raw.execute("UPDATE cb_snapshots SET topic = '' WHERE stream = 'agg'")
    with pytest.raises(CorruptRecordError, match="agg"):
        await store.latest_snapshot("agg")


@pytest.mark.parametrize(
    ("stream", "topic"),
    [("nul\x00stream", "T"), ("s", "nul\x00topic"), ("surrogate\udc80", "T")],
)
async def test_text_postgresql_cannot_store_is_refused_before_the_batch(
    store: PostgresEventStore, stream: str, topic: str
) -> None:
    outcomes = await asyncio.gather(
        store.append("neighbour", _events(1)),
        store.append(stream, [NewEvent(topic, b"x")]),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], list)
    assert isinstance(outcomes[1], EventSerializationError)
    assert await store.max_position() == 1


async def test_bad_tracking_and_snapshot_keys_are_refused(store: PostgresEventStore) -> None:
    with pytest.raises(EventSerializationError, match="consumer"):
        await store.append("s", _events(1), tracking=Tracking("c" * 256, position=1))
    with pytest.raises(EventSerializationError, match="message_id"):
        await store.append("s", _events(1), tracking=Tracking("c", message_id="m" * 256))
    with pytest.raises(EventSerializationError, match="state must be bytes"):
        await store.save_snapshot(Snapshot("s", 1, "T", "text"))  # type: ignore[arg-type]
    assert await store.max_position() == 0


async def test_several_processes_starting_at_once_create_the_schema_once(url: str) -> None:
    stores = await asyncio.gather(*(open_postgres_store(url) for _ in range(6)))
    try:
        positions = await asyncio.gather(*(opened.append("s", _events(1)) for opened in stores))
        assert sorted(p for (p,) in positions) == [1, 2, 3, 4, 5, 6]
    finally:
        for opened in stores:
            await opened.close()


async def test_open_store_picks_postgres_for_every_scheme_spelling(url: str) -> None:
    rest = url.split("://", 1)[1]
    for scheme in ("postgresql+asyncpg", "postgresql", "postgres"):
        opened = await open_store(f"{scheme}://{rest}")
        try:
            assert isinstance(opened, PostgresEventStore)
            await opened.append(scheme, _events(1))
        finally:
            await opened.close()


# -- property: random interleavings of concurrent appends ------------------------------------


@dataclass(frozen=True)
class _Op:
    stream: int
    size: int
    check: str  # "none": expected_version=None; "read": the version just read; "new": 0
    yields: int  # how often the task lets others run before appending


_ops = st.builds(
    _Op,
    stream=st.integers(0, 2),
    size=st.integers(0, 3),
    check=st.sampled_from(["none", "read", "new"]),
    yields=st.integers(0, 3),
)
_example_numbers = itertools.count()


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(tasks=st.lists(st.lists(_ops, min_size=1, max_size=4), min_size=2, max_size=6))
async def test_concurrent_appends_keep_versions_order_and_subscribers_exact(
    url: str, tasks: list[list[_Op]]
) -> None:
    # One database for all examples; each example writes streams of its own.
    prefix = f"ex{next(_example_numbers)}"
    store = await open_postgres_store(url)
    start = await store.max_position() + 1
    subscription = store.subscribe(from_position=start)
    acknowledged: dict[int, tuple[str, bytes]] = {}
    conflicts: list[tuple[int | None, ConcurrencyError]] = []
    try:

        async def run(task: int, ops: list[_Op]) -> None:
            for n, op in enumerate(ops):
                stream = f"{prefix}-{op.stream}"
                for _ in range(op.yields):
                    await asyncio.sleep(0)
                expected = {"none": None, "new": 0}.get(op.check)
                if op.check == "read":
                    expected = await store.stream_version(stream)
                events = [NewEvent("P", f"{task}:{n}:{j}".encode()) for j in range(op.size)]
                try:
                    positions = await store.append(stream, events, expected_version=expected)
                except ConcurrencyError as error:
                    conflicts.append((expected, error))
                    continue
                assert len(positions) == op.size
                assert positions == sorted(set(positions))
                for position, event in zip(positions, events, strict=True):
                    assert position not in acknowledged
                    acknowledged[position] = (stream, event.state)

        await asyncio.gather(*(run(task, ops) for task, ops in enumerate(tasks)))
        for expected, error in conflicts:
            assert expected is not None, "an unchecked append must not conflict"
            assert error.expected == expected
            assert error.actual != expected

        seen: list[StoredEvent] = []
        await _collect(subscription, len(acknowledged), seen)
        log = [e for e in await store.read_all(from_position=start)]
        assert log == seen, "the subscriber's view differs from the log"
        assert {e.position: (e.stream, e.state) for e in log} == acknowledged
        _assert_in_order_once(log)
        for k in range(3):
            stream_events = await store.read(f"{prefix}-{k}")
            assert [e.version for e in stream_events] == list(range(1, len(stream_events) + 1))
            # Versions and positions agree on the order of a stream's events.
            assert [e.position for e in stream_events] == sorted(e.position for e in stream_events)
            # Each append's events sit together, in the order they were given.
            by_append: dict[tuple[str, str], list[int]] = {}
            for event in stream_events:
                task_id, op_id, index = event.state.decode().split(":")
                by_append.setdefault((task_id, op_id), []).append(int(index))
            for indexes in by_append.values():
                assert indexes == list(range(len(indexes)))
    finally:
        await subscription.aclose()  # type: ignore[attr-defined]
        await store.close()


async def test_a_read_postgresql_refuses_is_a_store_error(
    store: PostgresEventStore, raw: asyncpg.Connection
) -> None:
    await store.save_snapshot(Snapshot("agg", 1, "mod:Agg", b"s"))
    await raw.execute("ALTER TABLE cb_snapshots RENAME TO cb_snapshots_moved")
    with pytest.raises(StoreError, match="schema"):
        await store.latest_snapshot("agg")
    await raw.execute("ALTER TABLE cb_snapshots_moved RENAME TO cb_snapshots")
    assert await store.latest_snapshot("agg") == Snapshot("agg", 1, "mod:Agg", b"s")
