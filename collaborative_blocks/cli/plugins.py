"""``cblocks plugins``: which plugins are loaded and which hooks each implements."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from collaborative_blocks.cli._common import console, guarded, print_json, state_of
from collaborative_blocks.core.plugins import BUILTIN_PLUGINS, ENTRY_POINT_GROUP


def plugins_command(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """List the loaded plugins (built-in, entry points, -p) and the hooks each implements."""
    state = state_of(ctx)
    with guarded():
        pm = state.plugin_manager()
    distributions = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    rows: list[dict[str, Any]] = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked
            continue
        callers = pm.get_hookcallers(plugin) or []
        dist = distributions.get(id(plugin))
        if name in BUILTIN_PLUGINS:
            source = "built-in"
        elif dist is not None:
            source = f"entry point ({ENTRY_POINT_GROUP}) from {dist.project_name} {dist.version}"
        elif name in state.plugins:
            source = "-p"
        else:
            source = "registered"
        rows.append(
            {
                "name": name,
                "source": source,
                "hooks": sorted(caller.name for caller in callers),
            }
        )
    if as_json:
        print_json(rows)
        return
    table = Table(title="loaded plugins")
    table.add_column("plugin")
    table.add_column("source")
    table.add_column("hooks")
    for row in rows:
        table.add_row(row["name"], row["source"], ", ".join(row["hooks"]) or "-")
    console.print(table)
