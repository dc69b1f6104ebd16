"""The durable workflow engine: runs workflow definitions as event-sourced sagas.

```python
engine = WorkflowCoordinationEngine(store=store)
await engine.define_workflow(workflow)              # validates, records the definition
result = await engine.execute_workflow("orders", {"order_id": 7})
print(result.status, result.steps["reserve"].output)
```

The engine is a conductor: the state of a run lives in its
:class:`~collaborative_blocks.core.workflows.run.WorkflowRun` aggregate, every decision is
taken from that state by small pure functions (which steps are ready, which compensation
comes next, which adaptation rule applies, when to retry) and every change is an event saved
before the engine acts on it: one commit per scheduling round carries the outcomes of the
steps that ended since the last one and the decisions taken from them, before any dependent
is sent; a retry's due time is committed before its wait starts. So a process that dies at
any point leaves a log from which :meth:`WorkflowCoordinationEngine.resume` continues:

- completed steps are not run again; an attempt that was in flight when the process died
  counts as failed with error type ``Interrupted`` and is retried by the step's policy
  (steps are **at-least-once**, like Temporal activities: a target should deduplicate on the
  ``idempotency-key`` header, ``<run_id>:<step_id>``, which stays the same across attempts).
  An attempt's start is committed with its outcome (or when the engine closes), not before
  the command goes out: if the process died first, the log shows the step scheduled (or
  waiting for its retry) and the attempt is sent again under the same number and message id;
- a retry wait continues until its recorded due time (the due time is saved before the
  engine starts waiting);
- an interrupted compensation is retried, then the remaining ones run.

Sagas: when a step fails for good, the run compensates the completed steps (reverse order of
completion) and, first, the steps of unknown outcome that name a compensation action: not
completed, with an attempt that timed out or was interrupted (they may have had an effect;
targets treat a compensation of something never applied as a no-op, by its idempotency key).

A save that fails with ``StoreUnavailableError`` (a transient outage) is retried with backoff
on the engine's clock for about a minute (:data:`STORE_RETRY_ATTEMPTS`) while the run goes
on; only a store still failing after that ends the run's driver (the run stays resumable).

Steps call their targets through the broker with
:meth:`~collaborative_blocks.core.messaging.connector.SystemConnector.request`: the step's
``action`` is a command to ``system_target`` whose handler's return value is the step's
output. Each attempt's message id is ``<run_id>:<step_id>:<attempt>``. Calls go through the
target's circuit breaker (an open breaker fails the attempt fast with error type
``CircuitOpenError``; it is retried after the breaker's wait).

Streams: a run is the aggregate ``run_aggregate_id(run_id)``; definitions are recorded on
``workflow-definition:<workflow_id>`` (one event per version, with its fingerprint); the
engine's runs are indexed on ``workflow-runs:<engine_id>`` (registered before a run's first
event, finished after its last), which is how :meth:`resume` finds unfinished runs without
scanning the whole log, and keeps engines that share one store apart.

See docs/workflows.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import statistics
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from eventsourcing.persistence import StoredEvent as MapperStoredEvent
from opentelemetry import metrics, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from collaborative_blocks.core.aggregates import Repository, event_clock, stream_for
from collaborative_blocks.core.clock import Clock
from collaborative_blocks.core.messaging.broker import MessageBroker
from collaborative_blocks.core.messaging.connector import IDEMPOTENCY_KEY, SystemConnector
from collaborative_blocks.core.messaging.envelope import JSONValue
from collaborative_blocks.core.randomness import random_id
from collaborative_blocks.core.runtime import Runtime
from collaborative_blocks.core.settings import Settings
from collaborative_blocks.core.workflows.breakers import (
    BreakerRegistry,
    BreakerTransition,
)
from collaborative_blocks.core.workflows.conditions import WorkflowScope, render_parameters
from collaborative_blocks.core.workflows.definitions import (
    AdaptationRule,
    CompiledStep,
    CompiledWorkflow,
    RetryPolicy,
    RuleAction,
    RuleTrigger,
    WorkflowDefinition,
)
from collaborative_blocks.core.workflows.run import (
    COMPLETED,
    OUTCOME_UNKNOWN,
    RunStatus,
    StepState,
    StepStatus,
    WorkflowRun,
    run_aggregate_id,
)
from collaborative_blocks.errors import (
    AggregateNotFoundError,
    CircuitOpenError,
    ConcurrencyError,
    ConditionError,
    PublishTimeoutError,
    QueryTimeoutError,
    RemoteHandlerError,
    StoreUnavailableError,
    TransportUnavailableError,
    UnknownRunError,
    UnknownWorkflowError,
    WorkflowError,
)
from collaborative_blocks.stores.base import EventStore, NewEvent

__all__ = [
    "DEFINITION_TOPIC",
    "INTERRUPTED",
    "RUN_FINISHED_TOPIC",
    "RUN_REGISTERED_TOPIC",
    "SEND_FAILED",
    "STORE_RETRY_ATTEMPTS",
    "AppliedRule",
    "CompensationResult",
    "RunEvent",
    "StepResult",
    "WorkflowCoordinationEngine",
    "WorkflowResult",
    "breaker_route",
    "retry_due",
    "slow_step_rules",
    "under_load_rule",
]

_log = logging.getLogger(__name__)
_INSTRUMENTATION = "collaborative_blocks.workflows"
DEFINITION_TOPIC = "collaborative_blocks.workflows:DefinitionRecorded"
RUN_REGISTERED_TOPIC = "collaborative_blocks.workflows:RunRegistered"
RUN_FINISHED_TOPIC = "collaborative_blocks.workflows:RunFinished"
#: The error type of an attempt (or compensation) that was in flight when its process died.
INTERRUPTED = "Interrupted"
#: Error types the engine itself gives attempts (not the target's errors).
#: The command could not be handed to the transport (it was down): this process's trouble,
#: not the target's, so it never counts against the target's breaker.
SEND_FAILED = "TransportUnavailableError"
_ENGINE_ERRORS = frozenset({INTERRUPTED, "CircuitOpenError", SEND_FAILED})
_propagator = TraceContextTextMapPropagator()
# How many durations per (workflow, step) feed STEP_SLOWER_THAN's median of previous runs.
_DURATIONS_KEPT = 5
#: A store write that fails with StoreUnavailableError (a transient outage) is tried this many
#: times in all, waiting STORE_RETRY_BASE * 2**(n-1) seconds (at most STORE_RETRY_CAP, with
#: jitter between half and all of it) of the engine's clock after the n-th failure: about a
#: minute of waits in all. Only then does the run's driver stop (the run stays resumable).
STORE_RETRY_ATTEMPTS = 13
STORE_RETRY_BASE = 0.1
STORE_RETRY_CAP = 10.0
_T = TypeVar("_T")


def definition_stream(workflow_id: str) -> str:
    return f"workflow-definition:{workflow_id}"


def index_stream(engine_id: str) -> str:
    return f"workflow-runs:{engine_id}"


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompensationResult:
    """How a step was undone: ``status`` COMPENSATED or COMPENSATION_FAILED (or
    COMPENSATING if the run has not finished it). ``action`` None means the step names no
    compensation: there was nothing to compensate. ``reason``: ``"completed"`` (the step
    completed) or ``"outcome unknown"`` (it did not complete, but an attempt timed out or was
    interrupted, so it may have had an effect: the step keeps its FAILED or SKIPPED status)."""

    status: StepStatus
    action: str | None
    attempts: int
    error: str | None
    reason: str = COMPLETED

    def to_dict(self) -> dict[str, JSONValue]:
        return {
            "status": self.status.value,
            "action": self.action,
            "attempts": self.attempts,
            "error": self.error,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class StepResult:
    """One step of a run: its status, output, attempts and timings (engine clock seconds).

    ``target`` is where its last attempt went (after routing rules); ``duration`` is the
    successful attempt's; ``error`` the last failure (``"Type: message"``).
    """

    step_id: str
    status: StepStatus
    output: JSONValue
    attempts: int
    target: str | None
    started_at: float | None
    finished_at: float | None
    duration: float | None
    error: str | None
    skipped_reason: str | None
    compensation: CompensationResult | None

    def to_dict(self) -> dict[str, JSONValue]:
        return {
            "step_id": self.step_id,
            "status": self.status.value,
            "output": self.output,
            "attempts": self.attempts,
            "target": self.target,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration": self.duration,
            "error": self.error,
            "skipped_reason": self.skipped_reason,
            "compensation": None if self.compensation is None else self.compensation.to_dict(),
        }


@dataclass(frozen=True)
class AppliedRule:
    """An adaptation rule the engine applied in a run (also an event of its history)."""

    rule_id: str
    step_id: str
    detail: Mapping[str, JSONValue]
    at: float

    def to_dict(self) -> dict[str, JSONValue]:
        return {
            "rule_id": self.rule_id,
            "step_id": self.step_id,
            "detail": dict(self.detail),
            "at": self.at,
        }


@dataclass(frozen=True)
class WorkflowResult:
    """What a run did: its status, each step's result, what was skipped and compensated.

    ``compensated`` lists the steps undone, in the order they were compensated: steps whose
    outcome was unknown first, then completed steps in the reverse of their completion.
    ``output`` maps every completed step to its output. ``trace_id``
    is the run's OpenTelemetry trace (None when tracing is off).
    """

    run_id: str
    workflow_id: str
    status: RunStatus
    steps: Mapping[str, StepResult]
    skipped: tuple[str, ...]
    compensated: tuple[str, ...]
    applied_rules: tuple[AppliedRule, ...]
    trace_id: str | None
    started_at: float
    finished_at: float | None
    error: str | None
    output: Mapping[str, JSONValue]
    definition_version: int = 1
    failed_step: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status is RunStatus.COMPLETED

    @property
    def finished(self) -> bool:
        return self.status.finished

    def to_dict(self) -> dict[str, JSONValue]:
        return {
            "run_id": self.run_id,
            "workflow_id": self.workflow_id,
            "definition_version": self.definition_version,
            "status": self.status.value,
            "succeeded": self.succeeded,
            "failed_step": self.failed_step,
            "error": self.error,
            "trace_id": self.trace_id,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "skipped": list(self.skipped),
            "compensated": list(self.compensated),
            "applied_rules": [rule.to_dict() for rule in self.applied_rules],
            "output": dict(self.output),
            "steps": {step_id: step.to_dict() for step_id, step in self.steps.items()},
        }

    @classmethod
    def of(cls, run: WorkflowRun) -> WorkflowResult:
        """The result as the run's aggregate has it now."""
        steps = {step_id: _step_result(run.steps[step_id]) for step_id in run.step_ids}
        return cls(
            run_id=run.run_id,
            workflow_id=run.workflow_id,
            status=run.state,
            steps=steps,
            skipped=tuple(s for s in run.step_ids if run.steps[s].status is StepStatus.SKIPPED),
            compensated=tuple(
                s
                for s in run.compensation_order
                if (compensation := run.steps[s].compensation) is not None
                and compensation.status is StepStatus.COMPENSATED
            ),
            applied_rules=tuple(
                AppliedRule(r["rule_id"], r["step_id"], r["detail"], r["at"])
                for r in run.applied_rules
            ),
            trace_id=run.trace_id,
            started_at=run.started_at if run.started_at is not None else run.created_at,
            finished_at=run.finished_at,
            error=run.error,
            output=run.output if run.state is RunStatus.COMPLETED else run.outputs(),
            definition_version=run.definition_version,
            failed_step=run.failed_step,
        )


def _step_result(step: StepState) -> StepResult:
    compensation = step.compensation
    return StepResult(
        step_id=step.step_id,
        status=step.status,
        output=step.output,
        attempts=step.attempts,
        target=step.target,
        started_at=step.started_at,
        finished_at=step.finished_at,
        duration=step.duration,
        error=None if step.error_type is None else f"{step.error_type}: {step.error}",
        skipped_reason=step.skipped_reason,
        compensation=None
        if compensation is None
        else CompensationResult(
            status=compensation.status,
            action=compensation.action,
            attempts=compensation.attempts,
            error=None
            if compensation.error_type is None
            else f"{compensation.error_type}: {compensation.error}",
            reason=compensation.reason,
        ),
    )


@dataclass(frozen=True)
class RunEvent:
    """One event of a run's history: its global log ``position``, its ``topic``, when it
    happened (``at``, engine clock) and its fields (``data``). ``name`` is the short event
    name (``StepCompleted``...)."""

    position: int
    version: int
    topic: str
    at: float
    data: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.topic.rsplit(".", 1)[-1].rsplit(":", 1)[-1]

    def to_dict(self) -> dict[str, JSONValue]:
        return {
            "position": self.position,
            "version": self.version,
            "name": self.name,
            "at": self.at,
            "data": dict(self.data),
        }


# --------------------------------------------------------------------------------------------
# Pure decisions
# --------------------------------------------------------------------------------------------


def retry_due(
    policy: RetryPolicy,
    error_type: str,
    attempt: int,
    now: float,
    rng: random.Random,
    *,
    retry_after: float | None = None,
) -> float | None:
    """When attempt ``attempt + 1`` is due after attempt ``attempt`` failed with
    ``error_type``, or None when the failure is final (not retryable, or retries spent).

    ``retry_after`` (an open breaker's wait) replaces the policy's backoff.
    """
    if attempt > policy.max_retries:
        return None
    if error_type in _ENGINE_ERRORS:
        # Not the target's error: retry_on (which names the target's errors) does not
        # exclude it; only non_retryable can.
        if error_type in policy.non_retryable:
            return None
    elif not policy.retries(error_type):
        return None
    if retry_after is not None:
        return now + max(retry_after, 0.0)
    return now + policy.delay_for(attempt, rng)


def breaker_route(
    rules: Iterable[AdaptationRule],
    step: CompiledStep,
    retry_after: Callable[[str], float],
) -> tuple[str, AdaptationRule | None]:
    """Where the step goes: its target, or the first BREAKER_OPEN + ROUTE_TO rule's
    ``route_to`` (else the step's ``fallback_target``) while that rule's breaker refuses
    calls.

    ``retry_after(target)``: seconds until ``target``'s breaker permits a call (its
    :meth:`~collaborative_blocks.core.workflows.breakers.CircuitBreaker.retry_after`). Once
    the open wait has passed this is 0 and the step goes to its target again: that call is
    the breaker's trial call (an open breaker only moves to HALF_OPEN when a call reaches
    it, so routing on ``state is OPEN`` would keep the target cut off for good)."""
    target = step.step.system_target
    for rule in rules:
        if rule.when is not RuleTrigger.BREAKER_OPEN or rule.then is not RuleAction.ROUTE_TO:
            continue
        if rule.step_id is not None and rule.step_id != step.step.step_id:
            continue
        watched = rule.target or target
        if rule.step_id is None and watched != target:
            continue
        destination = rule.route_to or step.step.fallback_target
        if destination and destination != target and retry_after(watched) > 0:
            return destination, rule
    return target, None


def slow_step_rules(
    rules: Iterable[AdaptationRule],
    step_id: str,
    previous: float | None,
    history: Sequence[float],
) -> list[tuple[AdaptationRule, float]]:
    """The STEP_SLOWER_THAN + SET_PARAMETERS rules that apply to ``step_id``'s next attempt,
    with the duration that triggered each: its previous attempt in this run, else the
    median of its last runs."""
    observed = previous
    if observed is None and history:
        observed = statistics.median(history)
    if observed is None:
        return []
    found = []
    for rule in rules:
        if (
            rule.when is RuleTrigger.STEP_SLOWER_THAN
            and rule.then is RuleAction.SET_PARAMETERS
            and rule.step_id in (None, step_id)
            and rule.threshold is not None
            and observed > rule.threshold
        ):
            found.append((rule, observed))
    return found


def under_load_rule(
    rules: Iterable[AdaptationRule], step: CompiledStep, in_flight: int
) -> AdaptationRule | None:
    """The UNDER_LOAD + SKIP_OPTIONAL rule that skips this (optional) step now, if any."""
    if not step.step.optional:
        return None
    for rule in rules:
        if (
            rule.when is RuleTrigger.UNDER_LOAD
            and rule.then is RuleAction.SKIP_OPTIONAL
            and rule.step_id in (None, step.step.step_id)
            and rule.threshold is not None
            and in_flight >= rule.threshold
        ):
            return rule
    return None


def _merge(base: JSONValue, extra: Mapping[str, JSONValue]) -> JSONValue:
    if not isinstance(base, Mapping):
        return dict(extra)
    merged = dict(base)
    merged.update(extra)
    return merged


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """A run this engine is driving: its aggregate, definition and tasks."""

    run: WorkflowRun
    compiled: CompiledWorkflow
    scope: WorkflowScope
    dependencies: dict[str, tuple[str, ...]]
    done: asyncio.Future[WorkflowResult]
    # Steps naming a compensation action (those compensated when their outcome is unknown).
    compensable: frozenset[str] = frozenset()
    saving: asyncio.Future[list[int]] | None = None
    steps: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    # Set when one of the run's step tasks ends: the conductor waits on it.
    wake: asyncio.Future[None] | None = None
    task: asyncio.Task[None] | None = None
    parent: Any = None  # the OpenTelemetry context the run's spans belong to
    traced: bool = True  # whether its attempts get spans


class WorkflowCoordinationEngine:
    """Defines workflows and runs them durably (see the module docs).

    Everything can be injected, as for the other engines: ``runtime`` (settings, clock,
    random source, plugins, store), ``store`` (default: the runtime's, ``EVENT_STORE_URL``),
    ``broker`` (default: an in-process broker on the engine's clock; targets register their
    handlers on ``engine.broker`` with a
    :class:`~collaborative_blocks.core.messaging.connector.SystemConnector`), ``breakers``
    (default: a :class:`BreakerRegistry` from the settings, recording transitions in the
    store), ``clock``/``rng``/``settings``. ``engine_id`` names the engine's run index (and
    its connector): engines sharing a store with different ids resume only their own runs.
    ``step_timeout``: seconds to wait for a step's reply when the step sets no ``timeout``.
    ``max_concurrent_steps``: attempts in flight across all runs (each run is also bounded
    by its definition's ``max_concurrency``). The engine closes what it created.
    """

    def __init__(
        self,
        runtime: Runtime | None = None,
        *,
        store: EventStore | None = None,
        broker: MessageBroker | None = None,
        breakers: BreakerRegistry | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        settings: Settings | None = None,
        engine_id: str = "workflows",
        step_timeout: float = 30.0,
        max_concurrent_steps: int = 64,
        meter_provider: metrics.MeterProvider | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        if not isinstance(engine_id, str) or not engine_id or any(c in engine_id for c in " *?["):
            raise WorkflowError(
                f"engine_id must be a non-empty name without spaces or glob characters, "
                f"got {engine_id!r}"
            )
        if step_timeout <= 0 or max_concurrent_steps < 1:
            raise WorkflowError(
                f"step_timeout must be > 0 and max_concurrent_steps >= 1, got {step_timeout} "
                f"and {max_concurrent_steps}"
            )
        self._own_runtime = runtime is None
        self.runtime = (
            runtime if runtime is not None else Runtime(settings, clock=clock, rng=rng, store=store)
        )
        self.settings: Settings = settings if settings is not None else self.runtime.settings
        self.clock: Clock = clock if clock is not None else self.runtime.clock
        self.rng: random.Random = rng if rng is not None else self.runtime.rng
        self._store = store
        self._own_broker = broker is None
        self.broker = (
            broker
            if broker is not None
            else MessageBroker(
                runtime=self.runtime,
                clock=self.clock,
                rng=self.rng,
                settings=self.settings,
                tracer_provider=tracer_provider,
                meter_provider=meter_provider,
            )
        )
        self.breakers = (
            breakers
            if breakers is not None
            else BreakerRegistry(
                clock=self.clock, settings=self.settings, meter_provider=meter_provider
            )
        )
        self.engine_id = engine_id
        self.step_timeout = step_timeout
        self.max_concurrent_steps = max_concurrent_steps
        self.connector = SystemConnector(
            f"workflow-engine.{engine_id}", self.broker, query_timeout=step_timeout
        )
        self._repository: Repository | None = None
        self._slots = asyncio.Semaphore(max_concurrent_steps)
        self._definitions: dict[str, CompiledWorkflow] = {}
        self._versions: dict[tuple[str, int], CompiledWorkflow] = {}
        self._current_version: dict[str, int] = {}
        self._runs: dict[str, _Run] = {}
        self._durations: dict[tuple[str, str], deque[float]] = {}
        self._active_steps = 0
        # Breaker transitions as they happen (numbered), so an attempt can record in its run
        # the ones that happened while it ran.
        self._breaker_log: deque[tuple[int, BreakerTransition]] = deque(maxlen=1024)
        self._breaker_seq = 0
        self._unsubscribe = self.breakers.subscribe(self._on_breaker_transition)
        self._closed = False
        self._tracer = trace.get_tracer(_INSTRUMENTATION, tracer_provider=tracer_provider)
        self._explicit_tracer = tracer_provider is not None
        meter = metrics.get_meter(_INSTRUMENTATION, meter_provider=meter_provider)
        self._run_counter = meter.create_counter(
            "cb.workflow.runs",
            unit="{run}",
            description="finished workflow runs by workflow and outcome (the success rate)",
        )
        self._attempt_counter = meter.create_counter(
            "cb.workflow.step.attempts",
            unit="{attempt}",
            description="step attempts by workflow, step and outcome",
        )
        self._compensation_counter = meter.create_counter(
            "cb.workflow.compensations",
            unit="{compensation}",
            description="compensation attempts by workflow, step and outcome",
        )
        self._rule_counter = meter.create_counter(
            "cb.workflow.rules.applied",
            unit="{rule}",
            description="adaptation rules applied, by workflow and rule",
        )
        self._step_duration = meter.create_histogram(
            "cb.workflow.step.duration",
            unit="s",
            description="duration of successful step attempts (engine clock)",
        )

    # -- wiring ------------------------------------------------------------------------------

    async def store(self) -> EventStore:
        """The engine's event store (the runtime's, opened on first use, unless given)."""
        if self._store is None:
            self._store = await self.runtime.store()
        return self._store

    def _check_open(self) -> None:
        if self._closed:
            raise WorkflowError("this engine was closed; create a new WorkflowCoordinationEngine")

    async def _repo(self) -> Repository:
        if self._repository is None:
            store = await self.store()
            if self.breakers.store is None:
                self.breakers.store = store
            self._repository = Repository(store, clock=self.clock)
        return self._repository

    @property
    def in_flight(self) -> int:
        """Steps of this engine's runs scheduled, running or waiting for a retry."""
        return self._active_steps

    # -- definitions -------------------------------------------------------------------------

    async def define_workflow(self, definition: WorkflowDefinition) -> CompiledWorkflow:
        """Validate ``definition`` and record it, so runs of it can start (and be resumed by
        a restarted process).

        Raises :class:`~collaborative_blocks.errors.WorkflowDefinitionError` naming the step
        and the problem (unknown dependency, cycle, duplicate id, malformed condition, unknown
        variable...); nothing is recorded then. Defining the same workflow again is a no-op;
        defining it with different content records a new version: new runs use it, runs
        already started keep the version they started with.
        """
        if not isinstance(definition, WorkflowDefinition):
            raise WorkflowError(
                f"define_workflow takes a WorkflowDefinition, got {type(definition).__name__}; "
                "build one, or load one with load_definition(path)"
            )
        self._check_open()
        compiled = definition.compile(default_max_retries=self.settings.max_retry_attempts)
        store = await self.store()
        await self._repo()
        version = await self._record_definition(store, compiled)
        self._definitions[compiled.workflow_id] = compiled
        self._versions[(compiled.workflow_id, version)] = compiled
        self._current_version[compiled.workflow_id] = version
        return compiled

    async def _record_definition(self, store: EventStore, compiled: CompiledWorkflow) -> int:
        stream = definition_stream(compiled.workflow_id)
        for _ in range(5):
            recorded = await store.read(stream, backwards=True, limit=1)
            if recorded:
                last = json.loads(recorded[0].state)
                if last["fingerprint"] == compiled.fingerprint:
                    return int(last["version"])
            version = recorded[0].version + 1 if recorded else 1
            body = {
                "workflow_id": compiled.workflow_id,
                "version": version,
                "fingerprint": compiled.fingerprint,
                "definition": compiled.definition.to_dict(),
            }
            try:
                await store.append(
                    stream,
                    [NewEvent(DEFINITION_TOPIC, json.dumps(body, sort_keys=True).encode())],
                    expected_version=version - 1,
                )
            except ConcurrencyError:
                continue  # another process recorded a version meanwhile: look again
            return version
        raise WorkflowError(
            f"could not record workflow {compiled.workflow_id!r}: its definition stream kept "
            "changing under concurrent define_workflow calls; try again"
        )

    async def _compiled(
        self, workflow_id: str, version: int | None = None
    ) -> tuple[CompiledWorkflow, int]:
        """The compiled definition (its latest version, or ``version``), from memory or the
        definition stream."""
        if version is None and workflow_id in self._definitions:
            return self._definitions[workflow_id], self._current_version[workflow_id]
        if version is not None and (workflow_id, version) in self._versions:
            return self._versions[(workflow_id, version)], version
        store = await self.store()
        stream = definition_stream(workflow_id)
        if version is None:
            recorded = await store.read(stream, backwards=True, limit=1)
        else:
            recorded = await store.read(stream, from_version=version, to_version=version)
        if not recorded:
            known = ", ".join(sorted(self._definitions)) or "none in this engine"
            raise UnknownWorkflowError(
                f"no workflow {workflow_id!r}"
                f"{'' if version is None else f' at version {version}'} was defined (defined: "
                f"{known}); call define_workflow first"
            )
        body = json.loads(recorded[0].state)
        compiled = WorkflowDefinition.from_dict(body["definition"]).compile(
            default_max_retries=self.settings.max_retry_attempts
        )
        found = int(body["version"])
        self._versions[(workflow_id, found)] = compiled
        if version is None:
            self._definitions[workflow_id] = compiled
            self._current_version[workflow_id] = found
        return compiled, found

    # -- starting and waiting ------------------------------------------------------------------

    async def execute_workflow(
        self,
        workflow_id: str,
        input_data: Mapping[str, JSONValue] | None = None,
        *,
        run_id: str | None = None,
    ) -> WorkflowResult:
        """Run workflow ``workflow_id`` on ``input_data`` to the end and return its result.

        A failed run is a result too (status FAILED, COMPENSATED or COMPENSATION_FAILED),
        not an exception. Raises :class:`~collaborative_blocks.errors.UnknownWorkflowError`
        for a workflow never defined.
        """
        started = await self.start_workflow(workflow_id, input_data, run_id=run_id)
        return await self.wait_for(started)

    async def start_workflow(
        self,
        workflow_id: str,
        input_data: Mapping[str, JSONValue] | None = None,
        *,
        run_id: str | None = None,
    ) -> str:
        """Start a run in the background and return its id (see :meth:`wait_for`)."""
        if input_data is not None and not isinstance(input_data, Mapping):
            raise WorkflowError(
                f"input_data must be a mapping of input names to JSON values, got "
                f"{type(input_data).__name__}"
            )
        self._check_open()
        repo = await self._repo()
        compiled, version = await self._compiled(workflow_id)
        run_id = run_id if run_id is not None else random_id(self.clock.now(), self.rng)
        if not isinstance(run_id, str) or not run_id:
            raise WorkflowError(f"run_id must be a non-empty string, got {run_id!r}")
        if run_id in self._runs or await repo.contains(run_aggregate_id(run_id)):
            raise WorkflowError(
                f"a run with id {run_id!r} already exists; give another run_id, or use "
                "get_result/resume for that run"
            )
        data = dict(input_data or {})
        try:
            json.dumps(data, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise WorkflowError(
                f"input_data of {workflow_id!r} is not JSON data ({error}); nothing was started"
            ) from None
        span = self._tracer.start_span(
            f"workflow {workflow_id}",
            attributes={"cb.workflow.id": workflow_id, "cb.workflow.run_id": run_id},
        )
        context = span.get_span_context()
        trace_id = format(context.trace_id, "032x") if context.is_valid else None
        with event_clock(self.clock):
            now = self.clock.now()
            run = WorkflowRun(
                run_id=run_id,
                workflow_id=workflow_id,
                version=version,
                fingerprint=compiled.fingerprint,
                step_ids=list(compiled.order),
                input_data=data,
                trace_id=trace_id,
                engine_id=self.engine_id,
                at=now,
            )
            run.start(at=now)
        store = await self.store()
        # The index entry goes first: an entry without a run is ignored on resume, a run
        # without an entry would never be resumed.
        await store.append(
            index_stream(self.engine_id),
            [NewEvent(RUN_REGISTERED_TOPIC, _json({"run_id": run_id, "workflow_id": workflow_id}))],
        )
        try:
            await repo.save(run)
        except BaseException:
            span.end()
            raise
        self._launch(run, compiled, trace.set_span_in_context(span), span)
        return run_id

    async def wait_for(
        self,
        run_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 -- runs on the injected clock
    ) -> WorkflowResult:
        """Wait until run ``run_id`` finishes (at most ``timeout`` seconds of the engine's
        clock, then :class:`TimeoutError`) and return its result. A run that finished
        earlier (in this or another process) returns at once; an unfinished run that no
        engine in this process drives raises :class:`WorkflowError` (call :meth:`resume`)."""
        active = self._runs.get(run_id)
        if active is None:
            result = await self.get_result(run_id)
            if not result.finished:
                raise WorkflowError(
                    f"run {run_id!r} is {result.status.value} but not running in this engine; "
                    "call resume() to continue it"
                )
            return result
        future = active.done
        if timeout is None:
            return await asyncio.shield(future)
        sleeper = asyncio.ensure_future(self.clock.sleep(timeout))
        try:
            await asyncio.wait((future, sleeper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
        if not future.done():
            raise TimeoutError(f"run {run_id!r} did not finish within {timeout}s")
        return future.result()

    async def get_result(self, run_id: str) -> WorkflowResult:
        """The run's result as recorded now (finished or not)."""
        active = self._runs.get(run_id)
        if active is not None:
            return WorkflowResult.of(active.run)
        return WorkflowResult.of(await self._load(run_id))

    async def history(self, run_id: str) -> list[RunEvent]:
        """Every event of run ``run_id``, in order (for ``cblocks workflow show``)."""
        repo = await self._repo()
        stream = str(run_aggregate_id(run_id))
        events = await repo.store.read(stream)
        if not events:
            raise UnknownRunError(f"no workflow run {run_id!r} in the event store; check the id")
        history = []
        for stored in events:
            domain = repo.mapper.to_domain_event(
                MapperStoredEvent(
                    originator_id=stored.stream,
                    originator_version=stored.version,
                    topic=stored.topic,
                    state=stored.state,
                )
            )
            fields = {
                k: v
                for k, v in vars(domain).items()
                if k not in ("originator_id", "originator_version", "originator_topic")
            }
            stamp = fields.pop("timestamp", None)
            at = fields.get("at")
            if not isinstance(at, int | float):
                at = stamp.timestamp() if stamp is not None else 0.0
            history.append(RunEvent(stored.position, stored.version, stored.topic, at, fields))
        return history

    async def _load(self, run_id: str) -> WorkflowRun:
        repo = await self._repo()
        try:
            return await repo.get(run_aggregate_id(run_id), WorkflowRun)
        except AggregateNotFoundError:
            raise UnknownRunError(
                f"no workflow run {run_id!r} in the event store; check the id"
            ) from None

    # -- resuming ----------------------------------------------------------------------------

    async def resume(self) -> list[str]:
        """Continue every unfinished run of this engine (``engine_id``) found in the log.

        Completed steps are not run again; attempts and compensations that were in flight
        when the previous process stopped count as failed (error type ``Interrupted``) and
        are retried by their policy; retry waits continue until their recorded due time.
        Returns the ids of the runs resumed (wait for them with :meth:`wait_for`).
        """
        self._check_open()
        store = await self.store()
        await self._repo()
        with contextlib.suppress(Exception):
            await self.breakers.restore()
        registered: dict[str, None] = {}
        for stored in await store.read(index_stream(self.engine_id)):
            entry = json.loads(stored.state)
            if stored.topic == RUN_REGISTERED_TOPIC:
                registered[entry["run_id"]] = None
            elif stored.topic == RUN_FINISHED_TOPIC:
                registered.pop(entry["run_id"], None)
        resumed = []
        for run_id in registered:
            if run_id in self._runs:
                continue
            try:
                run = await self._load(run_id)
            except UnknownRunError:
                continue  # registered, but its first save never happened: it never started
            if run.finished:
                await self._index_finished(run)
                continue
            try:
                compiled, _ = await self._compiled(run.workflow_id, run.definition_version)
            except WorkflowError as error:
                # One run whose definition cannot be read back must not stop the others.
                _log.error("cannot resume workflow run %s: %s", run_id, error)
                continue
            with event_clock(self.clock):
                self._recover(run, compiled)
            await (await self._repo()).save(run)
            parent, span = self._resumed_span(run)
            self._launch(run, compiled, parent, span)
            resumed.append(run_id)
        return resumed

    def _recover(self, run: WorkflowRun, compiled: CompiledWorkflow) -> None:
        """Mark what was in flight when the previous process stopped as interrupted."""
        now = self.clock.now()
        interrupted = []
        for step_id in run.running_attempts():
            step = run.steps[step_id]
            due = retry_due(
                compiled.steps[step_id].retry, INTERRUPTED, step.attempts, now, self.rng
            )
            if run.state is RunStatus.COMPENSATING:
                due = None  # a compensating run starts nothing new
            run.fail_attempt(
                step_id=step_id,
                attempt=step.attempts,
                error_type=INTERRUPTED,
                error="the attempt was in flight when its process stopped; the target may "
                "or may not have run it",
                duration=None,
                retry_at=due,
                at=now,
            )
            interrupted.append(step_id)
        for step_id in run.step_ids:
            compensation = run.steps[step_id].compensation
            if compensation is not None and compensation.running:
                policy = compiled.steps[step_id].retry
                due = retry_due(policy, INTERRUPTED, compensation.attempts, now, self.rng)
                run.fail_compensation(
                    step_id=step_id,
                    attempt=compensation.attempts,
                    error_type=INTERRUPTED,
                    error="the compensation was in flight when its process stopped",
                    retry_at=due if due is not None else now,
                    at=now,
                )
                interrupted.append(step_id)
        run.resume(engine_id=self.engine_id, interrupted=interrupted, at=now)

    def _resumed_span(self, run: WorkflowRun) -> tuple[Any, trace.Span]:
        parent = None
        if run.trace_id:
            # Join the run's original trace, so one trace shows the run across processes.
            remote = SpanContext(
                trace_id=int(run.trace_id, 16),
                span_id=self.rng.getrandbits(64) | 1,
                is_remote=True,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
            )
            parent = trace.set_span_in_context(NonRecordingSpan(remote))
        span = self._tracer.start_span(
            f"workflow {run.workflow_id} (resumed)",
            context=parent,
            attributes={"cb.workflow.id": run.workflow_id, "cb.workflow.run_id": run.run_id},
        )
        return trace.set_span_in_context(span), span

    # -- driving a run -----------------------------------------------------------------------

    def _launch(
        self, run: WorkflowRun, compiled: CompiledWorkflow, parent: Any, span: trace.Span
    ) -> None:
        scope = WorkflowScope(run.input_data)
        for step_id in run.step_ids:
            step = run.steps[step_id]
            if step.status is not StepStatus.PENDING:
                scope.set_step(step_id, step.status.value, step.output)
        active = _Run(
            run=run,
            compiled=compiled,
            scope=scope,
            dependencies={s: tuple(compiled.steps[s].step.dependencies) for s in compiled.order},
            done=asyncio.get_running_loop().create_future(),
            compensable=frozenset(
                s for s in compiled.order if compiled.steps[s].step.compensation is not None
            ),
            parent=parent,
            traced=self._tracing(),
        )
        self._runs[run.run_id] = active
        active.task = asyncio.create_task(
            self._drive(active, span), name=f"cb-workflow {run.workflow_id} {run.run_id}"
        )

    async def _drive(self, active: _Run, span: trace.Span) -> None:
        run = active.run
        try:
            with event_clock(self.clock), trace.use_span(span, end_on_exit=True):
                await self._conduct(active)
                span.set_attribute("cb.workflow.status", run.state.value)
                if run.state is not RunStatus.COMPLETED:
                    span.set_status(Status(StatusCode.ERROR, run.error or run.state.value))
            self._run_counter.add(1, {"workflow": run.workflow_id, "outcome": run.state.value})
            await self._index_finished(run)
            self._remember_durations(active)
            if not active.done.done():
                active.done.set_result(WorkflowResult.of(run))
        except asyncio.CancelledError:
            if not active.done.done():
                active.done.set_exception(
                    WorkflowError(
                        f"run {run.run_id!r} was stopped before it finished (engine closed); "
                        "resume() continues it"
                    )
                )
                active.done.exception()  # nobody may be waiting: not an unhandled error
            raise
        except Exception as error:
            if not active.done.done():
                active.done.set_exception(error)
                active.done.exception()  # wait_for raises it; a run nobody waits for logs it
                _log.error("workflow run %s failed: %r", run.run_id, error)
        finally:
            for task in active.steps.values():
                task.cancel()
            if self._runs.get(run.run_id) is active:
                del self._runs[run.run_id]

    async def _conduct(self, active: _Run) -> None:
        run = active.run
        while True:
            state = run.state
            if state is RunStatus.RUNNING:
                if not await self._advance(active):
                    return
            elif state is RunStatus.COMPENSATING:
                step_id = run.next_to_compensate(active.compensable)
                if step_id is None:
                    now = self.clock.now()
                    if run.compensation_outcome() is RunStatus.COMPENSATED:
                        run.finish_compensated(at=now)
                    else:
                        run.finish_compensation_failed(at=now)
                    await self._save(active)
                    return
                await self._compensate(active, step_id)
            else:
                return

    async def _advance(self, active: _Run) -> bool:
        """One round of a RUNNING run: start what is ready, or decide the run's end.
        Returns False when the run left RUNNING for good and nothing is left to do here."""
        run = active.run
        compiled = active.compiled
        failed = run.failed_steps()
        if failed:
            await self._stop_scheduling(active, failed[0])
            if any(not task.done() for task in active.steps.values()):
                await self._wait_for_steps(active)
                return True
            now = self.clock.now()
            step = run.steps[failed[0]]
            error = f"step {failed[0]!r} failed: {step.error_type}: {step.error}"
            if run.needs_compensation(active.compensable):
                run.begin_compensation(failed_step=failed[0], error=error, at=now)
            else:
                run.fail(failed_step=failed[0], error=error, at=now)
            await self._save(active)
            return run.state is RunStatus.COMPENSATING
        # Steps recorded in flight without a task here (a resumed run) get one.
        to_start = [
            step_id
            for step_id in run.in_flight()
            if step_id not in active.steps or active.steps[step_id].done()
        ]
        self._active_steps += len(to_start)
        limit = compiled.definition.max_concurrency
        running = sum(1 for t in active.steps.values() if not t.done()) + len(to_start)
        for step_id in run.ready_steps(active.dependencies):
            if running >= limit:
                break
            if self._schedule(active, step_id):
                running += 1
                to_start.append(step_id)
        # One commit per round: the outcomes of the steps that ended since the last round
        # (recorded by their tasks, unsaved), and the skips and schedules decided here. A
        # step's outcome is durable before any of its dependents is sent.
        try:
            await self._save_round(active)
        except BaseException:
            self._active_steps -= len(to_start)
            raise
        if len(to_start) == 1 and all(task.done() for task in active.steps.values()):
            # The run's only step in flight: the conductor would only wait for its task, so
            # it runs the step itself (no task, no wake-up), then takes the next round.
            await self._run_step(active, to_start[0])
            return True
        for step_id in to_start:
            self._start_step(active, step_id)
        if run.failed_steps():
            return True
        if not any(not task.done() for task in active.steps.values()):
            # A step task that ended with an error has not resolved its step: raise it
            # (the driver stops; resume() continues the run) rather than read the silence
            # as the end of the run.
            self._reap(active)
            if run.ready_steps(active.dependencies):
                return True  # skips made more steps ready
            if run.in_flight():
                return True  # a step whose task stopped early: the next round restarts it
            run.complete(output=run.outputs(), at=self.clock.now())
            await self._save(active)
            return False
        await self._wait_for_steps(active)
        return True

    def _schedule(self, active: _Run, step_id: str) -> bool:
        """Decide a ready step: skipped (false condition, or optional under load), failed
        (its condition cannot be evaluated), or scheduled and started (True)."""
        run = active.run
        compiled_step = active.compiled.steps[step_id]
        now = self.clock.now()
        condition = compiled_step.condition
        if condition is not None:
            try:
                holds = condition.evaluate(active.scope)
            except ConditionError as error:
                run.fail_step(
                    step_id=step_id, error_type="ConditionError", error=str(error), at=now
                )
                active.scope.set_step(step_id, StepStatus.FAILED.value, None)
                return False
            if not holds:
                run.skip_step(
                    step_id=step_id,
                    reason=f"condition {condition.source!r} is false",
                    at=now,
                )
                active.scope.set_step(step_id, StepStatus.SKIPPED.value, None)
                return False
        rule = under_load_rule(active.compiled.rules, compiled_step, self._active_steps)
        if rule is not None:
            detail = {"in_flight": self._active_steps, "threshold": rule.threshold}
            self._record_rule(active, rule, step_id, detail)
            run.skip_step(
                step_id=step_id,
                reason=f"optional step skipped under load: {self._active_steps} steps in "
                f"flight >= {rule.threshold} (rule {rule.rule_id!r})",
                at=now,
            )
            active.scope.set_step(step_id, StepStatus.SKIPPED.value, None)
            return False
        run.schedule_step(step_id=step_id, at=now)
        self._active_steps += 1  # counted now: the next step's under-load rule sees it
        return True

    def _start_step(self, active: _Run, step_id: str) -> None:
        """Start the task of a step already counted in ``_active_steps``."""
        task = asyncio.create_task(
            self._run_step(active, step_id), name=f"cb-workflow-step {active.run.run_id}:{step_id}"
        )
        active.steps[step_id] = task
        task.add_done_callback(lambda _: _wake(active))

    async def _wait_for_steps(self, active: _Run) -> None:
        if active.steps and all(not task.done() for task in active.steps.values()):
            wake = active.wake = asyncio.get_running_loop().create_future()
            try:
                await wake
            finally:
                active.wake = None
        self._reap(active)

    @staticmethod
    def _reap(active: _Run) -> None:
        """Forget the step tasks that ended; raise the error of one that failed."""
        for step_id, task in list(active.steps.items()):
            if task.done():
                del active.steps[step_id]
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]

    async def _stop_scheduling(self, active: _Run, failed_step: str) -> None:
        """A step failed for good: steps not yet running (scheduled, or waiting for a
        retry) are skipped; running attempts finish and are recorded."""
        run = active.run
        now = self.clock.now()
        for step_id in run.in_flight():
            status = run.steps[step_id].status
            if status in (StepStatus.SCHEDULED, StepStatus.RETRY_WAIT):
                task = active.steps.pop(step_id, None)
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                if run.steps[step_id].status in (StepStatus.SCHEDULED, StepStatus.RETRY_WAIT):
                    run.skip_step(
                        step_id=step_id,
                        reason=f"cancelled: step {failed_step!r} failed, the run is compensating",
                        at=now,
                    )
        await self._save(active)

    # -- one step ----------------------------------------------------------------------------

    async def _run_step(self, active: _Run, step_id: str) -> None:
        run = active.run
        compiled_step = active.compiled.steps[step_id]
        try:
            while True:
                state = run.steps[step_id]
                if state.status is StepStatus.RETRY_WAIT and state.retry_at is not None:
                    await self._sleep_until(state.retry_at)
                if run.failure_order:
                    # A step failed for good: nothing new is sent (the conductor skips this
                    # step). An attempt's start is saved with the next commit, not before its
                    # command goes out, so this also keeps a durable failure from ever
                    # preceding an attempt sent but not yet in the log: after a crash, every
                    # attempt that may have run is in the log (Interrupted), compensated or
                    # reconciled, never skipped as if it had not been sent.
                    return
                if not await self._attempt(active, compiled_step):
                    return
        finally:
            self._active_steps -= 1

    async def _attempt(self, active: _Run, compiled_step: CompiledStep) -> bool:
        """One attempt of a step; True if the step will be retried."""
        run = active.run
        step_id = compiled_step.step.step_id
        state = run.steps[step_id]
        attempt = state.attempts + 1
        rules = active.compiled.rules
        target, route_rule = (
            breaker_route(rules, compiled_step, self._breaker_wait)
            if rules
            else (compiled_step.step.system_target, None)
        )
        if route_rule is not None:
            self._record_rule(
                active,
                route_rule,
                step_id,
                {"from": compiled_step.step.system_target, "to": target, "attempt": attempt},
            )
        template: JSONValue = dict(compiled_step.step.parameters or {})
        history = self._durations.get((run.workflow_id, step_id), ()) if rules else ()
        for rule, observed in (
            slow_step_rules(rules, step_id, state.last_attempt_duration, tuple(history))
            if rules
            else ()
        ):
            template = _merge(template, rule.parameters or {})
            self._record_rule(
                active,
                rule,
                step_id,
                {
                    "observed": observed,
                    "threshold": rule.threshold,
                    "parameters": dict(rule.parameters or {}),
                    "attempt": attempt,
                },
            )
        try:
            payload = render_parameters(template, active.scope)
        except ConditionError as error:
            run.fail_step(
                step_id=step_id, error_type="ConditionError", error=str(error), at=self.clock.now()
            )
            active.scope.set_step(step_id, StepStatus.FAILED.value, None)
            await self._save(active)
            return False
        message_id = f"{run.run_id}:{step_id}:{attempt}"
        breaker = self.breakers.get(target)
        timeout = compiled_step.step.timeout or self.step_timeout
        attributes = {"workflow": run.workflow_id, "step": step_id}
        async with self._slots:
            now = self.clock.now()
            since = self._breaker_seq
            with self._span(
                f"workflow step {step_id}",
                active,
                lambda: {
                    "cb.workflow.id": run.workflow_id,
                    "cb.workflow.run_id": run.run_id,
                    "cb.workflow.step": step_id,
                    "cb.workflow.attempt": attempt,
                    "cb.workflow.target": target,
                },
            ) as span:
                try:
                    breaker.acquire()
                except CircuitOpenError as open_error:
                    run.start_attempt(
                        step_id=step_id,
                        attempt=attempt,
                        target=target,
                        message_id=message_id,
                        at=now,
                    )
                    span.set_status(Status(StatusCode.ERROR, "CircuitOpenError"))
                    self._note_breakers(active, step_id, target, since)
                    return await self._attempt_failed(
                        active,
                        compiled_step,
                        attempt,
                        "CircuitOpenError",
                        str(open_error),
                        None,
                        open_error.retry_after,
                    )
                try:
                    # Recorded, not saved before the command goes out: it is saved with the
                    # attempt's outcome (steps are at-least-once; see _record_attempts).
                    run.start_attempt(
                        step_id=step_id,
                        attempt=attempt,
                        target=target,
                        message_id=message_id,
                        at=now,
                    )
                except BaseException:
                    breaker.release()
                    raise
                headers = {IDEMPOTENCY_KEY: f"{run.run_id}:{step_id}"}
                if span.is_recording():
                    _propagator.inject(headers)
                began = self.clock.monotonic()
                error_type: str | None = None
                detail = ""
                output: JSONValue = None
                try:
                    output = await self.connector.request(
                        target,
                        compiled_step.step.action,
                        payload,
                        timeout=timeout,
                        message_id=message_id,
                        headers=headers,
                        key=message_id,  # per attempt: a retry never queues behind a stuck attempt
                    )
                except asyncio.CancelledError:
                    breaker.release()
                    raise
                except RemoteHandlerError as error:
                    error_type, detail = error.remote_type, error.detail
                except QueryTimeoutError as error:
                    error_type, detail = "Timeout", str(error)
                except (TransportUnavailableError, PublishTimeoutError) as error:
                    error_type, detail = SEND_FAILED, str(error)
                except Exception as error:
                    error_type, detail = type(error).__name__, str(error)
                duration = self.clock.monotonic() - began
                if error_type is None:
                    breaker.on_success(duration)
                    span.set_attribute("cb.workflow.outcome", "completed")
                else:
                    if error_type == SEND_FAILED:
                        breaker.release()  # no call reached the target: not its failure
                    else:
                        breaker.on_error(duration, error_type)
                    span.set_status(Status(StatusCode.ERROR, f"{error_type}: {detail}"))
                self._note_breakers(active, step_id, target, since)
        if error_type is not None:
            return await self._attempt_failed(
                active, compiled_step, attempt, error_type, detail, duration, None
            )
        run.complete_step(
            step_id=step_id,
            attempt=attempt,
            output=output,
            duration=duration,
            at=self.clock.now(),
        )
        active.scope.set_step(step_id, StepStatus.COMPLETED.value, output)
        self._attempt_counter.add(1, {**attributes, "outcome": "completed"})
        self._step_duration.record(duration, attributes)
        # Saved by the conductor's next round, with the other outcomes and the dependents'
        # schedules: one commit, before any dependent is sent.
        await self._flush_breakers()
        return False

    async def _attempt_failed(
        self,
        active: _Run,
        compiled_step: CompiledStep,
        attempt: int,
        error_type: str,
        detail: str,
        duration: float | None,
        retry_after: float | None,
    ) -> bool:
        run = active.run
        step_id = compiled_step.step.step_id
        now = self.clock.now()
        due: float | None = None
        if not run.failed_steps():  # once a step failed for good, nothing retries
            due = retry_due(
                compiled_step.retry, error_type, attempt, now, self.rng, retry_after=retry_after
            )
        run.fail_attempt(
            step_id=step_id,
            attempt=attempt,
            error_type=error_type,
            error=detail,
            duration=duration,
            retry_at=due,
            at=now,
        )
        if due is None:
            active.scope.set_step(step_id, StepStatus.FAILED.value, None)
        self._attempt_counter.add(
            1,
            {
                "workflow": run.workflow_id,
                "step": step_id,
                "outcome": "failed" if due is None else "retry",
            },
        )
        if due is not None:
            # The due time is in the log before the wait starts: a crash resumes the wait.
            # (A final failure is saved by the conductor's next round.)
            await self._save(active)
        await self._flush_breakers()
        return due is not None

    # -- compensation ------------------------------------------------------------------------

    async def _compensate(self, active: _Run, step_id: str) -> None:
        """Undo one step (completed, or of unknown outcome): send its compensation action to
        the target its last attempt went to, retrying by the step's policy; record the
        outcome either way."""
        run = active.run
        compiled_step = active.compiled.steps[step_id]
        step = run.steps[step_id]
        action = compiled_step.step.compensation
        reason = (
            COMPLETED
            if step.status in (StepStatus.COMPLETED, StepStatus.COMPENSATING)
            else OUTCOME_UNKNOWN
        )
        attributes = {"workflow": run.workflow_id, "step": step_id}
        if action is None:
            run.skip_compensation(step_id=step_id, at=self.clock.now())
            await self._save(active)
            return
        target = step.target or compiled_step.step.system_target
        policy = compiled_step.retry
        timeout = compiled_step.step.timeout or self.step_timeout
        while True:
            compensation = run.steps[step_id].compensation
            if compensation is not None and compensation.retry_at is not None:
                await self._sleep_until(compensation.retry_at)
            attempt = (compensation.attempts if compensation is not None else 0) + 1
            now = self.clock.now()
            message_id = f"{run.run_id}:{step_id}:compensate:{attempt}"
            run.start_compensation(
                step_id=step_id,
                attempt=attempt,
                action=action,
                message_id=message_id,
                at=now,
                reason=reason,
            )
            await self._save(active)
            error_type: str | None = None
            detail = ""
            with self._span(
                f"workflow compensate {step_id}",
                active,
                lambda attempt=attempt: {  # type: ignore[misc]
                    "cb.workflow.run_id": run.run_id,
                    "cb.workflow.step": step_id,
                    "cb.workflow.attempt": attempt,
                    "cb.workflow.target": target,
                },
            ) as span:
                try:
                    payload = render_parameters(
                        dict(compiled_step.step.compensation_parameters or {}), active.scope
                    )
                    headers = {IDEMPOTENCY_KEY: f"{run.run_id}:{step_id}:compensate"}
                    if span.is_recording():
                        _propagator.inject(headers)
                    await self.connector.request(
                        target,
                        action,
                        payload,
                        timeout=timeout,
                        message_id=message_id,
                        headers=headers,
                        key=message_id,
                    )
                except ConditionError as error:
                    error_type, detail = "ConditionError", str(error)
                except RemoteHandlerError as error:
                    error_type, detail = error.remote_type, error.detail
                except QueryTimeoutError as error:
                    error_type, detail = "Timeout", str(error)
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    error_type, detail = type(error).__name__, str(error)
                if error_type is not None:
                    span.set_status(Status(StatusCode.ERROR, f"{error_type}: {detail}"))
            now = self.clock.now()
            if error_type is None:
                run.complete_compensation(step_id=step_id, attempt=attempt, at=now)
                active.scope.set_step(step_id, run.steps[step_id].status.value, step.output)
                self._compensation_counter.add(1, {**attributes, "outcome": "compensated"})
                await self._save(active)
                return
            due = retry_due(policy, error_type, attempt, now, self.rng)
            run.fail_compensation(
                step_id=step_id,
                attempt=attempt,
                error_type=error_type,
                error=detail,
                retry_at=due,
                at=now,
            )
            self._compensation_counter.add(
                1, {**attributes, "outcome": "failed" if due is None else "retry"}
            )
            await self._save(active)
            if due is None:
                return

    # -- helpers -----------------------------------------------------------------------------

    def _tracing(self) -> bool:
        """Whether spans are wanted and something records them (else the per-attempt span
        machinery is skipped, as the broker does)."""
        if not self.settings.distributed_tracing_enabled:
            return False
        if self._explicit_tracer:
            return True
        provider = trace.get_tracer_provider()
        return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)

    def _span(
        self, name: str, active: _Run, attributes: Callable[[], dict[str, Any]]
    ) -> contextlib.AbstractContextManager[trace.Span]:
        if not active.traced:
            return contextlib.nullcontext(trace.INVALID_SPAN)
        return self._tracer.start_as_current_span(
            name, context=active.parent, attributes=attributes()
        )

    def _on_breaker_transition(self, transition: BreakerTransition) -> None:
        self._breaker_seq += 1
        self._breaker_log.append((self._breaker_seq, transition))

    def _note_breakers(self, active: _Run, step_id: str, target: str, since: int) -> None:
        """Record in the run the transitions of ``target``'s breaker numbered after
        ``since`` (those that happened during this attempt)."""
        for seq, transition in self._breaker_log:
            if seq > since and transition.breaker == target:
                active.run.note_breaker(
                    step_id=step_id,
                    breaker=transition.breaker,
                    came_from=transition.from_state.value,
                    went_to=transition.to_state.value,
                    reason=transition.reason,
                    at=transition.at,
                )

    def _breaker_wait(self, target: str) -> float:
        """Seconds until ``target``'s breaker permits a call (0: closed, or a trial is due)."""
        if target not in self.breakers:
            return 0.0
        return self.breakers.get(target).retry_after()

    def _record_rule(
        self, active: _Run, rule: AdaptationRule, step_id: str, detail: dict[str, Any]
    ) -> None:
        active.run.apply_rule(
            rule_id=rule.rule_id,
            step_id=step_id,
            detail={"when": rule.when.value, "then": rule.then.value, **detail},
            at=self.clock.now(),
        )
        self._rule_counter.add(1, {"workflow": active.run.workflow_id, "rule": rule.rule_id})

    async def _sleep_until(self, due: float) -> None:
        remaining = due - self.clock.now()
        if remaining > 0:
            await self.clock.sleep(remaining)

    async def _save(self, active: _Run) -> None:
        """Save the run's pending events.

        One save runs at a time per run, and every caller waiting meanwhile is served by the
        next one (group commit: concurrent steps of a run share commits). The save is
        shielded: a step task cancelled mid-save must not leave events half-saved (the
        commit and the aggregate's bookkeeping go together), and a closing engine's
        cancellation lets a save in flight end.
        """
        run = active.run
        while run.pending_events:
            saving = active.saving
            if saving is None or saving.done():
                saving = active.saving = asyncio.ensure_future(self._commit(run))
                # Its waiters may all be cancelled (a closing engine): the error is theirs
                # to see, not an "exception never retrieved" at exit.
                saving.add_done_callback(_retrieved)
            await asyncio.shield(saving)

    async def _save_round(self, active: _Run) -> None:
        """The conductor's save: :meth:`_save` without a task and a shield when no other
        save of the run is in flight (the common case), run in the conductor itself.

        Only the conductor calls it, and only a closing engine cancels the conductor: a
        commit it interrupts is either in the store or not, the run is resumed from the
        store, and :meth:`close` saves what is still pending (an append that would repeat a
        committed event is refused whole by its expected version, not written twice).
        """
        run = active.run
        saving = active.saving
        if not run.pending_events or (saving is not None and not saving.done()):
            await self._save(active)
            return
        # Step tasks saving meanwhile (a retry's due time) wait for this one, then save theirs.
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        active.saving = future
        try:
            positions = await self._commit(run)
        except BaseException as error:
            if isinstance(error, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(error)
                future.exception()  # the waiters see it; nobody else must be told
            raise
        future.set_result(positions)
        if run.pending_events:  # recorded while the commit was in flight
            await self._save(active)

    async def _commit(self, run: WorkflowRun) -> list[int]:
        """Save the run's pending events; a transient store failure is retried.

        A :class:`~collaborative_blocks.errors.StoreUnavailableError` (the database blinked)
        is retried with backoff on the engine's clock (see :data:`STORE_RETRY_ATTEMPTS`),
        so a run's driver survives an outage of up to about a minute; after that the error
        ends the driver and the run stays resumable from the log. A failed save leaves the
        events pending in the aggregate (the repository drops them only once stored), so the
        retry appends each of them once, with whatever the run recorded meanwhile. A store
        whose commit succeeded although the call failed (a connection lost after the commit)
        is recognised by the stream's expected version: the retry is refused whole with a
        ConcurrencyError, and :meth:`_already_committed` drops the events that are in the log.
        """
        repository = self._repository
        assert repository is not None
        try:
            return await repository.save(run)
        except StoreUnavailableError as error:
            if self._closed:
                raise  # a closing engine saves what it can once, it does not wait a minute
            failure: StoreUnavailableError = error

        async def again() -> list[int]:
            try:
                return await repository.save(run)
            except ConcurrencyError:
                if await self._already_committed(repository, run):
                    return await repository.save(run) if run.pending_events else []
                raise

        return await self._store_retries(again, f"saving workflow run {run.run_id!r}", failure)

    async def _store_retries(
        self,
        operation: Callable[[], Awaitable[_T]],
        what: str,
        failure: StoreUnavailableError,
    ) -> _T:
        """Run ``operation`` again after it failed with ``failure``, with backoff, until it
        succeeds or :data:`STORE_RETRY_ATTEMPTS` attempts in all failed (then the last error
        is raised)."""
        _log.warning("%s failed, retrying: %s", what, failure)
        await self.clock.sleep(self._store_backoff(1))
        retrying = AsyncRetrying(
            sleep=self.clock.sleep,
            stop=stop_after_attempt(STORE_RETRY_ATTEMPTS - 1),
            wait=lambda state: self._store_backoff(state.attempt_number + 1),
            retry=retry_if_exception_type(StoreUnavailableError),
            before_sleep=lambda state: _log.warning(
                "%s failed again (attempt %d), retrying: %s",
                what,
                state.attempt_number + 1,
                _outcome_error(state),
            ),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await operation()
        raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover

    def _store_backoff(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed store write (jittered by the
        engine's random source: runs that failed together do not retry together)."""
        delay = min(STORE_RETRY_CAP, STORE_RETRY_BASE * 2.0 ** (failures - 1))
        return delay * (0.5 + 0.5 * self.rng.random())

    async def _already_committed(self, repository: Repository, run: WorkflowRun) -> bool:
        """After a save failed with StoreUnavailableError, its retry was refused by the
        stream's expected version: drop the pending events the failed save did commit (the
        log holds them, byte for byte) and return True; False if the stream moved for another
        reason (another writer: a real conflict)."""
        pending = run.pending_events
        if not pending:
            return False
        stream = stream_for(run.id)
        first = pending[0].originator_version
        stored = await repository.store.read(
            stream, from_version=first, to_version=pending[-1].originator_version
        )
        if not stored or len(stored) > len(pending):
            return False
        for event, record in zip(pending, stored, strict=False):
            encoded = repository._encode(stream, event)
            if record.topic != encoded.topic or record.state != encoded.state:
                return False
        del pending[: len(stored)]
        return True

    async def _flush_breakers(self) -> None:
        """Append the breakers' pending transitions. A store that refuses them now does not
        fail the step that caused them: they stay pending, and the next flush (the next
        attempt's, or close()) appends them, in order."""
        if self.breakers.pending():
            try:
                await self.breakers.flush()
            except StoreUnavailableError as error:
                _log.warning("breaker transitions not stored yet, kept for later: %s", error)

    async def _index_finished(self, run: WorkflowRun) -> None:
        store = await self.store()
        entry = NewEvent(
            RUN_FINISHED_TOPIC,
            _json(
                {"run_id": run.run_id, "workflow_id": run.workflow_id, "status": run.state.value}
            ),
        )

        async def append() -> list[int]:
            return await store.append(index_stream(self.engine_id), [entry])

        try:
            await append()
        except StoreUnavailableError as failure:
            # (A finish entry written twice is harmless: resume reads the last one.)
            await self._store_retries(append, f"indexing run {run.run_id!r} as finished", failure)

    def _remember_durations(self, active: _Run) -> None:
        run = active.run
        for step_id in run.step_ids:
            duration = run.steps[step_id].duration
            if duration is not None:
                key = (run.workflow_id, step_id)
                kept = self._durations.get(key)
                if kept is None:
                    kept = self._durations[key] = deque(maxlen=_DURATIONS_KEPT)
                kept.append(duration)

    # -- lifecycle ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop driving runs (they stay resumable from the log) and close what the engine
        created (its connector; its broker and runtime unless they were given)."""
        if self._closed:
            return
        self._closed = True
        self._unsubscribe()
        actives = list(self._runs.values())
        tasks = [active.task for active in actives if active.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for active in actives:
            # What the runs recorded and had not saved yet (attempts started, outcomes not
            # yet committed by a conductor round): a closing engine keeps it, so a resumed
            # run knows those attempts were in flight (Interrupted) rather than sending them
            # again under the same message id.
            if active.run.pending_events and self._repository is not None:
                with contextlib.suppress(Exception):
                    await self._save(active)
        with contextlib.suppress(Exception):
            await self._flush_breakers()
        await self.connector.close()
        if self._own_broker:
            await self.broker.close()
        if self._own_runtime:
            await self.runtime.close()

    async def __aenter__(self) -> WorkflowCoordinationEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _wake(active: _Run) -> None:
    wake = active.wake
    if wake is not None and not wake.done():
        wake.set_result(None)


def _outcome_error(state: RetryCallState) -> BaseException | None:
    outcome = state.outcome
    return None if outcome is None else outcome.exception()


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _json(value: Mapping[str, JSONValue]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
