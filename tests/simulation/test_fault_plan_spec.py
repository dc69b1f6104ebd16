"""Fault plan specs: the grammar, typed errors that name the bad entry, canonical round trip."""

from __future__ import annotations

import pytest

from collaborative_blocks.errors import FaultPlanError
from collaborative_blocks.simulations import FaultPlan
from collaborative_blocks.simulations.faults import CrashAt, Partition


def test_every_entry_of_the_documented_example_parses() -> None:
    plan = FaultPlan.parse(
        "drop=0.05,duplicate=0.02,reorder=0.1,delay=0.01-2.0,partition=30s@10s,crash=0.002,"
        "store_fail=0.01,slow_write=0.05:0.5,skew=2.0,handler_error=0.02,handler_hang=0.01"
    )
    assert plan.drop == 0.05
    assert plan.duplicate == 0.02
    assert plan.reorder == 0.1
    assert plan.delay == (0.01, 2.0)
    assert plan.partitions == (Partition(start=10.0, duration=30.0),)
    assert plan.crash_rate == 0.002
    assert plan.store_fail == 0.01
    assert plan.slow_write == (0.05, 0.5)
    assert plan.skew == 2.0
    assert plan.handler_error == 0.02
    assert plan.handler_hang == 0.01


def test_units_schedules_and_repeated_events() -> None:
    plan = FaultPlan.parse(
        "partition=500ms@1m, partition=2s@5s, crash=12s, crash=bank-a@3s, delay=0.5"
    )
    assert plan.partitions == (Partition(5.0, 2.0), Partition(60.0, 0.5))
    assert plan.crashes == (CrashAt(3.0, "bank-a"), CrashAt(12.0))
    assert plan.delay == (0.0, 0.5)


@pytest.mark.parametrize(
    "spec",
    [
        "none",
        "drop=0.5",
        "delay=0.25-1.5,reorder=1",
        "partition=30s@10s,partition=1.5s@0.5s,crash=node-1@2s,crash=4.25s",
        "crash=0.01,store_fail=0.2,slow_write=0.1:0.75,skew=3,handler_error=0.3,handler_hang=0.05",
    ],
)
def test_spec_round_trips(spec: str) -> None:
    plan = FaultPlan.parse(spec)
    assert FaultPlan.parse(plan.spec()) == plan
    assert FaultPlan.parse(plan.spec()).spec() == plan.spec()


def test_the_empty_plan() -> None:
    assert FaultPlan.parse("") == FaultPlan.parse("none") == FaultPlan.none()
    assert FaultPlan.none().spec() == "none"
    assert FaultPlan.none().is_empty


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("drop=2", "drop=2"),
        ("drop=x", "drop=x"),
        ("explode=0.1", "explode"),
        ("drop", "drop"),
        ("partition=30s", "partition=30s"),
        ("partition=0s@1s", "partition=0s@1s"),
        ("slow_write=0.1", "slow_write=0.1"),
        ("delay=2-1", "delay"),
        ("drop=0.1,drop=0.2", "drop=0.2"),
        ("crash=bad name@1s", "crash=bad name@1s"),
        ("skew=-1", "skew=-1"),
    ],
)
def test_a_bad_entry_is_named_with_the_accepted_forms(spec: str, named: str) -> None:
    with pytest.raises(FaultPlanError) as caught:
        FaultPlan.parse(spec)
    message = str(caught.value)
    assert named in message
    assert "Accepted" in message or "must" in message


def test_healed_plan_keeps_only_skew() -> None:
    plan = FaultPlan.parse("drop=0.5,skew=2,partition=1s@1s")
    assert plan.healed() == FaultPlan(skew=2.0)
    assert plan.without("drop").drop == 0.0
    assert plan.faults() == ["drop", "partitions", "skew"]
