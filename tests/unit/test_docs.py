"""Code in the docs is run by a test.

Every ```python block in README.md and docs/*.md runs, in order, one shared namespace per
file (like a notebook), in a temporary directory, with top-level ``await`` allowed. A block
whose info string is ``python skip`` is shown but not run: use it only for code that needs
something a test cannot have (a fragment of a larger program, a user's own module), and say so
next to it.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)


def blocks(path: Path) -> list[tuple[int, str]]:
    text = path.read_text()
    found = []
    for match in BLOCK.finditer(text):
        if "skip" in match.group(1).split():
            continue
        line = text.count("\n", 0, match.start()) + 2
        found.append((line, match.group(2)))
    return found


@pytest.mark.parametrize(
    "path", [p for p in DOCS if blocks(p)], ids=lambda p: str(p.relative_to(ROOT))
)
async def test_doc_code_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EVENT_STORE_URL", f"sqlite+aiosqlite:///{tmp_path / 'events.db'}")
    # A real (temporary) module, because some libraries import the module a class is defined
    # in: eventsourcing's Aggregate does, on class creation, and resolves event topics by it.
    module = types.ModuleType(f"cb_doc_{path.stem.replace('-', '_')}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace: dict[str, Any] = module.__dict__
    for line, source in blocks(path):
        code = compile(
            ast.parse(source, f"{path.name}:{line}"),
            f"{path.name}:{line}",
            "exec",
            flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
        )
        result = eval(code, namespace)  # running our own docs is the point
        if inspect.iscoroutine(result):
            await result
    # Close whatever the docs left open (stores), so no thread outlives the test.
    for value in list(namespace.values()):
        if isinstance(value, type):
            continue
        close = getattr(value, "close", None)
        if close is not None and inspect.iscoroutinefunction(close):
            await close()
    await asyncio.sleep(0)
