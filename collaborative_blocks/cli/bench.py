"""``cblocks bench``: benchmarks measured against baselines in the same run.

A typer sub-app, so later components add ``cblocks bench broker|sync|workflow`` next to
``store``.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from collaborative_blocks.bench._stats import CaseResult, ProgressCallback, machine_info
from collaborative_blocks.bench.store import (
    CASES,
    StoreBenchConfig,
    planned_measurements,
    run_store_bench,
    sequence_of_cases,
)
from collaborative_blocks.cli._common import console, err_console, fail, print_json, run_async

app = typer.Typer(help="Benchmarks: ours vs baselines, measured interleaved in one run.")

# The options every ``cblocks bench`` sub-command takes.
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
MarkdownOption = Annotated[
    bool, typer.Option("--markdown", help="Print the table as Markdown (for the docs).")
]
QuickOption = Annotated[bool, typer.Option("--quick", help="Tiny sizes, one round (tests).")]


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    # Three decimals below 1, so 0.748 is not shown as a "met" 0.75.
    return f"{value:.2f}x" if value >= 1 else f"{value:.3f}x"


def _spread(case: CaseResult) -> str:
    ratios = case.round_ratios
    if len(ratios) < 2:
        return "-"
    return f"{_ratio(min(ratios))[:-1]}-{_ratio(max(ratios))}"


def results_table(title: str, cases: list[CaseResult]) -> Table:
    """case, ours, baseline, ratio (of medians), the per-round ratios' range, target, met?

    Context contenders get rows of their own, with their ratio to the baseline.
    """
    table = Table(title=title)
    table.add_column("case")
    table.add_column("ours", justify="right")
    table.add_column("baseline", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("per round", justify="right")
    table.add_column("target", justify="right")
    table.add_column("met?", justify="center")
    for case in cases:
        ours = case.measurements.get(case.ours)
        base = case.measurements.get(case.baseline)
        if case.unavailable is not None:
            met = "[yellow]n/a[/]"
        elif case.met:
            met = "[green]yes[/]"
        else:
            met = "[red]no[/]"
        table.add_row(
            f"{case.title}\n[dim]vs {case.baseline}[/]",
            "-" if ours is None else f"{_rate(ours.median)} {case.unit}",
            "-" if base is None else f"{_rate(base.median)} {case.unit}",
            _ratio(case.ratio),
            _spread(case),
            f">= {case.target:g}x",
            met,
        )
        for name, measurement in case.measurements.items():
            if name in (case.ours, case.baseline):
                continue
            table.add_row(
                f"[dim]  context: {name}[/]",
                f"[dim]{_rate(measurement.median)} {case.unit}[/]",
                "",
                f"[dim]{_ratio(case.ratio_to_baseline(name))}[/]",
                "",
                "",
                "",
            )
        if case.unavailable is not None:
            table.add_row(f"[yellow]  {case.unavailable}[/]", "", "", "", "", "", "")
    return table


def results_markdown(cases: list[CaseResult]) -> str:
    """The results as a Markdown table (what docs/benchmarks.md holds)."""
    lines = [
        "| case | ours | baseline | ratio | per round | target | met? |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for case in cases:
        ours = case.measurements.get(case.ours)
        base = case.measurements.get(case.baseline)
        met = "n/a" if case.unavailable is not None else ("yes" if case.met else "**no**")
        lines.append(
            f"| {case.title} vs {case.baseline} "
            f"| {'-' if ours is None else _rate(ours.median)} {case.unit} "
            f"| {'-' if base is None else _rate(base.median)} {case.unit} "
            f"| {_ratio(case.ratio)} | {_spread(case)} | >= {case.target:g}x | {met} |"
        )
        for name, measurement in case.measurements.items():
            if name not in (case.ours, case.baseline):
                lines.append(
                    f"| &nbsp;&nbsp;context: {name} | {_rate(measurement.median)} {case.unit} "
                    f"| | {_ratio(case.ratio_to_baseline(name))} | | | |"
                )
        if case.unavailable is not None:
            lines.append(f"| &nbsp;&nbsp;{case.unavailable} | | | | | | |")
    return "\n".join(lines)


def _run_and_report(
    benchmark: str,
    run: Callable[[ProgressCallback | None], Awaitable[list[CaseResult]]],
    *,
    planned: int,
    rounds_label: str,
    config: dict[str, Any],
    as_json: bool,
    markdown: bool,
    sqlite_in_header: bool = False,
) -> None:
    """Run one benchmark (with a progress bar unless the output is for a machine) and print
    its results as JSON, Markdown or a rich table with the case notes."""
    command = (
        "cblocks " + shlex.join(sys.argv[1:]) if sys.argv[1:] else f"cblocks bench {benchmark}"
    )

    async def main() -> list[CaseResult]:
        if as_json or markdown:
            return await run(None)
        progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        )
        with progress:
            task = progress.add_task("benchmark", total=planned)

            def advance(key: str, name: str) -> None:
                progress.update(task, advance=1, description=f"{key}: {name}")

            return await run(advance)

    results = run_async(main)
    machine = machine_info()
    if as_json:
        print_json(
            {
                "benchmark": benchmark,
                "command": command,
                "machine": machine,
                "config": config,
                "cases": [c.as_json() for c in results],
            }
        )
        return
    where = f"{machine['nproc']} CPUs, Python {machine['python']}"
    if sqlite_in_header:
        where += f", SQLite {machine['sqlite']}"
    if markdown:
        print(f"`{command}`: medians of {rounds_label}; {where}\n")
        print(results_markdown(results))
        return
    console.print(
        results_table(f"cblocks bench {benchmark}: medians of {rounds_label}, {where}", results)
    )
    for result in results:
        for note in result.notes:
            console.print(f"[dim]{result.key}: {note}[/]")


@app.command("store")
def store_command(
    as_json: JsonOption = False,
    markdown: MarkdownOption = False,
    quick: QuickOption = False,
    postgres: Annotated[
        str | None,
        typer.Option(
            "--postgres",
            metavar="URL",
            help="Also run the PostgreSQL cases; a fresh database is created on this server "
            "per measurement (e.g. postgresql://postgres@127.0.0.1:5432/postgres).",
        ),
    ] = None,
    rounds: Annotated[
        int | None,
        typer.Option(min=1, help="Interleaved rounds per case (default 5; 1 with --quick)."),
    ] = None,
    case: Annotated[
        list[str] | None,
        typer.Option("--case", metavar="LETTER", help="Only these cases: a, b, c, d (repeatable)."),
    ] = None,
) -> None:
    """The event store vs raw drivers and eventsourcing's recorders (issue 2 targets)."""
    cases = sequence_of_cases(case or CASES)
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        fail(f"unknown --case {', '.join(unknown)}; choose from {', '.join(CASES)}")
    options: dict[str, Any] = {"postgres": postgres, "cases": cases}
    if rounds is not None:
        options["rounds"] = rounds
    cfg = StoreBenchConfig.quick(**options) if quick else StoreBenchConfig(**options)
    _run_and_report(
        "store",
        lambda progress: run_store_bench(cfg, progress),
        planned=planned_measurements(cfg),
        rounds_label=f"{cfg.rounds} interleaved round(s)",
        config={
            "rounds": cfg.rounds,
            "quick": quick,
            "postgres": postgres is not None,
            "cases": list(cfg.cases),
            "sequential_appends": cfg.sequential_appends,
            "concurrent_tasks": cfg.concurrent_tasks,
            "appends_per_task": cfg.appends_per_task,
            "batches": cfg.batches,
            "batch_size": cfg.batch_size,
            "aggregate_events": cfg.aggregate_events,
            "loads": cfg.loads,
        },
        as_json=as_json,
        markdown=markdown,
        sqlite_in_header=True,
    )


@app.command("broker")
def broker_command(
    as_json: JsonOption = False,
    markdown: MarkdownOption = False,
    quick: QuickOption = False,
    redis: Annotated[
        str,
        typer.Option(
            "--redis",
            metavar="URL",
            help="The Redis server of the Redis Streams cases (reported n/a when it does not "
            "answer); every measurement creates its own streams there and deletes them.",
        ),
    ] = "redis://127.0.0.1:6379",
    rounds: Annotated[
        int | None,
        typer.Option(min=1, help="Interleaved rounds per case (default 5; 1 with --quick)."),
    ] = None,
    case: Annotated[
        list[str] | None,
        typer.Option(
            "--case",
            metavar="NAME",
            help="Only these cases: in-process, exactly-once, redis-faststream, redis-raw "
            "(repeatable).",
        ),
    ] = None,
) -> None:
    """The broker: in-process and EXACTLY_ONCE rates, Redis vs FastStream and raw redis-py."""
    from collaborative_blocks.bench import broker as bench
    from collaborative_blocks.errors import redact_url

    cases = bench.sequence_of_cases(case or bench.CASES)
    unknown = sorted(set(cases) - set(bench.CASES))
    if unknown:
        fail(f"unknown --case {', '.join(unknown)}; choose from {', '.join(bench.CASES)}")
    options: dict[str, Any] = {"redis": redis, "cases": cases}
    if rounds is not None:
        options["rounds"] = rounds
    cfg = bench.BrokerBenchConfig.quick(**options) if quick else bench.BrokerBenchConfig(**options)
    _run_and_report(
        "broker",
        lambda progress: bench.run_broker_bench(cfg, progress),
        planned=bench.planned_measurements(cfg),
        rounds_label=f"{cfg.rounds} interleaved round(s)",
        config={
            "rounds": cfg.rounds,
            "quick": quick,
            "cases": list(cfg.cases),
            "redis": redact_url(cfg.redis),
            "in_process_messages": cfg.in_process_messages,
            "exactly_once_messages": cfg.exactly_once_messages,
            "redis_messages": cfg.redis_messages,
        },
        as_json=as_json,
        markdown=markdown,
    )


@app.command("sync")
def sync_command(
    as_json: JsonOption = False,
    markdown: MarkdownOption = False,
    quick: QuickOption = False,
    rounds: Annotated[
        int | None,
        typer.Option(min=1, help="Rounds per case (default 3; 1 with --quick)."),
    ] = None,
) -> None:
    """The sync engine: changes/s through a 5-system chain on SQLite, vector-clock ops/s."""
    from collaborative_blocks.bench import sync as bench

    options: dict[str, Any] = {}
    if rounds is not None:
        options["rounds"] = rounds
    cfg = bench.SyncBenchConfig.quick(**options) if quick else bench.SyncBenchConfig(**options)
    _run_and_report(
        "sync",
        lambda progress: bench.run_sync_bench(cfg, progress),
        planned=bench.planned_measurements(cfg),
        rounds_label=f"{cfg.rounds} round(s)",
        config={
            "rounds": cfg.rounds,
            "quick": quick,
            "changes": cfg.changes,
            "clock_operations": cfg.clock_operations,
        },
        as_json=as_json,
        markdown=markdown,
    )


@app.command("workflow")
def workflow_command(
    as_json: JsonOption = False,
    markdown: MarkdownOption = False,
    quick: QuickOption = False,
    rounds: Annotated[
        int | None,
        typer.Option(min=1, help="Interleaved rounds per case (default 5; 1 with --quick)."),
    ] = None,
) -> None:
    """Workflows: engine overhead per step vs plain asyncio, durable steps/s on SQLite,
    condition evaluation and open-breaker fail-fast costs (issue 5 targets)."""
    from collaborative_blocks.bench import workflow as bench

    options: dict[str, Any] = {}
    if rounds is not None:
        options["rounds"] = rounds
    cfg = (
        bench.WorkflowBenchConfig.quick(**options)
        if quick
        else bench.WorkflowBenchConfig(**options)
    )
    _run_and_report(
        "workflow",
        lambda progress: bench.run_workflow_bench(cfg, progress),
        planned=bench.planned_measurements(cfg),
        rounds_label=f"{cfg.rounds} interleaved round(s)",
        config={
            "rounds": cfg.rounds,
            "quick": quick,
            "runs": cfg.runs,
            "durable_runs": cfg.durable_runs,
            "concurrency": cfg.concurrency,
            "evaluations": cfg.evaluations,
        },
        as_json=as_json,
        markdown=markdown,
        sqlite_in_header=True,
    )


@app.command("chaos")
def chaos_command(
    as_json: JsonOption = False,
    markdown: MarkdownOption = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="Two seeds per scenario, one round (tests).")
    ] = False,
    rounds: Annotated[
        int | None,
        typer.Option(min=1, help="Interleaved rounds per case (default 3; 1 with --quick)."),
    ] = None,
) -> None:
    """The chaos simulator: simulated deliveries per CPU-second of every scenario, with its
    default faults and with none, and the CI gate's projected time (issue 6 targets)."""
    from collaborative_blocks.bench import chaos as bench

    options: dict[str, Any] = {}
    if rounds is not None:
        options["rounds"] = rounds
    cfg = bench.ChaosBenchConfig.quick(**options) if quick else bench.ChaosBenchConfig(**options)
    _run_and_report(
        "chaos",
        lambda progress: bench.run_chaos_bench(cfg, progress),
        planned=bench.planned_measurements(cfg),
        rounds_label=f"{cfg.rounds} interleaved round(s)",
        config={
            "rounds": cfg.rounds,
            "quick": quick,
            "seeds": list(cfg.seeds),
            "scenarios": list(cfg.chosen()),
        },
        as_json=as_json,
        markdown=markdown,
    )
