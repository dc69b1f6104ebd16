"""SIGKILL a process in the middle of a workflow run; a second process resumes it from the log.

A real child process (this file's ``WORKER`` script, run with ``sys.executable``) owns a
SQLite store file, an in-process broker, the target system's handlers and a workflow engine.
Each handler execution appends a line to a record file before it answers, so the test sees
every execution, including those of the killed process. The parent polls the store (with a
deadline, never a blind sleep) until the run is where the scenario wants it, kills the child
with SIGKILL, starts a second process that calls ``resume()``, and checks the outcome from the
log and the record file.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from collaborative_blocks.core.aggregates import Repository
from collaborative_blocks.core.workflows import RunStatus, StepStatus, WorkflowRun, run_aggregate_id
from collaborative_blocks.errors import AggregateNotFoundError
from collaborative_blocks.stores.sqlite import open_sqlite_store

# Safety nets against a child that hangs; never part of what is asserted.
DEADLINE_SECONDS = 60.0
POLL_SECONDS = 0.05
RUN_ID = "crash-1"

WORKER = r"""
import asyncio, json, os, sys, time

from collaborative_blocks.core.messaging import Message, SystemConnector
from collaborative_blocks.core.settings import load_settings
from collaborative_blocks.core.workflows import (
    WorkflowCoordinationEngine, WorkflowDefinition, WorkflowStep,
)
from collaborative_blocks.stores.sqlite import open_sqlite_store

mode, url, records, scenario = sys.argv[1:5]


def executions(kind, name):
    if not os.path.exists(records):
        return 0
    with open(records) as file:
        return sum(1 for line in file if json.loads(line)[:2] == [kind, name])


def record(kind, name, message):
    with open(records, "a") as file:
        file.write(json.dumps([kind, name, message.id, time.time(), os.getpid()]) + "\n")
        file.flush()
        os.fsync(file.fileno())


async def action(message: Message) -> object:
    name = message.payload["name"]
    record("run", name, message)
    if name == "b" and scenario == "forward" and executions("run", "b") == 1:
        raise ConnectionError("b is not ready yet")
    if name == "c" and scenario == "compensate":
        raise ValueError("c always fails")
    return {"step": name}


async def undo(message: Message) -> object:
    name = message.payload["name"]
    record("undo", name, message)
    if name == "b" and executions("undo", "b") == 1:
        await asyncio.sleep(3600)  # the first undo of b hangs until the process is killed
    return None


def definition():
    workflow = WorkflowDefinition("crashy", "crash and resume")
    retry = {"max_retries": 3, "delay": 4, "jitter": 0}
    workflow.add_step(WorkflowStep(step_id="a", system_target="system", action="action",
                                   parameters={"name": "a"}, compensation="undo",
                                   compensation_parameters={"name": "a"}))
    workflow.add_step(WorkflowStep(step_id="b", system_target="system", action="action",
                                   parameters={"name": "b"}, dependencies=["a"],
                                   retry_policy=retry, compensation="undo",
                                   compensation_parameters={"name": "b"}))
    workflow.add_step(WorkflowStep(step_id="c", system_target="system", action="action",
                                   parameters={"name": "c"}, dependencies=["b"],
                                   retry_policy={"max_retries": 0}))
    return workflow


async def main():
    store = await open_sqlite_store(url)
    engine = WorkflowCoordinationEngine(store=store, settings=load_settings({}),
                                        step_timeout=3600)
    system = SystemConnector("system", engine.broker)
    system.on_command("action", action)
    system.on_command("undo", undo)
    try:
        if mode == "run":
            await engine.define_workflow(definition())
            result = await engine.execute_workflow("crashy", {}, run_id="crash-1")
        else:
            # No define_workflow here: the definition comes from the log.
            resumed = await engine.resume()
            assert resumed == ["crash-1"], resumed
            result = await engine.wait_for("crash-1")
        print(json.dumps(result.to_dict()), flush=True)
    finally:
        await engine.close()
        await store.close()


asyncio.run(main())
"""


async def _spawn(script: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _poll_run(
    url: str, process: asyncio.subprocess.Process, ready: Callable[[WorkflowRun], bool]
) -> WorkflowRun:
    """Read the run from the store until ``ready`` holds (or the child died, or the deadline)."""
    store = await open_sqlite_store(url)
    repository = Repository(store)
    try:
        async with asyncio.timeout(DEADLINE_SECONDS):
            while True:
                if process.returncode is not None:
                    assert process.stderr is not None
                    error = await process.stderr.read()
                    pytest.fail(f"the worker exited early: {error.decode()}")
                try:
                    run = await repository.get(run_aggregate_id(RUN_ID), WorkflowRun)
                except AggregateNotFoundError:
                    run = None
                if run is not None and ready(run):
                    return run
                await asyncio.sleep(POLL_SECONDS)  # polling another process's writes
    finally:
        await store.close()


async def _kill(process: asyncio.subprocess.Process) -> None:
    process.send_signal(signal.SIGKILL)
    await process.wait()
    assert process.returncode == -signal.SIGKILL


async def _resume(script: Path, *args: str) -> dict[str, Any]:
    process = await _spawn(script, "resume", *args)
    stdout, stderr = await asyncio.wait_for(process.communicate(), DEADLINE_SECONDS)
    assert process.returncode == 0, stderr.decode()
    result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    return result


def _records(path: Path) -> list[tuple[str, str, str, float, int]]:
    """Every handler execution: (kind, step, message id, wall time, process id)."""
    found = []
    for line in path.read_text().splitlines():
        kind, name, message_id, at, pid = json.loads(line)
        found.append((str(kind), str(name), str(message_id), float(at), int(pid)))
    return found


async def test_a_run_killed_in_a_retry_wait_resumes_in_another_process(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    records = tmp_path / "records.jsonl"
    args = (url, str(records), "forward")

    first = await _spawn(script, "run", *args)
    try:
        waiting = await _poll_run(
            url,
            first,
            lambda run: (
                run.steps["b"].status is StepStatus.RETRY_WAIT
                and run.steps["a"].status is StepStatus.COMPLETED
            ),
        )
    finally:
        await _kill(first)
    retry_at = waiting.steps["b"].retry_at
    assert retry_at is not None
    killed_pid = first.pid

    result = await _resume(script, *args)
    assert result["status"] == "completed"
    executions = _records(records)
    runs = [(name, message_id, at, pid) for kind, name, message_id, at, pid in executions]
    assert [name for name, *_ in runs] == ["a", "b", "b", "c"]  # a is not run again
    assert [message_id for _, message_id, _, _ in runs] == [
        "crash-1:a:1",
        "crash-1:b:1",
        "crash-1:b:2",
        "crash-1:c:1",
    ]
    (_, _, b_retry_at, b_retry_pid) = runs[2]
    assert b_retry_pid != killed_pid  # the retry ran in the second process...
    assert b_retry_at >= retry_at  # ...no earlier than the due time the first one recorded
    assert result["steps"]["b"]["attempts"] == 2
    assert result["steps"]["a"]["attempts"] == 1

    store = await open_sqlite_store(url)
    try:
        run = await Repository(store).get(run_aggregate_id(RUN_ID), WorkflowRun)
    finally:
        await store.close()
    assert run.state is RunStatus.COMPLETED
    assert run.resumptions == 1


async def test_a_run_killed_while_compensating_resumes_the_compensation(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    records = tmp_path / "records.jsonl"
    args = (url, str(records), "compensate")

    def compensating_b(run: WorkflowRun) -> bool:
        compensation = run.steps["b"].compensation
        return compensation is not None and compensation.running

    first = await _spawn(script, "run", *args)
    try:
        await _poll_run(url, first, compensating_b)
    finally:
        await _kill(first)

    result = await _resume(script, *args)
    assert result["status"] == "compensated"
    assert result["compensated"] == ["b", "a"]  # reverse order of completion
    undo = [(name, pid) for kind, name, _, _, pid in _records(records) if kind == "undo"]
    assert [name for name, _ in undo] == ["b", "b", "a"]
    assert undo[0][1] == first.pid
    assert undo[1][1] != first.pid
    b = result["steps"]["b"]["compensation"]
    assert (b["status"], b["attempts"]) == ("compensated", 2)
    assert result["steps"]["a"]["compensation"]["attempts"] == 1
