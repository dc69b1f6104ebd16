"""The root ``cblocks`` typer app; sub-commands live in sibling modules."""

from __future__ import annotations

from typing import Annotated

import typer

from collaborative_blocks.cli import bench, chaos, demo, dlq, events, plugins, workflow
from collaborative_blocks.cli._common import CliState, guarded

app = typer.Typer(
    name="cblocks",
    help="Collaborative Blocks: the event log, plugins, the demo, benchmarks.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


@app.callback()
def root(
    ctx: typer.Context,
    plugin: Annotated[
        list[str] | None,
        typer.Option(
            "-p",
            "--plugin",
            metavar="MODULE",
            help="Load an extra plugin module for this command (repeatable).",
        ),
    ] = None,
) -> None:
    """Collaborative Blocks: one append-only event log, and the tools to look at it."""
    state = CliState(plugins=tuple(plugin or ()))
    # Load plugins now so a bad -p fails before any command starts work.
    with guarded():
        state.plugin_manager()
    ctx.obj = state


app.add_typer(events.app, name="events")
app.add_typer(bench.app, name="bench")
app.add_typer(dlq.app, name="dlq")
app.add_typer(workflow.app, name="workflow")
app.add_typer(chaos.app, name="chaos")
app.command("plugins")(plugins.plugins_command)
app.command("demo")(demo.demo_command)
