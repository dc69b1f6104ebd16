"""The PostgreSQL event store (``postgresql+asyncpg://USER@HOST:PORT/DB``), on asyncpg.

```python
from collaborative_blocks.stores.postgres import open_postgres_store
store = await open_postgres_store("postgresql+asyncpg://postgres@127.0.0.1:5432/app")
```

``postgresql://`` and ``postgres://`` URLs work too; query parameters that asyncpg understands
(``sslmode``, ``connect_timeout``, ...) are passed on. The schema is the shared one of
:mod:`collaborative_blocks.stores.sql`, created if missing (idempotent, and safe when several
processes start at once).

How it works (the reasoning is in ``docs/postgresql.md``):

- **Group commit.** Every ``append``/``append_many`` goes to one writer task per store object,
  which puts all the calls waiting at that moment into one transaction. Expected versions,
  consumer positions and inbox ids are checked inside the transaction before anything is
  inserted, caller by caller, so each caller gets its own positions or its own error. If the
  database rejects the batch for another reason, each call is retried alone.
- **Global order without a table lock.** Each batch transaction first takes the
  transaction-level advisory lock ``pg_advisory_xact_lock(APPEND_LOCK_KEY)``; positions come
  from the table's sequence while that lock is held, and the lock is released only after the
  commit is visible. So positions become visible in increasing order, across processes: a
  reader of ``position > last_seen`` never skips a row that commits late. Readers take no
  lock and are never blocked.
- **Live subscriptions across processes.** The batch transaction sends
  ``NOTIFY cb_events, '<max position>'``; each store keeps one ``LISTEN`` connection (opened by
  the first ``subscribe``) that wakes its subscribers, and subscribers also poll every
  ``poll_interval`` seconds, so a lost notification only delays, never loses, an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import asyncpg.exceptions
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex, CreateTable

from collaborative_blocks.core.clock import Clock, SystemClock
from collaborative_blocks.errors import (
    ConfigurationError,
    CorruptRecordError,
    EventSerializationError,
    StoreClosedError,
    StoreError,
    StoreUnavailableError,
)
from collaborative_blocks.stores import sql
from collaborative_blocks.stores._pg_batch import (
    BatchPlan,
    CommittedState,
    PendingAppend,
    plan_batch,
)
from collaborative_blocks.stores.base import (
    AppendRequest,
    CommitSignal,
    CommitWaiter,
    EventStore,
    Snapshot,
    StoredEvent,
    StoreStats,
    StreamInfo,
    Tracking,
    validate_request,
)

__all__ = [
    "APPEND_LOCK_KEY",
    "NOTIFY_CHANNEL",
    "PostgresEventStore",
    "PostgresLocation",
    "open_postgres_store",
    "parse_postgres_url",
]

#: Key of the transaction-level advisory lock every appending transaction takes before it
#: draws positions (the bytes of ``b"cb_event"``). Anything else that inserts into
#: ``cb_events`` must take it too, or readers may skip its rows.
APPEND_LOCK_KEY = int.from_bytes(b"cb_event", "big")
#: Key of the advisory lock that serialises schema creation between starting processes.
SCHEMA_LOCK_KEY = int.from_bytes(b"cb_schem", "big")
#: The channel appends NOTIFY on; the payload is the highest position of the transaction.
NOTIFY_CHANNEL = "cb_events"

_SCHEMES = ("postgresql+asyncpg", "postgresql", "postgres")
_MAX_BATCH_CALLERS = 1000
_MAX_BATCH_EVENTS = 10_000
_MAX_KEY_LENGTH = 255
_SUBSCRIBE_RETRIES = 8

# What a lost or refused connection looks like, as opposed to PostgreSQL rejecting a statement.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)

_SQL_VERSIONS = """
SELECT s.stream,
       (SELECT e.version FROM cb_events AS e
         WHERE e.stream = s.stream ORDER BY e.version DESC LIMIT 1)
  FROM unnest($1::varchar[]) AS s(stream)
"""
_SQL_INSERT_EVENTS = """
INSERT INTO cb_events (stream, version, topic, state)
SELECT * FROM unnest($1::varchar[], $2::bigint[], $3::text[], $4::bytea[])
RETURNING position
"""
_SQL_CONSUMER_POSITIONS = (
    "SELECT consumer, position FROM cb_consumer_positions WHERE consumer = ANY($1::varchar[])"
)
_SQL_INBOX_HITS = """
SELECT i.consumer, i.message_id
  FROM cb_inbox AS i
  JOIN unnest($1::varchar[], $2::varchar[]) AS k(consumer, message_id)
    ON i.consumer = k.consumer AND i.message_id = k.message_id
"""
_SQL_UPSERT_POSITIONS = """
INSERT INTO cb_consumer_positions (consumer, position)
SELECT * FROM unnest($1::varchar[], $2::bigint[])
ON CONFLICT (consumer) DO UPDATE SET position = EXCLUDED.position
"""
_SQL_INSERT_INBOX = """
INSERT INTO cb_inbox (consumer, message_id, position)
SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::bigint[])
"""
_EVENT_COLUMNS = "position, stream, version, topic, state"
_SQL_READ = f"""
SELECT {_EVENT_COLUMNS} FROM cb_events
 WHERE stream = $1 AND version >= $2 AND version <= $3
 ORDER BY version {{direction}} LIMIT $4
"""
_SQL_READ_FORWARD = _SQL_READ.format(direction="ASC")
_SQL_READ_BACKWARD = _SQL_READ.format(direction="DESC")
_SQL_READ_ALL = f"""
SELECT {_EVENT_COLUMNS} FROM cb_events
 WHERE position >= $1 AND position <= $2
 ORDER BY position LIMIT $3
"""
_SQL_READ_ALL_TOPICS = f"""
SELECT {_EVENT_COLUMNS} FROM cb_events
 WHERE position >= $1 AND position <= $2 AND topic = ANY($4::text[])
 ORDER BY position LIMIT $3
"""
_SQL_STREAMS = """
SELECT stream, max(version), min(position), max(position) FROM cb_events
 WHERE starts_with(stream, $1)
 GROUP BY stream ORDER BY stream COLLATE "C" LIMIT $2
"""
_SQL_UPSERT_SNAPSHOT = """
INSERT INTO cb_snapshots (stream, version, topic, state) VALUES ($1, $2, $3, $4)
ON CONFLICT (stream) DO UPDATE
   SET version = EXCLUDED.version, topic = EXCLUDED.topic, state = EXCLUDED.state
 WHERE cb_snapshots.version <= EXCLUDED.version
"""
_BIGINT_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class PostgresLocation:
    """Where a PostgreSQL URL points, for connecting (``dsn``) and for messages (the rest)."""

    dsn: str
    display_url: str
    host: str
    port: int
    database: str
    user: str
    #: Store options given as URL query parameters (None when absent).
    poll_interval: float | None = None
    pool_size: int | None = None


def parse_postgres_url(url: str) -> PostgresLocation:
    """Split a ``postgresql+asyncpg://``, ``postgresql://`` or ``postgres://`` URL.

    The query parameters ``poll_interval`` (seconds) and ``pool_size`` configure the store and
    are removed from the DSN; every other parameter is asyncpg's. Raises
    :class:`~collaborative_blocks.errors.ConfigurationError` for another scheme, a malformed
    port or a bad store option.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise ConfigurationError(
            f"not a PostgreSQL URL: {_redact(url)!r}; use "
            "postgresql+asyncpg://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
        )
    parts = urllib.parse.urlsplit(f"postgresql://{rest}")
    try:
        port = parts.port or 5432
    except ValueError as error:
        raise ConfigurationError(
            f"the port in {_redact(url)!r} is not a number from 1 to 65535 ({error})"
        ) from None
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    options = {key: value for key, value in query if key in _STORE_OPTIONS}
    driver_query = [(key, value) for key, value in query if key not in _STORE_OPTIONS]
    user = urllib.parse.unquote(parts.username or "") or "(default user)"
    database = urllib.parse.unquote(parts.path.lstrip("/")) or user
    return PostgresLocation(
        dsn=urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(driver_query))),
        display_url=_redact(url),
        host=parts.hostname or "localhost",
        port=port,
        database=database,
        user=user,
        poll_interval=_url_option(options, "poll_interval", float, url),
        pool_size=_url_option(options, "pool_size", int, url),
    )


_STORE_OPTIONS = ("poll_interval", "pool_size")


_Number = TypeVar("_Number", int, float)


def _url_option(
    options: dict[str, str], name: str, kind: type[_Number], url: str
) -> _Number | None:
    if name not in options:
        return None
    try:
        value = kind(options[name])
    except ValueError:
        value = None
    if value is None or value <= 0:
        raise ConfigurationError(
            f"{name}={options[name]!r} in {_redact(url)!r} must be a number > 0"
            + (" (seconds)" if name == "poll_interval" else " (reader connections)")
        )
    return value


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc_end = len(rest)
    for stop in "/?#":
        index = rest.find(stop)
        if index != -1:
            netloc_end = min(netloc_end, index)
    netloc, tail = rest[:netloc_end], rest[netloc_end:]
    if "@" not in netloc:
        return url
    credentials, host = netloc.rsplit("@", 1)
    if ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}{tail}"


async def open_postgres_store(
    url: str,
    *,
    clock: Clock | None = None,
    poll_interval: float | None = None,
    pool_size: int | None = None,
    connect_timeout: float = 10.0,
) -> PostgresEventStore:
    """Connect to PostgreSQL at ``url``, create the schema if missing, return a ready store.

    ``poll_interval`` (default 1 second) bounds how late a subscriber notices a commit whose
    notification was lost; ``pool_size`` (default 5) is the number of reader connections (the
    writer and the listener have one each). Both can also come from the URL
    (``...?poll_interval=0.5&pool_size=10``); keyword arguments win. ``clock`` drives the
    reconnect back-off. Raises :class:`~collaborative_blocks.errors.StoreUnavailableError`
    naming the host, port and database (never the password) when the server cannot be
    reached or the database does not exist, and
    :class:`~collaborative_blocks.errors.ConfigurationError` for a malformed URL or option.
    """
    location = parse_postgres_url(url)
    if poll_interval is None:
        poll_interval = location.poll_interval or 1.0
    if pool_size is None:
        pool_size = location.pool_size or 5
    if poll_interval <= 0:
        raise ConfigurationError(f"poll_interval must be > 0 seconds, got {poll_interval!r}")
    if pool_size < 1:
        raise ConfigurationError(f"pool_size must be >= 1, got {pool_size!r}")
    store = PostgresEventStore(
        location,
        clock=clock or SystemClock(),
        poll_interval=poll_interval,
        pool_size=pool_size,
        connect_timeout=connect_timeout,
    )
    try:
        await store._start()
    except BaseException:
        await store.close()
        raise
    return store


@functools.cache
def _schema_ddl() -> str:
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    statements: list[str] = []
    for table in sql.metadata.sorted_tables:
        statements.append(str(CreateTable(table, if_not_exists=True).compile(dialect=dialect)))
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            statements.append(str(CreateIndex(index, if_not_exists=True).compile(dialect=dialect)))
    return ";\n".join(statement.strip() for statement in statements)


def _schema_objects() -> list[str]:
    names = [table.name for table in sql.metadata.sorted_tables]
    for table in sql.metadata.sorted_tables:
        names.extend(str(index.name) for index in table.indexes)
    return names


class PostgresEventStore(EventStore):
    """The event store on PostgreSQL; open it with :func:`open_postgres_store`.

    One store object holds a writer connection (driven by its group-commit task), a pool of
    reader connections, and, once something subscribes, one ``LISTEN`` connection. Several
    store objects, in one process or many, may share a database: the advisory lock keeps
    one global order.
    """

    def __init__(
        self,
        location: PostgresLocation,
        *,
        clock: Clock,
        poll_interval: float,
        pool_size: int,
        connect_timeout: float,
    ) -> None:
        self.url = location.display_url
        self.location = location
        self._clock = clock
        self._poll_interval = poll_interval
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._signal = CommitSignal(poll_interval=poll_interval)
        self._queue: asyncio.Queue[PendingAppend | None] = asyncio.Queue()
        self._writer: Any = None
        self._writer_task: asyncio.Task[None] | None = None
        self._pool: Any = None
        self._listener: Any = None
        self._listener_lock = asyncio.Lock()
        self._relisten_task: asyncio.Task[None] | None = None
        self._closed = False
        #: Transactions committed by this store's writer (group commit puts many calls in one).
        self.transactions_committed = 0

    @property
    def poll_interval(self) -> float:
        """Seconds a subscriber waits at most before reading again without a notification."""
        return self._poll_interval

    @property
    def pool_size(self) -> int:
        """Reader connections in the pool."""
        return self._pool_size

    # -- lifecycle -------------------------------------------------------------------------

    async def _start(self) -> None:
        self._writer = await self._connect("writer")
        await self._ensure_schema(self._writer)
        try:
            self._pool = await asyncpg.create_pool(
                self.location.dsn,
                min_size=1,
                max_size=self._pool_size,
                timeout=self._connect_timeout,
                server_settings={"application_name": "collaborative_blocks/reader"},
            )
        except (*_CONNECTION_ERRORS, asyncpg.exceptions.PostgresError) as error:
            raise self._unreachable(error) from None
        self._writer_task = asyncio.get_running_loop().create_task(
            self._run_writer(), name=f"cb-postgres-writer {self.url}"
        )

    async def close(self) -> None:
        """Let queued appends finish, then close every connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._writer_task is not None:
            self._queue.put_nowait(None)
            await self._writer_task
        if self._relisten_task is not None:
            self._relisten_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._relisten_task
        for connection in (self._listener, self._writer):
            if connection is not None:
                await self._close_connection(connection)
        self._listener = self._writer = None
        if self._pool is not None:
            await self._pool.close()
        # Wake subscribers so they see the store is closed instead of waiting a poll interval.
        self._signal.notify()

    @staticmethod
    async def _close_connection(connection: Any) -> None:
        try:
            await asyncio.wait_for(connection.close(), 5.0)
        except (*_CONNECTION_ERRORS, asyncpg.exceptions.PostgresError):
            connection.terminate()

    def _is_closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"the store {self.url} is closed; open a new one")

    async def _connect(self, role: str) -> Any:
        try:
            return await asyncpg.connect(
                self.location.dsn,
                timeout=self._connect_timeout,
                server_settings={"application_name": f"collaborative_blocks/{role}"},
            )
        except (*_CONNECTION_ERRORS, asyncpg.exceptions.PostgresError) as error:
            raise self._unreachable(error) from None

    async def _ensure_schema(self, connection: Any) -> None:
        objects = _schema_objects()
        try:
            present = await connection.fetchval(
                "SELECT bool_and(to_regclass(name) IS NOT NULL) FROM unnest($1::text[]) AS name",
                objects,
            )
            if present:
                return
            # CREATE ... IF NOT EXISTS alone still races on the catalog when two processes
            # start at once; the advisory lock makes the second one wait and find the tables.
            try:
                await connection.execute(
                    f"BEGIN; SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY});\n"
                    f"{_schema_ddl()};\nCOMMIT"
                )
            except asyncpg.exceptions.PostgresError as error:
                with contextlib.suppress(*_CONNECTION_ERRORS, asyncpg.exceptions.PostgresError):
                    await connection.execute("ROLLBACK")
                raise StoreError(
                    f"could not create the event store schema in database "
                    f"{self.location.database!r} at {self.location.host}:{self.location.port}: "
                    f"{error}. Run the store once as a user allowed to CREATE tables there, "
                    "or create the tables of collaborative_blocks.stores.sql yourself."
                ) from error
        except _CONNECTION_ERRORS as error:
            raise self._unreachable(error) from None

    def _unreachable(self, error: BaseException) -> StoreUnavailableError:
        where = self.location
        if isinstance(error, asyncpg.exceptions.InvalidCatalogNameError):
            advice = (
                f"the database {where.database!r} does not exist: create it (e.g. "
                f"`createdb -h {where.host} -p {where.port} {where.database}`) or fix the "
                "database name in the URL"
            )
        elif isinstance(error, asyncpg.exceptions.InvalidAuthorizationSpecificationError):
            advice = "check the user and password in the URL and the server's pg_hba.conf"
        elif isinstance(error, asyncpg.exceptions.InsufficientResourcesError):
            advice = (
                "the server has no connection to spare: lower pool_size or raise max_connections"
            )
        else:
            advice = (
                f"check that PostgreSQL is running and accepts connections there (e.g. "
                f"`pg_isready -h {where.host} -p {where.port}`) and that the URL is right"
            )
        reason = str(error) or type(error).__name__
        return StoreUnavailableError(
            f"cannot use the PostgreSQL event store at host {where.host}, port {where.port}, "
            f"database {where.database!r}, user {where.user!r} ({where.display_url}): "
            f"{reason}. What to do: {advice}; then open the store again."
        )

    def _lost(self, error: BaseException, during: str) -> StoreUnavailableError:
        where = self.location
        return StoreUnavailableError(
            f"lost the connection to PostgreSQL at {where.host}:{where.port}, database "
            f"{where.database!r} ({where.display_url}) during {during}: "
            f"{str(error) or type(error).__name__}. The store reconnects on the next call; "
            "retry once the server is reachable."
        )

    # -- writing ---------------------------------------------------------------------------

    async def append_many(
        self, requests: Sequence[AppendRequest], *, tracking: Tracking | None = None
    ) -> list[list[int]]:
        """Append to several streams in one transaction (all or nothing).

        Concurrent calls on this store object share one transaction (group commit) but each
        gets its own result or its own :class:`~collaborative_blocks.errors.ConcurrencyError`,
        :class:`~collaborative_blocks.errors.TrackingConflictError` or
        :class:`~collaborative_blocks.errors.DuplicateMessageError`. A connection lost
        mid-call raises :class:`~collaborative_blocks.errors.StoreUnavailableError`.
        """
        self._check_open()
        for request in requests:
            validate_request(request)
            _check_text(request.stream, "stream id")
            for event in request.events:
                _check_text(event.topic, f"topic of an event for stream {request.stream!r}")
        if tracking is not None:
            _check_key(tracking.consumer, "Tracking.consumer")
            if tracking.message_id is not None:
                _check_key(tracking.message_id, "Tracking.message_id")
            if tracking.position is not None and tracking.position > _BIGINT_MAX:
                raise EventSerializationError(
                    f"Tracking.position {tracking.position} does not fit a PostgreSQL bigint"
                )
        if not requests and tracking is None:
            return []
        future: asyncio.Future[list[list[int]]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(PendingAppend(list(requests), tracking, future))
        return await future

    async def _run_writer(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            events = first.event_count
            while len(batch) < _MAX_BATCH_CALLERS and events < _MAX_BATCH_EVENTS:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
                events += item.event_count
            await self._commit_batch(batch)

    async def _commit_batch(self, batch: Sequence[PendingAppend]) -> None:
        # A caller cancelled while queued gets nothing written.
        live = [pending for pending in batch if not pending.future.done()]
        if not live:
            return
        try:
            await self._transaction(live)
        except _ConnectionLostError as lost:
            for pending in live:
                _fail(pending, lost.error)
        except asyncpg.exceptions.PostgresError as error:
            if len(live) > 1:
                # One caller's rows may be what the database rejects: run each alone so only
                # that caller fails.
                for pending in live:
                    await self._commit_batch([pending])
            else:
                _fail(live[0], self._rejected(error))
        except Exception as error:  # a bug must not kill the writer task for everyone
            for pending in live:
                _fail(pending, error)

    async def _transaction(self, batch: Sequence[PendingAppend]) -> None:
        phase = "connecting"
        try:
            connection = self._writer
            if connection is None or connection.is_closed():
                self._writer = None
                connection = self._writer = await self._connect("writer")
            phase = "the append transaction"
            # The lock is taken in its own statement: under READ COMMITTED the version check
            # below then reads with a snapshot taken after every earlier batch committed.
            await connection.execute(
                "BEGIN ISOLATION LEVEL READ COMMITTED;"
                f" SELECT pg_advisory_xact_lock({APPEND_LOCK_KEY})"
            )
            try:
                plan = plan_batch(batch, await self._read_committed_state(connection, batch))
                positions: list[int] = []
                if plan.row_count:
                    rows = await connection.fetch(
                        _SQL_INSERT_EVENTS, plan.streams, plan.versions, plan.topics, plan.states
                    )
                    # nextval() runs in row order, so sorted positions line up with the rows.
                    positions = sorted(row[0] for row in rows)
                await self._write_tracking(connection, plan)
                phase = "COMMIT (the append may or may not have been committed)"
                if positions:
                    await connection.execute(f"NOTIFY {NOTIFY_CHANNEL}, '{positions[-1]}'; COMMIT")
                else:
                    await connection.execute("COMMIT")
            except asyncpg.exceptions.PostgresError as error:
                if isinstance(error, _CONNECTION_ERRORS):
                    raise
                await connection.execute("ROLLBACK")
                raise
            except BaseException:
                if not connection.is_closed():
                    connection.terminate()
                self._writer = None
                raise
        except _CONNECTION_ERRORS as error:
            if self._writer is not None:
                self._writer.terminate()
                self._writer = None
            raise _ConnectionLostError(self._lost(error, phase)) from None
        except StoreUnavailableError as unavailable:
            raise _ConnectionLostError(unavailable) from None
        self.transactions_committed += 1
        for pending, rejection in plan.rejected:
            _fail(pending, rejection)
        for pending, result in plan.results(positions):
            if not pending.future.done():
                pending.future.set_result(result)
        if positions:
            self._signal.notify()

    async def _read_committed_state(
        self, connection: Any, batch: Sequence[PendingAppend]
    ) -> CommittedState:
        state = CommittedState()
        streams = list({request.stream for pending in batch for request in pending.requests})
        for stream, version in await connection.fetch(_SQL_VERSIONS, streams):
            if version is not None:
                state.versions[stream] = version
        trackings = [pending.tracking for pending in batch if pending.tracking is not None]
        consumers = list({t.consumer for t in trackings if t.position is not None})
        if consumers:
            for consumer, position in await connection.fetch(_SQL_CONSUMER_POSITIONS, consumers):
                state.consumer_positions[consumer] = position
        messages = list({(t.consumer, t.message_id) for t in trackings if t.message_id is not None})
        if messages:
            hits = await connection.fetch(
                _SQL_INBOX_HITS, [m[0] for m in messages], [m[1] for m in messages]
            )
            state.processed.update((consumer, message_id) for consumer, message_id in hits)
        return state

    @staticmethod
    async def _write_tracking(connection: Any, plan: BatchPlan) -> None:
        if plan.consumer_positions:
            await connection.execute(
                _SQL_UPSERT_POSITIONS,
                list(plan.consumer_positions),
                list(plan.consumer_positions.values()),
            )
        if plan.inbox:
            await connection.execute(
                _SQL_INSERT_INBOX,
                [entry[0] for entry in plan.inbox],
                [entry[1] for entry in plan.inbox],
                [entry[2] for entry in plan.inbox],
            )

    def _rejected(self, error: asyncpg.exceptions.PostgresError) -> StoreError:
        sqlstate = getattr(error, "sqlstate", "?")
        text = (
            f"PostgreSQL rejected the append ({type(error).__name__}, SQLSTATE {sqlstate}): "
            f"{error}. Nothing was written and other appends were not affected."
        )
        if isinstance(error, asyncpg.exceptions.DataError):
            return EventSerializationError(f"{text} Fix the event data and append again.")
        return StoreError(
            f"{text} Check the constraints and triggers added to the cb_ tables in database "
            f"{self.location.database!r}."
        )

    # -- reading ---------------------------------------------------------------------------

    async def _fetch(self, query: str, *args: object) -> list[Any]:
        self._check_open()
        try:
            async with self._pool.acquire() as connection:
                rows: list[Any] = await connection.fetch(query, *args)
                return rows
        except _CONNECTION_ERRORS as error:
            if self._closed:
                raise StoreClosedError(f"the store {self.url} is closed; open a new one") from None
            raise self._lost(error, "a read") from None
        except asyncpg.exceptions.PostgresError as error:
            raise StoreError(
                f"PostgreSQL refused a read in database {self.location.database!r} "
                f"({type(error).__name__}, SQLSTATE {getattr(error, 'sqlstate', '?')}): {error}. "
                "Check that the cb_ tables have the schema of collaborative_blocks.stores.sql."
            ) from error

    async def _fetchrow(self, query: str, *args: object) -> Any:
        rows = await self._fetch(query, *args)
        return rows[0] if rows else None

    async def read(
        self,
        stream: str,
        *,
        from_version: int = 0,
        to_version: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
    ) -> list[StoredEvent]:
        rows = await self._fetch(
            _SQL_READ_BACKWARD if backwards else _SQL_READ_FORWARD,
            stream,
            _clamp(from_version),
            _BIGINT_MAX if to_version is None else _clamp(to_version),
            limit if limit is None else max(limit, 0),
        )
        return [_stored_event(row) for row in rows]

    async def read_all(
        self,
        *,
        from_position: int = 1,
        to_position: int | None = None,
        limit: int | None = None,
        topics: Sequence[str] = (),
    ) -> list[StoredEvent]:
        args: list[object] = [
            _clamp(from_position),
            _BIGINT_MAX if to_position is None else _clamp(to_position),
            limit if limit is None else max(limit, 0),
        ]
        if topics:
            rows = await self._fetch(_SQL_READ_ALL_TOPICS, *args, list(topics))
        else:
            rows = await self._fetch(_SQL_READ_ALL, *args)
        return [_stored_event(row) for row in rows]

    async def max_position(self) -> int:
        row = await self._fetchrow("SELECT coalesce(max(position), 0) FROM cb_events")
        return int(row[0])

    async def stream_version(self, stream: str) -> int:
        row = await self._fetchrow(
            "SELECT version FROM cb_events WHERE stream = $1 ORDER BY version DESC LIMIT 1", stream
        )
        return 0 if row is None else int(row[0])

    async def streams(self, *, prefix: str = "", limit: int = 100) -> list[StreamInfo]:
        rows = await self._fetch(_SQL_STREAMS, prefix, max(limit, 0))
        return [StreamInfo(row[0], row[1], row[2], row[3]) for row in rows]

    async def stats(self) -> StoreStats:
        totals = await self._fetchrow(
            "SELECT count(*), count(DISTINCT stream), coalesce(max(position), 0) FROM cb_events"
        )
        topics = await self._fetch("SELECT topic, count(*) FROM cb_events GROUP BY topic")
        positions = await self._fetch("SELECT consumer, position FROM cb_consumer_positions")
        inbox = await self._fetch("SELECT DISTINCT consumer FROM cb_inbox")
        consumers: dict[str, int | None] = {row[0]: None for row in inbox}
        consumers.update({row[0]: row[1] for row in positions})
        return StoreStats(
            events=int(totals[0]),
            streams=int(totals[1]),
            max_position=int(totals[2]),
            topics={row[0]: int(row[1]) for row in topics},
            consumers=consumers,
        )

    # -- subscribing -----------------------------------------------------------------------

    def _new_events_waiter(self) -> CommitWaiter:
        return self._signal.waiter()

    async def _subscribe(
        self, from_position: int, topics: tuple[str, ...], batch_size: int
    ) -> AsyncIterator[StoredEvent]:
        await self._ensure_listener()
        next_position = max(from_position, 1)
        failures = 0
        while True:
            # Take the signal before reading, so a commit between the read and the wait wakes us.
            waiter = self._signal.waiter()
            try:
                batch = await self.read_all(
                    from_position=next_position, limit=batch_size, topics=topics
                )
            except StoreUnavailableError:
                # A subscriber outlives a short outage; a long one surfaces as the error.
                failures += 1
                if failures > _SUBSCRIBE_RETRIES:
                    raise
                await self._clock.sleep(min(0.05 * 2**failures, self._poll_interval))
                continue
            failures = 0
            for event in batch:
                yield event
                next_position = event.position + 1
            if len(batch) < batch_size:
                await waiter.wait()

    async def _ensure_listener(self) -> None:
        self._check_open()
        if self._listener is not None:
            return
        async with self._listener_lock:
            if self._listener is not None or self._closed:
                return
            connection = await self._connect("listener")
            try:
                await connection.add_listener(NOTIFY_CHANNEL, self._on_notification)
            except _CONNECTION_ERRORS as error:
                connection.terminate()
                raise self._lost(error, "LISTEN") from None
            if self._is_closed():  # close() ran while this connected and could not see it
                await self._close_connection(connection)
                self._check_open()
            connection.add_termination_listener(self._on_listener_lost)
            self._listener = connection
        # Commits made while nobody listened are found by the read this wakes.
        self._signal.notify()

    def _on_notification(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        self._signal.notify()

    def _on_listener_lost(self, connection: Any) -> None:
        if self._closed or connection is not self._listener:
            return
        self._listener = None
        self._signal.notify()
        self._relisten_task = asyncio.get_running_loop().create_task(self._relisten())

    async def _relisten(self) -> None:
        delay = 0.05
        while not self._closed:
            try:
                await self._ensure_listener()
                return
            except StoreUnavailableError:
                # Subscribers keep polling meanwhile; this only restores prompt wake-ups.
                await self._clock.sleep(delay)
                delay = min(delay * 2, self._poll_interval)

    # -- tracking and snapshots ------------------------------------------------------------

    async def consumer_position(self, consumer: str) -> int | None:
        row = await self._fetchrow(
            "SELECT position FROM cb_consumer_positions WHERE consumer = $1", consumer
        )
        return None if row is None else int(row[0])

    async def has_processed(self, consumer: str, message_id: str) -> bool:
        row = await self._fetchrow(
            "SELECT 1 FROM cb_inbox WHERE consumer = $1 AND message_id = $2", consumer, message_id
        )
        return row is not None

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Keep ``snapshot`` unless a newer one (higher version) is already stored."""
        _check_key(snapshot.stream, "Snapshot.stream")
        if not isinstance(snapshot.version, int) or not 0 <= snapshot.version <= _BIGINT_MAX:
            raise EventSerializationError(
                f"snapshot of {snapshot.stream!r}: version must be an int >= 0, "
                f"got {snapshot.version!r}"
            )
        if not isinstance(snapshot.topic, str) or not snapshot.topic:
            raise EventSerializationError(
                f"snapshot of {snapshot.stream!r} has no topic; give a non-empty string"
            )
        _check_text(snapshot.topic, f"topic of the snapshot of {snapshot.stream!r}")
        if not isinstance(snapshot.state, bytes | bytearray | memoryview):
            raise EventSerializationError(
                f"snapshot of {snapshot.stream!r}: state must be bytes, got "
                f"{type(snapshot.state).__name__}"
            )
        await self._fetch(
            _SQL_UPSERT_SNAPSHOT,
            snapshot.stream,
            snapshot.version,
            snapshot.topic,
            bytes(snapshot.state),
        )

    async def latest_snapshot(self, stream: str) -> Snapshot | None:
        row = await self._fetchrow(
            "SELECT stream, version, topic, state FROM cb_snapshots WHERE stream = $1", stream
        )
        if row is None:
            return None
        stream_id, version, topic, state = row
        if not (isinstance(version, int) and isinstance(topic, str) and topic) or not isinstance(
            state, bytes
        ):
            raise CorruptRecordError(
                f"the snapshot of stream {stream_id!r} in cb_snapshots has version={version!r}, "
                f"topic={topic!r}, state of type {type(state).__name__}; delete the row (the "
                "aggregate then loads by replaying its events)"
            )
        return Snapshot(stream_id, version, topic, state)


class _ConnectionLostError(Exception):
    """Internal: the writer's connection failed; every caller of the batch gets ``error``."""

    def __init__(self, error: StoreUnavailableError) -> None:
        super().__init__(str(error))
        self.error = error


def _fail(pending: PendingAppend, error: BaseException) -> None:
    if not pending.future.done():
        pending.future.set_exception(error)


def _stored_event(row: Any) -> StoredEvent:
    position, stream, version, topic, state = row
    if (
        isinstance(stream, str)
        and stream
        and isinstance(version, int)
        and isinstance(topic, str)
        and topic
        and isinstance(state, bytes)
    ):
        return StoredEvent(stream, version, position, topic, state)
    raise CorruptRecordError(
        f"the row at position {position} of cb_events is not a stored event: stream={stream!r}, "
        f"version={version!r}, topic={topic!r}, state of type {type(state).__name__}. "
        "Nothing was changed; repair or restore that row (every event needs a stream, a "
        "version, a non-empty topic and state bytes)."
    )


def _clamp(value: int) -> int:
    return max(min(value, _BIGINT_MAX), -_BIGINT_MAX)


def _check_text(value: str, what: str) -> None:
    # PostgreSQL text cannot hold NUL, and asyncpg cannot encode lone surrogates; both would
    # otherwise surface as a database error for the whole batch.
    if "\x00" in value:
        raise EventSerializationError(f"{what} {value[:40]!r} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise EventSerializationError(
            f"{what} {value[:40]!r} is not valid UTF-8 ({error})"
        ) from None


def _check_key(value: object, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise EventSerializationError(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > _MAX_KEY_LENGTH:
        raise EventSerializationError(
            f"{what} {value[:40]!r}... is {len(value)} characters; the limit is {_MAX_KEY_LENGTH}"
        )
    _check_text(value, what)
