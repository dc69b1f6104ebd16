"""Planted bug: a deduplication that forgets (catch it with the ``transfers`` scenario).

The EXACTLY_ONCE inbox (which message ids a consumer group has handled) is kept in the
node's memory instead of in the store, in the same transaction as the handler's effects. It
works until a node crashes: the restarted node has forgotten what it handled, so a message
that was handled but not yet acknowledged is handled again when the network redelivers it.
The transfers scenario sees a transfer debited twice (``no_double_apply``) and money that
appears or vanishes (``conservation``).

``cblocks chaos run --scenario transfers -p collaborative_blocks.testing.mutants.forgetful_inbox``
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from collaborative_blocks import hookimpl
from collaborative_blocks.errors import DuplicateMessageError
from collaborative_blocks.simulations.loop import CURRENT_NODE
from collaborative_blocks.simulations.mutations import DelegatingStore
from collaborative_blocks.stores.base import AppendRequest, EventStore, Tracking

__all__ = ["ForgetfulInboxStore", "cb_chaos_component"]


class ForgetfulInboxStore(DelegatingStore):
    """The inbox lives in memory, per node; a crash of the node empties it."""

    def __init__(self, inner: EventStore) -> None:
        super().__init__(inner)
        self._inbox: dict[tuple[str | None, str], set[str]] = {}  # (node, consumer) -> message ids

    def _handled(self, consumer: str) -> set[str]:
        return self._inbox.setdefault((CURRENT_NODE.get(), consumer), set())

    async def append_many(
        self, requests: Sequence[AppendRequest], *, tracking: Tracking | None = None
    ) -> list[list[int]]:
        if tracking is None or tracking.message_id is None:
            return await self.inner.append_many(requests, tracking=tracking)
        handled = self._handled(tracking.consumer)
        if tracking.message_id in handled:
            raise DuplicateMessageError(tracking.consumer, tracking.message_id)
        # The bug: the message id is not written with the effects.
        kept = None
        if tracking.position is not None:
            kept = Tracking(tracking.consumer, position=tracking.position)
        result = await self.inner.append_many(requests, tracking=kept)
        handled.add(tracking.message_id)
        return result

    async def has_processed(self, consumer: str, message_id: str) -> bool:
        return message_id in self._handled(consumer)

    def node_crashed(self, node: str) -> None:
        for key in [key for key in self._inbox if key[0] == node]:
            del self._inbox[key]


@hookimpl
def cb_chaos_component(kind: str, component: Any) -> Any:
    return ForgetfulInboxStore(component) if kind == "store" else None
