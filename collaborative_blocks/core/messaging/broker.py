"""The message broker: routing, delivery guarantees, retries, dead letters, ordering.

```python
broker = MessageBroker()                       # in-process; or MessageBroker("redis://...")
await broker.subscribe("orders.*", handler)    # events whose name matches the glob
await broker.publish(Message(MessageType.EVENT, "orders.created", {"id": 1}, source="shop"))
```

Routing: events go to one broadcast subject and every subscription (consumer group) filters
them by its glob pattern; commands and queries go to their target's inbox subject, which the
target's :class:`~collaborative_blocks.core.messaging.connector.SystemConnector` consumes as
one group (so several instances of a system share its work); responses go to the querying
connector's own reply subject.

Guarantees, per message (:class:`DeliveryGuarantee`):

- ``AT_MOST_ONCE``: acknowledged before the handler runs; a failure is dead-lettered, not
  retried.
- ``AT_LEAST_ONCE``: acknowledged after the handler finished. A handler that raises or
  exceeds ``handler_timeout`` is retried in place after an exponential backoff with jitter
  (on the injected clock and RNG) up to ``max_retries`` times, then dead-lettered with every
  attempt's error. If the consumer dies, the transport redelivers after the ack timeout.
- ``EXACTLY_ONCE``: at-least-once, and the handler's store appends (``ctx.append``) are
  committed in one transaction with an inbox record ``Tracking(consumer=group,
  message_id=...)``; a duplicate is acknowledged without repeating the effect.

Ordering: a consumer runs ``partitions`` workers; messages with the same
:attr:`Message.ordering_key` always go to the same worker and are handled one after the
other in delivery order; different keys run in parallel. At most ``max_in_flight``
deliveries are held per consumer; beyond that the transport stops handing out messages and
its publishers wait (backpressure).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fnmatch
import inspect
import logging
import random
import re
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from opentelemetry import metrics, trace
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from collaborative_blocks.core.clock import Clock, SystemClock
from collaborative_blocks.core.messaging.deadletters import (
    AttemptError,
    DeadLetterQueue,
    DeadLetterReason,
    close_attempts,
    read_attempts,
    record_attempt,
    record_attempt_started,
)
from collaborative_blocks.core.messaging.envelope import (
    DeliveryGuarantee,
    Message,
    MessageType,
    decode,
    encode,
    new_message_id,
)
from collaborative_blocks.core.messaging.tracing import MessagingTelemetry
from collaborative_blocks.core.messaging.transport import Delivery, Subscription, Transport
from collaborative_blocks.core.randomness import new_random, random_id
from collaborative_blocks.core.settings import Settings, load_settings
from collaborative_blocks.errors import (
    BrokerClosedError,
    DuplicateMessageError,
    HandlerTimeoutError,
    MessageRejectedError,
    MessagingError,
    NoRouteError,
    PluginError,
    PublishTimeoutError,
    RejectionReason,
    StoreUnavailableError,
    TransportUnavailableError,
    UnknownSchemeError,
    UnsupportedGuaranteeError,
)
from collaborative_blocks.stores.base import AppendRequest, EventStore, NewEvent, Tracking

if TYPE_CHECKING:
    import pluggy

    from collaborative_blocks.core.extensions import TransportFactory
    from collaborative_blocks.core.runtime import Runtime

__all__ = [
    "DEFAULT_GUARANTEES",
    "BrokerSubscription",
    "DeliveryReceipt",
    "Handler",
    "MessageBroker",
    "MessageContext",
    "ReceiptStatus",
    "RetryPolicy",
    "event_subject",
    "inbox_subject",
    "open_transport",
    "reply_subject",
]

log = logging.getLogger(__name__)

#: The message being handled by the current task (connectors use it for causation ids).
current_message: contextvars.ContextVar[Message | None] = contextvars.ContextVar(
    "cb_current_message", default=None
)

#: The guarantee a message gets when its sender does not choose one.
DEFAULT_GUARANTEES: Mapping[MessageType, DeliveryGuarantee] = {
    MessageType.COMMAND: DeliveryGuarantee.AT_LEAST_ONCE,
    MessageType.EVENT: DeliveryGuarantee.AT_LEAST_ONCE,
    MessageType.QUERY: DeliveryGuarantee.AT_MOST_ONCE,
    MessageType.RESPONSE: DeliveryGuarantee.AT_MOST_ONCE,
}

EVENTS_SUBJECT = "cb.events"
OUTBOX_TOPIC = "collaborative_blocks.messaging:Outgoing"


def outbox_stream(message_id: str) -> str:
    """Where the messages published while handling ``message_id`` (EXACTLY_ONCE) are kept."""
    return f"cb-outbox:{message_id}"


def event_subject() -> str:
    return EVENTS_SUBJECT


def inbox_subject(target: str) -> str:
    """Where commands and queries for ``target`` go."""
    return f"cb.inbox.{target}"


def reply_subject(address: str) -> str:
    """Where responses for a connector's reply ``address`` go."""
    return f"cb.replies.{address}"


class ReceiptStatus:
    """How a delivery ended for one consumer group (values of :attr:`DeliveryReceipt.status`)."""

    PROCESSED = "processed"
    DUPLICATE = "duplicate"
    DEAD_LETTERED = "dead_lettered"


@dataclass(frozen=True, slots=True)
class DeliveryReceipt:
    """What happened to a message in one consumer group."""

    message_id: str
    group: str
    status: str
    attempts: int
    at: float


#: Sends of a handler's outbox refused by the transport are tried this many times in place
#: (the retry policy's delays, on the broker's clock) before the delivery goes back.
OUTBOX_SEND_ATTEMPTS = 3
_TRANSIENT_SEND_ERRORS = (TransportUnavailableError, PublishTimeoutError)


class _GiveBack(Exception):
    """The delivery goes back unacknowledged, and this was not a failed attempt of the
    handler (the handler is not to blame: a dead letter would be wrong)."""


class _OutboxNotSent(_GiveBack):
    """The handler succeeded and its effects are committed, but the transport refused what
    it published. Its redelivery resends the stored outbox (EXACTLY_ONCE) or runs the
    handler again (AT_LEAST_ONCE, which allows that)."""


class _CommitUnknown(_GiveBack):
    """The EXACTLY_ONCE commit failed with the store unreachable, and the store cannot say
    whether it went through (the inbox could not be read either). The redelivery asks the
    inbox again."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter between attempts of one delivery.

    Attempt ``n`` (1-based) that failed waits ``min(max_delay, base_delay * multiplier **
    (n - 1))``, of which a ``jitter`` fraction is random, before attempt ``n + 1``. After
    ``max_retries`` retries (``1 + max_retries`` attempts) the message is dead-lettered.
    """

    max_retries: int = 3
    base_delay: float = 0.1
    max_delay: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.base_delay < 0 or self.max_delay < 0:
            raise MessagingError(
                f"retry policy values must be >= 0, got max_retries={self.max_retries}, "
                f"base_delay={self.base_delay}, max_delay={self.max_delay}"
            )
        if not 0.0 <= self.jitter <= 1.0:
            raise MessagingError(f"jitter is a fraction in [0, 1], got {self.jitter}")

    def delay(self, attempt: int, rng: random.Random) -> float:
        ceiling = min(self.max_delay, self.base_delay * self.multiplier ** max(attempt - 1, 0))
        return ceiling * (1.0 - self.jitter) + ceiling * self.jitter * rng.random()

    def worst_case(self, handler_timeout: float) -> float:
        """The longest one delivery can take with every attempt timing out."""
        waits = sum(
            min(self.max_delay, self.base_delay * self.multiplier**n)
            for n in range(self.max_retries)
        )
        return handler_timeout * (self.max_retries + 1) + waits


class MessageContext:
    """What a handler gets besides the message: the store, and an outbox.

    Appends made through :meth:`append` are committed after the handler returns, in one
    transaction; for an EXACTLY_ONCE message that transaction also records the message id
    in the consumer's inbox, so the effect happens once however often it is delivered.
    Messages given to :meth:`publish` are sent after that commit (with this message as their
    cause), and not at all if the handler fails. For EXACTLY_ONCE they are committed in the
    same transaction (an outbox), so a crash between commit and send only delays them: the
    redelivered duplicate sends them, with the same ids.
    """

    __slots__ = ("_outbox", "_requests", "attempt", "broker", "group", "message", "system")

    def __init__(
        self, broker: MessageBroker, message: Message, attempt: int, group: str, system: str
    ) -> None:
        self.broker = broker
        self.message = message
        self.attempt = attempt
        self.group = group
        self.system = system
        self._requests: list[AppendRequest] | None = None
        self._outbox: list[Message] | None = None

    @property
    def store(self) -> EventStore:
        """The broker's event store (for reads; write with :meth:`append`)."""
        if self.broker.store is None:
            raise MessagingError(
                "this broker has no event store; create it with MessageBroker(store=...) "
                "to use ctx.store, ctx.append and EXACTLY_ONCE delivery"
            )
        return self.broker.store

    def append(
        self, stream: str, events: Sequence[NewEvent], *, expected_version: int | None = None
    ) -> None:
        """Append ``events`` to ``stream`` when the handler has finished (atomically)."""
        self.store  # noqa: B018 -- fail now, inside the handler, when there is no store
        if self._requests is None:
            self._requests = []
        self._requests.append(AppendRequest(stream, list(events), expected_version))

    def publish(self, message: Message) -> None:
        """Send ``message`` once the handler's effects are committed."""
        if self._outbox is None:
            self._outbox = []
        cause = self.message
        # Built directly rather than with _replace (several times slower): handlers that
        # publish do it for every message they handle.
        self._outbox.append(
            Message(
                message.type,
                message.name,
                message.payload,
                message.source or self.system,
                message.target,
                message.id,
                message.key,
                message.headers,
                message.correlation_id or cause.correlation_id or cause.id,
                message.causation_id or cause.id,
                message.created_at,
                message.ttl,
                message.guarantee,
            )
        )


MessageHandler: TypeAlias = Callable[[Message], Awaitable[object]]
ContextHandler: TypeAlias = Callable[[Message, MessageContext], Awaitable[object]]
#: A handler takes the message, or the message and a :class:`MessageContext`.
Handler: TypeAlias = MessageHandler | ContextHandler


class PermanentFailure(MessagingError):
    """Raised by a processor for a message that no retry can fix: dead-letter it now."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        self.reason = reason
        super().__init__(detail)


def adapt_handler(handler: Handler) -> ContextHandler:
    """Call ``handler`` with ``(message, ctx)`` whichever of the two forms it has."""
    if not callable(handler):
        raise MessagingError(f"a handler must be an async function, got {handler!r}")
    try:
        parameters = [
            p
            for p in inspect.signature(handler).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
    except (TypeError, ValueError):
        parameters = []
    takes_context = len(parameters) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters)
    if takes_context:
        return handler  # type: ignore[return-value]
    single: MessageHandler = handler  # type: ignore[assignment]

    def with_context(message: Message, ctx: MessageContext) -> Awaitable[object]:
        return single(message)

    return with_context


_glob_cache: dict[str, re.Pattern[str]] = {}


def name_matcher(pattern: str) -> Callable[[str], bool]:
    """A fast, cached test of message names against a glob (``orders.*``, ``*``)."""
    if pattern == "*":
        return lambda name: True
    if not any(c in pattern for c in "*?["):
        return pattern.__eq__
    compiled = _glob_cache.get(pattern)
    if compiled is None:
        compiled = _glob_cache[pattern] = re.compile(fnmatch.translate(pattern))
    seen: dict[str, bool] = {}

    def matches(name: str) -> bool:
        found = seen.get(name)
        if found is None:
            found = seen[name] = compiled.match(name) is not None
            if len(seen) > 4096:
                seen.clear()
        return found

    return matches


Processor: TypeAlias = Callable[[Message, MessageContext], Awaitable[object]]


@dataclass
class _ConsumerSpec:
    subject: str
    group: str
    system: str
    processor: Processor
    matches: Callable[[str], bool]
    partitions: int
    served_target: str | None = None
    consumer: _Consumer | None = field(default=None, repr=False)


class BrokerSubscription:
    """A running consumer group membership; :meth:`close` stops it."""

    def __init__(self, broker: MessageBroker, spec: _ConsumerSpec) -> None:
        self._broker = broker
        self._spec = spec

    @property
    def group(self) -> str:
        return self._spec.group

    @property
    def subject(self) -> str:
        return self._spec.subject

    async def close(self) -> None:
        await self._broker._stop_consumer(self._spec)


class _Worker:
    __slots__ = ("busy_seq", "busy_since", "expired_seq", "queue", "seq", "task", "wake")

    def __init__(self) -> None:
        self.queue: deque[tuple[Delivery, Message]] = deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.seq = 0
        self.busy_seq: int | None = None
        self.busy_since = 0.0
        self.expired_seq: int | None = None


class _Consumer:
    """One consumer group membership: a fetch loop, partition workers and a watchdog."""

    def __init__(self, broker: MessageBroker, spec: _ConsumerSpec) -> None:
        self.broker = broker
        self.spec = spec
        self.subject = spec.subject
        self.group = spec.group
        self.system = spec.system
        self.workers = [_Worker() for _ in range(max(1, spec.partitions))]
        self.subscription: Subscription | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.watch = asyncio.Event()
        self.limit = max(1, broker.max_in_flight)
        self.batch = min(self.limit, 256)
        # Deliveries handed to the workers and not yet finished, and how many of those still
        # wait in a queue. The fetch loop reads again only when a batch's worth of them is
        # free, or when the queues ran dry: reading as soon as one ack frees one slot turns a
        # consumer at its limit into one round trip per handful of messages.
        self.in_flight = 0
        self.queued = 0
        self.room = asyncio.Event()
        # Where an ack is a round trip (a networked transport), a worker that waited for it
        # before taking its next message would cap every XACK at one id per worker; so the
        # success path's ack is sent in the background there, and the transport coalesces
        # the ones in flight. That is safe exactly where an unconfirmed ack is harmless: a
        # transport that redelivers a crashed consumer's unacknowledged deliveries.
        self.ack_behind = broker.transport.capabilities.survives_consumer_crash
        self.acks: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        broker = self.broker
        transport = broker.transport
        self.subscription = await transport.subscribe(
            self.subject,
            group=self.group,
            consumer=broker.consumer_name,
            ack_timeout=broker.ack_timeout,
            prefetch=broker.max_in_flight,
        )
        for index, worker in enumerate(self.workers):
            worker.task = asyncio.create_task(
                self._work(worker), name=f"cb-consumer {self.group} #{index}"
            )
            self.tasks.append(worker.task)
        self.tasks.append(asyncio.create_task(self._fetch(), name=f"cb-fetch {self.group}"))
        self.tasks.append(asyncio.create_task(self._watchdog(), name=f"cb-watch {self.group}"))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks.clear()
        # Acks of handled messages go out before leaving the group, or closing would
        # redeliver what was already done.
        for ack in list(self.acks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ack
        if self.subscription is not None:
            with contextlib.suppress(Exception):
                await self.subscription.close()

    async def _fetch(self) -> None:
        assert self.subscription is not None
        subscription = self.subscription
        workers = self.workers
        count = len(workers)
        limit = self.limit
        batch = self.batch
        room = self.room
        failures = 0
        while True:
            free = limit - self.in_flight
            if free < batch and (free <= 0 or self.queued > 0):
                # The workers have enough to do; wait for a batch's worth of room (or for
                # them to run dry) instead of reading a few entries after every ack.
                room.clear()
                await room.wait()
                continue
            try:
                deliveries = await subscription.fetch(min(batch, free))
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # The server went away: keep trying (backing off) instead of dying quietly;
                # whatever was unacknowledged is redelivered by the transport meanwhile.
                failures += 1
                self.broker.telemetry.failed(self.system)
                log.warning(
                    "consumer %s cannot fetch from %s (attempt %d): %s",
                    self.group,
                    self.subject,
                    failures,
                    error,
                )
                await self.broker.clock.sleep(
                    self.broker.retry.delay(min(failures, 8), self.broker.rng)
                )
                continue
            failures = 0
            if not deliveries:
                return
            for delivery in deliveries:
                body = delivery.body
                if isinstance(body, Message):
                    message = body
                else:
                    try:
                        message = decode(body, max_bytes=self.broker.max_message_bytes)
                    except MessageRejectedError as error:
                        await self._reject(delivery, bytes(body), error)
                        continue
                if count == 1:
                    worker = workers[0]
                else:
                    worker = workers[zlib.crc32(message.ordering_key.encode()) % count]
                worker.queue.append((delivery, message))
                self.in_flight += 1
                self.queued += 1
                worker.wake.set()

    def _ack_behind(self, delivery: Delivery) -> None:
        """Acknowledge ``delivery`` without waiting for the transport to confirm it."""
        ack = asyncio.ensure_future(delivery.ack())
        self.acks.add(ack)
        ack.add_done_callback(self._acked)

    def _acked(self, ack: asyncio.Future[None]) -> None:
        self.acks.discard(ack)
        if not ack.cancelled() and ack.exception() is not None:
            # Still pending in the transport: it is redelivered after the ack timeout, and
            # the handler's effects (or, for EXACTLY_ONCE, the inbox) make that harmless.
            log.warning("consumer %s could not acknowledge: %s", self.group, ack.exception())

    async def _reject(self, delivery: Delivery, raw: bytes, error: MessageRejectedError) -> None:
        await self.broker._dead_letter(
            DeadLetterReason.from_rejection(error.reason),
            error.detail,
            self.subject,
            self.group,
            self.system,
            raw=raw,
        )
        await delivery.ack()

    async def _work(self, worker: _Worker) -> None:
        queue = worker.queue
        wake = worker.wake
        while True:
            if not queue:
                wake.clear()
                await wake.wait()
                continue
            delivery, message = queue.popleft()
            self.queued -= 1
            try:
                await self._handle(worker, delivery, message)
            except asyncio.CancelledError:
                raise
            except _GiveBack as error:
                log.warning("consumer %s gives message %s back: %s", self.group, message.id, error)
                with contextlib.suppress(Exception):
                    await delivery.nack(self.broker.retry.base_delay)
            except Exception:
                # The broker's own bookkeeping failed (e.g. the store went away while
                # dead-lettering): give the message back rather than lose it.
                log.exception("consumer %s failed to settle message %s", self.group, message.id)
                with contextlib.suppress(Exception):
                    await delivery.nack(self.broker.retry.base_delay)
            finally:
                self.in_flight -= 1
                if self.queued == 0 or self.limit - self.in_flight >= self.batch:
                    self.room.set()

    async def _watchdog(self) -> None:
        clock = self.broker.clock
        timeout = self.broker.handler_timeout
        workers = self.workers
        while True:
            busy = [w for w in workers if w.busy_seq is not None]
            if not busy:
                self.watch.clear()
                await self.watch.wait()
                continue
            now = clock.monotonic()
            due = min(w.busy_since for w in busy) + timeout
            if due > now:
                await clock.sleep(due - now)
                continue
            for worker in busy:
                if (
                    worker.busy_since + timeout <= now
                    and worker.expired_seq != worker.busy_seq
                    and worker.task is not None
                ):
                    worker.expired_seq = worker.busy_seq
                    worker.task.cancel()
            await asyncio.sleep(0)

    async def _handle(self, worker: _Worker, delivery: Delivery, message: Message) -> None:
        broker = self.broker
        now = broker.clock.now()
        ttl = message.ttl
        if ttl is not None and now > message.created_at + ttl + broker.clock_skew:
            await broker._dead_letter(
                DeadLetterReason.EXPIRED,
                f"ttl of {ttl}s (plus {broker.clock_skew}s allowed for clock skew) ran out "
                f"before {self.group!r} handled it",
                self.subject,
                self.group,
                self.system,
                message=message,
            )
            await delivery.ack()
            return
        if not self.spec.matches(message.name):
            await delivery.ack()
            return
        guarantee = message.guarantee
        if guarantee is DeliveryGuarantee.EXACTLY_ONCE:
            store = broker.store
            if store is None:
                await broker._dead_letter(
                    DeadLetterReason.UNSUPPORTED_GUARANTEE,
                    f"{self.group!r} cannot give EXACTLY_ONCE without an event store; "
                    "give its broker store=...",
                    self.subject,
                    self.group,
                    self.system,
                    message=message,
                )
                await delivery.ack()
                return
            if delivery.attempt > 1 and await store.has_processed(self.group, message.id):
                telemetry = broker.telemetry
                if telemetry.tracing():
                    # What it resends belongs to the trace of the message that caused it.
                    with telemetry.process(message, self.subject, self.group):
                        await self._resend_outbox(message)
                else:
                    await self._resend_outbox(message)
                await delivery.ack()
                broker._receipt(message.id, self.group, ReceiptStatus.DUPLICATE, delivery.attempt)
                return
        elif guarantee is DeliveryGuarantee.AT_MOST_ONCE:
            await delivery.ack()
        token = current_message.set(message)
        try:
            telemetry = broker.telemetry
            if telemetry.tracing():
                with telemetry.process(message, self.subject, self.group) as span:
                    await self._attempts(worker, delivery, message, span)
            else:
                await self._attempts(worker, delivery, message, None)
        finally:
            current_message.reset(token)

    async def _commit_exactly_once(self, message: Message, ctx: MessageContext) -> None:
        """Effects, inbox record and outbox in one transaction; then send the outbox.

        The outbox is stored under the handled message's id, so if this process dies between
        the commit and the sends, the redelivered duplicate sends them (same ids) instead.
        """
        broker = self.broker
        assert broker.store is not None
        requests = list(ctx._requests or ())
        outgoing = [broker.stamp(m) for m in ctx._outbox] if ctx._outbox else []
        if outgoing:
            requests.append(
                AppendRequest(
                    outbox_stream(message.id),
                    [
                        NewEvent(OUTBOX_TOPIC, encode(m, max_bytes=broker.max_message_bytes))
                        for m in outgoing
                    ],
                )
            )
        store = broker.store
        try:
            await store.append_many(requests, tracking=Tracking(self.group, message_id=message.id))
        except StoreUnavailableError as error:
            # The commit may have gone through before the connection dropped (a lost
            # acknowledgement): the inbox, written in the same transaction, knows.
            try:
                committed = await store.has_processed(self.group, message.id)
            except Exception:
                raise _CommitUnknown(
                    f"the commit of message {message.id} failed ({error}) and the inbox cannot "
                    "be read to tell whether it went through"
                ) from error
            if committed:
                raise DuplicateMessageError(self.group, message.id) from error
            raise
        await self._send(outgoing)

    async def _send(self, outgoing: Sequence[Message]) -> None:
        """Send what a handler published, once its effects are committed. A send the
        transport refuses (it is restarting, say) is tried again in place; if it still
        refuses, :class:`_OutboxNotSent` gives the delivery back instead of charging the
        handler an attempt (a dead letter for a message that was handled would be wrong)."""
        broker = self.broker
        for index, sent in enumerate(outgoing):
            try:
                await broker.publish(sent)
            except _TRANSIENT_SEND_ERRORS:
                # The hot path is one plain publish; only a refused one pays for retrying.
                await self._send_retrying(outgoing[index:])
                return

    async def _send_retrying(self, outgoing: Sequence[Message]) -> None:
        """Send ``outgoing``, the first of which the transport has just refused once."""
        broker = self.broker
        for number, sent in enumerate(outgoing):
            tries = OUTBOX_SEND_ATTEMPTS - 1 if number == 0 else OUTBOX_SEND_ATTEMPTS
            retrying = AsyncRetrying(
                sleep=broker.clock.sleep,
                stop=stop_after_attempt(max(tries, 1)),
                wait=lambda state: broker.retry.delay(state.attempt_number, broker.rng),
                retry=retry_if_exception_type(_TRANSIENT_SEND_ERRORS),
                reraise=True,
            )
            try:
                if number == 0:
                    # Refused once already: wait before trying again.
                    await broker.clock.sleep(broker.retry.delay(1, broker.rng))
                async for attempt in retrying:
                    with attempt:
                        await broker.publish(sent)
            except _TRANSIENT_SEND_ERRORS as error:
                raise _OutboxNotSent(
                    f"message {sent.id} published by the handler could not be sent: {error}"
                ) from error

    async def _processed_meanwhile(self, message: Message) -> bool:
        """Whether this group's inbox holds ``message`` (EXACTLY_ONCE only): asked before a
        dead letter, since a concurrent copy of the message may have committed it. If the
        inbox cannot be read, the delivery goes back rather than guess."""
        store = self.broker.store
        if store is None or message.guarantee is not DeliveryGuarantee.EXACTLY_ONCE:
            return False
        try:
            return await store.has_processed(self.group, message.id)
        except Exception as error:
            raise _CommitUnknown(
                f"message {message.id} ran out of attempts, and the inbox cannot be read to "
                f"tell whether another copy of it was handled ({error})"
            ) from error

    async def _resend_outbox(self, message: Message) -> None:
        """A duplicate of an EXACTLY_ONCE message: send what its first handling committed."""
        store = self.broker.store
        if store is None or message.guarantee is not DeliveryGuarantee.EXACTLY_ONCE:
            return
        for event in await store.read(outbox_stream(message.id)):
            await self.broker.publish(decode(event.state))

    async def _attempts(
        self, worker: _Worker, delivery: Delivery, message: Message, span: Any
    ) -> None:
        broker = self.broker
        clock = broker.clock
        telemetry = broker.telemetry
        guarantee = message.guarantee
        processor = self.spec.processor
        attempt = delivery.attempt
        errors: list[AttemptError] = []
        # Whether this message has an open record in the attempts stream, to close when
        # it is settled.
        recorded = False
        # With a store, failed attempts are recorded durably, so a redelivery after a
        # consumer crash continues the count (and the error list) where the dead one was.
        history = broker.store if guarantee is not DeliveryGuarantee.AT_MOST_ONCE else None
        if history is not None and attempt > 1:
            errors.extend(await read_attempts(history, self.group, message.id))
            # Counted from the record, not the transport's delivery counter, which also
            # counts deliveries handed back unstarted (a consumer closing, a rolling restart).
            attempt = len(errors) + 1
            if attempt > broker.retry.max_retries + 1:
                # Every attempt failed or was lost with its consumer (a message that kills
                # its process), and nobody dead-lettered it: do that instead of running it
                # again.
                await broker._dead_letter(
                    DeadLetterReason.RETRIES_EXHAUSTED,
                    f"{len(errors)} attempts failed; last: {errors[-1].error_type}: "
                    f"{errors[-1].error} (dead-lettered on redelivery, without running the "
                    "handler again)",
                    self.subject,
                    self.group,
                    self.system,
                    message=message,
                    errors=errors,
                )
                await delivery.ack()
                await close_attempts(history, self.group, message.id)
                return
            # Only redeliveries are marked (the first delivery costs no write): a message
            # that kills its consumer is then dead-lettered after max_retries + 2 deliveries.
            await record_attempt_started(
                history, self.group, message.id, attempt, clock.now(), broker.consumer_name
            )
            recorded = True
        while True:
            ctx = MessageContext(broker, message, attempt, self.group, self.system)
            worker.seq += 1
            seq = worker.seq
            worker.busy_seq = seq
            started = worker.busy_since = clock.monotonic()
            if not self.watch.is_set():
                self.watch.set()
            try:
                try:
                    await processor(message, ctx)
                except asyncio.CancelledError:
                    if worker.expired_seq == seq and worker.task is not None:
                        worker.expired_seq = None
                        worker.task.uncancel()
                        raise HandlerTimeoutError(
                            f"handler did not finish within {broker.handler_timeout}s and was "
                            "cancelled; make it faster or raise the broker's handler_timeout"
                        ) from None
                    raise
                finally:
                    worker.busy_seq = None
                if worker.expired_seq == seq and worker.task is not None:
                    # The handler swallowed our cancellation and finished anyway.
                    worker.expired_seq = None
                    worker.task.uncancel()
                if guarantee is DeliveryGuarantee.EXACTLY_ONCE:
                    await self._commit_exactly_once(message, ctx)
                else:
                    if ctx._requests:
                        assert broker.store is not None
                        await broker.store.append_many(ctx._requests)
                    if ctx._outbox:
                        await self._send(ctx._outbox)
            except _OutboxNotSent:
                if recorded and history is not None:
                    # The handler succeeded: this attempt is not lost, and not failed.
                    with contextlib.suppress(Exception):
                        await close_attempts(history, self.group, message.id)
                raise
            except _GiveBack:
                raise
            except DuplicateMessageError:
                if guarantee is not DeliveryGuarantee.AT_MOST_ONCE:
                    await self._resend_outbox(message)
                    await delivery.ack()
                    if recorded and history is not None:
                        await close_attempts(history, self.group, message.id)
                broker._receipt(message.id, self.group, ReceiptStatus.DUPLICATE, attempt)
                return
            except PermanentFailure as failure:
                telemetry.failed(self.system)
                telemetry.record_error(span, failure)
                await broker._dead_letter(
                    failure.reason,
                    str(failure),
                    self.subject,
                    self.group,
                    self.system,
                    message=message,
                    errors=[
                        *errors,
                        AttemptError(
                            attempt,
                            "PermanentFailure",
                            str(failure),
                            clock.now(),
                            broker.consumer_name,
                        ),
                    ],
                )
                if guarantee is not DeliveryGuarantee.AT_MOST_ONCE:
                    await delivery.ack()
                    if recorded and history is not None:
                        await close_attempts(history, self.group, message.id)
                return
            except Exception as error:
                telemetry.failed(self.system)
                telemetry.record_error(span, error)
                failed = AttemptError(
                    attempt, type(error).__name__, str(error), clock.now(), broker.consumer_name
                )
                errors.append(failed)
                if history is not None:
                    await record_attempt(history, self.group, message.id, failed)
                    recorded = True
                if guarantee is DeliveryGuarantee.AT_MOST_ONCE:
                    await broker._dead_letter(
                        DeadLetterReason.HANDLER_FAILED,
                        f"AT_MOST_ONCE handler failed ({type(error).__name__}: {error}); "
                        "not retried",
                        self.subject,
                        self.group,
                        self.system,
                        message=message,
                        errors=errors,
                    )
                    return
                if attempt > broker.retry.max_retries:
                    if await self._processed_meanwhile(message):
                        # Another copy of this message (a duplicate delivery, handled
                        # concurrently) committed it: a duplicate, not a dead letter.
                        await self._resend_outbox(message)
                        await delivery.ack()
                        if history is not None:
                            await close_attempts(history, self.group, message.id)
                        broker._receipt(message.id, self.group, ReceiptStatus.DUPLICATE, attempt)
                        return
                    await broker._dead_letter(
                        DeadLetterReason.RETRIES_EXHAUSTED,
                        f"{attempt} attempts failed; last: {type(error).__name__}: {error}",
                        self.subject,
                        self.group,
                        self.system,
                        message=message,
                        errors=errors,
                    )
                    await delivery.ack()
                    if history is not None:
                        # Settled: a replay of the same message id starts a fresh count.
                        await close_attempts(history, self.group, message.id)
                    return
                telemetry.redelivered(self.system)
                await clock.sleep(broker.retry.delay(attempt, broker.rng))
                await _renew_lease(delivery)
                attempt += 1
                continue
            telemetry.processed(self.system, clock.monotonic() - started)
            if guarantee is not DeliveryGuarantee.AT_MOST_ONCE:
                if recorded and history is not None:
                    await delivery.ack()
                    await close_attempts(history, self.group, message.id)
                elif self.ack_behind:
                    self._ack_behind(delivery)
                else:
                    await delivery.ack()
            broker._receipt(message.id, self.group, ReceiptStatus.PROCESSED, attempt)
            return


async def _renew_lease(delivery: Delivery) -> None:
    """Restart the delivery's ack timeout before a retry, where the transport can.

    Redis and NATS deliveries have ``in_progress()`` (reset the idle time, ``+WPI``); with
    it, a consumer retrying in place keeps its delivery however many attempts it makes, so
    its ack timeout only has to outlast one attempt and one backoff. A failed renewal is not
    an error: at worst another consumer takes the message over, and the attempt history in
    the store keeps the count.
    """
    renew = getattr(delivery, "in_progress", None)
    if renew is not None:
        with contextlib.suppress(Exception):
            await renew()


async def open_transport(
    url: str, *, runtime: Runtime, plugins: pluggy.PluginManager | None = None
) -> Transport:
    """Open the transport for ``url`` from whichever plugin provides its scheme."""
    from collaborative_blocks.core.extensions import TransportFactory
    from collaborative_blocks.core.plugins import url_scheme

    pm = plugins if plugins is not None else runtime.plugins
    found: dict[str, TransportFactory] = {}
    owners: dict[str, str] = {}
    for impl in pm.hook.cb_transport_factories.get_hookimpls():
        factories = impl.function()
        if not isinstance(factories, list | tuple):
            raise PluginError(
                f"plugin {impl.plugin_name!r}: cb_transport_factories must return a list"
            )
        for factory in factories:
            if not isinstance(factory, TransportFactory):
                raise PluginError(
                    f"plugin {impl.plugin_name!r}: cb_transport_factories returned {factory!r}, "
                    "which has no `schemes` and `async open(url, *, runtime)`"
                )
            for scheme in factory.schemes:
                scheme = scheme.lower()
                if scheme in found:
                    raise PluginError(
                        f"transport URL scheme {scheme!r} is provided by both "
                        f"{owners[scheme]!r} and {impl.plugin_name!r}; unregister one of them"
                    )
                found[scheme] = factory
                owners[scheme] = impl.plugin_name
    scheme = url_scheme(url)
    factory = found.get(scheme)
    if factory is None and "+" in scheme:
        factory = found.get(scheme.split("+", 1)[0])
    if factory is None:
        raise UnknownSchemeError("message broker", url, list(found), "MESSAGE_BROKER_URL")
    return await factory.open(url, runtime=runtime)


class MessageBroker:
    """Publishes messages and runs subscriptions with delivery guarantees.

    Construct it without awaiting (``broker = MessageBroker()``); the transport is opened on
    first use or by ``await broker.start()``. Pass ``transport=`` to share one transport
    between brokers (e.g. to simulate several processes in one), ``url=`` (default:
    ``MESSAGE_BROKER_URL``, else ``memory://``) to open one from the plugins, ``store=`` for
    EXACTLY_ONCE delivery and a durable dead-letter queue. ``required_guarantees`` (default:
    the guarantees of ``default_guarantees``) are checked against the transport at start-up.
    A message whose ``ttl`` ran out is dead-lettered (``EXPIRED``) instead of handled;
    ``clock_skew`` (default ``MESSAGE_CLOCK_SKEW_SECONDS``, 30) is how far the sender's clock
    may be behind the receiver's before that happens early.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        transport: Transport | None = None,
        store: EventStore | None = None,
        runtime: Runtime | None = None,
        settings: Settings | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        retry: RetryPolicy | None = None,
        handler_timeout: float = 30.0,
        ack_timeout: float | None = None,
        max_in_flight: int = 1000,
        partitions: int = 8,
        default_guarantees: Mapping[MessageType, DeliveryGuarantee] | None = None,
        required_guarantees: Iterable[DeliveryGuarantee] | None = None,
        default_ttl: float | None = None,
        clock_skew: float | None = None,
        tracing: bool | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        receipts_kept: int = 100_000,
    ) -> None:
        self._runtime = runtime
        self.settings = (
            settings
            if settings is not None
            else (runtime.settings if runtime is not None else load_settings())
        )
        self.clock: Clock = clock or (runtime.clock if runtime is not None else SystemClock())
        self.rng: random.Random = rng or (runtime.rng if runtime is not None else new_random())
        self.url = url or self.settings.message_broker_url or "memory://"
        self._transport: Transport | None = transport
        self._owns_transport = transport is None
        self.store = store
        self.retry = retry or RetryPolicy(max_retries=self.settings.max_retry_attempts)
        if handler_timeout <= 0 or max_in_flight < 1 or partitions < 1:
            raise MessagingError(
                "handler_timeout must be > 0, max_in_flight and partitions >= 1; got "
                f"{handler_timeout}, {max_in_flight}, {partitions}"
            )
        self.handler_timeout = handler_timeout
        # A delivery must not be handed to another consumer while this one is still retrying
        # it in place, so the ack timeout outlasts the worst case of all attempts. (Transports
        # whose deliveries can renew their lease, see _renew_lease, need only one attempt and
        # one backoff; the default stays safe for those that cannot.)
        if ack_timeout is not None and ack_timeout <= handler_timeout:
            raise MessagingError(
                f"ack_timeout ({ack_timeout}s) must be longer than handler_timeout "
                f"({handler_timeout}s), or every slow but healthy handler's message is given "
                "to a second consumer while the first still handles it; raise ack_timeout "
                "or lower handler_timeout"
            )
        self.ack_timeout = (
            ack_timeout
            if ack_timeout is not None
            else self.retry.worst_case(handler_timeout) + 30.0
        )
        self.max_in_flight = max_in_flight
        self.partitions = partitions
        self.default_guarantees = {**DEFAULT_GUARANTEES, **(default_guarantees or {})}
        self._required = frozenset(
            required_guarantees
            if required_guarantees is not None
            else self.default_guarantees.values()
        )
        self.default_ttl = (
            default_ttl if default_ttl is not None else float(self.settings.message_ttl_seconds)
        )
        # A ttl compares the sender's clock (created_at) with the receiver's: allow for them
        # being this far apart, or a receiver whose clock is ahead drops live messages.
        self.clock_skew = (
            clock_skew
            if clock_skew is not None
            else float(self.settings.message_clock_skew_seconds)
        )
        if not self.clock_skew >= 0:
            raise MessagingError(f"clock_skew must be >= 0 seconds, got {clock_skew!r}")
        self.consumer_name = f"consumer-{random_id(self.clock.now(), self.rng)}"
        self.dlq = DeadLetterQueue(
            clock=self.clock, rng=self.rng, store=store, republish=self._republish
        )
        self._dlq_depth = 0
        self.telemetry = MessagingTelemetry(
            tracing_enabled=(
                tracing if tracing is not None else self.settings.distributed_tracing_enabled
            ),
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            dead_letter_depth=lambda: self._dlq_depth,
        )
        self._receipts: deque[tuple[str, str, str, int, float]] = deque(maxlen=receipts_kept)
        #: How many deliveries ended in each :class:`ReceiptStatus` (all groups of this
        #: broker): what the chaos simulator reads to know deduplication really happened.
        self.receipt_counts: dict[str, int] = {}
        self._served: set[str] = set()
        self._specs: list[_ConsumerSpec] = []
        self._deferred: list[_ConsumerSpec] = []
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._closed = False
        self.max_message_bytes = 1 << 20
        self._own_runtime: Runtime | None = None
        self._offered: frozenset[DeliveryGuarantee] = frozenset()
        self._all_guarantees = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> MessageBroker:
        """Open the transport, check the guarantees, start every registered consumer."""
        if self._closed:
            raise BrokerClosedError("this broker was closed; create a new MessageBroker")
        if not self._started:
            if self._start_lock is None:
                self._start_lock = asyncio.Lock()
            async with self._start_lock:
                if not self._started:
                    await self._open()
                    self._started = True
        if self._deferred:
            deferred, self._deferred = self._deferred, []
            for spec in deferred:
                await self._start_consumer(spec)
        return self

    @property
    def transport(self) -> Transport:
        """The transport (opened by :meth:`start`)."""
        if self._transport is None:
            raise MessagingError("the broker has not started; await broker.start() first")
        return self._transport

    async def _open(self) -> None:
        if self._transport is None:
            runtime = self._runtime
            if runtime is None:
                from collaborative_blocks.core.runtime import Runtime

                runtime = Runtime(self.settings, clock=self.clock, rng=self.rng, store=self.store)
                # Ours to close: log:// may have opened the EVENT_STORE_URL store through it.
                self._own_runtime = runtime
            self._transport = await open_transport(self.url, runtime=runtime)
        if self.store is None and self._runtime is not None and self._needs_store():
            self.store = await self._runtime.store()
            self.dlq = DeadLetterQueue(
                clock=self.clock, rng=self.rng, store=self.store, republish=self._republish
            )
        capabilities = self.transport.capabilities
        self.max_message_bytes = capabilities.max_message_bytes
        self._offered = capabilities.guarantees
        # Checked on every publish: skip the set lookup when everything is offered.
        self._all_guarantees = capabilities.guarantees >= frozenset(DeliveryGuarantee)
        for guarantee in sorted(self._required, key=lambda g: g.value):
            capabilities.require(guarantee, self.transport.url)
        if DeliveryGuarantee.EXACTLY_ONCE in self._required and self.store is None:
            raise UnsupportedGuaranteeError(
                "EXACTLY_ONCE needs an event store for the consumers' inbox; create the broker "
                "with store=await open_store(URL) (or a runtime), or do not require it"
            )

    def _needs_store(self) -> bool:
        return DeliveryGuarantee.EXACTLY_ONCE in self._required

    async def close(self) -> None:
        """Stop consumers (unsettled deliveries go back to the transport), close the transport."""
        if self._closed:
            return
        self._closed = True
        for spec in list(self._specs):
            await self._stop_consumer(spec)
        if self._transport is not None and self._owns_transport:
            await self._transport.close()
        if self._own_runtime is not None:
            await self._own_runtime.close()

    async def __aenter__(self) -> MessageBroker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- publishing ------------------------------------------------------------------------

    def stamp(self, message: Message) -> Message:
        """Fill in what the sender left empty: id, created-at, ttl."""
        if message.id and message.created_at and message.ttl is not None:
            return message
        now = self.clock.now()
        # Built directly rather than with _replace: this runs on every publish.
        return Message(
            message.type,
            message.name,
            message.payload,
            message.source,
            message.target,
            message.id or new_message_id(now, self.rng),
            message.key,
            message.headers,
            message.correlation_id,
            message.causation_id,
            message.created_at or now,
            self.default_ttl if message.ttl is None else message.ttl,
            message.guarantee,
        )

    def subject_for(self, message: Message) -> str:
        kind = message.type
        if kind is MessageType.EVENT:
            return EVENTS_SUBJECT
        if not message.target:
            raise MessageRejectedError(
                RejectionReason.MALFORMED,
                f"a {kind.name} needs a target (the system that should handle {message.name!r})",
                message_id=message.id or None,
            )
        if kind is MessageType.RESPONSE:
            return reply_subject(message.target)
        return inbox_subject(message.target)

    async def publish(self, message: Message) -> Message:
        """Send ``message``; returns it as sent (with its id and trace context).

        Raises :class:`UnsupportedGuaranteeError` when the transport cannot give the
        message's guarantee, :class:`NoRouteError` (after dead-lettering it) for a command or
        query to a target nobody serves on an in-process transport, and
        :class:`MessageRejectedError` for a message without a name or target.
        """
        if not self._started or self._deferred:
            await self.start()
        elif self._closed:
            raise BrokerClosedError("this broker was closed; create a new MessageBroker")
        if not isinstance(message, Message):
            raise MessageRejectedError(
                RejectionReason.MALFORMED,
                f"publish takes a Message, got {type(message).__name__}",
            )
        if not message.name:
            raise MessageRejectedError(RejectionReason.MALFORMED, "a message needs a name")
        message = self.stamp(message)
        subject = self.subject_for(message)
        transport = self.transport
        if not self._all_guarantees and message.guarantee not in self._offered:
            transport.capabilities.require(message.guarantee, transport.url)
        if (
            message.type is MessageType.COMMAND or message.type is MessageType.QUERY
        ) and not transport.capabilities.durable:
            target = message.target or ""
            if target not in self._served:
                await self._dead_letter(
                    DeadLetterReason.NO_ROUTE,
                    f"no system serves target {target!r} on this in-process broker",
                    subject,
                    "",
                    message.source or "-",
                    message=message,
                )
                raise NoRouteError(
                    f"no system serves target {target!r} (message {message.name!r} was "
                    "dead-lettered). Create SystemConnector("
                    f"{target!r}, broker) and register a handler with on_command/on_query "
                    "before sending to it"
                )
        telemetry = self.telemetry
        if telemetry.tracing():
            with telemetry.send(message, subject) as traced:
                await transport.publish(subject, traced)
            message = traced
        else:
            await transport.publish(subject, message)
        telemetry.sent(message.source or "-")
        return message

    async def _republish(self, subject: str, message: Message | bytes) -> None:
        if not self._started:
            await self.start()
        await self.transport.publish(subject, message)

    # -- subscribing -----------------------------------------------------------------------

    async def subscribe(
        self,
        pattern: str,
        handler: Handler,
        *,
        target: str | None = None,
        group: str | None = None,
        system: str | None = None,
        partitions: int | None = None,
    ) -> BrokerSubscription:
        """Handle every event whose name matches the glob ``pattern`` (e.g. ``orders.*``).

        With ``target``, handle the commands and queries sent to that system instead (the
        handler's return value is a query's response). ``group`` names the consumer group
        (default: derived from the pattern and the handler, so a restarted process resumes
        it); handlers in one group share the messages, separate groups each get them all.
        """
        processor = adapt_handler(handler)
        name = getattr(handler, "__qualname__", type(handler).__name__)
        module = getattr(handler, "__module__", "")
        owner = system or target or "broker"
        if target is not None:
            subject = inbox_subject(target)
            default_group = target
        else:
            subject = EVENTS_SUBJECT
            default_group = f"{owner}:{pattern}:{module}.{name}"
        spec = _ConsumerSpec(
            subject=subject,
            group=group or default_group,
            system=owner,
            processor=processor,
            matches=name_matcher(pattern),
            partitions=partitions or self.partitions,
            served_target=target,
        )
        self.register(spec)
        await self.start()
        return BrokerSubscription(self, spec)

    def register(self, spec: _ConsumerSpec) -> None:
        """Register a consumer now; it starts with the broker (or at once, if running)."""
        if self._closed:
            raise BrokerClosedError("this broker was closed; create a new MessageBroker")
        if spec.served_target is not None:
            self._served.add(spec.served_target)
        self._specs.append(spec)
        self._deferred.append(spec)

    async def _start_consumer(self, spec: _ConsumerSpec) -> None:
        consumer = _Consumer(self, spec)
        await consumer.start()
        spec.consumer = consumer

    async def _stop_consumer(self, spec: _ConsumerSpec) -> None:
        if spec in self._deferred:
            self._deferred.remove(spec)
        if spec in self._specs:
            self._specs.remove(spec)
        if spec.served_target is not None and not any(
            s.served_target == spec.served_target for s in self._specs
        ):
            self._served.discard(spec.served_target)
        consumer, spec.consumer = spec.consumer, None
        if consumer is not None:
            await consumer.stop()

    # -- dead letters and receipts -----------------------------------------------------------

    def dead_letters(self) -> DeadLetterQueue:
        """The dead-letter queue: ``list()``, ``get(id)``, ``replay(id)``, ``purge()``."""
        return self.dlq

    async def _dead_letter(
        self,
        reason: DeadLetterReason,
        detail: str,
        subject: str,
        group: str,
        system: str,
        *,
        message: Message | None = None,
        raw: bytes | None = None,
        errors: Sequence[AttemptError] = (),
    ) -> None:
        await self.dlq.add(
            reason=reason,
            detail=detail,
            subject=subject,
            group=group,
            message=message,
            raw=raw,
            errors=errors,
        )
        self._dlq_depth += 1
        self.telemetry.dead_lettered(system)
        log.warning("dead-lettered %s for %s: %s (%s)", subject, group, reason.value, detail)
        if message is not None and group:
            self._receipt(
                message.id,
                group,
                ReceiptStatus.DEAD_LETTERED,
                max((e.attempt for e in errors), default=0),
            )

    def _receipt(self, message_id: str, group: str, status: str, attempts: int) -> None:
        # A bounded deque: O(1) on the hot path; looking a message up scans it (rare).
        self._receipts.append((message_id, group, status, attempts, self.clock.now()))
        counts = self.receipt_counts
        counts[status] = counts.get(status, 0) + 1

    async def receipts(self, message_id: str) -> list[DeliveryReceipt]:
        """What happened to a message in each consumer group of this broker, in order.

        Kept in memory for the last ``receipts_kept`` deliveries; for EXACTLY_ONCE the
        durable record is the store's inbox: :meth:`was_processed`.
        """
        return [DeliveryReceipt(*entry) for entry in self._receipts if entry[0] == message_id]

    async def was_processed(self, message_id: str, group: str) -> bool:
        """Whether ``group``'s durable inbox holds ``message_id`` (EXACTLY_ONCE receipts)."""
        if self.store is None:
            raise MessagingError("this broker has no event store, so it keeps no inbox")
        return await self.store.has_processed(group, message_id)

    # -- helpers for connectors -------------------------------------------------------------

    def new_id(self) -> str:
        return random_id(self.clock.now(), self.rng)

    def guarantee_for(self, kind: MessageType) -> DeliveryGuarantee:
        return self.default_guarantees[kind]
