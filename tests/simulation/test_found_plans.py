"""Fault plans that once broke an invariant, kept as regression runs.

Each was found by hypothesis (tests/property/test_fault_plans.py) or by exploring random
plans with ``cblocks chaos run --faults``; the comment says which framework bug it exposed.
A run is a pure function of (scenario, seed, plan), so each of these replays the exact
schedule that failed, against the fixed code. Add a case here whenever a plan finds a bug.
"""

from __future__ import annotations

import pytest

from collaborative_blocks.simulations import FaultPlan, run_simulation

FOUND: list[tuple[str, int, str, str]] = [
    (
        "replicas",
        0,
        "drop=0.234,reorder=0.234,store_fail=0.25",
        # A sync delivery to `archive` failed on every attempt while the store refused the
        # conflict record, and was dead-lettered: the replica stayed behind for good. The
        # engine now repairs outstanding changes itself after `repair_after` seconds.
        "sync delivery dead-lettered; replica never repaired",
    ),
    (
        "replicas",
        5136,
        "drop=0.033,reorder=0.144,store_fail=0.3,handler_hang=0.015",
        "sync delivery dead-lettered at a hub and its forward never sent",
    ),
    (
        "replicas",
        2,
        "store_fail=0.2,store_read_fail=0.5",
        # A change the store refused was undone by re-reading the log, which failed too: the
        # source's replica kept a value that was never written. Its states now change only
        # once the change is in the log (nothing to undo, no read needed).
        "a refused change stayed visible at its source",
    ),
    (
        "replicas",
        8,
        "crash=0.05,store_read_fail=0.5",
        # A restarted engine marked its conflicts loaded before the read that loads them;
        # the read failed and conflicts(key) missed every recorded conflict for good.
        "recorded conflicts never loaded after a failed read",
    ),
    (
        "replicas",
        10,
        "store_read_fail=0.05",
        "the sync node could not boot when a registration's read failed",
    ),
    (
        "transfers",
        3,
        "publish_fail=0.1,store_fail=0.1",
        # A debit's EXACTLY_ONCE commit went through, the send of its credit was refused,
        # the broker counted that as a handler failure, the reruns failed on the store, and
        # the message was dead-lettered with its committed outbox: money went missing. A
        # refused send now gives the delivery back; the redelivery resends the outbox.
        "committed outbox lost with a dead letter after a refused send",
    ),
    (
        "transfers",
        56,
        "publish_fail=0.2,store_fail=0.2",
        "committed outbox lost with a dead letter after a refused send",
    ),
    (
        "transfers",
        0,
        "store_fail=0.2,store_lost_ack=0.3,handler_error=0.3",
        # An EXACTLY_ONCE commit went through and its acknowledgement was lost; the reruns
        # failed before reaching the store and the message was dead-lettered with its
        # committed outbox (a credit never sent). The broker now asks the inbox.
        "committed outbox lost after a lost acknowledgement",
    ),
    (
        "transfers",
        11,
        "drop=0.05,duplicate=0.1,reorder=0.1,delay=0.01-0.3,crash=0.01,store_fail=0.05,"
        "store_lost_ack=0.05,slow_write=0.05:0.5,skew=2,handler_error=0.1",
        "committed outbox lost after a lost acknowledgement (default faults)",
    ),
    (
        "replicas",
        2,
        "drop=0.05,duplicate=0.05,reorder=0.2,delay=0.01-0.5,partition=5s@3s,crash=0.02,"
        "store_fail=0.02,store_lost_ack=0.05",
        # A change whose acknowledgement was lost was taken as not written: its dot was
        # reused, and replicas differed from the log. The engine now reads the log back.
        "a recorded change taken as not written",
    ),
    (
        "replicas",
        19,
        "store_lost_ack=0.2",
        "a logged conflict unknown to the engine after a lost acknowledgement",
    ),
    (
        "orders",
        5776,
        "store_fail=0.05,skew=13.15,handler_error=0.188",
        # Nodes' clocks 17 s apart: every step request (ttl = the 8 s step timeout, by the
        # sender's clock) was dead-lettered as expired on arrival, so no run ever finished.
        # A ttl now allows for MESSAGE_CLOCK_SKEW_SECONDS (30 s by default).
        "request ttl compared across skewed clocks",
    ),
    (
        "orders",
        7408,
        "drop=0.289,reorder=0.182,partition=11.07s@0.1s,partition=6.3s@14.18s,crash=0.04,"
        "crash=inventory@3.79s,store_fail=0.041,skew=14.69,handler_hang=0.022",
        "request ttl compared across skewed clocks, with partitions and crashes",
    ),
    (
        "orders",
        9543,
        "duplicate=0.294,store_fail=0.281,handler_error=0.237",
        # The store refused a circuit-breaker transition; the error killed the fraud step's
        # task while it waited for a retry, and the conductor, seeing no task running,
        # completed the run without fraud and ship. Breaker transitions now stay pending
        # when the store refuses them, a dead step task's error stops the driver, and a run
        # cannot complete before every step completed or was skipped.
        "run completed with a step still waiting for its retry",
    ),
]


@pytest.mark.parametrize(
    ("scenario", "seed", "faults", "bug"), FOUND, ids=[f"{s}-{n}" for s, n, _, _ in FOUND]
)
def test_a_plan_that_once_failed_keeps_every_invariant(
    scenario: str, seed: int, faults: str, bug: str
) -> None:
    result = run_simulation(scenario, seed, FaultPlan.parse(faults), check_coverage=False)
    assert not result.violations, (
        f"regression of: {bug}\n"
        + "\n".join(str(v) for v in result.violations[:3])
        + f"\n  replay: {result.replay_command}"
    )
