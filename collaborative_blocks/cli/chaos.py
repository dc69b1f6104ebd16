"""``cblocks chaos run|replay|list``: seeded, replayable chaos simulations of the framework.

``run`` runs N seeds of each scenario under its fault plan with a progress bar, prints a
summary per scenario and invariant and, for each failing run, its seed, the violated
invariant with the few operations that show it, and the command that replays it. Exit status
0 when every run held every invariant and covered every required behaviour, 1 otherwise, 2 on
bad input (an unknown scenario, a bad fault spec, a plugin that cannot be imported).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.padding import Padding
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from collaborative_blocks.cli._common import (
    EXIT_FAILED,
    console,
    err_console,
    fail,
    guarded,
    print_json,
    state_of,
)
from collaborative_blocks.simulations import (
    FaultPlan,
    Scenario,
    get_scenario,
    run_simulation,
    scenario_names,
)
from collaborative_blocks.simulations.report import (
    ScenarioSummary,
    summarize_by_scenario,
    write_report,
)
from collaborative_blocks.simulations.results import Operation, SimulationResult

__all__ = ["app"]

#: Seeds per scenario when ``--seeds`` is not given: enough for every fault to show up, small
#: enough that ``cblocks chaos run`` on all built-in scenarios finishes in seconds.
DEFAULT_SEEDS = 20
#: Failing runs printed in full (witnesses); the others are listed with their replay command.
MAX_FAILURES_IN_FULL = 10
#: The shell's status for a command ended by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130
#: Reruns ``chaos replay --shrink`` may spend looking for a smaller failing fault plan.
SHRINK_MAX_RUNS = 200
#: Operation values longer than this are cut in the terminal tables.
MAX_VALUE_CHARS = 120

app = typer.Typer(
    help="Chaos simulations: the real framework on a virtual clock under seeded fault plans.",
    no_args_is_help=True,
)

PluginOption = Annotated[
    list[str] | None,
    typer.Option(
        "-p",
        "--plugin",
        metavar="MODULE",
        help="A plugin module with more scenarios or planted faults (repeatable; adds to "
        "the root -p).",
    ),
]
FaultsOption = Annotated[
    str | None,
    typer.Option(
        "--faults",
        metavar="SPEC",
        help="Fault plan for every scenario instead of its default, e.g. "
        "'drop=0.05,duplicate=0.02,partition=30s@10s,crash=0.01' ('none' for no faults; "
        "see docs/chaos.md).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
ReportOption = Annotated[
    Path | None,
    typer.Option(
        "--report",
        metavar="FILE.html",
        help="Also write a self-contained HTML report with plots (opens offline).",
        dir_okay=False,
    ),
]


def _plugins(ctx: typer.Context, local: Sequence[str] | None) -> tuple[str, ...]:
    # Root -p first, then the command's own; each module once, in order.
    return tuple(dict.fromkeys([*state_of(ctx).plugins, *(local or ())]))


def _parse_faults(faults: str | None) -> FaultPlan | None:
    return None if faults is None else FaultPlan.parse(faults)


def _scenarios(names: Sequence[str] | None, plugins: Sequence[str]) -> list[Scenario]:
    wanted = list(dict.fromkeys(names)) if names else scenario_names(plugins)
    return [get_scenario(name, plugins) for name in wanted]


def _command_line(default: str) -> str:
    return "cblocks " + shlex.join(sys.argv[1:]) if sys.argv[1:] else default


# --- run -------------------------------------------------------------------------------


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[str, int, int], None]]:
    """``tick(scenario, seed, failed_so_far)`` after each run; a rich bar on stderr."""
    if not enabled:
        yield lambda scenario, seed, failed: None
        return
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )
    with progress:
        task = progress.add_task("chaos", total=total)

        def tick(scenario: str, seed: int, failed: int) -> None:
            status = f"[red]{failed} failed[/]" if failed else "[green]all ok[/]"
            progress.update(
                task, advance=1, description=f"{escape(scenario)} seed {seed} ({status})"
            )

        yield tick


@app.command("run")
def run_command(
    ctx: typer.Context,
    scenario: Annotated[
        list[str] | None,
        typer.Option(
            "--scenario",
            "-s",
            metavar="NAME",
            help="Run this scenario (repeatable; default: every installed scenario).",
        ),
    ] = None,
    seeds: Annotated[
        int, typer.Option("--seeds", "-n", min=1, help="Seeds per scenario.")
    ] = DEFAULT_SEEDS,
    seed_start: Annotated[
        int, typer.Option("--seed-start", min=0, help="First seed; seeds are K..K+N-1.")
    ] = 0,
    faults: FaultsOption = None,
    plugin: PluginOption = None,
    as_json: JsonOption = False,
    report: ReportOption = None,
    keep_going: Annotated[
        bool,
        typer.Option(
            "--keep-going/--fail-fast",
            help="Run every seed (default), or stop at the first failing run.",
        ),
    ] = True,
) -> None:
    """Run N seeds of each scenario; exit 1 if any run violates an invariant or misses
    coverage."""
    plugins = _plugins(ctx, plugin)
    with guarded():
        scenarios = _scenarios(scenario, plugins)
        plan = _parse_faults(faults)
    results: list[SimulationResult] = []
    failed = 0
    stopped: str | None = None
    started = time.perf_counter()
    try:
        with _progress(True, len(scenarios) * seeds) as tick:
            for chosen in scenarios:
                for seed in range(seed_start, seed_start + seeds):
                    with guarded():
                        result = run_simulation(chosen, seed, plan, plugins=plugins)
                    results.append(result)
                    failed += not result.ok
                    tick(chosen.name, seed, failed)
                    if failed and not keep_going:
                        stopped = "stopped at the first failing run (--fail-fast)"
                        break
                if stopped:
                    break
    except KeyboardInterrupt:
        # Ctrl-C on a long run still reports (and replays) the runs that finished.
        stopped = "interrupted: the summary covers the runs that finished"
        interrupted = True
    else:
        interrupted = False
    wall = time.perf_counter() - started
    invariants = {s.name: tuple(s.invariants) for s in scenarios}
    summaries = summarize_by_scenario(results, invariants)
    written = None
    if report is not None:
        with guarded():
            written = write_report(results, report, invariants=invariants)
    if as_json:
        print_json(
            {
                "command": _command_line("cblocks chaos run"),
                "ok": failed == 0,
                "config": {
                    "scenarios": [s.name for s in scenarios],
                    "seeds": seeds,
                    "seed_start": seed_start,
                    "faults": None if plan is None else plan.spec(),
                    "plugins": list(plugins),
                    "fail_fast": not keep_going,
                },
                "stopped_early": stopped is not None,
                "interrupted": interrupted,
                "wall_seconds": wall,
                "report": None if written is None else str(written),
                "summary": [s.to_json() for s in summaries],
                "runs": [_run_json(r) for r in results],
            }
        )
    else:
        for table in _summary_tables(summaries):
            console.print(table)
        console.print(
            "[dim]per CPU-s: simulated deliveries per CPU-second; digest: of the first seed's "
            "history (its replay prints the same)[/]"
        )
        _print_failures([r for r in results if not r.ok])
        _print_totals(results, wall, stopped, written)
    if interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    if failed:
        raise typer.Exit(EXIT_FAILED)


def _run_json(result: SimulationResult, *, history: bool = False) -> dict[str, Any]:
    data = dict(result.to_json())
    # A batch's JSON stays small: the history and timeline come with `chaos replay --json`.
    data.pop("timeline", None)
    if not history:
        data.pop("history", None)
    data["history_length"] = len(result.history)
    return data


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _summary_tables(summaries: Sequence[ScenarioSummary]) -> tuple[Table, Table]:
    """Two narrow tables (they fit 80 columns): one row per scenario, one per invariant."""
    scenarios = Table(
        title="chaos runs per scenario", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True
    )
    scenarios.add_column("scenario", no_wrap=True)
    scenarios.add_column("runs", justify="right", no_wrap=True)
    scenarios.add_column("failed", justify="right", no_wrap=True)
    scenarios.add_column("uncovered", min_width=9)
    scenarios.add_column("deliveries", justify="right", no_wrap=True)
    scenarios.add_column("sim s", justify="right", no_wrap=True)
    scenarios.add_column("per CPU-s", justify="right", no_wrap=True)
    scenarios.add_column("digest", no_wrap=True)
    invariants = Table(title="invariants", box=box.SIMPLE_HEAD)
    invariants.add_column("scenario", no_wrap=True)
    invariants.add_column("invariant")
    invariants.add_column("runs", justify="right")
    invariants.add_column("violated in", justify="right")
    for summary in summaries:
        missing = ", ".join(f"{escape(k)} x{v}" for k, v in summary.missing_coverage.items())
        scenarios.add_row(
            escape(summary.scenario),
            str(summary.runs),
            f"[bold red]{summary.failed}[/]" if summary.failed else "[green]0[/]",
            f"[bold red]{missing}[/]" if missing else "[green]-[/]",
            f"{summary.deliveries:,}",
            f"{summary.simulated_seconds:,.0f}",
            _rate(summary.deliveries_per_cpu_second),
            (summary.first_digest or "")[:8],
        )
        names = list(summary.violations) or ["-"]
        for i, name in enumerate(names):
            count = summary.violations.get(name, 0)
            invariants.add_row(
                escape(summary.scenario) if i == 0 else "",
                escape(name),
                str(summary.runs),
                f"[bold red]{count}[/]" if count else "[green]0[/]",
                end_section=i == len(names) - 1,
            )
    return scenarios, invariants


def _value(op: Operation) -> str:
    text = json.dumps(op.value, sort_keys=True)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "..."


def operations_table(operations: Sequence[Operation], title: str | None = None) -> Table:
    """Operations as a table: index, simulated time, process, type, f, value, error."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("#", justify="right")
    table.add_column("time", justify="right")
    table.add_column("process")
    table.add_column("type")
    table.add_column("f")
    table.add_column("value", overflow="fold")
    table.add_column("error", overflow="fold")
    colours = {"ok": "green", "fail": "red", "info": "yellow"}
    for op in operations:
        colour = colours.get(op.type.value)
        kind = f"[{colour}]{op.type.value}[/]" if colour else op.type.value
        table.add_row(
            str(op.index),
            f"{op.time:.3f}",
            escape(op.process),
            kind,
            escape(op.f),
            escape(_value(op)),
            escape(op.error or ""),
        )
    return table


def _print_failure(result: SimulationResult) -> None:
    console.print(
        f"\n[bold red]FAILED[/] [bold]{escape(result.scenario)}[/] seed [bold]{result.seed}[/]"
        f"  faults [cyan]{escape(result.faults or 'none')}[/]  digest {result.digest[:16]}"
    )
    for violation in result.violations:
        console.print(
            f"  [red]violated[/] [bold]{escape(violation.invariant)}[/]: "
            f"{escape(violation.message)}"
        )
        if violation.witness:
            console.print(Padding(operations_table(violation.witness), (0, 0, 0, 4)))
    if result.missing_coverage:
        console.print(
            "  [red]missing coverage[/]: the faults never exercised "
            + ", ".join(escape(m) for m in result.missing_coverage)
        )
    console.print(f"  replay: [bold]{escape(result.replay_command)}[/]", soft_wrap=True)


def _print_failures(failing: Sequence[SimulationResult]) -> None:
    for result in failing[:MAX_FAILURES_IN_FULL]:
        _print_failure(result)
    rest = failing[MAX_FAILURES_IN_FULL:]
    if rest:
        console.print(f"\n{len(rest)} more failing runs:")
        for result in rest:
            console.print(f"  {escape(result.replay_command)}", soft_wrap=True)


def _print_totals(
    results: Sequence[SimulationResult], wall: float, stopped: str | None, written: Path | None
) -> None:
    deliveries = sum(r.deliveries for r in results)
    cpu = sum(r.cpu_seconds for r in results)
    simulated = sum(r.simulated_seconds for r in results)
    failed = sum(1 for r in results if not r.ok)
    console.print(
        f"\n{len(results)} runs in {wall:.1f} s: {simulated:,.0f} simulated s, "
        f"{deliveries:,} deliveries, {_rate(deliveries / cpu if cpu else None)} per CPU-s"
    )
    if written is not None:
        console.print(f"report: {escape(str(written))}")
    if stopped:
        console.print(f"[yellow]{stopped}[/]")
    if failed:
        console.print(f"[bold red]{failed} of {len(results)} runs failed[/]")
    else:
        console.print(f"[bold green]all {len(results)} runs ok[/]")


# --- replay ----------------------------------------------------------------------------


@app.command("replay")
def replay_command(
    ctx: typer.Context,
    seed: Annotated[int, typer.Argument(min=0, help="The seed of the run to replay.")],
    scenario: Annotated[
        str | None,
        typer.Option(
            "--scenario",
            "-s",
            metavar="NAME",
            help="The scenario (needed when more than one is installed).",
        ),
    ] = None,
    faults: FaultsOption = None,
    plugin: PluginOption = None,
    history: Annotated[
        bool, typer.Option("--history", help="Also print the full operation history.")
    ] = False,
    as_json: JsonOption = False,
    report: ReportOption = None,
    shrink: Annotated[
        bool,
        typer.Option(
            "--shrink",
            help="If an invariant is violated, rerun the seed with ever simpler fault plans "
            f"(at most {SHRINK_MAX_RUNS} runs) and print the smallest that still violates it.",
        ),
    ] = False,
) -> None:
    """Rerun exactly one run (same scenario, seed, faults and plugins -> same digest)."""
    plugins = _plugins(ctx, plugin)
    with guarded():
        if scenario is None:
            known = scenario_names(plugins)
            if len(known) != 1:
                fail(f"give --scenario: one of {', '.join(known) or '(none installed)'}")
            scenario = known[0]
        chosen = get_scenario(scenario, plugins)
        plan = _parse_faults(faults)
        result = run_simulation(chosen, seed, plan, plugins=plugins)
    shrunk = None
    if shrink and result.violations:
        with guarded():
            shrunk = _shrink(result, chosen, plugins)
    written = None
    if report is not None:
        with guarded():
            written = write_report(
                [result] if shrunk is None else [result, shrunk],
                report,
                title=f"cblocks chaos replay {seed} --scenario {chosen.name}",
                invariants={chosen.name: tuple(chosen.invariants)},
            )
    if as_json:
        data = _run_json(result, history=history)
        data["report"] = None if written is None else str(written)
        if shrink:
            data["shrunk"] = None if shrunk is None else _run_json(shrunk)
        print_json(data)
    else:
        _print_replay(result, chosen, history)
        if shrink:
            _print_shrunk(result, shrunk)
        if written is not None:
            console.print(f"report: {escape(str(written))}")
    if not result.ok:
        raise typer.Exit(EXIT_FAILED)


def _shrink(
    result: SimulationResult, scenario: Scenario, plugins: Sequence[str]
) -> SimulationResult:
    """The same seed under the smallest fault plan that still violates one of the invariants
    ``result`` violated (coverage is not checked: a smaller plan exercises less)."""
    from collaborative_blocks.simulations.shrink import shrink_plan

    violated = {v.invariant for v in result.violations}

    def run(plan: FaultPlan) -> SimulationResult:
        return run_simulation(scenario, result.seed, plan, plugins=plugins, check_coverage=False)

    def still_fails(plan: FaultPlan) -> bool:
        return any(v.invariant in violated for v in run(plan).violations)

    # On stderr, like the progress bar of `run`: stdout stays the JSON alone with --json.
    with err_console.status("shrinking the fault plan"):
        smallest = shrink_plan(
            FaultPlan.parse(result.faults), still_fails, max_runs=SHRINK_MAX_RUNS
        )
    return run(smallest)


def _print_shrunk(result: SimulationResult, shrunk: SimulationResult | None) -> None:
    if shrunk is None:
        console.print("[yellow]nothing to shrink: no invariant was violated[/]")
        return
    if shrunk.faults == result.faults:
        console.print("\n[bold]shrink[/]: no simpler fault plan violates the same invariant")
        return
    console.print(
        f"\n[bold]shrink[/]: the smallest fault plan found that still fails is "
        f"[cyan]{escape(shrunk.faults)}[/]"
    )
    for violation in shrunk.violations:
        console.print(
            f"  [red]violated[/] [bold]{escape(violation.invariant)}[/]: "
            f"{escape(violation.message)}"
        )
        if violation.witness:
            console.print(Padding(operations_table(violation.witness), (0, 0, 0, 4)))
    console.print(f"  replay: [bold]{escape(shrunk.replay_command)}[/]", soft_wrap=True)


def _print_replay(result: SimulationResult, scenario: Scenario, history: bool) -> None:
    facts = Table(show_header=False, box=None)
    facts.add_column(no_wrap=True)
    facts.add_column(overflow="fold")
    facts.add_row("scenario", escape(result.scenario))
    facts.add_row("seed", str(result.seed))
    facts.add_row("faults", escape(result.faults or "none"))
    facts.add_row("operations", f"{len(result.history):,}")
    facts.add_row("deliveries", f"{result.deliveries:,}")
    facts.add_row(
        "simulated", f"{result.simulated_seconds:,.1f} s (CPU {result.cpu_seconds:.3f} s)"
    )
    phases = ", ".join(f"{escape(k)} until {v:,.1f} s" for k, v in result.phase_ends.items())
    facts.add_row("phases", phases or "-")
    coverage = ", ".join(f"{escape(k)} {v}" for k, v in sorted(result.coverage.items()))
    facts.add_row("coverage", coverage or "-")
    checked = ", ".join(escape(i) for i in scenario.invariants)
    facts.add_row("invariants", checked or "-")
    verdict = "[bold green]ok[/]" if result.ok else "[bold red]FAILED[/]"
    console.print(Panel(facts, title=f"cblocks chaos replay: {verdict}", expand=False))
    # On a line of its own, never cut or wrapped: the digest is the run's identity.
    console.print(f"digest [bold]{result.digest}[/]", soft_wrap=True)
    if history:
        console.print(operations_table(list(result.history), title="history"))
    if result.ok:
        console.print("[green]every invariant held and every required behaviour was covered[/]")
    else:
        _print_failure(result)


# --- list ------------------------------------------------------------------------------


@app.command("list")
def list_command(
    ctx: typer.Context,
    plugin: PluginOption = None,
    as_json: JsonOption = False,
) -> None:
    """The installed scenarios: what each runs, its invariants, default faults, coverage."""
    plugins = _plugins(ctx, plugin)
    with guarded():
        scenarios = _scenarios(None, plugins)
    if as_json:
        print_json(
            [
                {
                    "name": s.name,
                    "description": s.description,
                    "invariants": list(s.invariants),
                    "default_faults": s.default_faults,
                    "required_coverage": list(s.required_coverage),
                }
                for s in scenarios
            ]
        )
        return
    table = Table(
        title="chaos scenarios", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True
    )
    # Names and fault entries stay whole; the description wraps in the width that is left.
    table.add_column("scenario", min_width=20, ratio=1)
    table.add_column("invariants", no_wrap=True)
    table.add_column("default faults", no_wrap=True)
    table.add_column("must cover", no_wrap=True)
    for s in scenarios:
        table.add_row(
            f"[bold]{escape(s.name)}[/]\n[dim]{escape(s.description)}[/]",
            "\n".join(escape(i) for i in s.invariants) or "-",
            escape((s.default_faults or "none").replace(",", "\n")),
            "\n".join(escape(c) for c in s.required_coverage) or "-",
            end_section=True,
        )
    console.print(table)
