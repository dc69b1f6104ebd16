"""``cblocks dlq``: the durable dead-letter queue of the brokers that share an event store.

Dead letters are events in the store (stream ``cb-dead-letters``), so these commands read
them from ``--store`` (default ``EVENT_STORE_URL``) without a running broker. ``replay``
re-publishes through the transport of ``--broker`` (default ``MESSAGE_BROKER_URL``).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from collaborative_blocks.cli._common import console, fail, print_json, run_async, state_of
from collaborative_blocks.core.clock import SystemClock
from collaborative_blocks.core.messaging.broker import MessageBroker
from collaborative_blocks.core.messaging.deadletters import DeadLetter, DeadLetterQueue
from collaborative_blocks.core.randomness import new_random
from collaborative_blocks.core.runtime import Runtime
from collaborative_blocks.core.settings import load_settings
from collaborative_blocks.stores import EventStore, open_store

app = typer.Typer(help="Dead letters: list, show, replay and purge them.", no_args_is_help=True)

StoreOption = Annotated[
    str | None,
    typer.Option("--store", metavar="URL", help="Event store URL (default: EVENT_STORE_URL)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


async def _open(ctx: typer.Context, url: str | None) -> EventStore:
    if url is None:
        url = load_settings().event_store_url
    return await open_store(url, plugin_manager=state_of(ctx).plugin_manager())


def _queue(store: EventStore) -> DeadLetterQueue:
    return DeadLetterQueue(clock=SystemClock(), rng=new_random(), store=store)


def _summary(letter: DeadLetter) -> dict[str, Any]:
    message = letter.message
    return {
        "id": letter.id,
        "reason": letter.reason.value,
        "subject": letter.subject,
        "group": letter.group,
        "message_id": letter.message_id,
        "name": message.name if message is not None else None,
        "attempts": len(letter.errors),
        "detail": letter.detail,
    }


@app.command("list")
def list_command(
    ctx: typer.Context,
    store: StoreOption = None,
    limit: Annotated[int, typer.Option(help="Show at most this many.")] = 100,
    as_json: JsonOption = False,
) -> None:
    """List dead letters, oldest first."""

    async def run() -> list[DeadLetter]:
        opened = await _open(ctx, store)
        try:
            return await _queue(opened).list(limit=limit)
        finally:
            await opened.close()

    letters = run_async(run)
    if as_json:
        print_json([_summary(letter) for letter in letters])
        return
    columns = ("id", "reason", "subject", "group", "name", "attempts", "detail")
    table = Table(title=f"{len(letters)} dead letter(s)")
    for column in columns:
        table.add_column(column)
    for letter in letters:
        row = _summary(letter)
        table.add_row(*(str(row[c]) if row[c] is not None else "" for c in columns))
    console.print(table)


@app.command("show")
def show_command(ctx: typer.Context, letter_id: str, store: StoreOption = None) -> None:
    """Everything about one dead letter: the message, the reason, every attempt's error."""

    async def run() -> DeadLetter:
        opened = await _open(ctx, store)
        try:
            return await _queue(opened).get(letter_id)
        finally:
            await opened.close()

    print_json(run_async(run).to_dict())


@app.command("replay")
def replay_command(
    ctx: typer.Context,
    letter_id: str,
    store: StoreOption = None,
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker", metavar="URL", help="Transport URL (default: MESSAGE_BROKER_URL)."
        ),
    ] = None,
) -> None:
    """Re-publish a dead letter's message to where it was headed, then drop it."""
    settings = load_settings()
    url = broker or settings.message_broker_url
    if url is None or url.startswith("memory"):
        fail(
            "replay needs a transport other processes consume from; give --broker URL "
            "(e.g. log+sqlite+aiosqlite:///events.db, redis://localhost:6379)"
        )

    async def run() -> str:
        opened = await _open(ctx, store)
        runtime = Runtime(settings, plugin_manager=state_of(ctx).plugin_manager(), store=opened)
        messages = MessageBroker(url, runtime=runtime, store=opened, required_guarantees=())
        try:
            message = await messages.dead_letters().replay(letter_id)
            return message.id
        finally:
            await messages.close()
            await opened.close()

    message_id = run_async(run)
    console.print(f"replayed dead letter {letter_id} (message {message_id})")


@app.command("purge")
def purge_command(
    ctx: typer.Context,
    letter_ids: Annotated[
        list[str] | None, typer.Argument(help="Ids to drop (default: all).")
    ] = None,
    store: StoreOption = None,
    yes: Annotated[bool, typer.Option("--yes", help="Purge all without asking.")] = False,
) -> None:
    """Drop dead letters (the given ids, or all of them)."""
    if not letter_ids and not yes:
        typer.confirm("Purge ALL dead letters?", abort=True)

    async def run() -> int:
        opened = await _open(ctx, store)
        try:
            return await _queue(opened).purge(letter_ids or None)
        finally:
            await opened.close()

    removed = run_async(run)
    console.print(f"purged {removed} dead letter(s)")
    if letter_ids and removed < len(letter_ids):
        fail(f"{len(letter_ids) - removed} of the given ids were not queued", code=1)
