"""The broker and connector: seed API, guarantees, retries, dead letters, ordering, bad input."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from collaborative_blocks import Runtime, load_settings
from collaborative_blocks.core.clock import VirtualClock
from collaborative_blocks.core.messaging import (
    DeadLetterReason,
    DeliveryGuarantee,
    Message,
    MessageBroker,
    MessageContext,
    MessageType,
    ReceiptStatus,
    RetryPolicy,
    Subscription,
    SystemConnector,
    TransportCapabilities,
)
from collaborative_blocks.core.messaging.broker import (
    EVENTS_SUBJECT,
    OUTBOX_SEND_ATTEMPTS,
    inbox_subject,
)
from collaborative_blocks.core.messaging.envelope import encode
from collaborative_blocks.core.messaging.transport import Delivery
from collaborative_blocks.errors import (
    ConfigurationError,
    DeadLetterNotFoundError,
    MessageRejectedError,
    MessagingError,
    NoRouteError,
    PublishTimeoutError,
    QueryTimeoutError,
    RemoteHandlerError,
    StoreUnavailableError,
    TransportUnavailableError,
    UnknownSchemeError,
    UnsupportedGuaranteeError,
)
from collaborative_blocks.plugins.transports.memory import MemoryTransport
from collaborative_blocks.stores import NewEvent
from collaborative_blocks.stores.memory import MemoryEventStore


async def until(clock: VirtualClock, condition: Callable[[], bool], *, step: float = 0.05) -> None:
    """Let tasks run, and virtual time pass in small steps, until ``condition`` holds."""
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


def event(name: str, payload: object = None, **fields: object) -> Message:
    return Message(MessageType.EVENT, name, payload, source="shop", **fields)  # type: ignore[arg-type]


# -- the seed API ----------------------------------------------------------------------------


async def test_subscribe_with_a_glob_gets_matching_events_only(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    seen: list[str] = []

    async def handler(message: Message) -> None:
        seen.append(message.name)

    await broker.subscribe("orders.*", handler)
    for name in ("orders.created", "users.created", "orders.paid"):
        await broker.publish(event(name))
    await until(clock, lambda: len(seen) == 2)
    await clock.advance(1)
    assert seen == ["orders.created", "orders.paid"]


async def test_published_message_gets_id_timestamp_and_default_ttl(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    sent = await broker.publish(event("x"))
    assert len(sent.id) == 26
    assert sent.created_at == clock.now()
    assert sent.ttl == 3600.0


async def test_connector_seed_api_command_event_and_query(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    billing = SystemConnector("billing", broker)
    charged: list[object] = []
    heard: list[str] = []

    async def charge(message: Message) -> None:
        charged.append(message.payload)

    async def balance(message: Message, ctx: MessageContext) -> object:
        assert isinstance(message.payload, dict)
        return {"account": message.payload["account"], "balance": 42}

    async def on_order(message: Message) -> None:
        heard.append(message.name)

    billing.on_command("charge", charge)
    billing.on_query("balance", balance)
    billing.on_event("orders.*", on_order)
    shop = SystemConnector("shop", broker)
    command_id = await shop.send_command("billing", "charge", {"amount": 12})
    await shop.publish_event("orders.created", {"order": 7})
    response = await shop.query("billing", "balance", {"account": "a-1"}, timeout=5)
    assert response == {"account": "a-1", "balance": 42}
    await until(clock, lambda: bool(charged) and bool(heard))
    assert charged == [{"amount": 12}]
    assert heard == ["orders.created"]
    receipts = await broker.receipts(command_id)
    assert [(r.group, r.status) for r in receipts] == [("billing", ReceiptStatus.PROCESSED)]


async def test_query_timeout_is_a_typed_error(broker: MessageBroker, clock: VirtualClock) -> None:
    slow = SystemConnector("slow", broker)
    never = asyncio.Event()

    async def stall(message: Message) -> object:
        await never.wait()
        return None

    slow.on_query("wait", stall)
    asker = SystemConnector("asker", broker)
    query = asyncio.ensure_future(asker.query("slow", "wait", timeout=2.0))
    await until(clock, query.done)
    assert clock.monotonic() >= 2.0
    with pytest.raises(QueryTimeoutError, match=r"no response within 2\.0s") as caught:
        await query
    assert caught.value.target == "slow"


async def test_query_handler_error_and_unknown_query_reach_the_asker(
    broker: MessageBroker,
) -> None:
    target = SystemConnector("target", broker)

    async def broken(message: Message) -> object:
        raise ValueError("no such account")

    target.on_query("balance", broken)
    asker = SystemConnector("asker", broker)
    with pytest.raises(RemoteHandlerError, match="ValueError: no such account"):
        await asker.query("target", "balance", timeout=5)
    with pytest.raises(RemoteHandlerError, match="no handler for query 'missing'"):
        await asker.query("target", "missing", timeout=5)


async def test_target_nobody_serves_raises_and_is_dead_lettered(broker: MessageBroker) -> None:
    shop = SystemConnector("shop", broker)
    with pytest.raises(NoRouteError, match="no system serves target 'nowhere'"):
        await shop.send_command("nowhere", "ship", {"order": 1})
    with pytest.raises(NoRouteError):
        await shop.query("nowhere", "status", timeout=1)
    letters = await broker.dead_letters().list()
    assert [letter.reason for letter in letters] == [DeadLetterReason.NO_ROUTE] * 2
    assert letters[0].message is not None
    assert letters[0].message.name == "ship"


async def test_command_without_handler_is_dead_lettered_at_once(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    billing = SystemConnector("billing", broker)

    async def charge(message: Message) -> None:
        return None

    billing.on_command("charge", charge)
    await SystemConnector("shop", broker).send_command("billing", "refund", {})
    await until(clock, lambda: broker.dlq.added == 1)
    (letter,) = await broker.dead_letters().list()
    assert letter.reason is DeadLetterReason.NO_HANDLER
    assert "no handler for command 'refund'" in letter.detail


async def test_response_for_unknown_correlation_id_is_dead_lettered(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    asker = SystemConnector("asker", broker, instance="one")
    target = SystemConnector("target", broker)

    async def answer(message: Message) -> object:
        return 1

    target.on_query("q", answer)
    assert await asker.query("target", "q", timeout=5) == 1  # the reply consumer now runs
    await broker.publish(
        Message(
            MessageType.RESPONSE,
            "q",
            {"ok": True, "result": 2},
            source="target",
            target="asker.one",
            correlation_id="nobody-asked",
        )
    )
    await until(clock, lambda: broker.dlq.added == 1)
    (letter,) = await broker.dead_letters().list()
    assert letter.reason is DeadLetterReason.UNKNOWN_CORRELATION_ID


async def test_message_without_target_or_name_is_refused(broker: MessageBroker) -> None:
    with pytest.raises(MessageRejectedError, match="needs a target"):
        await broker.publish(Message(MessageType.COMMAND, "ship", source="shop"))
    with pytest.raises(MessageRejectedError, match="needs a name"):
        await broker.publish(Message(MessageType.EVENT, ""))
    with pytest.raises(MessageRejectedError, match="takes a Message"):
        await broker.publish({"name": "x"})  # type: ignore[arg-type]


# -- delivery guarantees ---------------------------------------------------------------------


async def test_at_least_once_retries_with_backoff_until_success(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    attempts: list[float] = []

    async def flaky(message: Message, ctx: MessageContext) -> None:
        attempts.append(clock.monotonic())
        if len(attempts) < 3:
            raise RuntimeError(f"attempt {ctx.attempt} failed")

    await broker.subscribe("job", flaky)
    sent = await broker.publish(event("job"))
    await until(clock, lambda: len(attempts) == 3)
    await until(clock, lambda: any(r[0] == sent.id for r in broker._receipts))
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    # Exponential backoff with 50% jitter: 0.05-0.1s, then 0.1-0.2s.
    assert 0.05 <= gaps[0] <= 0.1 + 0.05
    assert 0.1 <= gaps[1] <= 0.2 + 0.05
    (receipt,) = await broker.receipts(sent.id)
    assert (receipt.status, receipt.attempts) == (ReceiptStatus.PROCESSED, 3)
    assert await broker.dead_letters().count() == 0


async def test_exhausted_retries_dead_letter_with_every_attempts_error(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    calls = 0

    async def broken(message: Message) -> None:
        nonlocal calls
        calls += 1
        raise KeyError(f"missing {calls}")

    await broker.subscribe("job", broken)
    await broker.publish(event("job"))
    await until(clock, lambda: broker.dlq.added == 1)
    assert calls == 4  # 1 + MAX_RETRY_ATTEMPTS
    (letter,) = await broker.dead_letters().list()
    assert letter.reason is DeadLetterReason.RETRIES_EXHAUSTED
    assert [e.attempt for e in letter.errors] == [1, 2, 3, 4]
    assert [e.error_type for e in letter.errors] == ["KeyError"] * 4
    assert "missing 4" in letter.errors[-1].error


async def test_handler_that_never_returns_times_out_and_others_keep_flowing(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    handled: list[str] = []
    never = asyncio.Event()

    async def handler(message: Message) -> None:
        if message.payload == "hang":
            await never.wait()
        handled.append(str(message.payload))

    await broker.subscribe("job", handler)
    await broker.publish(event("job", "hang", key="a"))
    await broker.publish(event("job", "fine", key="b"))
    await until(clock, lambda: handled == ["fine"])
    await until(clock, lambda: broker.dlq.added == 1, step=0.5)
    (letter,) = await broker.dead_letters().list()
    assert letter.reason is DeadLetterReason.RETRIES_EXHAUSTED
    assert {e.error_type for e in letter.errors} == {"HandlerTimeoutError"}
    # The consumer still serves: the worker that hung takes new work.
    await broker.publish(event("job", "after", key="a"))
    await until(clock, lambda: "after" in handled)


async def test_at_most_once_failure_is_not_retried_but_recorded(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    calls = 0

    async def broken(message: Message) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("boom")

    await broker.subscribe("fire", broken)
    await broker.publish(event("fire", guarantee=DeliveryGuarantee.AT_MOST_ONCE))
    await until(clock, lambda: broker.dlq.added == 1)
    await clock.advance(10)
    assert calls == 1
    (letter,) = await broker.dead_letters().list()
    assert letter.reason is DeadLetterReason.HANDLER_FAILED


async def test_exactly_once_effect_happens_once_for_duplicates(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    calls = 0

    async def deposit(message: Message, ctx: MessageContext) -> None:
        nonlocal calls
        calls += 1
        ctx.append("account-1", [NewEvent("Deposited", json.dumps(message.payload).encode())])

    await broker.subscribe("deposit", deposit, group="ledger")
    message = await broker.publish(
        event("deposit", {"amount": 5}, guarantee=DeliveryGuarantee.EXACTLY_ONCE)
    )
    await broker.publish(message)  # the same message id again: a duplicate delivery
    await until(clock, lambda: sum(r[0] == message.id for r in broker._receipts) == 2)
    assert broker.store is not None
    assert len(await broker.store.read("account-1")) == 1
    statuses = [r.status for r in await broker.receipts(message.id)]
    assert statuses == [ReceiptStatus.PROCESSED, ReceiptStatus.DUPLICATE]
    assert await broker.was_processed(message.id, "ledger")
    assert calls == 2  # the handler may run again; its effect does not


async def test_exactly_once_retry_after_failure_commits_once(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    calls = 0

    async def deposit(message: Message, ctx: MessageContext) -> None:
        nonlocal calls
        calls += 1
        ctx.append("account-2", [NewEvent("Deposited", b"{}")])
        if calls == 1:
            raise RuntimeError("crashed before commit")

    await broker.subscribe("deposit", deposit, group="ledger")
    message = await broker.publish(event("deposit", guarantee=DeliveryGuarantee.EXACTLY_ONCE))
    await until(clock, lambda: any(r[0] == message.id for r in broker._receipts))
    assert broker.store is not None
    assert len(await broker.store.read("account-2")) == 1


def refuse_sends(broker: MessageBroker, name: str, times: int) -> list[str]:
    """Make the broker's transport refuse the first ``times`` sends of messages ``name``."""
    publish = broker.publish
    refused: list[str] = []

    async def flaky(message: Message) -> Message:
        if message.name == name and len(refused) < times:
            refused.append(message.id)
            raise TransportUnavailableError("the broker's server is restarting (test)")
        return await publish(message)

    broker.publish = flaky  # type: ignore[method-assign]
    return refused


@pytest.mark.parametrize(
    ("guarantee", "handler_runs"),
    [(DeliveryGuarantee.EXACTLY_ONCE, 1), (DeliveryGuarantee.AT_LEAST_ONCE, 2)],
)
async def test_a_handled_message_whose_outbox_cannot_be_sent_is_given_back_not_dead_lettered(
    broker: MessageBroker, clock: VirtualClock, guarantee: DeliveryGuarantee, handler_runs: int
) -> None:
    """The handler succeeded and its effects are committed, but the transport refuses what it
    published, more often than the in-place retries: the delivery goes back unacknowledged.
    EXACTLY_ONCE: the redelivery finds the message processed and resends the stored outbox;
    AT_LEAST_ONCE: the handler runs again. Neither is a failed attempt, nothing is
    dead-lettered (found with the chaos simulator's publish_fail fault: a debit committed,
    its credit dead-lettered with the message, and money went missing)."""
    runs = 0
    credits: list[str] = []

    async def debit(message: Message, ctx: MessageContext) -> None:
        nonlocal runs
        runs += 1
        ctx.append("account-a", [NewEvent("Debited", b"{}")])
        ctx.publish(event("credit", {"amount": 5}, guarantee=guarantee, id="credit-1"))

    async def credit(message: Message) -> None:
        credits.append(message.id)

    await broker.subscribe("debit", debit, group="bank-a")
    await broker.subscribe("credit", credit, group="bank-b")
    refused = refuse_sends(broker, "credit", times=OUTBOX_SEND_ATTEMPTS + 2)
    await broker.publish(event("debit", guarantee=guarantee))
    await until(clock, lambda: bool(credits))
    for _ in range(40):
        await clock.advance(0.05)
    assert len(refused) == OUTBOX_SEND_ATTEMPTS + 2
    assert runs == handler_runs
    assert credits == ["credit-1"]
    assert broker.dlq.added == 0
    assert broker.store is not None
    assert len(await broker.store.read("account-a")) == handler_runs


async def test_an_exactly_once_commit_whose_acknowledgement_was_lost_counts_as_done(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    """The store commits the handler's effects, inbox record and outbox, then the connection
    drops: StoreUnavailableError, although it all went through. The broker asks the inbox,
    finds the message processed, sends the stored outbox and acknowledges, instead of
    counting a failed attempt (found with the chaos simulator's store_lost_ack fault: the
    reruns failed for other reasons, the message was dead-lettered with its committed
    outbox, and a transfer's credit was never sent)."""
    assert broker.store is not None
    store = broker.store
    append_many = store.append_many
    lost: list[str] = []

    async def commit_then_drop(requests: Any, *, tracking: Any = None) -> Any:
        result = await append_many(requests, tracking=tracking)
        if tracking is not None and not lost:
            lost.append(tracking.message_id)
            raise StoreUnavailableError("connection lost after the commit (test)")
        return result

    store.append_many = commit_then_drop  # type: ignore[method-assign]
    runs = 0
    credits: list[str] = []

    async def debit(message: Message, ctx: MessageContext) -> None:
        nonlocal runs
        runs += 1
        if runs > 1:
            raise RuntimeError("the handler fails on every rerun")
        ctx.append("account-a", [NewEvent("Debited", b"{}")])
        ctx.publish(event("credit", guarantee=DeliveryGuarantee.EXACTLY_ONCE, id="credit-1"))

    async def credit(message: Message) -> None:
        credits.append(message.id)

    await broker.subscribe("debit", debit, group="bank-a")
    await broker.subscribe("credit", credit, group="bank-b")
    sent = await broker.publish(event("debit", guarantee=DeliveryGuarantee.EXACTLY_ONCE))
    await until(clock, lambda: bool(credits))
    for _ in range(40):
        await clock.advance(0.05)
    assert lost == [sent.id]
    assert runs == 1
    assert credits == ["credit-1"]
    assert broker.dlq.added == 0
    assert len(await store.read("account-a")) == 1


async def test_a_copy_that_runs_out_of_attempts_after_another_copy_committed_is_a_duplicate(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    """Two copies of one EXACTLY_ONCE message (a duplicate delivery): the first commits, the
    second's handler fails every attempt before reaching the commit. Before dead-lettering,
    the broker asks the inbox: the message was handled, so the second copy is a duplicate,
    not a dead letter (a dead-lettered debit whose Debited is in the log would read as money
    that never moved; found with the chaos simulator, duplicate deliveries plus handler and
    store faults)."""
    runs = 0

    async def debit(message: Message, ctx: MessageContext) -> None:
        nonlocal runs
        runs += 1
        if runs > 1:
            raise RuntimeError("every later run fails before the commit")
        ctx.append("account-a", [NewEvent("Debited", b"{}")])

    await broker.subscribe("debit", debit, group="bank-a")
    message = await broker.publish(event("debit", guarantee=DeliveryGuarantee.EXACTLY_ONCE))
    await broker.publish(message)  # the same message id again: a second copy
    await until(clock, lambda: sum(r[0] == message.id for r in broker._receipts) == 2)
    statuses = [r.status for r in await broker.receipts(message.id)]
    assert statuses == [ReceiptStatus.PROCESSED, ReceiptStatus.DUPLICATE]
    assert runs == 1 + 4  # the second copy's four attempts all failed
    assert broker.dlq.added == 0
    assert broker.store is not None
    assert len(await broker.store.read("account-a")) == 1


async def test_exactly_once_needs_a_store_at_start_up(clock: VirtualClock) -> None:
    broker = MessageBroker(
        clock=clock,
        settings=load_settings({}),
        required_guarantees=[DeliveryGuarantee.EXACTLY_ONCE],
    )
    with pytest.raises(UnsupportedGuaranteeError, match="needs an event store"):
        await broker.start()


async def test_transport_that_cannot_give_a_guarantee_fails_at_start_up(
    clock: VirtualClock,
) -> None:
    transport = MemoryTransport(clock=clock)
    transport.capabilities = TransportCapabilities(
        guarantees=frozenset({DeliveryGuarantee.AT_MOST_ONCE})
    )
    broker = MessageBroker(transport=transport, clock=clock, settings=load_settings({}))
    with pytest.raises(UnsupportedGuaranteeError, match="cannot give AT_LEAST_ONCE"):
        await broker.start()


async def test_unknown_broker_url_scheme_names_the_setting(clock: VirtualClock) -> None:
    broker = MessageBroker("carrier-pigeon://roof", clock=clock, settings=load_settings({}))
    with pytest.raises(UnknownSchemeError, match="MESSAGE_BROKER_URL"):
        await broker.start()


async def test_broker_url_from_settings_opens_the_memory_plugin() -> None:
    settings = load_settings({"MESSAGE_BROKER_URL": "memory://?max_backlog=5"})
    async with Runtime(settings, clock=VirtualClock()) as runtime:
        broker = MessageBroker(runtime=runtime, tracing=False)
        await broker.start()
        assert isinstance(broker.transport, MemoryTransport)
        assert broker.transport.url == "memory://?max_backlog=5"
        await broker.close()


# -- bad input on the wire -------------------------------------------------------------------


async def test_undecodable_messages_are_dead_lettered_and_consumer_keeps_serving(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    seen: list[str] = []

    async def handler(message: Message) -> None:
        seen.append(message.name)

    await broker.subscribe("*", handler)
    good = await broker.publish(event("good"))
    raw = encode(good).decode()
    transport = broker.transport
    await transport.publish(EVENTS_SUBJECT, b"not json at all")
    await transport.publish(EVENTS_SUBJECT, raw.replace('"v":1', '"v":9').encode())
    await transport.publish(EVENTS_SUBJECT, raw.replace('"event"', '"gossip"').encode())
    expired = Message(
        MessageType.EVENT, "stale", source="shop", id="x1", created_at=clock.now() - 100, ttl=1
    )
    await transport.publish(EVENTS_SUBJECT, encode(expired))
    await broker.publish(event("also-good"))
    await until(clock, lambda: len(seen) == 2 and broker.dlq.added == 4)
    reasons = [letter.reason for letter in await broker.dead_letters().list()]
    assert reasons == [
        DeadLetterReason.MALFORMED,
        DeadLetterReason.UNKNOWN_VERSION,
        DeadLetterReason.UNKNOWN_TYPE,
        DeadLetterReason.EXPIRED,
    ]
    assert seen == ["good", "also-good"]


async def test_a_ttl_allows_for_clock_skew_between_sender_and_receiver(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    """The sender's clock is behind the receiver's: a message with an 8 s ttl created "20 s
    ago" by the receiver's clock is handled (within the default 30 s allowance); one past its
    ttl plus the allowance is dead-lettered as EXPIRED, and the detail says so."""
    assert broker.clock_skew == 30.0
    seen: list[str] = []

    async def handler(message: Message) -> None:
        seen.append(message.name)

    await broker.subscribe("*", handler)
    behind = Message(
        MessageType.EVENT, "behind", source="shop", id="s1", created_at=clock.now() - 20, ttl=8
    )
    stale = Message(
        MessageType.EVENT, "stale", source="shop", id="s2", created_at=clock.now() - 40, ttl=8
    )
    await broker.transport.publish(EVENTS_SUBJECT, encode(behind))
    await broker.transport.publish(EVENTS_SUBJECT, encode(stale))
    await until(clock, lambda: seen == ["behind"] and broker.dlq.added == 1)
    [letter] = await broker.dead_letters().list()
    assert letter.reason is DeadLetterReason.EXPIRED
    assert "ttl of 8.0s (plus 30.0s allowed for clock skew)" in letter.detail


async def test_clock_skew_comes_from_settings_and_must_not_be_negative(clock: VirtualClock) -> None:
    settings = load_settings({"MESSAGE_CLOCK_SKEW_SECONDS": "2.5"})
    assert MessageBroker(clock=clock, settings=settings).clock_skew == 2.5
    assert MessageBroker(clock=clock, settings=settings, clock_skew=0).clock_skew == 0
    with pytest.raises(MessagingError, match="clock_skew must be >= 0"):
        MessageBroker(clock=clock, settings=settings, clock_skew=-1)
    with pytest.raises(ConfigurationError, match="MESSAGE_CLOCK_SKEW_SECONDS"):
        load_settings({"MESSAGE_CLOCK_SKEW_SECONDS": "-3"})


# -- dead-letter queue -----------------------------------------------------------------------


async def test_dead_letters_can_be_inspected_replayed_and_purged(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    healthy = False
    done: list[str] = []

    async def handler(message: Message) -> None:
        if not healthy:
            raise RuntimeError("dependency down")
        done.append(message.id)

    await broker.subscribe("job", handler)
    first = await broker.publish(event("job", 1))
    second = await broker.publish(event("job", 2))
    await until(clock, lambda: broker.dlq.added == 2)
    dlq = broker.dead_letters()
    letters = await dlq.list()
    assert [letter.message_id for letter in letters] == [first.id, second.id]
    shown = await dlq.get(letters[0].id)
    assert shown.message == first.with_headers(shown.message.headers)  # type: ignore[union-attr]
    healthy = True
    replayed = await dlq.replay(letters[0].id)
    assert replayed.id == first.id
    await until(clock, lambda: done == [first.id])
    assert await dlq.purge() == 1
    assert await dlq.list() == []
    with pytest.raises(DeadLetterNotFoundError):
        await dlq.get(letters[1].id)


async def test_dead_letter_queue_is_durable_in_the_store(clock: VirtualClock) -> None:
    store = MemoryEventStore()
    settings = load_settings({})

    async def broken(message: Message) -> None:
        raise RuntimeError("nope")

    first = MessageBroker(clock=clock, store=store, settings=settings, tracing=False)
    first.retry = RetryPolicy(max_retries=0)
    await first.subscribe("job", broken)
    await first.publish(event("job"))
    await until(clock, lambda: first.dlq.added == 1)
    await first.close()
    second = MessageBroker(clock=clock, store=store, settings=settings, tracing=False)
    letters = await second.dead_letters().list()
    assert [letter.reason for letter in letters] == [DeadLetterReason.RETRIES_EXHAUSTED]
    assert await second.dead_letters().purge([letters[0].id]) == 1
    third = MessageBroker(clock=clock, store=store, settings=settings, tracing=False)
    assert await third.dead_letters().count() == 0
    await second.close()
    await third.close()


# -- ordering and backpressure ---------------------------------------------------------------


async def test_same_key_in_order_different_keys_in_parallel(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    rng = random.Random(5)
    log: list[tuple[str, int]] = []
    gate = asyncio.Event()

    async def handler(message: Message) -> None:
        assert isinstance(message.payload, int)
        if message.key == "blocked" and message.payload == 0:
            await gate.wait()
        for _ in range(rng.randint(0, 3)):
            await asyncio.sleep(0)
        log.append((message.key or "", message.payload))

    await broker.subscribe("step", handler, partitions=4)
    keys = ["blocked", "k1", "k2", "k3", "k4"]
    for n in range(10):
        for key in keys:
            await broker.publish(event("step", n, key=key))
    # Every other key finishes while "blocked" waits: keys run in parallel.
    await until(clock, lambda: sum(1 for k, _ in log if k != "blocked") >= 20)
    assert all(k != "blocked" for k, _ in log)
    gate.set()
    await until(clock, lambda: len(log) == 50)
    for key in keys:
        assert [n for k, n in log if k == key] == list(range(10))


async def test_slow_consumer_makes_publishers_wait(clock: VirtualClock) -> None:
    transport = MemoryTransport(clock=clock, max_backlog=3)
    broker = MessageBroker(
        transport=transport,
        clock=clock,
        settings=load_settings({}),
        max_in_flight=2,
        partitions=1,
        tracing=False,
    )
    gate = asyncio.Event()
    handled = 0

    async def slow(message: Message) -> None:
        nonlocal handled
        await gate.wait()
        handled += 1

    await broker.subscribe("work", slow)
    shop = SystemConnector("shop", broker)
    publisher = asyncio.ensure_future(
        asyncio.gather(*[shop.publish_event("work", n) for n in range(10)])
    )
    await clock.advance(1)
    assert not publisher.done(), "publishers should wait for the slow consumer"
    assert transport.backlog(EVENTS_SUBJECT) == 3
    bounded = asyncio.ensure_future(shop.publish_event("work", 99, timeout=0.5))
    await until(clock, bounded.done)
    with pytest.raises(PublishTimeoutError, match="backpressure"):
        await bounded
    gate.set()
    await until(clock, lambda: publisher.done())
    await until(clock, lambda: handled == 10)
    await broker.close()


# -- handler context -------------------------------------------------------------------------


async def test_context_outbox_publishes_after_success_with_causation(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    followers: list[Message] = []

    async def first(message: Message, ctx: MessageContext) -> None:
        ctx.publish(Message(MessageType.EVENT, "second"))

    async def second(message: Message) -> None:
        followers.append(message)

    await broker.subscribe("first", first, system="shop")
    await broker.subscribe("second", second)
    origin = await broker.publish(event("first", correlation_id="corr-1"))
    await until(clock, lambda: bool(followers))
    (follower,) = followers
    assert follower.causation_id == origin.id
    assert follower.correlation_id == "corr-1"
    assert follower.source == "shop"


async def test_context_without_store_says_how_to_get_one(clock: VirtualClock) -> None:
    broker = MessageBroker(clock=clock, settings=load_settings({}), tracing=False)
    errors: list[str] = []

    async def handler(message: Message, ctx: MessageContext) -> None:
        try:
            ctx.append("s", [NewEvent("T", b"")])
        except Exception as error:
            errors.append(str(error))

    await broker.subscribe("x", handler)
    await broker.publish(event("x"))
    await until(clock, lambda: bool(errors))
    assert "MessageBroker(store=...)" in errors[0]
    await broker.close()


async def test_connector_rejects_duplicate_registrations(broker: MessageBroker) -> None:
    connector = SystemConnector("billing", broker)

    async def handler(message: Message) -> None:
        return None

    connector.on_command("charge", handler)
    with pytest.raises(Exception, match="already has a handler for command 'charge'"):
        connector.on_command("charge", handler)


async def test_inbox_subject_is_per_target() -> None:
    assert inbox_subject("billing") != inbox_subject("shop")


class FlakyTransport(MemoryTransport):
    """Fails the first fetches of every subscription, like a server that went away."""

    def __init__(self, clock: VirtualClock, failures: int) -> None:
        super().__init__(clock=clock)
        self.failures = failures

    async def subscribe(self, subject: str, **options: Any) -> Subscription:
        inner = await super().subscribe(subject, **options)
        outer = self

        class Flaky:
            async def fetch(self, max_messages: int) -> Sequence[Delivery]:
                if outer.failures > 0:
                    outer.failures -= 1
                    raise TransportUnavailableError("connection refused")
                return await inner.fetch(max_messages)

            async def close(self) -> None:
                await inner.close()

        return Flaky()


async def test_consumer_survives_a_transport_that_disappears_mid_run(clock: VirtualClock) -> None:
    broker = MessageBroker(
        transport=FlakyTransport(clock, failures=3),
        clock=clock,
        settings=load_settings({}),
        tracing=False,
    )
    seen: list[object] = []

    async def handler(message: Message) -> None:
        seen.append(message.payload)

    await broker.subscribe("x", handler)
    await broker.publish(event("x", 1))
    await until(clock, lambda: seen == [1])
    assert broker.telemetry.counts["failed"]["broker"] == 3
    await broker.close()


async def test_subscribe_with_target_serves_a_systems_commands(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    handled: list[str] = []

    async def handler(message: Message) -> None:
        handled.append(message.name)

    subscription = await broker.subscribe("orders.*", handler, target="orders")
    assert subscription.group == "orders"
    shop = SystemConnector("shop", broker)
    await shop.send_command("orders", "orders.ship", {"order": 1})
    await shop.send_command("orders", "refund", {"order": 1})  # not matched: acked, not handled
    await until(clock, lambda: handled == ["orders.ship"])
    await subscription.close()
    with pytest.raises(NoRouteError):
        await shop.send_command("orders", "orders.ship", {"order": 2})


async def test_closing_a_connector_fails_its_pending_queries(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    never = asyncio.Event()

    async def stall(message: Message) -> object:
        await never.wait()
        return None

    SystemConnector("slow", broker).on_query("wait", stall)
    asker = SystemConnector("asker", broker)
    pending = asyncio.ensure_future(asker.query("slow", "wait", timeout=60))
    await until(clock, lambda: bool(asker._pending))
    await asker.close()
    with pytest.raises(Exception, match="was closed"):
        await pending


async def test_exactly_once_outbox_is_sent_even_if_sending_failed_after_commit(
    broker: MessageBroker, clock: VirtualClock
) -> None:
    followers: list[Message] = []

    async def deposit(message: Message, ctx: MessageContext) -> None:
        ctx.append("account-3", [NewEvent("Deposited", b"{}")])
        ctx.publish(Message(MessageType.EVENT, "deposited", {"account": 3}))

    async def follow(message: Message) -> None:
        followers.append(message)

    await broker.subscribe("deposit", deposit, group="ledger")
    await broker.subscribe("deposited", follow, group="mailer")
    real_publish = broker.publish
    failures = 0

    async def publish_failing_once(message: Message) -> Message:
        nonlocal failures
        if message.name == "deposited" and failures == 0:
            failures += 1  # the process "dies" after the commit, before the send
            raise TransportUnavailableError("connection lost")
        return await real_publish(message)

    broker.publish = publish_failing_once  # type: ignore[method-assign]
    origin = await broker.publish(
        Message(
            MessageType.EVENT, "deposit", source="bank", guarantee=DeliveryGuarantee.EXACTLY_ONCE
        )
    )
    await until(clock, lambda: bool(followers))
    await clock.advance(5)
    assert failures == 1
    assert len(followers) == 1
    assert followers[0].causation_id == origin.id
    assert broker.store is not None
    assert len(await broker.store.read("account-3")) == 1


class LeasedTransport(MemoryTransport):
    """Deliveries with ``in_progress()`` (as on Redis and NATS), recording each renewal."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(clock=clock)
        self.renewals: list[tuple[int, float]] = []

    async def subscribe(self, subject: str, **options: Any) -> Subscription:
        inner = await super().subscribe(subject, **options)
        outer = self

        class Leased:
            def __init__(self, delivery: Delivery) -> None:
                self.delivery = delivery
                self.body = delivery.body
                self.subject = delivery.subject
                self.attempt = delivery.attempt

            async def ack(self) -> None:
                await self.delivery.ack()

            async def nack(self, delay: float = 0.0) -> None:
                await self.delivery.nack(delay)

            async def in_progress(self) -> None:
                outer.renewals.append((self.attempt, outer._clock.monotonic()))

        class Subscribed:
            async def fetch(self, max_messages: int) -> Sequence[Delivery]:
                return [Leased(d) for d in await inner.fetch(max_messages)]

            async def close(self) -> None:
                await inner.close()

        return Subscribed()


async def test_lease_is_renewed_before_every_retry_where_the_transport_can(
    clock: VirtualClock,
) -> None:
    transport = LeasedTransport(clock)
    broker = MessageBroker(
        transport=transport,
        clock=clock,
        settings=load_settings({}),
        tracing=False,
        retry=RetryPolicy(max_retries=2, base_delay=0.1),
    )
    tried: list[float] = []

    async def flaky(message: Message) -> None:
        tried.append(clock.monotonic())
        if len(tried) < 3:
            raise RuntimeError("not yet")

    await broker.subscribe("job", flaky)
    await broker.publish(event("job"))
    await until(clock, lambda: len(tried) == 3)
    # Once before each retry (not before the first attempt, which has a fresh lease), after
    # the backoff: each retry starts with a full ack timeout.
    assert [at for _, at in transport.renewals] == tried[1:]
    await broker.close()


def test_ack_timeout_shorter_than_the_handler_timeout_is_refused() -> None:
    with pytest.raises(MessagingError, match="must be longer than handler_timeout"):
        MessageBroker(settings=load_settings({}), handler_timeout=10.0, ack_timeout=5.0)
