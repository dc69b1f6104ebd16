"""The broker benchmark runs end to end (tiny sizes: this checks it works, not how fast)."""

from __future__ import annotations

from collaborative_blocks.bench.broker import run_broker_bench


async def test_benchmark_reports_both_cases() -> None:
    results = await run_broker_bench(in_process_messages=200, exactly_once_messages=50, rounds=1)
    assert [r.case for r in results] == ["in_process_at_least_once", "exactly_once_sqlite_inbox"]
    for result in results:
        assert len(result.rates) == 1
        assert result.median > 0
        assert result.target > 0
