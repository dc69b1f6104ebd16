"""Scenarios: the built-ins, users' scenarios through the cb_chaos_scenarios hook (the
documented example in simulations/scenarios/__init__.py runs as a plugin), bad plugins."""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import collaborative_blocks.simulations.scenarios as scenarios
from collaborative_blocks.errors import PluginError, UnknownScenarioError
from collaborative_blocks.simulations import FaultPlan, get_scenario, run_simulation, scenario_names


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Iterator[Path]:
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.startswith("cb_sim_test_")]:
            del sys.modules[name]


def test_the_built_ins_are_listed_and_described() -> None:
    names = scenario_names()
    assert names[:3] == ["transfers", "pipeline", "replicas"]
    for name in names[:3]:
        scenario = get_scenario(name)
        assert scenario.name == name
        assert scenario.description
        assert scenario.required_coverage
        assert "liveness" in scenario.invariants
        assert not FaultPlan.parse(scenario.default_faults).is_empty


def test_an_unknown_scenario_lists_the_known_ones() -> None:
    with pytest.raises(UnknownScenarioError, match="transfers, pipeline, replicas"):
        get_scenario("nope")
    with pytest.raises(UnknownScenarioError):
        run_simulation("nope", 1)


def test_the_documented_example_runs_as_a_plugin(plugin_dir: Path) -> None:
    doc = scenarios.__doc__ or ""
    code = re.search(r"```python\n(.*?)```", doc, re.S)
    assert code is not None
    (plugin_dir / "cb_sim_test_ping.py").write_text(code.group(1))
    assert "ping" in scenario_names(["cb_sim_test_ping"])
    result = run_simulation("ping", 4, plugins=["cb_sim_test_ping"])
    assert result.ok, [str(v) for v in result.violations]
    assert result.replay_command.endswith("-p cb_sim_test_ping")


def test_a_scenario_name_taken_twice_is_an_error(plugin_dir: Path) -> None:
    (plugin_dir / "cb_sim_test_dup.py").write_text(
        textwrap.dedent(
            """
            from collaborative_blocks import hookimpl
            from collaborative_blocks.simulations.scenarios import Scenario

            class Again(Scenario):
                name = "transfers"

            @hookimpl
            def cb_chaos_scenarios():
                return [Again]
            """
        )
    )
    with pytest.raises(PluginError, match="'transfers' is provided by both"):
        scenario_names(["cb_sim_test_dup"])


def test_a_hook_returning_something_else_is_an_error(plugin_dir: Path) -> None:
    (plugin_dir / "cb_sim_test_bad.py").write_text(
        textwrap.dedent(
            """
            from collaborative_blocks import hookimpl

            @hookimpl
            def cb_chaos_scenarios():
                return [object()]
            """
        )
    )
    with pytest.raises(PluginError, match="return Scenario subclasses or instances"):
        scenario_names(["cb_sim_test_bad"])
