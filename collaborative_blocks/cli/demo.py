"""``cblocks demo``: the main job on the embedded defaults, small but real.

Bank accounts are event-sourced state machines (:class:`Account`). Many concurrent tasks
move money between them; each transfer loads both accounts through the
:class:`~collaborative_blocks.core.aggregates.Repository`, applies the commands, and saves
both in one atomic append with optimistic concurrency, retrying on
:class:`~collaborative_blocks.errors.ConcurrencyError`. A projection follows the log with
``store.subscribe`` and records its position with ``Tracking``. At the end the demo checks
its invariants (money conserved, versions dense, projection caught up and in agreement, an
illegal transition persisted nothing) and exits non-zero if one fails.

Every run uses fresh account ids derived from the runtime's ``new_id()``, so it can be run
again and again on the same store.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any
from uuid import NAMESPACE_URL, UUID, uuid5

import typer
from eventsourcing.domain import event
from eventsourcing.persistence import StoredEvent as MapperStoredEvent
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from collaborative_blocks.cli._common import (
    EXIT_FAILED,
    console,
    err_console,
    print_json,
    run_async,
    state_of,
)
from collaborative_blocks.core.aggregates import Repository, event_clock
from collaborative_blocks.core.machines import StateMachineAggregate, transition
from collaborative_blocks.core.runtime import Runtime
from collaborative_blocks.core.settings import load_settings
from collaborative_blocks.errors import (
    ConcurrencyError,
    GuardRejectedError,
    IllegalTransitionError,
    TrackingConflictError,
)
from collaborative_blocks.stores import EventStore, StoredEvent, Tracking

__all__ = ["Account", "AccountState", "DemoReport", "demo_command", "run_demo"]

OPENING_BALANCE = 1_000
#: A transfer that keeps losing the optimistic-concurrency race this often is a failure.
MAX_ATTEMPTS = 100
#: The projection records its position every this many events (and at the end).
CHECKPOINT_EVERY = 50


class AccountState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class Account(StateMachineAggregate[AccountState]):
    """A bank account: its lifecycle is a state machine, every command a persisted event."""

    initial = AccountState.OPEN

    @staticmethod
    def create_id(run: str, name: str) -> UUID:
        # Derived from the run id, so each run writes fresh streams and ids are reproducible
        # from (run, name).
        return uuid5(NAMESPACE_URL, f"cblocks-demo:{run}:{name}")

    @event("Opened")
    def __init__(self, run: str, name: str, opening: int) -> None:
        self.run = run
        self.name = name
        self.balance = opening

    def has_funds(self, amount: int) -> bool:
        return self.balance >= amount

    def is_empty(self) -> bool:
        return self.balance == 0

    @transition(source=AccountState.OPEN)
    def deposit(self, amount: int) -> None:
        self.balance += amount

    @transition(source=AccountState.OPEN, conditions=[has_funds])
    def withdraw(self, amount: int) -> None:
        self.balance -= amount

    @transition(source=AccountState.OPEN, dest=AccountState.CLOSED, conditions=[is_empty])
    def close(self) -> None:
        pass


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class DemoReport:
    run: str
    store: str
    accounts: int = 0
    workers: int = 0
    transfers: int = 0
    declined: int = 0
    deposits: int = 0
    conflicts: int = 0
    events: int = 0
    first_position: int = 0
    last_position: int = 0
    projection_position: int | None = None
    seconds: float = 0.0
    money_expected: int = 0
    money_found: int = 0
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "run": self.run,
            "store": self.store,
            "accounts": self.accounts,
            "workers": self.workers,
            "transfers": self.transfers,
            "declined": self.declined,
            "deposits": self.deposits,
            "conflicts_retried": self.conflicts,
            "events_appended": self.events,
            "first_position": self.first_position,
            "last_position": self.last_position,
            "projection_position": self.projection_position,
            "seconds": self.seconds,
            "money_expected": self.money_expected,
            "money_found": self.money_found,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
        }


class BalanceProjection:
    """A read model of the balances, built only from the log (never from the aggregates)."""

    def __init__(self, store: EventStore, repository: Repository, consumer: str) -> None:
        self.store = store
        self.repository = repository
        self.consumer = consumer
        self.balances: dict[str, int] = {}
        self.position = 0
        self.advanced = asyncio.Event()

    async def follow(self, from_position: int, streams: set[str]) -> None:
        unrecorded = 0
        async for stored in self.store.subscribe(from_position=from_position):
            if stored.stream in streams:
                self._apply(stored)
            self.position = stored.position
            unrecorded += 1
            if unrecorded >= CHECKPOINT_EVERY:
                await self.record()
                unrecorded = 0
            self.advanced.set()

    async def record(self) -> None:
        """Record the position in the store, so a restarted projection resumes from it."""
        if not self.position:
            return
        try:
            await self.store.append_many([], tracking=Tracking(self.consumer, self.position))
        except TrackingConflictError:
            # An equal or later position is already recorded (a checkpoint that was in
            # flight when the follower stopped): nothing to do.
            pass

    def _apply(self, stored: StoredEvent) -> None:
        domain_event = self.repository.mapper.to_domain_event(
            MapperStoredEvent(
                originator_id=stored.stream,
                originator_version=stored.version,
                topic=stored.topic,
                state=stored.state,
            )
        )
        # Event classes are generated from the decorated methods, so they are matched by
        # name here; their fields are the commands' arguments.
        kind, data = type(domain_event).__name__, vars(domain_event)
        if kind == "Opened":
            self.balances[stored.stream] = int(data["opening"])
        elif kind == "Deposit":
            self.balances[stored.stream] += int(data["amount"])
        elif kind == "Withdraw":
            self.balances[stored.stream] -= int(data["amount"])

    async def wait_for(self, position: int, clock_timeout: float, runtime: Runtime) -> bool:
        deadline = runtime.clock.monotonic() + clock_timeout
        while self.position < position:
            self.advanced.clear()
            left = deadline - runtime.clock.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.advanced.wait(), left)
        return True


async def _transfer(
    repository: Repository, source: UUID, target: UUID, amount: int, report: DemoReport
) -> bool:
    """Move ``amount``; False when declined (insufficient funds). Retries lost races."""
    for _ in range(MAX_ATTEMPTS):
        a = await repository.get(source, Account)
        b = await repository.get(target, Account)
        try:
            a.withdraw(amount=amount)
        except GuardRejectedError:
            return False
        b.deposit(amount=amount)
        # Stands in for the I/O a real command handler does between load and save, and
        # gives other tasks the chance to race us even on the in-memory store.
        await asyncio.sleep(0)
        try:
            await repository.save(a, b)
        except ConcurrencyError:
            report.conflicts += 1
            continue
        return True
    raise RuntimeError(f"a transfer lost the optimistic-concurrency race {MAX_ATTEMPTS} times")


async def _deposit(repository: Repository, account: UUID, amount: int, report: DemoReport) -> None:
    for _ in range(MAX_ATTEMPTS):
        a = await repository.get(account, Account)
        a.deposit(amount=amount)
        await asyncio.sleep(0)
        try:
            await repository.save(a)
        except ConcurrencyError:
            report.conflicts += 1
            continue
        return
    raise RuntimeError(f"a deposit lost the optimistic-concurrency race {MAX_ATTEMPTS} times")


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Any]:
    if not enabled:
        yield lambda: None
        return
    progress = Progress(
        TextColumn("commands"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err_console,
        transient=True,
    )
    with progress:
        task = progress.add_task("commands", total=total)
        yield lambda: progress.update(task, advance=1)


async def run_demo(
    runtime: Runtime,
    *,
    accounts: int = 8,
    workers: int = 16,
    commands: int = 25,
    show_progress: bool = False,
) -> DemoReport:
    """The demo's job on ``runtime``'s store; returns the report with its invariant checks."""
    store = await runtime.store()
    repository = Repository(store, clock=runtime.clock, snapshot_interval=100)
    run = runtime.new_id()
    report = DemoReport(run=run, store=store.url, accounts=accounts, workers=workers)
    started = runtime.clock.monotonic()
    report.first_position = await store.max_position() + 1

    with event_clock(runtime.clock):
        opened = [
            Account(run=run, name=f"acct-{i}", opening=OPENING_BALANCE) for i in range(accounts)
        ]
        ids = [account.id for account in opened]
        streams = {str(account_id) for account_id in ids}
        projection = BalanceProjection(store, repository, consumer=f"cblocks-demo-{run}")
        follower = asyncio.create_task(projection.follow(report.first_position, streams))
        try:
            await repository.save(*opened)
            report.money_expected = OPENING_BALANCE * accounts

            async def worker(n: int, tick: Any) -> None:
                rng = runtime.rng
                for _ in range(commands):
                    if rng.random() < 0.2:
                        amount = rng.randint(1, 50)
                        await _deposit(repository, rng.choice(ids), amount, report)
                        report.deposits += 1
                        report.money_expected += amount
                    else:
                        source, target = rng.sample(ids, 2)
                        if await _transfer(repository, source, target, rng.randint(1, 400), report):
                            report.transfers += 1
                        else:
                            report.declined += 1
                    tick()

            with _progress(show_progress, workers * commands) as tick:
                await asyncio.gather(*(worker(n, tick) for n in range(workers)))

            await _illegal_transition_check(repository, run, report)
            report.last_position = await store.max_position()
            caught_up = await projection.wait_for(report.last_position, 10.0, runtime)
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        await projection.record()

    report.seconds = runtime.clock.monotonic() - started
    await _verify(store, repository, ids, projection, caught_up, report)
    return report


async def _illegal_transition_check(repository: Repository, run: str, report: DemoReport) -> None:
    """Close an emptied account, then deposit into it: refused, and nothing is persisted."""
    account = Account(run=run, name="closing", opening=0)
    account.close()
    await repository.save(account)
    version = account.version
    refused = False
    try:
        account.deposit(amount=1)
    except IllegalTransitionError:
        refused = True
    await repository.save(account)  # nothing pending: appends nothing
    stored = await repository.store.stream_version(str(account.id))
    report.check(
        "illegal transition refused",
        refused and stored == version,
        f"deposit into a closed account raised IllegalTransitionError; stream stays at v{stored}",
    )


async def _verify(
    store: EventStore,
    repository: Repository,
    ids: list[UUID],
    projection: BalanceProjection,
    caught_up: bool,
    report: DemoReport,
) -> None:
    loaded = [await repository.get(account_id, Account) for account_id in ids]
    report.money_found = sum(account.balance for account in loaded)
    report.check(
        "money conserved",
        report.money_found == report.money_expected,
        f"sum of balances {report.money_found:,} = openings + deposits {report.money_expected:,}",
    )
    negative = [a.name for a in loaded if a.balance < 0]
    report.check("no negative balance", not negative, ", ".join(negative) or "all >= 0")

    counts_ok = True
    total = 0
    for account in loaded:
        events = await store.read(str(account.id))
        total += len(events)
        if [e.version for e in events] != list(range(1, account.version + 1)):
            counts_ok = False
    total += 2  # the closing account's two events
    report.events = total
    report.check(
        "stream versions dense",
        counts_ok,
        "every account's versions are 1..n with no gap or duplicate",
    )
    expected_events = report.accounts + 2 * report.transfers + report.deposits + 2
    report.check(
        "every command's events stored once",
        total == expected_events,
        f"{total:,} events = {report.accounts} opened + 2 x {report.transfers} transfers + "
        f"{report.deposits} deposits + 2 (closed account)",
    )
    report.projection_position = await store.consumer_position(projection.consumer)
    report.check(
        "projection caught up",
        caught_up
        and report.projection_position is not None
        and report.projection_position >= report.last_position,
        f"recorded position {report.projection_position} >= last position {report.last_position}",
    )
    agree = {str(a.id): a.balance for a in loaded} == {
        s: b for s, b in projection.balances.items() if s in {str(i) for i in ids}
    }
    report.check(
        "projection agrees with aggregates",
        agree,
        "balances rebuilt from the log = balances loaded through the repository",
    )


def _print_report(report: DemoReport) -> None:
    rate = report.events / report.seconds if report.seconds else 0.0
    summary = Table(show_header=False, box=None)
    summary.add_row("store", report.store)
    summary.add_row("run", report.run)
    summary.add_row("accounts", f"{report.accounts} (each opened with {OPENING_BALANCE:,})")
    summary.add_row("concurrent tasks", str(report.workers))
    summary.add_row("transfers committed", f"{report.transfers:,}")
    summary.add_row("transfers declined", f"{report.declined:,} (insufficient funds: a guard)")
    summary.add_row("deposits", f"{report.deposits:,}")
    summary.add_row("conflicts retried", f"{report.conflicts:,} (ConcurrencyError, reload, retry)")
    summary.add_row(
        "events appended",
        f"{report.events:,} at positions {report.first_position:,}..{report.last_position:,}",
    )
    summary.add_row("time", f"{report.seconds:.2f} s ({rate:,.0f} events/s)")
    console.print(Panel(summary, title="cblocks demo", expand=False))
    checks = Table(title="invariants")
    checks.add_column("check")
    checks.add_column("ok", justify="center")
    checks.add_column("detail")
    for check in report.checks:
        checks.add_row(check.name, "[green]yes[/]" if check.ok else "[bold red]NO[/]", check.detail)
    console.print(checks)
    if report.ok:
        console.print("[green]all invariants hold[/]")
    else:
        console.print("[bold red]an invariant failed[/]")


def demo_command(
    ctx: typer.Context,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            metavar="URL",
            help="Event store URL (default: EVENT_STORE_URL, else "
            "sqlite+aiosqlite:///cb-data/events.db).",
        ),
    ] = None,
    accounts: Annotated[int, typer.Option(min=2, help="Accounts to open.")] = 8,
    workers: Annotated[int, typer.Option(min=1, help="Concurrent tasks.")] = 16,
    commands: Annotated[int, typer.Option(min=1, help="Commands per task.")] = 25,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the random choices (default: a fresh one).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Event-sourced accounts, concurrent transfers with optimistic concurrency, a projection."""
    state = state_of(ctx)

    async def main() -> DemoReport:
        settings = load_settings() if store is None else load_settings(event_store_url=store)
        runtime = Runtime(settings, seed=seed, plugin_manager=state.plugin_manager())
        async with runtime:
            return await run_demo(
                runtime,
                accounts=accounts,
                workers=workers,
                commands=commands,
                show_progress=not as_json,
            )

    report = run_async(main)
    if as_json:
        print_json(report.as_json())
    else:
        _print_report(report)
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)
