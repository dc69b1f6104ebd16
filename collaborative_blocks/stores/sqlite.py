"""The SQLite event store (``sqlite+aiosqlite:///PATH``): the embedded default.

One file holds the log, snapshots, consumer positions and the inbox, in the tables of
:mod:`collaborative_blocks.stores.sql` (SQLAlchemy creates them; ``create_all`` is idempotent).

Writing: one dedicated writer thread owns one ``sqlite3`` connection (WAL, ``synchronous=FULL``
by default). Appends from any number of tasks go into a queue; the thread drains it and
**group-commits**: many callers' appends run in one transaction and one fsync, and each caller
still gets its own positions or its own error (expected versions, consumer positions and the
inbox are checked inside the transaction, before that caller writes anything). If the
transaction fails for an unexpected reason it is rolled back and every append in it is re-run
in a transaction of its own, so one bad caller never fails the others. Results travel back to
the caller's event loop with ``call_soon_threadsafe``: the event loop never waits on a commit.

Reading: SQLAlchemy Core statements, compiled once for the SQLite dialect, run on plain
``sqlite3`` reader connections in a small thread pool (WAL lets them read while the writer
commits).

URLs: ``sqlite+aiosqlite:///relative/path.db``, ``sqlite+aiosqlite:////absolute/path.db`` (and
the same with ``sqlite://``). The parent directory is created. ``?synchronous=NORMAL`` trades
durability of the last commits on power loss for speed (``FULL`` is the default; ``EXTRA`` and
``OFF`` are accepted too).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, unquote

from sqlalchemy import BigInteger, bindparam, func, or_, select
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.sql import ClauseElement

from collaborative_blocks.errors import (
    ConcurrencyError,
    ConfigurationError,
    CorruptRecordError,
    DuplicateMessageError,
    EventSerializationError,
    StoreClosedError,
    StoreError,
    StoreUnavailableError,
    TrackingConflictError,
)
from collaborative_blocks.stores import sql
from collaborative_blocks.stores.base import (
    AppendRequest,
    CommitSignal,
    CommitWaiter,
    EventStore,
    NewEvent,
    Snapshot,
    StoredEvent,
    StoreStats,
    StreamInfo,
    Tracking,
    validate_append,
    validate_request,
)

__all__ = ["SQLiteEventStore", "open_sqlite_store", "sqlite_path_from_url"]

SCHEMES: Final = ("sqlite+aiosqlite", "sqlite")
SYNCHRONOUS_MODES: Final = ("OFF", "NORMAL", "FULL", "EXTRA")
# How many queued appends one transaction may take: large enough that a burst of callers
# shares one fsync, small enough that the first caller's latency stays bounded.
MAX_GROUP: Final = 512
# How long a connection waits for another process's write lock before giving up (seconds).
BUSY_TIMEOUT: Final = 10.0
READER_THREADS: Final = 2
# Stream versions the writer remembers between transactions (then it starts over).
VERSION_CACHE_LIMIT: Final = 100_000
# SQLite's "no limit" and "no upper bound", so one compiled statement serves every call.
NO_LIMIT: Final = -1
MAX_INT64: Final = 2**63 - 1

T = TypeVar("T")


# -- URLs ----------------------------------------------------------------------------------


def sqlite_path_from_url(url: str) -> tuple[Path, str]:
    """The database file and the ``synchronous`` mode named by a SQLite store URL.

    Raises :class:`ConfigurationError` for anything that is not ``sqlite[+aiosqlite]:///PATH``.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ConfigurationError(
            f"{url!r} is not a SQLite store URL; use sqlite+aiosqlite:///relative/path.db or "
            "sqlite+aiosqlite:////absolute/path.db"
        )
    rest, _, query = rest.partition("?")
    if not rest.startswith("/") or rest in ("/", "/:memory:"):
        raise ConfigurationError(
            f"{url!r} names no database file; use sqlite+aiosqlite:///relative/path.db or "
            "sqlite+aiosqlite:////absolute/path.db (for a store that lives only in memory, "
            "use memory://)"
        )
    synchronous = "FULL"
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key != "synchronous":
            raise ConfigurationError(
                f"unknown option {key!r} in SQLite store URL {url!r}; the only option is "
                f"synchronous={'|'.join(SYNCHRONOUS_MODES)}"
            )
        if value.upper() not in SYNCHRONOUS_MODES:
            raise ConfigurationError(
                f"synchronous={value!r} in {url!r} is not one of {', '.join(SYNCHRONOUS_MODES)}"
            )
        synchronous = value.upper()
    return Path(unquote(rest[1:])), synchronous


# -- statements ----------------------------------------------------------------------------

_EVENT_COLUMNS = (
    sql.events.c.stream,
    sql.events.c.version,
    sql.events.c.position,
    sql.events.c.topic,
    sql.events.c.state,
)


@dataclass(frozen=True, slots=True)
class _Compiled:
    text: str
    defaults: dict[str, Any]

    def params(self, **values: Any) -> dict[str, Any]:
        return {**self.defaults, **values} if self.defaults else values


def _compile(statement: ClauseElement) -> _Compiled:
    compiled = statement.compile(dialect=sqlite_dialect.dialect(paramstyle="named"))
    # Parameters SQLAlchemy adds itself (an OFFSET of 0 next to a bound LIMIT) keep their value.
    defaults = {k: v for k, v in compiled.params.items() if v is not None}
    return _Compiled(str(compiled), defaults)


class _Statements:
    """Every read statement, built with SQLAlchemy Core and compiled once."""

    def __init__(self) -> None:
        e = sql.events.c
        # The stream is known: not fetching it saves a string per row on long replays.
        stream_range = (
            select(e.version, e.position, e.topic, e.state)
            .where(
                e.stream == bindparam("stream"),
                e.version >= bindparam("lo"),
                # "No upper bound" must not hide a row whose version is not an integer (SQLite
                # sorts text above every number): such a row has to surface as corrupt.
                or_(bindparam("hi", type_=BigInteger).is_(None), e.version <= bindparam("hi")),
            )
            .limit(bindparam("limit"))
        )
        self.read_forward = _compile(stream_range.order_by(e.version))
        self.read_backward = _compile(stream_range.order_by(e.version.desc()))
        self._log_range = select(*_EVENT_COLUMNS).where(
            e.position >= bindparam("lo"), e.position <= bindparam("hi")
        )
        self.read_all = _compile(self._log_range.order_by(e.position).limit(bindparam("limit")))
        self.max_position = _compile(select(func.max(e.position)))
        self.stream_version = _compile(
            select(func.max(e.version)).where(e.stream == bindparam("stream"))
        )
        streams = (
            select(e.stream, func.max(e.version), func.min(e.position), func.max(e.position))
            .where(
                e.stream >= bindparam("prefix"),
                func.substr(e.stream, 1, func.length(bindparam("prefix"))) == bindparam("prefix"),
            )
            .group_by(e.stream)
            .order_by(e.stream)
            .limit(bindparam("limit"))
        )
        self.streams = _compile(streams)
        self.counts = _compile(
            select(func.count(), func.count(e.stream.distinct()), func.max(e.position))
        )
        self.topics = _compile(select(e.topic, func.count()).group_by(e.topic))
        self.positions = _compile(
            select(sql.consumer_positions.c.consumer, sql.consumer_positions.c.position)
        )
        self.inbox_consumers = _compile(select(sql.inbox.c.consumer).distinct())
        self.consumer_position = _compile(
            select(sql.consumer_positions.c.position).where(
                sql.consumer_positions.c.consumer == bindparam("consumer")
            )
        )
        self.has_processed = _compile(
            select(sql.inbox.c.message_id).where(
                sql.inbox.c.consumer == bindparam("consumer"),
                sql.inbox.c.message_id == bindparam("message_id"),
            )
        )
        self.snapshot = _compile(
            select(
                sql.snapshots.c.stream,
                sql.snapshots.c.version,
                sql.snapshots.c.topic,
                sql.snapshots.c.state,
            ).where(sql.snapshots.c.stream == bindparam("stream"))
        )
        self.probe = _compile(select(*_EVENT_COLUMNS).limit(0))

    @functools.lru_cache(maxsize=32)  # noqa: B019 (one instance lives as long as the process)
    def read_all_topics(self, count: int) -> _Compiled:
        topic = sql.events.c.topic
        statement = (
            self._log_range.where(topic.in_([bindparam(f"t{i}") for i in range(count)]))
            .order_by(sql.events.c.position)
            .limit(bindparam("limit"))
        )
        return _compile(statement)


@functools.cache
def _statements() -> _Statements:
    return _Statements()


# The writer's statements: plain SQL on the raw connection, the hottest path in the store.
_E, _C, _I, _S = sql.events.name, sql.consumer_positions.name, sql.inbox.name, sql.snapshots.name
_W_MAX_POSITION = f"SELECT max(position) FROM {_E}"
_W_STREAM_VERSION = f"SELECT max(version) FROM {_E} WHERE stream = ?"
_W_INSERT = f"INSERT INTO {_E} (position, stream, version, topic, state) VALUES (?, ?, ?, ?, ?)"
_W_GET_CONSUMER = f"SELECT position FROM {_C} WHERE consumer = ?"
_W_SET_CONSUMER = (
    f"INSERT INTO {_C} (consumer, position) VALUES (?, ?) "
    "ON CONFLICT (consumer) DO UPDATE SET position = excluded.position"
)
_W_IN_INBOX = f"SELECT 1 FROM {_I} WHERE consumer = ? AND message_id = ?"
_W_ADD_INBOX = f"INSERT INTO {_I} (consumer, message_id, position) VALUES (?, ?, ?)"
_W_SNAPSHOT = (
    f"INSERT INTO {_S} (stream, version, topic, state) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (stream) DO UPDATE SET version = excluded.version, topic = excluded.topic, "
    f"state = excluded.state WHERE excluded.version >= {_S}.version"
)


def _int64(value: int) -> int:
    """Clamp a bound into SQLite's integer range: nothing is stored beyond it anyway."""
    return max(-MAX_INT64, min(value, MAX_INT64))


def _limit(limit: int | None) -> int:
    return NO_LIMIT if limit is None else _int64(max(limit, 0))


# -- rows ----------------------------------------------------------------------------------


def _to_events(rows: list[Any], path: Path) -> list[StoredEvent]:
    return _checked([StoredEvent(*row) for row in rows], path)


def _to_stream_events(stream: str, rows: list[Any], path: Path) -> list[StoredEvent]:
    return _checked([StoredEvent(stream, v, p, t, s) for v, p, t, s in rows], path)


def _checked(events: list[StoredEvent], path: Path) -> list[StoredEvent]:
    for event in events:
        # One pass of exact type checks: a row edited by hand (or by another program) must
        # fail loudly here rather than as a confusing error deep inside a Mapper.
        if (
            type(event.state) is not bytes
            or type(event.version) is not int
            or type(event.position) is not int
            or type(event.topic) is not str
            or type(event.stream) is not str
        ):
            raise _corrupt(event, path)
    return events


def _corrupt(event: StoredEvent, path: Path) -> CorruptRecordError:
    return CorruptRecordError(
        f"the event at position {event.position!r} (stream {event.stream!r}, version "
        f"{event.version!r}) in {path} does not have the shape of a stored event: stream and "
        f"topic must be text, version and position integers, state bytes; got state of type "
        f"{type(event.state).__name__}, topic of type {type(event.topic).__name__}. The row was "
        "changed outside the event store; restore it from a backup. Nothing was modified."
    )


# -- the writer's jobs ---------------------------------------------------------------------


@dataclass(slots=True)
class _Job:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


@dataclass(slots=True)
class _AppendJob(_Job):
    requests: Sequence[AppendRequest]
    tracking: Tracking | None


@dataclass(slots=True)
class _SnapshotJob(_Job):
    snapshot: Snapshot


@dataclass(slots=True)
class _StopJob(_Job):
    pass


@dataclass(slots=True)
class _Outcome:
    job: _Job
    value: Any = None
    error: BaseException | None = None


def _deliver(outcomes: list[_Outcome], signal: CommitSignal | None) -> None:
    """Runs on the caller's event loop: hand each caller its own result or error."""
    for outcome in outcomes:
        future = outcome.job.future
        if future.done():  # the caller was cancelled; its append may still have committed
            continue
        if outcome.error is not None:
            future.set_exception(outcome.error)
        else:
            future.set_result(outcome.value)
    if signal is not None:
        signal.notify()


class _UnexpectedError(Exception):
    """A database error in the middle of a group: the group is retried one by one."""


class _Writer:
    """The thread that owns the write connection and group-commits queued appends."""

    def __init__(self, path: Path, synchronous: str, signal: CommitSignal) -> None:
        self.path = path
        self.synchronous = synchronous
        self.signal = signal
        self.queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.thread = threading.Thread(
            target=self._run, name=f"cb-sqlite-writer:{path.name}", daemon=True
        )
        self._conn: sqlite3.Connection | None = None
        self.crashed: StoreError | None = None
        self._in_flight: list[_Job] = []
        self._versions: dict[str, int | None] = {}
        self._last_position: int | None = None
        self._data_version: int | None = None
        self._ready: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._ready = (loop, ready)
        self.thread.start()
        try:
            await ready
        except BaseException:
            await asyncio.to_thread(self.thread.join)
            raise

    # -- thread side -----------------------------------------------------------------------

    def _run(self) -> None:
        assert self._ready is not None
        loop, ready = self._ready
        try:
            self._conn = _open_connection(self.path, self.synchronous, writer=True)
        except BaseException as exc:  # reported to open_sqlite_store, which re-raises it
            loop.call_soon_threadsafe(_set_exception, ready, exc)
            return
        loop.call_soon_threadsafe(_set_result, ready, None)
        try:
            self._serve(self._conn)
        except BaseException as exc:  # a bug, not a database error: those are per request
            self.crashed = StoreUnavailableError(
                f"the writer thread of the SQLite event store {self.path} stopped: {exc!r}. "
                "Appends already acknowledged are stored; close the store and open it again."
            )
            self._send([_Outcome(job, error=self.crashed) for job in self._in_flight], False)
            self._fail_waiting(self.crashed)
        finally:
            self._conn.close()

    def _fail_waiting(self, error: StoreError) -> None:
        # Keep answering until close(), so that no append submitted in the meantime waits
        # forever (checking `crashed` and queueing are not atomic with this thread).
        while True:
            job = self.queue.get()
            if isinstance(job, _StopJob):
                self._send([_Outcome(job)], False)
                return
            self._send([_Outcome(job, error=error)], False)

    def _serve(self, conn: sqlite3.Connection) -> None:
        get_nowait = self.queue.get_nowait
        while True:
            group: list[_Job] = [self.queue.get()]
            self._in_flight = group
            while len(group) < MAX_GROUP:
                try:
                    group.append(get_nowait())
                except queue.Empty:
                    break
            work = [job for job in group if not isinstance(job, _StopJob)]
            stops = [job for job in group if isinstance(job, _StopJob)]
            if work:
                outcomes, wrote = self._commit_group(conn, work)
                self._send(outcomes, wrote)
            if stops:
                # close() refuses new work before it queues the stop, so nothing follows it.
                self._send([_Outcome(stop) for stop in stops], False)
                return

    def _send(self, outcomes: list[_Outcome], wrote: bool) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome.job.loop, []).append(outcome)
        signal_loop = self.signal._loop  # the loop the store was opened on
        notified = False
        for loop, items in by_loop.items():
            notify = wrote and loop is signal_loop
            notified = notified or notify
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_deliver, items, self.signal if notify else None)
        if wrote and not notified:
            self.signal.notify_threadsafe()

    def _commit_group(
        self, conn: sqlite3.Connection, jobs: list[_Job]
    ) -> tuple[list[_Outcome], bool]:
        try:
            return self._transaction(conn, jobs)
        except _UnexpectedError as exc:
            if len(jobs) == 1:
                return [_Outcome(jobs[0], error=self._error_for(exc.__cause__))], False
        # Somebody's append broke the shared transaction (or the commit failed): re-run each
        # on its own so that only the one at fault gets the error.
        outcomes: list[_Outcome] = []
        wrote = False
        for job in jobs:
            try:
                single, single_wrote = self._transaction(conn, [job])
            except _UnexpectedError as exc:
                single, single_wrote = (
                    [_Outcome(job, error=self._error_for(exc.__cause__))],
                    False,
                )
            outcomes += single
            wrote = wrote or single_wrote
        return outcomes, wrote

    def _error_for(self, exc: BaseException | None) -> StoreError:
        """The error one caller gets when its append, run alone, still failed."""
        if isinstance(
            exc,
            sqlite3.InterfaceError
            | sqlite3.ProgrammingError
            | ValueError
            | TypeError
            | OverflowError
            | BufferError,
        ):
            # The driver refused a value that passed validation (a version beyond 64 bits,
            # a non-contiguous memoryview...): the caller's input, not the database.
            return EventSerializationError(
                f"this append could not be stored in {self.path}: {_text(exc)}. Nothing of it "
                "was written; fix the value (versions fit in 64 bits, state is plain bytes)."
            )
        return StoreUnavailableError(
            f"the SQLite event store {self.path} could not commit: {_text(exc)}. Nothing of "
            "this append was written; check the disk (space, permissions) and that no other "
            "process holds the database locked, then retry."
        )

    def _transaction(
        self, conn: sqlite3.Connection, jobs: list[_Job]
    ) -> tuple[list[_Outcome], bool]:
        try:
            conn.execute("BEGIN IMMEDIATE")
            # The caches below hold committed state; data_version changes exactly when
            # another connection (another process) committed, which makes them stale.
            data_version = conn.execute("PRAGMA data_version").fetchone()[0]
            if data_version != self._data_version or self._last_position is None:
                self._versions.clear()
                self._last_position = conn.execute(_W_MAX_POSITION).fetchone()[0] or 0
                self._data_version = data_version
            first_position = next_position = self._last_position + 1
            pending: dict[str, int | None] = {}
            outcomes: list[_Outcome] = []
            for job in jobs:
                if isinstance(job, _AppendJob):
                    try:
                        positions, next_position = _apply_append(
                            conn, job, next_position, pending, self._versions
                        )
                    except (ConcurrencyError, TrackingConflictError, DuplicateMessageError) as e:
                        # Raised before this job wrote anything, so the others are unaffected.
                        outcomes.append(_Outcome(job, error=e))
                    else:
                        outcomes.append(_Outcome(job, value=positions))
                elif isinstance(job, _SnapshotJob):
                    s = job.snapshot
                    conn.execute(_W_SNAPSHOT, (s.stream, s.version, s.topic, bytes(s.state)))
                    outcomes.append(_Outcome(job))
            conn.execute("COMMIT")
        except Exception as exc:
            # Whether a failed COMMIT left anything behind is not ours to guess: re-read.
            self._last_position = None
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise _UnexpectedError() from exc
        self._last_position = next_position - 1
        if len(self._versions) > VERSION_CACHE_LIMIT:
            self._versions.clear()
        self._versions.update(pending)
        return outcomes, next_position > first_position


def _apply_append(
    conn: sqlite3.Connection,
    job: _AppendJob,
    next_position: int,
    pending: dict[str, int | None],
    committed: dict[str, int | None],
) -> tuple[list[list[int]], int]:
    """Check, then write, one caller's append inside the open transaction.

    Every check comes before the first write, so a refused append leaves no trace.
    ``pending`` holds the versions this transaction wrote so far, ``committed`` the cached
    committed versions (None: the stream has no events); both are updated in place.
    """
    planned: dict[str, int] = {}
    plan: list[tuple[AppendRequest, int]] = []
    for request in job.requests:
        stream = request.stream
        last: int | None
        if stream in planned:
            last = planned[stream]
        elif stream in pending:
            last = pending[stream]
        elif stream in committed:
            last = committed[stream]
        else:
            # Nothing of this stream was written in this transaction: this is committed state.
            last = conn.execute(_W_STREAM_VERSION, (stream,)).fetchone()[0]
            committed[stream] = last
        current = 0 if last is None else last
        if request.expected_version is not None and request.expected_version != current:
            raise ConcurrencyError(stream, request.expected_version, current)
        if request.first_version is not None:
            if last is not None and request.first_version <= current:
                raise ConcurrencyError(
                    stream, request.first_version - 1, current, first_version=request.first_version
                )
            current = request.first_version - 1
        plan.append((request, current + 1))
        if request.events:
            planned[stream] = current + len(request.events)
    tracking = job.tracking
    if tracking is not None:
        if tracking.position is not None:
            row = conn.execute(_W_GET_CONSUMER, (tracking.consumer,)).fetchone()
            if row is not None and tracking.position <= row[0]:
                raise TrackingConflictError(tracking.consumer, tracking.position, row[0])
        if (
            tracking.message_id is not None
            and conn.execute(_W_IN_INBOX, (tracking.consumer, tracking.message_id)).fetchone()
        ):
            raise DuplicateMessageError(tracking.consumer, tracking.message_id)
    results: list[list[int]] = []
    for request, version in plan:
        events = request.events
        if len(events) == 1:
            event = events[0]
            conn.execute(
                _W_INSERT, (next_position, request.stream, version, event.topic, event.state)
            )
            results.append([next_position])
            next_position += 1
        elif events:
            stream = request.stream
            start = next_position
            conn.executemany(
                _W_INSERT,
                [
                    (start + i, stream, version + i, event.topic, event.state)
                    for i, event in enumerate(events)
                ],
            )
            next_position = start + len(events)
            results.append(list(range(start, next_position)))
        else:
            results.append([])
    if tracking is not None:
        if tracking.position is not None:
            conn.execute(_W_SET_CONSUMER, (tracking.consumer, tracking.position))
        if tracking.message_id is not None:
            conn.execute(_W_ADD_INBOX, (tracking.consumer, tracking.message_id, tracking.position))
    pending.update(planned)
    return results, next_position


def _set_result(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


# -- connections ---------------------------------------------------------------------------


def _text(exc: BaseException | None) -> str:
    return str(exc).rstrip(".")


def _what_to_do(path: Path) -> str:
    return (
        f"Check that {path} is a Collaborative Blocks SQLite event store (not another file), "
        "that its directory exists and is writable, and that the disk is healthy; restore the "
        "file from a backup or choose a new path. The file was not modified."
    )


def _open_connection(path: Path, synchronous: str, *, writer: bool) -> sqlite3.Connection:
    """A configured connection; errors become :class:`StoreUnavailableError`."""
    try:
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise StoreUnavailableError(
            f"cannot open the SQLite event store {path}: {_text(exc)}. {_what_to_do(path)}"
        ) from exc
    try:
        if writer:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode}, not wal")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                (sql.events.name,),
            ).fetchone()
            if exists:
                # A table of that name from something else: refuse before adding anything.
                _probe(conn)
            _create_schema(path)
        else:
            conn.execute("PRAGMA query_only=ON")
        _probe(conn)
    except Exception as exc:
        conn.close()
        if isinstance(exc, StoreError):
            raise
        raise StoreUnavailableError(
            f"cannot use {path} as a SQLite event store: {_text(exc)}. {_what_to_do(path)}"
        ) from exc
    return conn


def _probe(conn: sqlite3.Connection) -> None:
    probe = _statements().probe
    conn.execute(probe.text, probe.params()).fetchall()


def _create_schema(path: Path) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine(f"sqlite:///{path}", poolclass=NullPool)
    try:
        try:
            sql.metadata.create_all(engine)
        except Exception:
            # Another process may have created the tables between the check and the CREATE.
            sql.metadata.create_all(engine)
    finally:
        engine.dispose()


class _Readers:
    """A small pool of threads, each with its own read-only connection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.executor = ThreadPoolExecutor(
            max_workers=READER_THREADS, thread_name_prefix=f"cb-sqlite-reader:{path.name}"
        )

    def connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _open_connection(self.path, "FULL", writer=False)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()


# -- the store -----------------------------------------------------------------------------


#: How long an idle subscriber waits before looking for commits from other processes. A local
#: commit wakes it at once; this only bounds how late another process's commit is seen.
CROSS_PROCESS_POLL_SECONDS = 1.0


class SQLiteEventStore(EventStore):
    """The event store in one SQLite file. Open it with :func:`open_sqlite_store`.

    Subscriptions wake at once on commits made through this store object; commits by other
    processes (or other store objects) on the same file are picked up within
    ``CROSS_PROCESS_POLL_SECONDS``, since SQLite has no notification channel between processes.

    Cancelling a task that awaits an append does not withdraw the append: once queued it
    commits (or fails) with its group; only the result is not delivered. Read the stream
    (or use ``expected_version`` on the retry) to find out.
    """

    def __init__(self, url: str, path: Path, synchronous: str) -> None:
        self.url = url
        self.path = path
        self.synchronous = synchronous
        self._signal = CommitSignal(poll_interval=CROSS_PROCESS_POLL_SECONDS)
        self._writer = _Writer(path, synchronous, self._signal)
        self._readers = _Readers(path)
        self._closed = False
        self._close_task: asyncio.Future[None] | None = None

    async def _start(self) -> None:
        self._signal.bind(asyncio.get_running_loop())
        try:
            await self._writer.start()
        except BaseException:
            self._closed = True
            self._readers.close()
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"the SQLite event store {self.path} is closed; open a new one")
        if self._writer.crashed is not None:
            raise self._writer.crashed

    # -- writing ---------------------------------------------------------------------------

    async def append(
        self,
        stream: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None = None,
        tracking: Tracking | None = None,
    ) -> list[int]:
        # The common call, without the generic path's extra layers (same semantics).
        self._check_open()
        validate_append(stream, events, expected_version)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[list[int]]] = loop.create_future()
        request = AppendRequest(stream, events, expected_version)
        self._writer.queue.put(_AppendJob(loop, future, (request,), tracking))
        return (await future)[0]

    async def append_many(
        self, requests: Sequence[AppendRequest], *, tracking: Tracking | None = None
    ) -> list[list[int]]:
        self._check_open()
        requests = tuple(requests)
        for request in requests:
            validate_request(request)
        if not requests and tracking is None:
            return []
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[list[int]]] = loop.create_future()
        self._writer.queue.put(_AppendJob(loop, future, requests, tracking))
        return await future

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        self._check_open()
        _validate_snapshot(snapshot)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._writer.queue.put(_SnapshotJob(loop, future, snapshot))
        await future

    # -- reading ---------------------------------------------------------------------------

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        self._check_open()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._readers.executor, self._run_read, work)
        except RuntimeError as exc:  # the executor shut down under us: close() won the race
            if self._closed:
                raise StoreClosedError(
                    f"the SQLite event store {self.path} is closed; open a new one"
                ) from exc
            raise

    def _run_read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._readers.connection()
        try:
            return work(conn)
        except sqlite3.DataError as exc:
            raise CorruptRecordError(
                f"a row in {self.path} cannot be read back: {_text(exc)}. {_what_to_do(self.path)}"
            ) from exc
        except sqlite3.OperationalError as exc:
            if "decode" in str(exc):  # text that is not UTF-8: written by something else
                raise CorruptRecordError(
                    f"a row in {self.path} holds text that is not UTF-8: {_text(exc)}. "
                    "The row was changed outside the event store; restore it from a backup."
                ) from exc
            raise StoreUnavailableError(
                f"reading the SQLite event store {self.path} failed: {_text(exc)}. "
                f"{_what_to_do(self.path)}"
            ) from exc
        except sqlite3.Error as exc:
            raise StoreUnavailableError(
                f"reading the SQLite event store {self.path} failed: {_text(exc)}. "
                f"{_what_to_do(self.path)}"
            ) from exc

    async def read(
        self,
        stream: str,
        *,
        from_version: int = 0,
        to_version: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
    ) -> list[StoredEvent]:
        statements = _statements()
        statement = statements.read_backward if backwards else statements.read_forward
        params = statement.params(
            stream=stream,
            lo=_int64(from_version),
            hi=None if to_version is None else _int64(to_version),
            limit=_limit(limit),
        )
        path = self.path
        return await self._read(
            lambda conn: _to_stream_events(
                stream, conn.execute(statement.text, params).fetchall(), path
            )
        )

    async def read_all(
        self,
        *,
        from_position: int = 1,
        to_position: int | None = None,
        limit: int | None = None,
        topics: Sequence[str] = (),
    ) -> list[StoredEvent]:
        statements = _statements()
        values: dict[str, Any] = {
            "lo": _int64(from_position),
            "hi": MAX_INT64 if to_position is None else _int64(to_position),
            "limit": _limit(limit),
        }
        if topics:
            wanted = sorted(set(topics))
            statement = statements.read_all_topics(len(wanted))
            values.update({f"t{i}": topic for i, topic in enumerate(wanted)})
        else:
            statement = statements.read_all
        params = statement.params(**values)
        path = self.path
        return await self._read(
            lambda conn: _to_events(conn.execute(statement.text, params).fetchall(), path)
        )

    async def max_position(self) -> int:
        statement = _statements().max_position
        row = await self._read(lambda conn: conn.execute(statement.text).fetchone())
        return int(row[0] or 0)

    async def stream_version(self, stream: str) -> int:
        statement = _statements().stream_version
        params = statement.params(stream=stream)
        row = await self._read(lambda conn: conn.execute(statement.text, params).fetchone())
        return int(row[0] or 0)

    async def streams(self, *, prefix: str = "", limit: int = 100) -> list[StreamInfo]:
        statement = _statements().streams
        params = statement.params(prefix=prefix, limit=_limit(limit))
        rows = await self._read(lambda conn: conn.execute(statement.text, params).fetchall())
        return [StreamInfo(str(s), int(v), int(lo), int(hi)) for s, v, lo, hi in rows]

    async def stats(self) -> StoreStats:
        s = _statements()

        def work(conn: sqlite3.Connection) -> StoreStats:
            # One read transaction, so the numbers agree with each other.
            conn.execute("BEGIN")
            try:
                events, streams, max_position = conn.execute(s.counts.text).fetchone()
                topics = dict(conn.execute(s.topics.text).fetchall())
                consumers: dict[str, int | None] = {
                    c: None for (c,) in conn.execute(s.inbox_consumers.text).fetchall()
                }
                consumers.update(conn.execute(s.positions.text).fetchall())
            finally:
                conn.execute("COMMIT")
            return StoreStats(int(events), int(streams), int(max_position or 0), topics, consumers)

        return await self._read(work)

    def _new_events_waiter(self) -> CommitWaiter:
        return self._signal.waiter()

    # -- tracking and snapshots ------------------------------------------------------------

    async def consumer_position(self, consumer: str) -> int | None:
        statement = _statements().consumer_position
        params = statement.params(consumer=consumer)
        row = await self._read(lambda conn: conn.execute(statement.text, params).fetchone())
        return None if row is None else int(row[0])

    async def has_processed(self, consumer: str, message_id: str) -> bool:
        statement = _statements().has_processed
        params = statement.params(consumer=consumer, message_id=message_id)
        row = await self._read(lambda conn: conn.execute(statement.text, params).fetchone())
        return row is not None

    async def latest_snapshot(self, stream: str) -> Snapshot | None:
        statement = _statements().snapshot
        params = statement.params(stream=stream)
        row = await self._read(lambda conn: conn.execute(statement.text, params).fetchone())
        if row is None:
            return None
        snapshot = Snapshot(*row)
        if type(snapshot.state) is not bytes or type(snapshot.version) is not int:
            raise CorruptRecordError(
                f"the snapshot of stream {stream!r} in {self.path} does not have the shape of "
                f"a snapshot (state {type(snapshot.state).__name__}, version "
                f"{type(snapshot.version).__name__}); delete that snapshot row so the stream "
                "loads by replaying its events."
            )
        return snapshot

    # -- lifecycle -------------------------------------------------------------------------

    async def close(self) -> None:
        """Finish every append already submitted, then stop the writer and the readers.

        Live subscriptions end with :class:`StoreClosedError`. Closing twice is harmless.
        """
        if self._close_task is None:
            self._closed = True
            self._close_task = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._close_task)

    async def _shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self._writer.thread.is_alive():
                stopped: asyncio.Future[None] = loop.create_future()
                self._writer.queue.put(_StopJob(loop, stopped))
                with contextlib.suppress(StoreError):  # the writer crashed meanwhile
                    await stopped
                # The last connection to close checkpoints the WAL: not on the event loop.
                await asyncio.to_thread(self._writer.thread.join)
            await asyncio.to_thread(self._readers.close)
        finally:
            self._signal.notify()


def _validate_snapshot(snapshot: Snapshot) -> None:
    if not isinstance(snapshot, Snapshot):
        raise EventSerializationError(f"expected a Snapshot, got {type(snapshot).__name__}")
    if not isinstance(snapshot.stream, str) or not snapshot.stream:
        raise EventSerializationError(
            f"Snapshot.stream must be a non-empty string, got {snapshot.stream!r}"
        )
    if not isinstance(snapshot.version, int) or snapshot.version < 0:
        raise EventSerializationError(
            f"Snapshot.version must be an int >= 0, got {snapshot.version!r}"
        )
    if not isinstance(snapshot.topic, str) or not snapshot.topic:
        raise EventSerializationError("Snapshot.topic must be a non-empty string")
    if not isinstance(snapshot.state, bytes | bytearray | memoryview):
        raise EventSerializationError(
            f"Snapshot.state must be bytes, got {type(snapshot.state).__name__}; encode it first"
        )


async def open_sqlite_store(url: str) -> SQLiteEventStore:
    """Open (creating if needed) the SQLite event store at ``url``.

    ``sqlite+aiosqlite:///relative/path.db`` or ``sqlite+aiosqlite:////absolute/path.db``
    (``sqlite://`` works too); the parent directory is created. Raises
    :class:`ConfigurationError` for a malformed URL and :class:`StoreUnavailableError` when
    the file cannot be opened as an event store (unreadable, not a database, corrupt); such a
    file is left as it was.
    """
    path, synchronous = sqlite_path_from_url(url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreUnavailableError(
            f"cannot create the directory {path.parent} for the SQLite event store: {_text(exc)}. "
            "Choose a path in a writable directory."
        ) from exc
    if path.is_dir():
        raise StoreUnavailableError(
            f"{path} is a directory, not a SQLite event store file; add a file name, e.g. "
            f"{path / 'events.db'}"
        )
    store = SQLiteEventStore(url, path, synchronous)
    await store._start()
    return store
