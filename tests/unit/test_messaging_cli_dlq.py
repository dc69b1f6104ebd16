"""``cblocks dlq list|show|replay|purge`` against a durable dead-letter queue on SQLite."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from typer.testing import CliRunner

from collaborative_blocks import load_settings
from collaborative_blocks.cli.app import app
from collaborative_blocks.core.clock import VirtualClock
from collaborative_blocks.core.messaging import Message, MessageBroker, MessageType, RetryPolicy
from collaborative_blocks.plugins.transports.log import LogTransport, message_stream
from collaborative_blocks.stores import open_store


def make_dead_letters(url: str, count: int) -> None:
    async def run() -> None:
        store = await open_store(url)
        clock = VirtualClock()
        broker = MessageBroker(
            transport=LogTransport(store, clock=clock),
            store=store,
            clock=clock,
            settings=load_settings({}),
            tracing=False,
            retry=RetryPolicy(max_retries=0),
        )

        async def broken(message: Message) -> None:
            raise RuntimeError(f"cannot handle {message.payload}")

        await broker.subscribe("job", broken, group="workers")
        for n in range(count):
            await broker.publish(Message(MessageType.EVENT, "job", n, source="cli-test"))
        await asyncio.wait_for(broker.dlq.wait_for(count), 30)
        await broker.close()
        await store.close()

    asyncio.run(run())


def test_list_show_replay_purge(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    make_dead_letters(url, 3)
    runner = CliRunner()
    listed = runner.invoke(app, ["dlq", "list", "--store", url, "--json"])
    assert listed.exit_code == 0, listed.output
    letters = json.loads(listed.output)
    assert [letter["reason"] for letter in letters] == ["retries_exhausted"] * 3
    assert letters[0]["group"] == "workers"

    shown = runner.invoke(app, ["dlq", "show", letters[0]["id"], "--store", url])
    assert shown.exit_code == 0, shown.output
    detail = json.loads(shown.output)
    assert detail["message"]["payload"] == 0
    assert detail["errors"][0]["error"] == "cannot handle 0"

    replayed = runner.invoke(
        app, ["dlq", "replay", letters[0]["id"], "--store", url, "--broker", f"log+{url}"]
    )
    assert replayed.exit_code == 0, replayed.output

    async def republished() -> int:
        store = await open_store(url)
        try:
            return len(await store.read(message_stream("cb.events")))
        finally:
            await store.close()

    assert asyncio.run(republished()) == 4  # three originals and the replay

    purged = runner.invoke(app, ["dlq", "purge", letters[1]["id"], "--store", url])
    assert purged.exit_code == 0, purged.output
    assert "purged 1" in purged.output
    remaining = json.loads(runner.invoke(app, ["dlq", "list", "--store", url, "--json"]).output)
    assert [letter["id"] for letter in remaining] == [letters[2]["id"]]
    assert runner.invoke(app, ["dlq", "purge", "--store", url, "--yes"]).exit_code == 0
    assert json.loads(runner.invoke(app, ["dlq", "list", "--store", url, "--json"]).output) == []


def test_show_unknown_id_says_what_to_do(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    result = CliRunner().invoke(app, ["dlq", "show", "nope", "--store", url])
    assert result.exit_code == 2
    assert "cblocks dlq list" in result.output


def test_replay_needs_a_shared_transport(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    result = CliRunner().invoke(
        app, ["dlq", "replay", "x", "--store", url, "--broker", "memory://"]
    )
    assert result.exit_code == 2
    assert "--broker" in result.output
