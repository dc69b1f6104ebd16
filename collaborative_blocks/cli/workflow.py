"""``cblocks workflow``: validate, run, resume and inspect durable workflows.

Runs are event-sourced in the store of ``--store`` (default ``EVENT_STORE_URL``), so
``show`` reads a run's history without the process that ran it, and ``resume`` continues
the runs a killed process left unfinished. The target systems are reached through
``MESSAGE_BROKER_URL``; for a self-contained run, ``--handlers FILE.py`` (or ``MODULE``, or
``MODULE:FUNCTION``) names a function ``register(broker)`` that serves them in this process.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from collaborative_blocks.cli._common import (
    EXIT_FAILED,
    console,
    fail,
    print_json,
    run_async,
    state_of,
)
from collaborative_blocks.core.messaging import JSONValue, MessageBroker
from collaborative_blocks.core.runtime import Runtime
from collaborative_blocks.core.settings import load_settings
from collaborative_blocks.core.workflows import (
    RunEvent,
    WorkflowCoordinationEngine,
    WorkflowDefinition,
    WorkflowResult,
    load_definition,
)
from collaborative_blocks.errors import WorkflowDefinitionError

app = typer.Typer(
    help="Durable workflows: validate, run, resume and show runs.", no_args_is_help=True
)

StoreOption = Annotated[
    str | None,
    typer.Option("--store", metavar="URL", help="Event store URL (default: EVENT_STORE_URL)."),
]
HandlersOption = Annotated[
    list[str] | None,
    typer.Option(
        "--handlers",
        metavar="FILE.py|MODULE[:FUNCTION]",
        help="Serve target systems in this process: FUNCTION(broker) (default name "
        "'register') registers their handlers with SystemConnector (repeatable).",
    ),
]
EngineOption = Annotated[
    str,
    typer.Option("--engine-id", help="The engine's name: its runs index (resume finds these)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]

Registrar = Callable[[MessageBroker], object]


def _load_definition(path: Path) -> WorkflowDefinition:
    if not path.is_file():
        fail(f"no workflow file {str(path)!r}; give a .yaml, .yml or .json document")
    return load_definition(path)


def _registrar(spec: str) -> Registrar:
    """``FILE.py[:FUNCTION]`` or ``MODULE[:FUNCTION]`` -> the function (default ``register``)."""
    target, _, function = spec.partition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            fail(f"--handlers {spec!r}: no such file {target!r}")
        module_spec = importlib.util.spec_from_file_location(f"_cb_handlers_{path.stem}", path)
        if module_spec is None or module_spec.loader is None:
            fail(f"--handlers {spec!r}: {target!r} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            fail(f"--handlers {spec!r}: cannot import {target!r} ({error})")
    name = function or "register"
    found = getattr(module, name, None)
    if not callable(found):
        fail(
            f"--handlers {spec!r}: {target!r} has no function {name!r}; define "
            f"`def {name}(broker)` that registers the systems' handlers"
        )
    registrar: Registrar = found
    return registrar


def _parse_input(text: str | None, input_file: Path | None) -> dict[str, JSONValue]:
    if text is not None and input_file is not None:
        fail("give the input either as --input JSON or as --input-file PATH, not both")
    if input_file is not None:
        if not input_file.is_file():
            fail(f"--input-file: no such file {str(input_file)!r}")
        text = input_file.read_text()
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        fail(f"--input is not JSON ({error.msg} at character {error.pos}); e.g. '{{\"x\": 1}}'")
    if not isinstance(value, dict):
        fail(f"--input must be a JSON object of input values, got {type(value).__name__}")
    return value


@asynccontextmanager
async def _engine(
    ctx: typer.Context, store: str | None, engine_id: str, handlers: Sequence[str]
) -> AsyncIterator[WorkflowCoordinationEngine]:
    overrides: dict[str, Any] = {}
    if store is not None:
        overrides["event_store_url"] = store
    settings = load_settings(**overrides)
    registrars = [_registrar(spec) for spec in handlers]
    runtime = Runtime(settings, plugin_manager=state_of(ctx).plugin_manager())
    async with runtime, WorkflowCoordinationEngine(runtime, engine_id=engine_id) as engine:
        for register in registrars:
            register(engine.broker)
        yield engine


def _status_style(status: str) -> str:
    if status == "completed":
        return "green"
    if status in ("skipped", "compensated"):
        return "yellow"
    if status in ("pending", "running", "scheduled", "retry_wait"):
        return "cyan"
    return "red"


def _print_result(result: WorkflowResult) -> None:
    style = _status_style(result.status.value)
    console.print(
        f"run [bold]{result.run_id}[/] of workflow [bold]{result.workflow_id}[/]: "
        f"[{style}]{result.status.value}[/]"
        + (f"  (trace {result.trace_id})" if result.trace_id else "")
    )
    table = Table()
    for column in ("step", "status", "target", "attempts", "duration", "output / error"):
        table.add_column(column)
    for step_id, step in result.steps.items():
        detail: str
        if step.error:
            detail = step.error
        elif step.skipped_reason:
            detail = f"skipped: {step.skipped_reason}"
        else:
            detail = json.dumps(step.output, default=str)
        if step.compensation is not None:
            comp = step.compensation
            if comp.action is None:
                detail += "\nnothing to compensate (no compensation action)"
            else:
                detail += f"\n{comp.action}: {comp.status.value} after {comp.attempts} attempt(s)"
            if comp.error:
                detail += f" ({comp.error})"
        duration = "-" if step.duration is None else f"{step.duration:.3f}s"
        step_style = _status_style(step.status.value)
        table.add_row(
            step_id,
            f"[{step_style}]{step.status.value}[/]",
            step.target or "-",
            str(step.attempts),
            duration,
            detail,
        )
    console.print(table)
    for rule in result.applied_rules:
        console.print(f"[dim]rule {rule.rule_id} applied to {rule.step_id}: {rule.detail}[/]")
    if result.error:
        console.print(f"[red]{result.error}[/]")


@app.command("validate")
def validate_command(
    file: Annotated[Path, typer.Argument(help="The workflow document (.yaml, .yml, .json).")],
    as_json: JsonOption = False,
) -> None:
    """Check a workflow document: every error names its step and what to fix."""
    try:
        compiled = _load_definition(file).compile()
    except WorkflowDefinitionError as error:
        fail(str(error))
    if as_json:
        print_json({"workflow_id": compiled.workflow_id, "order": list(compiled.order)})
        return
    console.print(
        f"[green]ok[/]: workflow [bold]{compiled.workflow_id}[/], "
        f"{len(compiled.order)} steps in order: {' -> '.join(compiled.order)}"
    )


@app.command("run")
def run_command(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="The workflow document (.yaml, .yml, .json).")],
    input_json: Annotated[
        str | None, typer.Option("--input", metavar="JSON", help="The run's input object.")
    ] = None,
    input_file: Annotated[
        Path | None, typer.Option("--input-file", help="Read the input object from a file.")
    ] = None,
    handlers: HandlersOption = None,
    store: StoreOption = None,
    engine_id: EngineOption = "workflows",
    run_id: Annotated[str | None, typer.Option("--run-id", help="Choose the run's id.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Run a workflow document to the end and print the result (exit 1 unless completed)."""
    definition = _load_definition(file)
    data = _parse_input(input_json, input_file)

    async def main() -> WorkflowResult:
        async with _engine(ctx, store, engine_id, handlers or ()) as engine:
            await engine.define_workflow(definition)
            await engine.broker.start()
            return await engine.execute_workflow(definition.workflow_id, data, run_id=run_id)

    result = run_async(main)
    if as_json:
        print_json(result.to_dict())
    else:
        _print_result(result)
        console.print(f"[dim]history: cblocks workflow show {result.run_id}[/]")
    if not result.succeeded:
        raise typer.Exit(EXIT_FAILED)


@app.command("resume")
def resume_command(
    ctx: typer.Context,
    handlers: HandlersOption = None,
    store: StoreOption = None,
    engine_id: EngineOption = "workflows",
    as_json: JsonOption = False,
) -> None:
    """Continue every run this engine left unfinished (after a crash) and wait for them."""

    async def main() -> list[WorkflowResult]:
        async with _engine(ctx, store, engine_id, handlers or ()) as engine:
            await engine.broker.start()
            run_ids = await engine.resume()
            return [await engine.wait_for(run_id) for run_id in run_ids]

    results = run_async(main)
    if as_json:
        print_json([result.to_dict() for result in results])
    elif not results:
        console.print("no unfinished runs")
    for result in results if not as_json else ():
        _print_result(result)
    if any(not result.succeeded for result in results):
        raise typer.Exit(EXIT_FAILED)


@app.command("show")
def show_command(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run's id (printed by `workflow run`).")],
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """A run's result and its full history of events, from the event store."""

    async def main() -> tuple[WorkflowResult, list[RunEvent]]:
        async with _engine(ctx, store, "workflows", ()) as engine:
            return await engine.get_result(run_id), await engine.history(run_id)

    result, history = run_async(main)
    if as_json:
        print_json({"result": result.to_dict(), "history": [e.to_dict() for e in history]})
        return
    _print_result(result)
    table = Table(title=f"history of run {run_id}: {len(history)} events")
    for column in ("#", "at", "event", "details"):
        table.add_column(column)
    start = history[0].at if history else 0.0
    for event in history:
        details = ", ".join(
            f"{key}={json.dumps(value, default=str)}"
            for key, value in event.data.items()
            if key not in ("at",)
        )
        table.add_row(str(event.version), f"+{event.at - start:.3f}s", event.name, details)
    console.print(table)
