"""EventStream: append, replay from an offset, follow live, durable named subscriptions,
bounded retries that stop instead of skipping."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from collaborative_blocks.core.clock import VirtualClock
from collaborative_blocks.core.sync.stream import (
    SYNC_EVENT_TOPIC,
    EventStream,
    StreamContext,
    StreamEvent,
)
from collaborative_blocks.errors import StreamHandlerError, SyncError, SyncSerializationError
from collaborative_blocks.stores import EventStore, open_store


@dataclasses.dataclass
class PriceChanged:
    sku: str
    price: int


@pytest.fixture
async def store(tmp_path: Path) -> EventStore:
    opened = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}")
    yield opened  # type: ignore[misc]
    await opened.close()


async def test_append_returns_offsets_and_dataclasses_arrive_as_dicts(store: EventStore) -> None:
    clock = VirtualClock(start=1000.0)
    stream = EventStream(store=store, clock=clock)
    assert await stream.append_event("prices", PriceChanged("a", 1)) == 0
    await store.append("other", [])  # another stream in between does not shift offsets
    assert await stream.append_event("prices", {"sku": "b", "price": 2}) == 1
    events = await stream.read_stream("prices")
    assert [(e.offset, e.event_type, e.data) for e in events] == [
        (0, "PriceChanged", {"sku": "a", "price": 1}),
        (1, "dict", {"sku": "b", "price": 2}),
    ]
    assert events[0].recorded_at == 1000.0


async def test_unserialisable_event_is_a_typed_error_and_writes_nothing(store: EventStore) -> None:
    stream = EventStream(store=store)
    with pytest.raises(SyncSerializationError, match="JSON data"):
        await stream.append_event("prices", {"when": object()})
    with pytest.raises(SyncSerializationError):
        await stream.append_event("prices", {"price": float("nan")})
    assert await store.max_position() == 0


async def test_replay_from_offset_then_live_in_order_without_gaps(store: EventStore) -> None:
    stream = EventStream(store=store)
    for n in range(5):
        await stream.append_event("s", {"n": n})
        await stream.append_event("noise", {"n": n})
    seen: list[tuple[int, int]] = []

    async def handler(event: StreamEvent) -> None:
        seen.append((event.offset, event.data["n"]))

    subscription = await stream.subscribe_to_stream("s", handler, 2)
    for n in range(5, 8):
        await stream.append_event("s", {"n": n})
    await subscription.until_offset(7)
    assert seen == [(n, n) for n in range(2, 8)]
    subscription.cancel()
    await subscription.wait()  # a cancelled subscription ends quietly
    assert subscription.done
    assert subscription.error is None


async def test_subscribing_past_the_end_delivers_only_what_comes(store: EventStore) -> None:
    stream = EventStream(store=store)
    await stream.append_event("s", {"n": 0})
    seen: list[int] = []

    async def handler(event: StreamEvent) -> None:
        seen.append(event.offset)

    subscription = await stream.subscribe_to_stream("s", handler, 2)
    for n in range(1, 4):
        await stream.append_event("s", {"n": n})
    await subscription.until_offset(3)
    await subscription.close()
    assert seen == [2, 3]


async def test_bad_offset_is_refused(store: EventStore) -> None:
    stream = EventStream(store=store)

    async def handler(event: StreamEvent) -> None:
        pass

    with pytest.raises(SyncError, match="from_offset"):
        await stream.subscribe_to_stream("s", handler, -1)


async def test_named_subscription_resumes_after_restart_exactly_once(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    store = await open_store(url)
    stream = EventStream(store=store)
    for n in range(3):
        await stream.append_event("orders", {"n": n})

    async def project(event: StreamEvent, ctx: StreamContext) -> None:
        ctx.append_event("order-totals", {"from": event.offset})

    first = await stream.subscribe_to_stream("orders", project, 0, name="totals")
    await first.until_offset(2)
    await first.close()
    await store.close()

    # "Restart": a new store object on the same file, events appended while it was down.
    store = await open_store(url)
    stream = EventStream(store=store)
    for n in range(3, 5):
        await stream.append_event("orders", {"n": n})
    second = await stream.subscribe_to_stream("orders", project, 0, name="totals")
    await second.until_offset(4)
    await second.close()
    assert second.processed == 2  # it did not start over from from_offset=0
    totals = [e.data["from"] for e in await stream.read_stream("order-totals")]
    assert totals == [0, 1, 2, 3, 4]
    await store.close()


async def test_a_failing_handler_is_retried_on_the_clock(store: EventStore) -> None:
    clock = VirtualClock()
    stream = EventStream(store=store, clock=clock, max_retries=3, retry_delay=1.0)
    await stream.append_event("s", {"n": 0})
    calls: list[int] = []
    attempted = asyncio.Event()

    async def flaky(event: StreamEvent, ctx: StreamContext) -> None:
        calls.append(ctx.attempt)
        attempted.set()
        if ctx.attempt < 3:
            raise RuntimeError("not yet")

    subscription = await stream.subscribe_to_stream("s", flaky, 0)
    # The backoff sleep starts in the same step as the failed attempt, so once an attempt
    # has run, the subscription is asleep on the virtual clock.
    await attempted.wait()
    attempted.clear()
    await clock.advance(0.9)
    assert calls == [1]  # still backing off
    await clock.advance(0.1)  # first backoff: 1s
    await attempted.wait()
    attempted.clear()
    await clock.advance(1.9)
    assert calls == [1, 2]  # second backoff is 2s
    await clock.advance(0.1)
    await subscription.until_offset(0)
    assert calls == [1, 2, 3]
    await subscription.close()


async def test_a_handler_that_keeps_failing_stops_the_subscription_at_the_event(
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    store = await open_store(url)
    clock = VirtualClock()
    stream = EventStream(store=store, clock=clock, max_retries=2, retry_delay=0.5)
    for n in range(3):
        await stream.append_event("s", {"n": n})
    handled: list[int] = []

    async def poison(event: StreamEvent, ctx: StreamContext) -> None:
        if event.offset == 1:
            raise ValueError("bad data")
        ctx.append_event("out", {"n": event.offset})
        handled.append(event.offset)

    subscription = await stream.subscribe_to_stream("s", poison, 0, name="poisoned")
    while not subscription.done:
        await clock.run_until_idle()
        await asyncio.sleep(0)
    with pytest.raises(StreamHandlerError, match="offset 1") as caught:
        await subscription.wait()
    assert (caught.value.offset, caught.value.attempts) == (1, 3)
    assert isinstance(caught.value.__cause__, ValueError)
    assert handled == [0]  # offset 2 was not reached: nothing was skipped

    # Fixed handler, same name: resumes at the failed event.
    async def fixed(event: StreamEvent, ctx: StreamContext) -> None:
        ctx.append_event("out", {"n": event.offset})

    resumed = await stream.subscribe_to_stream("s", fixed, 0, name="poisoned")
    await resumed.until_offset(2)
    await resumed.close()
    assert [e.data["n"] for e in await stream.read_stream("out")] == [0, 1, 2]
    await store.close()


async def test_default_store_comes_from_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVENT_STORE_URL", f"sqlite+aiosqlite:///{tmp_path / 'default.db'}")
    stream = EventStream()
    assert await stream.append_event("s", {"n": 1}) == 0
    store = await stream.store()
    assert [e.topic for e in await store.read("s")] == [SYNC_EVENT_TOPIC]
    await stream.close()


async def test_cancel_right_after_the_handler_committed_still_stops_it(tmp_path: Path) -> None:
    # The handler's own commit (signalled from SQLite's writer thread) wakes the store's
    # subscription in the same loop turn as the cancel; on Python 3.11 one cancel can be
    # swallowed there, and the subscription would go on waiting for new events.
    store = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}")
    stream = EventStream(store=store)

    async def copy(event: StreamEvent, ctx: StreamContext) -> None:
        ctx.append_event("copies", event.data)

    for round_number in range(20):
        await stream.append_event("s", {"n": round_number})
        subscription = await stream.subscribe_to_stream("s", copy, round_number)
        await subscription.until_offset(round_number)
        subscription.cancel()
        await subscription.wait()
        assert subscription.done
    copies = await stream.read_stream("copies")
    assert [event.data["n"] for event in copies] == list(range(20))  # unnamed: appends too
    await store.close()
