"""Saga atomicity, dependency order and crash-resume equivalence for random workflows.

Hypothesis draws a DAG of 2-8 steps and a failure script: each step succeeds, fails its first
one or two executions, or fails every time (a non-retryable error); each step may have a
compensation, which may fail once. Optionally it draws a crash point: the engine's process
"dies" when the log reaches that many events (every later append fails, nothing more is
written), its tasks are cancelled, and a new engine on the same store resumes the run. On a
virtual clock, every run must:

- end COMPLETED, or FAILED with nothing completed, or COMPENSATED/COMPENSATION_FAILED with
  every completed step compensated (or its compensation failure recorded), the compensations
  in the reverse order of completion;
- never start a step before all its dependencies completed or were skipped;
- with a crash, end with the same outcome as the same script run without one: completed,
  or rolled back (failed by a step that cannot succeed, with nothing left applied).

Rolled back covers FAILED and COMPENSATED alike: whether a sibling of the failing step
completed before the failure (so there was something to compensate), and which of two
failing steps failed first, depends on timing, and a crash changes the timing (interrupted
attempts run again later). What must not depend on it: whether the run completed, and that
whatever completed was undone.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collaborative_blocks.core.clock import VirtualClock
from collaborative_blocks.core.messaging import Message, MessageBroker, SystemConnector
from collaborative_blocks.core.settings import load_settings
from collaborative_blocks.core.workflows import (
    BreakerConfig,
    BreakerRegistry,
    RetryPolicy,
    RunEvent,
    RunStatus,
    StepStatus,
    WorkflowCoordinationEngine,
    WorkflowDefinition,
    WorkflowResult,
    WorkflowStep,
)
from collaborative_blocks.errors import UnknownRunError
from collaborative_blocks.stores.base import (
    AppendRequest,
    EventStore,
    Tracking,
)
from collaborative_blocks.stores.delegating import DelegatingStore
from collaborative_blocks.stores.memory import MemoryEventStore

RUN_ID = "run"
# Enough for two scripted failures plus one interrupted attempt (and a spare).
POLICY = RetryPolicy(
    max_retries=4, delay=1.0, backoff=2.0, jitter=0.1, non_retryable=("ConditionError", "Fatal")
)


class Fatal(Exception):
    """A step's permanent failure (not retryable by POLICY)."""


class Crashed(Exception):
    """The simulated process died: nothing more reaches the store."""


@dataclass(frozen=True)
class StepScript:
    dependencies: tuple[int, ...]
    failures: int  # executions that fail before one succeeds; -1 = every one fails (Fatal)
    compensation: bool
    compensation_fails_once: bool


@st.composite
def scripts(draw: st.DrawFn) -> list[StepScript]:
    count = draw(st.integers(min_value=2, max_value=8))
    steps = []
    for index in range(count):
        dependencies = draw(
            st.lists(st.integers(min_value=0, max_value=index - 1), unique=True, max_size=3)
            if index
            else st.just([])
        )
        steps.append(
            StepScript(
                dependencies=tuple(sorted(dependencies)),
                failures=draw(st.sampled_from([0, 0, 0, 1, 2, -1])),
                compensation=draw(st.booleans()),
                compensation_fails_once=draw(st.booleans()),
            )
        )
    return steps


class CrashingStore(DelegatingStore):
    """The store as a process sees it: once ``crash_at`` events are in the log (counting
    from when it is armed), every append fails and changes nothing."""

    def __init__(self, inner: EventStore) -> None:
        super().__init__(inner)
        self.crash_at: int | None = None
        self.appended = 0
        self.crashed = False

    async def append_many(
        self, requests: Sequence[AppendRequest], *, tracking: Tracking | None = None
    ) -> list[list[int]]:
        count = sum(len(request.events) for request in requests)
        if self.crashed or (self.crash_at is not None and self.appended + count > self.crash_at):
            self.crashed = True
            raise Crashed("the process died")
        result = await self.inner.append_many(requests, tracking=tracking)
        self.appended += count
        return result

    async def close(self) -> None:
        return None


def definition(script: Sequence[StepScript]) -> WorkflowDefinition:
    workflow = WorkflowDefinition("saga", "random saga", max_concurrency=4)
    for index, item in enumerate(script):
        name = f"s{index}"
        workflow.add_step(
            WorkflowStep(
                step_id=name,
                system_target="system",
                action="do",
                parameters={"step": name},
                retry_policy=POLICY,
                dependencies=[f"s{d}" for d in item.dependencies],
                compensation="undo" if item.compensation else None,
                compensation_parameters={"step": name} if item.compensation else None,
            )
        )
    return workflow


async def drive(clock: VirtualClock, task: asyncio.Future[Any]) -> None:
    for _ in range(100_000):
        if task.done():
            return
        await clock.advance(0.25)
    raise AssertionError("the run did not finish within 25,000 virtual seconds")


async def run_script(
    script: Sequence[StepScript], crash_at: int | None, seed: int
) -> tuple[WorkflowResult, list[RunEvent], int]:
    """Run the script (crashing at ``crash_at`` events, then resuming); return the result,
    the run's history and how many events the run appended before any crash."""
    clock = VirtualClock()
    settings_ = load_settings({})
    inner = MemoryEventStore()
    store = CrashingStore(inner)
    broker = MessageBroker(
        clock=clock,
        rng=random.Random(seed),
        settings=settings_,
        tracing=False,
        handler_timeout=10_000.0,
    )
    executions: dict[tuple[str, str], int] = {}
    plan = {f"s{i}": item for i, item in enumerate(script)}

    async def do(message: Message) -> object:
        assert isinstance(message.payload, dict)
        name = str(message.payload["step"])
        count = executions[("do", name)] = executions.get(("do", name), 0) + 1
        await clock.sleep(0.5)
        failures = plan[name].failures
        if failures == -1:
            raise Fatal(f"{name} cannot succeed")
        if count <= failures:
            raise ConnectionError(f"{name} failed execution {count}")
        return {"step": name, "execution": count}

    async def undo(message: Message) -> object:
        assert isinstance(message.payload, dict)
        name = str(message.payload["step"])
        count = executions[("undo", name)] = executions.get(("undo", name), 0) + 1
        await clock.sleep(0.25)
        if plan[name].compensation_fails_once and count == 1:
            raise ConnectionError(f"undo of {name} failed once")
        return None

    system = SystemConnector("system", broker)
    system.on_command("do", do)
    system.on_command("undo", undo)

    def engine(engine_store: EventStore, rng_seed: int) -> WorkflowCoordinationEngine:
        # Breakers that never open: how they change outcomes is timing, tested elsewhere.
        breakers = BreakerRegistry(
            BreakerConfig(minimum_number_of_calls=10_000, window_size=10_000), clock=clock
        )
        return WorkflowCoordinationEngine(
            store=engine_store,
            broker=broker,
            breakers=breakers,
            clock=clock,
            rng=random.Random(rng_seed),
            settings=settings_,
            step_timeout=60.0,
        )

    first = engine(store, seed)
    try:
        await first.define_workflow(definition(script))
        store.crash_at = crash_at
        task = asyncio.ensure_future(first.execute_workflow("saga", run_id=RUN_ID))
        await drive(clock, task)
        if not store.crashed:
            return task.result(), await first.history(RUN_ID), store.appended
        assert task.exception() is not None, "the run finished although its store crashed"
    finally:
        await first.close()
    # A new process on the same log.
    second = engine(inner, seed + 1)
    try:
        resumed = await second.resume()
        try:
            await second.get_result(RUN_ID)
        except UnknownRunError:  # the crash came before the run's first event: start it
            waited = asyncio.ensure_future(second.execute_workflow("saga", run_id=RUN_ID))
        else:  # resumed, or it had finished and only its index entry was missing
            assert resumed in ([RUN_ID], [])
            waited = asyncio.ensure_future(second.wait_for(RUN_ID))
        await drive(clock, waited)
        return waited.result(), await second.history(RUN_ID), store.appended
    finally:
        await second.close()
        await broker.close()


def check_saga(
    script: Sequence[StepScript], result: WorkflowResult, history: list[RunEvent]
) -> None:
    steps = result.steps
    if result.status is RunStatus.COMPLETED:
        assert all(step.status is StepStatus.COMPLETED for step in steps.values())
        return
    assert result.status in (
        RunStatus.FAILED,
        RunStatus.COMPENSATED,
        RunStatus.COMPENSATION_FAILED,
    ), result.status
    assert result.failed_step is not None
    assert script[int(result.failed_step[1:])].failures == -1  # only a Fatal step fails for good
    completed_order = [e.data["step_id"] for e in history if e.name == "StepCompleted"]
    if result.status is RunStatus.FAILED:
        assert completed_order == []
        assert not any(steps[s].compensation is not None for s in steps), (
            "a FAILED run compensated nothing"
        )
        return
    # Every completed step was compensated, or its compensation failure recorded...
    for step_id in completed_order:
        assert steps[step_id].status in (
            StepStatus.COMPENSATED,
            StepStatus.COMPENSATION_FAILED,
        ), (step_id, steps[step_id].status)
        compensation = steps[step_id].compensation
        assert compensation is not None
        has_action = script[int(step_id[1:])].compensation
        assert (compensation.action is not None) == has_action
    # ...in the reverse order of completion, after the steps of unknown outcome (an attempt
    # interrupted by the crash, on a step that did not complete) naming a compensation.
    uncertain = [
        s
        for s in reversed(list(steps))
        if s not in completed_order
        and script[int(s[1:])].compensation
        and any(
            e.name == "AttemptFailed"
            and e.data["step_id"] == s
            and e.data["error_type"] in ("Timeout", "Interrupted")
            for e in history
        )
    ]
    began = []
    for event in history:
        is_compensation = event.name in ("CompensationStarted", "NothingToCompensate")
        if is_compensation and event.data["step_id"] not in began:
            began.append(event.data["step_id"])
    assert began == uncertain + list(reversed(completed_order))
    failed_compensations = any(
        (compensation := steps[s].compensation) is not None
        and compensation.status is StepStatus.COMPENSATION_FAILED
        for s in began
    )
    assert (result.status is RunStatus.COMPENSATION_FAILED) == failed_compensations


def check_dependency_order(script: Sequence[StepScript], history: list[RunEvent]) -> None:
    resolved: set[str] = set()
    for event in history:
        if event.name in ("StepCompleted", "StepSkipped"):
            resolved.add(event.data["step_id"])
        elif event.name in ("StepScheduled", "AttemptStarted"):
            step_id = event.data["step_id"]
            dependencies = {f"s{d}" for d in script[int(step_id[1:])].dependencies}
            assert dependencies <= resolved, (step_id, dependencies - resolved)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    script=scripts(),
    crash_permille=st.one_of(st.none(), st.integers(min_value=0, max_value=999)),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_random_sagas_are_atomic_ordered_and_resume_to_the_same_outcome(
    script: list[StepScript], crash_permille: int | None, seed: int
) -> None:
    result, history, appended = asyncio.run(run_script(script, None, seed))
    check_saga(script, result, history)
    check_dependency_order(script, history)
    if crash_permille is None:
        return
    # A crash somewhere in the run: the uninterrupted run appended ``appended`` events, the
    # first four being the definition, the run's index entry and the run's first save
    # (Created, Started). Hypothesis favours small numbers, so they are spread over the run.
    spread = crash_permille * 7919 % 1000
    crash_at = 4 + (appended - 4) * spread // 1000
    crashed, crashed_history, _ = asyncio.run(run_script(script, crash_at, seed))
    check_saga(script, crashed, crashed_history)
    check_dependency_order(script, crashed_history)
    assert outcome(crashed) == outcome(result)


def outcome(result: WorkflowResult) -> str:
    if result.status is RunStatus.COMPLETED:
        return "completed"
    if result.status in (RunStatus.FAILED, RunStatus.COMPENSATED):
        return "rolled back"
    return result.status.value
