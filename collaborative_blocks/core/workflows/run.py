"""A workflow run as an event-sourced state machine: every change of a run is an event.

:class:`WorkflowRun` is a :class:`~collaborative_blocks.core.machines.StateMachineAggregate`
whose run-level lifecycle is a ``transitions`` machine::

    PENDING -> RUNNING -> COMPLETED
                       -> FAILED                 (a step failed, nothing had completed)
                       -> COMPENSATING -> COMPENSATED
                                       -> COMPENSATION_FAILED

Each step has its own status, kept in the aggregate and changed only by recorded events,
with its own legal moves (checked when the command is issued; an illegal one raises
:class:`~collaborative_blocks.errors.IllegalTransitionError` and records nothing)::

    PENDING -> SCHEDULED -> RUNNING -> COMPLETED -> COMPENSATING -> COMPENSATED
       |           |          |  ^                      |      -> COMPENSATION_FAILED
       |           |          v  |                      '-> COMPENSATED (nothing to compensate)
       |           |       RETRY_WAIT
       |           v          |
       '------> SKIPPED <-----'   (a false condition, an optional step under load, or a
                                   retry cancelled because the run is compensating)
    RUNNING -> FAILED (retries exhausted)   PENDING | SCHEDULED | RETRY_WAIT -> FAILED

The engine (:mod:`collaborative_blocks.core.workflows.engine`) is the only writer; the
queries here (:meth:`WorkflowRun.ready_steps`, :meth:`WorkflowRun.next_to_compensate`,
:meth:`WorkflowRun.in_flight`) are the pure decisions it takes from a run's state, so
they are unit-tested without any I/O.

Identity: an aggregate of this package's base class has a UUID id, so a run's id is
``uuid5(RUN_NAMESPACE, run_id)`` (see :func:`run_aggregate_id`) and its stream is that UUID's
text; the human run id is the first event's ``run_id`` field.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from collaborative_blocks.core.aggregates import event
from collaborative_blocks.core.machines import StateMachineAggregate, transition
from collaborative_blocks.errors import IllegalTransitionError

__all__ = [
    "COMPLETED",
    "OUTCOME_UNKNOWN",
    "RUN_NAMESPACE",
    "UNCERTAIN_ERRORS",
    "CompensationState",
    "RunStatus",
    "StepState",
    "StepStatus",
    "WorkflowRun",
    "run_aggregate_id",
]

#: The UUID namespace of run aggregate ids (``uuid5(RUN_NAMESPACE, run_id)``).
RUN_NAMESPACE = uuid.UUID("0b6c7f3e-6d1f-5c1e-9a59-5f0c2f1d7a11")


#: Error types of attempts whose effect on the target is unknown: no reply in time (the
#: command may still run), in flight when the engine's process stopped, or refused by the
#: transport (it may have taken the command before failing). A step with such an
#: attempt that did not complete is compensated when its run compensates (saga atomicity);
#: any other error is the target's definite answer (it did not apply the command).
UNCERTAIN_ERRORS = frozenset({"Timeout", "Interrupted", "TransportUnavailableError"})
#: Why a step is compensated (the ``reason`` of its CompensationStarted events).
COMPLETED = "completed"
OUTCOME_UNKNOWN = "outcome unknown"


def run_aggregate_id(run_id: str) -> uuid.UUID:
    """The aggregate id (and, as text, the event store stream) of run ``run_id``."""
    return uuid.uuid5(RUN_NAMESPACE, f"workflow-run:{run_id}")


class RunStatus(enum.StrEnum):
    """Where a run is in its lifecycle."""

    PENDING = "pending"
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    #: A step failed and there was nothing to compensate: no step completed, and none has an
    #: attempt of unknown outcome with a compensation action.
    FAILED = "failed"
    #: A step failed, and every completed step (and every step whose outcome was unknown and
    #: that names a compensation action) was compensated.
    COMPENSATED = "compensated"
    #: A step failed, and at least one compensation failed after its retries.
    COMPENSATION_FAILED = "compensation_failed"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset(
    {
        RunStatus.COMPLETED,
        RunStatus.FAILED,
        RunStatus.COMPENSATED,
        RunStatus.COMPENSATION_FAILED,
    }
)


class StepStatus(enum.StrEnum):
    """Where one step of a run is."""

    PENDING = "pending"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    RETRY_WAIT = "retry_wait"
    COMPLETED = "completed"
    SKIPPED = "skipped"
    FAILED = "failed"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"

    @property
    def resolved(self) -> bool:
        """Whether dependents may start: the step completed (or was compensated later) or
        was skipped."""
        return self in _RESOLVED


_RESOLVED = frozenset(
    {
        StepStatus.COMPLETED,
        StepStatus.SKIPPED,
        StepStatus.COMPENSATING,
        StepStatus.COMPENSATED,
        StepStatus.COMPENSATION_FAILED,
    }
)

# Legal step moves: trigger -> the step statuses it may be issued in.
_STEP_SOURCES: dict[str, frozenset[StepStatus]] = {
    "schedule_step": frozenset({StepStatus.PENDING}),
    "skip_step": frozenset({StepStatus.PENDING, StepStatus.SCHEDULED, StepStatus.RETRY_WAIT}),
    "start_attempt": frozenset({StepStatus.SCHEDULED, StepStatus.RETRY_WAIT}),
    "fail_attempt": frozenset({StepStatus.RUNNING}),
    "complete_step": frozenset({StepStatus.RUNNING}),
    "fail_step": frozenset({StepStatus.PENDING, StepStatus.SCHEDULED, StepStatus.RETRY_WAIT}),
    # FAILED and SKIPPED: a step whose outcome is unknown (see UNCERTAIN_ERRORS) keeps its
    # status while it is compensated; its compensation's status says how that went.
    "start_compensation": frozenset(
        {StepStatus.COMPLETED, StepStatus.COMPENSATING, StepStatus.FAILED, StepStatus.SKIPPED}
    ),
    "fail_compensation": frozenset(
        {StepStatus.COMPENSATING, StepStatus.FAILED, StepStatus.SKIPPED}
    ),
    "complete_compensation": frozenset(
        {StepStatus.COMPENSATING, StepStatus.FAILED, StepStatus.SKIPPED}
    ),
    "skip_compensation": frozenset({StepStatus.COMPLETED}),
}


@dataclass
class CompensationState:
    """How a step's compensation went: a completed step's, or (``reason`` OUTCOME_UNKNOWN)
    that of a step that did not complete but may have had an effect."""

    status: StepStatus = StepStatus.COMPENSATING
    #: The compensation action sent to the step's target (None: nothing to compensate).
    action: str | None = None
    reason: str = COMPLETED
    attempts: int = 0
    #: Whether an attempt was started and has no recorded outcome yet.
    running: bool = False
    retry_at: float | None = None
    error_type: str | None = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None


@dataclass
class StepState:
    """One step's state in a run (rebuilt from the run's events)."""

    step_id: str
    status: StepStatus = StepStatus.PENDING
    attempts: int = 0
    target: str | None = None
    message_id: str | None = None
    output: Any = None
    error_type: str | None = None
    error: str | None = None
    retry_at: float | None = None
    started_at: float | None = None
    attempt_started_at: float | None = None
    finished_at: float | None = None
    duration: float | None = None
    last_attempt_duration: float | None = None
    skipped_reason: str | None = None
    compensation: CompensationState | None = None
    attempt_errors: list[tuple[int, str, str]] = field(default_factory=list)


def _uncertain(step: StepState) -> bool:
    """Whether one of the step's attempts ended with an unknown outcome."""
    return any(error_type in UNCERTAIN_ERRORS for _, error_type, _ in step.attempt_errors)


def _source_names(statuses: frozenset[StepStatus]) -> list[str]:
    return sorted(s.value for s in statuses)


class WorkflowRun(StateMachineAggregate[RunStatus]):
    """One run of a workflow definition (see the module docs for its lifecycle).

    Created PENDING with the run id, the definition it runs (workflow id, version,
    fingerprint, step ids in topological order), its input and trace id; every method below
    records one event. ``at`` is the engine clock's ``now()`` when the change happened.
    """

    initial = RunStatus.PENDING

    @event("Created")
    def __init__(
        self,
        run_id: str,
        workflow_id: str,
        version: int,
        fingerprint: str,
        step_ids: list[str],
        input_data: dict[str, Any],
        trace_id: str | None,
        engine_id: str,
        at: float,
    ) -> None:
        self.run_id = run_id
        self.workflow_id = workflow_id
        self.definition_version = version
        self.fingerprint = fingerprint
        self.step_ids = list(step_ids)
        self.input_data = dict(input_data)
        self.trace_id = trace_id
        self.engine_id = engine_id
        self.created_at = at
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.failed_step: str | None = None
        self.error: str | None = None
        self.output: dict[str, Any] = {}
        self.steps: dict[str, StepState] = {s: StepState(s) for s in step_ids}
        self.completion_order: list[str] = []
        # Steps that failed for good, in the order they did (the first is the run's cause).
        self.failure_order: list[str] = []
        self.compensation_order: list[str] = []
        self.applied_rules: list[dict[str, Any]] = []
        self.resumptions = 0

    @staticmethod
    def create_id(run_id: str) -> uuid.UUID:
        return run_aggregate_id(run_id)

    # -- run-level transitions ---------------------------------------------------------------

    @transition(source=RunStatus.PENDING, dest=RunStatus.RUNNING, event="Started")
    def start(self, at: float) -> None:
        self.started_at = at

    @transition(
        source=RunStatus.RUNNING,
        dest=RunStatus.COMPLETED,
        conditions="every_step_resolved",
        event="Completed",
    )
    def complete(self, output: dict[str, Any], at: float) -> None:
        self.output = dict(output)
        self.finished_at = at

    @transition(source=RunStatus.RUNNING, dest=RunStatus.FAILED, event="Failed")
    def fail(self, failed_step: str, error: str, at: float) -> None:
        self.failed_step = failed_step
        self.error = error
        self.finished_at = at

    @transition(source=RunStatus.RUNNING, dest=RunStatus.COMPENSATING, event="CompensationBegan")
    def begin_compensation(self, failed_step: str, error: str, at: float) -> None:
        self.failed_step = failed_step
        self.error = error

    @transition(source=RunStatus.COMPENSATING, dest=RunStatus.COMPENSATED, event="Compensated")
    def finish_compensated(self, at: float) -> None:
        self.finished_at = at

    @transition(
        source=RunStatus.COMPENSATING,
        dest=RunStatus.COMPENSATION_FAILED,
        event="CompensationIncomplete",
    )
    def finish_compensation_failed(self, at: float) -> None:
        self.finished_at = at

    @transition(source=[RunStatus.RUNNING, RunStatus.COMPENSATING], event="Resumed")
    def resume(self, engine_id: str, interrupted: list[str], at: float) -> None:
        self.resumptions += 1

    # -- step events -------------------------------------------------------------------------

    @transition(source=RunStatus.RUNNING, event="StepScheduled")
    def schedule_step(self, step_id: str, at: float) -> None:
        step = self._step("schedule_step", step_id)
        step.status = StepStatus.SCHEDULED

    @transition(source=[RunStatus.RUNNING, RunStatus.COMPENSATING], event="StepSkipped")
    def skip_step(self, step_id: str, reason: str, at: float) -> None:
        step = self._step("skip_step", step_id)
        step.status = StepStatus.SKIPPED
        step.skipped_reason = reason
        step.retry_at = None
        step.finished_at = at

    @transition(source=RunStatus.RUNNING, event="AttemptStarted")
    def start_attempt(
        self, step_id: str, attempt: int, target: str, message_id: str, at: float
    ) -> None:
        step = self._step("start_attempt", step_id)
        if attempt != step.attempts + 1:
            raise IllegalTransitionError(
                f"WorkflowRun step {step_id!r}",
                "start_attempt",
                f"{step.status.value} after {step.attempts} attempts (attempt {attempt} given)",
                [f"start_attempt(attempt={step.attempts + 1})"],
            )
        step.status = StepStatus.RUNNING
        step.attempts = attempt
        step.target = target
        step.message_id = message_id
        step.retry_at = None
        step.attempt_started_at = at
        if step.started_at is None:
            step.started_at = at

    @transition(source=[RunStatus.RUNNING, RunStatus.COMPENSATING], event="AttemptFailed")
    def fail_attempt(
        self,
        step_id: str,
        attempt: int,
        error_type: str,
        error: str,
        duration: float | None,
        retry_at: float | None,
        at: float,
    ) -> None:
        step = self._step("fail_attempt", step_id)
        step.error_type = error_type
        step.error = error
        step.last_attempt_duration = duration
        step.attempt_errors.append((attempt, error_type, error))
        if retry_at is None:
            step.status = StepStatus.FAILED
            step.finished_at = at
            self.failure_order.append(step_id)
        else:
            step.status = StepStatus.RETRY_WAIT
            step.retry_at = retry_at

    @transition(source=[RunStatus.RUNNING, RunStatus.COMPENSATING], event="StepCompleted")
    def complete_step(
        self, step_id: str, attempt: int, output: Any, duration: float, at: float
    ) -> None:
        step = self._step("complete_step", step_id)
        step.status = StepStatus.COMPLETED
        step.output = output
        step.duration = duration
        step.last_attempt_duration = duration
        step.finished_at = at
        step.error_type = step.error = None
        self.completion_order.append(step_id)

    @transition(source=[RunStatus.RUNNING, RunStatus.COMPENSATING], event="StepFailed")
    def fail_step(self, step_id: str, error_type: str, error: str, at: float) -> None:
        step = self._step("fail_step", step_id)
        step.status = StepStatus.FAILED
        step.error_type = error_type
        step.error = error
        step.retry_at = None
        step.finished_at = at
        self.failure_order.append(step_id)

    @transition(source="*", event="RuleApplied")
    def apply_rule(self, rule_id: str, step_id: str, detail: dict[str, Any], at: float) -> None:
        self.applied_rules.append(
            {"rule_id": rule_id, "step_id": step_id, "detail": dict(detail), "at": at}
        )

    @transition(source="*", event="BreakerTransitioned")
    def note_breaker(
        self, step_id: str, breaker: str, came_from: str, went_to: str, reason: str, at: float
    ) -> None:
        """A circuit breaker changed state around one of this run's attempts (history only)."""

    # -- compensation events -----------------------------------------------------------------

    @transition(source=RunStatus.COMPENSATING, event="CompensationStarted")
    def start_compensation(
        self,
        step_id: str,
        attempt: int,
        action: str,
        message_id: str,
        at: float,
        reason: str = COMPLETED,
    ) -> None:
        """``reason``: COMPLETED for a completed step, OUTCOME_UNKNOWN for a step that did not
        complete but has an attempt of unknown outcome (:meth:`uncertain_steps`)."""
        step = self._step("start_compensation", step_id)
        expected = (
            OUTCOME_UNKNOWN
            if step.status in (StepStatus.FAILED, StepStatus.SKIPPED)
            or (step.compensation is not None and step.compensation.reason == OUTCOME_UNKNOWN)
            else COMPLETED
        )
        if reason != expected or (expected == OUTCOME_UNKNOWN and not _uncertain(step)):
            raise IllegalTransitionError(
                f"WorkflowRun step {step_id!r}",
                "start_compensation",
                f"{step.status.value} (reason {reason!r} given)",
                [f"start_compensation(reason={expected!r})"]
                if expected == COMPLETED or _uncertain(step)
                else ["nothing: every attempt of this step failed with a definite error"],
            )
        compensation = step.compensation
        if compensation is None:
            compensation = step.compensation = CompensationState(
                action=action, reason=reason, started_at=at
            )
            self.compensation_order.append(step_id)
        if compensation.running or attempt != compensation.attempts + 1:
            raise IllegalTransitionError(
                f"WorkflowRun step {step_id!r}",
                "start_compensation",
                f"compensating after {compensation.attempts} attempts "
                f"({'one running' if compensation.running else 'none running'}; "
                f"attempt {attempt} given)",
                [f"start_compensation(attempt={compensation.attempts + 1})"],
            )
        if reason == COMPLETED:
            step.status = StepStatus.COMPENSATING
        compensation.attempts = attempt
        compensation.running = True
        compensation.retry_at = None

    @transition(source=RunStatus.COMPENSATING, event="CompensationFailed")
    def fail_compensation(
        self,
        step_id: str,
        attempt: int,
        error_type: str,
        error: str,
        retry_at: float | None,
        at: float,
    ) -> None:
        step = self._step("fail_compensation", step_id)
        compensation = self._compensation(step, "fail_compensation")
        compensation.running = False
        compensation.error_type = error_type
        compensation.error = error
        if retry_at is None:
            compensation.status = StepStatus.COMPENSATION_FAILED
            if compensation.reason == COMPLETED:
                step.status = StepStatus.COMPENSATION_FAILED
            compensation.finished_at = at
        else:
            compensation.retry_at = retry_at

    @transition(source=RunStatus.COMPENSATING, event="CompensationCompleted")
    def complete_compensation(self, step_id: str, attempt: int, at: float) -> None:
        step = self._step("complete_compensation", step_id)
        compensation = self._compensation(step, "complete_compensation")
        compensation.running = False
        compensation.retry_at = None
        compensation.status = StepStatus.COMPENSATED
        if compensation.reason == COMPLETED:
            step.status = StepStatus.COMPENSATED
        compensation.finished_at = at

    @transition(source=RunStatus.COMPENSATING, event="NothingToCompensate")
    def skip_compensation(self, step_id: str, at: float) -> None:
        step = self._step("skip_compensation", step_id)
        step.status = StepStatus.COMPENSATED
        step.compensation = CompensationState(
            status=StepStatus.COMPENSATED, action=None, started_at=at, finished_at=at
        )
        self.compensation_order.append(step_id)

    # -- checks ------------------------------------------------------------------------------

    def _step(self, trigger: str, step_id: str) -> StepState:
        step = self.steps.get(step_id)
        if step is None:
            raise IllegalTransitionError(
                f"WorkflowRun {self.run_id!r}",
                trigger,
                f"no step {step_id!r}",
                sorted(self.steps),
            )
        allowed = _STEP_SOURCES[trigger]
        if step.status not in allowed:
            raise IllegalTransitionError(
                f"WorkflowRun step {step_id!r}",
                trigger,
                step.status.value,
                [f"{trigger} from {', '.join(_source_names(allowed))}"],
            )
        return step

    def _compensation(self, step: StepState, trigger: str) -> CompensationState:
        compensation = step.compensation
        if compensation is None or not compensation.running:
            raise IllegalTransitionError(
                f"WorkflowRun step {step.step_id!r}",
                trigger,
                "no compensation attempt running",
                ["start_compensation first"],
            )
        return compensation

    # -- the decisions the engine takes from a run's state -------------------------------------

    @property
    def finished(self) -> bool:
        return self.state.finished

    def ready_steps(self, dependencies: Mapping[str, Sequence[str]]) -> list[str]:
        """PENDING steps whose dependencies are all resolved (completed or skipped), in the
        run's step order (a topological order)."""
        steps = self.steps
        return [
            step_id
            for step_id in self.step_ids
            if steps[step_id].status is StepStatus.PENDING
            and all(steps[dep].status.resolved for dep in dependencies.get(step_id, ()))
        ]

    def every_step_resolved(self) -> bool:
        """Whether every step completed or was skipped (a run may complete only then)."""
        return all(
            self.steps[step_id].status in (StepStatus.COMPLETED, StepStatus.SKIPPED)
            for step_id in self.step_ids
        )

    def in_flight(self) -> list[str]:
        """Steps scheduled, running or waiting for a retry (not yet at an outcome)."""
        return [
            step_id
            for step_id in self.step_ids
            if self.steps[step_id].status
            in (StepStatus.SCHEDULED, StepStatus.RUNNING, StepStatus.RETRY_WAIT)
        ]

    def running_attempts(self) -> list[str]:
        """Steps with an attempt started and no outcome recorded (interrupted, after a crash)."""
        return [s for s in self.step_ids if self.steps[s].status is StepStatus.RUNNING]

    def failed_steps(self) -> list[str]:
        """Steps that failed for good, in the order they failed (the first is the cause)."""
        return list(self.failure_order)

    def uncertain_steps(self, compensable: Container[str] | None = None) -> list[str]:
        """Steps that did not complete but may have had an effect on their target: failed
        or skipped with an attempt of unknown outcome (:data:`UNCERTAIN_ERRORS`), in reverse
        step order (dependents before their dependencies). ``compensable``: only those
        (the steps naming a compensation action; None: every step)."""
        return [
            step_id
            for step_id in reversed(self.step_ids)
            if (compensable is None or step_id in compensable)
            and self.steps[step_id].status in (StepStatus.FAILED, StepStatus.SKIPPED)
            and _uncertain(self.steps[step_id])
        ]

    def next_to_compensate(self, compensable: Container[str] | None = None) -> str | None:
        """The step to compensate now, or None when every compensation has ended.

        First the steps whose outcome is unknown (:meth:`uncertain_steps` among
        ``compensable``: they were the last in flight), in reverse step order; then the
        completed steps, most recently completed first (reverse order of completion)."""
        for step_id in self.uncertain_steps(compensable):
            compensation = self.steps[step_id].compensation
            if compensation is None or compensation.status is StepStatus.COMPENSATING:
                return step_id
        for step_id in reversed(self.completion_order):
            status = self.steps[step_id].status
            if status in (StepStatus.COMPLETED, StepStatus.COMPENSATING):
                return step_id
        return None

    def compensation_outcome(self) -> RunStatus:
        """COMPENSATED, or COMPENSATION_FAILED if any compensation failed for good."""
        if any(
            (compensation := self.steps[s].compensation) is not None
            and compensation.status is StepStatus.COMPENSATION_FAILED
            for s in self.compensation_order
        ):
            return RunStatus.COMPENSATION_FAILED
        return RunStatus.COMPENSATED

    def needs_compensation(self, compensable: Container[str] | None = None) -> bool:
        """Whether a failed run has something to compensate: a completed step, or a step
        whose outcome is unknown among ``compensable``."""
        return bool(self.completion_order) or bool(self.uncertain_steps(compensable))

    def outputs(self) -> dict[str, Any]:
        """Every completed step's output, by step id."""
        return {
            s: self.steps[s].output
            for s in self.step_ids
            if self.steps[s].status is StepStatus.COMPLETED
        }
