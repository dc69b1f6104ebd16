"""Delivery guarantees hold for random runs of publishes, failures, duplicates and crashes.

Two consumer "processes" (brokers on one shared transport and store) compete in one group;
a third broker only publishes. Hypothesis chooses what happens: messages with a guarantee
and a number of handler failures, duplicate publishes of earlier messages, consumer crashes
(tasks killed without settling anything, then a fresh consumer starts) and passing time.
Afterwards:

- every AT_LEAST_ONCE / EXACTLY_ONCE message ended processed or dead-lettered (nothing
  published is lost, however consumers died);
- each EXACTLY_ONCE message's effect (an event appended through ``ctx.append``) exists
  exactly once if it was processed, and not at all if it was dead-lettered;
- each AT_LEAST_ONCE message that was processed had its effect at least once;
- an AT_MOST_ONCE message's effect happened at most once per publish.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collaborative_blocks import load_settings
from collaborative_blocks.core.clock import VirtualClock
from collaborative_blocks.core.messaging import (
    DeliveryGuarantee,
    Message,
    MessageBroker,
    MessageContext,
    MessageType,
    ReceiptStatus,
    RetryPolicy,
)
from collaborative_blocks.plugins.transports.memory import MemoryTransport
from collaborative_blocks.stores import NewEvent
from collaborative_blocks.stores.memory import MemoryEventStore

MAX_RETRIES = 2
GROUP = "workers"


@dataclass(frozen=True)
class Publish:
    guarantee: DeliveryGuarantee
    failures: int
    key: int


@dataclass(frozen=True)
class Duplicate:
    index: int


@dataclass(frozen=True)
class Crash:
    which: int


@dataclass(frozen=True)
class Tick:
    seconds: float


operations = st.lists(
    st.one_of(
        st.builds(
            Publish,
            st.sampled_from(list(DeliveryGuarantee)),
            st.integers(0, MAX_RETRIES + 2),
            st.integers(0, 3),
        ),
        st.builds(Duplicate, st.integers(0, 50)),
        st.builds(Crash, st.integers(0, 1)),
        st.builds(Tick, st.sampled_from([0.0, 0.01, 0.2, 1.0, 6.0])),
    ),
    min_size=1,
    max_size=40,
)


@dataclass
class World:
    clock: VirtualClock = field(default_factory=VirtualClock)
    store: MemoryEventStore = field(default_factory=MemoryEventStore)
    attempts: dict[str, int] = field(default_factory=dict)
    effects: dict[str, int] = field(default_factory=dict)
    brokers: list[MessageBroker] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.transport = MemoryTransport(clock=self.clock)

    def broker(self, seed: int) -> MessageBroker:
        broker = MessageBroker(
            transport=self.transport,
            store=self.store,
            clock=self.clock,
            rng=random.Random(seed),
            settings=load_settings({}),
            tracing=False,
            handler_timeout=1.0,
            ack_timeout=5.0,
            retry=RetryPolicy(max_retries=MAX_RETRIES, base_delay=0.01, max_delay=0.05),
            partitions=2,
        )
        self.brokers.append(broker)
        return broker

    async def handler(self, message: Message, ctx: MessageContext) -> None:
        seen = self.attempts[message.id] = self.attempts.get(message.id, 0) + 1
        assert isinstance(message.payload, dict)
        ctx.append(f"effect-{message.id}", [NewEvent("Effect", b"")])
        if seen <= int(message.payload["failures"]):
            raise RuntimeError(f"planned failure {seen}")
        await asyncio.sleep(0)
        if message.guarantee is not DeliveryGuarantee.EXACTLY_ONCE:
            # Not committed through the inbox: count the effect as the handler does it.
            self.effects[message.id] = self.effects.get(message.id, 0) + 1

    async def consumer(self, seed: int) -> MessageBroker:
        broker = self.broker(seed)
        await broker.subscribe("job", self.handler, group=GROUP)
        return broker


def crash(broker: MessageBroker) -> None:
    """Kill a consumer's tasks without acking, nacking or closing anything."""
    for spec in list(broker._specs):
        if spec.consumer is not None:
            for task in spec.consumer.tasks:
                task.cancel()
            spec.consumer = None
    broker._specs.clear()


async def run(ops: list[object]) -> None:
    world = World()
    publisher = world.broker(0)
    consumers = [await world.consumer(1), await world.consumer(2)]
    published: list[Message] = []
    publishes: Counter[str] = Counter()
    seed = 3
    for op in ops:
        if isinstance(op, Publish):
            sent = await publisher.publish(
                Message(
                    MessageType.EVENT,
                    "job",
                    {"failures": op.failures},
                    source="shop",
                    key=f"k{op.key}",
                    guarantee=op.guarantee,
                )
            )
            published.append(sent)
            publishes[sent.id] += 1
        elif isinstance(op, Duplicate) and published:
            again = published[op.index % len(published)]
            publishes[again.id] += 1
            await publisher.publish(again)
        elif isinstance(op, Crash):
            crash(consumers[op.which])
            consumers[op.which] = await world.consumer(seed)
            seed += 1
        elif isinstance(op, Tick):
            await world.clock.advance(op.seconds)
    # Let every retry, ack timeout and redelivery play out.
    for _ in range(200):
        await world.clock.advance(0.5)
    dead = {
        letter.message_id for letter in await publisher.dead_letters().list() if letter.message_id
    }
    finished: dict[str, set[str]] = {}
    for broker in world.brokers:
        for message in published:
            for receipt in await broker.receipts(message.id):
                finished.setdefault(message.id, set()).add(receipt.status)
    for message in published:
        stored = len(await world.store.read(f"effect-{message.id}"))
        processed = bool(
            finished.get(message.id, set()) & {ReceiptStatus.PROCESSED, ReceiptStatus.DUPLICATE}
        )
        if message.guarantee is DeliveryGuarantee.AT_MOST_ONCE:
            # Published twice means sent twice: at most once per publish.
            assert world.effects.get(message.id, 0) <= publishes[message.id]
            continue
        assert processed or message.id in dead, f"{message.guarantee.name} message was lost"
        if message.guarantee is DeliveryGuarantee.EXACTLY_ONCE:
            if message.id in dead and not processed:
                assert stored == 0, "a dead-lettered message left an effect"
            else:
                assert stored == 1, f"EXACTLY_ONCE effect happened {stored} times"
                assert await world.store.has_processed(GROUP, message.id)
        elif processed:
            assert world.effects.get(message.id, 0) >= 1
    for broker in world.brokers:
        crash(broker)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(operations)
def test_guarantees_hold_under_failures_duplicates_and_crashes(ops: list[object]) -> None:
    asyncio.run(run(ops))
