"""Fault plans: which faults a simulated run injects, how often and when.

A plan is written as a spec string of comma-separated ``name=value`` entries (``none`` is the
empty plan)::

    drop=0.05,duplicate=0.02,reorder=0.1,delay=0.01-2.0,partition=30s@10s,publish_fail=0.01,
    fetch_fail=0.01,crash=0.01,store_fail=0.01,store_read_fail=0.01,store_lost_ack=0.01,
    slow_write=0.05:0.5,skew=2.0,handler_error=0.02,handler_hang=0.01

========================  =====================================================================
entry                     meaning
========================  =====================================================================
``drop=P``                a delivery is lost in the network with probability P (the transport
                          redelivers it after its ack timeout)
``duplicate=P``           a delivery is handed to the consumer twice with probability P
``reorder=P``             a published message is held back (up to 1 s) with probability P, so
                          later messages overtake it
``delay=LO-HI``           every published message travels LO..HI seconds (``delay=HI``: 0..HI)
``partition=D@T``         at simulated second T the systems split in two halves for D seconds,
                          then heal; repeat the entry for several partitions
``publish_fail=P``        a publish fails (``TransportUnavailableError``) with probability P,
                          before the message enters the network: nothing is sent
``fetch_fail=P``          a consumer's fetch fails (``TransportUnavailableError``) with
                          probability P, before anything is taken from the network
``crash=R``               each system crashes at rate R per simulated second (in-memory state
                          lost, the durable store kept) and restarts 1..5 s later
``crash=T`` / ``crash=NODE@T``  a crash at simulated second T (of NODE, else a random system)
``store_fail=P``          a store write fails (``StoreUnavailableError``) with probability P
``store_read_fail=P``     a store read (``read``, ``read_all``, ``stream_version``, ...,
                          and the start of a ``subscribe``) fails (``StoreUnavailableError``)
                          with probability P
``store_lost_ack=P``      a store write commits, then its acknowledgement is lost: the call
                          raises ``StoreUnavailableError`` with probability P although the
                          events are in the store (an ambiguous failure, as when the
                          connection drops after the database committed)
``slow_write=P:S``        a store write first waits up to S seconds, with probability P
``skew=S``                each system's wall clock is off by up to ±S seconds
``handler_error=P``       a scenario handler raises with probability P
``handler_hang=P``        a scenario handler hangs past the broker's handler timeout, with
                          probability P
========================  =====================================================================

Durations take an optional unit: ``500ms``, ``30s``, ``2m``, ``1h`` (bare numbers are
seconds). :meth:`FaultPlan.spec` writes the canonical spec, and ``FaultPlan.parse(p.spec())
== p`` for every plan.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace

from collaborative_blocks.errors import FaultPlanError

__all__ = ["PROBABILITIES", "CrashAt", "FaultPlan", "Partition"]

#: The accepted forms, listed in every parse error.
ACCEPTED_FORMS = (
    "drop=P, duplicate=P, reorder=P, publish_fail=P, fetch_fail=P, store_fail=P, "
    "store_read_fail=P, store_lost_ack=P, handler_error=P, handler_hang=P "
    "(P a probability in [0, 1]); delay=LO-HI or delay=HI (seconds); partition=D@T "
    "(duration at start, e.g. 30s@10s); crash=R (per system per simulated second), crash=T "
    "or crash=NODE@T; slow_write=P:S; skew=S; or 'none'"
)

#: The plan's fields that are probabilities (validated in [0, 1]; halved when shrinking).
PROBABILITIES = (
    "drop",
    "duplicate",
    "reorder",
    "publish_fail",
    "fetch_fail",
    "store_fail",
    "store_read_fail",
    "store_lost_ack",
    "handler_error",
    "handler_hang",
)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")


@dataclass(frozen=True, slots=True, order=True)
class Partition:
    """The systems split in two halves at ``start`` for ``duration`` simulated seconds."""

    start: float
    duration: float

    @property
    def end(self) -> float:
        return self.start + self.duration


@dataclass(frozen=True, slots=True, order=True)
class CrashAt:
    """A scheduled crash at ``time`` of ``node`` (None: a system chosen by the seed)."""

    time: float
    node: str | None = None


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """Rates and schedules of the faults a run injects (see the module docstring)."""

    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay: tuple[float, float] = (0.0, 0.0)
    partitions: tuple[Partition, ...] = ()
    publish_fail: float = 0.0
    fetch_fail: float = 0.0
    crash_rate: float = 0.0
    crashes: tuple[CrashAt, ...] = ()
    store_fail: float = 0.0
    store_read_fail: float = 0.0
    store_lost_ack: float = 0.0
    slow_write: tuple[float, float] = (0.0, 0.0)
    skew: float = 0.0
    handler_error: float = 0.0
    handler_hang: float = 0.0

    def __post_init__(self) -> None:
        for name in PROBABILITIES:
            _check_probability(name, getattr(self, name))
        low, high = self.delay
        if not (_finite(low) and _finite(high) and 0.0 <= low <= high):
            raise FaultPlanError(
                f"delay={_num(low)}-{_num(high)}: need 0 <= LO <= HI seconds. "
                f"Accepted: {ACCEPTED_FORMS}"
            )
        if not (_finite(self.crash_rate) and self.crash_rate >= 0.0):
            raise _invalid(f"crash={self.crash_rate}: a rate must be >= 0")
        probability, seconds = self.slow_write
        _check_probability("slow_write", probability)
        if not (_finite(seconds) and seconds >= 0.0):
            raise _invalid(f"slow_write=...:{seconds}: seconds must be >= 0")
        if not (probability and seconds):
            object.__setattr__(self, "slow_write", (0.0, 0.0))
        if not high:
            object.__setattr__(self, "delay", (0.0, 0.0))
        if not (_finite(self.skew) and self.skew >= 0.0):
            raise _invalid(f"skew={self.skew}: seconds must be >= 0")
        for partition in self.partitions:
            if not (
                _finite(partition.start)
                and _finite(partition.duration)
                and partition.start >= 0
                and partition.duration > 0
            ):
                raise _invalid(
                    f"partition={_num(partition.duration)}s@{_num(partition.start)}s: need a "
                    "duration > 0 and a start >= 0"
                )
        for crash in self.crashes:
            if not (_finite(crash.time) and crash.time >= 0):
                raise _invalid(f"crash at {crash.time}: the time must be >= 0")
        # Canonical order, so equal plans compare (and spec) equal however they were written.
        object.__setattr__(self, "partitions", tuple(sorted(self.partitions)))
        object.__setattr__(
            self, "crashes", tuple(sorted(self.crashes, key=lambda c: (c.time, c.node or "")))
        )

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def none(cls) -> FaultPlan:
        """No faults at all."""
        return cls()

    @classmethod
    def parse(cls, spec: str) -> FaultPlan:
        """Read a spec string; a bad entry raises :class:`FaultPlanError` naming it."""
        if not isinstance(spec, str):
            raise FaultPlanError(f"a fault plan spec is a string, got {type(spec).__name__}")
        text = spec.strip()
        if text in ("", "none"):
            return cls()
        values: dict[str, object] = {}
        partitions: list[Partition] = []
        crashes: list[CrashAt] = []
        for raw in text.split(","):
            entry = raw.strip()
            if not entry:
                continue
            name, sep, value = entry.partition("=")
            name, value = name.strip(), value.strip()
            if not sep or not name or not value:
                raise FaultPlanError(
                    f"fault entry {entry!r} is not name=value. Accepted: {ACCEPTED_FORMS}"
                )
            try:
                if name in PROBABILITIES:
                    _once(values, name, entry)
                    values[name] = _probability(value)
                elif name == "delay":
                    _once(values, name, entry)
                    low, dash, high = value.partition("-")
                    values["delay"] = (
                        (_duration(low), _duration(high)) if dash else (0.0, _duration(value))
                    )
                elif name == "partition":
                    duration, at, start = value.partition("@")
                    if not at:
                        raise ValueError("write DURATION@START, e.g. 30s@10s")
                    partitions.append(Partition(_duration(start), _duration(duration)))
                elif name == "crash":
                    node, at, when = value.rpartition("@")
                    if at:
                        if not _NODE.match(node):
                            raise ValueError(f"{node!r} is not a system name")
                        crashes.append(CrashAt(_duration(when), node))
                    elif value.endswith(("ms", "s", "m", "h")):
                        crashes.append(CrashAt(_duration(value)))
                    else:
                        _once(values, "crash_rate", entry)
                        values["crash_rate"] = _rate(value)
                elif name == "slow_write":
                    probability, colon, seconds = value.partition(":")
                    if not colon:
                        raise ValueError("write P:SECONDS, e.g. 0.05:0.5")
                    _once(values, name, entry)
                    values["slow_write"] = (_probability(probability), _duration(seconds))
                elif name == "skew":
                    _once(values, name, entry)
                    values["skew"] = _duration(value)
                else:
                    raise FaultPlanError(
                        f"unknown fault {name!r} in {entry!r}. Accepted: {ACCEPTED_FORMS}"
                    )
            except ValueError as error:
                raise FaultPlanError(
                    f"fault entry {entry!r}: {error}. Accepted: {ACCEPTED_FORMS}"
                ) from None
        return cls(partitions=tuple(partitions), crashes=tuple(crashes), **values)  # type: ignore[arg-type]

    # -- reading -------------------------------------------------------------------------------

    def spec(self) -> str:
        """The canonical spec string (``parse(spec())`` gives this plan back)."""
        parts: list[str] = []
        for name in ("drop", "duplicate", "reorder"):
            if getattr(self, name):
                parts.append(f"{name}={_num(getattr(self, name))}")
        low, high = self.delay
        if high > 0:
            parts.append(f"delay={_num(low)}-{_num(high)}")
        parts.extend(f"partition={_num(p.duration)}s@{_num(p.start)}s" for p in self.partitions)
        for name in ("publish_fail", "fetch_fail"):
            if getattr(self, name):
                parts.append(f"{name}={_num(getattr(self, name))}")
        if self.crash_rate:
            parts.append(f"crash={_num(self.crash_rate)}")
        for crash in self.crashes:
            when = f"{_num(crash.time)}s"
            parts.append(f"crash={crash.node}@{when}" if crash.node else f"crash={when}")
        for name in ("store_fail", "store_read_fail", "store_lost_ack"):
            if getattr(self, name):
                parts.append(f"{name}={_num(getattr(self, name))}")
        probability, seconds = self.slow_write
        if probability and seconds:
            parts.append(f"slow_write={_num(probability)}:{_num(seconds)}")
        if self.skew:
            parts.append(f"skew={_num(self.skew)}")
        for name in ("handler_error", "handler_hang"):
            if getattr(self, name):
                parts.append(f"{name}={_num(getattr(self, name))}")
        return ",".join(parts) or "none"

    def __str__(self) -> str:
        return self.spec()

    @property
    def is_empty(self) -> bool:
        return self.spec() == "none"

    @property
    def network_faults(self) -> bool:
        return bool(
            self.drop
            or self.duplicate
            or self.reorder
            or self.delay[1]
            or self.partitions
            or self.publish_fail
            or self.fetch_fail
        )

    def healed(self) -> FaultPlan:
        """The plan of the liveness phase: nothing new is injected (skew stays: it is a
        property of the systems' clocks, not an event)."""
        return FaultPlan(skew=self.skew)

    def without(self, name: str) -> FaultPlan:
        """This plan with one fault (a field name) switched off: a step for shrinking."""
        default = FaultPlan()
        if name not in {f.name for f in fields(self)}:
            raise FaultPlanError(f"no fault field {name!r}")
        return replace(self, **{name: getattr(default, name)})

    def faults(self) -> list[str]:
        """The names of the fault fields that are switched on."""
        default = FaultPlan()
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)]


def _invalid(problem: str) -> FaultPlanError:
    return FaultPlanError(f"{problem}. Accepted: {ACCEPTED_FORMS}")


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _num(value: float) -> str:
    """A number written so that float(text) gives it back exactly, without noise."""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _check_probability(name: str, value: float) -> None:
    if not (_finite(value) and 0.0 <= value <= 1.0):
        raise FaultPlanError(
            f"{name}={value}: a probability must be in [0, 1]. Accepted: {ACCEPTED_FORMS}"
        )


def _once(values: dict[str, object], name: str, entry: str) -> None:
    if name in values:
        raise ValueError(f"{name} is given twice")


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{text} is not a probability in [0, 1]")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{text} is not a rate >= 0")
    return value


def _duration(text: str) -> float:
    found = _DURATION.match(text)
    if found is None:
        raise ValueError(f"{text!r} is not a duration (e.g. 500ms, 30s, 2m, 1.5)")
    value = float(found.group(1)) * _UNITS[found.group(2) or "s"]
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite duration")
    return value
