"""The root ``cblocks`` typer app; sub-commands live in sibling modules."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="cblocks",
    help="Collaborative Blocks: event log, plugins, benchmarks.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
