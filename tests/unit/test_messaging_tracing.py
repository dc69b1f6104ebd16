"""Tracing and metrics: one trace across three systems, parent/child links, counters."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from collaborative_blocks import load_settings
from collaborative_blocks.core.clock import VirtualClock
from collaborative_blocks.core.messaging import (
    DeliveryGuarantee,
    Message,
    MessageBroker,
    MessageContext,
    MessageType,
    RetryPolicy,
    Subscription,
    SystemConnector,
)
from collaborative_blocks.core.messaging.transport import Delivery
from collaborative_blocks.plugins.transports.memory import MemoryTransport
from collaborative_blocks.stores.memory import MemoryEventStore


async def until(clock: VirtualClock, condition: Callable[[], bool]) -> None:
    for _ in range(2000):
        if condition():
            return
        await clock.advance(0.05)
    raise AssertionError("condition never became true")


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


def tracing_broker(
    clock: VirtualClock, *, enabled: bool = True
) -> tuple[MessageBroker, InMemorySpanExporter, InMemoryMetricReader]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    broker = MessageBroker(
        clock=clock,
        settings=load_settings({"DISTRIBUTED_TRACING_ENABLED": str(enabled).lower()}),
        tracer_provider=tracer_provider,
        meter_provider=MeterProvider(metric_readers=[reader]),
        retry=RetryPolicy(max_retries=1, base_delay=0.01),
    )
    return broker, exporter, reader


async def test_command_event_query_across_three_systems_is_one_trace() -> None:
    clock = VirtualClock()
    broker, exporter, _ = tracing_broker(clock)
    orders = SystemConnector("orders", broker)
    billing = SystemConnector("billing", broker)
    audit = SystemConnector("audit", broker)
    answered = asyncio.Event()

    async def place(message: Message) -> None:
        await orders.publish_event("orders.placed", {"order": 1})

    async def on_placed(message: Message) -> None:
        assert await billing.query("audit", "limit", {"order": 1}, timeout=5) == 100
        answered.set()

    async def limit(message: Message) -> object:
        return 100

    orders.on_command("place", place)
    billing.on_event("orders.*", on_placed)
    audit.on_query("limit", limit)
    client = SystemConnector("client", broker)
    await client.send_command("orders", "place", {"order": 1})
    await until(clock, answered.is_set)
    await until(clock, lambda: len(exporter.get_finished_spans()) >= 8)
    spans = exporter.get_finished_spans()
    assert len({span.context.trace_id for span in spans}) == 1, "all one trace"
    by_id = {span.context.span_id: span for span in spans}

    def one(name: str, kind: SpanKind) -> ReadableSpan:
        (found,) = [s for s in spans if s.name == name and s.kind is kind]
        return found

    send_command = one("send cb.inbox.orders", SpanKind.PRODUCER)
    process_command = one("process cb.inbox.orders", SpanKind.CONSUMER)
    send_event = one("send cb.events", SpanKind.PRODUCER)
    process_event = one("process cb.events", SpanKind.CONSUMER)
    send_query = one("send cb.inbox.audit", SpanKind.PRODUCER)
    process_query = one("process cb.inbox.audit", SpanKind.CONSUMER)

    def parent(span: ReadableSpan) -> ReadableSpan:
        assert span.parent is not None
        return by_id[span.parent.span_id]

    assert send_command.parent is None
    assert parent(process_command) is send_command
    assert parent(send_event) is process_command
    assert parent(process_event) is send_event
    assert parent(send_query) is process_event
    assert parent(process_query) is send_query
    assert process_command.attributes is not None
    assert process_command.attributes["messaging.operation.type"] == "process"
    assert process_command.attributes["messaging.consumer.group.name"] == "orders"
    assert process_command.attributes["messaging.destination.name"] == "cb.inbox.orders"
    await broker.close()


async def test_failed_processing_marks_the_span_and_counts(clock: VirtualClock) -> None:
    broker, exporter, reader = tracing_broker(clock)

    async def broken(message: Message) -> None:
        raise RuntimeError("boom")

    async def fine(message: Message) -> None:
        return None

    await broker.subscribe("bad", broken, system="worker")
    await broker.subscribe("good", fine, system="worker")
    await broker.publish(Message(MessageType.EVENT, "bad", source="shop"))
    await broker.publish(Message(MessageType.EVENT, "good", source="shop"))
    await until(clock, lambda: broker.dlq.added == 1)
    await until(clock, lambda: broker.telemetry.counts["processed"].get("worker", 0) >= 1)
    errored = [s for s in exporter.get_finished_spans() if not s.status.is_ok]
    assert errored
    assert errored[0].events[0].name == "exception"
    data = reader.get_metrics_data()
    assert data is not None
    values: dict[str, dict[str, float]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    system = str((point.attributes or {}).get("system", ""))
                    # Counters and gauges have a value, histograms a count.
                    value = getattr(point, "value", None) or getattr(point, "count", 0)
                    values.setdefault(metric.name, {})[system] = float(value or 0)
    assert values["cb.messaging.sent"]["shop"] == 2
    # Each event reaches both subscriptions; the one that does not match acks it unhandled.
    assert values["cb.messaging.processed"]["worker"] == 1
    assert values["cb.messaging.failed"]["worker"] == 2  # first attempt + one retry
    assert values["cb.messaging.redeliveries"]["worker"] == 1
    assert values["cb.messaging.dead_letters"]["worker"] == 1
    assert values["cb.messaging.dead_letter.depth"][""] == 1
    assert values["cb.messaging.process.duration"]["worker"] == 1
    await broker.close()


async def test_tracing_switch_turns_spans_and_headers_off(clock: VirtualClock) -> None:
    broker, exporter, _ = tracing_broker(clock, enabled=False)
    sent = await broker.publish(Message(MessageType.EVENT, "x", source="shop"))
    assert "traceparent" not in sent.headers
    assert exporter.get_finished_spans() == ()
    await broker.close()


async def test_traceparent_header_is_w3c(clock: VirtualClock) -> None:
    broker, _, _ = tracing_broker(clock)
    sent = await broker.publish(Message(MessageType.EVENT, "x", source="shop"))
    version, trace_id, span_id, flags = sent.headers["traceparent"].split("-")
    assert (version, len(trace_id), len(span_id)) == ("00", 32, 16)
    assert int(flags, 16) & 1, "sampled"
    await broker.close()


async def test_explicit_tracer_provider_needs_no_global_one(clock: VirtualClock) -> None:
    assert not isinstance(trace.get_tracer_provider(), TracerProvider), "no global SDK provider"
    traced, exporter, _ = tracing_broker(clock)
    untraced = MessageBroker(clock=clock, settings=load_settings({}))
    sent = await traced.publish(Message(MessageType.EVENT, "x", source="shop"))
    assert "traceparent" in sent.headers
    (span,) = exporter.get_finished_spans()
    assert (span.name, span.kind) == ("send cb.events", SpanKind.PRODUCER)
    plain = await untraced.publish(Message(MessageType.EVENT, "x", source="shop"))
    assert "traceparent" not in plain.headers, "without a provider nothing records spans"
    await traced.close()
    await untraced.close()


async def test_reply_spans_are_named_after_the_subject_template(clock: VirtualClock) -> None:
    broker, exporter, _ = tracing_broker(clock)
    audit = SystemConnector("audit", broker)
    asker = SystemConnector("asker", broker)

    async def limit(message: Message) -> object:
        return 100

    audit.on_query("limit", limit)
    assert await asker.query("audit", "limit", timeout=5) == 100
    await until(clock, lambda: len(exporter.get_finished_spans()) >= 4)
    replies = [s for s in exporter.get_finished_spans() if "replies" in s.name]
    assert sorted((s.name, s.kind) for s in replies) == [
        ("process cb.replies.{address}", SpanKind.CONSUMER),
        ("send cb.replies.{address}", SpanKind.PRODUCER),
    ]
    for span in replies:
        assert span.attributes is not None
        assert span.attributes["messaging.destination.name"] == f"cb.replies.{asker.address}"
        assert span.attributes["messaging.destination.temporary"] is True
    await broker.close()


class RedeliveringTransport(MemoryTransport):
    """Reports every delivery of a message id seen before as a redelivery (attempt 2)."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(clock=clock)
        self.seen: set[tuple[str, str]] = set()

    async def subscribe(self, subject: str, **options: Any) -> Subscription:
        inner = await super().subscribe(subject, **options)
        outer = self
        group = str(options["group"])

        class Again:
            def __init__(self, delivery: Delivery) -> None:
                self.delivery = delivery
                self.body = delivery.body
                self.subject = delivery.subject
                key = (group, delivery.body.id if isinstance(delivery.body, Message) else "")
                self.attempt = 2 if key in outer.seen else 1
                outer.seen.add(key)

            async def ack(self) -> None:
                await self.delivery.ack()

            async def nack(self, delay: float = 0.0) -> None:
                await self.delivery.nack(delay)

        class Subscribed:
            async def fetch(self, max_messages: int) -> Sequence[Delivery]:
                return [Again(d) for d in await inner.fetch(max_messages)]

            async def close(self) -> None:
                await inner.close()

        return Subscribed()


async def test_outbox_resent_for_a_redelivered_duplicate_stays_in_the_trace(
    clock: VirtualClock,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    broker = MessageBroker(
        transport=RedeliveringTransport(clock),
        store=MemoryEventStore(),
        clock=clock,
        settings=load_settings({}),
        tracer_provider=provider,
    )
    followed: list[Message] = []

    async def deposit(message: Message, ctx: MessageContext) -> None:
        ctx.publish(Message(MessageType.EVENT, "deposited", {}))

    async def follow(message: Message) -> None:
        followed.append(message)

    await broker.subscribe("deposit", deposit, group="ledger")
    await broker.subscribe("deposited", follow, group="mailer")
    exactly_once = DeliveryGuarantee.EXACTLY_ONCE
    sent = await broker.publish(
        Message(MessageType.EVENT, "deposit", source="bank", guarantee=exactly_once)
    )
    await until(clock, lambda: len(followed) == 1)
    exporter.clear()
    await broker.publish(sent)  # delivered again as attempt 2: the inbox has it
    await until(clock, lambda: len(followed) == 2)
    await until(clock, lambda: len(exporter.get_finished_spans()) >= 3)
    spans = exporter.get_finished_spans()
    by_id = {span.context.span_id: span for span in spans}
    (resend,) = [
        s
        for s in spans
        if s.kind is SpanKind.PRODUCER
        and s.attributes is not None
        and s.attributes["cb.message.name"] == "deposited"
    ]
    assert resend.parent is not None, "the resend is not a new trace"
    parent = by_id[resend.parent.span_id]
    assert (parent.name, parent.kind) == ("process cb.events", SpanKind.CONSUMER)
    assert parent.attributes is not None
    assert parent.attributes["messaging.message.id"] == sent.id
    assert parent.attributes["messaging.consumer.group.name"] == "ledger"
    await broker.close()
