"""``cblocks chaos run|replay|list`` through typer's CliRunner.

The first tests replace the simulator with a fake (results chosen per seed, so exit codes,
tables and JSON are checked against known answers); the last ones run the real simulator on a
tiny scenario from a test plugin and on the built-in scenarios.
"""

from __future__ import annotations

import json
import shlex
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from collaborative_blocks import hookimpl
from collaborative_blocks.cli import app
from collaborative_blocks.cli import chaos as chaos_cli
from collaborative_blocks.core.messaging import Message, MessageType
from collaborative_blocks.errors import UnknownScenarioError
from collaborative_blocks.simulations import FaultPlan, scenario_names
from collaborative_blocks.simulations.checkers import Checker, FunctionChecker, reads
from collaborative_blocks.simulations.results import (
    History,
    OpType,
    Sample,
    SimulationResult,
    Violation,
)
from collaborative_blocks.simulations.scenarios import Scenario
from collaborative_blocks.simulations.world import Node, Phase, World

runner = CliRunner()


@dataclass(frozen=True)
class FakeScenario:
    name: str
    description: str
    default_faults: str
    invariants: tuple[str, ...]
    required_coverage: tuple[str, ...]


FAKES = {
    "steady": FakeScenario(
        "steady", "never fails", "drop=0.1", ("all delivered",), ("redelivery",)
    ),
    "flaky": FakeScenario(
        "flaky",
        "fails on seeds 1 mod 3",
        "duplicate=0.2",
        ("money conserved", "no double apply"),
        ("deduplication",),
    ),
}


@dataclass
class Calls:
    runs: list[tuple[str, int, str | None, tuple[str, ...]]]


def fake_result(
    scenario: str, seed: int, faults: FaultPlan | None, plugins: Sequence[str]
) -> SimulationResult:
    spec = faults.spec() if faults is not None else FAKES[scenario].default_faults
    history = History()
    history.append(0.0, "bank-a", OpType.INVOKE, "transfer", {"amount": seed})
    history.append(0.5, "bank-a", OpType.OK, "transfer", {"amount": seed})
    history.append(1.0, "bank-b", OpType.INVOKE, "transfer", {"amount": 2 * seed})
    history.append(1.5, "bank-b", OpType.INFO, "transfer", None, "timeout")
    failing = scenario == "flaky" and seed % 3 == 1
    violations = (
        (Violation("money conserved", f"total {1000 - seed} != 1000", (history[2], history[3])),)
        if failing
        else ()
    )
    timeline = tuple(
        Sample(float(t), t % 3, t * 2, t // 2, 0, t // 4, 0, 0, 0, t > 2) for t in range(5)
    )
    # A digest that depends on every input, like the real one.
    digest = f"{scenario}:{seed}:{spec}:{','.join(plugins)}".encode().hex()[:64].ljust(64, "0")
    return SimulationResult(
        scenario=scenario,
        seed=seed,
        faults=spec,
        digest=digest,
        history=history,
        violations=violations,
        coverage={"redelivery": 1},
        missing_coverage=(),
        timeline=timeline,
        deliveries=100 + seed,
        simulated_seconds=5.0,
        cpu_seconds=0.002,
        phase_ends={"safety": 3.0, "liveness": 5.0},
        plugins=tuple(plugins),
    )


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    recorded = Calls([])

    def run_simulation(
        scenario: FakeScenario | str,
        seed: int,
        faults: FaultPlan | str | None = None,
        *,
        plugins: Sequence[str] = (),
        check_coverage: bool = True,
    ) -> SimulationResult:
        name = scenario if isinstance(scenario, str) else scenario.name
        plan = FaultPlan.parse(faults) if isinstance(faults, str) else faults
        recorded.runs.append((name, seed, None if plan is None else plan.spec(), tuple(plugins)))
        return fake_result(name, seed, plan, plugins)

    def scenario_names(plugins: Sequence[str] = ()) -> list[str]:
        return list(FAKES)

    def get_scenario(name: str, plugins: Sequence[str] = ()) -> FakeScenario:
        if name not in FAKES:
            raise UnknownScenarioError(
                f"no chaos scenario {name!r}; known: {', '.join(FAKES)} "
                "(cblocks chaos list shows them)"
            )
        return FAKES[name]

    monkeypatch.setattr(chaos_cli, "run_simulation", run_simulation)
    monkeypatch.setattr(chaos_cli, "scenario_names", scenario_names)
    monkeypatch.setattr(chaos_cli, "get_scenario", get_scenario)
    return recorded


def cblocks(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def test_all_ok_run_exits_0_with_a_summary(calls: Calls) -> None:
    code, out, _ = cblocks("chaos", "run", "--scenario", "steady", "--seeds", "4")
    assert code == 0, out
    assert [(name, seed) for name, seed, _, _ in calls.runs] == [("steady", s) for s in range(4)]
    assert "steady" in out
    assert "all delivered" in out
    assert "all 4 runs ok" in out
    assert "FAILED" not in out
    # Deliveries summed: 100+101+102+103.
    assert "406" in out


def test_every_installed_scenario_by_default_and_seed_start(calls: Calls) -> None:
    code, _, _ = cblocks("chaos", "run", "--seeds", "2", "--seed-start", "10")
    assert code == 1  # flaky fails on seed 10 (10 mod 3 == 1)
    assert [(name, seed) for name, seed, _, _ in calls.runs] == [
        ("steady", 10),
        ("steady", 11),
        ("flaky", 10),
        ("flaky", 11),
    ]


def test_a_violation_exits_1_and_prints_seed_witness_and_replay(calls: Calls) -> None:
    code, out, _ = cblocks("chaos", "run", "--scenario", "flaky", "--seeds", "5")
    assert code == 1
    assert "2 of 5 runs failed" in out
    for seed in (1, 4):
        failing = fake_result("flaky", seed, None, ())
        assert f"flaky seed {seed}" in out
        assert failing.replay_command in out
        assert f"total {1000 - seed} != 1000" in out
    assert "money conserved" in out
    assert "timeout" in out  # the witness's INFO operation
    assert "flaky seed 2 " not in out


def test_fail_fast_stops_at_the_first_failing_run(calls: Calls) -> None:
    code, out, _ = cblocks("chaos", "run", "-s", "flaky", "--seeds", "9", "--fail-fast")
    assert code == 1
    assert [seed for _, seed, _, _ in calls.runs] == [0, 1]
    assert "--fail-fast" in out


def test_ctrl_c_reports_the_finished_runs_and_exits_130(
    calls: Calls, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner = vars(chaos_cli)["run_simulation"]  # the fake the calls fixture installed

    def interrupted_at_seed_3(scenario: Any, seed: int, *args: Any, **kwargs: Any) -> Any:
        if seed == 3:
            raise KeyboardInterrupt
        return inner(scenario, seed, *args, **kwargs)

    monkeypatch.setattr(chaos_cli, "run_simulation", interrupted_at_seed_3)
    code, out, _ = cblocks("chaos", "run", "-s", "flaky", "--seeds", "10")
    assert code == 130
    assert "interrupted" in out
    assert "1 of 3 runs failed" in out
    assert "cblocks chaos replay 1 --scenario flaky" in out
    code, out, _ = cblocks("chaos", "run", "-s", "flaky", "--seeds", "10", "--json")
    assert code == 130
    data = json.loads(out)
    assert data["interrupted"] is True
    assert [r["seed"] for r in data["runs"]] == [0, 1, 2]


def test_json_is_one_document_with_runs_and_summary(calls: Calls) -> None:
    code, out, err = cblocks("chaos", "run", "--seeds", "3", "--faults", "drop=0.2", "--json")
    assert code == 1
    data = json.loads(out)
    assert set(data) >= {"command", "ok", "config", "summary", "runs", "report"}
    assert data["ok"] is False
    assert data["config"]["faults"] == FaultPlan.parse("drop=0.2").spec()
    assert data["config"]["scenarios"] == ["steady", "flaky"]
    assert [(r["scenario"], r["seed"], r["ok"]) for r in data["runs"]] == [
        ("steady", 0, True),
        ("steady", 1, True),
        ("steady", 2, True),
        ("flaky", 0, True),
        ("flaky", 1, False),
        ("flaky", 2, True),
    ]
    failing = data["runs"][4]
    assert failing["violations"][0]["invariant"] == "money conserved"
    assert [w["index"] for w in failing["violations"][0]["witness"]] == [2, 3]
    assert failing["replay_command"].startswith("cblocks chaos replay 1 --scenario flaky")
    assert failing["history_length"] == 4
    assert "history" not in failing
    summary = {s["scenario"]: s for s in data["summary"]}
    assert summary["flaky"]["violations"] == {"money conserved": 1, "no double apply": 0}
    assert summary["flaky"]["failing_seeds"] == [1]
    assert summary["steady"]["deliveries"] == 303
    assert summary["steady"]["first_digest"] == data["runs"][0]["digest"]
    assert "{" not in err  # the progress bar went to stderr, the JSON alone to stdout


def test_report_is_written(calls: Calls, tmp_path: Path) -> None:
    path = tmp_path / "chaos.html"
    code, out, _ = cblocks("chaos", "run", "--seeds", "2", "--report", str(path))
    assert code == 1
    text = path.read_text()
    assert "Plotly.newPlot" in text
    assert fake_result("flaky", 1, None, ()).replay_command.replace("'", "&#x27;") in text
    assert f"report: {path}" in out.replace("\n", "")


def test_unknown_scenario_exits_2_listing_the_known_ones(calls: Calls) -> None:
    code, _, err = cblocks("chaos", "run", "--scenario", "nope")
    assert code == 2
    assert "UnknownScenarioError" in err
    assert "steady, flaky" in err
    assert calls.runs == []
    code, _, err = cblocks("chaos", "replay", "3", "--scenario", "nope")
    assert code == 2
    assert "steady, flaky" in err


def test_bad_faults_exit_2_with_the_fault_plan_error(calls: Calls) -> None:
    code, _, err = cblocks("chaos", "run", "--faults", "drop=lots")
    assert code == 2
    assert "FaultPlanError" in err
    assert "drop" in err
    assert calls.runs == []
    code, _, err = cblocks("chaos", "replay", "1", "-s", "steady", "--faults", "explode=1")
    assert code == 2
    assert "FaultPlanError" in err


def test_bad_numbers_are_usage_errors(calls: Calls) -> None:
    assert cblocks("chaos", "run", "--seeds", "0")[0] == 2
    assert cblocks("chaos", "replay", "-1", "-s", "steady")[0] == 2
    assert calls.runs == []


def test_replay_prints_the_same_digest_as_run(calls: Calls) -> None:
    code, out, _ = cblocks("chaos", "run", "-s", "flaky", "--seeds", "2", "--json")
    digest = json.loads(out)["runs"][1]["digest"]
    code, out, _ = cblocks("chaos", "replay", "1", "--scenario", "flaky")
    assert code == 1
    assert digest in out
    assert "money conserved" in out
    assert "cblocks chaos replay 1 --scenario flaky" in out
    code, out, _ = cblocks("chaos", "replay", "2", "--scenario", "flaky")
    assert code == 0
    assert "every invariant held" in out


def test_replay_history_table_and_json(calls: Calls) -> None:
    code, out, _ = cblocks("chaos", "replay", "4", "-s", "flaky", "--history")
    assert code == 1
    assert "history" in out
    assert out.count("transfer") >= 4
    code, out, _ = cblocks("chaos", "replay", "4", "-s", "flaky", "--history", "--json")
    data = json.loads(out)
    assert [op["type"] for op in data["history"]] == ["invoke", "ok", "invoke", "info"]
    assert data["seed"] == 4
    code, out, _ = cblocks("chaos", "replay", "4", "-s", "flaky", "--json")
    assert "history" not in json.loads(out)


def test_replay_needs_a_scenario_when_several_are_installed(calls: Calls) -> None:
    code, _, err = cblocks("chaos", "replay", "1")
    assert code == 2
    assert "--scenario" in err
    assert "steady, flaky" in err


def test_plugins_from_root_and_command_reach_the_runner(
    calls: Calls, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two importable modules without hooks stand in for plugin modules.
    code, out, err = cblocks(
        "-p", "json", "chaos", "run", "-s", "steady", "--seeds", "1", "-p", "shlex", "-p", "json"
    )
    assert code == 0, err
    assert calls.runs[0][3] == ("json", "shlex")
    code, out, _ = cblocks("chaos", "replay", "0", "-s", "flaky", "-p", "json", "--json")
    assert json.loads(out)["replay_command"].endswith("-p json")


def test_list_table_and_json(calls: Calls) -> None:
    code, out, _ = cblocks("chaos", "list")
    assert code == 0
    for text in ("steady", "flaky", "never fails", "no double apply", "duplicate=0.2"):
        assert text in out
    code, out, _ = cblocks("chaos", "list", "--json")
    assert json.loads(out) == [
        {
            "name": "steady",
            "description": "never fails",
            "invariants": ["all delivered"],
            "default_faults": "drop=0.1",
            "required_coverage": ["redelivery"],
        },
        {
            "name": "flaky",
            "description": "fails on seeds 1 mod 3",
            "invariants": ["money conserved", "no double apply"],
            "default_faults": "duplicate=0.2",
            "required_coverage": ["deduplication"],
        },
    ]


def test_help_lists_the_chaos_commands() -> None:
    code, out, _ = cblocks("chaos", "--help")
    assert code == 0
    for name in ("run", "replay", "list"):
        assert name in out


# --- the real simulator ----------------------------------------------------------------

PLUGIN = "cb_chaos_cli_test_plugin"


class PingOnceScenario(Scenario):
    """A planted bug: an AT_LEAST_ONCE handler without deduplication, checked for exactly-once
    effects. A seed whose faults duplicate a delivery fails; the others pass."""

    name = "ping-once"
    description = "every ping is handled exactly once (it is not: nothing deduplicates)"
    default_faults = "duplicate=0.05"
    invariants = ("handled_once",)
    nodes = ("client", "server")
    safety_seconds = 5.0
    liveness_seconds = 10.0

    async def setup(self, world: World) -> None:
        world.scenario_state["handled"] = {}

    async def start_node(self, world: World, node: Node) -> None:
        if node.name == "server":

            async def handle(message: Message) -> None:
                handled = world.scenario_state["handled"]
                assert isinstance(message.payload, dict)
                n = message.payload["n"]
                handled[n] = handled.get(n, 0) + 1

            await node.broker.subscribe("ping", handle, group="server")

    async def workload(self, world: World, phase: Phase) -> None:
        if phase is not Phase.SAFETY:
            return
        client = world.node("client")
        for n in range(8):
            message = Message(MessageType.EVENT, "ping", {"n": n}, source="client")

            async def publish(m: Message = message) -> None:
                await client.call(client.broker.publish(m))

            await world.operation("client", "ping", n, publish)

    async def settled(self, world: World) -> bool:
        return world.network.in_flight() == 0

    async def final_reads(self, world: World) -> dict[str, Any]:
        handled = {str(n): c for n, c in sorted(world.scenario_state["handled"].items())}
        world.record("server", OpType.OK, "read", handled)
        return {"handled": handled}

    def checkers(self) -> Sequence[Checker]:
        def handled_once(history: History, facts: Mapping[str, Any]) -> list[Violation]:
            final = reads(history)[-1]
            assert isinstance(final.value, dict)
            found = []
            for op in history:
                if op.f == "ping" and op.type is OpType.INVOKE:
                    count = final.value.get(str(op.value), 0)
                    if count != 1:
                        found.append(
                            Violation(
                                "handled_once",
                                f"ping {op.value} handled {count} times",
                                (op, final),
                            )
                        )
            return found

        return [FunctionChecker("handled_once", handled_once)]


@hookimpl
def cb_chaos_scenarios() -> list[type[Scenario]]:
    return [PingOnceScenario]


@pytest.fixture
def plugin_module(monkeypatch: pytest.MonkeyPatch) -> str:
    module = types.ModuleType(PLUGIN)
    module.cb_chaos_scenarios = cb_chaos_scenarios  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, PLUGIN, module)
    return PLUGIN


def test_a_plugin_scenario_fails_and_its_replay_command_reproduces_it(plugin_module: str) -> None:
    code, out, _ = cblocks("chaos", "run", "-p", plugin_module, "-s", "ping-once", "--json")
    assert code == 1
    runs = json.loads(out)["runs"]
    assert len(runs) == chaos_cli.DEFAULT_SEEDS
    failing = [r for r in runs if not r["ok"]]
    passing = [r for r in runs if r["ok"]]
    assert failing, "duplicate=0.05 never duplicated a ping in 20 seeds"
    assert passing, "every seed duplicated a ping: the test no longer tells runs apart"
    first = failing[0]
    assert first["violations"][0]["invariant"] == "handled_once"
    assert first["replay_command"].endswith(f"-p {plugin_module}")
    # The printed command, run as printed, gives the same digest and the same verdict.
    argv = shlex.split(first["replay_command"])
    assert argv[0] == "cblocks"
    code, out, _ = cblocks(*argv[1:])
    assert code == 1
    assert first["digest"] in out
    assert "handled_once" in out
    code, out, _ = cblocks(*argv[1:], "--json", "--history")
    replayed = json.loads(out)
    assert replayed["digest"] == first["digest"]
    assert len(replayed["history"]) == first["history_length"]
    code, out, _ = cblocks(
        "chaos", "replay", str(passing[0]["seed"]), "-s", "ping-once", "-p", plugin_module
    )
    assert code == 0
    assert passing[0]["digest"] in out


def test_list_shows_a_plugin_scenario_next_to_the_built_ins(plugin_module: str) -> None:
    code, out, _ = cblocks("chaos", "list", "-p", plugin_module, "--json")
    assert code == 0
    names = [s["name"] for s in json.loads(out)]
    assert "ping-once" in names
    assert {"transfers", "pipeline", "replicas"} <= set(names)
    code, out, _ = cblocks("chaos", "list", "--json")
    assert "ping-once" not in [s["name"] for s in json.loads(out)]


def test_built_in_scenarios_run_green_and_replay_to_the_same_digest(tmp_path: Path) -> None:
    report = tmp_path / "chaos.html"
    code, out, err = cblocks("chaos", "run", "--seeds", "1", "--json", "--report", str(report))
    assert code == 0, err
    data = json.loads(out)
    assert data["ok"] is True
    # Every installed scenario, one seed each, in the registry's order.
    installed = scenario_names()
    assert {"transfers", "pipeline", "replicas", "orders"} <= set(installed)
    assert [r["scenario"] for r in data["runs"]] == installed
    assert all(r["deliveries"] > 0 for r in data["runs"])
    assert report.read_text().count("Plotly.newPlot") == 2 * len(installed)
    transfers = data["runs"][0]
    code, out, _ = cblocks("chaos", "replay", "0", "--scenario", "transfers")
    assert code == 0
    assert transfers["digest"] in out


def test_replay_shrink_finds_a_smaller_plan_that_still_fails(plugin_module: str) -> None:
    faults = "duplicate=0.05,drop=0.1,reorder=0.2,delay=0.01-0.3,crash=0.01"
    args = ["chaos", "replay", "0", "-s", "ping-once", "-p", plugin_module, "--faults", faults]
    code, out, _ = cblocks(*args, "--shrink", "--json")
    assert code == 1
    data = json.loads(out)
    assert data["violations"]
    shrunk = data["shrunk"]
    assert shrunk is not None
    assert {v["invariant"] for v in shrunk["violations"]} == {"handled_once"}
    # Simpler: fewer faults than the plan it started from (the duplicates are the bug).
    assert len(shrunk["faults"].split(",")) < len(faults.split(","))
    assert "duplicate" in shrunk["faults"]
    # Its replay command reproduces it.
    code, out, _ = cblocks(*shlex.split(shrunk["replay_command"])[1:])
    assert code == 1
    assert shrunk["digest"] in out
    # The table output names the smaller plan.
    code, out, _ = cblocks(*args, "--shrink")
    assert f"still fails is {shrunk['faults']}" in out


def test_replay_shrink_of_a_passing_run_says_there_is_nothing_to_shrink() -> None:
    code, out, _ = cblocks("chaos", "replay", "0", "-s", "transfers", "--shrink")
    assert code == 0
    assert "nothing to shrink" in out
