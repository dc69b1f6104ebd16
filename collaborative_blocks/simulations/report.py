"""A self-contained HTML report of chaos runs (``cblocks chaos run --report FILE.html``).

One file that opens offline in any browser: plotly.js is embedded once, every figure is a
``<div>`` plus the script that draws it. The report holds

- a summary table per scenario and invariant (runs, violations, missing coverage,
  deliveries, simulated seconds, deliveries per CPU-second, the first run's digest),
- every failing run: its seed, fault plan, violated invariants with their witness
  operations, the behaviours it never exercised, and the command that replays it,
- per scenario: the fault plan, the timeline of one run over simulated time (the first
  failing run, else the first run: messages in flight, deliveries, redeliveries, dead
  letters, drops and duplicates, violations; partitions and crashes shaded, the end of the
  safety phase marked), a histogram of deliveries per seed, and the coverage counts.

The output is a pure function of the results (no time stamp, fixed element ids), so the same
runs give the same bytes. Every string that comes from a scenario, a plugin or a history is
escaped, in the HTML and inside the figures' JSON.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collaborative_blocks.simulations.results import Operation, Sample, SimulationResult

__all__ = [
    "ScenarioSummary",
    "render_report",
    "summarize_by_scenario",
    "write_report",
]

#: Failing runs shown in full; the rest are listed by seed only (the report stays readable).
MAX_FAILING_RUNS_IN_FULL = 50
#: Longest operation value shown in a witness table before it is cut.
MAX_VALUE_CHARS = 400

_PLOT_HEIGHT = 820


@dataclass
class ScenarioSummary:
    """What a batch of runs of one scenario amounts to.

    ``violations`` maps each invariant to the number of runs that violated it (known
    invariants with none are listed with 0); ``missing_coverage`` maps each required behaviour
    to the number of runs that never exercised it; ``coverage`` sums the exercised behaviours
    over all runs.
    """

    scenario: str
    runs: int = 0
    failed: int = 0
    violations: dict[str, int] = field(default_factory=dict)
    missing_coverage: dict[str, int] = field(default_factory=dict)
    coverage: dict[str, int] = field(default_factory=dict)
    deliveries: int = 0
    simulated_seconds: float = 0.0
    cpu_seconds: float = 0.0
    first_seed: int | None = None
    first_digest: str | None = None
    faults: list[str] = field(default_factory=list)
    failing_seeds: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    @property
    def deliveries_per_cpu_second(self) -> float | None:
        return self.deliveries / self.cpu_seconds if self.cpu_seconds > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "ok": self.ok,
            "runs": self.runs,
            "failed": self.failed,
            "failing_seeds": list(self.failing_seeds),
            "violations": dict(self.violations),
            "missing_coverage": dict(self.missing_coverage),
            "coverage": dict(sorted(self.coverage.items())),
            "deliveries": self.deliveries,
            "simulated_seconds": self.simulated_seconds,
            "cpu_seconds": self.cpu_seconds,
            "deliveries_per_cpu_second": self.deliveries_per_cpu_second,
            "first_seed": self.first_seed,
            "first_digest": self.first_digest,
            "faults": list(self.faults),
        }


def summarize_by_scenario(
    results: Iterable[SimulationResult],
    invariants: Mapping[str, Sequence[str]] | None = None,
) -> list[ScenarioSummary]:
    """One summary per scenario, in the order the scenarios first appear in ``results``.

    ``invariants`` (scenario -> its invariant names) lists invariants that held everywhere
    too; without it only the violated ones appear.
    """
    summaries: dict[str, ScenarioSummary] = {}
    for result in results:
        summary = summaries.get(result.scenario)
        if summary is None:
            summary = ScenarioSummary(result.scenario)
            for name in (invariants or {}).get(result.scenario, ()):
                summary.violations[name] = 0
            summaries[result.scenario] = summary
        summary.runs += 1
        if summary.first_seed is None:
            summary.first_seed, summary.first_digest = result.seed, result.digest
        if not result.ok:
            summary.failed += 1
            summary.failing_seeds.append(result.seed)
        # A run counts once per invariant, however many violations of it the checker found.
        for name in dict.fromkeys(v.invariant for v in result.violations):
            summary.violations[name] = summary.violations.get(name, 0) + 1
        for name in result.missing_coverage:
            summary.missing_coverage[name] = summary.missing_coverage.get(name, 0) + 1
        for name, count in result.coverage.items():
            summary.coverage[name] = summary.coverage.get(name, 0) + count
        summary.deliveries += result.deliveries
        summary.simulated_seconds += result.simulated_seconds
        summary.cpu_seconds += result.cpu_seconds
        if result.faults not in summary.faults:
            summary.faults.append(result.faults)
    return list(summaries.values())


def write_report(
    results: Sequence[SimulationResult],
    path: Path,
    *,
    title: str | None = None,
    invariants: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """Write the HTML report of ``results`` to ``path`` (parents created) and return it.

    ``invariants`` (scenario -> invariant names, e.g. from ``get_scenario(name).invariants``)
    adds the invariants that held in every run to the summary table; without it they are
    looked up from the installed scenarios (with each run's plugins) where possible.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(results, title=title, invariants=invariants), encoding="utf-8")
    return path


def render_report(
    results: Sequence[SimulationResult],
    *,
    title: str | None = None,
    invariants: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """The report as one HTML document (see :func:`write_report`)."""
    import plotly.offline

    title = title or "cblocks chaos report"
    if invariants is None:
        invariants = _installed_invariants(results)
    summaries = summarize_by_scenario(results, invariants)
    failing = [r for r in results if not r.ok]
    body: list[str] = [
        f"<h1>{_e(title)}</h1>",
        _verdict(results, summaries),
        '<h2 id="summary">Summary</h2>',
        _summary_table(summaries),
        '<h2 id="failing">Failing runs</h2>',
        _failing_runs(failing),
    ]
    for number, summary in enumerate(summaries):
        runs = [r for r in results if r.scenario == summary.scenario]
        body.append(_scenario_section(number, summary, runs))
    return _PAGE.format(
        title=_e(title),
        style=_STYLE,
        plotlyjs=plotly.offline.get_plotlyjs(),
        body="\n".join(body),
    )


# --- pieces ------------------------------------------------------------------------------


def _installed_invariants(results: Sequence[SimulationResult]) -> dict[str, tuple[str, ...]]:
    """Each scenario's invariants, for the scenarios that can be found (a result may come
    from a plugin that is not importable here, or be made by hand: those are skipped)."""
    from collaborative_blocks.errors import CollaborativeBlocksError
    from collaborative_blocks.simulations.scenarios import get_scenario

    found: dict[str, tuple[str, ...]] = {}
    for result in results:
        if result.scenario in found:
            continue
        try:
            found[result.scenario] = tuple(get_scenario(result.scenario, result.plugins).invariants)
        except CollaborativeBlocksError:
            found[result.scenario] = ()
    return found


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _verdict(results: Sequence[SimulationResult], summaries: Sequence[ScenarioSummary]) -> str:
    failed = sum(1 for r in results if not r.ok)
    scenarios = ", ".join(_e(s.scenario) for s in summaries) or "none"
    cls = "bad" if failed else "good"
    verdict = f"{failed} failed" if failed else "all ok"
    return (
        f'<p class="verdict {cls}">{len(results)} runs of {len(summaries)} scenario(s) '
        f"({scenarios}): <strong>{verdict}</strong>.</p>"
    )


def _summary_table(summaries: Sequence[ScenarioSummary]) -> str:
    rows = [
        "<table class='summary'><thead><tr><th>scenario</th><th>invariant</th><th>runs</th>"
        "<th>violations</th><th>missing coverage</th><th>deliveries</th>"
        "<th>simulated s</th><th>deliveries / CPU-s</th><th>digest (first seed)</th>"
        "</tr></thead><tbody>"
    ]
    for summary in summaries:
        names = list(summary.violations) or ["(none violated)"]
        missing = (
            ", ".join(f"{_e(k)} &times;{v}" for k, v in summary.missing_coverage.items()) or "-"
        )
        digest = (
            f"<code>{_e((summary.first_digest or '')[:16])}</code> "
            f"<span class='dim'>seed {_e(summary.first_seed)}</span>"
        )
        for i, name in enumerate(names):
            count = summary.violations.get(name, 0)
            cells = [
                f"<td rowspan='{len(names)}'><a href='#scenario-{_e(summary.scenario)}'>"
                f"{_e(summary.scenario)}</a></td>"
                if i == 0
                else "",
                f"<td>{_e(name)}</td>",
                f"<td class='num'>{summary.runs}</td>",
                f"<td class='num {'bad' if count else 'good'}'>{count}</td>",
            ]
            if i == 0:
                span = f" rowspan='{len(names)}'"
                cells += [
                    f"<td{span} class='{'bad' if summary.missing_coverage else ''}'>{missing}</td>",
                    f"<td{span} class='num'>{summary.deliveries:,}</td>",
                    f"<td{span} class='num'>{summary.simulated_seconds:,.1f}</td>",
                    f"<td{span} class='num'>{_rate(summary.deliveries_per_cpu_second)}</td>",
                    f"<td{span}>{digest}</td>",
                ]
            rows.append("<tr>" + "".join(cells) + "</tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _failing_runs(failing: Sequence[SimulationResult]) -> str:
    if not failing:
        return (
            "<p class='good'>None: every run held every invariant and covered every "
            "required behaviour.</p>"
        )
    parts = []
    for result in failing[:MAX_FAILING_RUNS_IN_FULL]:
        parts.append(_failing_run(result))
    rest = failing[MAX_FAILING_RUNS_IN_FULL:]
    if rest:
        listed = ", ".join(f"{_e(r.scenario)} seed {r.seed}" for r in rest)
        parts.append(f"<p>{len(rest)} more failing runs: {listed}.</p>")
    return "\n".join(parts)


def _failing_run(result: SimulationResult) -> str:
    parts = [
        f"<div class='run' id='run-{_e(result.scenario)}-{result.seed}'>",
        f"<h3>{_e(result.scenario)}, seed {result.seed}</h3>",
        "<dl>",
        f"<dt>faults</dt><dd><code>{_e(result.faults or '(none)')}</code></dd>",
        f"<dt>digest</dt><dd><code>{_e(result.digest)}</code></dd>",
        f"<dt>replay</dt><dd><pre class='replay'>{_e(result.replay_command)}</pre></dd>",
        "</dl>",
    ]
    for violation in result.violations:
        parts.append(
            f"<p class='violation'><strong>{_e(violation.invariant)}</strong>: "
            f"{_e(violation.message)}</p>"
        )
        if violation.witness:
            parts.append(_operations_table(violation.witness))
    if result.missing_coverage:
        parts.append(
            "<p class='violation'><strong>missing coverage</strong>: the faults never exercised "
            + ", ".join(_e(m) for m in result.missing_coverage)
            + "</p>"
        )
    parts.append("</div>")
    return "\n".join(parts)


def _operations_table(operations: Iterable[Operation]) -> str:
    rows = [
        "<table class='ops'><thead><tr><th>#</th><th>time</th><th>process</th><th>type</th>"
        "<th>f</th><th>value</th><th>error</th></tr></thead><tbody>"
    ]
    for op in operations:
        value = json.dumps(op.value, sort_keys=True)
        if len(value) > MAX_VALUE_CHARS:
            value = value[:MAX_VALUE_CHARS] + "..."
        rows.append(
            f"<tr class='op-{_e(op.type.value)}'><td class='num'>{op.index}</td>"
            f"<td class='num'>{op.time:.3f}</td><td>{_e(op.process)}</td>"
            f"<td>{_e(op.type.value)}</td><td>{_e(op.f)}</td><td><code>{_e(value)}</code></td>"
            f"<td>{_e(op.error or '')}</td></tr>"
        )
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _scenario_section(
    number: int, summary: ScenarioSummary, runs: Sequence[SimulationResult]
) -> str:
    shown = next((r for r in runs if not r.ok), runs[0])
    why = "the first failing run" if not shown.ok else "the first run"
    parts = [
        f"<section class='scenario' id='scenario-{_e(summary.scenario)}'>",
        f"<h2>Scenario {_e(summary.scenario)}</h2>",
        "<h3>Fault plan</h3>",
    ]
    # One entry per line: a plan is read entry by entry (docs/chaos.md has the grammar).
    parts += [
        f"<pre class='faults'>{_e((spec or 'none').replace(',', chr(10)))}</pre>"
        for spec in summary.faults
    ]
    parts.append(
        f"<h3>Timeline of seed {shown.seed} ({why})</h3>"
        f"<p class='dim'>digest <code>{_e(shown.digest)}</code>; "
        f"replay: <code>{_e(shown.replay_command)}</code></p>"
    )
    if shown.timeline:
        parts.append(_figure_html(f"timeline-{number}", _timeline_figure(shown)))
    else:
        parts.append("<p class='dim'>This run recorded no timeline samples.</p>")
    parts.append("<h3>Deliveries per seed</h3>")
    parts.append(_figure_html(f"deliveries-{number}", _deliveries_figure(summary.scenario, runs)))
    parts.append("<h3>Coverage (summed over all runs)</h3>")
    if summary.coverage:
        rows = "".join(
            f"<tr><td>{_e(k)}</td><td class='num'>{v:,}</td></tr>"
            for k, v in sorted(summary.coverage.items())
        )
        parts.append(
            "<table class='coverage'><thead><tr><th>behaviour</th><th>times exercised</th>"
            f"</tr></thead><tbody>{rows}</tbody></table>"
        )
    else:
        parts.append("<p class='dim'>No behaviour was recorded as exercised.</p>")
    parts.append("</section>")
    return "\n".join(parts)


def _intervals(samples: Sequence[Sample], on: Sequence[bool]) -> list[tuple[float, float]]:
    """Contiguous stretches where ``on`` holds, from the first such sample's time to the time
    of the sample after the stretch (or the last sample)."""
    stretches: list[tuple[float, float]] = []
    start: float | None = None
    for sample, flag in zip(samples, on, strict=True):
        if flag and start is None:
            start = sample.time
        elif not flag and start is not None:
            stretches.append((start, sample.time))
            start = None
    if start is not None:
        stretches.append((start, samples[-1].time))
    return stretches


def _timeline_figure(result: SimulationResult) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    samples = result.timeline
    times = [s.time for s in samples]
    fig = make_subplots(
        rows=4,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.05,
        subplot_titles=(
            "messages in flight",
            "deliveries, redeliveries, dead letters (running totals)",
            "network drops and duplicates (running totals)",
            "violations witnessed so far, crashed nodes",
        ),
    )
    series: list[tuple[int, str, list[float]]] = [
        (1, "in flight", [s.in_flight for s in samples]),
        (2, "delivered", [s.delivered for s in samples]),
        (2, "redelivered", [s.redelivered for s in samples]),
        (2, "dead-lettered", [s.dead_lettered for s in samples]),
        (3, "dropped", [s.dropped for s in samples]),
        (3, "duplicated", [s.duplicated for s in samples]),
        (4, "violations", [s.violations for s in samples]),
        (4, "crashed nodes", [s.crashed_nodes for s in samples]),
    ]
    for row, name, values in series:
        fig.add_trace(
            go.Scatter(x=times, y=values, name=name, mode="lines", line={"shape": "hv"}),
            row=row,
            col=1,
        )
    shades = [
        ("partition", "rgba(255, 160, 0, 0.18)", [s.partitioned for s in samples]),
        ("crash", "rgba(220, 40, 40, 0.14)", [s.crashed_nodes > 0 for s in samples]),
    ]
    for label, color, flags in shades:
        for i, (x0, x1) in enumerate(_intervals(samples, flags)):
            for row in range(1, 5):
                # Labelled once, on the top plot; the others only shaded (plotly draws a
                # "new text" placeholder for an annotation argument without text).
                label_it = i == 0 and row == 1
                fig.add_vrect(
                    x0=x0,
                    x1=x1 if x1 > x0 else x0 + 0.5,
                    fillcolor=color,
                    line_width=0,
                    layer="below",
                    row=row,
                    col=1,
                    **(
                        {"annotation_text": label, "annotation_position": "top left"}
                        if label_it
                        else {}
                    ),
                )
    # Phases that end at the same instant share one line and one label.
    ends: dict[float, list[str]] = {}
    for phase, when in sorted(result.phase_ends.items(), key=lambda item: item[1]):
        ends.setdefault(when, []).append(_e(phase))
    for when, phases in ends.items():
        for row in range(1, 5):
            fig.add_vline(
                x=when,
                line_dash="dash",
                line_color="#555",
                row=row,
                col=1,
                **(
                    {
                        "annotation_text": f"end of {' and '.join(phases)}",
                        "annotation_position": "top right",
                    }
                    if row == 1
                    else {}
                ),
            )
    fig.update_xaxes(title_text="simulated seconds", row=4, col=1)
    fig.update_layout(
        height=_PLOT_HEIGHT,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        legend={"orientation": "h", "y": -0.08},
        template="plotly_white",
    )
    return fig


def _deliveries_figure(scenario: str, runs: Sequence[SimulationResult]) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure(
        go.Histogram(
            x=[r.deliveries for r in runs],
            name=_e(scenario),
            marker={"color": "#4c78a8"},
            hovertemplate="%{x} deliveries: %{y} seed(s)<extra></extra>",
        )
    )
    fig.update_layout(
        height=300,
        margin={"l": 60, "r": 20, "t": 20, "b": 50},
        xaxis_title="simulated deliveries in one run",
        yaxis_title="seeds",
        bargap=0.05,
        template="plotly_white",
    )
    return fig


def _safe_json(value: Any) -> str:
    """JSON that cannot end the ``<script>`` it sits in, whatever strings it holds."""
    from plotly.io.json import to_json_plotly

    text: str = to_json_plotly(value)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _figure_html(div_id: str, fig: Any) -> str:
    figure = fig.to_plotly_json()
    return (
        f"<div class='plot' id='{div_id}'></div>\n<script>Plotly.newPlot("
        f"{json.dumps(div_id)}, {_safe_json(figure.get('data', []))}, "
        f"{_safe_json(figure.get('layout', {}))}, "
        '{"responsive": true, "displaylogo": false});</script>'
    )


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.good { color: #17803d; }
.bad { color: #c0262d; font-weight: 600; }
.dim { color: #777; }
.verdict { font-size: 1.15em; }
pre { background: #f6f6f6; padding: 0.5em; overflow-x: auto; white-space: pre-wrap; }
pre.replay { background: #fff7e6; border-left: 3px solid #e69500; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 0.2em 1em; }
dt { font-weight: 600; }
dd { margin: 0; }
dd pre { margin: 0; }
.run { border: 1px solid #e5c4c4; border-radius: 4px; padding: 0 1em 0.5em; margin: 1em 0; }
.violation { color: #c0262d; }
table.ops td { font-family: ui-monospace, monospace; font-size: 0.9em; }
tr.op-fail td, tr.op-info td { background: #fff1f1; }
section.scenario { border-top: 2px solid #ddd; margin-top: 2em; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{style}</style>
<script type="text/javascript">{plotlyjs}</script>
</head>
<body>
{body}
</body>
</html>
"""
