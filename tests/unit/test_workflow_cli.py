"""``cblocks workflow validate|run|show|resume`` and ``cblocks bench workflow`` (tiny sizes;
performance is never asserted here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from collaborative_blocks.cli import app

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "workflows"
ORDER = str(EXAMPLES / "order.yaml")
SYSTEMS = str(EXAMPLES / "order_systems.py")


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"


def _run(store: str, data: dict[str, object], run_id: str) -> tuple[int, dict[str, object]]:
    result = runner.invoke(
        app,
        [
            "workflow",
            "run",
            ORDER,
            "--handlers",
            SYSTEMS,
            "--input",
            json.dumps(data),
            "--store",
            store,
            "--run-id",
            run_id,
            "--json",
        ],
    )
    return result.exit_code, json.loads(result.stdout)


def test_validate_prints_the_order() -> None:
    result = runner.invoke(app, ["workflow", "validate", ORDER, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "workflow_id": "order",
        "order": ["reserve", "fraud-check", "charge", "ship"],
    }


def test_validate_names_the_step_of_a_bad_definition(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "workflow_id: w\nsteps:\n"
        "  - {id: a, target: t, action: x}\n"
        "  - {id: b, target: t, action: y, depends_on: [nope]}\n"
    )
    result = runner.invoke(app, ["workflow", "validate", str(bad)])
    assert result.exit_code == 2
    assert "'b'" in result.stderr
    assert "nope" in result.stderr


def test_run_completes_and_show_reads_the_history_back(store: str) -> None:
    code, result = _run(store, {"order_id": 7, "amount": 120, "fail_shipping": False}, "ok-1")
    assert code == 0
    assert result["status"] == "completed"
    steps = result["steps"]
    assert isinstance(steps, dict)
    assert steps["ship"]["output"] == {"tracking": "t-7"}
    assert steps["charge"]["output"] == {"charge_id": "c-7", "amount": 120}

    shown = runner.invoke(app, ["workflow", "show", "ok-1", "--store", store, "--json"])
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.stdout)
    assert report["result"] == result
    names = [event["name"] for event in report["history"]]
    assert names[0] == "Created"
    assert len(names) >= 1 + 4  # created + at least one event per step


def test_a_failing_step_compensates_and_exits_1(store: str) -> None:
    code, result = _run(store, {"order_id": 8, "amount": 50, "fail_shipping": True}, "bad-1")
    assert code == 1
    assert result["status"] == "compensated"
    steps = result["steps"]
    assert isinstance(steps, dict)
    assert steps["ship"]["status"] == "failed"
    assert steps["ship"]["attempts"] == 3  # the first try and max_retries=2
    assert steps["charge"]["compensation"]["action"] == "refund"
    assert steps["charge"]["compensation"]["status"] == "compensated"
    assert steps["reserve"]["compensation"]["action"] == "release"
    assert steps["fraud-check"]["compensation"]["action"] is None


def test_table_output_names_the_history_command(store: str) -> None:
    result = runner.invoke(
        app,
        [
            "workflow",
            "run",
            ORDER,
            "--handlers",
            SYSTEMS,
            "--input",
            '{"order_id": 9, "amount": 5, "fail_shipping": false}',
            "--store",
            store,
            "--run-id",
            "table-1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "completed" in result.stdout
    assert "cblocks workflow show table-1" in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--input", "{not json"], "--input is not JSON"),
        (["--input", "[1, 2]"], "must be a JSON object"),
        (["--handlers", "no/such/file.py"], "no such file"),
        (["--handlers", "json:nothing_here"], "has no function 'nothing_here'"),
    ],
)
def test_bad_options_are_exit_2_with_what_to_fix(
    store: str, args: list[str], expected: str
) -> None:
    result = runner.invoke(app, ["workflow", "run", ORDER, "--store", store, *args])
    assert result.exit_code == 2
    assert expected in result.stderr


def test_unknown_file_and_unknown_run_are_exit_2(store: str) -> None:
    missing = runner.invoke(app, ["workflow", "run", "nope.yaml", "--store", store])
    assert missing.exit_code == 2
    assert "no workflow file" in missing.stderr
    unknown = runner.invoke(app, ["workflow", "show", "no-such-run", "--store", store])
    assert unknown.exit_code == 2
    assert "no workflow run 'no-such-run'" in unknown.stderr


def test_resume_with_nothing_unfinished(store: str) -> None:
    result = runner.invoke(app, ["workflow", "resume", "--store", store, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []


def test_bench_workflow_quick_json_reports_every_case() -> None:
    result = runner.invoke(app, ["bench", "workflow", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["benchmark"] == "workflow"
    assert [case["key"] for case in report["cases"]] == [
        "overhead",
        "durable",
        "condition",
        "breaker",
    ]
    for case in report["cases"]:
        assert case["measurements"]["ours"]["median"] > 0
        assert case["met"] in (True, False)
    overhead = report["cases"][0]
    assert any("engine overhead per step" in note for note in overhead["notes"])
