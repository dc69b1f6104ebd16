"""Markers by folder: tests/unit -> unit, tests/property -> property, and so on."""

from __future__ import annotations

from pathlib import Path

import pytest

_FOLDER_MARKERS = ("unit", "property", "integration", "simulation")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        try:
            folder = Path(str(item.fspath)).relative_to(root).parts[0]
        except ValueError:
            continue
        if folder in _FOLDER_MARKERS:
            item.add_marker(getattr(pytest.mark, folder))
