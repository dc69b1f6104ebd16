"""History checkers: pure functions of a run's recorded history.

A :class:`Checker` has a ``name`` (the invariant it guards) and ``check(history, facts)``
returning the :class:`~collaborative_blocks.simulations.results.Violation` objects it found,
each with a small witness: the few operations that show the problem. ``facts`` is what the
scenario read from the world at the end of the run (also recorded in the history as final
``read`` operations, so a checker can work from the history alone).

:func:`minimise_witness` shrinks a witness to the operations a predicate still needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from collaborative_blocks.simulations.results import History, Operation, OpType, Violation

__all__ = [
    "Checker",
    "FunctionChecker",
    "minimise_witness",
    "reads",
    "run_checkers",
]


@runtime_checkable
class Checker(Protocol):
    """Judges one invariant over a history."""

    name: str

    def check(self, history: History, facts: Mapping[str, Any]) -> list[Violation]:
        """The violations of this invariant (empty when it holds)."""
        ...


class FunctionChecker:
    """A checker from a function ``(history, facts) -> list[Violation]``."""

    def __init__(
        self, name: str, function: Callable[[History, Mapping[str, Any]], list[Violation]]
    ) -> None:
        self.name = name
        self._function = function

    def check(self, history: History, facts: Mapping[str, Any]) -> list[Violation]:
        return self._function(history, facts)


def reads(history: History, f: str = "read") -> list[Operation]:
    """The OK operations named ``f`` (the scenario's observations), in order."""
    return [op for op in history if op.type is OpType.OK and op.f == f]


def run_checkers(
    checkers: Iterable[Checker], history: History, facts: Mapping[str, Any]
) -> list[Violation]:
    """Every checker's violations, in checker order; a checker that raises is a violation
    of its own invariant (a checker must never hide a run)."""
    found: list[Violation] = []
    for checker in checkers:
        try:
            found.extend(checker.check(history, facts))
        except Exception as error:
            found.append(
                Violation(
                    checker.name,
                    f"the checker itself failed: {type(error).__name__}: {error}",
                )
            )
    return found


def minimise_witness(
    witness: Sequence[Operation], still_shows: Callable[[Sequence[Operation]], bool]
) -> tuple[Operation, ...]:
    """The smallest sub-sequence (greedy, one operation at a time) for which
    ``still_shows`` stays true; ``witness`` itself if it does not show the problem."""
    current = list(witness)
    if not still_shows(current):
        return tuple(current)
    index = 0
    while index < len(current):
        candidate = current[:index] + current[index + 1 :]
        if candidate and still_shows(candidate):
            current = candidate
        else:
            index += 1
    return tuple(current)
