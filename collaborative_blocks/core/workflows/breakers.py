"""Circuit breakers per target system, with resilience4j's semantics.

A :class:`CircuitBreaker` guards calls to one target. It is a plain synchronous core: the
caller asks :meth:`~CircuitBreaker.acquire` before a call and reports the outcome with
:meth:`~CircuitBreaker.on_success` / :meth:`~CircuitBreaker.on_error` (or
:meth:`~CircuitBreaker.release` when the permitted call was not made).

- **CLOSED**: calls go through; outcomes are recorded in a sliding window (the last N calls,
  or the calls of the last N seconds). Once the window holds at least
  ``minimum_number_of_calls``, a failure rate or slow-call rate at or above its threshold
  opens the breaker.
- **OPEN**: every call fails fast with :class:`~collaborative_blocks.errors.CircuitOpenError`
  (no call reaches the target). Once ``wait_duration_in_open`` has passed, the next
  ``acquire`` moves to HALF_OPEN (lazily, as resilience4j does without its automatic
  transition: there is no timer task).
- **HALF_OPEN**: ``permitted_calls_in_half_open`` trial calls go through, further ones fail
  fast. When they all finished, rates at or above a threshold open the breaker again, else it
  closes with a fresh window. ``max_wait_in_half_open`` > 0 bounds how long the trial may
  take (then it opens again).

The lifecycle is a ``transitions`` machine declared once for the class
(:attr:`CircuitBreaker.lifecycle`); every transition is a :class:`BreakerTransition` handed to
the breaker's listener. A :class:`BreakerRegistry` creates breakers on first use, appends
their transitions to the event store (stream ``circuit-breaker:<name>``), restores them after
a restart and counts them in OpenTelemetry metrics. See docs/circuit-breakers.md.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from transitions import Machine

from collaborative_blocks.core.clock import Clock
from collaborative_blocks.core.machines import Lifecycle
from collaborative_blocks.errors import (
    CircuitOpenError,
    ConcurrencyError,
    ConfigurationError,
    CorruptRecordError,
    IllegalTransitionError,
)
from collaborative_blocks.stores.base import EventStore, NewEvent

if TYPE_CHECKING:
    from collaborative_blocks.core.settings import Settings

__all__ = [
    "BREAKER_STREAM_PREFIX",
    "TRANSITION_TOPIC",
    "WAKE_TOLERANCE",
    "BreakerConfig",
    "BreakerMetrics",
    "BreakerRegistry",
    "BreakerState",
    "BreakerTransition",
    "CircuitBreaker",
    "WindowType",
]

#: A caller that waits ``retry_after`` and tries again may wake a rounding error early: the
#: wait is usually scheduled on the wall clock (``now() + retry_after``, where one ulp is
#: ~2e-7 s), the deadline is on the monotonic clock. Calls that early are let through, or
#: each such retry would be refused again with a near-zero wait and burn an attempt.
WAKE_TOLERANCE = 1e-6

T = TypeVar("T")

_log = logging.getLogger(__name__)
_INSTRUMENTATION = "collaborative_blocks.workflows"

#: Transitions of breaker ``name`` are stored on stream ``circuit-breaker:<name>``.
BREAKER_STREAM_PREFIX = "circuit-breaker:"
#: The topic of a stored transition event.
TRANSITION_TOPIC = "circuit_breaker.Transitioned"
_MAX_STREAM_ID = 255


class BreakerState(enum.StrEnum):
    """A circuit breaker's state (the value is what events and metrics carry)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class WindowType(enum.Enum):
    """How the CLOSED state's sliding window is measured."""

    COUNT_BASED = "count_based"  # the last ``window_size`` calls
    TIME_BASED = "time_based"  # the calls of the last ``window_size`` seconds


_CLOSED = BreakerState.CLOSED
_OPEN = BreakerState.OPEN
_HALF_OPEN = BreakerState.HALF_OPEN


def _problem(field: str, value: object, requirement: str) -> ConfigurationError:
    return ConfigurationError(
        f"BreakerConfig.{field}={value!r}: {requirement}; nothing was configured"
    )


def _check_number(
    field: str,
    value: object,
    *,
    low: float,
    high: float | None = None,
    low_inclusive: bool = False,
    what: str = "a number",
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise _problem(field, value, f"must be {what}")
    too_low = value < low if low_inclusive else value <= low
    if too_low or (high is not None and value > high) or math.isinf(value):
        bound = f">= {low:g}" if low_inclusive else f"> {low:g}"
        if high is not None:
            bound += f" and <= {high:g}"
        raise _problem(field, value, f"must be {what} {bound}")


def _check_int(field: str, value: object, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _problem(field, value, f"must be an integer >= {low}")


def _check_names(field: str, value: object) -> None:
    if isinstance(value, str) or not isinstance(value, tuple):
        raise _problem(field, value, "must be a tuple of error type names, e.g. ('TimeoutError',)")
    for name in value:
        if not isinstance(name, str) or not name:
            raise _problem(field, value, "every entry must be a non-empty error type name")


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """How a circuit breaker decides (resilience4j's ``CircuitBreakerConfig``).

    Rates are percentages. A call is slow when it took longer than ``slow_call_duration``
    seconds. ``window_size`` counts calls (``COUNT_BASED``) or seconds (``TIME_BASED``, in
    one-second buckets). ``minimum_number_of_calls`` must be recorded (in a time window:
    within the window) before any rate is computed; a count window uses at most
    ``window_size`` of them, as resilience4j does. ``wait_duration_in_open``: seconds an open
    breaker fails fast before it lets ``permitted_calls_in_half_open`` trial calls through.
    ``max_wait_in_half_open``: seconds the trial may take before the breaker opens again
    (0 = wait for every trial call).

    ``record_errors``: error type names that count as failures; empty = every error does, and
    when given, other errors count as successes. ``ignore_errors``: error type names that
    count as neither (the call is as if it had not been made); they win over
    ``record_errors``. Any bad value raises :class:`ConfigurationError` naming the field.
    """

    failure_rate_threshold: float = 50.0
    slow_call_rate_threshold: float = 100.0
    slow_call_duration: float = 60.0
    window_type: WindowType = WindowType.COUNT_BASED
    window_size: int = 10
    minimum_number_of_calls: int = 5
    permitted_calls_in_half_open: int = 3
    wait_duration_in_open: float = 60.0
    max_wait_in_half_open: float = 0.0
    record_errors: tuple[str, ...] = ()
    ignore_errors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Lenient input from documents (a window type by name, lists of error names), strict
        # values afterwards.
        if isinstance(self.window_type, str):
            by_name = {w.value: w for w in WindowType} | {w.name: w for w in WindowType}
            if self.window_type in by_name:
                object.__setattr__(self, "window_type", by_name[self.window_type])
        for name in ("record_errors", "ignore_errors"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_number(
            "failure_rate_threshold",
            self.failure_rate_threshold,
            low=0,
            high=100,
            what="a percentage",
        )
        _check_number(
            "slow_call_rate_threshold",
            self.slow_call_rate_threshold,
            low=0,
            high=100,
            what="a percentage",
        )
        _check_number("slow_call_duration", self.slow_call_duration, low=0, what="seconds")
        if not isinstance(self.window_type, WindowType):
            raise _problem(
                "window_type",
                self.window_type,
                "must be WindowType.COUNT_BASED or WindowType.TIME_BASED "
                "(or their values 'count_based', 'time_based')",
            )
        _check_int("window_size", self.window_size, low=1)
        _check_int("minimum_number_of_calls", self.minimum_number_of_calls, low=1)
        _check_int("permitted_calls_in_half_open", self.permitted_calls_in_half_open, low=1)
        _check_number("wait_duration_in_open", self.wait_duration_in_open, low=0, what="seconds")
        _check_number(
            "max_wait_in_half_open",
            self.max_wait_in_half_open,
            low=0,
            low_inclusive=True,
            what="seconds (0 = no limit)",
        )
        _check_names("record_errors", self.record_errors)
        _check_names("ignore_errors", self.ignore_errors)

    @classmethod
    def from_settings(cls, settings: Settings, **changes: Any) -> BreakerConfig:
        """The configuration the environment asks for.

        ``minimum_number_of_calls`` = ``CIRCUIT_BREAKER_FAILURE_THRESHOLD``, ``window_size`` =
        twice that (count-based), ``wait_duration_in_open`` =
        ``CIRCUIT_BREAKER_TIMEOUT_SECONDS``: with the defaults, 5 failures in a row open the
        breaker, and it stays closed while fewer than half of the last 10 calls failed.
        ``changes`` override fields.
        """
        threshold = settings.circuit_breaker_failure_threshold
        values: dict[str, Any] = {
            "minimum_number_of_calls": threshold,
            "window_size": 2 * threshold,
            "wait_duration_in_open": float(settings.circuit_breaker_timeout_seconds),
        }
        values.update(changes)
        unknown = sorted(set(changes) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigurationError(
                f"BreakerConfig has no field {', '.join(unknown)}; known fields: "
                + ", ".join(f.name for f in fields(cls))
            )
        return cls(**values)


@dataclass(frozen=True, slots=True)
class BreakerMetrics:
    """What a breaker's current window holds.

    ``failure_rate`` / ``slow_call_rate`` are percentages, -1.0 while fewer than the minimum
    number of calls were recorded (as resilience4j reports them). In HALF_OPEN the window is
    the trial calls'. ``not_permitted``: calls refused since the breaker was created.
    """

    failure_rate: float
    slow_call_rate: float
    calls: int
    failed: int
    slow: int
    not_permitted: int


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """One state change of a breaker: ``at`` is the clock's ``now()`` (epoch seconds); the
    rates are those that decided it (-1.0 when none was computed, e.g. a forced transition)."""

    breaker: str
    from_state: BreakerState
    to_state: BreakerState
    at: float
    reason: str
    failure_rate: float = -1.0
    slow_call_rate: float = -1.0

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "breaker": self.breaker,
                "from_state": self.from_state.value,
                "to_state": self.to_state.value,
                "at": self.at,
                "reason": self.reason,
                "failure_rate": self.failure_rate,
                "slow_call_rate": self.slow_call_rate,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> BreakerTransition:
        try:
            raw = json.loads(data)
            return cls(
                breaker=str(raw["breaker"]),
                from_state=BreakerState(raw["from_state"]),
                to_state=BreakerState(raw["to_state"]),
                at=float(raw["at"]),
                reason=str(raw["reason"]),
                failure_rate=float(raw.get("failure_rate", -1.0)),
                slow_call_rate=float(raw.get("slow_call_rate", -1.0)),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise CorruptRecordError(
                f"a stored circuit breaker transition could not be read ({error}); "
                f"expected the JSON written by BreakerTransition.to_json, got {data[:80]!r}"
            ) from None


# -- sliding windows ---------------------------------------------------------------------------


class _CountWindow:
    """The last ``size`` outcomes in a ring, with running totals (O(1) per record)."""

    __slots__ = ("_failed", "_next", "_slow", "calls", "failed", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        self._failed = bytearray(size)
        self._slow = bytearray(size)
        self._next = 0
        self.calls = 0
        self.failed = 0
        self.slow = 0

    def record(self, failed: bool, slow: bool, now: float) -> None:
        i = self._next
        if self.calls == self.size:  # subtract the evicted outcome
            self.failed -= self._failed[i]
            self.slow -= self._slow[i]
        else:
            self.calls += 1
        self._failed[i] = failed
        self._slow[i] = slow
        self.failed += failed
        self.slow += slow
        self._next = (i + 1) % self.size

    def totals(self, now: float) -> tuple[int, int, int]:
        return self.calls, self.failed, self.slow


class _TimeWindow:
    """The outcomes of the last ``size`` seconds in one-second buckets, with running totals.

    A record moves the head to the current second, evicting the buckets that fell out of the
    window (each bucket once per second of time passed, so O(1) amortised per record).
    """

    __slots__ = ("_calls", "_failed", "_head", "_slow", "calls", "failed", "size", "slow")

    def __init__(self, size: int, now: float) -> None:
        self.size = size
        self._calls = [0] * size
        self._failed = [0] * size
        self._slow = [0] * size
        self._head = math.floor(now)
        self.calls = 0
        self.failed = 0
        self.slow = 0

    def _advance(self, now: float) -> None:
        second = math.floor(now)
        head = self._head
        if second <= head:
            return
        size = self.size
        if second - head >= size:
            self._calls = [0] * size
            self._failed = [0] * size
            self._slow = [0] * size
            self.calls = self.failed = self.slow = 0
        else:
            for s in range(head + 1, second + 1):
                i = s % size
                self.calls -= self._calls[i]
                self.failed -= self._failed[i]
                self.slow -= self._slow[i]
                self._calls[i] = self._failed[i] = self._slow[i] = 0
        self._head = second

    def record(self, failed: bool, slow: bool, now: float) -> None:
        self._advance(now)
        i = self._head % self.size
        self._calls[i] += 1
        self._failed[i] += failed
        self._slow[i] += slow
        self.calls += 1
        self.failed += failed
        self.slow += slow

    def totals(self, now: float) -> tuple[int, int, int]:
        self._advance(now)
        return self.calls, self.failed, self.slow


_Window = _CountWindow | _TimeWindow


def _rates(calls: int, failed: int, slow: int, minimum: int) -> tuple[float, float]:
    if calls < minimum or calls == 0:
        return -1.0, -1.0
    return failed * 100.0 / calls, slow * 100.0 / calls


# -- the breaker -------------------------------------------------------------------------------


def _compile_lifecycle() -> Lifecycle[BreakerState]:
    machine = Machine(
        model=None,
        states=[state.value for state in BreakerState],
        initial=_CLOSED.value,
        auto_transitions=False,
        send_event=True,
        name="CircuitBreaker",
    )
    machine.add_transition("trip", [_CLOSED.value, _HALF_OPEN.value], _OPEN.value)
    machine.add_transition("half_open", _OPEN.value, _HALF_OPEN.value)
    machine.add_transition("close", _HALF_OPEN.value, _CLOSED.value)
    machine.add_transition("force_open", "*", _OPEN.value)
    machine.add_transition("reset", [_OPEN.value, _HALF_OPEN.value], _CLOSED.value)
    return Lifecycle(owner="CircuitBreaker", states=BreakerState, initial=_CLOSED, machine=machine)


class CircuitBreaker:
    """One target's circuit breaker (see the module docs for the states).

    ``listener`` receives every :class:`BreakerTransition` synchronously, after the state
    changed; an exception it raises is logged, never propagated to the caller.
    """

    #: The legal transitions, compiled once for the class (triggers: trip, half_open, close,
    #: force_open, reset).
    lifecycle: ClassVar[Lifecycle[BreakerState]] = _compile_lifecycle()

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        *,
        clock: Clock,
        listener: Callable[[BreakerTransition], None] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(
                f"a circuit breaker needs a non-empty name (the target system), got {name!r}"
            )
        self.name = name
        self.config = config
        self._clock = clock
        self._monotonic = clock.monotonic  # bound once: the fail-fast path reads it
        self._listener = listener
        self._state = _CLOSED
        self._not_permitted = 0
        self._open_until = 0.0
        self._half_open_since = 0.0
        self._permits = 0
        # A count window of N calls never holds more than N (resilience4j caps the same way).
        self._closed_minimum = (
            min(config.minimum_number_of_calls, config.window_size)
            if config.window_type is WindowType.COUNT_BASED
            else config.minimum_number_of_calls
        )
        self._window: _Window = self._new_window(clock.monotonic())
        # The calls the current window needs before it has rates (kept when OPEN, so
        # metrics() still shows the window that opened it).
        self._minimum = self._closed_minimum
        self._classes: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._state.value})"

    # -- reading ---------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The current state (an OPEN breaker whose wait has passed stays OPEN until the next
        :meth:`acquire` moves it to HALF_OPEN)."""
        return self._state

    def metrics(self) -> BreakerMetrics:
        """Rates and counts of the current window (the trial calls' when HALF_OPEN)."""
        calls, failed, slow = self._window.totals(self._clock.monotonic())
        failure_rate, slow_rate = _rates(calls, failed, slow, self._minimum)
        return BreakerMetrics(failure_rate, slow_rate, calls, failed, slow, self._not_permitted)

    def retry_after(self) -> float:
        """Seconds until a call may be permitted (0.0 when one would be now).

        Ask this, not ``state is OPEN``, to decide whether to route around the target: an
        OPEN breaker whose wait has passed stays OPEN until a call reaches it."""
        if self._state is _CLOSED:
            return 0.0
        now = self._clock.monotonic()
        if self._state is _OPEN:
            wait = self._open_until - now
            return wait if wait > WAKE_TOLERANCE else 0.0
        limit = self.config.max_wait_in_half_open
        if limit > 0 and now - self._half_open_since >= limit:
            return self.config.wait_duration_in_open  # the next call opens it again
        if self._permits > 0:
            return 0.0
        return self._half_open_retry_after(now)

    # -- the call protocol -----------------------------------------------------------------

    def acquire(self) -> None:
        """Ask permission for one call; raises :class:`CircuitOpenError` (and counts a
        not-permitted call) when OPEN, or HALF_OPEN with every trial call taken."""
        state = self._state
        if state is _CLOSED:
            return
        if state is _OPEN:
            # The hot fail-fast path: an attribute check and one clock read, no machine.
            now = self._monotonic()
            if now + WAKE_TOLERANCE < self._open_until:
                self._not_permitted += 1
                raise CircuitOpenError(self.name, self._open_until - now)
            self._fire("half_open", "wait_duration_in_open passed; letting trial calls through")
        else:
            now = self._clock.monotonic()
            if self._half_open_expired(now):
                self._not_permitted += 1
                raise CircuitOpenError(self.name, self._open_until - now)
        if self._permits <= 0:
            self._not_permitted += 1
            raise CircuitOpenError(self.name, self._half_open_retry_after(now))
        self._permits -= 1

    def on_success(self, duration: float) -> None:
        """A permitted call succeeded after ``duration`` seconds."""
        self._record(False, duration > self.config.slow_call_duration)

    def on_error(self, duration: float, error_type: str) -> None:
        """A permitted call failed with an error of type ``error_type`` after ``duration``
        seconds. An ignored type counts as neither (the permit is returned); with
        ``record_errors`` given, an unlisted type counts as a success."""
        kind = self._classes.get(error_type)
        if kind is None:
            kind = self._classify(error_type)
        if kind == 0:
            self.release()
            return
        self._record(kind == 1, duration > self.config.slow_call_duration)

    def release(self) -> None:
        """A permitted call was not made (cancelled before it started): return its permit."""
        if self._state is _HALF_OPEN:
            self._permits = min(self._permits + 1, self.config.permitted_calls_in_half_open)

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``await fn()`` under the breaker: acquire, time it on the clock, record."""
        self.acquire()
        start = self._clock.monotonic()
        try:
            result = await fn()
        except asyncio.CancelledError:
            self.release()
            raise
        except Exception as error:
            self.on_error(self._clock.monotonic() - start, type(error).__name__)
            raise
        except BaseException:
            self.release()
            raise
        self.on_success(self._clock.monotonic() - start)
        return result

    # -- operator actions ------------------------------------------------------------------

    def force_open(self, reason: str = "forced open") -> None:
        """Open now (from any state; when already OPEN, the wait starts again)."""
        self._fire("force_open", reason)

    def reset(self, reason: str = "reset") -> None:
        """Back to CLOSED with a fresh window (a transition is recorded unless it was
        CLOSED already)."""
        if self._state is _CLOSED:
            self._window = self._new_window(self._clock.monotonic())
            return
        self._fire("reset", reason)

    def restore(self, transitions: Iterable[BreakerTransition]) -> None:
        """Rebuild the state from recorded transitions (the last one decides), without
        notifying the listener: history is fact.

        An OPEN breaker stays OPEN until ``wait_duration_in_open`` after the recorded
        transition's ``at`` (on the clock's ``now()``); a HALF_OPEN one starts a fresh trial
        (the trial calls in flight died with the old process); a CLOSED one gets a fresh
        window (outcomes are not stored).
        """
        last: BreakerTransition | None = None
        for transition in transitions:
            if transition.breaker != self.name:
                raise ValueError(
                    f"transition of breaker {transition.breaker!r} given to breaker "
                    f"{self.name!r}; restore each breaker from its own stream"
                )
            last = transition
        if last is None:
            return
        now = self._clock.monotonic()
        elapsed = max(self._clock.now() - last.at, 0.0)
        self._enter(last.to_state, now)
        if last.to_state is _OPEN:
            self._open_until = now + max(self.config.wait_duration_in_open - elapsed, 0.0)
        elif last.to_state is _HALF_OPEN:
            self._half_open_since = now - elapsed

    # -- internals -------------------------------------------------------------------------

    def _new_window(self, now: float) -> _Window:
        config = self.config
        if config.window_type is WindowType.TIME_BASED:
            return _TimeWindow(config.window_size, now)
        return _CountWindow(config.window_size)

    def _classify(self, error_type: str) -> int:
        config = self.config
        if error_type in config.ignore_errors:
            kind = 0
        elif not config.record_errors or error_type in config.record_errors:
            kind = 1
        else:
            kind = 2  # recorded as a success, as resilience4j does
        if len(self._classes) < 1024:
            self._classes[error_type] = kind
        return kind

    def _half_open_expired(self, now: float) -> bool:
        limit = self.config.max_wait_in_half_open
        if limit > 0 and now - self._half_open_since >= limit:
            self._fire(
                "trip",
                f"the trial calls did not finish within max_wait_in_half_open ({limit:g}s)",
            )
            return True
        return False

    def _half_open_retry_after(self, now: float) -> float:
        limit = self.config.max_wait_in_half_open
        if limit > 0:
            return max(self._half_open_since + limit - now, 0.0)
        # Unknown: it depends on when the trial calls finish; a trial call slower than
        # slow_call_duration counts as slow anyway.
        return min(self.config.slow_call_duration, self.config.wait_duration_in_open)

    def _record(self, failed: bool, slow: bool) -> None:
        state = self._state
        if state is _OPEN:
            return  # a call permitted before the breaker opened; it decides nothing now
        now = self._clock.monotonic()
        if state is _CLOSED:
            window = self._window
            window.record(failed, slow, now)
            minimum = self._closed_minimum
            if window.calls < minimum:
                return
            failure_rate, slow_rate = _rates(window.calls, window.failed, window.slow, minimum)
            if self._exceeded(failure_rate, slow_rate):
                self._fire("trip", self._why(failure_rate, slow_rate), failure_rate, slow_rate)
            return
        if self._half_open_expired(now):
            return
        window = self._window
        window.record(failed, slow, now)
        permitted = self.config.permitted_calls_in_half_open
        if window.calls < permitted:
            return
        failure_rate, slow_rate = _rates(window.calls, window.failed, window.slow, permitted)
        if self._exceeded(failure_rate, slow_rate):
            self._fire(
                "trip",
                "trial calls: " + self._why(failure_rate, slow_rate),
                failure_rate,
                slow_rate,
            )
        else:
            self._fire(
                "close",
                f"trial calls: failure rate {failure_rate:.4g}% and slow-call rate "
                f"{slow_rate:.4g}% under the thresholds",
                failure_rate,
                slow_rate,
            )

    def _exceeded(self, failure_rate: float, slow_rate: float) -> bool:
        config = self.config
        return (
            failure_rate >= config.failure_rate_threshold
            or slow_rate >= config.slow_call_rate_threshold
        )

    def _why(self, failure_rate: float, slow_rate: float) -> str:
        config = self.config
        if failure_rate >= config.failure_rate_threshold:
            return (
                f"failure rate {failure_rate:.4g}% >= "
                f"failure_rate_threshold {config.failure_rate_threshold:g}%"
            )
        return (
            f"slow-call rate {slow_rate:.4g}% >= "
            f"slow_call_rate_threshold {config.slow_call_rate_threshold:g}%"
        )

    def _enter(self, state: BreakerState, now: float) -> None:
        self._state = state
        if state is _OPEN:
            self._open_until = now + self.config.wait_duration_in_open
        elif state is _HALF_OPEN:
            self._half_open_since = now
            self._permits = self.config.permitted_calls_in_half_open
            self._window = _CountWindow(self.config.permitted_calls_in_half_open)
            self._minimum = self.config.permitted_calls_in_half_open
        else:
            self._window = self._new_window(now)
            self._minimum = self._closed_minimum

    def _fire(
        self,
        trigger: str,
        reason: str,
        failure_rate: float = -1.0,
        slow_rate: float = -1.0,
    ) -> None:
        lifecycle = self.lifecycle
        source = self._state
        candidates = lifecycle.machine.events[trigger].transitions.get(source.value)
        if not candidates:
            raise IllegalTransitionError(
                f"CircuitBreaker {self.name!r}", trigger, source.value, lifecycle.allowed(source)
            )
        dest = BreakerState(candidates[0].dest or source.value)
        self._enter(dest, self._clock.monotonic())
        transition = BreakerTransition(
            self.name, source, dest, self._clock.now(), reason, failure_rate, slow_rate
        )
        if self._listener is not None:
            try:
                self._listener(transition)
            except Exception:
                _log.exception("circuit breaker %r: a transition listener failed", self.name)


# -- the registry ------------------------------------------------------------------------------


class BreakerRegistry:
    """The circuit breakers of a process, one per target, created on first :meth:`get`.

    ``config``: the default configuration (else :meth:`BreakerConfig.from_settings` of
    ``settings``, else :class:`BreakerConfig`'s defaults); ``overrides``: per-target
    configurations. Every transition is kept in :meth:`pending` until :meth:`flush` appends it
    to ``store`` (stream ``circuit-breaker:<name>``, topic ``circuit_breaker.Transitioned``);
    :meth:`restore` reads those streams back after a restart. Metrics (``meter_provider``, or
    the global one): counter ``cb.circuit_breaker.transitions`` (attributes breaker,
    from_state, to_state), observable gauge ``cb.circuit_breaker.state`` (1 for the state each
    breaker is in, 0 for the others; attributes breaker, state) and observable counter
    ``cb.circuit_breaker.not_permitted`` (attribute breaker).
    """

    def __init__(
        self,
        config: BreakerConfig | None = None,
        *,
        clock: Clock,
        settings: Settings | None = None,
        overrides: Mapping[str, BreakerConfig] | None = None,
        store: EventStore | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        if config is None:
            config = BreakerConfig.from_settings(settings) if settings is not None else None
        self.config = config if config is not None else BreakerConfig()
        self.clock = clock
        self.store = store
        self._overrides = dict(overrides or {})
        self._breakers: dict[str, CircuitBreaker] = {}
        self._pending: list[BreakerTransition] = []
        self._versions: dict[str, int] = {}
        self._listeners: list[Callable[[BreakerTransition], None]] = []
        self._flush_lock = asyncio.Lock()
        meter = metrics.get_meter(_INSTRUMENTATION, meter_provider=meter_provider)
        self._transitions = meter.create_counter(
            "cb.circuit_breaker.transitions",
            unit="{transition}",
            description="circuit breaker state changes, per breaker and (from_state, to_state)",
        )
        meter.create_observable_gauge(
            "cb.circuit_breaker.state",
            [self._observe_states],
            description="1 for the state each circuit breaker is in, 0 for the others",
        )
        meter.create_observable_counter(
            "cb.circuit_breaker.not_permitted",
            [self._observe_not_permitted],
            unit="{call}",
            description="calls refused by an open (or full half-open) circuit breaker",
        )

    def get(self, target: str) -> CircuitBreaker:
        """The breaker of ``target``, created (closed) on first use."""
        breaker = self._breakers.get(target)
        if breaker is None:
            if not isinstance(target, str) or not target:
                raise ConfigurationError(
                    f"a circuit breaker needs a non-empty target name, got {target!r}"
                )
            if len(BREAKER_STREAM_PREFIX) + len(target) > _MAX_STREAM_ID:
                raise ConfigurationError(
                    f"target name {target[:40]!r}... is too long for a breaker stream id "
                    f"(at most {_MAX_STREAM_ID - len(BREAKER_STREAM_PREFIX)} characters)"
                )
            breaker = CircuitBreaker(
                target,
                self._overrides.get(target, self.config),
                clock=self.clock,
                listener=self._on_transition,
            )
            self._breakers[target] = breaker
        return breaker

    def __contains__(self, target: object) -> bool:
        return target in self._breakers

    def states(self) -> dict[str, BreakerState]:
        """Each created breaker's state."""
        return {name: breaker.state for name, breaker in self._breakers.items()}

    def pending(self) -> list[BreakerTransition]:
        """Transitions not yet appended to the store, oldest first."""
        return list(self._pending)

    def subscribe(self, listener: Callable[[BreakerTransition], None]) -> Callable[[], None]:
        """Call ``listener`` with every transition of every breaker (synchronously; an
        exception it raises is logged). Returns a function that unsubscribes it."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    async def flush(self) -> None:
        """Append every pending transition to its breaker's stream.

        Without a store the pending transitions are dropped. If the store fails, the
        transitions not yet appended stay pending and the error propagates.
        """
        async with self._flush_lock:
            batch, self._pending = self._pending, []
            store = self.store
            if store is None or not batch:
                return
            by_breaker: dict[str, list[BreakerTransition]] = {}
            for transition in batch:
                by_breaker.setdefault(transition.breaker, []).append(transition)
            done: set[str] = set()
            try:
                for name, transitions in by_breaker.items():
                    await self._append(store, name, transitions)
                    done.add(name)
            except BaseException:
                self._pending = [t for t in batch if t.breaker not in done] + self._pending
                raise

    async def _append(
        self, store: EventStore, name: str, transitions: list[BreakerTransition]
    ) -> None:
        stream = BREAKER_STREAM_PREFIX + name
        events = [NewEvent(TRANSITION_TOPIC, t.to_json()) for t in transitions]
        version = self._versions.get(name)
        attempts = 3
        while True:
            if version is None:
                version = await store.stream_version(stream)
            try:
                await store.append(stream, events, expected_version=version)
            except ConcurrencyError:
                # Another process sharing the store recorded its own transitions of this
                # target's breaker meanwhile; ours are facts too, so append after them.
                self._versions.pop(name, None)
                attempts -= 1
                if attempts == 0:
                    raise
                version = None
                continue
            self._versions[name] = version + len(events)
            return

    async def restore(self) -> None:
        """Restore every breaker recorded in the store to its last recorded state (an open
        breaker stays open until its wait, counted from the recorded transition, passed)."""
        store = self.store
        if store is None:
            return
        for info in await store.streams(prefix=BREAKER_STREAM_PREFIX, limit=1_000_000):
            last = await store.read(info.stream, backwards=True, limit=1)
            if not last:
                continue
            transition = BreakerTransition.from_json(last[0].state)
            self.get(transition.breaker).restore([transition])
            self._versions[transition.breaker] = info.version

    # -- internals -------------------------------------------------------------------------

    def _on_transition(self, transition: BreakerTransition) -> None:
        self._pending.append(transition)
        self._transitions.add(
            1,
            {
                "breaker": transition.breaker,
                "from_state": transition.from_state.value,
                "to_state": transition.to_state.value,
            },
        )
        for listener in list(self._listeners):
            try:
                listener(transition)
            except Exception:
                _log.exception(
                    "circuit breaker %r: a transition subscriber failed", transition.breaker
                )

    def _observe_states(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(1 if breaker.state is state else 0, {"breaker": name, "state": state.value})
            for name, breaker in self._breakers.items()
            for state in BreakerState
        ]

    def _observe_not_permitted(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(breaker._not_permitted, {"breaker": name})
            for name, breaker in self._breakers.items()
        ]
