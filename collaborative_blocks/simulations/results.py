"""What a simulated run produces: its history of operations, violations, coverage and timeline.

A :class:`History` is the Jepsen-style record of every client operation: an ``INVOKE`` when a
simulated client starts it, then ``OK`` (it happened), ``FAIL`` (it certainly did not) or
``INFO`` (the outcome is unknown: a timeout, a crash). Its :meth:`History.digest` is the run's
identity: the same (scenario, seed, fault plan, plugins) give the same digest, byte for byte.

A :class:`SimulationResult` bundles the history with what the checkers found
(:class:`Violation`, each with the few operations that show it), which behaviours the faults
exercised (coverage), and a :class:`Sample` per simulated second for the report's plots.
"""

from __future__ import annotations

import enum
import hashlib
import json
import shlex
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from collaborative_blocks.core.messaging.envelope import JSONValue
from collaborative_blocks.errors import SimulationError

__all__ = [
    "History",
    "OpType",
    "Operation",
    "Sample",
    "SimulationResult",
    "Violation",
]


class OpType(enum.StrEnum):
    """How an operation's record ends (``INVOKE`` starts it)."""

    INVOKE = "invoke"
    OK = "ok"
    FAIL = "fail"
    #: The outcome is unknown (Jepsen's ``:info``): it may or may not have taken effect.
    INFO = "info"


def _canonical(value: Any) -> str:
    # sort_keys + compact separators: the same value always gives the same bytes; floats are
    # written with repr (json does), so they round-trip exactly.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True, slots=True)
class Operation:
    """One line of a history.

    ``index``: position in the history; ``time``: simulated seconds since the run started;
    ``process``: the simulated system or client that performed it; ``f``: the operation name
    (``"transfer"``, ``"publish"``, ``"write"``, ...); ``value``: its argument or result.
    """

    index: int
    time: float
    process: str
    type: OpType
    f: str
    value: JSONValue = None
    error: str | None = None

    def to_json(self) -> dict[str, JSONValue]:
        return {
            "index": self.index,
            "time": self.time,
            "process": self.process,
            "type": self.type.value,
            "f": self.f,
            "value": self.value,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Operation:
        return cls(
            index=int(data["index"]),
            time=float(data["time"]),
            process=str(data["process"]),
            type=OpType(data["type"]),
            f=str(data["f"]),
            value=data.get("value"),
            error=data.get("error"),
        )

    def __str__(self) -> str:
        error = f" ({self.error})" if self.error else ""
        return (
            f"#{self.index} t={self.time:.3f} {self.process} {self.type.value} {self.f} "
            f"{_canonical(self.value)}{error}"
        )


class History:
    """The ordered operations of one run."""

    __slots__ = ("_ops",)

    def __init__(self, operations: Iterable[Operation] = ()) -> None:
        self._ops: list[Operation] = list(operations)

    def append(
        self,
        time: float,
        process: str,
        type: OpType,
        f: str,
        value: JSONValue = None,
        error: str | None = None,
    ) -> Operation:
        """Record an operation (its index is the next one) and return it."""
        op = Operation(len(self._ops), time, process, type, f, value, error)
        self._ops.append(op)
        return op

    def __iter__(self) -> Iterator[Operation]:
        return iter(self._ops)

    def __len__(self) -> int:
        return len(self._ops)

    @overload
    def __getitem__(self, index: int) -> Operation: ...

    @overload
    def __getitem__(self, index: slice) -> list[Operation]: ...

    def __getitem__(self, index: int | slice) -> Operation | list[Operation]:
        return self._ops[index]

    def invocations(self) -> list[Operation]:
        """The ``INVOKE`` operations, in order."""
        return [op for op in self._ops if op.type is OpType.INVOKE]

    def completions(self) -> dict[int, Operation]:
        """For each invocation's index, the operation that completed it (same process and f,
        the next non-INVOKE one of that process); invocations still open are absent."""
        open_ops: dict[tuple[str, str], list[int]] = {}
        done: dict[int, Operation] = {}
        for op in self._ops:
            key = (op.process, op.f)
            if op.type is OpType.INVOKE:
                open_ops.setdefault(key, []).append(op.index)
            else:
                waiting = open_ops.get(key)
                if waiting:
                    done[waiting.pop(0)] = op
        return done

    def lines(self) -> Iterator[str]:
        """The canonical JSON lines the digest is computed from."""
        for op in self._ops:
            try:
                yield _canonical(op.to_json())
            except (TypeError, ValueError) as error:
                raise SimulationError(
                    f"operation #{op.index} ({op.process} {op.type.value} {op.f}) holds a value "
                    f"that is not JSON ({error}); record dicts, lists, str, numbers, bools or "
                    "None (e.g. a message's payload or id, not the Message)"
                ) from None

    def digest(self) -> str:
        """sha256 (hex) of the canonical JSON lines: the run's identity."""
        sha = hashlib.sha256()
        for line in self.lines():
            sha.update(line.encode())
            sha.update(b"\n")
        return sha.hexdigest()

    def to_json(self) -> list[dict[str, JSONValue]]:
        return [op.to_json() for op in self._ops]

    @classmethod
    def from_json(cls, data: Iterable[Mapping[str, Any]]) -> History:
        return cls(Operation.from_json(item) for item in data)


@dataclass(frozen=True, slots=True)
class Violation:
    """An invariant that did not hold, with the few operations that show it."""

    invariant: str
    message: str
    witness: tuple[Operation, ...] = ()

    def to_json(self) -> dict[str, JSONValue]:
        return {
            "invariant": self.invariant,
            "message": self.message,
            "witness": [op.to_json() for op in self.witness],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Violation:
        return cls(
            str(data["invariant"]),
            str(data["message"]),
            tuple(Operation.from_json(w) for w in data.get("witness", ())),
        )

    def __str__(self) -> str:
        lines = [f"{self.invariant}: {self.message}"]
        lines.extend(f"    {op}" for op in self.witness)
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Sample:
    """The world's state at one simulated instant (one per simulated second by default)."""

    time: float
    in_flight: int
    delivered: int
    redelivered: int
    dead_lettered: int
    dropped: int
    duplicated: int
    violations: int
    crashed_nodes: int
    partitioned: bool

    def to_json(self) -> dict[str, JSONValue]:
        return {
            "time": self.time,
            "in_flight": self.in_flight,
            "delivered": self.delivered,
            "redelivered": self.redelivered,
            "dead_lettered": self.dead_lettered,
            "dropped": self.dropped,
            "duplicated": self.duplicated,
            "violations": self.violations,
            "crashed_nodes": self.crashed_nodes,
            "partitioned": self.partitioned,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Sample:
        return cls(
            time=float(data["time"]),
            in_flight=int(data["in_flight"]),
            delivered=int(data["delivered"]),
            redelivered=int(data["redelivered"]),
            dead_lettered=int(data["dead_lettered"]),
            dropped=int(data["dropped"]),
            duplicated=int(data["duplicated"]),
            violations=int(data["violations"]),
            crashed_nodes=int(data["crashed_nodes"]),
            partitioned=bool(data["partitioned"]),
        )


@dataclass(frozen=True, slots=True)
class SimulationResult:
    """Everything one run produced; ``ok`` when no invariant was violated and every
    behaviour the scenario requires was exercised."""

    scenario: str
    seed: int
    faults: str
    digest: str
    history: History
    violations: tuple[Violation, ...] = ()
    coverage: Mapping[str, int] = field(default_factory=dict)
    missing_coverage: tuple[str, ...] = ()
    timeline: tuple[Sample, ...] = ()
    deliveries: int = 0
    simulated_seconds: float = 0.0
    cpu_seconds: float = 0.0
    phase_ends: Mapping[str, float] = field(default_factory=dict)
    plugins: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.violations and not self.missing_coverage

    @property
    def replay_command(self) -> str:
        """The shell command that replays this run exactly."""
        parts = [
            "cblocks",
            "chaos",
            "replay",
            str(self.seed),
            "--scenario",
            self.scenario,
            "--faults",
            self.faults,
        ]
        for plugin in self.plugins:
            parts.extend(["-p", plugin])
        return " ".join(shlex.quote(p) for p in parts)

    def to_json(self) -> dict[str, JSONValue]:
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            "faults": self.faults,
            "digest": self.digest,
            "ok": self.ok,
            "violations": [v.to_json() for v in self.violations],
            "coverage": dict(sorted(self.coverage.items())),
            "missing_coverage": list(self.missing_coverage),
            "timeline": [s.to_json() for s in self.timeline],
            "deliveries": self.deliveries,
            "simulated_seconds": self.simulated_seconds,
            "cpu_seconds": self.cpu_seconds,
            "phase_ends": dict(self.phase_ends),
            "plugins": list(self.plugins),
            "replay_command": self.replay_command,
            "history": self.history.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SimulationResult:
        return cls(
            scenario=str(data["scenario"]),
            seed=int(data["seed"]),
            faults=str(data["faults"]),
            digest=str(data["digest"]),
            history=History.from_json(data.get("history", ())),
            violations=tuple(Violation.from_json(v) for v in data.get("violations", ())),
            coverage={str(k): int(v) for k, v in dict(data.get("coverage", {})).items()},
            missing_coverage=tuple(str(m) for m in data.get("missing_coverage", ())),
            timeline=tuple(Sample.from_json(s) for s in data.get("timeline", ())),
            deliveries=int(data.get("deliveries", 0)),
            simulated_seconds=float(data.get("simulated_seconds", 0.0)),
            cpu_seconds=float(data.get("cpu_seconds", 0.0)),
            phase_ends={str(k): float(v) for k, v in dict(data.get("phase_ends", {})).items()},
            plugins=tuple(str(p) for p in data.get("plugins", ())),
        )


def summarize(results: Sequence[SimulationResult]) -> dict[str, int]:
    """Counts for a batch of runs: ``runs``, ``ok``, ``failed``."""
    ok = sum(1 for r in results if r.ok)
    return {"runs": len(results), "ok": ok, "failed": len(results) - ok}
