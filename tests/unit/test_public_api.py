"""The top-level package re-exports the user's API and little else."""

from __future__ import annotations

import collaborative_blocks
import collaborative_blocks.stores


def test_all_names_exist_and_are_exported() -> None:
    for module in (collaborative_blocks, collaborative_blocks.stores):
        assert sorted(module.__all__) == sorted(set(module.__all__))
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_public_names_are_documented() -> None:
    for name in collaborative_blocks.__all__:
        obj = getattr(collaborative_blocks, name)
        if callable(obj):
            assert obj.__doc__, f"{name} has no docstring"
