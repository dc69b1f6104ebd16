"""eventsourcing's own recorder test cases, run against our persistence module.

``eventsourcing.tests.persistence`` ships the conformance suite every eventsourcing persistence
module passes (its SQLite, PostgreSQL and POPO modules, and third-party ones). Here each case
runs unmodified against ``collaborative_blocks.stores.eventsourcing`` on a fresh, empty store
per test: a new SQLite file, a new PostgreSQL database, and (the reference) ``memory://``.

Added to what the suite runs by default:

- ``test_insert_subscribe`` calls the suite's ``optional_test_insert_subscribe`` (eventsourcing
  leaves subscriptions optional; we implement them, so we run it);
- ``NonInterleavingNotificationIDsBaseCase``: two 1,000-event inserts racing from two threads
  get contiguous, non-interleaved notification ids;
- ``ExampleApplicationTestCase`` (from ``eventsourcing.tests.application``): eventsourcing's
  example bank application, snapshots included;
- an unmodified eventsourcing application in a child process writes, and a subscription here
  follows it (PostgreSQL).

Nothing of the suite is skipped. ``InfrastructureFactoryTestCase`` sets ``CREATE_TABLE=f``
to exercise a "don't create tables" path: our stores create their schema when opened, so the
setting has no effect, and the tests still check the recorder classes it asserts.
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    InfrastructureFactory,
    Notification,
    ProcessRecorder,
    TrackingRecorder,
)
from eventsourcing.tests import application as app_suite
from eventsourcing.tests import persistence as suite
from eventsourcing.utils import Environment

from collaborative_blocks.stores.eventsourcing import (
    EventStoreAggregateRecorder,
    EventStoreApplicationRecorder,
    EventStoreFactory,
    EventStoreProcessRecorder,
    EventStoreTrackingRecorder,
)
from collaborative_blocks.testing.services import postgres_admin_dsn, require_postgres

PERSISTENCE_MODULE = "collaborative_blocks.stores.eventsourcing"

Cleanup = Callable[..., None]


# -- a fresh store per test -------------------------------------------------------------------


class Backend:
    """Makes an empty store for one test and registers what removes it afterwards."""

    def new_url(self, add_cleanup: Callable[..., Any]) -> str:
        raise NotImplementedError


class MemoryBackend(Backend):
    def new_url(self, add_cleanup: Callable[..., Any]) -> str:
        return "memory://"


class SQLiteBackend(Backend):
    def new_url(self, add_cleanup: Callable[..., Any]) -> str:
        directory = tempfile.TemporaryDirectory(prefix="cb-es-")
        add_cleanup(directory.cleanup)
        return f"sqlite+aiosqlite:///{directory.name}/events.db"


class PostgresBackend(Backend):
    """A new database per test (the suite expects notification ids to start at 1)."""

    def new_url(self, add_cleanup: Callable[..., Any]) -> str:
        require_postgres()
        admin = postgres_admin_dsn()
        name = f"cbes_{uuid.uuid4().hex[:16]}"
        asyncio.run(_execute(admin, f'CREATE DATABASE "{name}"'))
        add_cleanup(
            lambda: asyncio.run(_execute(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        )
        base = admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
        return f"{base}/{name}"


async def _execute(dsn: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


class FreshStore:
    """Mixin for the suite's recorder cases: ``factory()`` opens an empty store."""

    backend: ClassVar[Backend]
    addCleanup: Cleanup  # from unittest.TestCase

    def factory(self) -> EventStoreFactory:
        url = self.backend.new_url(self.addCleanup)
        factory = EventStoreFactory(Environment(env={"EVENT_STORE_URL": url}))
        self.addCleanup(factory.close)
        return factory


class SubscribeToo:
    """Runs the suite's optional subscription test."""

    optional_test_insert_subscribe: Callable[[], None]

    def test_insert_subscribe(self) -> None:
        self.optional_test_insert_subscribe()


class CustomTrackingRecorder(EventStoreTrackingRecorder):
    """A subclass the factory suite asks us to construct by class and by topic."""


class FactoryEnv:
    """Mixin for the suite's factory case: the env names our module and a fresh store."""

    backend: ClassVar[Backend]
    addCleanup: Cleanup
    env: Environment

    def setUp(self) -> None:
        self.env = Environment("TestCase")
        self.env[InfrastructureFactory.PERSISTENCE_MODULE] = PERSISTENCE_MODULE
        self.env[EventStoreFactory.EVENT_STORE_URL] = self.backend.new_url(self.addCleanup)
        super().setUp()  # type: ignore[misc]

    def expected_factory_class(self) -> type[EventStoreFactory]:
        return EventStoreFactory

    def expected_aggregate_recorder_class(self) -> type[AggregateRecorder]:
        return EventStoreAggregateRecorder

    def expected_application_recorder_class(self) -> type[ApplicationRecorder]:
        return EventStoreApplicationRecorder

    def expected_tracking_recorder_class(self) -> type[TrackingRecorder]:
        return EventStoreTrackingRecorder

    def tracking_recorder_subclass(self) -> type[TrackingRecorder]:
        return CustomTrackingRecorder

    def expected_process_recorder_class(self) -> type[ProcessRecorder]:
        return EventStoreProcessRecorder


class ExampleApplicationEnv:
    """Mixin for eventsourcing's example-application case, which reads ``os.environ``.

    It takes two snapshots of one account and expects both back from the snapshot store, so
    snapshots go to a second store (``EVENT_STORE_SNAPSHOTS_URL``) whose log keeps them all.
    With the default snapshot table, which keeps only the newest, that one assertion would
    fail; the test of that mode is in tests/unit/test_eventsourcing_application.py.
    """

    backend: ClassVar[Backend]
    addCleanup: Cleanup
    expected_factory_topic = f"{PERSISTENCE_MODULE}:EventStoreFactory"

    def setUp(self) -> None:
        settings = {
            "PERSISTENCE_MODULE": PERSISTENCE_MODULE,
            "EVENT_STORE_URL": self.backend.new_url(self.addCleanup),
            "EVENT_STORE_SNAPSHOTS_URL": self.backend.new_url(self.addCleanup),
        }
        for name, value in settings.items():
            previous = os.environ.get(name)
            self.addCleanup(_restore_environ, name, previous)
            os.environ[name] = value
        # The case never closes its application: collect it (its __del__ closes the stores)
        # before the cleanups above remove the databases under it.
        self.addCleanup(gc.collect)
        super().setUp()  # type: ignore[misc]


def _restore_environ(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


# -- the suite's cases, per backend -----------------------------------------------------------


class AggregateRecorderCase(FreshStore):
    def create_recorder(self) -> AggregateRecorder:
        return self.factory().aggregate_recorder()


class ApplicationRecorderCase(FreshStore):
    def create_recorder(self) -> ApplicationRecorder:
        return self.factory().application_recorder()


class TrackingRecorderCase(FreshStore):
    def create_recorder(self) -> TrackingRecorder:
        return self.factory().tracking_recorder()


class ProcessRecorderCase(FreshStore):
    def create_recorder(self) -> ProcessRecorder:
        return self.factory().process_recorder()


# Memory: the reference store; proves the module independently of the SQL stores.


class TestMemoryAggregateRecorder(AggregateRecorderCase, suite.AggregateRecorderTestCase):
    backend = MemoryBackend()


class TestMemoryApplicationRecorder(
    ApplicationRecorderCase, SubscribeToo, suite.ApplicationRecorderTestCase
):
    backend = MemoryBackend()


class TestMemoryTrackingRecorder(TrackingRecorderCase, suite.TrackingRecorderTestCase):
    backend = MemoryBackend()


class TestMemoryProcessRecorder(ProcessRecorderCase, suite.ProcessRecorderTestCase):
    backend = MemoryBackend()


class TestMemoryNonInterleaving(
    ApplicationRecorderCase, suite.NonInterleavingNotificationIDsBaseCase
):
    backend = MemoryBackend()


class TestMemoryInfrastructureFactory(FactoryEnv, suite.InfrastructureFactoryTestCase):
    backend = MemoryBackend()


class TestMemoryExampleApplication(ExampleApplicationEnv, app_suite.ExampleApplicationTestCase):
    backend = MemoryBackend()


# SQLite: the embedded default.


class TestSQLiteAggregateRecorder(AggregateRecorderCase, suite.AggregateRecorderTestCase):
    backend = SQLiteBackend()


class TestSQLiteApplicationRecorder(
    ApplicationRecorderCase, SubscribeToo, suite.ApplicationRecorderTestCase
):
    backend = SQLiteBackend()


class TestSQLiteTrackingRecorder(TrackingRecorderCase, suite.TrackingRecorderTestCase):
    backend = SQLiteBackend()


class TestSQLiteProcessRecorder(ProcessRecorderCase, suite.ProcessRecorderTestCase):
    backend = SQLiteBackend()


class TestSQLiteNonInterleaving(
    ApplicationRecorderCase, suite.NonInterleavingNotificationIDsBaseCase
):
    backend = SQLiteBackend()


class TestSQLiteInfrastructureFactory(FactoryEnv, suite.InfrastructureFactoryTestCase):
    backend = SQLiteBackend()


class TestSQLiteExampleApplication(ExampleApplicationEnv, app_suite.ExampleApplicationTestCase):
    backend = SQLiteBackend()


# PostgreSQL: the real server on this machine (skips without it, fails with
# CB_REQUIRE_SERVICES=1).


@pytest.mark.postgres
class TestPostgresAggregateRecorder(AggregateRecorderCase, suite.AggregateRecorderTestCase):
    backend = PostgresBackend()


@pytest.mark.postgres
class TestPostgresApplicationRecorder(
    ApplicationRecorderCase, SubscribeToo, suite.ApplicationRecorderTestCase
):
    backend = PostgresBackend()


@pytest.mark.postgres
class TestPostgresTrackingRecorder(TrackingRecorderCase, suite.TrackingRecorderTestCase):
    backend = PostgresBackend()


@pytest.mark.postgres
class TestPostgresProcessRecorder(ProcessRecorderCase, suite.ProcessRecorderTestCase):
    backend = PostgresBackend()


@pytest.mark.postgres
class TestPostgresNonInterleaving(
    ApplicationRecorderCase, suite.NonInterleavingNotificationIDsBaseCase
):
    backend = PostgresBackend()


@pytest.mark.postgres
class TestPostgresInfrastructureFactory(FactoryEnv, suite.InfrastructureFactoryTestCase):
    backend = PostgresBackend()


@pytest.mark.postgres
class TestPostgresExampleApplication(ExampleApplicationEnv, app_suite.ExampleApplicationTestCase):
    backend = PostgresBackend()


# -- across processes -------------------------------------------------------------------------

_WRITER = """
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate

app = Application()
for _ in range({count}):
    aggregate = Aggregate()
    aggregate.trigger_event(Aggregate.Event)
    app.save(aggregate)
app.close()
"""


@pytest.mark.postgres
def test_a_subscription_follows_an_application_in_another_process() -> None:
    """eventsourcing in a child process writes; our subscription here sees it on PostgreSQL."""
    cleanups: list[Callable[[], object]] = []
    url = PostgresBackend().new_url(cleanups.append)
    factory = EventStoreFactory(Environment(env={"EVENT_STORE_URL": url}))
    try:
        recorder = factory.application_recorder()
        received: list[Notification] = []
        with recorder.subscribe(gt=None) as subscription:
            # A guard, not a timing assertion: if nothing arrives, end the test instead of
            # hanging; the assertions below then fail.
            guard = threading.Timer(120, subscription.stop)
            guard.start()

            def consume() -> None:
                for notification in subscription:
                    received.append(notification)
                    if len(received) == 6:
                        break

            consumer = threading.Thread(target=consume)
            consumer.start()
            env = {
                **os.environ,
                "PERSISTENCE_MODULE": PERSISTENCE_MODULE,
                "EVENT_STORE_URL": url,
            }
            subprocess.run(
                [sys.executable, "-c", _WRITER.format(count=3)], env=env, check=True, timeout=120
            )
            consumer.join()
            guard.cancel()
        assert [n.id for n in received] == [1, 2, 3, 4, 5, 6]
        assert [n.topic.rsplit(".", 1)[-1] for n in received] == ["Created", "Event"] * 3
    finally:
        factory.close()
        for cleanup in reversed(cleanups):
            cleanup()
