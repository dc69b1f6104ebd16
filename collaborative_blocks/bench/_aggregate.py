"""Case d: loading one long-lived aggregate by replaying its events, no snapshot.

Both sides load the same eventsourcing aggregate class from the same number of events, each
from its own SQLite file: eventsourcing's ``Application.repository.get`` and our
``Repository.get``. Building the stream is not timed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

__all__ = ["BenchAccount", "eventsourcing_loads", "our_loads", "repository_missing"]


class BenchAccount(Aggregate):
    @event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.balance = 0

    @event("Deposited")
    def deposit(self, amount: int) -> None:
        self.balance += amount


def _account(events: int) -> BenchAccount:
    account = BenchAccount(owner="bench")
    for _ in range(events - 1):
        account.deposit(amount=1)
    return account


def _check(loaded: BenchAccount, events: int) -> None:
    # A load that replayed too little would look fast; refuse to report it.
    if loaded.version != events or loaded.balance != events - 1:
        raise RuntimeError(
            f"benchmark aggregate loaded at version {loaded.version} with balance "
            f"{loaded.balance}; expected {events} and {events - 1}"
        )


def eventsourcing_loads(path: Path, events: int, loads: int) -> float:
    """Loads per second through eventsourcing's own repository on its SQLite store."""
    app: Application[UUID] = Application(
        env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(path)}
    )
    try:
        account = _account(events)
        app.save(account)
        loaded: Any = None
        start = time.perf_counter()
        for _ in range(loads):
            loaded = app.repository.get(account.id)
        elapsed = time.perf_counter() - start
        assert isinstance(loaded, BenchAccount)
        _check(loaded, events)
        return loads / elapsed
    finally:
        app.close()


async def our_loads(url: str, events: int, loads: int) -> float:
    """Loads per second through our async Repository on our SQLite store."""
    from collaborative_blocks.core.aggregates import Repository
    from collaborative_blocks.stores import open_store

    store = await open_store(url)
    try:
        repository = Repository(store)
        account = _account(events)
        await repository.save(account)
        start = time.perf_counter()
        for _ in range(loads):
            loaded = await repository.get(account.id, BenchAccount)
        elapsed = time.perf_counter() - start
        _check(loaded, events)
        return loads / elapsed
    finally:
        await store.close()


def repository_missing() -> str | None:
    try:
        from collaborative_blocks.core.aggregates import Repository  # noqa: F401
    except ImportError as error:
        return f"ours not available yet: {error.name or error} is missing"
    return None
