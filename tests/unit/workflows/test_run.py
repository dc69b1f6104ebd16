"""The WorkflowRun aggregate: run and step lifecycles, decisions taken from its state."""

from __future__ import annotations

import pytest

from collaborative_blocks.core.aggregates import Repository
from collaborative_blocks.core.workflows.run import (
    RunStatus,
    StepStatus,
    WorkflowRun,
    run_aggregate_id,
)
from collaborative_blocks.errors import GuardRejectedError, IllegalTransitionError
from collaborative_blocks.stores.memory import MemoryEventStore

DEPENDENCIES = {"a": (), "b": (), "c": ("a", "b"), "d": ("c",)}


def new_run(run_id: str = "r1") -> WorkflowRun:
    run = WorkflowRun(
        run_id=run_id,
        workflow_id="wf",
        version=1,
        fingerprint="f" * 64,
        step_ids=["a", "b", "c", "d"],
        input_data={"x": 1},
        trace_id=None,
        engine_id="workflows",
        at=10.0,
    )
    run.start(at=10.0)
    return run


def complete(run: WorkflowRun, step_id: str, output: object = None, at: float = 11.0) -> None:
    run.schedule_step(step_id=step_id, at=at)
    attempt = run.steps[step_id].attempts + 1
    run.start_attempt(step_id=step_id, attempt=attempt, target="t", message_id="m", at=at)
    run.complete_step(step_id=step_id, attempt=attempt, output=output, duration=0.5, at=at)


def test_a_new_run_is_running_with_every_step_pending() -> None:
    run = new_run()
    assert run.state is RunStatus.RUNNING
    assert run.id == run_aggregate_id("r1")
    assert {s.status for s in run.steps.values()} == {StepStatus.PENDING}
    assert run.ready_steps(DEPENDENCIES) == ["a", "b"]


def test_a_step_is_ready_once_every_dependency_completed_or_was_skipped() -> None:
    run = new_run()
    complete(run, "a")
    assert run.ready_steps(DEPENDENCIES) == ["b"]
    run.skip_step(step_id="b", reason="condition false", at=11.0)
    assert run.ready_steps(DEPENDENCIES) == ["c"]
    assert run.steps["b"].skipped_reason == "condition false"


@pytest.mark.parametrize(
    ("command", "kwargs"),
    [
        ("complete_step", {"step_id": "a", "attempt": 1, "output": 1, "duration": 0.1}),
        (
            "fail_attempt",
            {
                "step_id": "a",
                "attempt": 1,
                "error_type": "E",
                "error": "x",
                "duration": None,
                "retry_at": None,
            },
        ),
        ("start_attempt", {"step_id": "a", "attempt": 1, "target": "t", "message_id": "m"}),
        ("start_compensation", {"step_id": "a", "attempt": 1, "action": "undo", "message_id": "m"}),
        ("schedule_step", {"step_id": "nope"}),
    ],
)
def test_an_illegal_step_transition_raises_and_records_nothing(
    command: str, kwargs: dict[str, object]
) -> None:
    run = new_run()
    before = len(run.pending_events)
    snapshot = {k: (v.status, v.attempts) for k, v in run.steps.items()}
    with pytest.raises(IllegalTransitionError):
        getattr(run, command)(**kwargs, at=12.0)
    assert len(run.pending_events) == before
    assert {k: (v.status, v.attempts) for k, v in run.steps.items()} == snapshot


def test_attempts_are_numbered_one_after_another() -> None:
    run = new_run()
    run.schedule_step(step_id="a", at=11.0)
    with pytest.raises(IllegalTransitionError, match="start_attempt"):
        run.start_attempt(step_id="a", attempt=2, target="t", message_id="m", at=11.0)
    run.start_attempt(step_id="a", attempt=1, target="t", message_id="m", at=11.0)
    run.fail_attempt(
        step_id="a",
        attempt=1,
        error_type="ValueError",
        error="x",
        duration=0.2,
        retry_at=13.0,
        at=11.2,
    )
    step = run.steps["a"]
    assert (step.status, step.retry_at, step.last_attempt_duration) == (
        StepStatus.RETRY_WAIT,
        13.0,
        0.2,
    )
    run.start_attempt(step_id="a", attempt=2, target="t", message_id="m2", at=13.0)
    run.fail_attempt(
        step_id="a",
        attempt=2,
        error_type="ValueError",
        error="y",
        duration=0.1,
        retry_at=None,
        at=13.1,
    )
    assert run.steps["a"].status is StepStatus.FAILED
    assert run.failed_steps() == ["a"]
    assert run.steps["a"].attempt_errors == [(1, "ValueError", "x"), (2, "ValueError", "y")]


def test_run_level_transitions_are_a_state_machine() -> None:
    run = new_run()
    with pytest.raises(IllegalTransitionError):
        run.finish_compensated(at=12.0)  # not compensating
    for step_id in "abcd":
        run.skip_step(step_id=step_id, reason="condition false", at=12.0)
    run.complete(output={}, at=12.0)
    assert run.finished
    with pytest.raises(IllegalTransitionError):
        run.schedule_step(step_id="a", at=13.0)  # a finished run takes no more steps


def test_compensation_goes_in_reverse_order_of_completion() -> None:
    run = new_run()
    complete(run, "b", at=11.0)
    complete(run, "a", at=12.0)
    run.schedule_step(step_id="c", at=13.0)
    run.start_attempt(step_id="c", attempt=1, target="t", message_id="m", at=13.0)
    run.fail_attempt(
        step_id="c",
        attempt=1,
        error_type="E",
        error="boom",
        duration=0.1,
        retry_at=None,
        at=13.5,
    )
    run.begin_compensation(failed_step="c", error="boom", at=14.0)
    assert run.state is RunStatus.COMPENSATING
    assert run.next_to_compensate() == "a"
    run.start_compensation(step_id="a", attempt=1, action="undo", message_id="m", at=14.0)
    run.fail_compensation(
        step_id="a", attempt=1, error_type="E", error="once", retry_at=15.0, at=14.1
    )
    assert run.next_to_compensate() == "a"  # retrying, still first
    run.start_compensation(step_id="a", attempt=2, action="undo", message_id="m", at=15.0)
    run.complete_compensation(step_id="a", attempt=2, at=15.1)
    assert run.next_to_compensate() == "b"
    run.skip_compensation(step_id="b", at=15.2)  # no compensation action
    assert run.next_to_compensate() is None
    assert run.compensation_order == ["a", "b"]
    assert run.compensation_outcome() is RunStatus.COMPENSATED
    compensation = run.steps["a"].compensation
    assert compensation is not None
    assert compensation.attempts == 2
    run.finish_compensated(at=16.0)
    assert run.state.value == "compensated"  # (mypy narrowed state to COMPENSATING above)


def test_a_compensation_that_fails_for_good_makes_the_outcome_compensation_failed() -> None:
    run = new_run()
    complete(run, "a")
    run.schedule_step(step_id="b", at=12.0)
    run.fail_step(step_id="b", error_type="ConditionError", error="x", at=12.0)
    run.begin_compensation(failed_step="b", error="x", at=12.0)
    run.start_compensation(step_id="a", attempt=1, action="undo", message_id="m", at=12.0)
    with pytest.raises(IllegalTransitionError):
        run.start_compensation(step_id="a", attempt=2, action="undo", message_id="m", at=12.0)
    run.fail_compensation(step_id="a", attempt=1, error_type="E", error="no", retry_at=None, at=13)
    assert run.steps["a"].status is StepStatus.COMPENSATION_FAILED
    assert run.next_to_compensate() is None
    assert run.compensation_outcome() is RunStatus.COMPENSATION_FAILED


async def test_replaying_the_events_rebuilds_the_same_run() -> None:
    run = new_run()
    complete(run, "a", output={"y": [1, 2]})
    run.apply_rule(rule_id="r", step_id="b", detail={"to": "x"}, at=11.5)
    run.schedule_step(step_id="b", at=12.0)
    run.start_attempt(step_id="b", attempt=1, target="t", message_id="m", at=12.0)
    repo = Repository(MemoryEventStore())
    await repo.save(run)
    again = await repo.get(run_aggregate_id("r1"), WorkflowRun)
    assert again.state is RunStatus.RUNNING
    assert again.steps == run.steps
    assert again.completion_order == ["a"]
    assert again.applied_rules == run.applied_rules
    assert again.running_attempts() == ["b"]
    assert again.in_flight() == ["b"]
    assert again.outputs() == {"a": {"y": [1, 2]}}


def fail_once(run: WorkflowRun, step_id: str, error_type: str, *, retry_at: float | None) -> None:
    run.schedule_step(step_id=step_id, at=11.0)
    run.start_attempt(step_id=step_id, attempt=1, target="t", message_id="m", at=11.0)
    run.fail_attempt(
        step_id=step_id,
        attempt=1,
        error_type=error_type,
        error="x",
        duration=None,
        retry_at=retry_at,
        at=11.5,
    )


async def test_steps_of_unknown_outcome_are_compensated_first_and_keep_their_status() -> None:
    run = new_run()
    complete(run, "a", at=11.0)
    fail_once(run, "b", "Timeout", retry_at=20.0)  # waiting for its retry
    run.skip_step(step_id="b", reason="cancelled", at=12.0)
    fail_once(run, "c", "Interrupted", retry_at=None)  # (c after a: order of the test only)
    fail_once(run, "d", "RemoteCommandError", retry_at=None)  # a definite answer
    assert run.uncertain_steps() == ["c", "b"]  # reverse step order
    assert run.uncertain_steps({"b", "d"}) == ["b"]  # only steps naming a compensation
    assert run.needs_compensation({"d"})  # a completed
    run.begin_compensation(failed_step="c", error="x", at=13.0)
    with pytest.raises(IllegalTransitionError):  # it did not complete
        run.start_compensation(step_id="b", attempt=1, action="u", message_id="m", at=13.0)
    with pytest.raises(IllegalTransitionError):  # the target said no: nothing to undo
        run.start_compensation(
            step_id="d", attempt=1, action="u", message_id="m", at=13.0, reason="outcome unknown"
        )
    assert run.next_to_compensate({"a", "b"}) == "b"
    run.start_compensation(
        step_id="b", attempt=1, action="u", message_id="m", at=13.0, reason="outcome unknown"
    )
    run.complete_compensation(step_id="b", attempt=1, at=13.1)
    b = run.steps["b"]
    assert b.status is StepStatus.SKIPPED
    assert b.compensation is not None
    assert (b.compensation.status, b.compensation.reason) == (
        StepStatus.COMPENSATED,
        "outcome unknown",
    )
    assert run.next_to_compensate({"a", "b"}) == "a"
    run.start_compensation(step_id="a", attempt=1, action="u", message_id="m", at=13.2)
    run.fail_compensation(step_id="a", attempt=1, error_type="E", error="no", retry_at=None, at=14)
    assert run.next_to_compensate({"a", "b"}) is None
    assert run.compensation_order == ["b", "a"]
    assert run.compensation_outcome() is RunStatus.COMPENSATION_FAILED
    repo = Repository(MemoryEventStore())
    await repo.save(run)
    again = await repo.get(run_aggregate_id("r1"), WorkflowRun)
    assert again.steps == run.steps


def test_a_run_completes_only_when_every_step_completed_or_was_skipped() -> None:
    run = new_run()
    complete(run, "a")
    complete(run, "b")
    run.schedule_step(step_id="c", at=12.0)
    run.start_attempt(step_id="c", attempt=1, target="t", message_id="m", at=12.0)
    run.fail_attempt(
        step_id="c", attempt=1, error_type="Boom", error="x", duration=0.1, retry_at=20.0, at=12.0
    )
    recorded = len(run.pending_events)
    with pytest.raises(GuardRejectedError, match="every_step_resolved"):
        run.complete(output={}, at=13.0)  # c waits for a retry, d never ran
    assert run.state is RunStatus.RUNNING
    assert len(run.pending_events) == recorded  # nothing recorded
    run.start_attempt(step_id="c", attempt=2, target="t", message_id="m2", at=20.0)
    run.complete_step(step_id="c", attempt=2, output=None, duration=0.5, at=20.0)
    run.skip_step(step_id="d", reason="condition false", at=21.0)
    run.complete(output={}, at=21.0)
    assert run.state is RunStatus.COMPLETED
