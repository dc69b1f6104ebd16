"""Planted bug: a transport that acknowledges before the handler ran (catch it with
``pipeline``).

The network acknowledges every delivery as soon as a consumer fetches it, so a delivery
whose handler never finishes (it fails, its node crashes, or the faulty network drops it
on the way) is never redelivered: the message is lost. The pipeline scenario's
``no_lost_message`` and ``accounting`` invariants fail.

``cblocks chaos run --scenario pipeline -p
collaborative_blocks.testing.mutants.early_ack_transport``
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from collaborative_blocks import hookimpl
from collaborative_blocks.core.messaging.transport import Delivery, Subscription
from collaborative_blocks.simulations.mutations import DelegatingTransport

__all__ = ["EarlyAckTransport", "cb_chaos_component"]


class _Settled:
    """A delivery already acknowledged: settling it again does nothing."""

    __slots__ = ("_inner",)

    def __init__(self, inner: Delivery) -> None:
        self._inner = inner

    @property
    def body(self) -> Any:
        return self._inner.body

    @property
    def subject(self) -> str:
        return self._inner.subject

    @property
    def attempt(self) -> int:
        return self._inner.attempt

    async def ack(self) -> None:
        return None

    async def nack(self, delay: float = 0.0) -> None:
        return None  # the bug: too late, it is gone


class _EarlyAckSubscription:
    __slots__ = ("_inner",)

    def __init__(self, inner: Subscription) -> None:
        self._inner = inner

    async def fetch(self, max_messages: int) -> Sequence[Delivery]:
        deliveries = await self._inner.fetch(max_messages)
        for delivery in deliveries:
            await delivery.ack()  # the bug: before the handler ran
        return [_Settled(delivery) for delivery in deliveries]

    async def close(self) -> None:
        await self._inner.close()


class EarlyAckTransport(DelegatingTransport):
    """The simulated network, acknowledging deliveries when they are fetched."""

    async def subscribe(self, subject: str, **options: Any) -> Subscription:
        return _EarlyAckSubscription(await self.inner.subscribe(subject, **options))


@hookimpl
def cb_chaos_component(kind: str, component: Any) -> Any:
    return EarlyAckTransport(component) if kind == "network" else None
