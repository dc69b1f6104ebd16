"""What every ``cblocks`` command shares: the root options, output, and error handling."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import pluggy
import typer
from rich.console import Console

from collaborative_blocks.core.plugins import make_plugin_manager
from collaborative_blocks.errors import CollaborativeBlocksError

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "CliState",
    "console",
    "err_console",
    "fail",
    "guarded",
    "print_json",
    "run_async",
    "state_of",
]

T = TypeVar("T")

#: Bad input or an unreachable service: the message says what to fix.
EXIT_BAD_INPUT = 2
#: The command ran, but what it checks did not hold (a demo invariant, a missed target).
EXIT_FAILED = 1

console = Console()
err_console = Console(stderr=True)


@dataclass
class CliState:
    """Root options, handed to every sub-command through ``ctx.obj``."""

    plugins: tuple[str, ...] = ()
    _pm: pluggy.PluginManager | None = field(default=None, repr=False)

    def plugin_manager(self) -> pluggy.PluginManager:
        # One manager per invocation: no global registry (see core/plugins.py).
        if self._pm is None:
            self._pm = make_plugin_manager(self.plugins)
        return self._pm


def state_of(ctx: typer.Context) -> CliState:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, CliState) else CliState()


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def guarded() -> Iterator[None]:
    """Turn the framework's typed errors into a message and exit code 2, not a traceback."""
    try:
        yield
    except CollaborativeBlocksError as error:
        fail(f"{type(error).__name__}: {error}")


def run_async(factory: Callable[[], Awaitable[T]]) -> T:
    """Run one command's coroutine with the framework's errors turned into exit code 2."""

    async def main() -> T:
        return await factory()

    with guarded():
        try:
            return asyncio.run(main())
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


def print_json(data: Any) -> None:
    # Plain stdout (not rich) so the output is exactly what json.loads reads back.
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()
