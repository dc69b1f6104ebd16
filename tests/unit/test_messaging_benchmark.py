"""The broker benchmark runs end to end (tiny sizes: this checks it works, not how fast)."""

from __future__ import annotations

from collaborative_blocks.bench.broker import BrokerBenchConfig, run_broker_bench


async def test_benchmark_reports_both_in_process_cases() -> None:
    cfg = BrokerBenchConfig.quick(
        cases=("in-process", "exactly-once"), in_process_messages=200, exactly_once_messages=50
    )
    results = await run_broker_bench(cfg)
    assert [r.key for r in results] == ["in-process", "exactly-once"]
    for result in results:
        assert len(result.measurements["ours"].samples) == 1
        assert result.measurements["ours"].median > 0
        assert result.ratio is not None
        assert result.ratio > 0
