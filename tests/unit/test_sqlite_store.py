"""What is specific to the SQLite store: URLs, files, group commit, corrupt data, threads.

The behaviour every store shares is in the conformance suite (test_store_conformance.py).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import collaborative_blocks.stores.sqlite as sqlite_module
from collaborative_blocks.errors import (
    ConcurrencyError,
    ConfigurationError,
    CorruptRecordError,
    DuplicateMessageError,
    EventSerializationError,
    StoreUnavailableError,
)
from collaborative_blocks.stores import AppendRequest, NewEvent, Snapshot, Tracking, open_store
from collaborative_blocks.stores.sqlite import (
    SQLiteEventStore,
    open_sqlite_store,
    sqlite_path_from_url,
)


def ev(state: bytes = b"x", topic: str = "T") -> NewEvent:
    return NewEvent(topic, state)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteEventStore]:
    store = await open_sqlite_store(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}")
    try:
        yield store
    finally:
        await store.close()


class Gate:
    """Holds the writer thread inside its next commit until opened, recording group sizes.

    This makes grouping deterministic: appends submitted while the writer is held all land
    in the queue, and the writer drains them into one transaction when released.
    """

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.groups: list[int] = []
        self.armed = False

    def hold_next_commit(self) -> None:
        self.armed = True

    async def wait_until_held(self) -> None:
        await asyncio.to_thread(self.entered.wait)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    gate = Gate()
    original = sqlite_module._Writer._commit_group

    def held(self: Any, conn: sqlite3.Connection, jobs: list[Any]) -> Any:
        if gate.armed:
            gate.groups.append(len(jobs))
            if len(gate.groups) == 1:
                gate.entered.set()
                gate.release.wait()
        return original(self, conn, jobs)

    monkeypatch.setattr(sqlite_module._Writer, "_commit_group", held)
    try:
        yield gate
    finally:
        gate.release.set()


# -- URLs and files ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path", "synchronous"),
    [
        ("sqlite+aiosqlite:///events.db", Path("events.db"), "FULL"),
        ("sqlite+aiosqlite:///data/events.db", Path("data/events.db"), "FULL"),
        ("sqlite+aiosqlite:////var/lib/cb/events.db", Path("/var/lib/cb/events.db"), "FULL"),
        ("sqlite:///events.db", Path("events.db"), "FULL"),
        ("sqlite:////abs/events.db?synchronous=normal", Path("/abs/events.db"), "NORMAL"),
        ("sqlite:///with%20space.db", Path("with space.db"), "FULL"),
    ],
)
def test_url_forms(url: str, path: Path, synchronous: str) -> None:
    assert sqlite_path_from_url(url) == (path, synchronous)


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("sqlite://", "names no database file"),
        ("sqlite+aiosqlite:///:memory:", "memory://"),
        ("sqlite+aiosqlite:///", "names no database file"),
        ("postgresql://x/y", "not a SQLite store URL"),
        ("events.db", "not a SQLite store URL"),
        ("sqlite:///e.db?synchronous=sometimes", "synchronous='sometimes'"),
        ("sqlite:///e.db?cache=shared", "unknown option 'cache'"),
    ],
)
def test_bad_urls_are_configuration_errors(url: str, named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        sqlite_path_from_url(url)


async def test_relative_url_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = await open_store("sqlite+aiosqlite:///nested/dirs/events.db")
    try:
        assert isinstance(store, SQLiteEventStore)
        await store.append("a", [ev()])
    finally:
        await store.close()
    assert (tmp_path / "nested" / "dirs" / "events.db").is_file()


async def test_absolute_url_creates_parent_directories(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "events.db"
    store = await open_store(f"sqlite:///{target}")
    try:
        assert str(target).startswith("/")
        await store.append("a", [ev()])
    finally:
        await store.close()
    assert target.is_file()
    raw = sqlite3.connect(target)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT stream, version FROM cb_events").fetchall() == [("a", 1)]
    finally:
        raw.close()


async def test_reopening_keeps_the_schema_and_the_data(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'e.db'}"
    for round_ in range(3):
        store = await open_sqlite_store(url)
        try:
            await store.append("s", [ev()], expected_version=round_)
        finally:
            await store.close()
    store = await open_sqlite_store(url)
    try:
        assert [e.position for e in await store.read("s")] == [1, 2, 3]
    finally:
        await store.close()


@pytest.mark.parametrize(
    "content",
    [b"this is not a database, just some text\n" * 50, bytes(range(256)) * 64],
)
async def test_a_file_that_is_not_a_database_is_unavailable_and_untouched(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(content)
    with pytest.raises(StoreUnavailableError) as caught:
        await open_sqlite_store(f"sqlite:///{path}")
    message = str(caught.value)
    assert str(path) in message
    assert "not a database" in message
    assert "restore" in message
    assert path.read_bytes() == content
    assert _names(tmp_path) == ["garbage.db"]


async def test_a_truncated_database_is_unavailable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'e.db'}"
    store = await open_sqlite_store(url)
    await store.append("a", [ev()] * 100)
    await store.close()
    path = tmp_path / "e.db"
    damaged = _damage(path)
    with pytest.raises(StoreUnavailableError, match=str(path)):
        await open_sqlite_store(url)
    assert path.read_bytes() == damaged


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _damage(path: Path) -> bytes:
    """Keep the file's valid header but destroy every page after it; return the bytes."""
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    data = path.read_bytes()
    damaged = data[:100] + b"\xde\xad" * ((len(data) - 100) // 2)
    path.write_bytes(damaged)
    return damaged


async def test_a_directory_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailableError, match="is a directory"):
        await open_sqlite_store(f"sqlite:///{tmp_path}")


async def test_a_parent_that_is_a_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreUnavailableError, match="cannot create the directory"):
        await open_sqlite_store(f"sqlite:///{tmp_path / 'file' / 'events.db'}")


async def test_a_foreign_table_shape_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "foreign.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE cb_events (id INTEGER PRIMARY KEY, payload TEXT)")
    raw.execute("INSERT INTO cb_events (payload) VALUES ('keep me')")
    raw.commit()
    raw.close()
    with pytest.raises(StoreUnavailableError, match="no such column"):
        await open_sqlite_store(f"sqlite:///{path}")
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("SELECT payload FROM cb_events").fetchall() == [("keep me",)]
    finally:
        raw.close()


async def test_no_threads_are_left_after_close(tmp_path: Path) -> None:
    store = await open_sqlite_store(f"sqlite:///{tmp_path / 'e.db'}")
    await store.append("a", [ev()])
    await store.read("a")
    assert any(t.name.startswith("cb-sqlite") for t in threading.enumerate())
    await store.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("cb-sqlite")]


async def test_a_failed_open_leaves_no_threads(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"garbage" * 100)
    with pytest.raises(StoreUnavailableError):
        await open_sqlite_store(f"sqlite:///{path}")
    assert not [t.name for t in threading.enumerate() if t.name.startswith("cb-sqlite")]


# -- corrupt rows --------------------------------------------------------------------------


def _raw(path: Path, *statements: str) -> None:
    raw = sqlite3.connect(path)
    try:
        for statement in statements:
            raw.execute(statement)
        raw.commit()
    finally:
        raw.close()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("UPDATE cb_events SET state = 'text, not bytes' WHERE position = 2", "state of type str"),
        ("UPDATE cb_events SET state = 42 WHERE position = 2", "state of type int"),
        ("UPDATE cb_events SET topic = x'0102' WHERE position = 2", "topic of type bytes"),
        ("UPDATE cb_events SET version = 'two' WHERE position = 2", "version 'two'"),
        ("UPDATE cb_events SET topic = CAST(x'ff' AS TEXT) WHERE position = 2", "UTF-8"),
    ],
)
async def test_a_corrupt_row_is_a_corrupt_record_error(
    store: SQLiteEventStore, change: str, named: str
) -> None:
    await store.append("a", [ev(b"1"), ev(b"2"), ev(b"3")])
    await store.append("b", [ev(b"fine")])
    _raw(store.path, change)
    with pytest.raises(CorruptRecordError, match=named):
        await store.read("a")
    with pytest.raises(CorruptRecordError):
        await store.read_all()
    # What is intact stays readable, around the bad row and in other streams.
    assert [e.state for e in await store.read("a", to_version=1)] == [b"1"]
    assert [e.state for e in await store.read_all(from_position=3)] == [b"3", b"fine"]
    assert [e.state for e in await store.read("b")] == [b"fine"]
    # Reading changed nothing, and writing goes on.
    assert await store.append("b", [ev(b"more")], expected_version=1) == [5]


async def test_a_null_state_is_a_corrupt_record_error(tmp_path: Path) -> None:
    path = tmp_path / "loose.db"
    # A table of the right columns but without NOT NULL, as an older tool might have made it.
    _raw(
        path,
        "CREATE TABLE cb_events (position INTEGER PRIMARY KEY, stream VARCHAR(255), "
        "version BIGINT, topic TEXT, state BLOB, UNIQUE (stream, version))",
    )
    store = await open_sqlite_store(f"sqlite:///{path}")
    try:
        await store.append("a", [ev(b"1"), ev(b"2")])
        _raw(path, "UPDATE cb_events SET state = NULL WHERE position = 1")
        with pytest.raises(CorruptRecordError, match="state of type NoneType"):
            await store.read("a")
        assert [e.state for e in await store.read("a", from_version=2)] == [b"2"]
    finally:
        await store.close()


async def test_a_corrupt_snapshot_is_a_corrupt_record_error(store: SQLiteEventStore) -> None:
    await store.save_snapshot(Snapshot("agg", 3, "mod:Agg", b"ok"))
    _raw(store.path, "UPDATE cb_snapshots SET state = 'text' WHERE stream = 'agg'")
    with pytest.raises(CorruptRecordError, match="delete that snapshot"):
        await store.latest_snapshot("agg")


@pytest.mark.parametrize(
    "bad",
    [
        Snapshot("", 1, "T", b""),
        Snapshot("s", -1, "T", b""),
        Snapshot("s", 1, "", b""),
        Snapshot("s", 1, "T", "text"),  # type: ignore[arg-type]
    ],
)
async def test_bad_snapshot_is_refused(store: SQLiteEventStore, bad: Snapshot) -> None:
    with pytest.raises(EventSerializationError):
        await store.save_snapshot(bad)
    assert await store.latest_snapshot("s") is None


# -- group commit --------------------------------------------------------------------------


async def test_group_commit_gives_each_caller_its_own_result(
    store: SQLiteEventStore, gate: Gate
) -> None:
    await store.append("taken", [ev()])
    await store.append("proj-source", [], tracking=Tracking("proj", position=10))
    gate.hold_next_commit()
    first = asyncio.ensure_future(store.append("first", [ev()]))
    await gate.wait_until_held()
    calls = {
        "ok-1": store.append("ok-1", [ev()], expected_version=0),
        "ok-2": store.append("ok-2", [ev(), ev()], expected_version=0),
        "conflict": store.append("taken", [ev()], expected_version=0),
        "race-winner": store.append("race", [ev()], expected_version=0),
        "race-loser": store.append("race", [ev()], expected_version=0),
        "stale-tracking": store.append("x", [ev()], tracking=Tracking("proj", position=3)),
        "inbox-1": store.append("y", [ev()], tracking=Tracking("w", message_id="m")),
        "inbox-2": store.append("z", [ev()], tracking=Tracking("w", message_id="m")),
        "many": store.append_many(
            [AppendRequest("m1", [ev()], expected_version=0), AppendRequest("m2", [ev()])]
        ),
    }
    tasks = {name: asyncio.ensure_future(call) for name, call in calls.items()}
    # Let every task reach the queue while the writer is held.
    await _until_queued(store, len(calls))
    gate.release.set()
    await first
    outcomes = await asyncio.gather(*tasks.values(), return_exceptions=True)
    results = dict(zip(tasks, outcomes, strict=True))
    assert gate.groups[1] == len(calls), gate.groups
    assert isinstance(results["conflict"], ConcurrencyError)
    assert isinstance(results["race-loser"], ConcurrencyError)
    assert results["race-loser"].actual == 1
    assert isinstance(results["stale-tracking"], Exception)
    assert isinstance(results["inbox-2"], DuplicateMessageError)
    for name in ("ok-1", "ok-2", "race-winner", "inbox-1", "many"):
        assert not isinstance(results[name], BaseException), (name, results[name])
    log = await store.read_all()
    assert [e.position for e in log] == list(range(1, len(log) + 1))
    assert sorted(e.stream for e in log) == sorted(
        ["taken", "first", "ok-1", "ok-2", "ok-2", "race", "y", "m1", "m2"]
    )
    assert await store.consumer_position("proj") == 10
    assert [e.position for e in await store.read("ok-2")] == results["ok-2"]


async def _until_queued(store: SQLiteEventStore, n: int) -> None:
    """Let the new tasks run their first step: each puts its append on the writer's queue."""
    await asyncio.sleep(0)
    assert store._writer.queue.qsize() == n


async def test_a_caller_that_breaks_the_shared_transaction_fails_alone(
    store: SQLiteEventStore, gate: Gate
) -> None:
    gate.hold_next_commit()
    first = asyncio.ensure_future(store.append("first", [ev()]))
    await gate.wait_until_held()
    good = [asyncio.ensure_future(store.append(f"good-{i}", [ev()])) for i in range(5)]
    # Passes validation but no SQLite INTEGER can hold it: fails inside the transaction.
    bad_version = asyncio.ensure_future(
        store.append_many([AppendRequest("huge", [ev()], first_version=2**63)])
    )
    # A buffer that is not contiguous: the driver refuses to bind it.
    bad_buffer = asyncio.ensure_future(store.append("strided", [ev(memoryview(b"abcdef")[::2])]))  # type: ignore[arg-type]
    more = [asyncio.ensure_future(store.append(f"more-{i}", [ev()])) for i in range(5)]
    await _until_queued(store, 12)
    gate.release.set()
    await first
    with pytest.raises(EventSerializationError, match="could not be stored"):
        await bad_version
    with pytest.raises(EventSerializationError, match="could not be stored"):
        await bad_buffer
    for task in good + more:
        assert len(await task) == 1
    assert gate.groups[1] == 12
    log = await store.read_all()
    assert [e.position for e in log] == list(range(1, 12))
    assert {e.stream for e in log} == {"first"} | {f"good-{i}" for i in range(5)} | {
        f"more-{i}" for i in range(5)
    }


async def test_the_event_loop_runs_while_a_commit_is_held(
    store: SQLiteEventStore, gate: Gate
) -> None:
    await store.append("before", [ev()])
    gate.hold_next_commit()
    pending = asyncio.ensure_future(store.append("held", [ev()]))
    await gate.wait_until_held()
    # The writer is stuck inside a commit, yet the loop serves reads and other tasks.
    assert [e.stream for e in await store.read_all()] == ["before"]
    assert not pending.done()
    gate.release.set()
    assert await pending == [2]


async def test_a_locked_database_is_unavailable_and_nothing_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT", 0.05)
    store = await open_sqlite_store(f"sqlite:///{tmp_path / 'e.db'}")
    try:
        await store.append("a", [ev(b"kept")])
        other = sqlite3.connect(store.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreUnavailableError, match="locked"):
                await store.append("a", [ev(b"refused")], expected_version=1)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert [e.state for e in await store.read("a")] == [b"kept"]
        assert await store.append("a", [ev(b"next")], expected_version=1) == [2]
    finally:
        await store.close()


async def test_two_store_objects_on_one_file_see_each_others_commits(tmp_path: Path) -> None:
    # Two writers on one file (as two processes would be): neither may trust a stale cache.
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    one = await open_sqlite_store(url)
    two = await open_sqlite_store(url)
    try:
        await one.append("s", [ev()], expected_version=0)
        await two.append("s", [ev()], expected_version=1)
        with pytest.raises(ConcurrencyError):
            await one.append("s", [ev()], expected_version=1)
        assert await one.append("s", [ev()], expected_version=2) == [3]
        assert await two.append("t", [ev()]) == [4]
        assert [e.position for e in await two.read_all()] == [1, 2, 3, 4]
    finally:
        await one.close()
        await two.close()


async def test_many_concurrent_appenders_share_commits(store: SQLiteEventStore) -> None:
    groups: list[int] = []
    original = sqlite_module._Writer._commit_group

    def counting(self: Any, conn: sqlite3.Connection, jobs: list[Any]) -> Any:
        groups.append(len(jobs))
        return original(self, conn, jobs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sqlite_module._Writer, "_commit_group", counting)

        async def appender(i: int) -> None:
            for version in range(5):
                await store.append(f"s-{i}", [ev()], expected_version=version)

        await asyncio.gather(*(appender(i) for i in range(64)))
    assert sum(groups) == 64 * 5
    assert len(groups) < 64 * 5  # some commits carried several callers' appends
    for i in (0, 31, 63):
        assert [e.version for e in await store.read(f"s-{i}")] == [1, 2, 3, 4, 5]


async def test_a_crashed_writer_fails_appends_instead_of_hanging(
    store: SQLiteEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.append("a", [ev(b"kept")])

    def broken(self: Any, conn: sqlite3.Connection, jobs: list[Any]) -> Any:
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(sqlite_module._Writer, "_commit_group", broken)
    with pytest.raises(StoreUnavailableError, match="writer thread"):
        await store.append("a", [ev(b"lost")])
    with pytest.raises(StoreUnavailableError, match="open it again"):
        await store.append("a", [ev(b"refused")])
    await store.close()
    monkeypatch.undo()
    reopened = await open_sqlite_store(f"sqlite:///{store.path}")
    try:
        assert [e.state for e in await reopened.read("a")] == [b"kept"]
    finally:
        await reopened.close()


async def test_bounds_beyond_64_bits_read_like_no_bound(store: SQLiteEventStore) -> None:
    await store.append("a", [ev(), ev()])
    assert len(await store.read("a", to_version=2**70, limit=2**70)) == 2
    assert await store.read("a", from_version=2**70) == []
    assert len(await store.read_all(from_position=-(2**70), to_position=2**70)) == 2
    assert await store.read_all(from_position=2**70) == []
