"""``cblocks events``: look at the event log (streams, events, live tail, counts)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

import typer
from rich.table import Table

from collaborative_blocks.cli._common import console, fail, print_json, run_async, state_of
from collaborative_blocks.core.settings import load_settings
from collaborative_blocks.stores import EventStore, StoredEvent, open_store

app = typer.Typer(help="Inspect the event log: streams, events, a live tail, statistics.")

StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        metavar="URL",
        help="Event store URL (default: EVENT_STORE_URL, else sqlite+aiosqlite:///cb-data/events.db).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
TopicOption = Annotated[
    list[str] | None,
    typer.Option("--topic", metavar="TOPIC", help="Only events with this topic (repeatable)."),
]

#: How many characters of an event's state a table shows.
STATE_PREVIEW = 60


async def _open(ctx: typer.Context, url: str | None) -> EventStore:
    state = state_of(ctx)
    if url is None:
        url = load_settings().event_store_url
    return await open_store(url, plugin_manager=state.plugin_manager())


def state_text(state: bytes) -> str | None:
    """The state as text when it is UTF-8 JSON (what eventsourcing's transcoder writes)."""
    try:
        text = state.decode("utf-8")
        json.loads(text)
    except (UnicodeDecodeError, ValueError):
        return None
    return text


def event_json(event: StoredEvent) -> dict[str, Any]:
    text = state_text(event.state)
    data: dict[str, Any] = {
        "position": event.position,
        "stream": event.stream,
        "version": event.version,
        "topic": event.topic,
        "size": len(event.state),
    }
    if text is not None:
        data["state"] = json.loads(text)
    else:
        data["state_hex"] = event.state.hex()
    return data


def _state_cell(state: bytes) -> str:
    text = state_text(state)
    if text is None:
        # Compressed or encrypted state (or any non-JSON codec): its size is what helps.
        head = state[:8].hex()
        return f"<{len(state)} bytes: {head}{'…' if len(state) > 8 else ''}>"
    return text if len(text) <= STATE_PREVIEW else text[: STATE_PREVIEW - 1] + "…"


def _events_table(title: str, events: list[StoredEvent]) -> Table:
    table = Table(title=title)
    table.add_column("position", justify="right")
    table.add_column("stream")
    table.add_column("version", justify="right")
    table.add_column("topic")
    table.add_column("state", overflow="fold")
    for event in events:
        table.add_row(
            str(event.position),
            event.stream,
            str(event.version),
            event.topic,
            _state_cell(event.state),
        )
    return table


async def follow(
    store: EventStore, start: int, topics: Sequence[str], idle: float
) -> AsyncIterator[StoredEvent]:
    """``store.subscribe`` that also sees other processes' commits on an in-process store.

    A store's live signal may only fire for commits of this process (SQLite's does): the
    tail runs in its own process, so after ``idle`` seconds without an event it subscribes
    again from the next position, and the subscription's catch-up read finds what others
    committed. Only events already handed out advance the position: no gap, no duplicate.
    """
    next_position = start
    while True:
        events = store.subscribe(from_position=next_position, topics=topics)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(anext(events), idle)
                except TimeoutError:
                    break
                next_position = event.position + 1
                yield event
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()


@app.command("streams")
def streams_command(
    ctx: typer.Context,
    store: StoreOption = None,
    prefix: Annotated[str, typer.Option(help="Only streams whose id starts with this.")] = "",
    limit: Annotated[int, typer.Option(min=1, help="At most this many streams.")] = 100,
    as_json: JsonOption = False,
) -> None:
    """List streams: id, version, first and last global position."""

    async def main() -> None:
        es = await _open(ctx, store)
        try:
            found = await es.streams(prefix=prefix, limit=limit)
        finally:
            await es.close()
        if as_json:
            print_json(
                [
                    {
                        "stream": s.stream,
                        "version": s.version,
                        "first_position": s.first_position,
                        "last_position": s.last_position,
                    }
                    for s in found
                ]
            )
            return
        table = Table(title=f"streams in {es.url}" + (f" starting {prefix!r}" if prefix else ""))
        table.add_column("stream")
        table.add_column("version", justify="right")
        table.add_column("first position", justify="right")
        table.add_column("last position", justify="right")
        for s in found:
            table.add_row(s.stream, str(s.version), str(s.first_position), str(s.last_position))
        console.print(table)
        if len(found) == limit:
            console.print(f"[dim](first {limit}; use --limit or --prefix for more)[/]")

    run_async(main)


@app.command("read")
def read_command(
    ctx: typer.Context,
    stream: Annotated[str | None, typer.Argument(help="The stream to read.")] = None,
    read_all: Annotated[
        bool, typer.Option("--all", help="Read the whole log in global order instead.")
    ] = False,
    from_version: Annotated[
        int, typer.Option(min=0, help="With STREAM: start at this version.")
    ] = 0,
    from_position: Annotated[
        int, typer.Option(min=1, help="With --all: start at this global position.")
    ] = 1,
    topic: TopicOption = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many events.")] = 100,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print one stream's events, or (with --all) the log from a global position."""
    if (stream is None) == (not read_all):
        fail("give either a STREAM or --all (not both, not neither)")
    topics = tuple(topic or ())

    async def main() -> None:
        es = await _open(ctx, store)
        try:
            if stream is not None:
                if topics:
                    # The store filters by topic only across the log; a stream is short.
                    events = await es.read(stream, from_version=from_version)
                    events = [e for e in events if e.topic in topics][:limit]
                else:
                    events = await es.read(stream, from_version=from_version, limit=limit)
                title = f"{stream} in {es.url}"
            else:
                events = await es.read_all(from_position=from_position, limit=limit, topics=topics)
                title = f"log of {es.url} from position {from_position}"
        finally:
            await es.close()
        if as_json:
            print_json([event_json(e) for e in events])
        else:
            console.print(_events_table(title, events))
            if not events:
                console.print("[dim](no events)[/]")

    run_async(main)


@app.command("tail")
def tail_command(
    ctx: typer.Context,
    from_position: Annotated[
        int | None,
        typer.Option(min=1, help="Start at this global position (default: the end of the log)."),
    ] = None,
    count: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many events (for scripts).")
    ] = None,
    topic: TopicOption = None,
    poll: Annotated[
        float,
        typer.Option(
            min=0.01,
            metavar="SECONDS",
            help="When idle this long, catch up again: sees commits of other processes on "
            "stores that only signal their own (SQLite).",
        ),
    ] = 1.0,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Follow the log live: every new event as it commits (Ctrl-C to stop).

    With --json, one JSON object per line.
    """
    topics = tuple(topic or ())

    async def main() -> None:
        es = await _open(ctx, store)
        try:
            start = from_position if from_position is not None else await es.max_position() + 1
            if not as_json:
                console.print(f"[dim]following {es.url} from position {start}[/]")
            seen = 0
            async for event in follow(es, start, topics, poll):
                if as_json:
                    print(json.dumps(event_json(event)), flush=True)
                else:
                    console.print(
                        f"[cyan]{event.position:>8}[/] {event.stream} "
                        f"[dim]v{event.version}[/] [bold]{event.topic}[/] "
                        f"{_state_cell(event.state)}",
                        highlight=False,
                    )
                seen += 1
                if count is not None and seen >= count:
                    break
        finally:
            await es.close()

    run_async(main)


@app.command("stats")
def stats_command(
    ctx: typer.Context,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Counts: events, streams, the last position, events per topic, consumer positions."""

    async def main() -> None:
        es = await _open(ctx, store)
        try:
            stats = await es.stats()
        finally:
            await es.close()
        if as_json:
            print_json(
                {
                    "store": es.url,
                    "events": stats.events,
                    "streams": stats.streams,
                    "max_position": stats.max_position,
                    "topics": stats.topics,
                    "consumers": stats.consumers,
                }
            )
            return
        summary = Table(title="event log", show_header=False)
        summary.add_row("store", es.url)
        summary.add_row("events", str(stats.events))
        summary.add_row("streams", str(stats.streams))
        summary.add_row("last position", str(stats.max_position))
        console.print(summary)
        topics = Table(title="events per topic")
        topics.add_column("topic")
        topics.add_column("events", justify="right")
        for name, n in sorted(stats.topics.items(), key=lambda item: (-item[1], item[0])):
            topics.add_row(name, str(n))
        console.print(topics)
        consumers = Table(title="consumers")
        consumers.add_column("consumer")
        consumers.add_column("position", justify="right")
        for name, position in sorted(stats.consumers.items()):
            consumers.add_row(name, "-" if position is None else str(position))
        console.print(consumers)

    run_async(main)
