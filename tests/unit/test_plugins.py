"""The plugin system: built-ins, entry points, -p modules, errors naming the plugin."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from collaborative_blocks import hookimpl, open_store
from collaborative_blocks.core import hookspecs
from collaborative_blocks.core.plugins import make_plugin_manager, store_factories
from collaborative_blocks.errors import PluginError, UnknownSchemeError
from collaborative_blocks.stores import NewEvent
from collaborative_blocks.stores.memory import MemoryEventStore

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "plugins" / "readonly_store"


@pytest.fixture
def installed_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Install the example plugin the way pip does: the module plus a dist-info with its
    entry points, on sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(EXAMPLE / "cb_readonly_store.py", site)
    dist = site / "cb_readonly_store-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: cb-readonly-store\nVersion: 0.1.0\n"
    )
    (dist / "entry_points.txt").write_text("[collaborative_blocks]\nreadonly = cb_readonly_store\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("cb_readonly_store", None)


async def test_installed_plugin_is_found_through_its_entry_point(
    installed_example: Path, tmp_path: Path
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    pm = make_plugin_manager()
    assert pm.get_plugin("readonly") is not None
    writer = await open_store("memory://", plugin_manager=pm)
    await writer.close()
    # The example wraps any URL: write through the real store, read through the view.
    sqlite_store = await open_store(url, plugin_manager=pm)
    await sqlite_store.append("a", [NewEvent("T", b"1")], expected_version=0)
    await sqlite_store.close()
    view = await open_store("readonly+" + url, plugin_manager=pm)
    try:
        assert [e.state for e in await view.read("a")] == [b"1"]
        with pytest.raises(Exception, match="read-only") as raised:
            await view.append("a", [NewEvent("T", b"2")], expected_version=1)
        assert type(raised.value).__name__ == "ReadOnlyStoreError"
        assert await view.stream_version("a") == 1
    finally:
        await view.close()


async def test_plugin_named_with_p_is_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    try:
        pm = make_plugin_manager(["cb_readonly_store"], entry_points=False)
        assert "readonly+memory" in store_factories(pm)
        store = await open_store("readonly+memory://", plugin_manager=pm)
        assert await store.max_position() == 0
        await store.close()
    finally:
        sys.modules.pop("cb_readonly_store", None)


def test_unknown_plugin_module_is_a_plugin_error() -> None:
    with pytest.raises(PluginError, match="no_such_plugin_module"):
        make_plugin_manager(["no_such_plugin_module"])


def test_two_plugins_claiming_one_scheme_are_named() -> None:
    class Factory:
        schemes = ("memory",)

        async def open(self, url: str, *, clock: object) -> MemoryEventStore:
            return MemoryEventStore(url)

    class Duplicate:
        @hookimpl
        def cb_store_factories(self) -> list[Factory]:
            return [Factory()]

    pm = make_plugin_manager([Duplicate()], entry_points=False)
    with pytest.raises(PluginError, match=r"'memory' is provided by both"):
        store_factories(pm)


def test_hook_returning_a_non_list_is_rejected_with_the_plugin_name() -> None:
    class Broken:
        @hookimpl
        def cb_store_factories(self) -> object:
            return SimpleNamespace(schemes=("x",))

    pm = make_plugin_manager([Broken()], entry_points=False)
    with pytest.raises(PluginError, match="must return a list"):
        store_factories(pm)


def test_factory_without_open_is_rejected() -> None:
    class Broken:
        @hookimpl
        def cb_store_factories(self) -> list[object]:
            return [SimpleNamespace(schemes=("x",))]

    pm = make_plugin_manager([Broken()], entry_points=False)
    with pytest.raises(PluginError, match="async open"):
        store_factories(pm)


async def test_unknown_scheme_names_the_known_ones() -> None:
    with pytest.raises(UnknownSchemeError) as raised:
        await open_store("nosuch://x")
    assert "nosuch" in str(raised.value)
    assert "sqlite+aiosqlite" in str(raised.value)


def test_plugin_managers_are_independent() -> None:
    class Extra:
        @hookimpl
        def cb_store_factories(self) -> list[object]:
            return []

    first = make_plugin_manager([Extra()], entry_points=False)
    second = make_plugin_manager(entry_points=False)
    assert len(first.get_plugins()) == len(second.get_plugins()) + 1


def test_every_hookspec_is_documented() -> None:
    """A hook without a docstring, or missing from docs/writing-plugins.md, fails here."""
    names = [name for name in dir(hookspecs) if name.startswith("cb_")]
    assert names
    guide = (ROOT / "docs" / "writing-plugins.md").read_text()
    for name in names:
        doc = getattr(hookspecs, name).__doc__ or ""
        assert len(doc.split()) >= 8, f"{name} needs a docstring saying when it fires"
        assert f"`{name}`" in guide, f"docs/writing-plugins.md does not document {name}"


def test_builtin_plugins_import_only_the_public_package() -> None:
    """Built-in plugins are templates: they may not reach into private modules."""
    for path in (ROOT / "collaborative_blocks" / "plugins").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                private = [p for p in parts if p.startswith("_") and p != "__future__"]
                assert not private, f"{path}: {node.module}"


def test_import_does_no_work() -> None:
    """Importing the package starts no thread and opens no database."""
    code = (
        "import threading, sys; import collaborative_blocks; "
        "print(threading.active_count(), 'sqlalchemy.ext.asyncio' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.split() == ["1", "False"]
