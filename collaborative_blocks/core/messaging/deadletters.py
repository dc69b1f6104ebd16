"""The dead-letter queue: messages the broker could not get handled, with the reason why.

A dead letter keeps the message (or, when it could not be decoded, the raw bytes), the
subject and consumer group it was headed for, a :class:`DeadLetterReason`, a human-readable
detail and the error of every attempt. Operators list, inspect, replay (re-publish to the
same subject) and purge them, from :meth:`MessageBroker.dead_letters
<collaborative_blocks.core.messaging.broker.MessageBroker.dead_letters>` or with
``cblocks dlq``.

With an event store the queue is durable: each dead letter, replay and purge is an event in
the stream :data:`DEAD_LETTER_STREAM`, so the queue survives restarts and any process that
opens the same store sees it. Without a store it lives in memory.

With a store, every failed attempt is also recorded as it happens, in the stream
:func:`attempts_stream` of its consumer group and message, so that a consumer that crashes
mid-retry does not take its attempts' errors with it: the consumer that gets the redelivery
continues the count and the dead letter lists every attempt, whichever process made it.
"""

from __future__ import annotations

import asyncio
import enum
import json
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from collaborative_blocks.core.clock import Clock
from collaborative_blocks.core.messaging.envelope import Message, from_dict
from collaborative_blocks.core.randomness import random_id
from collaborative_blocks.errors import (
    CorruptRecordError,
    DeadLetterNotFoundError,
    MessagingError,
    RejectionReason,
)
from collaborative_blocks.stores.base import EventStore, NewEvent

__all__ = [
    "ATTEMPTS_CLOSED_TOPIC",
    "ATTEMPT_FAILED_TOPIC",
    "ATTEMPT_STARTED_TOPIC",
    "CONSUMER_LOST",
    "DEAD_LETTER_STREAM",
    "AttemptError",
    "DeadLetter",
    "DeadLetterQueue",
    "DeadLetterReason",
    "attempts_stream",
    "close_attempts",
    "read_attempts",
    "record_attempt",
    "record_attempt_started",
]

#: The stream that holds the durable dead-letter queue.
DEAD_LETTER_STREAM = "cb-dead-letters"
_DEAD_LETTERED = "collaborative_blocks.messaging:DeadLettered"
_REPLAYED = "collaborative_blocks.messaging:DeadLetterReplayed"
_PURGED = "collaborative_blocks.messaging:DeadLetterPurged"
#: Topic of the events that record one failed attempt (see :func:`attempts_stream`).
ATTEMPT_FAILED_TOPIC = "collaborative_blocks.messaging:AttemptFailed"
#: A redelivered message's first attempt is about to run (see :func:`read_attempts`).
ATTEMPT_STARTED_TOPIC = "collaborative_blocks.messaging:AttemptStarted"
#: ``AttemptError.error_type`` of an attempt whose consumer stopped before it ended.
CONSUMER_LOST = "ConsumerLost"
#: Marks the message settled (handled or dead-lettered): a later delivery (a replay, a
#: re-publish) starts a fresh count.
ATTEMPTS_CLOSED_TOPIC = "collaborative_blocks.messaging:AttemptsClosed"


def attempts_stream(group: str, message_id: str) -> str:
    """Where the failed attempts of ``message_id`` in consumer group ``group`` are recorded."""
    return f"cb-attempts:{group}:{message_id}"


class DeadLetterReason(enum.Enum):
    """Why a message ended in the dead-letter queue."""

    MALFORMED = "malformed"
    OVERSIZED = "oversized"
    EXPIRED = "expired"
    UNKNOWN_VERSION = "unknown_version"
    UNKNOWN_TYPE = "unknown_type"
    #: Every attempt (1 + MAX_RETRY_ATTEMPTS) failed or timed out.
    RETRIES_EXHAUSTED = "retries_exhausted"
    #: An AT_MOST_ONCE handler failed; it is not retried, but not forgotten either.
    HANDLER_FAILED = "handler_failed"
    #: The target system has no handler for this command's action.
    NO_HANDLER = "no_handler"
    #: Nobody serves the target (in-process transports can tell at publish time).
    NO_ROUTE = "no_route"
    #: An EXACTLY_ONCE message reached a consumer whose broker has no event store.
    UNSUPPORTED_GUARANTEE = "unsupported_guarantee"
    #: A response whose correlation id no pending query is waiting for (late or bogus).
    UNKNOWN_CORRELATION_ID = "unknown_correlation_id"

    @classmethod
    def from_rejection(cls, reason: RejectionReason) -> DeadLetterReason:
        return cls(reason.value)


@dataclass(frozen=True, slots=True)
class AttemptError:
    """What went wrong in one attempt to handle a message (``consumer``: who made it)."""

    attempt: int
    error_type: str
    error: str
    at: float
    consumer: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "type": self.error_type,
            "error": self.error,
            "at": self.at,
            "consumer": self.consumer,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttemptError:
        return cls(
            int(data["attempt"]),
            str(data["type"]),
            str(data["error"]),
            float(data["at"]),
            str(data.get("consumer", "")),
        )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter. ``message`` is None when the bytes could not be decoded (``raw``)."""

    id: str
    reason: DeadLetterReason
    detail: str
    subject: str
    group: str
    dead_lettered_at: float
    message: Message | None = None
    raw: bytes | None = None
    errors: tuple[AttemptError, ...] = field(default_factory=tuple)

    @property
    def message_id(self) -> str | None:
        return self.message.id if self.message is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "reason": self.reason.value,
            "detail": self.detail,
            "subject": self.subject,
            "group": self.group,
            "dead_lettered_at": self.dead_lettered_at,
            "message": self.message.to_dict() if self.message is not None else None,
            "raw": self.raw.decode("latin-1") if self.raw is not None else None,
            "errors": [e.to_dict() for e in self.errors],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeadLetter:
        try:
            raw_message = data.get("message")
            raw = data.get("raw")
            return cls(
                id=data["id"],
                reason=DeadLetterReason(data["reason"]),
                detail=data["detail"],
                subject=data["subject"],
                group=data["group"],
                dead_lettered_at=float(data["dead_lettered_at"]),
                message=from_dict(raw_message) if raw_message is not None else None,
                raw=raw.encode("latin-1") if isinstance(raw, str) else None,
                errors=tuple(AttemptError.from_dict(e) for e in data.get("errors", ())),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CorruptRecordError(f"a stored dead letter is not readable: {error}") from None


Republish = Callable[[str, Message | bytes], Awaitable[None]]


class DeadLetterQueue:
    """List, inspect, replay and purge dead letters (durable when given a store)."""

    def __init__(
        self,
        *,
        clock: Clock,
        rng: random.Random,
        store: EventStore | None = None,
        republish: Republish | None = None,
    ) -> None:
        self._clock = clock
        self._rng = rng
        self._store = store
        self._republish = republish
        self._letters: dict[str, DeadLetter] = {}
        self._loaded_version = 0
        self._signal: asyncio.Event | None = None
        #: Dead letters added through this queue object since it was created.
        self.added = 0

    @property
    def durable(self) -> bool:
        return self._store is not None

    async def add(
        self,
        *,
        reason: DeadLetterReason,
        detail: str,
        subject: str,
        group: str,
        message: Message | None = None,
        raw: bytes | None = None,
        errors: Sequence[AttemptError] = (),
    ) -> DeadLetter:
        letter = DeadLetter(
            id=random_id(self._clock.now(), self._rng),
            reason=reason,
            detail=detail,
            subject=subject,
            group=group,
            dead_lettered_at=self._clock.now(),
            message=message,
            raw=raw,
            errors=tuple(errors),
        )
        if self._store is not None:
            await self._store.append(
                DEAD_LETTER_STREAM, [NewEvent(_DEAD_LETTERED, _dump(letter.to_dict()))]
            )
        else:
            self._letters[letter.id] = letter
        self.added += 1
        if self._signal is not None:
            self._signal.set()
            self._signal = None
        return letter

    async def wait_for(self, count: int) -> None:
        """Return once ``count`` dead letters have been added through this queue object."""
        while self.added < count:
            if self._signal is None:
                self._signal = asyncio.Event()
            await self._signal.wait()

    async def list(self, *, limit: int | None = None) -> list[DeadLetter]:
        """Dead letters, oldest first."""
        await self._refresh()
        letters = list(self._letters.values())
        return letters if limit is None else letters[:limit]

    async def count(self) -> int:
        await self._refresh()
        return len(self._letters)

    async def get(self, letter_id: str) -> DeadLetter:
        """One dead letter; :class:`DeadLetterNotFoundError` when no such id is queued."""
        await self._refresh()
        letter = self._letters.get(letter_id)
        if letter is None:
            raise DeadLetterNotFoundError(
                f"no dead letter {letter_id!r} is queued (it may have been purged); "
                "list them with broker.dead_letters().list() or `cblocks dlq list`"
            )
        return letter

    async def replay(self, letter_id: str) -> Message:
        """Re-publish the message to the subject it was headed for and drop the dead letter.

        The message keeps its id, so an EXACTLY_ONCE consumer still applies it at most once.
        """
        letter = await self.get(letter_id)
        if letter.message is None:
            raise MessagingError(
                f"dead letter {letter_id} holds bytes that could not be decoded "
                f"({letter.reason.value}); there is nothing to replay. Inspect and purge it"
            )
        if self._republish is None:
            raise MessagingError(
                "this dead-letter queue has no broker to replay through; open it with "
                "broker.dead_letters() (or `cblocks dlq replay --broker URL`)"
            )
        await self._republish(letter.subject, letter.message)
        await self._remove(letter_id, _REPLAYED)
        return letter.message

    async def purge(self, letter_ids: Sequence[str] | None = None) -> int:
        """Drop the given dead letters (all of them when None); returns how many."""
        await self._refresh()
        targets = list(self._letters) if letter_ids is None else list(letter_ids)
        removed = 0
        for letter_id in targets:
            if letter_id in self._letters:
                await self._remove(letter_id, _PURGED)
                removed += 1
        return removed

    async def _remove(self, letter_id: str, topic: str) -> None:
        if self._store is not None:
            await self._store.append(
                DEAD_LETTER_STREAM, [NewEvent(topic, _dump({"id": letter_id}))]
            )
            await self._refresh()
        else:
            self._letters.pop(letter_id, None)

    async def _refresh(self) -> None:
        if self._store is None:
            return
        events = await self._store.read(DEAD_LETTER_STREAM, from_version=self._loaded_version + 1)
        for event in events:
            data = _load(event.state)
            if event.topic == _DEAD_LETTERED:
                letter = DeadLetter.from_dict(data)
                self._letters[letter.id] = letter
            elif event.topic in (_REPLAYED, _PURGED):
                self._letters.pop(str(data.get("id")), None)
            self._loaded_version = event.version


async def record_attempt(
    store: EventStore, group: str, message_id: str, error: AttemptError
) -> None:
    """Record one failed attempt durably (before the consumer retries or gives up)."""
    await store.append(
        attempts_stream(group, message_id),
        [NewEvent(ATTEMPT_FAILED_TOPIC, _dump(error.to_dict()))],
    )


async def close_attempts(store: EventStore, group: str, message_id: str) -> None:
    """Mark the recorded attempts as settled: :func:`read_attempts` starts afresh after it."""
    await store.append(attempts_stream(group, message_id), [NewEvent(ATTEMPTS_CLOSED_TOPIC, b"{}")])


async def record_attempt_started(
    store: EventStore, group: str, message_id: str, attempt: int, at: float, consumer: str
) -> None:
    """Record that ``attempt`` starts now: if it never ends, the next reader counts it lost."""
    await store.append(
        attempts_stream(group, message_id),
        [
            NewEvent(
                ATTEMPT_STARTED_TOPIC,
                _dump({"attempt": attempt, "at": at, "consumer": consumer}),
            )
        ],
    )


async def read_attempts(store: EventStore, group: str, message_id: str) -> list[AttemptError]:
    """The failed attempts recorded for ``message_id`` in ``group`` since it was last
    settled (see :func:`close_attempts`), oldest first.

    A started attempt (:func:`record_attempt_started`) that recorded no failure before the
    next start, or before this read, was lost with its consumer: it is listed as a
    :data:`CONSUMER_LOST` error, so a message that kills every process handling it still
    runs out of attempts.
    """
    attempts: list[AttemptError] = []
    started: dict[str, Any] | None = None

    def lose(start: dict[str, Any]) -> None:
        attempts.append(
            AttemptError(
                int(start["attempt"]),
                CONSUMER_LOST,
                "the consumer stopped during this attempt (its process died, or it hung "
                "past the ack timeout)",
                float(start["at"]),
                str(start.get("consumer", "")),
            )
        )

    try:
        for event in await store.read(attempts_stream(group, message_id)):
            topic = event.topic
            if topic == ATTEMPTS_CLOSED_TOPIC:
                attempts.clear()
                started = None
            elif topic == ATTEMPT_STARTED_TOPIC:
                if started is not None:
                    lose(started)
                started = _load(event.state)
            elif topic == ATTEMPT_FAILED_TOPIC:
                attempts.append(AttemptError.from_dict(_load(event.state)))
                started = None
        if started is not None:
            lose(started)
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptRecordError(
            f"a recorded attempt of message {message_id} in {group!r} is not readable: {error}"
        ) from None
    return attempts


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _load(state: bytes) -> dict[str, Any]:
    try:
        data = json.loads(state)
    except ValueError as error:
        raise CorruptRecordError(f"a dead-letter record is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise CorruptRecordError("a dead-letter record is not a JSON object")
    return data
