"""Finding the servers tests need, and skipping (or failing) when one is missing.

Tests that need PostgreSQL, Redis or NATS skip when the server does not answer, unless
``CB_REQUIRE_SERVICES=1``: then they fail, so CI cannot go green by skipping.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

__all__ = [
    "ServiceUnavailable",
    "postgres_admin_dsn",
    "require_postgres",
    "services_required",
    "temporary_postgres_database",
]


class ServiceUnavailable(RuntimeError):
    pass


def services_required() -> bool:
    return os.environ.get("CB_REQUIRE_SERVICES", "").lower() in {"1", "true", "yes", "on"}


def postgres_admin_dsn() -> str:
    """DSN of a PostgreSQL database where test databases can be created."""
    return os.environ.get("CB_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _unavailable(what: str) -> None:
    message = f"{what} is not reachable"
    if services_required():
        pytest.fail(f"{message}, and CB_REQUIRE_SERVICES=1 forbids skipping")
    pytest.skip(message)


def require_postgres() -> None:
    if not _port_open("127.0.0.1", 5432):
        _unavailable("PostgreSQL at 127.0.0.1:5432")


def require_redis() -> None:
    if not _port_open("127.0.0.1", 6379):
        _unavailable("Redis at 127.0.0.1:6379")


def require_nats() -> None:
    if not _port_open("127.0.0.1", 4222):
        _unavailable("NATS at 127.0.0.1:4222")


@asynccontextmanager
async def temporary_postgres_database() -> AsyncIterator[str]:
    """Create an empty database, yield its ``postgresql+asyncpg://`` URL, then drop it."""
    import asyncpg

    require_postgres()
    name = f"cbtest_{uuid.uuid4().hex[:16]}"
    admin = postgres_admin_dsn()
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
