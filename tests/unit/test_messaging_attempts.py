"""A dead letter lists every attempt, even when the consumers that made them crashed.

Two brokers on one store, each with its own log-backed transport, stand for two processes. The
first consumer fails twice and then "crashes" (its transport goes away without settling
anything); the second gets the redelivery after the ack timeout, fails the remaining attempts
and dead-letters the message. The dead letter must list all four attempts with their errors.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import pytest

from collaborative_blocks import load_settings
from collaborative_blocks.core.clock import VirtualClock
from collaborative_blocks.core.messaging import (
    DeadLetterReason,
    Message,
    MessageBroker,
    MessageContext,
    MessageType,
    RetryPolicy,
)
from collaborative_blocks.core.messaging.broker import EVENTS_SUBJECT
from collaborative_blocks.core.messaging.deadletters import (
    ATTEMPT_FAILED_TOPIC,
    ATTEMPTS_CLOSED_TOPIC,
    AttemptError,
    DeadLetter,
    attempts_stream,
    read_attempts,
    record_attempt,
)
from collaborative_blocks.errors import CorruptRecordError
from collaborative_blocks.plugins.transports.log import LogTransport
from collaborative_blocks.stores import EventStore, NewEvent
from collaborative_blocks.stores.memory import MemoryEventStore

GROUP = "workers"
ACK_TIMEOUT = 30.0


def make_broker(store: EventStore, clock: VirtualClock, seed: int) -> MessageBroker:
    return MessageBroker(
        transport=LogTransport(store, clock=clock, poll_interval=0.05),
        store=store,
        clock=clock,
        rng=random.Random(seed),
        settings=load_settings({}),
        tracing=False,
        handler_timeout=5.0,
        ack_timeout=ACK_TIMEOUT,
        retry=RetryPolicy(max_retries=3, base_delay=1.0, max_delay=4.0, jitter=0.0),
    )


async def advance_until_recorded(
    store: EventStore, clock: VirtualClock, message_id: str, count: int
) -> None:
    for _ in range(4000):
        if len(await store.read(attempts_stream(GROUP, message_id))) >= count:
            return
        await clock.advance(0.05)
    raise AssertionError(f"{count} failed attempts were never recorded")


async def test_dead_letter_lists_the_attempts_of_a_crashed_consumer() -> None:
    clock = VirtualClock()
    store = MemoryEventStore()
    first = make_broker(store, clock, seed=1)
    second = make_broker(store, clock, seed=2)
    calls: list[str] = []

    def failing(who: str) -> object:
        async def handle(message: Message, ctx: MessageContext) -> None:
            calls.append(who)
            raise RuntimeError(f"{who} failed attempt {ctx.attempt}")

        return handle

    await first.subscribe("job", failing("first"), group=GROUP)  # type: ignore[arg-type]
    sent = await first.publish(Message(MessageType.EVENT, "job", 1, source="test"))
    await advance_until_recorded(store, clock, sent.id, 2)
    # The crash: the transport is gone before the consumer could settle or retry anything.
    await first.transport.close()
    await first.close()
    assert calls == ["first", "first"]

    await second.subscribe("job", failing("second"), group=GROUP)  # type: ignore[arg-type]
    queue = second.dead_letters()
    for _ in range(4000):
        if await queue.count():
            break
        await clock.advance(0.05)
    (letter,) = await queue.list()
    assert isinstance(letter, DeadLetter)
    assert letter.reason is DeadLetterReason.RETRIES_EXHAUSTED
    assert letter.message_id == sent.id
    assert (letter.subject, letter.group) == (EVENTS_SUBJECT, GROUP)
    assert calls == ["first", "first", "second", "second"], "4 attempts in all, not more"
    assert [e.attempt for e in letter.errors] == [1, 2, 3, 4]
    assert [e.error for e in letter.errors] == [
        "first failed attempt 1",
        "first failed attempt 2",
        "second failed attempt 3",
        "second failed attempt 4",
    ]
    assert {e.error_type for e in letter.errors} == {"RuntimeError"}
    consumers = [e.consumer for e in letter.errors]
    assert consumers == [first.consumer_name] * 2 + [second.consumer_name] * 2
    assert letter.detail.startswith("4 attempts failed")
    await second.close()


async def test_attempts_are_not_recorded_for_a_handler_that_succeeds_first_time() -> None:
    clock = VirtualClock()
    store = MemoryEventStore()
    broker = make_broker(store, clock, seed=3)
    handled: list[object] = []

    async def fine(message: Message) -> None:
        handled.append(message.payload)

    await broker.subscribe("job", fine, group=GROUP)
    sent = await broker.publish(Message(MessageType.EVENT, "job", 7, source="test"))
    for _ in range(400):
        if handled:
            break
        await clock.advance(0.05)
    assert handled == [7]
    assert await read_attempts(store, GROUP, sent.id) == []
    await broker.close()


async def test_attempt_records_round_trip_and_corrupt_ones_say_so() -> None:
    store = MemoryEventStore()
    error = AttemptError(2, "ValueError", "bad", 12.5, "consumer-x")
    assert AttemptError.from_dict(error.to_dict()) == error
    assert AttemptError.from_dict({"attempt": 1, "type": "E", "error": "e", "at": 0}).consumer == ""
    await store.append(attempts_stream(GROUP, "m-1"), [NewEvent(ATTEMPT_FAILED_TOPIC, b"{}")])
    with pytest.raises(CorruptRecordError, match="m-1"):
        await read_attempts(store, GROUP, "m-1")


async def crash(broker: MessageBroker) -> None:
    """The process dies: its transport goes first, so nothing is settled or handed back."""
    await broker.transport.close()
    await broker.close()


async def advance_until(clock: VirtualClock, condition: Callable[[], Awaitable[object]]) -> None:
    for _ in range(4000):
        if await condition():
            return
        await clock.advance(0.05)
    raise AssertionError("condition never became true")


async def test_a_crash_after_the_last_attempt_is_dead_lettered_without_running_again() -> None:
    clock = VirtualClock()
    store = MemoryEventStore()
    first = make_broker(store, clock, seed=4)
    second = make_broker(store, clock, seed=5)
    hung = asyncio.Event()
    calls: list[str] = []

    async def hang(message: Message) -> None:
        hung.set()
        await asyncio.Event().wait()

    async def count(message: Message) -> None:
        calls.append(message.id)
        raise RuntimeError("must not run")

    await first.subscribe("job", hang, group=GROUP)
    sent = await first.publish(Message(MessageType.EVENT, "job", 1, source="test"))
    for n in range(1, 5):  # every allowed attempt failed and was recorded ...
        failed = AttemptError(n, "RuntimeError", f"failed {n}", 0.0, "gone")
        await record_attempt(store, GROUP, sent.id, failed)
    await advance_until(clock, lambda: _true(hung.is_set()))
    await crash(first)  # ... but the consumer died before it dead-lettered the message

    await second.subscribe("job", count, group=GROUP)
    await advance_until(clock, second.dead_letters().count)
    (letter,) = await second.dead_letters().list()
    assert calls == [], "the handler is not run a fifth time"
    assert [e.error for e in letter.errors] == [f"failed {n}" for n in range(1, 5)]
    assert "dead-lettered on redelivery" in letter.detail

    async def closed() -> bool:  # settled: the count is closed after the ack
        return await read_attempts(store, GROUP, sent.id) == []

    await advance_until(clock, closed)
    await second.close()


async def test_a_replayed_dead_letter_starts_a_fresh_count() -> None:
    clock = VirtualClock()
    store = MemoryEventStore()
    first = make_broker(store, clock, seed=6)
    calls: list[str] = []

    async def broken(message: Message, ctx: MessageContext) -> None:
        calls.append(f"attempt {ctx.attempt}")
        raise RuntimeError(f"failed attempt {ctx.attempt}")

    await first.subscribe("job", broken, group=GROUP)
    sent = await first.publish(Message(MessageType.EVENT, "job", 1, source="test"))
    await advance_until(clock, first.dead_letters().count)
    (letter,) = await first.dead_letters().list()
    assert len(calls) == 4
    await first.dead_letters().replay(letter.id)
    await advance_until_recorded(store, clock, sent.id, 4 + 1 + 1)  # 4 + closed + 1 new
    await crash(first)

    second = make_broker(store, clock, seed=7)
    await second.subscribe("job", broken, group=GROUP)
    await advance_until(clock, second.dead_letters().count)
    (again,) = await second.dead_letters().list()
    # The replay got its own four attempts (one before the crash, three after it).
    assert calls[4:] == ["attempt 1", "attempt 2", "attempt 3", "attempt 4"]
    assert [e.attempt for e in again.errors] == [1, 2, 3, 4]
    await second.close()


async def _true(value: bool) -> bool:
    return value


async def test_a_message_that_kills_every_consumer_runs_out_of_attempts() -> None:
    clock = VirtualClock()
    store = MemoryEventStore()
    runs: list[str] = []
    sent: Message | None = None
    for seed in range(10, 20):
        broker = make_broker(store, clock, seed=seed)
        entered = asyncio.Event()

        async def poison(message: Message, *, entered: asyncio.Event = entered) -> None:
            runs.append(message.id)
            entered.set()
            await asyncio.Event().wait()  # the process dies in here

        await broker.subscribe("job", poison, group=GROUP)
        if sent is None:
            sent = await broker.publish(Message(MessageType.EVENT, "job", 1, source="test"))

        async def settled(broker: MessageBroker = broker, entered: asyncio.Event = entered) -> bool:
            return entered.is_set() or await broker.dead_letters().count() > 0

        await advance_until(clock, settled)
        if not entered.is_set():
            break
        await crash(broker)
    assert sent is not None
    (letter,) = await broker.dead_letters().list()
    await broker.close()
    # The first delivery is not marked (it costs no write), so it is not counted: 1 + 4 runs.
    assert runs == [sent.id] * 5
    assert [(e.attempt, e.error_type) for e in letter.errors] == [
        (n, "ConsumerLost") for n in range(1, 5)
    ]
    assert letter.reason is DeadLetterReason.RETRIES_EXHAUSTED


async def test_a_redelivery_that_succeeds_leaves_no_open_attempt() -> None:
    clock = VirtualClock()
    store = MemoryEventStore()
    first = make_broker(store, clock, seed=30)
    second = make_broker(store, clock, seed=31)
    hung = asyncio.Event()
    handled: list[str] = []

    async def hang(message: Message) -> None:
        hung.set()
        await asyncio.Event().wait()

    async def fine(message: Message) -> None:
        handled.append(message.id)

    await first.subscribe("job", hang, group=GROUP)
    sent = await first.publish(Message(MessageType.EVENT, "job", 1, source="test"))
    await advance_until(clock, lambda: _true(hung.is_set()))
    await crash(first)
    await second.subscribe("job", fine, group=GROUP)

    async def closed() -> bool:
        events = await store.read(attempts_stream(GROUP, sent.id))
        return bool(handled) and bool(events) and events[-1].topic == ATTEMPTS_CLOSED_TOPIC

    await advance_until(clock, closed)
    assert handled == [sent.id]
    # A replay or re-publish of this id will not count the crashed attempt against itself.
    assert await read_attempts(store, GROUP, sent.id) == []
    await second.close()
