"""``cblocks bench store`` runs and reports (tiny sizes; performance is never asserted here)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable

import pytest
from typer.testing import CliRunner

from collaborative_blocks.bench._stats import CaseResult, Measurement, interleave
from collaborative_blocks.cli import app
from collaborative_blocks.testing.services import require_redis, services_required

runner = CliRunner()


def test_bench_store_quick_json_reports_every_case() -> None:
    result = runner.invoke(app, ["bench", "store", "--quick", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["benchmark"] == "store"
    assert report["machine"]["nproc"] >= 1
    assert report["config"]["rounds"] == 1
    keys = [case["key"] for case in report["cases"]]
    assert keys == [
        "a-sqlite-sequential",
        "b-sqlite-concurrent",
        "c-sqlite-batch",
        "d-aggregate-load",
    ]
    for case in report["cases"]:
        baseline = case["measurements"][case["baseline"]]
        assert len(baseline["samples"]) == 1
        assert baseline["median"] > 0
        if case["unavailable"] is None:
            assert case["measurements"]["ours"]["median"] > 0
            assert case["ratio"] > 0
            assert case["met"] in (True, False)
        else:
            assert case["ratio"] is None
            assert case["met"] is None


def test_bench_store_quick_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from collaborative_blocks.cli._common import console

    # The runner is not a terminal, so rich would fold the table into 80 columns.
    monkeypatch.setattr(console, "width", 200)
    result = runner.invoke(app, ["bench", "store", "--quick", "--case", "a,c"])
    assert result.exit_code == 0, result.stderr
    assert "vs raw sqlite3 executemany" in result.stdout
    assert "per round" in result.stdout
    assert "aggregate" not in result.stdout


def test_bench_store_unknown_case_is_exit_2() -> None:
    result = runner.invoke(app, ["bench", "store", "--quick", "--case", "z"])
    assert result.exit_code == 2
    assert "unknown --case z" in result.stderr


def test_bench_store_unreachable_postgres_is_exit_2() -> None:
    result = runner.invoke(
        app,
        ["bench", "store", "--quick", "--case", "b", "--postgres", "postgresql://x@127.0.0.1:1/db"],
    )
    assert result.exit_code == 2
    assert "StoreUnavailableError" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_store_non_postgres_url_is_exit_2() -> None:
    result = runner.invoke(app, ["bench", "store", "--quick", "--postgres", "sqlite:///x.db"])
    assert result.exit_code == 2
    assert "not a PostgreSQL URL" in result.stderr


async def test_interleave_rotates_who_goes_first_and_keeps_every_sample() -> None:
    order: list[str] = []

    def contender(name: str, value: float) -> Callable[[], Awaitable[float]]:
        async def run() -> float:
            order.append(name)
            return value

        return run

    case = CaseResult("k", "t", "ops/s", ours="ours", baseline="base", target=2.0)
    await interleave(
        case, [("base", contender("base", 10.0)), ("ours", contender("ours", 30.0))], 3
    )
    assert order == ["base", "ours", "ours", "base", "base", "ours"]
    assert case.measurements["ours"].samples == [30.0, 30.0, 30.0]
    assert case.ratio == pytest.approx(3.0)
    assert case.met is True


def test_unavailable_case_has_no_ratio() -> None:
    case = CaseResult("k", "t", "ops/s", ours="ours", baseline="base", target=1.0)
    case.measurements["base"] = Measurement("base", [1.0, 3.0, 2.0])
    case.unavailable = "ours not available yet"
    assert case.measurements["base"].median == 2.0
    assert case.ratio is None
    assert case.met is None


def test_bench_store_markdown_for_the_docs() -> None:
    result = runner.invoke(app, ["bench", "store", "--quick", "--case", "c", "--markdown"])
    assert result.exit_code == 0, result.stderr
    assert "| case | ours | baseline | ratio | per round | target | met? |" in result.stdout
    assert "raw sqlite3 executemany" in result.stdout
    assert "medians of 1 interleaved round(s)" in result.stdout


def test_bench_broker_quick_json_reports_every_case() -> None:
    result = runner.invoke(app, ["bench", "broker", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["benchmark"] == "broker"
    assert report["config"]["rounds"] == 1
    cases = {case["key"]: case for case in report["cases"]}
    assert list(cases) == ["in-process", "exactly-once", "redis-faststream", "redis-raw"]
    for key in ("in-process", "exactly-once"):
        case = cases[key]
        assert case["unavailable"] is None
        assert case["measurements"]["ours"]["median"] > 0
        assert case["met"] == (case["ratio"] >= case["target"])
    for key in ("redis-faststream", "redis-raw"):
        case = cases[key]
        if case["unavailable"] is not None:
            assert case["unavailable"].startswith("n/a:")
            assert not services_required(), f"{key}: {case['unavailable']}"
            continue
        baseline = case["measurements"][case["baseline"]]
        assert len(baseline["samples"]) == 1
        assert baseline["median"] > 0
        assert case["measurements"]["ours"]["median"] > 0
        assert case["ratio"] > 0
        assert case["met"] == (case["ratio"] >= case["target"])
    # Both Redis ratios divide the same measurements of ours.
    if cases["redis-raw"]["unavailable"] is None:
        assert (
            cases["redis-raw"]["measurements"]["ours"]
            == cases["redis-faststream"]["measurements"]["ours"]
        )


def test_bench_broker_reports_redis_cases_na_when_redis_does_not_answer() -> None:
    result = runner.invoke(
        app,
        [
            "bench",
            "broker",
            "--quick",
            "--json",
            "--redis",
            "redis://127.0.0.1:1",
            "--case",
            "redis-faststream,redis-raw",
        ],
    )
    assert result.exit_code == 0, result.output
    cases = json.loads(result.stdout)["cases"]
    assert [case["key"] for case in cases] == ["redis-faststream", "redis-raw"]
    for case in cases:
        assert case["unavailable"].startswith("n/a: Redis not reachable")
        assert case["ratio"] is None
        assert case["met"] is None


def test_bench_broker_markdown_for_the_docs() -> None:
    result = runner.invoke(
        app, ["bench", "broker", "--quick", "--case", "in-process", "--markdown"]
    )
    assert result.exit_code == 0, result.output
    assert "| case | ours | baseline | ratio | per round | target | met? |" in result.stdout
    assert "in-process AT_LEAST_ONCE vs target 100,000 msg/s" in result.stdout


def test_bench_broker_rejects_an_unknown_case() -> None:
    result = runner.invoke(app, ["bench", "broker", "--quick", "--case", "carrier-pigeon"])
    assert result.exit_code != 0
    assert "carrier-pigeon" in result.output


async def test_bench_broker_redis_contenders_delete_their_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from redis.asyncio import Redis

    from collaborative_blocks.bench import _redis_broker

    require_redis()
    marker = uuid.uuid4()
    monkeypatch.setattr(_redis_broker.uuid, "uuid4", lambda: marker)
    url = "redis://127.0.0.1:6379"
    for contender in (
        _redis_broker.ours_over_redis,
        _redis_broker.faststream_over_redis,
        _redis_broker.raw_pipeline,
        _redis_broker.transport_only,
    ):
        assert await contender(url, 50) > 0
    client = Redis.from_url(url)
    try:
        left = [key async for key in client.scan_iter(match=f"cbbench:{marker.hex[:12]}*")]
    finally:
        await client.aclose()
    assert left == []
