"""SystemConnector.request: a command whose handler's return value (or failure) is the reply."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable

import pytest

from collaborative_blocks import load_settings
from collaborative_blocks.core.clock import VirtualClock
from collaborative_blocks.core.messaging import (
    DeadLetterReason,
    Message,
    MessageBroker,
    RetryPolicy,
    SystemConnector,
)
from collaborative_blocks.core.messaging.connector import IDEMPOTENCY_KEY, REPLY_TO
from collaborative_blocks.errors import QueryTimeoutError, RemoteCommandError, RemoteHandlerError
from collaborative_blocks.stores.memory import MemoryEventStore


async def until(clock: VirtualClock, condition: Callable[[], bool], *, step: float = 0.05) -> None:
    for _ in range(4000):
        if condition():
            return
        await clock.advance(step)
    raise AssertionError("condition never became true")


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
async def broker(clock: VirtualClock) -> AsyncIterator[MessageBroker]:
    broker = MessageBroker(
        clock=clock,
        rng=random.Random(7),
        store=MemoryEventStore(),
        settings=load_settings({}),
        tracing=False,
        handler_timeout=5.0,
        retry=RetryPolicy(max_retries=3, base_delay=0.1, max_delay=1.0),
    )
    await broker.start()
    yield broker
    await broker.close()


async def test_request_returns_the_handlers_result(broker: MessageBroker) -> None:
    billing = SystemConnector("billing", broker)
    seen: list[Message] = []

    async def charge(message: Message) -> object:
        seen.append(message)
        assert isinstance(message.payload, dict)
        return {"charged": message.payload["amount"]}

    billing.on_command("charge", charge)
    shop = SystemConnector("shop", broker)
    reply = await shop.request(
        "billing",
        "charge",
        {"amount": 12},
        timeout=5,
        message_id="run-1:charge:1",
        headers={IDEMPOTENCY_KEY: "run-1:charge"},
        key="run-1:charge",
    )
    assert reply == {"charged": 12}
    (message,) = seen
    assert message.id == "run-1:charge:1"
    assert message.headers[IDEMPOTENCY_KEY] == "run-1:charge"
    assert message.headers[REPLY_TO] == shop.address
    assert message.key == "run-1:charge"


async def test_handler_error_comes_back_typed_and_is_not_redelivered(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    calls: list[int] = []

    async def charge(message: Message) -> object:
        calls.append(1)
        raise ValueError("card declined")

    SystemConnector("billing", broker).on_command("charge", charge)
    shop = SystemConnector("shop", broker)
    with pytest.raises(RemoteCommandError, match="ValueError: card declined") as caught:
        await shop.request("billing", "charge", {"amount": 1}, timeout=5)
    assert caught.value.error_type == caught.value.remote_type == "ValueError"
    assert isinstance(caught.value, RemoteHandlerError)  # what query callers already catch
    assert "failed command 'charge'" in str(caught.value)
    await clock.advance(10)  # longer than every broker retry backoff
    assert calls == [1]
    assert await broker.dead_letters().list() == []


async def test_request_for_an_action_without_handler_fails_fast(broker: MessageBroker) -> None:
    async def charge(message: Message) -> None:
        return None

    SystemConnector("billing", broker).on_command("charge", charge)
    shop = SystemConnector("shop", broker)
    with pytest.raises(RemoteCommandError, match="no handler for command 'refund'") as caught:
        await shop.request("billing", "refund", {}, timeout=5)
    assert caught.value.error_type == "NoHandler"


async def test_no_reply_in_time_is_a_query_timeout(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    never = asyncio.Event()

    async def stall(message: Message) -> object:
        await never.wait()
        return None

    SystemConnector("slow", broker).on_command("work", stall)
    asker = SystemConnector("asker", broker)
    pending = asyncio.ensure_future(asker.request("slow", "work", timeout=2.0))
    await until(clock, pending.done)
    assert clock.monotonic() >= 2.0
    with pytest.raises(QueryTimeoutError, match=r"no response within 2\.0s"):
        await pending


async def test_a_non_json_result_is_a_typed_failure(broker: MessageBroker) -> None:
    async def odd(message: Message) -> object:
        return object()

    SystemConnector("target", broker).on_command("odd", odd)
    with pytest.raises(RemoteCommandError, match="must return JSON") as caught:
        await SystemConnector("asker", broker).request("target", "odd", timeout=5)
    assert caught.value.error_type == "TypeError"


async def test_plain_send_command_is_unchanged(broker: MessageBroker, clock: VirtualClock) -> None:
    failures: list[int] = []

    async def charge(message: Message) -> object:
        failures.append(1)
        assert REPLY_TO not in message.headers
        raise ValueError("always")

    SystemConnector("billing", broker).on_command("charge", charge)
    await SystemConnector("shop", broker).send_command("billing", "charge", {})
    # Without a reply address the broker retries the failing handler, then dead-letters it.
    await until(clock, lambda: broker.dlq.added == 1)
    assert len(failures) == 4
    (letter,) = await broker.dead_letters().list()
    assert letter.reason is DeadLetterReason.RETRIES_EXHAUSTED


async def test_concurrent_requests_with_distinct_keys_run_in_parallel(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    running: list[str] = []
    release = asyncio.Event()
    both = asyncio.Event()

    async def work(message: Message) -> object:
        running.append(str(message.key))
        if len(running) == 2:
            both.set()
        await release.wait()
        return message.key

    SystemConnector("target", broker).on_command("work", work)
    asker = SystemConnector("asker", broker)
    first = asyncio.ensure_future(asker.request("target", "work", timeout=30, key="a"))
    second = asyncio.ensure_future(asker.request("target", "work", timeout=30, key="b"))
    await until(clock, both.is_set)
    release.set()
    assert {str(await first), str(await second)} == {"a", "b"}


async def test_each_pending_call_times_out_at_its_own_deadline(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    never = asyncio.Event()
    answered: list[str] = []

    async def stall(message: Message) -> object:
        if message.payload == "quick":
            answered.append("quick")
            return "ok"
        await never.wait()
        return None

    SystemConnector("slow", broker).on_command("work", stall)
    asker = SystemConnector("asker", broker)
    # A long deadline first, then a shorter one (the timer must wake earlier for it), then
    # a call answered in time (its deadline must not fire).
    late = asyncio.ensure_future(asker.request("slow", "work", "a", timeout=10.0, key="a"))
    early = asyncio.ensure_future(asker.request("slow", "work", "b", timeout=2.0, key="b"))
    quick = asyncio.ensure_future(asker.request("slow", "work", "quick", timeout=1.0, key="c"))
    await until(clock, early.done)
    assert 2.0 <= clock.monotonic() < 10.0
    assert await quick == "ok"
    assert not late.done()
    with pytest.raises(QueryTimeoutError, match=r"no response within 2\.0s"):
        await early
    await until(clock, late.done)
    assert clock.monotonic() >= 10.0
    with pytest.raises(QueryTimeoutError, match=r"no response within 10\.0s"):
        await late
    assert asker._pending == {}
