"""Random sequences of calls, outcomes, durations, releases, operator actions and time
advances: the circuit breaker agrees, step by step, with a deliberately simple reference model
of resilience4j's rules (plain lists filtered on every question, no ring buffers or buckets),
and never lets more than ``permitted_calls_in_half_open`` calls through in half-open."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from collaborative_blocks.core.clock import VirtualClock
from collaborative_blocks.core.workflows.breakers import (
    BreakerConfig,
    BreakerState,
    BreakerTransition,
    CircuitBreaker,
    WindowType,
)
from collaborative_blocks.errors import CircuitOpenError

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
SLOW = 1.0  # slow_call_duration of every generated config


@dataclass
class Model:
    """resilience4j's rules, written the obvious way."""

    config: BreakerConfig
    state: BreakerState = CLOSED
    outcomes: list[tuple[float, bool, bool]] = field(default_factory=list)  # (t, failed, slow)
    trials: list[tuple[bool, bool]] = field(default_factory=list)
    open_until: float = 0.0
    half_open_since: float = 0.0
    permits: int = 0
    not_permitted: int = 0
    transitions: list[tuple[BreakerState, BreakerState]] = field(default_factory=list)
    # Which window metrics show: the trial calls' from HALF_OPEN on, the closed window's from
    # CLOSED on; OPEN keeps showing the one that opened it.
    trial_window: bool = False

    def go(self, state: BreakerState, now: float) -> None:
        self.transitions.append((self.state, state))
        self.state = state
        if state is OPEN:
            self.open_until = now + self.config.wait_duration_in_open
        elif state is HALF_OPEN:
            self.half_open_since = now
            self.permits = self.config.permitted_calls_in_half_open
            self.trials = []
            self.trial_window = True
        else:
            self.outcomes = []
            self.trial_window = False

    def window(self, now: float) -> list[tuple[bool, bool]]:
        if self.trial_window:
            return self.trials
        size = self.config.window_size
        if self.config.window_type is WindowType.COUNT_BASED:
            return [(f, s) for _, f, s in self.outcomes[-size:]]
        oldest = math.floor(now) - size + 1
        return [(f, s) for t, f, s in self.outcomes if math.floor(t) >= oldest]

    def minimum(self) -> int:
        config = self.config
        if self.trial_window:
            return config.permitted_calls_in_half_open
        if config.window_type is WindowType.COUNT_BASED:
            return min(config.minimum_number_of_calls, config.window_size)
        return config.minimum_number_of_calls

    def counts(self, now: float) -> tuple[int, int, int]:
        window = self.window(now)
        return len(window), sum(f for f, _ in window), sum(s for _, s in window)

    def exceeded(self, now: float) -> bool:
        calls, failed, slow = self.counts(now)
        return (
            failed * 100 / calls >= self.config.failure_rate_threshold
            or slow * 100 / calls >= self.config.slow_call_rate_threshold
        )

    def half_open_expired(self, now: float) -> bool:
        limit = self.config.max_wait_in_half_open
        return limit > 0 and now - self.half_open_since >= limit

    def retry_after(self, now: float) -> float:
        if self.state is CLOSED:
            return 0.0
        if self.state is OPEN:
            return max(self.open_until - now, 0.0)
        if self.half_open_expired(now):
            return self.config.wait_duration_in_open
        if self.permits:
            return 0.0
        if self.config.max_wait_in_half_open > 0:
            return self.half_open_since + self.config.max_wait_in_half_open - now
        return min(SLOW, self.config.wait_duration_in_open)

    def acquire(self, now: float) -> float | None:
        """None when permitted, else the retry_after the refusal should carry."""
        if self.state is CLOSED:
            return None
        if self.state is OPEN:
            if now < self.open_until:
                self.not_permitted += 1
                return self.open_until - now
            self.go(HALF_OPEN, now)
        elif self.half_open_expired(now):
            self.go(OPEN, now)
            self.not_permitted += 1
            return self.open_until - now
        if self.permits == 0:
            self.not_permitted += 1
            if self.config.max_wait_in_half_open > 0:
                return self.half_open_since + self.config.max_wait_in_half_open - now
            return min(SLOW, self.config.wait_duration_in_open)
        self.permits -= 1
        return None

    def release(self) -> None:
        if self.state is HALF_OPEN:
            self.permits = min(self.permits + 1, self.config.permitted_calls_in_half_open)

    def record(self, failed: bool, duration: float, now: float) -> None:
        slow = duration > SLOW
        if self.state is CLOSED:
            self.outcomes.append((now, failed, slow))
            if len(self.window(now)) >= self.minimum() and self.exceeded(now):
                self.go(OPEN, now)
        elif self.state is HALF_OPEN:
            if self.half_open_expired(now):
                self.go(OPEN, now)
                return
            self.trials.append((failed, slow))
            if len(self.trials) >= self.config.permitted_calls_in_half_open:
                self.go(OPEN if self.exceeded(now) else CLOSED, now)


configs = st.builds(
    BreakerConfig,
    failure_rate_threshold=st.sampled_from([25.0, 50.0, 75.0, 100.0]),
    slow_call_rate_threshold=st.sampled_from([50.0, 100.0]),
    slow_call_duration=st.just(SLOW),
    window_type=st.sampled_from(WindowType),
    window_size=st.integers(1, 6),
    minimum_number_of_calls=st.integers(1, 8),
    permitted_calls_in_half_open=st.integers(1, 3),
    wait_duration_in_open=st.sampled_from([1.0, 5.0]),
    max_wait_in_half_open=st.sampled_from([0.0, 3.0]),
    record_errors=st.just(("Boom", "Timeout")),
    ignore_errors=st.just(("Invalid",)),
)

acquire = st.tuples(st.just("acquire"))
finish = st.tuples(
    st.just("finish"),
    st.sampled_from(["ok", "Boom", "Timeout", "Unlisted", "Invalid"]),
    st.sampled_from([0.5, 1.0, 1.5, 3.0]),
)
advance = st.tuples(st.just("advance"), st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.5, 7.0]))
rare = st.sampled_from([("release",), ("force_open",), ("reset",)])
# Calls and outcomes dominate, so windows fill up between the rarer operator actions.
operations = st.lists(
    st.one_of(acquire, finish, acquire, finish, finish, advance, rare),
    min_size=10,
    max_size=150,
)


@settings(max_examples=400, deadline=None)
@given(config=configs, ops=operations)
def test_the_breaker_follows_the_reference_model(
    config: BreakerConfig, ops: list[tuple[object, ...]]
) -> None:
    asyncio.run(run(config, ops))


async def run(config: BreakerConfig, ops: list[tuple[object, ...]]) -> None:
    clock = VirtualClock()
    seen: list[BreakerTransition] = []
    breaker = CircuitBreaker("target", config, clock=clock, listener=seen.append)
    model = Model(config)
    in_flight = 0  # calls permitted and not finished
    let_through = 0  # calls permitted in the current half-open episode
    returned = 0  # permits given back in it (releases, ignored errors)
    for op in ops:
        now = clock.monotonic()
        if op[0] == "acquire":
            expected = model.acquire(now)
            episode = len(seen)
            refusal: CircuitOpenError | None = None
            try:
                breaker.acquire()
            except CircuitOpenError as error:
                refusal = error
            if refusal is not None:
                assert expected is not None
                assert refusal.retry_after == expected
                assert refusal.retry_after > 0
            else:
                assert expected is None
                in_flight += 1
                if breaker.state is HALF_OPEN:
                    if len(seen) != episode:  # this acquire moved OPEN -> HALF_OPEN
                        let_through = returned = 0
                    let_through += 1
                    assert let_through - returned <= config.permitted_calls_in_half_open
        elif op[0] == "finish" and in_flight:
            in_flight -= 1
            _, kind, duration = op
            assert isinstance(duration, float)
            if kind == "ok":
                model.record(False, duration, now)
                breaker.on_success(duration)
            elif kind == "Invalid":
                model.release()
                returned += breaker.state is HALF_OPEN
                breaker.on_error(duration, "Invalid")
            else:
                model.record(kind != "Unlisted", duration, now)
                breaker.on_error(duration, str(kind))
        elif op[0] == "release" and in_flight:
            in_flight -= 1
            model.release()
            returned += breaker.state is HALF_OPEN
            breaker.release()
        elif op[0] == "advance":
            assert isinstance(op[1], float)
            await clock.advance(op[1])
        elif op[0] == "force_open":
            model.go(OPEN, now)
            breaker.force_open()
        elif op[0] == "reset" and model.state is not CLOSED:
            model.go(CLOSED, now)
            breaker.reset()
        if breaker.state is not HALF_OPEN:
            let_through = returned = 0

        now = clock.monotonic()
        assert breaker.state is model.state
        assert [(t.from_state, t.to_state) for t in seen] == model.transitions
        metrics = breaker.metrics()
        assert (metrics.calls, metrics.failed, metrics.slow) == model.counts(now)
        assert metrics.not_permitted == model.not_permitted
        assert breaker.retry_after() == model.retry_after(now)
        if metrics.calls >= model.minimum():
            assert metrics.failure_rate == metrics.failed * 100 / metrics.calls
        else:
            assert metrics.failure_rate == -1.0
