"""``cblocks demo``: the main job on the embedded defaults."""

from __future__ import annotations


def demo_command() -> None:
    """Run the demo."""
