"""``cblocks bench chaos`` runs and reports (two seeds, one round; speed is never asserted)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from collaborative_blocks.bench import chaos
from collaborative_blocks.cli import app
from collaborative_blocks.errors import NondeterminismError
from collaborative_blocks.simulations import SimulationResult, scenario_names

runner = CliRunner()


def test_bench_chaos_quick_json_reports_every_scenario_and_the_ci_projection() -> None:
    result = runner.invoke(app, ["bench", "chaos", "--quick", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["benchmark"] == "chaos"
    assert report["config"]["seeds"] == [0, 1]
    names = scenario_names()
    keys = [case["key"] for case in report["cases"]]
    assert keys == [k for n in names for k in (n, f"{n}-no-faults")] + ["ci"]
    for case in report["cases"]:
        assert case["unavailable"] is None
        ours = case["measurements"]["ours"]
        assert len(ours["samples"]) == 1
        assert ours["median"] > 0
        assert case["measurements"][case["baseline"]]["median"] > 0
        assert case["met"] in (True, False)
    first = report["cases"][0]
    assert first["unit"] == "deliveries/CPU-s"
    assert first["baseline"] == "target 50,000 deliveries/CPU-s"
    assert "seeds per CPU-minute" in first["notes"][0]
    assert "projected CI time for 510 seeds" in report["cases"][-1]["notes"][0]


def test_bench_chaos_markdown_has_a_row_per_case() -> None:
    result = runner.invoke(app, ["bench", "chaos", "--quick", "--markdown"])
    assert result.exit_code == 0, result.stderr
    assert "medians of 1 interleaved round(s)" in result.stdout
    assert "| pipeline: default faults vs target 50,000 deliveries/CPU-s" in result.stdout


async def test_a_run_whose_digest_changes_between_rounds_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    from collaborative_blocks.simulations import run_simulation as real

    def flaky(
        scenario: str, seed: int, faults: str | None = None, **kw: object
    ) -> SimulationResult:
        found = real(scenario, seed, faults, **kw)  # type: ignore[arg-type]
        if seed == 0:
            calls.append(seed)
        if len(calls) > 1:
            object.__setattr__(found, "digest", "changed")
        return found

    monkeypatch.setattr(chaos, "run_simulation", flaky)
    cfg = chaos.ChaosBenchConfig(rounds=2, seeds=(0,), scenarios=("pipeline",))
    with pytest.raises(NondeterminismError, match=r"seeds \[0\] gave other digests"):
        await chaos.run_chaos_bench(cfg)
