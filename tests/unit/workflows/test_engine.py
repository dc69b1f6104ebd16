"""The workflow engine: seed API, execution, retries, breakers, rules, sagas, resume."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from collaborative_blocks.core.clock import VirtualClock
from collaborative_blocks.core.messaging import Message, MessageBroker, SystemConnector
from collaborative_blocks.core.messaging.connector import IDEMPOTENCY_KEY
from collaborative_blocks.core.messaging.envelope import JSONValue
from collaborative_blocks.core.settings import load_settings
from collaborative_blocks.core.workflows import (
    AdaptationRule,
    BreakerConfig,
    BreakerRegistry,
    RetryPolicy,
    RuleAction,
    RuleTrigger,
    RunStatus,
    StepStatus,
    WorkflowCoordinationEngine,
    WorkflowDefinition,
    WorkflowResult,
    WorkflowStep,
)
from collaborative_blocks.core.workflows.breakers import BreakerState
from collaborative_blocks.core.workflows.engine import (
    SEND_FAILED,
    STORE_RETRY_ATTEMPTS,
    breaker_route,
    retry_due,
    slow_step_rules,
    under_load_rule,
)
from collaborative_blocks.core.workflows.run import run_aggregate_id
from collaborative_blocks.errors import (
    StoreUnavailableError,
    TransportUnavailableError,
    UnknownRunError,
    UnknownWorkflowError,
    WorkflowDefinitionError,
    WorkflowError,
)
from collaborative_blocks.stores.base import NewEvent
from collaborative_blocks.stores.memory import MemoryEventStore

T = TypeVar("T")


async def drive(clock: VirtualClock, awaitable: Awaitable[T], *, step: float = 0.05) -> T:
    """Let virtual time pass in small steps until ``awaitable`` is done."""
    task = asyncio.ensure_future(awaitable)
    for _ in range(20_000):
        if task.done():
            return task.result()
        await clock.advance(step)
    task.cancel()
    raise AssertionError("did not finish in 1000 virtual seconds")


async def until(clock: VirtualClock, condition: Callable[[], bool]) -> None:
    for _ in range(20_000):
        if condition():
            return
        await clock.advance(0.05)
    raise AssertionError("condition never became true")


class World:
    """A store, an in-process broker and a target system on one virtual clock."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.store = MemoryEventStore()
        self.settings = load_settings({})
        self.broker = MessageBroker(
            clock=clock,
            rng=random.Random(1),
            settings=self.settings,
            tracing=False,
            handler_timeout=10_000.0,
        )
        self.engines: list[WorkflowCoordinationEngine] = []
        self.systems: dict[str, SystemConnector] = {}

    def engine(self, **options: Any) -> WorkflowCoordinationEngine:
        engine = WorkflowCoordinationEngine(
            store=self.store,
            broker=self.broker,
            clock=self.clock,
            rng=random.Random(2),
            settings=self.settings,
            **options,
        )
        self.engines.append(engine)
        return engine

    def handle(self, system: str, action: str, handler: Callable[..., Awaitable[object]]) -> None:
        connector = self.systems.get(system)
        if connector is None:
            connector = self.systems[system] = SystemConnector(system, self.broker)
        connector.on_command(action, handler)


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
async def world(clock: VirtualClock) -> AsyncIterator[World]:
    world = World(clock)
    yield world
    for engine in world.engines:
        await engine.close()
    await world.broker.close()


def echo_calls(calls: list[str]) -> Callable[[Message], Awaitable[object]]:
    async def handler(message: Message) -> object:
        payload = message.payload
        assert isinstance(payload, dict)
        calls.append(str(payload.get("name", message.name)))
        return {"name": payload.get("name"), "got": payload}

    return handler


def step(step_id: str, *dependencies: str, **options: Any) -> WorkflowStep:
    options.setdefault("system_target", "system")
    options.setdefault("action", "action")
    options.setdefault("parameters", {"name": step_id})
    return WorkflowStep(step_id=step_id, dependencies=list(dependencies), **options)


async def events(engine: WorkflowCoordinationEngine, run_id: str) -> list[tuple[str, Any]]:
    return [(event.name, event.data) for event in await engine.history(run_id)]


# -- the seed API ------------------------------------------------------------------------------


async def test_seed_api_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EVENT_STORE_URL", f"sqlite+aiosqlite:///{tmp_path / 'events.db'}")
    params = {"amount": "${amount}"}
    input_data: dict[str, JSONValue] = {"variable": "value", "amount": 12}

    workflow = WorkflowDefinition("workflow_id", "name")
    workflow.add_step(
        WorkflowStep(step_id="previous_step", system_target="system", action="action")
    )
    step = WorkflowStep(
        step_id="step1",
        system_target="system",
        action="action",
        parameters=params,
        retry_policy={"max_retries": 3, "delay": 1},
        dependencies=["previous_step"],
        condition="${variable} == 'value'",
    )
    workflow.add_step(step)
    engine = WorkflowCoordinationEngine()
    seen: list[object] = []

    async def action(message: Message) -> object:
        seen.append(message.payload)
        return {"done": message.payload}

    SystemConnector("system", engine.broker).on_command("action", action)
    try:
        await engine.define_workflow(workflow)
        result = await engine.execute_workflow("workflow_id", input_data)
    finally:
        await engine.close()
    assert result.status is RunStatus.COMPLETED
    assert result.succeeded
    assert seen == [{}, {"amount": 12}]
    assert result.steps["step1"].output == {"done": {"amount": 12}}
    assert result.steps["step1"].attempts == 1
    assert result.steps["step1"].duration is not None
    assert result.skipped == ()
    assert result.compensated == ()
    assert (tmp_path / "events.db").exists()


# -- execution ----------------------------------------------------------------------------------


async def test_independent_branches_run_concurrently(world: World, clock: VirtualClock) -> None:
    log: list[tuple[str, str]] = []
    both_started = asyncio.Event()

    async def work(message: Message) -> object:
        assert isinstance(message.payload, dict)
        name = str(message.payload["name"])
        log.append(("start", name))
        if sum(1 for kind, _ in log if kind == "start") == 2:
            both_started.set()
        await both_started.wait()  # a sequential engine would wait here forever
        log.append(("end", name))
        return name

    world.handle("system", "action", work)
    engine = world.engine()
    await engine.define_workflow(
        WorkflowDefinition(
            "wf", "fan out", steps=[step("left"), step("right"), step("join", "left", "right")]
        )
    )
    result = await drive(clock, engine.execute_workflow("wf"))
    assert result.status is RunStatus.COMPLETED
    assert {kind for kind, _ in log[:2]} == {"start"}
    assert log[-2:] == [("start", "join"), ("end", "join")]


async def test_concurrency_is_bounded_per_run_and_per_engine(
    world: World, clock: VirtualClock
) -> None:
    running = 0
    peak = 0

    async def work(message: Message) -> object:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await clock.sleep(1.0)
        running -= 1
        return None

    world.handle("system", "action", work)
    engine = world.engine()
    steps = [step(f"s{i}") for i in range(5)]
    await engine.define_workflow(WorkflowDefinition("wf", "wide", steps=steps, max_concurrency=2))
    result = await drive(clock, engine.execute_workflow("wf"))
    assert result.status is RunStatus.COMPLETED
    assert peak == 2

    peak = 0
    narrow = world.engine(engine_id="narrow", max_concurrent_steps=1)
    await narrow.define_workflow(WorkflowDefinition("wf", "wide", steps=steps, max_concurrency=5))
    assert (await drive(clock, narrow.execute_workflow("wf"))).succeeded
    assert peak == 1


async def test_outputs_flow_into_parameters_and_conditions(
    world: World, clock: VirtualClock
) -> None:
    payloads: dict[str, object] = {}

    async def work(message: Message) -> object:
        assert isinstance(message.payload, dict)
        payloads[str(message.payload.get("name"))] = message.payload
        return {"count": 3, "tags": ["a", "b"]}

    world.handle("system", "action", work)
    engine = world.engine()
    definition = WorkflowDefinition(
        "wf",
        "flow",
        steps=[
            step("load", parameters={"name": "load", "user": "${input.user}"}),
            step(
                "use",
                "load",
                parameters={
                    "name": "use",
                    "count": "${steps.load.output.count}",
                    "tags": "${steps.load.output.tags}",
                    "label": "user ${user} has ${steps.load.output.count}",
                },
                condition="${steps.load.output.count} > 2",
            ),
            step("never", "load", condition="steps.load.output.count > 10"),
        ],
    )
    await engine.define_workflow(definition)
    result = await drive(clock, engine.execute_workflow("wf", {"user": "ann"}))
    assert result.status is RunStatus.COMPLETED
    assert payloads["load"] == {"name": "load", "user": "ann"}
    assert payloads["use"] == {
        "name": "use",
        "count": 3,  # a whole ${...} keeps its JSON type
        "tags": ["a", "b"],
        "label": "user ann has 3",
    }
    assert result.steps["never"].status is StepStatus.SKIPPED
    assert result.output["use"] == {"count": 3, "tags": ["a", "b"]}


async def test_a_skipped_step_resolves_its_dependents_which_can_test_its_status(
    world: World, clock: VirtualClock
) -> None:
    calls: list[str] = []
    world.handle("system", "action", echo_calls(calls))
    engine = world.engine()
    definition = WorkflowDefinition(
        "wf",
        "skip",
        steps=[
            step("check", condition="${express} == true"),
            step("after", "check"),
            step("fallback", "check", condition="${steps.check.status} == 'skipped'"),
        ],
        inputs=["express"],
    )
    await engine.define_workflow(definition)
    result = await drive(clock, engine.execute_workflow("wf", {"express": False}))
    assert result.status is RunStatus.COMPLETED
    assert result.skipped == ("check",)
    assert result.steps["check"].skipped_reason == "condition '${express} == true' is false"
    assert sorted(calls) == ["after", "fallback"]
    assert result.steps["check"].attempts == 0


async def test_step_messages_have_deterministic_ids_and_an_idempotency_key(
    world: World, clock: VirtualClock
) -> None:
    seen: list[Message] = []

    async def work(message: Message) -> object:
        seen.append(message)
        if len(seen) == 1:
            raise RuntimeError("first attempt fails")
        return None

    world.handle("system", "action", work)
    engine = world.engine()
    await engine.define_workflow(
        WorkflowDefinition(
            "wf", "ids", steps=[step("s", retry_policy={"max_retries": 1, "delay": 1})]
        )
    )
    result = await drive(clock, engine.execute_workflow("wf", run_id="run-7"))
    assert result.succeeded
    assert [m.id for m in seen] == ["run-7:s:1", "run-7:s:2"]
    assert {m.headers[IDEMPOTENCY_KEY] for m in seen} == {"run-7:s"}


# -- retries ------------------------------------------------------------------------------------


async def test_retries_back_off_on_the_clock_and_record_the_due_time_first(
    world: World, clock: VirtualClock
) -> None:
    attempts: list[float] = []

    async def flaky(message: Message) -> object:
        attempts.append(clock.now())
        if len(attempts) < 3:
            raise ConnectionError("try again")
        return "ok"

    world.handle("system", "action", flaky)
    engine = world.engine()
    policy = {"max_retries": 3, "delay": 2, "backoff": 3, "jitter": 0}
    await engine.define_workflow(
        WorkflowDefinition("wf", "retry", steps=[step("s", retry_policy=policy)])
    )
    result = await drive(clock, engine.execute_workflow("wf", run_id="r"))
    assert result.succeeded
    assert result.steps["s"].attempts == 3
    history = await events(engine, "r")
    failed = [data for name, data in history if name == "AttemptFailed"]
    started = [data for name, data in history if name == "AttemptStarted"]
    assert [f["error_type"] for f in failed] == ["ConnectionError", "ConnectionError"]
    assert [round(f["retry_at"] - f["at"], 6) for f in failed] == [2.0, 6.0]
    for due, retry in zip(failed, started[1:], strict=True):
        assert retry["at"] >= due["retry_at"]
    # The due time is recorded before the wait, so it precedes the next attempt in the log.
    names = [name for name, _ in history]
    assert names.index("AttemptFailed") < names.index(
        "AttemptStarted", names.index("AttemptFailed")
    )


async def test_a_non_retryable_error_fails_the_step_at_once(
    world: World, clock: VirtualClock
) -> None:
    calls: list[int] = []

    async def broken(message: Message) -> object:
        calls.append(1)
        raise PermissionError("forbidden")

    world.handle("system", "action", broken)
    engine = world.engine()
    policy = RetryPolicy(max_retries=5, delay=1, retry_on=("ConnectionError",))
    await engine.define_workflow(
        WorkflowDefinition("wf", "x", steps=[step("s", retry_policy=policy)])
    )
    result = await drive(clock, engine.execute_workflow("wf"))
    assert result.status is RunStatus.FAILED
    assert calls == [1]
    assert result.failed_step == "s"
    assert result.steps["s"].error == "PermissionError: forbidden"
    assert result.error is not None
    assert "PermissionError" in result.error


async def test_no_reply_in_time_is_a_timeout_attempt(world: World, clock: VirtualClock) -> None:
    calls: list[int] = []

    async def slow(message: Message) -> object:
        calls.append(1)
        if len(calls) == 1:
            await clock.sleep(100)
        return "late"

    world.handle("system", "action", slow)
    engine = world.engine()
    await engine.define_workflow(
        WorkflowDefinition(
            "wf", "t", steps=[step("s", timeout=5, retry_policy={"max_retries": 1, "delay": 1})]
        )
    )
    result = await drive(clock, engine.execute_workflow("wf", run_id="r"))
    assert result.succeeded
    assert result.steps["s"].attempts == 2
    failed = [d for name, d in await events(engine, "r") if name == "AttemptFailed"]
    assert failed[0]["error_type"] == "Timeout"
    assert failed[0]["duration"] == pytest.approx(5.0, abs=0.1)


def test_retry_due_follows_the_policy() -> None:
    rng = random.Random(0)
    policy = RetryPolicy(max_retries=2, delay=1, backoff=2, jitter=0, retry_on=("E",))
    assert retry_due(policy, "E", 1, 100.0, rng) == 101.0
    assert retry_due(policy, "E", 2, 100.0, rng) == 102.0
    assert retry_due(policy, "E", 3, 100.0, rng) is None  # retries spent
    assert retry_due(policy, "Other", 1, 100.0, rng) is None  # not in retry_on
    # Engine-made errors are not the target's: retry_on does not exclude them.
    assert retry_due(policy, "Interrupted", 1, 100.0, rng) == 101.0
    assert retry_due(policy, "CircuitOpenError", 1, 100.0, rng, retry_after=30.0) == 130.0


# -- circuit breakers and rules ------------------------------------------------------------------


async def test_an_open_breaker_fails_fast_and_retries_after_its_wait(
    world: World, clock: VirtualClock
) -> None:
    calls: list[float] = []

    async def pay(message: Message) -> object:
        calls.append(clock.now())
        return "paid"

    world.handle("payments", "pay", pay)
    breakers = BreakerRegistry(
        BreakerConfig(wait_duration_in_open=30.0, minimum_number_of_calls=2), clock=clock
    )
    engine = world.engine(breakers=breakers)
    await engine.define_workflow(
        WorkflowDefinition(
            "wf",
            "pay",
            steps=[
                step(
                    "pay",
                    system_target="payments",
                    action="pay",
                    retry_policy={"max_retries": 2, "delay": 1},
                )
            ],
        )
    )
    breakers.get("payments").force_open()
    opened_at = clock.now()
    result = await drive(clock, engine.execute_workflow("wf", run_id="r"))
    assert result.succeeded
    assert len(calls) == 1
    assert calls[0] >= opened_at + 30.0
    failed = [d for name, d in await events(engine, "r") if name == "AttemptFailed"]
    assert [f["error_type"] for f in failed] == ["CircuitOpenError"]
    assert failed[0]["duration"] is None
    assert failed[0]["retry_at"] == pytest.approx(opened_at + 30.0, abs=0.1)
    assert result.steps["pay"].attempts == 2
    # The breaker's transitions are in the log too, and the run's history notes the one its
    # retry went through (the trial call let through in HALF_OPEN).
    assert await world.store.read("circuit-breaker:payments")
    noted = [d for name, d in await events(engine, "r") if name == "BreakerTransitioned"]
    assert [(d["breaker"], d["came_from"], d["went_to"]) for d in noted] == [
        ("payments", "open", "half_open")
    ]


async def test_route_to_rule_sends_the_step_to_the_fallback_while_the_breaker_is_open(
    world: World, clock: VirtualClock
) -> None:
    primary: list[str] = []
    backup: list[str] = []
    world.handle("payments", "pay", echo_calls(primary))
    world.handle("payments-backup", "pay", echo_calls(backup))
    breakers = BreakerRegistry(BreakerConfig(wait_duration_in_open=30.0), clock=clock)
    engine = world.engine(breakers=breakers)
    definition = WorkflowDefinition(
        "wf",
        "pay",
        steps=[step("pay", system_target="payments", action="pay")],
        rules=[
            AdaptationRule(
                "use-backup",
                when=RuleTrigger.BREAKER_OPEN,
                then=RuleAction.ROUTE_TO,
                target="payments",
                route_to="payments-backup",
            )
        ],
    )
    await engine.define_workflow(definition)
    assert (await drive(clock, engine.execute_workflow("wf"))).succeeded
    assert (primary, backup) == (["pay"], [])
    breakers.get("payments").force_open()
    result = await drive(clock, engine.execute_workflow("wf", run_id="r2"))
    assert result.succeeded
    assert (primary, backup) == (["pay"], ["pay"])
    assert result.steps["pay"].target == "payments-backup"
    (applied,) = result.applied_rules
    assert (applied.rule_id, applied.step_id) == ("use-backup", "pay")
    assert applied.detail["to"] == "payments-backup"
    assert "RuleApplied" in [name for name, _ in await events(engine, "r2")]


def test_breaker_route_uses_the_steps_fallback_target() -> None:
    definition = WorkflowDefinition(
        "wf",
        "x",
        steps=[
            step("a", system_target="pay", fallback_target="pay-2"),
            step("b", system_target="ship"),
        ],
        rules=[
            AdaptationRule(
                "r", when=RuleTrigger.BREAKER_OPEN, then=RuleAction.ROUTE_TO, target="pay"
            )
        ],
    )
    compiled = definition.compile()
    waits = {"pay": 5.0, "ship": 5.0}
    route = breaker_route(compiled.rules, compiled.steps["a"], waits.__getitem__)
    assert route == ("pay-2", compiled.rules[0])
    assert breaker_route(compiled.rules, compiled.steps["b"], waits.__getitem__) == ("ship", None)
    # No wait left (closed, or open with its wait passed: a trial call is due): the target.
    closed = breaker_route(compiled.rules, compiled.steps["a"], lambda _: 0.0)
    assert closed == ("pay", None)


async def test_an_open_primary_gets_a_trial_call_after_its_wait_and_traffic_returns(
    world: World, clock: VirtualClock
) -> None:
    primary: list[str] = []
    backup: list[str] = []
    world.handle("payments", "pay", echo_calls(primary))
    world.handle("payments-backup", "pay", echo_calls(backup))
    breakers = BreakerRegistry(BreakerConfig(wait_duration_in_open=30.0), clock=clock)
    engine = world.engine(breakers=breakers)
    definition = WorkflowDefinition(
        "wf",
        "pay",
        steps=[step("pay", system_target="payments", action="pay")],
        rules=[
            AdaptationRule(
                "use-backup",
                when=RuleTrigger.BREAKER_OPEN,
                then=RuleAction.ROUTE_TO,
                target="payments",
                route_to="payments-backup",
            )
        ],
    )
    await engine.define_workflow(definition)
    breaker = breakers.get("payments")
    breaker.force_open()
    routed = await drive(clock, engine.execute_workflow("wf", run_id="while-open"))
    assert routed.steps["pay"].target == "payments-backup"
    assert (primary, backup) == ([], ["pay"])
    await clock.advance(31.0)  # the open wait has passed; the breaker is still OPEN until a call
    assert breaker.state is BreakerState.OPEN
    trial = await drive(clock, engine.execute_workflow("wf", run_id="after-wait"))
    assert trial.succeeded
    assert trial.steps["pay"].target == "payments"
    assert trial.applied_rules == ()
    assert (primary, backup) == (["pay"], ["pay"])
    assert breaker.state is not BreakerState.OPEN  # the trial call reached it
    again = await drive(clock, engine.execute_workflow("wf", run_id="next"))
    assert again.steps["pay"].target == "payments"
    assert (primary, backup) == (["pay", "pay"], ["pay"])


async def test_slow_step_rule_changes_parameters_after_a_slow_attempt_or_run(
    world: World, clock: VirtualClock
) -> None:
    payloads: list[Any] = []

    async def report(message: Message) -> object:
        payloads.append(message.payload)
        assert isinstance(message.payload, dict)
        if message.payload.get("mode") != "fast":
            await clock.sleep(10)
        return None

    world.handle("system", "action", report)
    engine = world.engine()
    definition = WorkflowDefinition(
        "wf",
        "slow",
        steps=[
            step(
                "report",
                parameters={"mode": "full"},
                timeout=3,
                retry_policy={"max_retries": 1, "delay": 1},
            )
        ],
        rules=[
            AdaptationRule(
                "go-fast",
                when=RuleTrigger.STEP_SLOWER_THAN,
                then=RuleAction.SET_PARAMETERS,
                step_id="report",
                threshold=2.0,
                parameters={"mode": "fast"},
            )
        ],
    )
    await engine.define_workflow(definition)
    result = await drive(clock, engine.execute_workflow("wf", run_id="r1"))
    assert result.succeeded
    assert payloads == [{"mode": "full"}, {"mode": "fast"}]
    (applied,) = result.applied_rules
    assert applied.detail["observed"] == pytest.approx(3.0, abs=0.1)

    # A step that was slow in earlier runs starts with the rule's parameters.
    slow = WorkflowDefinition(
        "slow-history",
        "x",
        steps=[step("report", parameters={"mode": "full"})],
        rules=definition.rules,
    )
    await engine.define_workflow(slow)
    await drive(clock, engine.execute_workflow("slow-history"))
    payloads.clear()
    second = await drive(clock, engine.execute_workflow("slow-history"))
    assert payloads == [{"mode": "fast"}]
    assert [r.rule_id for r in second.applied_rules] == ["go-fast"]


def test_slow_step_rules_use_the_previous_attempt_then_the_median_of_runs() -> None:
    rule = AdaptationRule(
        "r",
        when=RuleTrigger.STEP_SLOWER_THAN,
        then=RuleAction.SET_PARAMETERS,
        threshold=2.0,
        parameters={"x": 1},
    )
    assert slow_step_rules([rule], "s", 3.0, []) == [(rule, 3.0)]
    assert slow_step_rules([rule], "s", 1.0, [9.0, 9.0]) == []  # this run's attempt wins
    assert slow_step_rules([rule], "s", None, [1.0, 3.0, 5.0]) == [(rule, 3.0)]
    assert slow_step_rules([rule], "s", None, []) == []


async def test_under_load_optional_steps_are_skipped_with_a_reason(
    world: World, clock: VirtualClock
) -> None:
    release = asyncio.Event()
    calls: list[str] = []

    async def work(message: Message) -> object:
        assert isinstance(message.payload, dict)
        calls.append(str(message.payload["name"]))
        if message.payload["name"] == "main":
            await release.wait()
        return None

    world.handle("system", "action", work)
    engine = world.engine()
    definition = WorkflowDefinition(
        "wf",
        "load",
        steps=[step("main"), step("extras", optional=True), step("required")],
        rules=[
            AdaptationRule(
                "shed", when=RuleTrigger.UNDER_LOAD, then=RuleAction.SKIP_OPTIONAL, threshold=1
            )
        ],
    )
    await engine.define_workflow(definition)
    run = asyncio.ensure_future(engine.execute_workflow("wf", run_id="r"))
    await until(clock, lambda: "main" in calls)
    release.set()
    result = await drive(clock, run)
    assert result.status is RunStatus.COMPLETED
    assert result.skipped == ("extras",)
    reason = result.steps["extras"].skipped_reason
    assert reason is not None
    assert "under load" in reason
    assert "'shed'" in reason
    assert sorted(calls) == ["main", "required"]  # a non-optional step is never shed
    assert [r.rule_id for r in result.applied_rules] == ["shed"]


def test_under_load_rule_only_skips_optional_steps() -> None:
    definition = WorkflowDefinition(
        "wf",
        "x",
        steps=[step("a", optional=True), step("b")],
        rules=[
            AdaptationRule(
                "shed", when=RuleTrigger.UNDER_LOAD, then=RuleAction.SKIP_OPTIONAL, threshold=3
            )
        ],
    )
    compiled = definition.compile()
    assert under_load_rule(compiled.rules, compiled.steps["a"], 3) is compiled.rules[0]
    assert under_load_rule(compiled.rules, compiled.steps["a"], 2) is None
    assert under_load_rule(compiled.rules, compiled.steps["b"], 99) is None


# -- sagas ----------------------------------------------------------------------------------------


async def test_a_terminal_failure_compensates_completed_steps_in_reverse_completion_order(
    world: World, clock: VirtualClock
) -> None:
    undone: list[str] = []

    async def work(message: Message) -> object:
        assert isinstance(message.payload, dict)
        name = message.payload["name"]
        await clock.sleep({"a": 2.0, "b": 1.0}.get(str(name), 0.0))
        if name == "c":
            raise ValueError("card declined")
        return {"id": f"{name}-1"}

    async def undo(message: Message) -> object:
        assert isinstance(message.payload, dict)
        undone.append(str(message.payload["undo"]))
        return None

    world.handle("system", "action", work)
    world.handle("system", "undo", undo)
    engine = world.engine()
    definition = WorkflowDefinition(
        "wf",
        "saga",
        steps=[
            step(
                "a", compensation="undo", compensation_parameters={"undo": "${steps.a.output.id}"}
            ),
            step(
                "b", compensation="undo", compensation_parameters={"undo": "${steps.b.output.id}"}
            ),
            step("c", "a", "b", retry_policy={"max_retries": 0}),
            step("d", "c"),
        ],
    )
    await engine.define_workflow(definition)
    result = await drive(clock, engine.execute_workflow("wf", run_id="r"))
    assert result.status is RunStatus.COMPENSATED
    assert undone == ["a-1", "b-1"]  # b completed first, so a is undone first
    assert result.compensated == ("a", "b")
    assert result.failed_step == "c"
    assert result.steps["d"].status is StepStatus.PENDING
    compensation = result.steps["a"].compensation
    assert compensation is not None
    assert (compensation.status, compensation.attempts, compensation.action) == (
        StepStatus.COMPENSATED,
        1,
        "undo",
    )
    names = [name for name, _ in await events(engine, "r")]
    assert names[-1] == "Compensated"
    assert names.count("CompensationStarted") == 2


async def test_a_failing_compensation_is_retried_recorded_and_the_others_still_run(
    world: World, clock: VirtualClock
) -> None:
    undone: list[str] = []

    async def work(message: Message) -> object:
        assert isinstance(message.payload, dict)
        if message.payload["name"] == "d":
            raise ValueError("no stock")
        return None

    async def undo(message: Message) -> object:
        assert isinstance(message.payload, dict)
        name = str(message.payload["name"])
        undone.append(name)
        if name == "c" or (name == "b" and undone.count("b") == 1):
            raise ConnectionError(f"cannot undo {name}")
        return None

    world.handle("system", "action", work)
    world.handle("system", "undo", undo)
    engine = world.engine()
    policy = {"max_retries": 1, "delay": 1}
    definition = WorkflowDefinition(
        "wf",
        "saga",
        steps=[
            step("a", compensation="undo", retry_policy=policy),
            step("b", "a", compensation="undo", retry_policy=policy),
            step("c", "b", compensation="undo", retry_policy=policy),
            step("nothing", "c"),  # no compensation action: nothing to compensate
            step("d", "nothing", retry_policy={"max_retries": 0}),
        ],
    )
    for item in definition.steps.values():
        if item.compensation:
            object.__setattr__(item, "compensation_parameters", {"name": item.step_id})
    await engine.define_workflow(definition)
    result = await drive(clock, engine.execute_workflow("wf"))
    assert result.status is RunStatus.COMPENSATION_FAILED
    assert undone == ["c", "c", "b", "b", "a"]
    c, b, a = (result.steps[s].compensation for s in "cba")
    assert c is not None
    assert (c.status, c.attempts) == (StepStatus.COMPENSATION_FAILED, 2)
    assert c.error == "ConnectionError: cannot undo c"
    assert b is not None
    assert (b.status, b.attempts) == (StepStatus.COMPENSATED, 2)
    assert a is not None
    assert (a.status, a.attempts) == (StepStatus.COMPENSATED, 1)
    nothing = result.steps["nothing"].compensation
    assert nothing is not None
    assert nothing.action is None
    assert result.compensated == ("nothing", "b", "a")


async def test_a_failure_before_anything_completed_is_failed(
    world: World, clock: VirtualClock
) -> None:
    async def broken(message: Message) -> object:
        raise ValueError("down")

    world.handle("system", "action", broken)
    engine = world.engine()
    await engine.define_workflow(
        WorkflowDefinition(
            "wf", "x", steps=[step("a", retry_policy={"max_retries": 0}), step("b", "a")]
        )
    )
    result = await drive(clock, engine.execute_workflow("wf"))
    assert result.status is RunStatus.FAILED
    assert result.compensated == ()


# -- definitions ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "bad_step", "words"),
    [
        ([step("a", "b"), step("b", "a")], "a", "cycle"),
        ([step("a", "missing")], "a", "missing"),
        ([step("a", condition="${x} ==")], "a", "condition"),
        ([step("a"), step("b", "a", condition="${steps.c.output} == 1"), step("c")], "b", "c"),
    ],
)
async def test_bad_definitions_are_rejected_naming_the_step_and_store_nothing(
    world: World, steps: list[WorkflowStep], bad_step: str, words: str
) -> None:
    engine = world.engine()
    definition = WorkflowDefinition("wf", "bad")
    for item in steps:
        definition.add_step(item)
    with pytest.raises(WorkflowDefinitionError) as caught:
        await engine.define_workflow(definition)
    assert caught.value.step_id == bad_step
    assert words in str(caught.value)
    assert await world.store.max_position() == 0
    with pytest.raises(UnknownWorkflowError):
        await engine.execute_workflow("wf")


async def test_redefining_records_a_new_version_and_runs_keep_theirs(
    world: World, clock: VirtualClock
) -> None:
    world.handle("system", "action", echo_calls([]))
    engine = world.engine()
    first = WorkflowDefinition("wf", "v1", steps=[step("a")])
    await engine.define_workflow(first)
    await engine.define_workflow(first)  # the same content: the same version
    old = await drive(clock, engine.execute_workflow("wf"))
    assert old.definition_version == 1
    await engine.define_workflow(WorkflowDefinition("wf", "v2", steps=[step("a"), step("b", "a")]))
    new = await drive(clock, engine.execute_workflow("wf"))
    assert new.definition_version == 2
    assert set(new.steps) == {"a", "b"}
    assert len(await world.store.read("workflow-definition:wf")) == 2


async def test_unknown_runs_and_workflows_are_typed_errors(world: World) -> None:
    engine = world.engine()
    with pytest.raises(UnknownRunError):
        await engine.history("nope")
    with pytest.raises(UnknownRunError):
        await engine.get_result("nope")
    with pytest.raises(UnknownWorkflowError, match="define_workflow"):
        await engine.execute_workflow("nope")


async def test_a_run_id_is_used_once(world: World, clock: VirtualClock) -> None:
    world.handle("system", "action", echo_calls([]))
    engine = world.engine()
    await engine.define_workflow(WorkflowDefinition("wf", "x", steps=[step("a")]))
    await drive(clock, engine.execute_workflow("wf", run_id="once"))
    with pytest.raises(WorkflowError, match="already exists"):
        await engine.execute_workflow("wf", run_id="once")
    assert (await engine.wait_for("once")).succeeded  # a finished run answers at once


# -- durability ---------------------------------------------------------------------------------


async def test_resume_continues_a_retry_wait_until_its_due_time_without_rerunning_steps(
    world: World, clock: VirtualClock
) -> None:
    calls: list[tuple[str, float]] = []

    async def work(message: Message) -> object:
        assert isinstance(message.payload, dict)
        name = str(message.payload["name"])
        calls.append((name, clock.now()))
        if name == "b" and sum(1 for n, _ in calls if n == "b") == 1:
            raise ConnectionError("later")
        return name

    world.handle("system", "action", work)
    first = world.engine()
    definition = WorkflowDefinition(
        "wf",
        "x",
        steps=[
            step("a"),
            step("b", "a", retry_policy={"max_retries": 2, "delay": 60, "jitter": 0}),
        ],
    )
    await first.define_workflow(definition)
    await first.start_workflow("wf", run_id="r")
    await until(clock, lambda: len(calls) == 2)
    await clock.advance(1)
    history = await events(first, "r")
    (failed,) = [d for name, d in history if name == "AttemptFailed"]
    await first.close()  # the process "dies" during the 60 s wait

    second = world.engine()
    assert await second.resume() == ["r"]
    result = await drive(clock, second.wait_for("r"))
    assert result.succeeded
    assert [n for n, _ in calls] == ["a", "b", "b"]  # a is not run again
    assert calls[-1][1] >= failed["retry_at"]
    assert "Resumed" in [name for name, _ in await events(second, "r")]
    assert await second.resume() == []  # nothing left to resume


async def test_an_attempt_in_flight_at_a_crash_counts_as_interrupted_and_is_retried(
    world: World, clock: VirtualClock
) -> None:
    calls: list[str] = []
    gate = asyncio.Event()

    async def work(message: Message) -> object:
        calls.append(message.id)
        if len(calls) == 1:
            await gate.wait()
        return "done"

    world.handle("system", "action", work)
    first = world.engine()
    await first.define_workflow(
        WorkflowDefinition(
            "wf", "x", steps=[step("s", retry_policy={"max_retries": 1, "delay": 5})]
        )
    )
    await first.start_workflow("wf", run_id="r")
    await until(clock, lambda: len(calls) == 1)
    await first.close()
    gate.set()  # the first attempt's late reply has nobody to go to

    second = world.engine()
    await second.resume()
    result = await drive(clock, second.wait_for("r"))
    assert result.succeeded
    assert result.steps["s"].attempts == 2
    assert calls == ["r:s:1", "r:s:2"]
    failed = [d for name, d in await events(second, "r") if name == "AttemptFailed"]
    assert [f["error_type"] for f in failed] == ["Interrupted"]


async def test_a_restarted_engine_resumes_runs_before_redefining_their_workflow(
    world: World, clock: VirtualClock
) -> None:
    gate = asyncio.Event()

    async def work(message: Message) -> object:
        await gate.wait()
        return None

    world.handle("system", "action", work)
    first = world.engine()
    await first.define_workflow(WorkflowDefinition("wf", "x", steps=[step("a"), step("b", "a")]))
    await first.start_workflow("wf", run_id="r")
    await clock.advance(1)
    await first.close()
    gate.set()
    second = world.engine()  # knows no definitions: it reads them from the log
    assert await second.resume() == ["r"]
    assert (await drive(clock, second.wait_for("r"))).succeeded
    assert (await drive(clock, second.execute_workflow("wf"))).succeeded


async def test_engines_with_different_ids_resume_only_their_own_runs(
    world: World, clock: VirtualClock
) -> None:
    gate = asyncio.Event()

    async def work(message: Message) -> object:
        await gate.wait()
        return None

    world.handle("system", "action", work)
    first = world.engine(engine_id="east")
    await first.define_workflow(WorkflowDefinition("wf", "x", steps=[step("a")]))
    await first.start_workflow("wf", run_id="r")
    await clock.advance(1)
    await first.close()
    gate.set()
    assert await world.engine(engine_id="west").resume() == []
    east = world.engine(engine_id="east")
    assert await east.resume() == ["r"]
    assert (await drive(clock, east.wait_for("r"))).succeeded


# -- results and telemetry -----------------------------------------------------------------------


async def test_result_to_dict_is_json_and_wait_for_times_out_on_the_clock(
    world: World, clock: VirtualClock
) -> None:
    import json

    gate = asyncio.Event()

    async def work(message: Message) -> object:
        await gate.wait()
        return {"ok": True}

    world.handle("system", "action", work)
    engine = world.engine()
    await engine.define_workflow(WorkflowDefinition("wf", "x", steps=[step("a")]))
    run_id = await engine.start_workflow("wf")
    with pytest.raises(TimeoutError):
        await drive(clock, engine.wait_for(run_id, timeout=2))
    assert (await engine.get_result(run_id)).status is RunStatus.RUNNING
    gate.set()
    result = await drive(clock, engine.wait_for(run_id))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["status"] == "completed"
    assert data["steps"]["a"]["output"] == {"ok": True}


async def test_spans_per_run_and_attempt_and_outcome_counters(clock: VirtualClock) -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    broker = MessageBroker(
        clock=clock,
        settings=load_settings({}),
        tracer_provider=tracer_provider,
        handler_timeout=10_000.0,
    )
    engine = WorkflowCoordinationEngine(
        store=MemoryEventStore(),
        broker=broker,
        clock=clock,
        settings=load_settings({}),
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
    )
    traceparents: list[str] = []

    async def work(message: Message) -> object:
        traceparents.append(message.headers.get("traceparent", ""))
        return None

    SystemConnector("system", broker).on_command("action", work)
    try:
        await engine.define_workflow(
            WorkflowDefinition("wf", "x", steps=[step("a"), step("b", "a")])
        )
        result: WorkflowResult = await drive(clock, engine.execute_workflow("wf"))
    finally:
        await engine.close()
        await broker.close()
    assert result.trace_id is not None
    assert len(result.trace_id) == 32
    spans = exporter.get_finished_spans()
    names = [span.name for span in spans]
    assert "workflow wf" in names
    assert names.count("workflow step a") == 1
    assert names.count("workflow step b") == 1
    assert {format(span.context.trace_id, "032x") for span in spans} == {result.trace_id}
    assert all(result.trace_id in header for header in traceparents)
    data = reader.get_metrics_data()
    assert data is not None
    found: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    (runs,) = found["cb.workflow.runs"]
    assert runs.value == 1
    assert runs.attributes["outcome"] == "completed"
    assert sum(point.value for point in found["cb.workflow.step.attempts"]) == 2


async def test_a_run_whose_definition_is_gone_does_not_stop_resuming_the_others(
    world: World, clock: VirtualClock
) -> None:
    gate = asyncio.Event()

    async def work(message: Message) -> object:
        await gate.wait()
        return None

    world.handle("system", "action", work)
    first = world.engine()
    await first.define_workflow(WorkflowDefinition("lost", "x", steps=[step("a")]))
    await first.define_workflow(WorkflowDefinition("kept", "x", steps=[step("a")]))
    await first.start_workflow("lost", run_id="r-lost")
    await first.start_workflow("kept", run_id="r-kept")
    await clock.advance(1)
    await first.close()
    gate.set()
    # The same log without the definition of "lost".
    copy = MemoryEventStore()
    for stored in await world.store.read_all():
        if stored.stream != "workflow-definition:lost":
            await copy.append(stored.stream, [NewEvent(stored.topic, stored.state)])
    world.store = copy
    second = world.engine()
    assert await second.resume() == ["r-kept"]
    assert (await drive(clock, second.wait_for("r-kept"))).succeeded
    assert (await second.get_result("r-lost")).status is RunStatus.RUNNING


async def test_a_steps_outcome_is_committed_before_any_dependent_is_sent(
    world: World, clock: VirtualClock
) -> None:
    engine = world.engine()
    committed_when_sent: dict[str, set[str]] = {}

    async def work(message: Message) -> object:
        payload = message.payload
        assert isinstance(payload, dict)
        stream = str(run_aggregate_id("r"))
        names = {
            (stored.topic.rsplit(".", 1)[-1], json.loads(stored.state).get("step_id"))
            for stored in await world.store.read(stream)
        }
        committed_when_sent[str(payload["name"])] = {
            step_id for name, step_id in names if name == "StepCompleted"
        }
        await clock.sleep(7.0)  # longer than a commit: its outcome comes while nothing saves
        return "ok"

    world.handle("system", "action", work)
    await engine.define_workflow(
        WorkflowDefinition(
            "wf",
            "diamond",
            steps=[step("a"), step("b", "a"), step("c", "a"), step("d", "b", "c")],
        )
    )
    append_many = world.store.append_many

    async def slow_append_many(*args: Any, **kwargs: Any) -> Any:
        await clock.sleep(5.0)  # a slow commit: nothing may be sent while it is pending
        return await append_many(*args, **kwargs)

    world.store.append_many = slow_append_many  # type: ignore[method-assign]
    result = await drive(clock, engine.execute_workflow("wf", run_id="r"))
    world.store.append_many = append_many  # type: ignore[method-assign]
    assert result.succeeded
    assert committed_when_sent["a"] == set()
    assert {"a"} <= committed_when_sent["b"]
    assert {"a"} <= committed_when_sent["c"]
    assert committed_when_sent["d"] >= {"a", "b", "c"}


# -- store outages ---------------------------------------------------------------------------------


class FlakyWrites:
    """Makes the world's store fail writes to run streams (StoreUnavailableError, as a
    PostgreSQL blip does): the next ``fail`` of them, or all while ``down``. With
    ``commit_then_fail`` a failing write is committed first (the connection was lost after
    the commit: the caller cannot tell it went through)."""

    def __init__(self, world: World, *, commit_then_fail: bool = False) -> None:
        self.inner = world.store.append_many
        self.fail = 0
        self.down = False
        self.failures = 0
        self.commit_then_fail = commit_then_fail
        world.store.append_many = self.append_many  # type: ignore[method-assign]

    async def append_many(self, requests: Any, *, tracking: Any = None) -> Any:
        run_write = any(not r.stream.startswith("workflow-") for r in requests)
        if run_write and (self.down or self.fail > 0):
            self.fail -= 1
            self.failures += 1
            if self.commit_then_fail:
                await self.inner(requests, tracking=tracking)
            raise StoreUnavailableError("lost the connection to the store (test)")
        return await self.inner(requests, tracking=tracking)


async def three_steps(world: World, engine: WorkflowCoordinationEngine) -> None:
    async def work(message: Message) -> object:
        await world.clock.sleep(1.0)
        return "ok"

    world.handle("system", "action", work)
    await engine.define_workflow(
        WorkflowDefinition(
            "wf",
            "chain",
            steps=[step("a"), step("b", "a"), step("c", "a", retry_policy={"max_retries": 0})],
        )
    )


async def assert_each_event_once(world: World, run_id: str) -> list[str]:
    stored = await world.store.read(str(run_aggregate_id(run_id)))
    assert [event.version for event in stored] == list(range(1, len(stored) + 1))
    names = [event.topic.rsplit(".", 1)[-1] for event in stored]
    for step_id in "abc":
        completed = [
            e
            for e in stored
            if e.topic.endswith("StepCompleted") and json.loads(e.state)["step_id"] == step_id
        ]
        assert len(completed) == 1, (step_id, names)
    return names


@pytest.mark.parametrize("commit_then_fail", [False, True])
async def test_a_save_failing_for_a_moment_is_retried_on_the_clock_and_the_run_completes(
    world: World, clock: VirtualClock, commit_then_fail: bool
) -> None:
    engine = world.engine()
    await three_steps(world, engine)
    flaky = FlakyWrites(world, commit_then_fail=commit_then_fail)
    await engine.start_workflow("wf", run_id="r")
    flaky.fail = 3  # the next three commits of the run fail
    before = clock.monotonic()
    result = await drive(clock, engine.wait_for("r"))
    assert result.succeeded, result.error
    assert flaky.failures == 3
    assert clock.monotonic() - before >= 2.0  # the steps' time, plus the backoff waits
    names = await assert_each_event_once(world, "r")
    assert names[-1] == "Completed"
    # The run's index says it finished: nothing is left to resume.
    assert await world.engine(engine_id="workflows").resume() == []


async def test_a_store_down_for_good_ends_the_driver_and_resume_finishes_the_run(
    world: World, clock: VirtualClock
) -> None:
    engine = world.engine()
    await three_steps(world, engine)
    flaky = FlakyWrites(world)
    await engine.start_workflow("wf", run_id="r")
    flaky.down = True
    waited = asyncio.ensure_future(engine.wait_for("r"))
    with pytest.raises(StoreUnavailableError):
        await drive(clock, waited)
    assert flaky.failures == STORE_RETRY_ATTEMPTS  # then it gave up
    assert (await engine.get_result("r")).status is RunStatus.RUNNING
    flaky.down = False
    assert await engine.resume() == ["r"]
    result = await drive(clock, engine.wait_for("r"))
    assert result.succeeded, result.error
    await assert_each_event_once(world, "r")


async def test_closing_during_an_outage_does_not_wait_for_the_store(
    world: World, clock: VirtualClock
) -> None:
    engine = world.engine()
    await three_steps(world, engine)
    flaky = FlakyWrites(world)
    await engine.start_workflow("wf", run_id="r")
    flaky.down = True
    await until(clock, lambda: flaky.failures >= 2)  # the driver is in its backoff
    closing = asyncio.ensure_future(engine.close())
    for _ in range(100):  # no virtual time passes: a retry's wait would never end
        await asyncio.sleep(0)
    assert closing.done()
    flaky.down = False
    second = world.engine()
    assert await second.resume() == ["r"]
    result = await drive(clock, second.wait_for("r"))
    assert result.succeeded, result.error
    await assert_each_event_once(world, "r")


# -- steps of unknown outcome -------------------------------------------------------------------


async def test_a_step_whose_attempt_timed_out_is_compensated_when_a_sibling_fails(
    world: World, clock: VirtualClock
) -> None:
    undone: list[str] = []

    async def work(message: Message) -> object:
        assert isinstance(message.payload, dict)
        name = str(message.payload["name"])
        if name == "slow":
            # No reply in time (5 s), but it did apply the command: a late effect.
            await clock.sleep(5.5)
        if name == "fails":
            await clock.sleep(6.0)
            raise ValueError("card declined")
        return "ok"

    async def undo(message: Message) -> object:
        assert isinstance(message.payload, dict)
        undone.append(str(message.payload["name"]))
        return None

    world.handle("system", "action", work)
    world.handle("system", "undo", undo)
    world.handle("warehouse", "action", work)
    world.handle("warehouse", "undo", undo)
    engine = world.engine()
    retry = {"max_retries": 2, "delay": 10}
    compensated = {"compensation": "undo"}
    definition = WorkflowDefinition(
        "wf",
        "saga",
        steps=[
            step("done", **compensated),
            step("slow", system_target="warehouse", timeout=5, retry_policy=retry, **compensated),
            step("fails", retry_policy={"max_retries": 0}, **compensated),
        ],
    )
    for item in definition.steps.values():
        object.__setattr__(item, "compensation_parameters", {"name": item.step_id})
    await engine.define_workflow(definition)
    result = await drive(clock, engine.execute_workflow("wf", run_id="r"))
    assert result.status is RunStatus.COMPENSATED
    assert result.failed_step == "fails"
    # The timed-out step was waiting for its retry: skipped, and compensated first.
    assert undone == ["slow", "done"]
    assert result.compensated == ("slow", "done")
    slow = result.steps["slow"]
    assert slow.status is StepStatus.SKIPPED
    assert slow.error is not None
    assert slow.error.startswith("Timeout")
    assert slow.compensation is not None
    assert (slow.compensation.status, slow.compensation.reason) == (
        StepStatus.COMPENSATED,
        "outcome unknown",
    )
    done = result.steps["done"].compensation
    assert done is not None
    assert done.reason == "completed"
    # A definite failure of the target: never applied, never compensated.
    assert result.steps["fails"].compensation is None
    started = [
        (d["step_id"], d["reason"])
        for n, d in await events(engine, "r")
        if n == "CompensationStarted"
    ]
    assert started == [("slow", "outcome unknown"), ("done", "completed")]


async def test_a_step_that_timed_out_for_good_is_compensated_even_with_nothing_completed(
    world: World, clock: VirtualClock
) -> None:
    undone: list[str] = []

    async def stuck(message: Message) -> object:
        await clock.sleep(5.5)  # replies after the step's timeout: the effect happened
        return "late"

    async def undo(message: Message) -> object:
        undone.append(message.id)
        return None

    world.handle("system", "action", stuck)
    world.handle("system", "undo", undo)
    engine = world.engine()
    await engine.define_workflow(
        WorkflowDefinition(
            "wf",
            "x",
            steps=[
                step("a", timeout=5, retry_policy={"max_retries": 0}, compensation="undo"),
                step("no-undo", timeout=5, retry_policy={"max_retries": 0}),
            ],
        )
    )
    result = await drive(clock, engine.execute_workflow("wf", run_id="r"))
    assert result.status is RunStatus.COMPENSATED
    assert result.steps["a"].status is StepStatus.FAILED
    assert result.compensated == ("a",)
    assert undone == ["r:a:compensate:1"]
    # A step naming no compensation action has nothing to send: it is left as it is.
    assert result.steps["no-undo"].compensation is None


async def test_a_step_whose_attempts_all_failed_in_the_handler_is_not_compensated(
    world: World, clock: VirtualClock
) -> None:
    undone: list[str] = []

    async def broken(message: Message) -> object:
        raise ConnectionError("refused")

    async def undo(message: Message) -> object:
        undone.append(message.id)
        return None

    world.handle("system", "action", broken)
    world.handle("system", "undo", undo)
    engine = world.engine()
    await engine.define_workflow(
        WorkflowDefinition(
            "wf",
            "x",
            steps=[step("a", retry_policy={"max_retries": 2, "delay": 1}, compensation="undo")],
        )
    )
    result = await drive(clock, engine.execute_workflow("wf", run_id="r"))
    assert result.status is RunStatus.FAILED
    assert result.steps["a"].attempts == 3
    assert result.steps["a"].compensation is None
    assert result.compensated == ()
    assert undone == []


async def test_a_store_refusing_breaker_transitions_neither_stops_a_step_nor_ends_the_run(
    world: World, clock: VirtualClock
) -> None:
    """Found by the orders chaos scenario: a breaker transition the store refused killed the
    step's task, and the run was completed with that step waiting for its retry and its
    dependent never run. The transitions stay pending and are stored later; the run ends
    only when every step did."""
    calls: list[str] = []
    world.handle("system", "action", echo_calls(calls))
    world.handle("payments", "action", echo_calls(calls))
    breakers = BreakerRegistry(BreakerConfig(wait_duration_in_open=5.0), clock=clock)
    engine = world.engine(breakers=breakers)
    await engine.define_workflow(
        WorkflowDefinition(
            "wf",
            "branches",
            steps=[
                step("a"),
                step("b", system_target="payments", retry_policy={"max_retries": 3, "delay": 1}),
                step("c", "b"),
            ],
        )
    )
    inner = world.store.append_many
    refused: list[str] = []
    down = True

    async def append_many(requests: Any, *, tracking: Any = None) -> Any:
        streams = [r.stream for r in requests]
        if down and any(s.startswith("circuit-breaker:") for s in streams):
            refused.extend(streams)
            raise StoreUnavailableError("lost the connection to the store (test)")
        return await inner(requests, tracking=tracking)

    world.store.append_many = append_many  # type: ignore[method-assign]
    breakers.get("payments").force_open()
    result = await drive(clock, engine.execute_workflow("wf", run_id="r"))
    assert result.succeeded, result.error
    assert {s: result.steps[s].status for s in "abc"} == {s: StepStatus.COMPLETED for s in "abc"}
    assert sorted(calls) == ["a", "b", "c"]
    assert refused  # the store did refuse them
    assert breakers.pending()  # kept, in order, for the next flush
    down = False
    await breakers.flush()
    stored = await world.store.read("circuit-breaker:payments")
    assert [json.loads(e.state)["to_state"] for e in stored][:2] == ["open", "half_open"]


async def test_a_send_the_transport_refuses_is_retried_and_never_charged_to_the_target(
    world: World, clock: VirtualClock
) -> None:
    """The broker's server is down for a moment: the step's command never leaves this process.
    That is the engine's trouble, not the target's: the step retries even though its
    retry_on names only the target's errors, and the target's breaker counts nothing (found
    with the chaos simulator's publish_fail fault: healthy targets' breakers opened)."""
    calls: list[str] = []
    world.handle("payments", "action", echo_calls(calls))
    breakers = BreakerRegistry(
        BreakerConfig(minimum_number_of_calls=2, failure_rate_threshold=50.0), clock=clock
    )
    engine = world.engine(breakers=breakers)
    await engine.define_workflow(
        WorkflowDefinition(
            "wf",
            "pay",
            steps=[
                step(
                    "pay",
                    system_target="payments",
                    retry_policy={"max_retries": 5, "delay": 1, "retry_on": ["Busy"]},
                )
            ],
        )
    )
    publish = world.broker.publish
    refused: list[str] = []

    async def refuse_three(message: Message) -> Message:
        if message.name == "action" and len(refused) < 3:
            refused.append(message.id)
            raise TransportUnavailableError("the broker's server is restarting (test)")
        return await publish(message)

    world.broker.publish = refuse_three  # type: ignore[method-assign]
    result = await drive(clock, engine.execute_workflow("wf", run_id="r"))
    assert result.succeeded, result.error
    assert calls == ["pay"]
    assert result.steps["pay"].attempts == 4
    failed = [d["error_type"] for name, d in await events(engine, "r") if name == "AttemptFailed"]
    assert failed == [SEND_FAILED] * 3
    assert breakers.get("payments").state is BreakerState.CLOSED
    assert breakers.get("payments").metrics().failed == 0
