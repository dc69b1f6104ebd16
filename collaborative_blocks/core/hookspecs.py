"""Every extension point of Collaborative Blocks, in one module.

A plugin is a module (or object) with functions named like the specs below, marked with
``@collaborative_blocks.hookimpl``. Built-in plugins (``collaborative_blocks.plugins.*``) are
registered exactly like yours. External plugins are found through the entry-point group
``collaborative_blocks`` or named explicitly (``cblocks -p my_module ...``,
``Runtime(plugins=["my_module"])``).

Hooks are synchronous: they construct or register objects, and those objects have the async
methods. Each ``cb_*_factories``-style hook returns a list (possibly empty); the runtime
gathers the lists of every plugin. No hook returns an awaitable. See docs/writing-plugins.md
for one worked example per hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collaborative_blocks.core.extensions import (
        ConflictResolver,
        HealingStrategy,
        Router,
        SecurityPolicy,
        StoreFactory,
        TransportFactory,
    )
    from collaborative_blocks.core.runtime import Runtime
    from collaborative_blocks.simulations.scenarios.base import Scenario
    from collaborative_blocks.simulations.world import Node, World

PROJECT_NAME = "collaborative_blocks"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)

# -- storage ----------------------------------------------------------------------------------


@hookspec
def cb_store_factories() -> Sequence[StoreFactory]:
    """Event stores this plugin provides, each for one or more URL schemes.

    Fires when a runtime (or ``open_store``) resolves a store URL such as
    ``EVENT_STORE_URL``. Return a list of objects with a ``schemes`` tuple (e.g.
    ``("sqlite+aiosqlite",)``) and ``async open(url, *, clock)`` returning an
    :class:`~collaborative_blocks.stores.EventStore`. Two plugins claiming the same scheme is
    an error naming both.
    """
    raise NotImplementedError


# -- messaging --------------------------------------------------------------------------------


@hookspec
def cb_transport_factories() -> Sequence[TransportFactory]:
    """Message transports this plugin provides, each for one or more URL schemes.

    Fires when a broker resolves ``MESSAGE_BROKER_URL``. Return a list of objects with a
    ``schemes`` tuple and ``async open(url, *, runtime)`` returning a
    :class:`~collaborative_blocks.core.messaging.Transport`, whose ``capabilities`` declare the
    delivery guarantees it can give (a broker asking for more fails at start-up).
    """
    raise NotImplementedError


# -- synchronisation --------------------------------------------------------------------------


@hookspec
def cb_conflict_resolvers() -> Sequence[ConflictResolver[Any]]:
    """Conflict resolvers this plugin provides, each with a unique ``name``.

    Fires when a sync engine starts and builds its resolver table
    (:class:`~collaborative_blocks.core.sync.resolvers.ResolverRegistry`); users pick a
    resolver per key pattern by name (``last_write_wins``, ``vector_clock``, ...). Each object
    implements :class:`~collaborative_blocks.core.extensions.ConflictResolver`: ``initial``,
    ``apply`` (fold a write), ``merge`` (two replicas' states), ``value``, ``conflicts`` and
    JSON (de)serialisation of its state. Two plugins providing the same name is an error
    naming both. Check yours with
    :class:`~collaborative_blocks.testing.resolver_conformance.ResolverConformance`.
    """
    raise NotImplementedError


# -- architecture -----------------------------------------------------------------------------


@hookspec
def cb_ai_routers() -> Sequence[Router]:
    """Request routers for the AI orchestration engine, each with a unique ``name``."""
    raise NotImplementedError


@hookspec
def cb_healing_strategies() -> Sequence[HealingStrategy]:
    """Self-healing strategies, each with a unique ``name`` and the anomalies it handles."""
    raise NotImplementedError


@hookspec
def cb_security_policies() -> Sequence[SecurityPolicy]:
    """Zero-trust policies; every request is checked by all of them, in registration order."""
    raise NotImplementedError


# -- chaos simulations ------------------------------------------------------------------------


@hookspec
def cb_chaos_scenarios() -> Sequence[type[Scenario] | Scenario]:
    """Chaos scenarios this plugin adds to ``cblocks chaos`` and ``run_simulation``.

    Fires when the simulator lists or looks up scenarios (``scenario_names``,
    ``get_scenario``, ``cblocks chaos list|run -p MODULE``). Return a list of
    :class:`~collaborative_blocks.simulations.scenarios.Scenario` subclasses (instantiated
    without arguments) or instances, each with a unique ``name``: its nodes, workload,
    invariants (checkers over the recorded history), default fault plan and required
    coverage. A name already taken (by a built-in or another plugin) is an error naming
    both. See the module docstring of ``collaborative_blocks.simulations.scenarios`` for a
    complete example.
    """
    raise NotImplementedError


@hookspec
def cb_chaos_component(kind: str, component: Any, world: World, node: Node | None) -> Any:
    """Replace (usually: wrap) a component a chaos simulation builds; ``None`` keeps it.

    Fires once per component and run, when the simulated world builds it
    (:meth:`~collaborative_blocks.simulations.world.World.component`). ``kind`` says which:

    - ``"store"``: the durable store every node shares (an
      :class:`~collaborative_blocks.stores.EventStore`; ``node`` is ``None``);
    - ``"network"``: the transport every node's broker uses (the in-memory transport:
      ``publish``, ``publish_nowait``, ``subscribe``, ``in_flight``; ``node`` is ``None``);
    - ``"resolvers"``: the :class:`~collaborative_blocks.core.sync.resolvers.ResolverRegistry`
      a sync engine of the scenario uses (from ``World.resolvers``);
    - ``"workflow_engine"``: a
      :class:`~collaborative_blocks.core.workflows.WorkflowCoordinationEngine` the scenario
      started on ``node`` (built again after every restart of the node).

    Return an object that does what the original does (same methods) or ``None``. With
    several plugins, each gets what the previous one returned. A returned object with a
    ``node_crashed(node_name: str)`` method is called on every simulated crash, after the
    node's tasks are gone (to model what the crash does to the component's memory).
    Implementations may take any subset of the arguments. This is how planted bugs reach a
    simulation (``cblocks chaos run -p collaborative_blocks.testing.mutants.forgetful_inbox``):
    a run with a buggy component must fail an invariant, which proves the checkers can fail.
    Only simulations fire it; it never changes a real deployment.
    """
    raise NotImplementedError


# -- notifications ----------------------------------------------------------------------------


@hookspec
def cb_runtime_started(runtime: Runtime) -> None:
    """Fires once a runtime has opened its store; for plugins that keep a reference to it.

    Return nothing. Do no blocking work here: start tasks from the objects you return
    elsewhere instead.
    """
