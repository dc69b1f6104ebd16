"""Chaos scenarios: the built-ins, the ``cb_chaos_scenarios`` hook, and how to write one.

Built-ins: ``transfers`` (EXACTLY_ONCE money transfers between systems), ``pipeline``
(AT_LEAST_ONCE producer -> stage -> sink), ``replicas`` (the sync engine's replicas converge
after a partition heals), ``orders`` (a workflow-engine saga across inventory, payments and
shipping: all-or-compensated). ``scenario_names()`` lists them with the plugins' ones.

Write your own by subclassing :class:`Scenario` and returning it from the hook:

```python
from collections.abc import Mapping, Sequence
from typing import Any

from collaborative_blocks import hookimpl
from collaborative_blocks.core.messaging import Message, MessageType
from collaborative_blocks.simulations import FaultPlan, OpType, Violation, run_simulation
from collaborative_blocks.simulations.checkers import Checker, FunctionChecker, reads
from collaborative_blocks.simulations.results import History
from collaborative_blocks.simulations.scenarios import Scenario
from collaborative_blocks.simulations.world import Node, Phase, World


class PingScenario(Scenario):
    name = "ping"
    description = "every acknowledged ping is handled at least once"
    default_faults = "drop=0.3"
    invariants = ("pinged",)
    required_coverage = ("redelivery",)
    nodes = ("client", "server")

    async def start_node(self, world: World, node: Node) -> None:
        if node.name == "server":
            async def handle(message: Message) -> None:
                node.state.setdefault("seen", set()).add(message.payload["n"])
                world.scenario_state.setdefault("seen", set()).add(message.payload["n"])

            await node.broker.subscribe("ping", handle, group="server")

    async def workload(self, world: World, phase: Phase) -> None:
        if phase is Phase.SAFETY:
            client = world.node("client")
            for n in range(20):
                message = Message(MessageType.EVENT, "ping", {"n": n}, source="client")

                async def send(message: Message = message) -> str:
                    sent = await client.call(client.broker.publish(message))
                    return sent.id  # operation values are JSON: the id, not the Message

                await world.operation("client", "ping", n, send)

    async def settled(self, world: World) -> bool:
        return world.network.in_flight() == 0

    async def final_reads(self, world: World) -> dict[str, Any]:
        seen = sorted(world.scenario_state.get("seen", ()))
        world.record("checker", OpType.OK, "read", seen)
        return {"seen": seen}

    def checkers(self) -> Sequence[Checker]:
        def pinged(history: History, facts: Mapping[str, Any]) -> list[Violation]:
            seen = set(reads(history)[-1].value)
            return [
                Violation("pinged", f"ping {op.value} was lost", (op,))
                for op in history
                if op.f == "ping" and op.type is OpType.INVOKE and op.value not in seen
            ]

        return [FunctionChecker("pinged", pinged)]


@hookimpl
def cb_chaos_scenarios() -> list[type[Scenario]]:
    return [PingScenario]


result = run_simulation(PingScenario(), seed=1)
assert result.ok, [str(v) for v in result.violations]
assert result.coverage["drop"] > 0
```

Hand a module like that to ``cblocks chaos run -p my_module`` (or ``plugins=[...]``) and
its scenarios are listed and run next to the built-ins.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from collaborative_blocks.errors import PluginError, UnknownScenarioError
from collaborative_blocks.simulations.scenarios.base import Scenario

__all__ = ["BUILTIN_SCENARIOS", "Scenario", "get_scenario", "scenario_names"]

#: name -> "module:Class" of the built-in scenarios (imported when asked for).
BUILTIN_SCENARIOS: dict[str, str] = {
    "transfers": "collaborative_blocks.simulations.scenarios.transfers:TransfersScenario",
    "pipeline": "collaborative_blocks.simulations.scenarios.pipeline:PipelineScenario",
    "replicas": "collaborative_blocks.simulations.scenarios.replicas:ReplicasScenario",
    "orders": "collaborative_blocks.simulations.scenarios.orders:OrdersScenario",
}


def _load_builtin(path: str) -> type[Scenario] | None:
    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        return None
    found: type[Scenario] = getattr(module, class_name)
    return found


def _as_instance(item: Any, plugin: str) -> Scenario:
    if isinstance(item, type) and issubclass(item, Scenario):
        return item()
    if isinstance(item, Scenario):
        return item
    raise PluginError(
        f"plugin {plugin!r}: cb_chaos_scenarios returned {item!r}; return Scenario "
        "subclasses or instances"
    )


# Looking scenarios up builds a plugin manager (entry points included): done once per set of
# plugins, not once per run of a thousand seeds. Scenarios keep per-run state on the world,
# so sharing the instances between runs is safe.
_cache: dict[tuple[str, ...], dict[str, Scenario]] = {}


def _all(plugins: Sequence[str]) -> dict[str, Scenario]:
    key = tuple(plugins)
    found = _cache.get(key)
    if found is None:
        found = _cache[key] = _collect(key)
    return found


def _collect(plugins: Sequence[str]) -> dict[str, Scenario]:
    found: dict[str, Scenario] = {}
    owners: dict[str, str] = {}
    for name, path in BUILTIN_SCENARIOS.items():
        cls = _load_builtin(path)
        if cls is not None:
            found[name] = cls()
            owners[name] = "built-in"
    from collaborative_blocks.core.plugins import make_plugin_manager

    pm = make_plugin_manager(plugins)
    for impl in pm.hook.cb_chaos_scenarios.get_hookimpls():
        items = impl.function()
        if not isinstance(items, list | tuple):
            raise PluginError(f"plugin {impl.plugin_name!r}: cb_chaos_scenarios must return a list")
        for item in items:
            scenario = _as_instance(item, impl.plugin_name)
            if not scenario.name:
                raise PluginError(f"plugin {impl.plugin_name!r}: scenario {item!r} has no name")
            if scenario.name in found:
                raise PluginError(
                    f"chaos scenario {scenario.name!r} is provided by both "
                    f"{owners[scenario.name]!r} and {impl.plugin_name!r}; rename one"
                )
            found[scenario.name] = scenario
            owners[scenario.name] = impl.plugin_name
    return found


def scenario_names(plugins: Sequence[str] = ()) -> list[str]:
    """The built-in scenarios and those the plugins add, in that order."""
    return list(_all(plugins))


def get_scenario(name: str, plugins: Sequence[str] = ()) -> Scenario:
    """The scenario called ``name``; :class:`UnknownScenarioError` lists the known ones."""
    scenarios = _all(plugins)
    found = scenarios.get(name)
    if found is None:
        raise UnknownScenarioError(
            f"no chaos scenario {name!r}; known: {', '.join(scenarios) or 'none'} "
            "(add your own with the cb_chaos_scenarios hook and -p MODULE)"
        )
    return found
