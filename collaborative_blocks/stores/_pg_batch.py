"""Planning one group-commit batch of the PostgreSQL store (pure Python, no I/O).

The writer task reads the current stream versions, consumer positions and inbox entries under
the batch's advisory lock, then asks :func:`plan_batch` which callers' appends go in. Each
caller is judged as if it ran alone after the callers accepted before it, so a conflicting
caller gets its own error and does not fail the others; nothing is inserted for a rejected
caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from collaborative_blocks.errors import (
    ConcurrencyError,
    DuplicateMessageError,
    StoreError,
    TrackingConflictError,
)
from collaborative_blocks.stores.base import AppendRequest, Tracking

__all__ = ["BatchPlan", "CommittedState", "PendingAppend", "plan_batch"]


@dataclass(slots=True)
class PendingAppend:
    """One caller's ``append_many``, waiting for the writer task."""

    requests: Sequence[AppendRequest]
    tracking: Tracking | None
    future: asyncio.Future[list[list[int]]]

    @property
    def event_count(self) -> int:
        return sum(len(request.events) for request in self.requests)


@dataclass(slots=True)
class CommittedState:
    """What the batch's transaction read under the lock (only the keys the batch touches)."""

    #: stream -> version of its last event, only for streams that have events.
    versions: dict[str, int] = field(default_factory=dict)
    #: consumer -> recorded position.
    consumer_positions: dict[str, int] = field(default_factory=dict)
    #: (consumer, message_id) pairs already in the inbox.
    processed: set[tuple[str, str]] = field(default_factory=set)


@dataclass(slots=True)
class BatchPlan:
    """The rows one transaction inserts, and who gets what back."""

    #: Accepted callers with the number of rows of each of their requests, in row order.
    accepted: list[tuple[PendingAppend, list[int]]] = field(default_factory=list)
    rejected: list[tuple[PendingAppend, StoreError]] = field(default_factory=list)
    streams: list[str] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)
    states: list[bytes] = field(default_factory=list)
    #: consumer -> the position to record (the last accepted one, which is the highest).
    consumer_positions: dict[str, int] = field(default_factory=dict)
    inbox: list[tuple[str, str, int | None]] = field(default_factory=list)

    @property
    def row_count(self) -> int:
        return len(self.streams)

    def results(self, positions: Sequence[int]) -> list[tuple[PendingAppend, list[list[int]]]]:
        """Split the inserted rows' positions (in row order) back into per-caller results."""
        out: list[tuple[PendingAppend, list[list[int]]]] = []
        index = 0
        for pending, counts in self.accepted:
            per_request: list[list[int]] = []
            for count in counts:
                per_request.append(list(positions[index : index + count]))
                index += count
            out.append((pending, per_request))
        return out


def plan_batch(batch: Sequence[PendingAppend], state: CommittedState) -> BatchPlan:
    """Decide, caller by caller and in arrival order, what the batch's transaction writes.

    Same rules as the reference memory store: ``expected_version`` must equal the stream's
    version; ``first_version`` must be above it when the stream has events; a consumer's
    position must grow; a message id is processed once per consumer.
    """
    plan = BatchPlan()
    batch_versions: dict[str, int] = {}
    batch_processed: set[tuple[str, str]] = set()
    for pending in batch:
        local_versions: dict[str, int] = {}
        rows: list[tuple[str, int, str, bytes]] = []
        counts: list[int] = []
        try:
            for request in pending.requests:
                current, exists = _current_version(
                    request.stream, local_versions, batch_versions, state.versions
                )
                if request.expected_version is not None and request.expected_version != current:
                    raise ConcurrencyError(request.stream, request.expected_version, current)
                if request.first_version is not None:
                    if exists and request.first_version <= current:
                        raise ConcurrencyError(
                            request.stream,
                            request.first_version - 1,
                            current,
                            first_version=request.first_version,
                        )
                    current = request.first_version - 1
                for offset, event in enumerate(request.events, start=1):
                    rows.append((request.stream, current + offset, event.topic, bytes(event.state)))
                if request.events:
                    local_versions[request.stream] = current + len(request.events)
                counts.append(len(request.events))
            tracking = pending.tracking
            if tracking is not None:
                _check_tracking(tracking, plan, state, batch_processed)
        except StoreError as error:
            plan.rejected.append((pending, error))
            continue
        batch_versions.update(local_versions)
        for stream, version, topic, data in rows:
            plan.streams.append(stream)
            plan.versions.append(version)
            plan.topics.append(topic)
            plan.states.append(data)
        if tracking is not None:
            if tracking.position is not None:
                plan.consumer_positions[tracking.consumer] = tracking.position
            if tracking.message_id is not None:
                batch_processed.add((tracking.consumer, tracking.message_id))
                plan.inbox.append((tracking.consumer, tracking.message_id, tracking.position))
        plan.accepted.append((pending, counts))
    return plan


def _current_version(
    stream: str,
    local: dict[str, int],
    batch: dict[str, int],
    committed: dict[str, int],
) -> tuple[int, bool]:
    for source in (local, batch, committed):
        version = source.get(stream)
        if version is not None:
            return version, True
    return 0, False


def _check_tracking(
    tracking: Tracking,
    plan: BatchPlan,
    state: CommittedState,
    batch_processed: set[tuple[str, str]],
) -> None:
    if tracking.position is not None:
        recorded = plan.consumer_positions.get(tracking.consumer)
        if recorded is None:
            recorded = state.consumer_positions.get(tracking.consumer)
        if recorded is not None and tracking.position <= recorded:
            raise TrackingConflictError(tracking.consumer, tracking.position, recorded)
    if tracking.message_id is not None:
        key = (tracking.consumer, tracking.message_id)
        if key in batch_processed or key in state.processed:
            raise DuplicateMessageError(tracking.consumer, tracking.message_id)
