"""pytest fixtures for applications and plugins built on Collaborative Blocks.

Installed with the package (entry point ``pytest11``), so these fixtures are available in any
project's tests without imports:

- ``cb_virtual_clock``: a :class:`~collaborative_blocks.VirtualClock`.
- ``cb_sqlite_url``: a URL of a fresh SQLite event log in the test's temporary directory.
- ``cb_postgres_url``: a URL of a fresh PostgreSQL database, dropped after the test (skips, or
  fails under ``CB_REQUIRE_SERVICES=1``, when PostgreSQL is not reachable).
- ``cb_store_url``: parametrised over memory, SQLite and PostgreSQL.
- ``cb_store``: an open store at ``cb_store_url``, closed after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from collaborative_blocks.core.clock import VirtualClock
from collaborative_blocks.stores import EventStore, open_store
from collaborative_blocks.testing.services import temporary_postgres_database


@pytest.fixture
def cb_virtual_clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def cb_sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"


@pytest.fixture
async def cb_postgres_url() -> AsyncIterator[str]:
    async with temporary_postgres_database() as url:
        yield url


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def cb_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "memory":
        yield "memory://"
    elif request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    else:
        async with temporary_postgres_database() as url:
            yield url


@pytest.fixture
async def cb_store(cb_store_url: str) -> AsyncIterator[EventStore]:
    store = await open_store(cb_store_url)
    try:
        yield store
    finally:
        await store.close()
