"""The transport conformance suite: the cases every message transport must pass.

Subclass :class:`TransportConformance` in a test module and implement
:meth:`~TransportConformance.open_transport`; pytest collects every ``test_*`` case for your
transport::

    class TestMyTransport(TransportConformance):
        virtual_time = False   # a networked broker keeps real time

        async def open_transport(self, clock: Clock) -> Transport:
            return await MyTransportFactory().open("my://localhost", runtime=Runtime(clock=clock))

With ``virtual_time = True`` (in-process transports) the suite runs on a
:class:`~collaborative_blocks.core.clock.VirtualClock` and moves it past ack timeouts; with
``False`` it uses the system clock and simply waits (bounded by :attr:`patience`) for the
redeliveries that real time brings. Override :meth:`crash` when your transport can kill a
consumer more realistically than by abandoning it (e.g. dropping its connection).
"""

from __future__ import annotations

import asyncio
import random
import sys
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest

from collaborative_blocks.core.clock import Clock, SystemClock, VirtualClock
from collaborative_blocks.core.messaging.envelope import Message, MessageType, decode
from collaborative_blocks.core.messaging.transport import Delivery, Subscription, Transport

__all__ = ["TransportConformance", "body_message"]


def body_message(body: Message | bytes) -> Message:
    """A delivery's body as a Message, whether the transport decoded it or not."""
    return body if isinstance(body, Message) else decode(body)


class TransportConformance:
    """Abstract cases; subclasses implement :meth:`open_transport`."""

    #: Run on a VirtualClock (in-process transports) or the system clock (real servers).
    virtual_time: bool = True
    #: Ack timeout used by the cases, in seconds of the transport's clock.
    ack_timeout: float = 2.0
    #: Real seconds to wait for something that must arrive before failing the case.
    patience: float = 20.0

    async def open_transport(self, clock: Clock) -> Transport:
        """A new, connected transport using ``clock``."""
        raise NotImplementedError

    def process_url(self) -> str | None:
        """A URL another process can open to reach the same transport (None: skip that case).

        Used by the case that kills a consumer process with SIGKILL while it holds messages;
        it needs ``virtual_time = False``.
        """
        return None

    async def crash(self, subscription: Subscription) -> None:
        """Make the consumer behind ``subscription`` die without settling what it holds.

        The default abandons it (never acks, never closes), which is what a killed process
        looks like to a broker: its deliveries come back after the ack timeout.
        """

    # -- fixtures and helpers --------------------------------------------------------------

    @pytest.fixture
    def clock(self) -> Clock:
        return VirtualClock() if self.virtual_time else SystemClock()

    @pytest.fixture
    async def transport(self, clock: Clock) -> AsyncIterator[Transport]:
        transport = await self.open_transport(clock)
        try:
            yield transport
        finally:
            await transport.close()

    @pytest.fixture
    def subject(self) -> str:
        return f"conformance.{uuid.uuid4().hex[:12]}"

    @pytest.fixture
    def rng(self) -> random.Random:
        return random.Random(1234)

    async def advance(self, clock: Clock, seconds: float) -> None:
        """Let ``seconds`` pass on the transport's clock (no-op on real time)."""
        if isinstance(clock, VirtualClock):
            await clock.advance(seconds)

    async def fetch(self, subscription: Subscription, count: int = 1) -> Sequence[Delivery]:
        deliveries = await asyncio.wait_for(subscription.fetch(count), self.patience)
        assert deliveries, "fetch returned nothing although messages are waiting"
        return deliveries

    async def fetch_one(self, subscription: Subscription) -> Delivery:
        deliveries = await self.fetch(subscription, 1)
        assert len(deliveries) == 1, f"asked for one delivery, got {len(deliveries)}"
        return deliveries[0]

    async def fetch_after(
        self, clock: Clock, subscription: Subscription, seconds: float
    ) -> Delivery:
        """Fetch one delivery that becomes available only after ``seconds`` pass."""
        task = asyncio.ensure_future(subscription.fetch(1))
        try:
            await self.advance(clock, seconds)
            deliveries = await asyncio.wait_for(task, self.patience)
        finally:
            task.cancel()
        assert len(deliveries) == 1
        return deliveries[0]

    def message(self, rng: random.Random, clock: Clock, n: int) -> Message:
        return Message.new(
            MessageType.EVENT,
            "conformance.tested",
            {"n": n, "text": "héllo"},
            now=clock.now(),
            rng=rng,
            source="conformance",
            headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
            ttl=3600.0,
        )

    async def subscribe(
        self,
        transport: Transport,
        subject: str,
        group: str = "g",
        consumer: str = "c1",
        prefetch: int = 100,
    ) -> Subscription:
        return await transport.subscribe(
            subject,
            group=group,
            consumer=consumer,
            ack_timeout=self.ack_timeout,
            prefetch=prefetch,
        )

    # -- cases -----------------------------------------------------------------------------

    async def test_declares_capabilities(self, transport: Transport) -> None:
        capabilities = transport.capabilities
        assert capabilities.guarantees, "a transport must offer at least one guarantee"
        assert capabilities.max_message_bytes > 0
        assert transport.url

    async def test_published_messages_arrive_in_order_intact(
        self, transport: Transport, subject: str, rng: random.Random, clock: Clock
    ) -> None:
        subscription = await self.subscribe(transport, subject)
        sent = [self.message(rng, clock, n) for n in range(5)]
        for message in sent:
            await transport.publish(subject, message)
        received: list[Delivery] = []
        while len(received) < len(sent):
            received.extend(await self.fetch(subscription, len(sent) - len(received)))
        assert [body_message(d.body) for d in received] == sent
        assert all(d.attempt == 1 for d in received)
        assert all(d.subject == subject for d in received)
        for delivery in received:
            await delivery.ack()
        await subscription.close()

    async def test_raw_bytes_are_delivered_as_they_were_published(
        self, transport: Transport, subject: str
    ) -> None:
        subscription = await self.subscribe(transport, subject)
        await transport.publish(subject, b"\x00not a message")
        delivery = await self.fetch_one(subscription)
        assert delivery.body == b"\x00not a message"
        await delivery.ack()

    async def test_acked_message_is_not_delivered_again(
        self, transport: Transport, subject: str, rng: random.Random, clock: Clock
    ) -> None:
        subscription = await self.subscribe(transport, subject)
        first, second = self.message(rng, clock, 1), self.message(rng, clock, 2)
        await transport.publish(subject, first)
        delivery = await self.fetch_one(subscription)
        await delivery.ack()
        await delivery.ack()  # acking twice is harmless
        await self.advance(clock, self.ack_timeout * 2)
        await transport.publish(subject, second)
        # Redeliveries come before new messages, so an unwanted redelivery would show here.
        following = await self.fetch_one(subscription)
        assert body_message(following.body).id == second.id
        await following.ack()

    async def test_nack_redelivers_with_the_next_attempt_number(
        self, transport: Transport, subject: str, rng: random.Random, clock: Clock
    ) -> None:
        subscription = await self.subscribe(transport, subject)
        message = self.message(rng, clock, 1)
        await transport.publish(subject, message)
        first = await self.fetch_one(subscription)
        assert first.attempt == 1
        await first.nack()
        again = await self.fetch_one(subscription)
        assert body_message(again.body).id == message.id
        assert again.attempt == 2
        await again.ack()

    async def test_nack_with_delay_defers_the_redelivery(
        self, transport: Transport, subject: str, rng: random.Random, clock: Clock
    ) -> None:
        subscription = await self.subscribe(transport, subject)
        delayed, fresh = self.message(rng, clock, 1), self.message(rng, clock, 2)
        await transport.publish(subject, delayed)
        first = await self.fetch_one(subscription)
        await first.nack(delay=self.ack_timeout)
        await transport.publish(subject, fresh)
        following = await self.fetch_one(subscription)
        assert body_message(following.body).id == fresh.id, "a delayed nack came back early"
        await following.ack()
        again = await self.fetch_after(clock, subscription, self.ack_timeout * 1.5)
        assert body_message(again.body).id == delayed.id
        assert again.attempt == 2
        await again.ack()

    async def test_unacked_message_is_redelivered_after_the_ack_timeout(
        self, transport: Transport, subject: str, rng: random.Random, clock: Clock
    ) -> None:
        subscription = await self.subscribe(transport, subject)
        message = self.message(rng, clock, 1)
        await transport.publish(subject, message)
        first = await self.fetch_one(subscription)
        assert first.attempt == 1
        again = await self.fetch_after(clock, subscription, self.ack_timeout * 1.5)
        assert body_message(again.body).id == message.id
        assert again.attempt == 2
        await again.ack()

    async def test_every_group_gets_every_message(
        self, transport: Transport, subject: str, rng: random.Random, clock: Clock
    ) -> None:
        audit = await self.subscribe(transport, subject, group="audit")
        billing = await self.subscribe(transport, subject, group="billing")
        sent = [self.message(rng, clock, n) for n in range(3)]
        for message in sent:
            await transport.publish(subject, message)
        for subscription in (audit, billing):
            got: list[Delivery] = []
            while len(got) < len(sent):
                got.extend(await self.fetch(subscription, len(sent)))
            assert [body_message(d.body).id for d in got] == [m.id for m in sent]
            for delivery in got:
                await delivery.ack()

    async def test_competing_consumers_share_the_work_without_duplicates(
        self, transport: Transport, subject: str, rng: random.Random, clock: Clock
    ) -> None:
        first = await self.subscribe(transport, subject, consumer="c1", prefetch=1)
        second = await self.subscribe(transport, subject, consumer="c2", prefetch=1)
        sent = [self.message(rng, clock, n) for n in range(10)]
        for message in sent:
            await transport.publish(subject, message)
        seen: dict[str, list[str]] = {"c1": [], "c2": []}
        while len(seen["c1"]) + len(seen["c2"]) < len(sent):
            # Each holds one unsettled delivery at a time, so they must take turns.
            a = await self.fetch_one(first)
            b = await self.fetch_one(second)
            seen["c1"].append(body_message(a.body).id)
            seen["c2"].append(body_message(b.body).id)
            await a.ack()
            await b.ack()
        everything = seen["c1"] + seen["c2"]
        assert seen["c1"], "the first consumer got no share"
        assert seen["c2"], "the second consumer got no share"
        assert len(everything) == len(set(everything)), "a message went to both consumers"
        assert set(everything) == {m.id for m in sent}

    async def test_message_of_a_dead_consumer_goes_to_another(
        self, transport: Transport, subject: str, rng: random.Random, clock: Clock
    ) -> None:
        doomed = await self.subscribe(transport, subject, consumer="doomed", prefetch=1)
        survivor = await self.subscribe(transport, subject, consumer="survivor", prefetch=1)
        held, other = self.message(rng, clock, 1), self.message(rng, clock, 2)
        await transport.publish(subject, held)
        await transport.publish(subject, other)
        taken = await self.fetch_one(doomed)
        assert body_message(taken.body).id == held.id
        await self.crash(doomed)
        second = await self.fetch_one(survivor)
        assert body_message(second.body).id == other.id
        await second.ack()
        rescued = await self.fetch_after(clock, survivor, self.ack_timeout * 1.5)
        assert body_message(rescued.body).id == held.id
        assert rescued.attempt == 2
        await rescued.ack()

    async def test_consumer_process_killed_mid_batch_loses_nothing(
        self, transport: Transport, subject: str, rng: random.Random, clock: Clock
    ) -> None:
        url = self.process_url()
        if url is None or self.virtual_time:
            pytest.skip("needs process_url() and real time (virtual_time = False)")
        survivor = await self.subscribe(transport, subject, consumer="survivor", prefetch=10)
        sent = [self.message(rng, clock, n) for n in range(5)]
        for message in sent:
            await transport.publish(subject, message)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "collaborative_blocks.testing.transport_conformance",
            url,
            subject,
            "g",
            str(len(sent)),
            str(self.ack_timeout),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), self.patience)
            assert line.strip() == f"HELD {len(sent)}".encode(), line
        finally:
            process.kill()  # SIGKILL: nothing it holds is acked or given back
            await process.wait()
        received: list[Delivery] = []
        while len(received) < len(sent):
            received.extend(await self.fetch(survivor, len(sent)))
        assert sorted(body_message(d.body).id for d in received) == sorted(m.id for m in sent)
        assert all(d.attempt >= 2 for d in received)
        for delivery in received:
            await delivery.ack()

    async def test_close_ends_a_waiting_fetch(self, transport: Transport, subject: str) -> None:
        subscription = await self.subscribe(transport, subject)
        waiting = asyncio.ensure_future(subscription.fetch(1))
        await asyncio.sleep(0)  # let the fetch start waiting
        await transport.close()
        assert list(await asyncio.wait_for(waiting, self.patience)) == []


async def _hold_until_killed(
    url: str, subject: str, group: str, count: int, ack_timeout: float
) -> None:
    """The doomed consumer process: take ``count`` messages, say so, never settle them."""
    from collaborative_blocks.core.messaging.broker import open_transport
    from collaborative_blocks.core.runtime import Runtime
    from collaborative_blocks.core.settings import load_settings

    transport = await open_transport(url, runtime=Runtime(load_settings({})))
    subscription = await transport.subscribe(
        subject, group=group, consumer="doomed", ack_timeout=ack_timeout, prefetch=count
    )
    held = 0
    while held < count:
        held += len(await subscription.fetch(count - held))
    sys.stdout.write(f"HELD {held}\n")
    sys.stdout.flush()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(
        _hold_until_killed(
            sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
        )
    )
