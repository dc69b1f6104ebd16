"""Circuit breakers: every transition of resilience4j's table, both window types, minimum
calls, slow calls, half-open permits, error lists, settings, metrics, and restore from a
real store after a restart. Time is a VirtualClock: nothing sleeps."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from collaborative_blocks.core.clock import VirtualClock
from collaborative_blocks.core.settings import load_settings
from collaborative_blocks.core.workflows.breakers import (
    BREAKER_STREAM_PREFIX,
    TRANSITION_TOPIC,
    WAKE_TOLERANCE,
    BreakerConfig,
    BreakerRegistry,
    BreakerState,
    BreakerTransition,
    CircuitBreaker,
    WindowType,
)
from collaborative_blocks.errors import (
    CircuitOpenError,
    ConfigurationError,
    CorruptRecordError,
    StoreClosedError,
)
from collaborative_blocks.stores import EventStore, NewEvent, open_store

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def make(clock: VirtualClock, **config: Any) -> tuple[CircuitBreaker, list[BreakerTransition]]:
    seen: list[BreakerTransition] = []
    breaker = CircuitBreaker("payments", BreakerConfig(**config), clock=clock, listener=seen.append)
    return breaker, seen


def fail(breaker: CircuitBreaker, times: int = 1, duration: float = 0.1) -> None:
    for _ in range(times):
        breaker.acquire()
        breaker.on_error(duration, "TimeoutError")


def succeed(breaker: CircuitBreaker, times: int = 1, duration: float = 0.1) -> None:
    for _ in range(times):
        breaker.acquire()
        breaker.on_success(duration)


def refused(breaker: CircuitBreaker) -> CircuitOpenError:
    with pytest.raises(CircuitOpenError) as info:
        breaker.acquire()
    return info.value


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


# -- the lifecycle -----------------------------------------------------------------------------


def test_the_lifecycle_is_one_transitions_machine_for_the_class(clock: VirtualClock) -> None:
    a, _ = make(clock)
    b, _ = make(clock)
    assert repr(a) == "CircuitBreaker('payments', state=closed)"
    assert a.lifecycle is b.lifecycle is CircuitBreaker.lifecycle
    lifecycle = CircuitBreaker.lifecycle
    assert lifecycle.allowed(CLOSED) == ["force_open", "trip"]
    assert lifecycle.allowed(OPEN) == ["force_open", "half_open", "reset"]
    assert lifecycle.allowed(HALF_OPEN) == ["close", "force_open", "reset", "trip"]


# -- CLOSED -> OPEN ----------------------------------------------------------------------------


def test_closed_opens_when_the_failure_rate_reaches_the_threshold(clock: VirtualClock) -> None:
    breaker, seen = make(clock, window_size=4, minimum_number_of_calls=4)
    succeed(breaker, 2)
    fail(breaker)
    assert breaker.state is CLOSED
    assert breaker.metrics().failure_rate == -1.0  # 3 calls < minimum 4: no rate yet
    fail(breaker)  # 2 of 4 failed: 50 % >= 50 %
    assert breaker.state is OPEN
    [transition] = seen
    assert (transition.from_state, transition.to_state) == (CLOSED, OPEN)
    assert transition.failure_rate == 50.0
    assert transition.at == clock.now()
    assert "failure rate 50% >= failure_rate_threshold 50%" in transition.reason


def test_no_rate_is_computed_below_the_minimum_number_of_calls(clock: VirtualClock) -> None:
    breaker, seen = make(clock, window_size=10, minimum_number_of_calls=10)
    fail(breaker, 9)
    assert breaker.state is CLOSED
    assert breaker.metrics() == breaker.metrics().__class__(-1.0, -1.0, 9, 9, 0, 0)
    fail(breaker)
    assert breaker.state is OPEN
    assert len(seen) == 1


def test_a_count_window_keeps_only_the_last_n_calls(clock: VirtualClock) -> None:
    breaker, _ = make(clock, window_size=4, minimum_number_of_calls=4, failure_rate_threshold=75)
    fail(breaker, 2)
    succeed(breaker, 2)  # F F S S: 50 %
    succeed(breaker, 2)  # evicts both failures: S S S S
    metrics = breaker.metrics()
    assert (metrics.calls, metrics.failed, metrics.failure_rate) == (4, 0, 0.0)
    fail(breaker, 2)  # S S F F: 50 % < 75 %
    assert breaker.state is CLOSED
    fail(breaker)  # S F F F: 75 %
    assert breaker.state is OPEN


async def test_a_time_window_forgets_calls_older_than_its_seconds(clock: VirtualClock) -> None:
    breaker, _ = make(
        clock, window_type=WindowType.TIME_BASED, window_size=10, minimum_number_of_calls=4
    )
    fail(breaker, 3)
    await clock.advance(5)
    assert breaker.metrics().calls == 3
    await clock.advance(5)  # the bucket of second 0 leaves the window of seconds 1..10
    assert breaker.metrics().calls == 0
    fail(breaker)  # only one failure within the window: under the minimum
    assert breaker.state is CLOSED
    await clock.advance(3.5)
    fail(breaker, 2)
    assert breaker.state is CLOSED  # 3 calls within the window
    succeed(breaker)  # 4 calls, 3 failed: 75 %
    assert breaker.state is OPEN


async def test_a_time_window_evicts_bucket_by_bucket(clock: VirtualClock) -> None:
    breaker, _ = make(
        clock, window_type="time_based", window_size=3, minimum_number_of_calls=100 // 100
    )
    assert breaker.config.window_type is WindowType.TIME_BASED
    succeed(breaker, 1)  # second 0
    await clock.advance(1)
    succeed(breaker, 2)  # second 1
    await clock.advance(1)
    succeed(breaker, 3)  # second 2
    assert breaker.metrics().calls == 6
    await clock.advance(1)  # second 3: second 0 falls out
    assert breaker.metrics().calls == 5
    await clock.advance(1)
    assert breaker.metrics().calls == 3
    await clock.advance(100)  # a long gap empties the window at once
    assert breaker.metrics().calls == 0
    succeed(breaker)
    assert breaker.metrics().calls == 1


def test_closed_opens_when_the_slow_call_rate_reaches_its_threshold(clock: VirtualClock) -> None:
    breaker, seen = make(
        clock,
        window_size=4,
        minimum_number_of_calls=4,
        slow_call_duration=1.0,
        slow_call_rate_threshold=50,
    )
    succeed(breaker, 2, duration=1.0)  # exactly the threshold is not slow
    succeed(breaker, 1, duration=1.5)
    assert breaker.metrics().slow == 1
    breaker.acquire()
    breaker.on_error(2.0, "TimeoutError")  # slow and failed: counts for both rates
    assert breaker.state is OPEN
    assert seen[0].slow_call_rate == 50.0
    assert seen[0].failure_rate == 25.0
    assert "slow-call rate 50%" in seen[0].reason


# -- OPEN --------------------------------------------------------------------------------------


async def test_open_fails_fast_until_the_wait_passed(clock: VirtualClock) -> None:
    breaker, seen = make(clock, window_size=2, minimum_number_of_calls=2, wait_duration_in_open=30)
    fail(breaker, 2)
    error = refused(breaker)
    assert (error.target, error.retry_after) == ("payments", 30.0)
    await clock.advance(20)
    assert refused(breaker).retry_after == pytest.approx(10.0)
    assert breaker.retry_after() == pytest.approx(10.0)
    assert breaker.metrics().not_permitted == 2
    await clock.advance(10)
    assert breaker.state is OPEN  # lazily: nothing moves it without a call
    assert breaker.retry_after() == 0.0
    breaker.acquire()  # the first trial call
    assert breaker.state is HALF_OPEN
    assert [(t.from_state, t.to_state) for t in seen] == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


def test_outcomes_of_calls_permitted_before_opening_change_nothing(clock: VirtualClock) -> None:
    breaker, seen = make(clock, window_size=2, minimum_number_of_calls=2)
    breaker.acquire()  # a call in flight
    fail(breaker, 2)
    breaker.on_success(0.1)  # it finishes while open
    assert breaker.state is OPEN
    assert len(seen) == 1


# -- HALF_OPEN ---------------------------------------------------------------------------------


async def half_open(breaker: CircuitBreaker, clock: VirtualClock) -> None:
    breaker.force_open()
    await clock.advance(breaker.config.wait_duration_in_open)
    breaker.acquire()
    assert breaker.state is HALF_OPEN


async def test_half_open_lets_the_permitted_trial_calls_through_and_no_more(
    clock: VirtualClock,
) -> None:
    breaker, _ = make(clock, permitted_calls_in_half_open=3)
    await half_open(breaker, clock)
    breaker.acquire()
    breaker.acquire()
    error = refused(breaker)
    assert error.retry_after > 0
    assert breaker.metrics().not_permitted == 1
    breaker.release()  # one trial call was not made after all
    breaker.acquire()
    refused(breaker)


async def test_releases_of_calls_from_before_half_open_add_no_trial_permits(
    clock: VirtualClock,
) -> None:
    breaker, _ = make(clock, permitted_calls_in_half_open=2)
    for _ in range(3):
        breaker.acquire()  # calls in flight while closed
    await half_open(breaker, clock)  # takes the first of the two permits
    for _ in range(3):
        breaker.release()  # the old calls were cancelled; at most the one taken comes back
    breaker.acquire()
    breaker.acquire()
    refused(breaker)


async def test_half_open_closes_with_a_fresh_window_when_the_trial_went_well(
    clock: VirtualClock,
) -> None:
    breaker, seen = make(clock, permitted_calls_in_half_open=3, window_size=4)
    fail(breaker, 3)  # in the closed window, before opening
    await half_open(breaker, clock)
    breaker.acquire()
    breaker.acquire()
    breaker.on_success(0.1)
    breaker.on_error(0.1, "TimeoutError")
    assert breaker.state is HALF_OPEN  # decided only when every trial call finished
    assert breaker.metrics().failure_rate == -1.0
    breaker.on_success(0.1)  # 1 of 3 failed: 33 % < 50 %
    assert breaker.state is CLOSED
    assert breaker.metrics().calls == 0
    assert seen[-1].from_state is HALF_OPEN
    assert seen[-1].failure_rate == pytest.approx(100 / 3)


async def test_half_open_opens_again_when_the_trial_failed(clock: VirtualClock) -> None:
    breaker, seen = make(clock, permitted_calls_in_half_open=2, wait_duration_in_open=10)
    await half_open(breaker, clock)
    breaker.acquire()
    breaker.on_success(0.1)
    breaker.on_error(0.1, "TimeoutError")  # 50 % >= 50 %
    assert breaker.state is OPEN
    assert (seen[-1].from_state, seen[-1].to_state) == (HALF_OPEN, OPEN)
    assert seen[-1].reason.startswith("trial calls: failure rate 50%")
    assert refused(breaker).retry_after == 10.0  # a full new wait


async def test_half_open_opens_when_the_trial_outlasts_max_wait(clock: VirtualClock) -> None:
    breaker, seen = make(clock, permitted_calls_in_half_open=2, max_wait_in_half_open=5)
    await half_open(breaker, clock)
    breaker.acquire()
    assert refused(breaker).retry_after == pytest.approx(5.0)  # until the trial's end
    assert breaker.retry_after() == pytest.approx(5.0)
    await clock.advance(5)
    assert breaker.retry_after() == 60.0  # the next call finds the trial expired
    assert refused(breaker).retry_after == 60.0
    assert breaker.state is OPEN
    assert "max_wait_in_half_open" in seen[-1].reason


async def test_an_outcome_after_max_wait_in_half_open_opens(clock: VirtualClock) -> None:
    breaker, _ = make(clock, permitted_calls_in_half_open=1, max_wait_in_half_open=5)
    await half_open(breaker, clock)
    await clock.advance(6)
    breaker.on_success(6)
    assert breaker.state is OPEN


# -- errors: recorded, ignored -----------------------------------------------------------------


async def test_ignored_errors_count_as_neither_and_return_the_permit(
    clock: VirtualClock,
) -> None:
    breaker, _ = make(
        clock, window_size=2, minimum_number_of_calls=2, ignore_errors=("ValidationError",)
    )
    for _ in range(5):
        breaker.acquire()
        breaker.on_error(0.1, "ValidationError")
    assert breaker.metrics().calls == 0
    breaker.reset()
    breaker, _ = make(clock, permitted_calls_in_half_open=1, ignore_errors=("ValidationError",))
    await half_open(breaker, clock)
    breaker.on_error(0.1, "ValidationError")
    breaker.acquire()  # the permit came back
    assert breaker.state is HALF_OPEN


def test_with_record_errors_only_those_count_as_failures(clock: VirtualClock) -> None:
    breaker, _ = make(
        clock,
        window_size=4,
        minimum_number_of_calls=4,
        record_errors=["TimeoutError"],
        ignore_errors=("TimeoutError.Ignored",),
    )
    assert breaker.config.record_errors == ("TimeoutError",)
    for _ in range(4):
        breaker.acquire()
        breaker.on_error(0.1, "KeyError")  # not listed: a success
    metrics = breaker.metrics()
    assert (metrics.calls, metrics.failed) == (4, 0)
    fail(breaker, 2)  # TimeoutError is recorded
    assert breaker.state is OPEN


def test_ignore_errors_win_over_record_errors(clock: VirtualClock) -> None:
    breaker, _ = make(clock, record_errors=("TimeoutError",), ignore_errors=("TimeoutError",))
    fail(breaker, 10)
    assert breaker.metrics().calls == 0


# -- call(), force_open(), reset(), listeners ---------------------------------------------------


async def test_call_times_the_call_on_the_clock_and_records_it(clock: VirtualClock) -> None:
    breaker, _ = make(
        clock,
        window_size=2,
        minimum_number_of_calls=2,
        slow_call_duration=1,
        slow_call_rate_threshold=100,
    )

    async def slow() -> str:
        await clock.advance(2)
        return "done"

    async def broken() -> None:
        raise KeyError("x")

    assert await breaker.call(slow) == "done"
    with pytest.raises(KeyError):
        await breaker.call(broken)
    metrics = breaker.metrics()
    assert (metrics.calls, metrics.failed, metrics.slow) == (2, 1, 1)
    assert breaker.state is OPEN  # 50 % failed
    with pytest.raises(CircuitOpenError):
        await breaker.call(slow)


async def test_a_cancelled_call_returns_its_trial_permit(clock: VirtualClock) -> None:
    breaker, _ = make(clock, permitted_calls_in_half_open=1)
    breaker.force_open()
    await clock.advance(60)
    started = asyncio.Event()

    async def hangs() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(breaker.call(hangs))
    await started.wait()
    refused(breaker)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    breaker.acquire()  # the permit is back
    assert breaker.state is HALF_OPEN


async def test_force_open_and_reset_are_recorded_transitions(clock: VirtualClock) -> None:
    breaker, seen = make(clock, wait_duration_in_open=10)
    breaker.force_open("maintenance")
    await clock.advance(6)
    breaker.force_open()  # again: the wait restarts
    await clock.advance(6)
    assert refused(breaker).retry_after == pytest.approx(4.0)
    breaker.reset()
    assert breaker.state is CLOSED
    breaker.reset()  # already closed: nothing to record
    assert [(t.from_state, t.to_state, t.reason) for t in seen] == [
        (CLOSED, OPEN, "maintenance"),
        (OPEN, OPEN, "forced open"),
        (OPEN, CLOSED, "reset"),
    ]
    assert seen[0].failure_rate == -1.0


def test_a_failing_listener_is_logged_and_the_breaker_goes_on(
    clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(transition: BreakerTransition) -> None:
        raise RuntimeError("listener bug")

    breaker = CircuitBreaker("x", BreakerConfig(), clock=clock, listener=broken)
    with caplog.at_level(logging.ERROR):
        breaker.force_open()
    assert breaker.state is OPEN
    assert "transition listener failed" in caplog.text


# -- configuration -----------------------------------------------------------------------------


def test_defaults_from_settings_five_failures_in_a_row_open(clock: VirtualClock) -> None:
    config = BreakerConfig.from_settings(load_settings({}))
    assert config == BreakerConfig()  # the dataclass defaults are the settings' defaults
    assert (config.minimum_number_of_calls, config.window_size) == (5, 10)
    breaker = CircuitBreaker("x", config, clock=clock)
    fail(breaker, 4)
    assert breaker.state is CLOSED
    fail(breaker)
    assert breaker.state is OPEN


def test_defaults_keep_closed_under_half_of_the_last_ten_failing(clock: VirtualClock) -> None:
    breaker = CircuitBreaker("x", BreakerConfig.from_settings(load_settings({})), clock=clock)
    for _ in range(8):
        succeed(breaker)
        fail(breaker)
        succeed(breaker)
    assert breaker.state is CLOSED  # a third failed
    fail(breaker, 2)  # the last ten now hold 5 failures
    assert breaker.state is OPEN


async def test_circuit_breaker_settings_are_honoured(clock: VirtualClock) -> None:
    settings = load_settings(
        {"CIRCUIT_BREAKER_FAILURE_THRESHOLD": "2", "CIRCUIT_BREAKER_TIMEOUT_SECONDS": "7.5"}
    )
    registry = BreakerRegistry(clock=clock, settings=settings)
    breaker = registry.get("inventory")
    assert breaker.config.wait_duration_in_open == 7.5
    fail(breaker, 2)
    assert breaker.state is OPEN
    await clock.advance(7.4)
    refused(breaker)
    await clock.advance(0.1)
    breaker.acquire()
    assert breaker.state is HALF_OPEN


def test_from_settings_takes_changes_and_rejects_unknown_fields() -> None:
    settings = load_settings({})
    assert BreakerConfig.from_settings(settings, slow_call_duration=2).slow_call_duration == 2
    with pytest.raises(ConfigurationError, match="no field treshold"):
        BreakerConfig.from_settings(settings, treshold=3)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("failure_rate_threshold", 0),
        ("failure_rate_threshold", 101),
        ("failure_rate_threshold", "50"),
        ("slow_call_rate_threshold", -1),
        ("slow_call_duration", 0),
        ("slow_call_duration", float("nan")),
        ("window_type", "sliding"),
        ("window_size", 0),
        ("window_size", 2.5),
        ("minimum_number_of_calls", 0),
        ("permitted_calls_in_half_open", 0),
        ("permitted_calls_in_half_open", True),
        ("wait_duration_in_open", 0),
        ("wait_duration_in_open", float("inf")),
        ("max_wait_in_half_open", -1),
        ("record_errors", "TimeoutError"),
        ("ignore_errors", ("",)),
    ],
)
def test_a_bad_config_value_is_an_error_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"BreakerConfig.{field}="):
        BreakerConfig(**{field: value})


def test_a_count_window_needs_at_most_its_size_in_calls(clock: VirtualClock) -> None:
    breaker, _ = make(clock, window_size=3, minimum_number_of_calls=50)
    fail(breaker, 3)  # resilience4j caps the minimum at the window size
    assert breaker.state is OPEN
    breaker, _ = make(
        clock, window_type=WindowType.TIME_BASED, window_size=3, minimum_number_of_calls=4
    )
    fail(breaker, 3)  # a time window may hold more calls than it has seconds: no cap
    assert breaker.state is CLOSED
    fail(breaker)
    assert breaker.state is OPEN


def test_a_breaker_needs_a_name(clock: VirtualClock) -> None:
    with pytest.raises(ConfigurationError, match="non-empty name"):
        CircuitBreaker("", BreakerConfig(), clock=clock)
    registry = BreakerRegistry(clock=clock)
    with pytest.raises(ConfigurationError, match="non-empty target"):
        registry.get("")
    with pytest.raises(ConfigurationError, match="too long"):
        registry.get("x" * 250)


# -- the registry: storing, restoring, measuring -----------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventStore]:
    url = "memory://" if request.param == "memory" else f"sqlite+aiosqlite:///{tmp_path}/e.db"
    opened = await open_store(url)
    yield opened
    await opened.close()


async def test_flush_appends_each_transition_to_the_breakers_stream(
    clock: VirtualClock, store: EventStore
) -> None:
    registry = BreakerRegistry(BreakerConfig(wait_duration_in_open=5), clock=clock, store=store)
    breaker = registry.get("billing")
    breaker.force_open()
    await clock.advance(5)
    breaker.acquire()
    assert [t.to_state for t in registry.pending()] == [OPEN, HALF_OPEN]
    await registry.flush()
    assert registry.pending() == []
    breaker.reset()
    await registry.flush()
    await registry.flush()  # nothing pending: nothing written
    stored = await store.read(BREAKER_STREAM_PREFIX + "billing")
    assert [e.version for e in stored] == [1, 2, 3]
    assert {e.topic for e in stored} == {TRANSITION_TOPIC}
    decoded = [BreakerTransition.from_json(e.state) for e in stored]
    assert [(t.from_state, t.to_state) for t in decoded] == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]
    assert decoded[1].at == clock.now()


async def test_two_registries_sharing_a_store_append_after_each_other(
    clock: VirtualClock, store: EventStore
) -> None:
    first = BreakerRegistry(clock=clock, store=store)
    second = BreakerRegistry(clock=clock, store=store)
    first.get("billing").force_open()
    await first.flush()
    second.get("billing").force_open()
    await second.flush()  # its version was stale: it re-reads and appends after
    first.get("billing").reset()
    await first.flush()
    assert await store.stream_version(BREAKER_STREAM_PREFIX + "billing") == 3


async def test_an_open_breaker_stays_open_across_a_restart_until_its_wait_passed(
    store: EventStore,
) -> None:
    clock = VirtualClock(start=1_000.0)
    registry = BreakerRegistry(BreakerConfig(wait_duration_in_open=60), clock=clock, store=store)
    registry.get("billing").force_open()
    registry.get("search").force_open()
    registry.get("search").reset()
    registry.get("never-tripped")
    await registry.flush()

    # The process restarts 20 s later: a new clock whose monotonic time starts again at 0.
    later = VirtualClock(start=1_020.0)
    restarted = BreakerRegistry(BreakerConfig(wait_duration_in_open=60), clock=later, store=store)
    await restarted.restore()
    assert restarted.states() == {"billing": OPEN, "search": CLOSED}
    assert restarted.pending() == []  # restoring records nothing new
    billing = restarted.get("billing")
    assert refused(billing).retry_after == pytest.approx(40.0)
    await later.advance(40)
    billing.acquire()
    assert billing.state is HALF_OPEN
    await restarted.flush()  # continues the stream where it was
    assert await store.stream_version(BREAKER_STREAM_PREFIX + "billing") == 2


async def test_a_breaker_whose_wait_passed_while_down_lets_a_trial_call_through(
    store: EventStore,
) -> None:
    registry = BreakerRegistry(clock=VirtualClock(start=0.0), store=store)
    registry.get("billing").force_open()
    await registry.flush()
    restarted = BreakerRegistry(clock=VirtualClock(start=3_600.0), store=store)
    await restarted.restore()
    billing = restarted.get("billing")
    assert billing.state is OPEN
    billing.acquire()
    assert billing.state is HALF_OPEN


async def test_a_half_open_breaker_restarts_its_trial_after_a_restart(store: EventStore) -> None:
    config = BreakerConfig(wait_duration_in_open=1, permitted_calls_in_half_open=2)
    clock = VirtualClock(start=0.0)
    registry = BreakerRegistry(config, clock=clock, store=store)
    breaker = registry.get("billing")
    breaker.force_open()
    await clock.advance(1)
    breaker.acquire()
    breaker.acquire()
    await registry.flush()
    restarted = BreakerRegistry(config, clock=VirtualClock(start=5.0), store=store)
    await restarted.restore()
    again = restarted.get("billing")
    assert again.state is HALF_OPEN
    again.acquire()
    again.acquire()  # the dead process's trial permits are not held against it
    refused(again)


async def test_a_failed_flush_keeps_the_transitions_pending(clock: VirtualClock) -> None:
    store = await open_store("memory://")
    registry = BreakerRegistry(clock=clock, store=store)
    registry.get("billing").force_open()
    await store.close()
    with pytest.raises(StoreClosedError):
        await registry.flush()
    assert [t.breaker for t in registry.pending()] == ["billing"]


async def test_flush_without_a_store_drops_the_pending_transitions(clock: VirtualClock) -> None:
    registry = BreakerRegistry(clock=clock)
    registry.get("billing").force_open()
    assert len(registry.pending()) == 1
    await registry.flush()
    assert registry.pending() == []
    await registry.restore()  # nothing to restore from


async def test_a_corrupt_stored_transition_is_a_clear_error(store: EventStore) -> None:
    await store.append(BREAKER_STREAM_PREFIX + "billing", [NewEvent(TRANSITION_TOPIC, b"{}")])
    registry = BreakerRegistry(clock=VirtualClock(), store=store)
    with pytest.raises(CorruptRecordError, match="circuit breaker transition"):
        await registry.restore()


def test_restore_refuses_another_breakers_transitions(clock: VirtualClock) -> None:
    breaker, _ = make(clock)
    other = BreakerTransition("search", CLOSED, OPEN, clock.now(), "x")
    with pytest.raises(ValueError, match="restore each breaker from its own stream"):
        breaker.restore([other])
    breaker.restore([])
    assert breaker.state is CLOSED


def test_registry_config_overrides_and_subscribers(clock: VirtualClock) -> None:
    special = BreakerConfig(window_size=2, minimum_number_of_calls=2)
    registry = BreakerRegistry(clock=clock, overrides={"flaky": special})
    assert registry.get("flaky").config is special
    assert registry.get("steady").config == BreakerConfig()
    assert registry.get("flaky") is registry.get("flaky")
    assert "flaky" in registry
    seen: list[BreakerTransition] = []
    unsubscribe = registry.subscribe(seen.append)

    def broken(transition: BreakerTransition) -> None:
        raise RuntimeError("subscriber bug")

    registry.subscribe(broken)  # a broken subscriber hurts nobody else
    fail(registry.get("flaky"), 2)
    assert [t.breaker for t in seen] == ["flaky"]
    unsubscribe()
    registry.get("flaky").reset()
    assert len(seen) == 1
    assert registry.states() == {"flaky": CLOSED, "steady": CLOSED}


def test_transitions_and_states_are_measured(clock: VirtualClock) -> None:
    reader = InMemoryMetricReader()
    registry = BreakerRegistry(clock=clock, meter_provider=MeterProvider(metric_readers=[reader]))
    registry.get("billing").force_open()
    refused(registry.get("billing"))
    registry.get("billing").reset()
    registry.get("billing").force_open()
    registry.get("search")

    points: dict[str, list[tuple[dict[str, object], object]]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    points.setdefault(metric.name, []).append(
                        (dict(point.attributes or {}), getattr(point, "value", None))
                    )
    transitions = points["cb.circuit_breaker.transitions"]
    assert ({"breaker": "billing", "from_state": "closed", "to_state": "open"}, 2) in transitions
    assert ({"breaker": "billing", "from_state": "open", "to_state": "closed"}, 1) in transitions
    states = points["cb.circuit_breaker.state"]
    assert ({"breaker": "billing", "state": "open"}, 1) in states
    assert ({"breaker": "billing", "state": "closed"}, 0) in states
    assert ({"breaker": "search", "state": "closed"}, 1) in states
    assert ({"breaker": "billing"}, 1) in points["cb.circuit_breaker.not_permitted"]


def test_a_transition_survives_its_json_form() -> None:
    transition = BreakerTransition("b", HALF_OPEN, OPEN, 12.5, "why", 50.0, 12.5)
    assert BreakerTransition.from_json(transition.to_json()) == transition
    with pytest.raises(CorruptRecordError):
        BreakerTransition.from_json(b"not json")


async def test_a_retry_that_wakes_a_rounding_error_early_is_let_through(
    clock: VirtualClock,
) -> None:
    # A caller schedules its retry on the wall clock (now() + retry_after); at epoch
    # magnitudes that lands up to an ulp (~2e-7 s) before the monotonic deadline. Refusing it
    # would answer with a near-zero retry_after and burn the caller's attempts in a loop.
    breaker, _ = make(clock, minimum_number_of_calls=1, window_size=1, wait_duration_in_open=5)
    breaker.acquire()
    breaker.on_error(0.0, "ValueError")
    assert breaker.state is BreakerState.OPEN
    await clock.advance(5.0 - WAKE_TOLERANCE / 4)
    assert breaker.retry_after() == 0.0
    breaker.acquire()  # a trial call, not a CircuitOpenError
    assert breaker.state is BreakerState.HALF_OPEN


async def test_a_retry_clearly_before_the_deadline_is_still_refused(clock: VirtualClock) -> None:
    breaker, _ = make(clock, minimum_number_of_calls=1, window_size=1, wait_duration_in_open=5)
    breaker.acquire()
    breaker.on_error(0.0, "ValueError")
    await clock.advance(5.0 - 10 * WAKE_TOLERANCE)
    assert breaker.retry_after() > WAKE_TOLERANCE
    with pytest.raises(CircuitOpenError):
        breaker.acquire()
