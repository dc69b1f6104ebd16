"""The chaos HTML report: one well-formed, self-contained file with a plot per scenario, the
failing runs' witnesses and replay commands, and nothing a scenario name could inject."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

from collaborative_blocks.simulations.report import (
    _intervals,
    render_report,
    summarize_by_scenario,
    write_report,
)
from collaborative_blocks.simulations.results import (
    History,
    OpType,
    Sample,
    SimulationResult,
    Violation,
)

VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "source", "wbr"}


class Page(HTMLParser):
    """Checks that every element is closed in order; collects plots, scripts and text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.plot_ids: list[str] = []
        self.scripts: list[str] = []
        self.pre: list[str] = []
        self.text: list[str] = []
        self.external: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag in ("script", "img", "iframe") and found.get("src"):
            self.external.append(str(found["src"]))
        if tag == "link" and found.get("href"):
            self.external.append(str(found["href"]))
        if tag == "div" and found.get("class") == "plot":
            self.plot_ids.append(str(found.get("id")))
        if tag not in VOID:
            self.stack.append(tag)
        if tag in ("script", "pre"):
            self._in = tag

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "script":
            self.scripts.append(data)
        elif self._in == "pre":
            self.pre.append(data)
        else:
            self.text.append(data)


def figure(script: str) -> tuple[list[dict[str, object]], dict[str, object]]:
    """The data and layout a ``Plotly.newPlot(id, data, layout, config)`` script draws."""
    decoder = json.JSONDecoder()
    start = script.index("Plotly.newPlot(")
    start = script.index(",", start) + 1
    data, end = decoder.raw_decode(script, start + 1)
    layout, _ = decoder.raw_decode(script, script.index(",", end) + 2)
    return data, layout


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    assert page.errors == []
    assert page.stack == []
    return page


def make_result(
    scenario: str, seed: int, *, failing: bool = False, deliveries: int = 100
) -> SimulationResult:
    history = History()
    history.append(0.0, "bank-a", OpType.INVOKE, "transfer", {"from": "a", "amount": 5})
    history.append(0.4, "bank-a", OpType.OK, "transfer", {"from": "a", "amount": 5})
    history.append(1.0, "bank-b", OpType.INVOKE, "transfer", {"from": "b", "amount": 7})
    history.append(2.5, "bank-b", OpType.INFO, "transfer", None, "timeout")
    timeline = tuple(
        Sample(
            time=float(t),
            in_flight=1000 + seed * 10 + t,  # distinctive numbers, found in the plot data
            delivered=t * 3,
            redelivered=t,
            dead_lettered=0,
            dropped=t // 2,
            duplicated=t // 3,
            violations=1 if failing and t >= 6 else 0,
            crashed_nodes=1 if 3 <= t < 5 else 0,
            partitioned=2 <= t < 6,
        )
        for t in range(10)
    )
    violations = (
        (Violation("money conserved", "total 995 != 1000", (history[2], history[3])),)
        if failing
        else ()
    )
    return SimulationResult(
        scenario=scenario,
        seed=seed,
        faults="drop=0.05,partition=4s@2s",
        digest=f"{seed:02d}" * 32,
        history=history,
        violations=violations,
        coverage={"redelivery": 2, "crash": 1},
        missing_coverage=("dead_letter",) if failing else (),
        timeline=timeline,
        deliveries=deliveries + seed,
        simulated_seconds=10.0,
        cpu_seconds=0.01,
        phase_ends={"safety": 6.0, "liveness": 10.0},
    )


def test_report_is_one_well_formed_file_with_plots_per_scenario(tmp_path: Path) -> None:
    results = [make_result("transfers", s, failing=s == 2) for s in range(4)]
    results += [make_result("pipeline", s) for s in range(3)]
    path = write_report(results, tmp_path / "out" / "report.html")
    text = path.read_text(encoding="utf-8")
    page = parse(text)

    # Self-contained: plotly.js is inside, nothing is fetched from a CDN.
    assert page.external == []
    assert any("plotly" in script.lower() and len(script) > 1_000_000 for script in page.scripts)
    # A timeline and a histogram per scenario, each with the script that draws it.
    assert page.plot_ids == ["timeline-0", "deliveries-0", "timeline-1", "deliveries-1"]
    for plot_id in page.plot_ids:
        assert any(f'Plotly.newPlot("{plot_id}"' in script for script in page.scripts)
    draw = {
        plot_id: next(s for s in page.scripts if f'Plotly.newPlot("{plot_id}"' in s)
        for plot_id in page.plot_ids
    }
    # The transfers timeline is the failing seed's (2): in_flight = 1000 + 20 + t.
    assert "1020" in draw["timeline-0"]
    assert "1029" in draw["timeline-0"]
    # The pipeline has no failing run: its first seed's (0) timeline is shown.
    assert "1000" in draw["timeline-1"]
    assert "1010" not in draw["timeline-1"]
    # Partitions and crashes are shaded, the phases' ends marked.
    assert "partition" in draw["timeline-0"]
    assert "crash" in draw["timeline-0"]
    assert "end of safety" in draw["timeline-0"]
    # Eight series; every annotation has a text (plotly.js shows "new text" for one without):
    # four subplot titles, one partition label, one crash label, the ends of two phases.
    data, layout = figure(draw["timeline-0"])
    assert len(data) == 8
    annotations = layout["annotations"]
    assert isinstance(annotations, list)
    assert all(a.get("text") for a in annotations)
    assert len(annotations) == 4 + 2 + 2
    # Deliveries per seed: 100..103 for transfers.
    data, _ = figure(draw["deliveries-0"])
    assert data[0]["x"] == [100, 101, 102, 103]


def test_failing_run_shows_witness_missing_coverage_and_replay_command(tmp_path: Path) -> None:
    failing = make_result("transfers", 7, failing=True)
    results = [make_result("transfers", 6), failing]
    page = parse(write_report(results, tmp_path / "r.html").read_text())
    text = " ".join(page.text)
    assert failing.replay_command in page.pre
    assert "cblocks chaos replay 7 --scenario transfers" in failing.replay_command
    assert "money conserved" in text
    assert "total 995 != 1000" in text
    assert "timeout" in text  # the INFO witness operation's error
    assert "dead_letter" in text
    assert "1 failed" in text
    # The passing seed is not listed as a failing run.
    assert "transfers, seed 7" in text
    assert "transfers, seed 6" not in text


def test_all_ok_report_says_so(tmp_path: Path) -> None:
    page = parse(render_report([make_result("pipeline", 0), make_result("pipeline", 1)]))
    text = " ".join(page.text)
    assert "all ok" in text
    assert "None: every run held every invariant" in text


def test_user_strings_cannot_inject_markup() -> None:
    evil = '</script><script>alert("x")</script><b>'
    result = make_result(evil, 1, failing=True)
    result = SimulationResult(
        scenario=evil,
        seed=1,
        faults=evil,
        digest=result.digest,
        history=result.history,
        violations=(Violation(evil, evil, result.violations[0].witness),),
        timeline=result.timeline,
        phase_ends={evil: 3.0},
    )
    text = render_report([result], title=evil)
    assert evil not in text
    assert "alert" in text  # it is there, escaped
    page = parse(text)
    # Only our scripts: plotly.js and one per plot.
    assert len(page.scripts) == 1 + len(page.plot_ids)
    assert not any('alert("x")' in s and "Plotly.newPlot" not in s for s in page.scripts[1:])


def test_same_results_give_the_same_bytes() -> None:
    results = [make_result("transfers", s, failing=s == 1) for s in range(3)]
    assert render_report(results) == render_report(list(results))


def test_summary_counts_runs_violations_and_coverage() -> None:
    results = [make_result("transfers", s, failing=s in (1, 3)) for s in range(5)]
    results.append(make_result("pipeline", 9))
    summaries = summarize_by_scenario(
        results, {"transfers": ("money conserved", "no double apply")}
    )
    assert [s.scenario for s in summaries] == ["transfers", "pipeline"]
    transfers, pipeline = summaries
    assert transfers.runs == 5
    assert transfers.failed == 2
    assert transfers.failing_seeds == [1, 3]
    assert transfers.violations == {"money conserved": 2, "no double apply": 0}
    assert transfers.missing_coverage == {"dead_letter": 2}
    assert transfers.coverage == {"redelivery": 10, "crash": 5}
    assert transfers.deliveries == 100 * 5 + (0 + 1 + 2 + 3 + 4)
    assert transfers.first_seed == 0
    assert transfers.first_digest == "00" * 32
    assert transfers.deliveries_per_cpu_second is not None
    assert round(transfers.deliveries_per_cpu_second) == round(510 / 0.05)
    assert pipeline.ok
    assert pipeline.violations == {}


def test_intervals_of_consecutive_samples() -> None:
    samples = [make_result("s", 0).timeline[t] for t in range(10)]
    assert _intervals(samples, [s.partitioned for s in samples]) == [(2.0, 6.0)]
    assert _intervals(samples, [s.crashed_nodes > 0 for s in samples]) == [(3.0, 5.0)]
    assert _intervals(samples, [s.time >= 8 for s in samples]) == [(8.0, 9.0)]
    assert _intervals(samples, [False] * 10) == []


def test_invariants_of_installed_scenarios_are_looked_up() -> None:
    # "transfers" is a built-in scenario: every invariant it checks is listed, held or not.
    text = " ".join(parse(render_report([make_result("transfers", 0)])).text)
    for name in ("no_double_apply", "conservation", "no_overdraft", "liveness"):
        assert name in text
    # A scenario that is not installed (a plugin not importable here) still renders.
    text = " ".join(parse(render_report([make_result("not-installed", 0)])).text)
    assert "(none violated)" in text


def test_phases_ending_together_share_one_label() -> None:
    base = make_result("pipeline", 0)
    result = SimulationResult(
        scenario="pipeline",
        seed=0,
        faults=base.faults,
        digest=base.digest,
        history=base.history,
        timeline=base.timeline,
        phase_ends={"safety": 5.0, "liveness": 5.0},
    )
    page = parse(render_report([result]))
    script = next(s for s in page.scripts if 'Plotly.newPlot("timeline-0"' in s)
    _, layout = figure(script)
    annotations = layout["annotations"]
    assert isinstance(annotations, list)
    texts = [a["text"] for a in annotations]
    assert "end of safety and liveness" in texts
    assert not any(t in ("end of safety", "end of liveness") for t in texts)
