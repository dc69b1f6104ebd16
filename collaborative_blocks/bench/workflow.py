"""Workflow engine costs, for ``cblocks bench workflow``.

Cases of issue 5, each measured over ``rounds`` interleaved rounds against a baseline in the
same run:

- ``overhead``: runs of a 10-step workflow (a diamond of parallel branches, conditions and
  templated parameters) one after another on the in-memory store and in-process broker,
  against a plain asyncio program that awaits the same handlers in the same order with no
  engine. The target is at most 50 µs of engine overhead per step, so the baseline row is
  the plain program's rate with a 50 µs/step budget added: a ratio >= 1 means the budget
  held; the notes give the overhead itself.
- ``durable``: the same workflow on a fresh SQLite file (every step's events committed
  before the run goes on), ``concurrency`` runs in flight so their commits share SQLite
  transactions; target >= 2,000 steps/s.
- ``condition``: one compiled CEL condition evaluated against a run's scope; target at most
  2 µs per evaluation (>= 500,000/s).
- ``breaker``: an open circuit breaker refusing a call; target at most 2 µs (>= 500,000/s).

Measuring elapsed real time is this module's purpose, so it reads ``time.perf_counter``; the
engine itself runs on its injected clock. Run it with ``python -m
collaborative_blocks.bench.workflow``.
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collaborative_blocks.bench._stats import (
    CaseResult,
    Measurement,
    ProgressCallback,
    interleave,
)
from collaborative_blocks.core.clock import VirtualClock
from collaborative_blocks.core.messaging import (
    JSONValue,
    Message,
    MessageBroker,
    MessageType,
    SystemConnector,
)
from collaborative_blocks.core.runtime import Runtime
from collaborative_blocks.core.settings import load_settings
from collaborative_blocks.core.workflows import (
    BreakerConfig,
    CircuitBreaker,
    WorkflowCoordinationEngine,
    WorkflowDefinition,
    WorkflowResult,
    WorkflowScope,
    WorkflowStep,
    compile_condition,
)
from collaborative_blocks.errors import CircuitOpenError, CollaborativeBlocksError
from collaborative_blocks.stores import open_store
from collaborative_blocks.stores.base import EventStore

__all__ = ["CASES", "WorkflowBenchConfig", "planned_measurements", "run_workflow_bench"]

CASES = ("overhead", "durable", "condition", "breaker")
OURS = "ours"
PLAIN = "plain asyncio, same handlers, no engine"
#: Engine overhead allowed per step (issue 5): 50 µs.
OVERHEAD_BUDGET = 50e-6
DURABLE_TARGET = 2_000.0
PER_CALL_TARGET = 500_000.0  # 2 µs per evaluation / refusal

#: The benchmark workflow: (step, target, action, dependencies, condition).
STEPS: tuple[tuple[str, str, str, tuple[str, ...], str | None], ...] = (
    ("validate", "orders", "validate", (), None),
    ("reserve", "inventory", "reserve", ("validate",), None),
    ("price", "pricing", "price", ("validate",), "${priority} == 'high' || ${amount} > 10"),
    ("fraud", "risk", "score", ("validate",), None),
    ("charge", "payments", "charge", ("reserve", "price", "fraud"), None),
    ("invoice", "billing", "invoice", ("charge",), None),
    ("pack", "warehouse", "pack", ("charge",), None),
    ("label", "shipping", "label", ("pack",), None),
    ("notify", "mail", "notify", ("invoice", "label"), None),
    ("close", "orders", "close", ("notify",), None),
)
INPUT: dict[str, JSONValue] = {"order": 7, "amount": 120, "priority": "high"}


@dataclass(frozen=True)
class WorkflowBenchConfig:
    """Sizes; :meth:`quick` gives tiny sizes for tests."""

    rounds: int = 5
    runs: int = 300
    durable_runs: int = 600
    concurrency: int = 64
    evaluations: int = 200_000

    @classmethod
    def quick(cls, **overrides: Any) -> WorkflowBenchConfig:
        sizes: dict[str, Any] = {
            "rounds": 1,
            "runs": 10,
            "durable_runs": 20,
            "concurrency": 8,
            "evaluations": 2_000,
        }
        sizes.update(overrides)
        return cls(**sizes)


def planned_measurements(cfg: WorkflowBenchConfig) -> int:
    # overhead and durable: ours + plain per round; condition and breaker: ours per round.
    return cfg.rounds * 6


def definition() -> WorkflowDefinition:
    workflow = WorkflowDefinition("bench-order", "benchmark order")
    for step_id, target, action, dependencies, condition in STEPS:
        workflow.add_step(
            WorkflowStep(
                step_id=step_id,
                system_target=target,
                action=action,
                parameters={"order": "${input.order}", "step": step_id},
                retry_policy={"max_retries": 3, "delay": 1},
                dependencies=list(dependencies),
                condition=condition,
            )
        )
    return workflow


async def _handler(message: Message) -> JSONValue:
    payload = message.payload
    step = payload.get("step") if isinstance(payload, Mapping) else None
    return {"done": step}


async def _plain_run(message: Message) -> None:
    """The baseline: the same handlers, the same order, parallel branches gathered."""
    done: set[str] = set()
    remaining = list(STEPS)
    while remaining:
        ready = [s for s in remaining if all(d in done for d in s[3])]
        await asyncio.gather(*(_handler(message) for _ in ready))
        done.update(s[0] for s in ready)
        remaining = [s for s in remaining if s[0] not in done]


async def _plain(runs: int, concurrency: int = 1) -> float:
    message = Message(MessageType.COMMAND, "step", {"order": 7, "step": "x"}, target="bench")
    start = time.perf_counter()
    for first in range(0, runs, concurrency):
        await asyncio.gather(*(_plain_run(message) for _ in range(min(concurrency, runs - first))))
    return runs * len(STEPS) / (time.perf_counter() - start)


async def _engine(store: EventStore, runs: int, concurrency: int) -> float:
    # Default settings, not the environment's: the broker stays in-process.
    runtime = Runtime(settings=load_settings({}), store=store)
    broker = MessageBroker(runtime=runtime, store=store)
    targets: dict[str, SystemConnector] = {}
    for _, target, action, _, _ in STEPS:
        connector = targets.setdefault(target, SystemConnector(target, broker))
        connector.on_command(action, _handler)
    async with WorkflowCoordinationEngine(runtime, store=store, broker=broker) as engine:
        await engine.define_workflow(definition())
        await broker.start()
        # One warm-up run: compiled machines, first-use imports.
        _check(await engine.execute_workflow("bench-order", INPUT))
        start = time.perf_counter()
        for first in range(0, runs, concurrency):
            results = await asyncio.gather(
                *(
                    engine.execute_workflow("bench-order", INPUT)
                    for _ in range(min(concurrency, runs - first))
                )
            )
            for result in results:
                _check(result)
        elapsed = time.perf_counter() - start
    await broker.close()
    await runtime.close()
    return runs * len(STEPS) / elapsed


def _check(result: WorkflowResult) -> None:
    if not result.succeeded:
        raise CollaborativeBlocksError(f"bench: a workflow run did not complete: {result}")


async def _memory_engine(runs: int) -> float:
    store = await open_store("memory://")
    try:
        return await _engine(store, runs, 1)
    finally:
        await store.close()


async def _sqlite_engine(runs: int, concurrency: int) -> float:
    with tempfile.TemporaryDirectory(prefix="cb-bench-workflow-") as directory:
        store = await open_store(f"sqlite+aiosqlite:///{Path(directory) / 'wf.db'}")
        try:
            return await _engine(store, runs, concurrency)
        finally:
            await store.close()


async def _conditions(evaluations: int) -> float:
    condition = compile_condition(
        "${priority} == 'high' && ${steps.fraud.output.score} < 50",
        workflow_id="bench",
        step_id="charge",
        known_steps=("fraud", "charge"),
        upstream_steps=("fraud",),
        inputs=None,
    )
    scope = WorkflowScope(INPUT)
    scope.set_step("fraud", "completed", {"score": 12})
    if not condition.evaluate(scope):
        raise CollaborativeBlocksError("bench: the benchmark condition should hold")
    evaluate = condition.evaluate
    start = time.perf_counter()
    for _ in range(evaluations):
        evaluate(scope)
    elapsed = time.perf_counter() - start
    await asyncio.sleep(0)
    return evaluations / elapsed


async def _open_breaker(calls: int) -> float:
    breaker = CircuitBreaker("bench", BreakerConfig(), clock=VirtualClock())
    breaker.force_open()
    acquire = breaker.acquire
    refused = 0
    start = time.perf_counter()
    for _ in range(calls):
        try:
            acquire()
        except CircuitOpenError:
            refused += 1
    elapsed = time.perf_counter() - start
    if refused != calls:
        raise CollaborativeBlocksError("bench: the open breaker let a call through")
    await asyncio.sleep(0)
    return calls / elapsed


def _fresh(contender: Callable[[], Awaitable[float]]) -> Callable[[], Awaitable[float]]:
    async def run() -> float:
        gc.collect()
        return await contender()

    return run


def _budgeted(samples: list[float]) -> list[float]:
    """Plain steps/s with the overhead budget added to each step's time."""
    return [1.0 / (1.0 / rate + OVERHEAD_BUDGET) for rate in samples]


async def run_workflow_bench(
    cfg: WorkflowBenchConfig, progress: ProgressCallback | None = None
) -> list[CaseResult]:
    """Run the four cases, ``cfg.rounds`` interleaved rounds each."""
    budget = f"plain asyncio + {OVERHEAD_BUDGET * 1e6:.0f} µs/step budget"
    overhead = CaseResult(
        "overhead",
        f"{len(STEPS)}-step workflow runs, one at a time, in memory",
        "steps/s",
        OURS,
        budget,
        1.0,
    )
    await interleave(
        overhead,
        [
            (OURS, _fresh(lambda: _memory_engine(cfg.runs))),
            (PLAIN, _fresh(lambda: _plain(cfg.runs))),
        ],
        cfg.rounds,
        progress,
    )
    plain = overhead.measurements[PLAIN].samples
    overhead.measurements[budget] = Measurement(budget, _budgeted(plain))
    ours = overhead.measurements[OURS]
    per_step = [1.0 / o - 1.0 / p for o, p in zip(ours.samples, plain, strict=False)]
    per_step.sort()
    overhead.notes.append(
        f"engine overhead per step: median {per_step[len(per_step) // 2] * 1e6:.1f} µs "
        f"(range {per_step[0] * 1e6:.1f}-{per_step[-1] * 1e6:.1f}); {cfg.runs} runs per "
        "measurement; every step a command and reply through the in-process broker and its "
        "events in the memory store"
    )

    durable = CaseResult(
        "durable",
        f"{len(STEPS)}-step workflow runs on SQLite, {cfg.concurrency} runs in flight",
        "steps/s",
        OURS,
        f"target {DURABLE_TARGET:,.0f} steps/s",
        1.0,
    )
    await interleave(
        durable,
        [
            (OURS, _fresh(lambda: _sqlite_engine(cfg.durable_runs, cfg.concurrency))),
            (PLAIN, _fresh(lambda: _plain(cfg.durable_runs, cfg.concurrency))),
        ],
        cfg.rounds,
        progress,
    )
    durable.measurements[durable.baseline] = Measurement(
        durable.baseline, [DURABLE_TARGET] * cfg.rounds
    )
    durable.notes.append(
        f"{cfg.durable_runs} runs per measurement on a fresh SQLite file (synchronous=FULL); "
        "a step's outcome is committed before its dependents are scheduled"
    )

    results = [overhead, durable]
    for key, title, contender in (
        ("condition", "CEL condition evaluation", lambda: _conditions(cfg.evaluations)),
        ("breaker", "open circuit breaker fail-fast", lambda: _open_breaker(cfg.evaluations)),
    ):
        case = CaseResult(
            key, title, "ops/s", OURS, f"target {PER_CALL_TARGET:,.0f}/s (2 µs each)", 1.0
        )
        await interleave(case, [(OURS, _fresh(contender))], cfg.rounds, progress)
        case.measurements[case.baseline] = Measurement(
            case.baseline, [PER_CALL_TARGET] * cfg.rounds
        )
        median = case.measurements[OURS].median
        case.notes.append(f"{1e6 / median:.2f} µs each (median); {cfg.evaluations:,} per round")
        results.append(case)
    return results


if __name__ == "__main__":
    from collaborative_blocks.cli.bench import results_markdown

    print(results_markdown(asyncio.run(run_workflow_bench(WorkflowBenchConfig()))))
