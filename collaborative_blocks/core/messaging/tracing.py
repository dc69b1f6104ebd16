"""OpenTelemetry spans and metrics for the broker (messaging semantic conventions).

A PRODUCER span per send and a CONSUMER span per process. The send span's context travels
in the message's W3C ``traceparent`` header, and the process span is its child, so a
command, the event its handler publishes and a query answered along the way form one trace,
across processes too. Pass a ``tracer_provider`` / ``meter_provider`` (tests use the SDK's
in-memory exporter and metric reader); without them the global providers are used.
``DISTRIBUTED_TRACING_ENABLED=false`` turns spans (and header injection) off; metrics stay.

Metrics (attribute ``system``): ``cb.messaging.sent``, ``cb.messaging.processed``,
``cb.messaging.failed``, ``cb.messaging.redeliveries``, ``cb.messaging.dead_letters``
(counters), ``cb.messaging.process.duration`` (histogram, seconds of the broker's clock) and
``cb.messaging.dead_letter.depth`` (observable gauge).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from collaborative_blocks.core.messaging.envelope import Message

__all__ = ["MessagingTelemetry"]

_INSTRUMENTATION = "collaborative_blocks.messaging"
_SYSTEM = "collaborative_blocks"
_propagator = TraceContextTextMapPropagator()
# Reply subjects are "cb.replies.<connector address>" (see broker.reply_subject).
_REPLY_PREFIX = "cb.replies."
_REPLY_TEMPLATE = "cb.replies.{address}"


class MessagingTelemetry:
    """The broker's tracer and instruments."""

    def __init__(
        self,
        *,
        tracing_enabled: bool = True,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        dead_letter_depth: Callable[[], int] | None = None,
    ) -> None:
        self.tracing_enabled = tracing_enabled
        self._explicit_provider = tracer_provider is not None
        self._checks_left = 0
        self._global_recording = False
        self._tracer = trace.get_tracer(_INSTRUMENTATION, tracer_provider=tracer_provider)
        meter = metrics.get_meter(_INSTRUMENTATION, meter_provider=meter_provider)
        # Counting in plain dicts and reporting through observable counters keeps the
        # per-message cost to a dict update; the SDK reads them when it collects.
        self.counts: dict[str, dict[str, int]] = {
            name: {} for name in ("sent", "processed", "failed", "redeliveries", "dead_letters")
        }
        descriptions = {
            "sent": "messages sent",
            "processed": "messages handled successfully",
            "failed": "handler attempts that raised or timed out",
            "redeliveries": "messages retried after a failed attempt",
            "dead_letters": "messages moved to the dead-letter queue",
        }
        for name, description in descriptions.items():
            meter.create_observable_counter(
                f"cb.messaging.{name}", [self._observer(name)], "{message}", description
            )
        self._sent = self.counts["sent"]
        self._processed = self.counts["processed"]
        self._failed = self.counts["failed"]
        self._redeliveries = self.counts["redeliveries"]
        self._dead_lettered = self.counts["dead_letters"]
        self._duration = meter.create_histogram(
            "cb.messaging.process.duration", "s", "time spent handling one message"
        )
        self._depth = dead_letter_depth
        if dead_letter_depth is not None:
            meter.create_observable_gauge(
                "cb.messaging.dead_letter.depth",
                [self._observe_depth],
                "{message}",
                "dead letters waiting in this broker's queue",
            )
        self._attributes: dict[str, Mapping[str, str]] = {}

    def _observer(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        counts = self.counts[name]

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, self.attrs(system)) for system, value in counts.items()]

        return observe

    def _observe_depth(self, options: CallbackOptions) -> Iterable[Observation]:
        assert self._depth is not None
        return [Observation(self._depth())]

    def attrs(self, system: str) -> Mapping[str, str]:
        found = self._attributes.get(system)
        if found is None:
            found = self._attributes[system] = {"system": system}
        return found

    # -- metrics ---------------------------------------------------------------------------

    def sent(self, system: str) -> None:
        counts = self._sent
        counts[system] = counts.get(system, 0) + 1

    def processed(self, system: str, seconds: float) -> None:
        counts = self._processed
        counts[system] = counts.get(system, 0) + 1
        self._duration.record(seconds, self.attrs(system))

    def failed(self, system: str) -> None:
        counts = self._failed
        counts[system] = counts.get(system, 0) + 1

    def redelivered(self, system: str) -> None:
        counts = self._redeliveries
        counts[system] = counts.get(system, 0) + 1

    def dead_lettered(self, system: str) -> None:
        counts = self._dead_lettered
        counts[system] = counts.get(system, 0) + 1

    # -- spans -----------------------------------------------------------------------------

    def tracing(self) -> bool:
        """Whether spans are wanted and someone records them.

        Without an SDK tracer provider (given, or installed globally, possibly later) spans
        would be no-ops and no trace context could be injected, so the broker skips the
        span machinery altogether, which keeps the hot path as fast as with tracing off.
        """
        if not self.tracing_enabled:
            return False
        if self._explicit_provider:
            return True
        # Looking the global provider up reads the environment: do it every 1024 calls.
        self._checks_left -= 1
        if self._checks_left < 0:
            self._checks_left = 1023
            provider = trace.get_tracer_provider()
            self._global_recording = not isinstance(
                provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider
            )
        return self._global_recording

    @contextmanager
    def send(self, message: Message, subject: str) -> Iterator[Message]:
        """A PRODUCER span around a publish; yields the message carrying its traceparent."""
        if not self.tracing_enabled:
            yield message
            return
        with self._tracer.start_as_current_span(
            f"send {_span_destination(subject)}",
            kind=SpanKind.PRODUCER,
            attributes=_attributes(message, subject, "send"),
        ):
            carrier: dict[str, str] = dict(message.headers)
            _propagator.inject(carrier)
            yield message.with_headers(carrier)

    @contextmanager
    def process(self, message: Message, subject: str, group: str) -> Iterator[Span | None]:
        """A CONSUMER span around handling, child of the sender's span from the headers."""
        if not self.tracing_enabled:
            yield None
            return
        parent = _propagator.extract(message.headers)
        attributes = _attributes(message, subject, "process")
        attributes["messaging.consumer.group.name"] = group
        token = otel_context.attach(parent)
        try:
            with self._tracer.start_as_current_span(
                f"process {_span_destination(subject)}",
                kind=SpanKind.CONSUMER,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                yield span
        finally:
            otel_context.detach(token)

    @staticmethod
    def record_error(span: Span | None, error: BaseException) -> None:
        if span is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


def _span_destination(subject: str) -> str:
    # Span names must have low cardinality: a reply subject names one connector instance,
    # so spans are named after its template instead (as semantic conventions ask).
    return _REPLY_TEMPLATE if subject.startswith(_REPLY_PREFIX) else subject


def _attributes(message: Message, subject: str, operation: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "messaging.system": _SYSTEM,
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
        "messaging.destination.name": subject,
        "messaging.message.id": message.id,
        "cb.message.type": message.type.value,
        "cb.message.name": message.name,
        "cb.message.guarantee": message.guarantee.value,
    }
    if subject.startswith(_REPLY_PREFIX):
        attributes["messaging.destination.template"] = _REPLY_TEMPLATE
        attributes["messaging.destination.temporary"] = True
    if message.correlation_id:
        attributes["messaging.message.conversation_id"] = message.correlation_id
    if message.source:
        attributes["cb.message.source"] = message.source
    if message.target:
        attributes["cb.message.target"] = message.target
    return attributes
