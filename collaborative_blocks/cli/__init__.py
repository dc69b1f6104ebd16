"""The ``cblocks`` command."""

from __future__ import annotations

from collaborative_blocks.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
