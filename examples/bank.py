"""A bank account, event-sourced, with a lifecycle: ``python examples/bank.py``.

An account is open, frozen or closed. Deposits and withdrawals are transitions that stay in
the same state (guards check the amounts), ``freeze``/``unfreeze``/``close`` move between
states. Every accepted command is one event in the log; an illegal one raises and stores
nothing. The example runs on a temporary SQLite event log (pass a store URL as the first
argument to use another one, e.g. ``memory://``).
"""

from __future__ import annotations

import asyncio
import enum
import sys
import tempfile

from eventsourcing.domain import event

from collaborative_blocks.core.aggregates import Repository
from collaborative_blocks.core.machines import StateMachineAggregate, transition
from collaborative_blocks.errors import (
    ConcurrencyError,
    GuardRejectedError,
    IllegalTransitionError,
)
from collaborative_blocks.stores import open_store


class AccountStatus(enum.Enum):
    OPEN = "open"
    FROZEN = "frozen"
    CLOSED = "closed"


class BankAccount(StateMachineAggregate[AccountStatus]):
    initial = AccountStatus.OPEN

    @event("Opened")
    def __init__(self, owner: str, overdraft_limit: int = 0) -> None:
        self.owner = owner
        self.overdraft_limit = overdraft_limit
        self.balance = 0

    # Guards: read the aggregate and the command's arguments, change nothing.
    def positive(self, amount: int) -> bool:
        return amount > 0

    def covered(self, amount: int) -> bool:
        return self.balance - amount >= -self.overdraft_limit

    @property
    def has_balance(self) -> bool:
        return self.balance != 0

    @transition(source=AccountStatus.OPEN, dest=None, conditions=[positive], event="Deposited")
    def deposit(self, amount: int) -> None:
        self.balance += amount

    @transition(
        source=AccountStatus.OPEN, dest=None, conditions=[positive, covered], event="Withdrawn"
    )
    def withdraw(self, amount: int) -> None:
        self.balance -= amount

    @transition(source=AccountStatus.OPEN, dest=AccountStatus.FROZEN, event="Frozen")
    def freeze(self, reason: str) -> None:
        self.freeze_reason = reason

    @transition(source=AccountStatus.FROZEN, dest=AccountStatus.OPEN, event="Unfrozen")
    def unfreeze(self) -> None:
        self.freeze_reason = ""

    @transition(
        source=[AccountStatus.OPEN, AccountStatus.FROZEN],
        dest=AccountStatus.CLOSED,
        unless=["has_balance"],
        event="Closed",
    )
    def close(self) -> None:
        pass


async def main(url: str | None = None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        store = await open_store(url or f"sqlite+aiosqlite:///{tmp}/bank.db")
        try:
            repo = Repository(store, snapshot_interval=50)

            account = BankAccount(owner="Ada", overdraft_limit=100)
            account.deposit(amount=250)
            account.withdraw(amount=300)
            await repo.save(account)
            print(f"{account.owner}: balance {account.balance}, {account.state.value}")

            try:
                account.withdraw(amount=100)  # would go past the overdraft limit
            except GuardRejectedError as error:
                print(f"refused: {error}")

            account.freeze(reason="lost card")
            try:
                account.deposit(amount=10)
            except IllegalTransitionError as error:
                print(f"refused: {error}")
            await repo.save(account)

            # Two clerks load the same account; the second to save loses, nothing is lost.
            clerk_a = await repo.get(account.id, BankAccount)
            clerk_b = await repo.get(account.id, BankAccount)
            clerk_a.unfreeze()
            clerk_b.unfreeze()
            await repo.save(clerk_a)
            try:
                await repo.save(clerk_b)
            except ConcurrencyError as error:
                print(f"conflict: {error}")

            # Many small transactions: snapshots keep loading cheap.
            current = await repo.get(account.id, BankAccount)
            for _ in range(120):
                current.deposit(amount=1)
            await repo.save(current)
            snapshot = await store.latest_snapshot(str(account.id))
            print(f"snapshot at version {snapshot.version if snapshot else None}")

            reloaded = await repo.get(account.id, BankAccount)
            print(
                f"reloaded: balance {reloaded.balance}, {reloaded.state.value}, "
                f"version {reloaded.version}, allowed next: {', '.join(reloaded.allowed_triggers)}"
            )
            history = await store.read(str(account.id))
            print(f"{len(history)} events in the stream, first: {history[0].topic}")
            return reloaded.balance
        finally:
            await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
