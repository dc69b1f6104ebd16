"""Markers by folder: tests/unit -> unit, tests/property -> property, and so on; and the
hypothesis profiles.

Hypothesis profiles (``CB_HYPOTHESIS_PROFILE``): ``dev`` (the default) draws new examples on
every run, so property tests keep exploring on developers' machines, and replays failures
from the local example database first; ``ci`` (set by ``.ci/run``) is derandomized: the
examples are a function of the code alone, so CI passes or fails on what a commit changed,
never on the luck of the draw. A plan that fails anywhere is kept as a regression run in
tests/simulation/test_found_plans.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("dev")
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("CB_HYPOTHESIS_PROFILE", "dev"))

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
