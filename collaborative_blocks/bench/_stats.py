"""Interleaved rounds, medians and ratios: what every benchmark here reports."""

from __future__ import annotations

import os
import platform
import sqlite3
import statistics
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CaseResult",
    "Contender",
    "Measurement",
    "ProgressCallback",
    "interleave",
    "machine_info",
]

#: Runs one measurement in fresh surroundings and returns its throughput (operations/second).
Contender = Callable[[], Awaitable[float]]
#: Called after each measurement with (case key, contender name).
ProgressCallback = Callable[[str, str], None]


@dataclass
class Measurement:
    """One contender's throughput, one sample per round."""

    name: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else 0.0

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "median": self.median, "samples": self.samples}


@dataclass
class CaseResult:
    """A benchmark case: ours against a baseline (plus context contenders), and its target.

    ``ratio`` is median(ours) / median(baseline) in throughput, so higher is better for us;
    ``met`` compares it with ``target``. A case that cannot run yet has ``unavailable`` set.
    """

    key: str
    title: str
    unit: str
    ours: str
    baseline: str
    target: float
    measurements: dict[str, Measurement] = field(default_factory=dict)
    unavailable: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.unavailable is not None:
            return None
        ours, base = self.measurements.get(self.ours), self.measurements.get(self.baseline)
        if ours is None or base is None or not base.samples or base.median == 0:
            return None
        return ours.median / base.median

    @property
    def met(self) -> bool | None:
        ratio = self.ratio
        return None if ratio is None else ratio >= self.target

    @property
    def round_ratios(self) -> list[float]:
        """ours / baseline within each round: how much the ratio itself moved between rounds."""
        if self.unavailable is not None:
            return []
        ours, base = self.measurements.get(self.ours), self.measurements.get(self.baseline)
        if ours is None or base is None:
            return []
        return [o / b for o, b in zip(ours.samples, base.samples, strict=False) if b > 0]

    def ratio_to_baseline(self, name: str) -> float | None:
        base = self.measurements.get(self.baseline)
        other = self.measurements.get(name)
        if base is None or other is None or base.median == 0 or not other.samples:
            return None
        return other.median / base.median

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "unit": self.unit,
            "ours": self.ours,
            "baseline": self.baseline,
            "target": self.target,
            "ratio": self.ratio,
            "round_ratios": self.round_ratios,
            "met": self.met,
            "unavailable": self.unavailable,
            "notes": self.notes,
            "measurements": {name: m.as_json() for name, m in self.measurements.items()},
        }


async def interleave(
    case: CaseResult,
    contenders: Sequence[tuple[str, Contender]],
    rounds: int,
    progress: ProgressCallback | None = None,
) -> None:
    """Run every contender once per round, rotating who goes first, into ``case``.

    Rotation keeps a slow drift of the machine (another process starting, the disk cache
    warming) from always landing on the same contender.
    """
    for name, _ in contenders:
        case.measurements.setdefault(name, Measurement(name))
    for round_index in range(rounds):
        shift = round_index % len(contenders)
        for name, contender in [*contenders[shift:], *contenders[:shift]]:
            case.measurements[name].samples.append(await contender())
            if progress is not None:
                progress(case.key, name)


def machine_info() -> dict[str, Any]:
    try:
        load: list[float] | None = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "loadavg": load,
    }
