"""The ``cblocks`` command, through typer's CliRunner."""

from __future__ import annotations

import asyncio
import json
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from collaborative_blocks import hookimpl
from collaborative_blocks.cli import app
from collaborative_blocks.core.clock import Clock
from collaborative_blocks.stores import EventStore, NewEvent, Tracking
from collaborative_blocks.stores.base import CommitWaiter
from collaborative_blocks.stores.memory import MemoryEventStore

runner = CliRunner()

PLUGIN = "cb_cli_test_plugin"


class FixtureStore(MemoryEventStore):
    """Pre-filled; once a subscriber has caught up and waits, two more events commit."""

    def __init__(self) -> None:
        super().__init__("fixture://")
        self._live_sent = False
        self._tasks: list[asyncio.Task[None]] = []

    def _new_events_waiter(self) -> CommitWaiter:
        waiter = super()._new_events_waiter()
        if not self._live_sent and self._log:
            self._live_sent = True
            # Appending synchronously here would notify before the waiter exists; the
            # memory store's append never yields, so a task gives the same order every run.
            self._tasks.append(asyncio.get_running_loop().create_task(self._append_live()))
        return waiter

    async def _append_live(self) -> None:
        await self.append("account-2", [NewEvent("Live", b'{"n": 1}')], expected_version=1)
        await self.append("account-2", [NewEvent("Live", b'{"n": 2}')], expected_version=2)


class NeverWaiter(CommitWaiter):
    async def wait(self) -> None:
        await asyncio.Event().wait()


class OtherProcessStore(FixtureStore):
    """Its live signal never fires, as when the commits come from another process."""

    def _new_events_waiter(self) -> CommitWaiter:
        super()._new_events_waiter()
        return NeverWaiter()


class FixtureStoreFactory:
    schemes = ("fixture", "otherprocess")

    async def open(self, url: str, *, clock: Clock) -> EventStore:
        store = OtherProcessStore() if url.startswith("otherprocess") else FixtureStore()
        await store.append(
            "account-1",
            [NewEvent("Opened", b'{"owner": "ada"}'), NewEvent("Deposited", b'{"amount": 5}')],
            expected_version=0,
        )
        await store.append(
            "account-2",
            [NewEvent("Opened", b"\x00\x01binary")],
            expected_version=0,
            tracking=Tracking("projection", position=2),
        )
        return store


@hookimpl
def cb_store_factories() -> Sequence[object]:
    return [FixtureStoreFactory()]


@pytest.fixture(autouse=True)
def plugin_module(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType(PLUGIN)
    module.cb_store_factories = cb_store_factories  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, PLUGIN, module)


def cblocks(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["-p", PLUGIN, *args])
    return result.exit_code, result.stdout, result.stderr


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("events", "plugins", "bench", "demo", "--plugin"):
        assert name in result.stdout


def test_streams_table_and_json() -> None:
    code, out, _ = cblocks("events", "streams", "--store", "fixture://")
    assert code == 0
    assert "account-1" in out
    assert "account-2" in out
    code, out, _ = cblocks("events", "streams", "--store", "fixture://", "--json")
    assert code == 0
    assert json.loads(out) == [
        {"stream": "account-1", "version": 2, "first_position": 1, "last_position": 2},
        {"stream": "account-2", "version": 1, "first_position": 3, "last_position": 3},
    ]


def test_streams_prefix_and_limit() -> None:
    code, out, _ = cblocks(
        "events", "streams", "--store", "fixture://", "--prefix", "account-2", "--json"
    )
    assert code == 0
    assert [s["stream"] for s in json.loads(out)] == ["account-2"]
    code, out, _ = cblocks("events", "streams", "--store", "fixture://", "--limit", "1", "--json")
    assert [s["stream"] for s in json.loads(out)] == ["account-1"]


def test_read_stream_shows_json_state_as_text_and_binary_as_size() -> None:
    code, out, _ = cblocks("events", "read", "account-1", "--store", "fixture://", "--json")
    assert code == 0
    events = json.loads(out)
    assert [e["topic"] for e in events] == ["Opened", "Deposited"]
    assert events[0]["state"] == {"owner": "ada"}
    code, out, _ = cblocks("events", "read", "account-2", "--store", "fixture://", "--json")
    assert json.loads(out)[0]["state_hex"] == b"\x00\x01binary".hex()
    code, out, _ = cblocks("events", "read", "account-2", "--store", "fixture://")
    assert code == 0
    assert "<8 bytes" in out
    code, out, _ = cblocks("events", "read", "account-1", "--store", "fixture://")
    assert '"owner": "ada"' in out


def test_read_all_from_position_with_topic_filter() -> None:
    code, out, _ = cblocks(
        "events", "read", "--all", "--from-position", "2", "--store", "fixture://", "--json"
    )
    assert code == 0
    assert [e["position"] for e in json.loads(out)] == [2, 3]
    code, out, _ = cblocks(
        "events", "read", "--all", "--topic", "Opened", "--store", "fixture://", "--json"
    )
    assert [e["position"] for e in json.loads(out)] == [1, 3]


def test_read_needs_a_stream_or_all() -> None:
    code, _, err = cblocks("events", "read", "--store", "fixture://")
    assert code == 2
    assert "STREAM or --all" in err


def test_tail_catches_up_then_follows_live() -> None:
    code, out, _ = cblocks(
        "events", "tail", "--from-position", "2", "--count", "4", "--store", "fixture://", "--json"
    )
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [e["position"] for e in lines] == [2, 3, 4, 5]
    assert lines[-1]["state"] == {"n": 2}


def test_tail_from_the_end_shows_only_new_events() -> None:
    code, out, _ = cblocks("events", "tail", "--count", "2", "--store", "fixture://")
    assert code == 0
    assert "following fixture:// from position 4" in out
    assert "Live" in out
    assert "Opened" not in out


def test_tail_sees_commits_its_store_does_not_signal() -> None:
    code, out, _ = cblocks(
        "events", "tail", "--count", "2", "--poll", "0.05", "--store", "otherprocess://", "--json"
    )
    assert code == 0
    assert [json.loads(line)["position"] for line in out.splitlines()] == [4, 5]


def test_stats() -> None:
    code, out, _ = cblocks("events", "stats", "--store", "fixture://", "--json")
    assert code == 0
    stats = json.loads(out)
    assert stats["events"] == 3
    assert stats["streams"] == 2
    assert stats["topics"] == {"Opened": 2, "Deposited": 1}
    assert stats["consumers"] == {"projection": 2}
    code, out, _ = cblocks("events", "stats", "--store", "fixture://")
    assert code == 0
    assert "projection" in out


def test_default_store_comes_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENT_STORE_URL", "fixture://")
    code, out, _ = cblocks("events", "stats", "--json")
    assert code == 0
    assert json.loads(out)["store"] == "fixture://"


def test_unknown_scheme_is_a_message_and_exit_2() -> None:
    code, _, err = cblocks("events", "streams", "--store", "nosuch://x")
    assert code == 2
    assert "UnknownSchemeError" in err
    assert "nosuch" in err
    assert "Traceback" not in err


def test_bad_setting_is_a_message_and_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENT_STORE_URL", "not-a-url")
    code, _, err = cblocks("events", "stats")
    assert code == 2
    assert "EVENT_STORE_URL" in err


def test_unimportable_plugin_is_a_message_and_exit_2() -> None:
    result = runner.invoke(app, ["-p", "no_such_module_here", "plugins"])
    assert result.exit_code == 2
    assert "no_such_module_here" in result.stderr


def test_plugins_lists_builtins_and_p_plugins_with_their_hooks() -> None:
    code, out, _ = cblocks("plugins", "--json")
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["collaborative_blocks.plugins.stores"]["source"] == "built-in"
    assert rows["collaborative_blocks.plugins.stores"]["hooks"] == ["cb_store_factories"]
    assert rows[PLUGIN] == {"name": PLUGIN, "source": "-p", "hooks": ["cb_store_factories"]}
    code, out, _ = cblocks("plugins")
    assert code == 0
    assert PLUGIN in out


def test_demo_on_memory_holds_its_invariants() -> None:
    code, out, err = cblocks(
        "demo",
        "--store",
        "memory://",
        "--accounts",
        "3",
        "--workers",
        "4",
        "--commands",
        "5",
        "--seed",
        "7",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] is True
    assert report["transfers"] + report["declined"] + report["deposits"] == 20
    assert report["money_found"] == report["money_expected"]
    assert report["projection_position"] == report["last_position"]
    assert {c["name"] for c in report["checks"]} >= {
        "money conserved",
        "projection caught up",
        "illegal transition refused",
    }


def test_demo_is_rerunnable_on_the_same_sqlite_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    runs = []
    for _ in range(2):
        # The default store: EVENT_STORE_URL unset means cb-data/events.db under the cwd.
        monkeypatch.delenv("EVENT_STORE_URL", raising=False)
        code, out, err = cblocks("demo", "--workers", "3", "--commands", "4", "--json")
        assert code == 0, err
        runs.append(json.loads(out))
    assert runs[0]["store"] == runs[1]["store"] == "sqlite+aiosqlite:///cb-data/events.db"
    assert runs[0]["run"] != runs[1]["run"]
    assert runs[1]["first_position"] == runs[0]["last_position"] + 1
    code, out, _ = cblocks("demo", "--workers", "2", "--commands", "2")
    assert code == 0
    assert "all invariants hold" in out


def test_demo_exits_1_when_an_invariant_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from collaborative_blocks.cli import demo

    # A projection that drops every event can neither agree nor be trusted.
    monkeypatch.setattr(demo.BalanceProjection, "_apply", lambda self, stored: None)
    code, out, _ = cblocks("demo", "--store", "memory://", "--workers", "2", "--commands", "2")
    assert code == 1
    assert "an invariant failed" in out


def test_unreachable_database_is_a_message_and_exit_2() -> None:
    # Port 1 refuses connections at once: no server needed, nothing waits.
    code, _, err = cblocks(
        "events", "stats", "--store", "postgresql+asyncpg://postgres@127.0.0.1:1/nothing"
    )
    assert code == 2
    assert "StoreUnavailableError" in err
    assert "Traceback" not in err


def test_read_stream_with_limit_and_topic() -> None:
    code, out, _ = cblocks(
        "events", "read", "account-1", "--limit", "1", "--store", "fixture://", "--json"
    )
    assert code == 0
    assert [e["topic"] for e in json.loads(out)] == ["Opened"]
    code, out, _ = cblocks(
        "events", "read", "account-1", "--topic", "Deposited", "--store", "fixture://", "--json"
    )
    assert [e["version"] for e in json.loads(out)] == [2]
