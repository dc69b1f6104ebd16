"""``cblocks bench``: benchmarks measured against baselines in the same run."""

from __future__ import annotations

import typer

app = typer.Typer(help="Benchmarks: ours vs baselines, measured interleaved in one run.")
