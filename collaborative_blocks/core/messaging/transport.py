"""What a message transport implements: publish to a subject, consume it in a group.

The broker routes, retries, deduplicates and traces; a transport only moves messages and
remembers who has acknowledged what. Its contract, checked for every transport by
:class:`collaborative_blocks.testing.transport_conformance.TransportConformance`:

- ``publish(subject, message)`` appends to the subject, in order. ``message`` is a
  :class:`~collaborative_blocks.core.messaging.envelope.Message` (a networked transport
  serialises it with :func:`~collaborative_blocks.core.messaging.envelope.encode`; the
  in-process one hands the object over) or raw ``bytes`` (delivered as bytes, unchecked:
  the broker validates and dead-letters what it cannot read).
- ``subscribe(subject, group=..., consumer=...)`` joins a **consumer group**. Every group sees
  every message of the subject published after the group was created (transports that retain
  messages also deliver what they retain, oldest first); within a group each message goes to
  one consumer at a time. A new group starts at the oldest message the transport retains.
- A :class:`Delivery` is settled with ``ack()`` (done, never delivered to the group again) or
  ``nack(delay)`` (deliver again after ``delay`` seconds, to any consumer of the group). A
  delivery neither acked nor nacked within ``ack_timeout`` seconds (its consumer died or
  hung) is delivered again to another consumer of the group. ``attempt`` counts deliveries
  of the same message to the group: 1 the first time.
- A delivery may also have ``async in_progress()``: restart its ack timeout (Redis and NATS
  deliveries have it). It is optional; the broker calls it, where present, before each
  in-place retry, so a consumer that is still retrying keeps its delivery.
- ``prefetch`` bounds how many unsettled deliveries one consumer holds; that bound is what
  lets competing consumers share the work and what turns a slow consumer into
  backpressure.
- Time comes from the injected clock (ack timeouts, nack delays), so the in-process
  transports run on a :class:`~collaborative_blocks.core.clock.VirtualClock` in simulations.

Transports are plugins: a ``cb_transport_factories`` hook returns
:class:`~collaborative_blocks.core.extensions.TransportFactory` objects, chosen by the scheme
of ``MESSAGE_BROKER_URL``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from collaborative_blocks.core.messaging.envelope import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DeliveryGuarantee,
    Message,
)
from collaborative_blocks.errors import UnsupportedGuaranteeError

__all__ = [
    "Delivery",
    "Subscription",
    "Transport",
    "TransportCapabilities",
]


@dataclass(frozen=True, slots=True)
class TransportCapabilities:
    """What a transport can promise; the broker checks it at start-up.

    ``guarantees``: the delivery guarantees it can carry (EXACTLY_ONCE additionally needs an
    event store for the inbox, which the broker checks itself). ``durable``: messages survive
    a restart of the transport's process or server. ``survives_consumer_crash``: an
    unacknowledged delivery of a consumer that died is redelivered to another consumer, in
    another process. ``max_message_bytes``: the largest encoded message it carries.
    """

    guarantees: frozenset[DeliveryGuarantee] = field(
        default_factory=lambda: frozenset(DeliveryGuarantee)
    )
    durable: bool = False
    survives_consumer_crash: bool = False
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def require(self, guarantee: DeliveryGuarantee, transport: str) -> None:
        """Raise :class:`UnsupportedGuaranteeError` when ``guarantee`` is not offered."""
        if guarantee not in self.guarantees:
            offered = ", ".join(sorted(g.name for g in self.guarantees)) or "none"
            raise UnsupportedGuaranteeError(
                f"transport {transport} cannot give {guarantee.name} (it offers: {offered}). "
                "Choose a transport that does in MESSAGE_BROKER_URL (e.g. log+sqlite+aiosqlite:"
                "///events.db, redis://..., nats://...) or ask for a weaker guarantee"
            )


@runtime_checkable
class Delivery(Protocol):
    """One delivery of one message to one consumer of a group."""

    @property
    def body(self) -> Message | bytes:
        """The message (raw ``bytes`` when the transport does not decode; the broker does)."""
        ...

    @property
    def subject(self) -> str: ...

    @property
    def attempt(self) -> int:
        """1 for the first delivery to this group, 2 for the first redelivery, ..."""
        ...

    async def ack(self) -> None:
        """Settle: the message is done for this group. Acking twice is harmless."""
        ...

    async def nack(self, delay: float = 0.0) -> None:
        """Give the message back, to be delivered again after ``delay`` seconds."""
        ...


@runtime_checkable
class Subscription(Protocol):
    """One consumer's membership in a consumer group."""

    async def fetch(self, max_messages: int) -> Sequence[Delivery]:
        """Up to ``max_messages`` deliveries, waiting until at least one is available.

        Returns an empty sequence only once the subscription (or the transport) is closed.
        Redeliveries (nacked, or past their ack timeout) come before new messages.
        """
        ...

    async def close(self) -> None:
        """Leave the group. Unsettled deliveries become available to the other consumers
        (at once, or after their ack timeout, depending on the transport)."""
        ...


@runtime_checkable
class Transport(Protocol):
    """A message transport (see the module docstring for the contract)."""

    @property
    def capabilities(self) -> TransportCapabilities: ...

    @property
    def url(self) -> str:
        """The URL it was opened with (password hidden)."""
        ...

    async def publish(self, subject: str, message: Message | bytes) -> None:
        """Append one message to ``subject``; may wait (backpressure) when consumers lag.

        Raises :class:`~collaborative_blocks.errors.TransportUnavailableError` when the server
        cannot be reached.
        """
        ...

    async def subscribe(
        self,
        subject: str,
        *,
        group: str,
        consumer: str,
        ack_timeout: float = 30.0,
        prefetch: int = 100,
    ) -> Subscription:
        """Join ``group`` on ``subject`` as ``consumer`` (creating the group if needed)."""
        ...

    async def close(self) -> None:
        """Stop: pending ``fetch`` calls return empty, connections are released."""
        ...
