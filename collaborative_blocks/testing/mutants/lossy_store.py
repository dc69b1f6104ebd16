"""Planted bug: a store that loses the last write on crash (catch it with ``transfers``).

The store acknowledges a write before it is durable: it keeps each node's latest write in a
write-back buffer and makes it durable only when that node next uses the store (or when
the simulator reads). A crash of the node in between loses the write although its caller was
told it succeeded, and had acknowledged the message it handled and sent what it committed.
In the transfers scenario a lost debit leaves a credit without a debit: ``conservation``
fails (and ``transfer_completes`` or ``no_double_apply``, depending on what was lost).

The write is checked when it is made (expected versions, the inbox), as a real store would,
so nothing but the crash loses it.

``cblocks chaos run --scenario transfers -p collaborative_blocks.testing.mutants.lossy_store``
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from collaborative_blocks import hookimpl
from collaborative_blocks.errors import ConcurrencyError, DuplicateMessageError
from collaborative_blocks.simulations.loop import CURRENT_NODE
from collaborative_blocks.simulations.mutations import DelegatingStore
from collaborative_blocks.simulations.world import SIMULATOR
from collaborative_blocks.stores.base import (
    AppendRequest,
    EventStore,
    Snapshot,
    StoredEvent,
    StoreStats,
    StreamInfo,
    Tracking,
)

__all__ = ["LossyStore", "cb_chaos_component"]

_Pending = tuple[Sequence[AppendRequest], Tracking | None]


class LossyStore(DelegatingStore):
    """Each node's last write waits in memory until the node touches the store again."""

    def __init__(self, inner: EventStore) -> None:
        super().__init__(inner)
        self._pending: dict[str, _Pending] = {}

    async def _flush(self) -> None:
        node = CURRENT_NODE.get()
        # The simulator itself (setup, checks, final reads) sees everything written so far.
        nodes = list(self._pending) if node is None or node == SIMULATOR else [node]
        for name in nodes:
            pending = self._pending.pop(name, None)
            if pending is not None:
                requests, tracking = pending
                try:
                    await self.inner.append_many(requests, tracking=tracking)
                except (ConcurrencyError, DuplicateMessageError):
                    pass  # another node got there first: this write is lost too

    async def append_many(
        self, requests: Sequence[AppendRequest], *, tracking: Tracking | None = None
    ) -> list[list[int]]:
        await self._flush()
        node = CURRENT_NODE.get()
        if node is None or node == SIMULATOR:
            return await self.inner.append_many(requests, tracking=tracking)
        # Checked now, as a real store checks a write it acknowledges.
        for request in requests:
            if request.expected_version is not None:
                current = await self.inner.stream_version(request.stream)
                if current != request.expected_version:
                    raise ConcurrencyError(request.stream, request.expected_version, current)
        if (
            tracking is not None
            and tracking.message_id is not None
            and await self.inner.has_processed(tracking.consumer, tracking.message_id)
        ):
            raise DuplicateMessageError(tracking.consumer, tracking.message_id)
        self._pending[node] = (list(requests), tracking)
        first = await self.inner.max_position() + 1
        positions = []
        for request in requests:
            positions.append(list(range(first, first + len(request.events))))
            first += len(request.events)
        return positions

    def node_crashed(self, node: str) -> None:
        self._pending.pop(node, None)  # the bug: acknowledged, never written

    async def read(self, stream: str, **options: Any) -> list[StoredEvent]:
        await self._flush()
        return await self.inner.read(stream, **options)

    async def read_all(self, **options: Any) -> list[StoredEvent]:
        await self._flush()
        return await self.inner.read_all(**options)

    async def max_position(self) -> int:
        await self._flush()
        return await self.inner.max_position()

    async def stream_version(self, stream: str) -> int:
        await self._flush()
        return await self.inner.stream_version(stream)

    async def streams(self, *, prefix: str = "", limit: int = 100) -> list[StreamInfo]:
        await self._flush()
        return await self.inner.streams(prefix=prefix, limit=limit)

    async def stats(self) -> StoreStats:
        await self._flush()
        return await self.inner.stats()

    async def consumer_position(self, consumer: str) -> int | None:
        await self._flush()
        return await self.inner.consumer_position(consumer)

    async def has_processed(self, consumer: str, message_id: str) -> bool:
        await self._flush()
        return await self.inner.has_processed(consumer, message_id)

    async def latest_snapshot(self, stream: str) -> Snapshot | None:
        await self._flush()
        return await self.inner.latest_snapshot(stream)


@hookimpl
def cb_chaos_component(kind: str, component: Any) -> Any:
    return LossyStore(component) if kind == "store" else None
