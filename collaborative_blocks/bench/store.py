"""``cblocks bench store``: the event store against raw drivers and eventsourcing's recorders.

Cases (issue 2, Performance), each a ratio of throughputs measured in this run:

a. sequential single-event appends on SQLite (WAL, synchronous=FULL) through the public
   ``append(..., expected_version=...)`` vs stdlib ``sqlite3`` committing one row per
   transaction on the calling thread, same pragmas, same schema. Context: eventsourcing's
   SQLite recorder, plain aiosqlite, and a minimal writer thread (about the best any design
   that keeps the commit off the event loop can do). Target >= 0.75.
b. 64 concurrent tasks, each appending single-event transactions to its own stream with its
   own ``expected_version``, vs eventsourcing's recorder driven through
   ``asyncio.to_thread`` with the same 64 tasks. SQLite, and PostgreSQL with ``--postgres``.
   Target >= 10.
c. batches of 100 events per append vs raw ``executemany`` in batches of 100 (sqlite3; asyncpg
   on PostgreSQL). Target >= 0.6.
d. loading a 10,000-event aggregate without a snapshot: our ``Repository.get`` vs
   eventsourcing's ``Application.repository.get``, each on its own SQLite file. Target >= 2.

Every measurement runs in a fresh temporary directory (or a fresh PostgreSQL database), and
contenders are interleaved round by round; see :mod:`._stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from collaborative_blocks.bench._stats import (
    CaseResult,
    Contender,
    ProgressCallback,
    interleave,
)
from collaborative_blocks.errors import StoreUnavailableError
from collaborative_blocks.stores import EventStore, NewEvent, open_store
from collaborative_blocks.stores.sql import metadata

__all__ = ["CASES", "StoreBenchConfig", "run_store_bench"]

TOPIC = "bench:Deposited"
#: About the size of a small JSON domain event as eventsourcing's transcoder writes it.
PAYLOAD = b'{"amount":100,"currency":"EUR","reference":"bench-0000000000000000000000000000"}'

INSERT_SQLITE = "INSERT INTO cb_events (stream, version, topic, state) VALUES (?, ?, ?, ?)"
INSERT_PG = "INSERT INTO cb_events (stream, version, topic, state) VALUES ($1, $2, $3, $4)"

#: The letter of each case, for ``--case``.
CASES = ("a", "b", "c", "d")


@dataclass(frozen=True)
class StoreBenchConfig:
    """Sizes and options; :meth:`quick` gives tiny sizes for tests."""

    rounds: int = 7
    postgres: str | None = None
    cases: tuple[str, ...] = CASES
    sequential_appends: int = 2000
    concurrent_tasks: int = 64
    appends_per_task: int = 40
    batches: int = 40
    batch_size: int = 100
    aggregate_events: int = 10_000
    loads: int = 3

    @classmethod
    def quick(cls, **overrides: Any) -> StoreBenchConfig:
        sizes: dict[str, Any] = {
            "rounds": 1,
            "sequential_appends": 20,
            "concurrent_tasks": 8,
            "appends_per_task": 3,
            "batches": 3,
            "batch_size": 10,
            "aggregate_events": 50,
            "loads": 1,
        }
        sizes.update(overrides)
        return cls(**sizes)

    def with_options(self, **overrides: Any) -> StoreBenchConfig:
        return replace(self, **overrides)


# -- surroundings -----------------------------------------------------------------------------


@contextlib.contextmanager
def _fresh_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cb-bench-") as name:
        yield Path(name)


def _sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}?synchronous=FULL"


def _create_sqlite_schema(path: Path) -> None:
    """The store's own schema (``stores/sql.py``), so the raw baselines write the same rows."""
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{path}")
    try:
        metadata.create_all(engine)
    finally:
        engine.dispose()


def _raw_sqlite(path: Path) -> sqlite3.Connection:
    _create_sqlite_schema(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def _clock() -> float:
    # Wall time on purpose: this is a benchmark, not framework code.
    return time.perf_counter()


@dataclass(frozen=True)
class _Postgres:
    """Where a benchmark's fresh PostgreSQL databases are created."""

    admin_dsn: str  # postgresql://user@host:port/db, for asyncpg
    host: str
    port: int
    user: str
    password: str

    @classmethod
    def parse(cls, url: str) -> _Postgres:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            parsed = make_url(url)
        except ArgumentError as error:
            raise StoreUnavailableError(
                f"--postgres {url!r} is not a URL; give postgresql://USER@HOST:PORT/DB"
            ) from error
        if not parsed.drivername.startswith("postgres"):
            raise StoreUnavailableError(
                f"--postgres {url!r} is not a PostgreSQL URL; give postgresql://USER@HOST:PORT/DB"
            )
        admin = parsed.set(drivername="postgresql", database=parsed.database or "postgres")
        return cls(
            admin_dsn=admin.render_as_string(hide_password=False),
            host=parsed.host or "127.0.0.1",
            port=parsed.port or 5432,
            user=parsed.username or "postgres",
            password=parsed.password or "",
        )

    def url(self, database: str, driver: str = "postgresql+asyncpg") -> str:
        from sqlalchemy.engine import URL

        return URL.create(
            driver,
            username=self.user,
            password=self.password or None,
            host=self.host,
            port=self.port,
            database=database,
        ).render_as_string(hide_password=False)

    async def check(self) -> None:
        import asyncpg

        try:
            conn = await asyncpg.connect(self.admin_dsn, timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError) as error:
            raise StoreUnavailableError(
                f"cannot reach PostgreSQL for the benchmark at {self.host}:{self.port} "
                f"as {self.user!r}: {error}. Check --postgres and that the server runs."
            ) from error
        await conn.close()

    @contextlib.asynccontextmanager
    async def fresh_database(self) -> AsyncIterator[str]:
        """Create an empty database, yield its name, drop it."""
        import asyncpg

        name = f"cb_bench_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        try:
            yield name
        finally:
            conn = await asyncpg.connect(self.admin_dsn)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()


async def _create_pg_schema(url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
    finally:
        await engine.dispose()


# -- eventsourcing baselines ------------------------------------------------------------------


def _es_stored_event(originator: uuid.UUID, version: int) -> Any:
    from eventsourcing.persistence import StoredEvent

    return StoredEvent(originator, version, TOPIC, PAYLOAD)


def _to_thread_workers() -> int:
    # asyncio.to_thread runs on the loop's default executor, whose size this is.
    return min(32, (os.cpu_count() or 1) + 4)


@contextlib.contextmanager
def _es_sqlite_recorder(path: Path) -> Iterator[Any]:
    from eventsourcing.sqlite import SQLiteFactory

    factory = SQLiteFactory({"SQLITE_DBNAME": str(path)})
    try:
        yield factory.application_recorder()
    finally:
        factory.close()


@contextlib.contextmanager
def _es_postgres_recorder(pg: _Postgres, database: str) -> Iterator[Any]:
    from eventsourcing.postgres import PostgresFactory

    factory = PostgresFactory(
        {
            "POSTGRES_DBNAME": database,
            "POSTGRES_HOST": pg.host,
            "POSTGRES_PORT": str(pg.port),
            "POSTGRES_USER": pg.user,
            "POSTGRES_PASSWORD": pg.password,
            # One connection per to_thread worker, so no call waits for the pool.
            "POSTGRES_POOL_SIZE": str(_to_thread_workers()),
        }
    )
    try:
        yield factory.application_recorder()
    finally:
        factory.close()


async def _es_concurrent(
    recorder: Any, tasks: int, per_task: int, executor: ThreadPoolExecutor | None = None
) -> float:
    """``executor=None`` is exactly ``asyncio.to_thread`` (the loop's default executor)."""
    originators = [uuid.uuid4() for _ in range(tasks)]
    loop = asyncio.get_running_loop()

    async def worker(originator: uuid.UUID) -> None:
        for version in range(1, per_task + 1):
            event = _es_stored_event(originator, version)
            if executor is None:
                await asyncio.to_thread(recorder.insert_events, [event])
            else:
                await loop.run_in_executor(executor, recorder.insert_events, [event])

    start = _clock()
    await asyncio.gather(*(worker(o) for o in originators))
    return tasks * per_task / (_clock() - start)


async def _writer_thread_sequential(n: int) -> float:
    """Sequential appends through the smallest design that never blocks the loop on a commit."""
    loop = asyncio.get_running_loop()
    jobs: queue.SimpleQueue[tuple[int, asyncio.Future[None]] | None] = queue.SimpleQueue()
    with _fresh_dir() as d:
        path = d / "thread.db"
        _raw_sqlite(path).close()

        def writer() -> None:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA synchronous=FULL")
            try:
                while (job := jobs.get()) is not None:
                    version, future = job
                    conn.execute("BEGIN")
                    conn.execute(INSERT_SQLITE, ("sequential", version, TOPIC, PAYLOAD))
                    conn.execute("COMMIT")
                    loop.call_soon_threadsafe(future.set_result, None)
            finally:
                conn.close()

        thread = threading.Thread(target=writer, name="cb-bench-writer")
        thread.start()
        try:
            start = _clock()
            for version in range(1, n + 1):
                future = loop.create_future()
                jobs.put((version, future))
                await future
            return n / (_clock() - start)
        finally:
            jobs.put(None)
            await asyncio.to_thread(thread.join)


# -- our store --------------------------------------------------------------------------------


async def _ours_sequential(store: EventStore, n: int) -> float:
    event = NewEvent(TOPIC, PAYLOAD)
    start = _clock()
    for version in range(n):
        await store.append("sequential", [event], expected_version=version)
    return n / (_clock() - start)


async def _ours_concurrent(store: EventStore, tasks: int, per_task: int) -> float:
    event = NewEvent(TOPIC, PAYLOAD)

    async def worker(stream: str) -> None:
        for version in range(per_task):
            await store.append(stream, [event], expected_version=version)

    start = _clock()
    await asyncio.gather(*(worker(f"task-{t}") for t in range(tasks)))
    return tasks * per_task / (_clock() - start)


async def _ours_batches(store: EventStore, batches: int, size: int) -> float:
    events = [NewEvent(TOPIC, PAYLOAD)] * size
    start = _clock()
    for b in range(batches):
        await store.append("batches", events, expected_version=b * size)
    return batches * size / (_clock() - start)


async def _with_store(url: str, body: Callable[[EventStore], Awaitable[float]]) -> float:
    store = await open_store(url)
    try:
        return await body(store)
    finally:
        await store.close()


async def _store_missing(url: str) -> str | None:
    """Why our store at ``url`` cannot be benchmarked yet (its module not written), or None."""
    try:
        store = await open_store(url)
    except ImportError as error:
        return f"ours not available yet: {error.name or error} is missing"
    await store.close()
    return None


# -- the cases --------------------------------------------------------------------------------


async def _case_sequential(cfg: StoreBenchConfig, progress: ProgressCallback | None) -> CaseResult:
    n = cfg.sequential_appends
    case = CaseResult(
        key="a-sqlite-sequential",
        title="a. SQLite sequential appends (WAL, FULL)",
        unit="appends/s",
        ours="ours",
        baseline="raw sqlite3",
        target=0.75,
    )

    def raw() -> float:
        with _fresh_dir() as d:
            conn = _raw_sqlite(d / "raw.db")
            try:
                start = _clock()
                for version in range(1, n + 1):
                    conn.execute("BEGIN")
                    conn.execute(INSERT_SQLITE, ("sequential", version, TOPIC, PAYLOAD))
                    conn.execute("COMMIT")
                return n / (_clock() - start)
            finally:
                conn.close()

    async def raw_contender() -> float:
        # On the calling thread, as the target defines it: the loop is blocked meanwhile.
        return raw()

    async def ours() -> float:
        with _fresh_dir() as d:
            return await _with_store(_sqlite_url(d / "ours.db"), lambda s: _ours_sequential(s, n))

    async def eventsourcing() -> float:
        with _fresh_dir() as d, _es_sqlite_recorder(d / "es.db") as recorder:
            originator = uuid.uuid4()
            start = _clock()
            for version in range(1, n + 1):
                recorder.insert_events([_es_stored_event(originator, version)])
            return n / (_clock() - start)

    async def writer_thread() -> float:
        return await _writer_thread_sequential(n)

    async def plain_aiosqlite() -> float:
        import aiosqlite

        with _fresh_dir() as d:
            _create_sqlite_schema(d / "aio.db")
            async with aiosqlite.connect(d / "aio.db", isolation_level=None) as conn:
                await conn.execute("PRAGMA journal_mode=WAL")
                await conn.execute("PRAGMA synchronous=FULL")
                start = _clock()
                for version in range(1, n + 1):
                    await conn.execute("BEGIN")
                    await conn.execute(INSERT_SQLITE, ("sequential", version, TOPIC, PAYLOAD))
                    await conn.execute("COMMIT")
                return n / (_clock() - start)

    with _fresh_dir() as d:
        case.unavailable = await _store_missing(_sqlite_url(d / "probe.db"))
    contenders: list[tuple[str, Contender]] = [
        ("raw sqlite3", raw_contender),
        ("eventsourcing SQLite recorder", eventsourcing),
        ("aiosqlite", plain_aiosqlite),
        ("minimal writer thread", writer_thread),
    ]
    if case.unavailable is None:
        contenders.insert(1, ("ours", ours))
    case.notes.append(
        "context, not targets: eventsourcing's recorder runs on the calling thread (it is "
        "synchronous); 'minimal writer thread' is about the best a design that keeps commits "
        "off the event loop can do (one sqlite3 writer thread, a queue, call_soon_threadsafe; no "
        "checks, no group commit)"
    )
    await interleave(case, contenders, cfg.rounds, progress)
    return case


async def _case_concurrent_sqlite(
    cfg: StoreBenchConfig, progress: ProgressCallback | None
) -> CaseResult:
    tasks, per_task = cfg.concurrent_tasks, cfg.appends_per_task
    case = CaseResult(
        key="b-sqlite-concurrent",
        title=f"b. SQLite, {tasks} concurrent appenders",
        unit="appends/s",
        ours="ours",
        baseline="eventsourcing SQLite recorder via to_thread",
        target=10.0,
    )

    async def ours() -> float:
        with _fresh_dir() as d:
            return await _with_store(
                _sqlite_url(d / "ours.db"), lambda s: _ours_concurrent(s, tasks, per_task)
            )

    async def eventsourcing() -> float:
        with _fresh_dir() as d, _es_sqlite_recorder(d / "es.db") as recorder:
            return await _es_concurrent(recorder, tasks, per_task)

    async def eventsourcing_thread_per_task() -> float:
        with (
            _fresh_dir() as d,
            _es_sqlite_recorder(d / "es.db") as recorder,
            ThreadPoolExecutor(tasks, thread_name_prefix="cb-bench-es") as executor,
        ):
            return await _es_concurrent(recorder, tasks, per_task, executor)

    with _fresh_dir() as d:
        case.unavailable = await _store_missing(_sqlite_url(d / "probe.db"))
    contenders: list[tuple[str, Contender]] = [
        (case.baseline, eventsourcing),
        (f"eventsourcing, {tasks} threads", eventsourcing_thread_per_task),
    ]
    if case.unavailable is None:
        contenders.append(("ours", ours))
    case.notes.append(
        f"asyncio.to_thread uses the default executor: {_to_thread_workers()} threads here; "
        f"'eventsourcing, {tasks} threads' (context) gives each task a thread of its own"
    )
    await interleave(case, contenders, cfg.rounds, progress)
    return case


async def _case_concurrent_postgres(
    cfg: StoreBenchConfig, pg: _Postgres, progress: ProgressCallback | None
) -> CaseResult:
    tasks, per_task = cfg.concurrent_tasks, cfg.appends_per_task
    case = CaseResult(
        key="b-postgres-concurrent",
        title=f"b. PostgreSQL, {tasks} concurrent appenders",
        unit="appends/s",
        ours="ours",
        baseline="eventsourcing PostgreSQL recorder via to_thread",
        target=10.0,
    )

    async def ours() -> float:
        async with pg.fresh_database() as db:
            return await _with_store(pg.url(db), lambda s: _ours_concurrent(s, tasks, per_task))

    async def eventsourcing() -> float:
        async with pg.fresh_database() as db:
            with _es_postgres_recorder(pg, db) as recorder:
                return await _es_concurrent(recorder, tasks, per_task)

    async with pg.fresh_database() as db:
        case.unavailable = await _store_missing(pg.url(db))
    contenders: list[tuple[str, Contender]] = [(case.baseline, eventsourcing)]
    if case.unavailable is None:
        contenders.append(("ours", ours))
    case.notes.append(
        f"eventsourcing's pool has {_to_thread_workers()} connections, one per to_thread worker"
    )
    await interleave(case, contenders, cfg.rounds, progress)
    return case


async def _case_batches_sqlite(
    cfg: StoreBenchConfig, progress: ProgressCallback | None
) -> CaseResult:
    batches, size = cfg.batches, cfg.batch_size
    case = CaseResult(
        key="c-sqlite-batch",
        title=f"c. SQLite, batches of {size}",
        unit="events/s",
        ours="ours",
        baseline="raw sqlite3 executemany",
        target=0.6,
    )

    async def raw() -> float:
        with _fresh_dir() as d:
            conn = _raw_sqlite(d / "raw.db")
            try:
                start = _clock()
                for b in range(batches):
                    rows = [("batches", b * size + i + 1, TOPIC, PAYLOAD) for i in range(size)]
                    conn.execute("BEGIN")
                    conn.executemany(INSERT_SQLITE, rows)
                    conn.execute("COMMIT")
                return batches * size / (_clock() - start)
            finally:
                conn.close()

    async def ours() -> float:
        with _fresh_dir() as d:
            return await _with_store(
                _sqlite_url(d / "ours.db"), lambda s: _ours_batches(s, batches, size)
            )

    with _fresh_dir() as d:
        case.unavailable = await _store_missing(_sqlite_url(d / "probe.db"))
    contenders: list[tuple[str, Contender]] = [(case.baseline, raw)]
    if case.unavailable is None:
        contenders.append(("ours", ours))
    await interleave(case, contenders, cfg.rounds, progress)
    return case


async def _case_batches_postgres(
    cfg: StoreBenchConfig, pg: _Postgres, progress: ProgressCallback | None
) -> CaseResult:
    import asyncpg

    batches, size = cfg.batches, cfg.batch_size
    case = CaseResult(
        key="c-postgres-batch",
        title=f"c. PostgreSQL, batches of {size}",
        unit="events/s",
        ours="ours",
        baseline="raw asyncpg executemany",
        target=0.6,
    )

    async def raw() -> float:
        async with pg.fresh_database() as db:
            await _create_pg_schema(pg.url(db))
            conn = await asyncpg.connect(pg.url(db, driver="postgresql"))
            try:
                start = _clock()
                for b in range(batches):
                    rows = [("batches", b * size + i + 1, TOPIC, PAYLOAD) for i in range(size)]
                    async with conn.transaction():
                        await conn.executemany(INSERT_PG, rows)
                return batches * size / (_clock() - start)
            finally:
                await conn.close()

    async def ours() -> float:
        async with pg.fresh_database() as db:
            return await _with_store(pg.url(db), lambda s: _ours_batches(s, batches, size))

    async with pg.fresh_database() as db:
        case.unavailable = await _store_missing(pg.url(db))
    contenders: list[tuple[str, Contender]] = [(case.baseline, raw)]
    if case.unavailable is None:
        contenders.append(("ours", ours))
    await interleave(case, contenders, cfg.rounds, progress)
    return case


async def _case_aggregate_load(
    cfg: StoreBenchConfig, progress: ProgressCallback | None
) -> CaseResult:
    from collaborative_blocks.bench import _aggregate

    n, loads = cfg.aggregate_events, cfg.loads
    case = CaseResult(
        key="d-aggregate-load",
        title=f"d. load a {n:,}-event aggregate",
        unit="loads/s",
        ours="ours",
        baseline="eventsourcing Application.repository.get",
        target=2.0,
    )

    async def eventsourcing() -> float:
        with _fresh_dir() as d:
            # eventsourcing's repository is synchronous: it runs on the calling thread.
            return _aggregate.eventsourcing_loads(d / "es.db", n, loads)

    async def ours() -> float:
        with _fresh_dir() as d:
            return await _aggregate.our_loads(_sqlite_url(d / "ours.db"), n, loads)

    with _fresh_dir() as d:
        case.unavailable = await _store_missing(_sqlite_url(d / "probe.db"))
    if case.unavailable is None:
        case.unavailable = _aggregate.repository_missing()
    contenders: list[tuple[str, Contender]] = [(case.baseline, eventsourcing)]
    if case.unavailable is None:
        contenders.append(("ours", ours))
    await interleave(case, contenders, cfg.rounds, progress)
    return case


def planned_measurements(cfg: StoreBenchConfig) -> int:
    """How many measurements a run makes at most (for a progress bar)."""
    per_round = 0
    if "a" in cfg.cases:
        per_round += 5
    if "b" in cfg.cases:
        per_round += 3 + (2 if cfg.postgres else 0)
    if "c" in cfg.cases:
        per_round += 2 + (2 if cfg.postgres else 0)
    if "d" in cfg.cases:
        per_round += 2
    return per_round * cfg.rounds


async def run_store_bench(
    cfg: StoreBenchConfig, progress: ProgressCallback | None = None
) -> list[CaseResult]:
    """Run the selected cases in order; a case whose parts are missing is marked unavailable.

    Raises :class:`StoreUnavailableError` when ``cfg.postgres`` cannot be reached.
    """
    unknown = sorted(set(cfg.cases) - set(CASES))
    if unknown:
        raise ValueError(f"unknown benchmark cases {unknown}; choose from {', '.join(CASES)}")
    pg = _Postgres.parse(cfg.postgres) if cfg.postgres else None
    if pg is not None:
        await pg.check()
    steps: list[Callable[[], Awaitable[CaseResult]]] = []
    if "a" in cfg.cases:
        steps.append(lambda: _case_sequential(cfg, progress))
    if "b" in cfg.cases:
        steps.append(lambda: _case_concurrent_sqlite(cfg, progress))
        if pg is not None:
            steps.append(lambda: _case_concurrent_postgres(cfg, pg, progress))
    if "c" in cfg.cases:
        steps.append(lambda: _case_batches_sqlite(cfg, progress))
        if pg is not None:
            steps.append(lambda: _case_batches_postgres(cfg, pg, progress))
    if "d" in cfg.cases:
        steps.append(lambda: _case_aggregate_load(cfg, progress))
    return [await step() for step in steps]


def sequence_of_cases(value: Sequence[str]) -> tuple[str, ...]:
    """``--case a --case c`` or ``--case a,c`` -> ("a", "c")."""
    out: list[str] = []
    for item in value:
        out.extend(part.strip().lower() for part in item.split(",") if part.strip())
    return tuple(out)
