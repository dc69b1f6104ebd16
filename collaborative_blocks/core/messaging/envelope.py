"""The message envelope and its versioned wire format.

A :class:`Message` is what systems send each other: a ``COMMAND`` to one target, an ``EVENT``
broadcast to whoever subscribed, a ``QUERY`` expecting a ``RESPONSE`` with the same
correlation id. It is an immutable value; the broker fills in ``id`` and ``created_at`` when
they are left empty.

On the wire a message is one UTF-8 JSON object with a version field ``"v"``. :func:`decode`
validates everything it reads and raises :class:`MessageRejectedError` with a
:class:`RejectionReason` (malformed, oversized, expired, unknown version, unknown type); the
broker turns a rejection into a dead letter, never into a crashed consumer.
"""

from __future__ import annotations

import enum
import json
import random
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple, TypeAlias

from collaborative_blocks.errors import MessageRejectedError, RejectionReason

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DeliveryGuarantee",
    "JSONValue",
    "Message",
    "MessageRejectedError",
    "MessageType",
    "RejectionReason",
    "TRACEPARENT",
    "WIRE_VERSION",
    "decode",
    "encode",
    "new_message_id",
]

#: The wire format version this module writes; :func:`decode` reads only these.
WIRE_VERSION = 1
SUPPORTED_WIRE_VERSIONS = frozenset({WIRE_VERSION})

#: Messages larger than this (encoded) are rejected as OVERSIZED (1 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20

#: The W3C trace-context header carried in :attr:`Message.headers`.
TRACEPARENT = "traceparent"

JSONValue: TypeAlias = (
    bool | int | float | str | Sequence["JSONValue"] | Mapping[str, "JSONValue"] | None
)


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_TIME_MASK = (1 << 48) - 1


def new_message_id(now: float, rng: random.Random) -> str:
    """:func:`~collaborative_blocks.core.randomness.random_id`, built for speed.

    Same layout and the same output for the same inputs (a test checks it): the first ten
    characters encode the millisecond (cached, it rarely changes between calls), the other
    sixteen 80 random bits, two characters per table lookup.
    """
    global _last_ms, _last_prefix
    ms = int(now * 1000) & _TIME_MASK
    if ms != _last_ms:
        pairs = _PAIRS
        _last_prefix = "".join([pairs[(ms >> shift) & 1023] for shift in (40, 30, 20, 10, 0)])
        _last_ms = ms
    bits = rng.getrandbits(80)
    pairs = _PAIRS
    return _last_prefix + "".join([pairs[(bits >> shift) & 1023] for shift in _RANDOM_SHIFTS])


_RANDOM_SHIFTS = tuple(range(70, -1, -10))
_last_ms = -1
_last_prefix = ""


class MessageType(enum.Enum):
    """What a message asks for."""

    #: An imperative action for exactly one target system.
    COMMAND = "command"
    #: A domain event, broadcast to every subscriber whose pattern matches its name.
    EVENT = "event"
    #: A request to one target that expects a RESPONSE with the same correlation id.
    QUERY = "query"
    #: The answer to a QUERY; its target is the querying system.
    RESPONSE = "response"


class DeliveryGuarantee(enum.Enum):
    """How hard the broker tries to get a message handled."""

    #: Sent once; lost if the consumer fails. No acknowledgement tracking.
    AT_MOST_ONCE = "at_most_once"
    #: Acknowledged only after the handler finished; redelivered (exponential backoff and
    #: jitter) up to MAX_RETRY_ATTEMPTS times, then dead-lettered.
    AT_LEAST_ONCE = "at_least_once"
    #: At-least-once plus a durable inbox in the event store: the handler's effect happens
    #: once even when the message is delivered twice.
    EXACTLY_ONCE = "exactly_once"


_TYPES = {t.value: t for t in MessageType}
_GUARANTEES = {g.value: g for g in DeliveryGuarantee}


_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class Message(NamedTuple):
    """One message between systems: an immutable value.

    (A named tuple rather than a frozen dataclass: building one is five times cheaper, and
    the broker builds one on every publish. Change fields with ``message._replace(...)``.)

    ``id`` is unique and time-sortable (filled in by the broker when empty). ``target`` names
    the receiving system of a COMMAND or QUERY (and the querying system of a RESPONSE).
    ``key`` is the ordering key: messages with the same key are handled in publish order
    (default: the target for commands and queries, the source for events). ``ttl`` is in
    seconds from ``created_at``; None means the broker's default (``MESSAGE_TTL_SECONDS``).
    """

    type: MessageType
    name: str
    payload: JSONValue = None
    source: str = ""
    target: str | None = None
    id: str = ""
    key: str | None = None
    headers: Mapping[str, str] = _NO_HEADERS
    correlation_id: str | None = None
    causation_id: str | None = None
    created_at: float = 0.0
    ttl: float | None = None
    guarantee: DeliveryGuarantee = DeliveryGuarantee.AT_LEAST_ONCE

    @classmethod
    def new(
        cls,
        type: MessageType,
        name: str,
        payload: JSONValue = None,
        *,
        now: float,
        rng: random.Random,
        **fields: Any,
    ) -> Message:
        """A message with a fresh id stamped from an injected clock reading and RNG."""
        return cls(type, name, payload, id=new_message_id(now, rng), created_at=now, **fields)

    @property
    def ordering_key(self) -> str:
        """The key whose messages are handled one at a time, in publish order."""
        if self.key is not None:
            return self.key
        if self.type is MessageType.EVENT:
            return self.source
        return self.target or self.source

    def expires_at(self) -> float | None:
        return None if self.ttl is None else self.created_at + self.ttl

    def is_expired(self, now: float) -> bool:
        return self.ttl is not None and now > self.created_at + self.ttl

    def with_header(self, name: str, value: str) -> Message:
        return self._replace(headers={**self.headers, name: value})

    def with_headers(self, headers: Mapping[str, str]) -> Message:
        return self._replace(headers=headers)

    def to_dict(self) -> dict[str, JSONValue]:
        """The wire object (what :func:`encode` serialises)."""
        return {
            "v": WIRE_VERSION,
            "id": self.id,
            "type": self.type.value,
            "name": self.name,
            "source": self.source,
            "target": self.target,
            "key": self.key,
            "payload": self.payload,
            "headers": dict(self.headers),
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
            "created_at": self.created_at,
            "ttl": self.ttl,
            "guarantee": self.guarantee.value,
        }


def encode(message: Message, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> bytes:
    """The message as versioned UTF-8 JSON.

    Raises :class:`MessageRejectedError` (MALFORMED) for a payload that is not JSON and
    (OVERSIZED) for a message larger than ``max_bytes``.
    """
    if not message.id:
        raise MessageRejectedError(
            RejectionReason.MALFORMED, "message has no id; publish it through a broker"
        )
    try:
        data = json.dumps(message.to_dict(), separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as error:
        raise MessageRejectedError(
            RejectionReason.MALFORMED,
            f"payload of {message.name!r} is not JSON-serialisable ({error}); send only dicts, "
            "lists, strings, numbers, booleans and None",
            message_id=message.id,
        ) from None
    if len(data) > max_bytes:
        raise MessageRejectedError(
            RejectionReason.OVERSIZED,
            f"message {message.name!r} is {len(data)} bytes encoded; the limit is {max_bytes}. "
            "Send a reference (a stream id, a URL) instead of the data",
            message_id=message.id,
        )
    return data


def decode(
    data: bytes | bytearray | memoryview,
    *,
    now: float | None = None,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Message:
    """Parse and validate one wire message.

    With ``now`` given, an expired message is rejected (EXPIRED). Every rejection is a
    :class:`MessageRejectedError` whose ``reason`` says which check failed.
    """
    if len(data) > max_bytes:
        raise MessageRejectedError(
            RejectionReason.OVERSIZED, f"{len(data)} bytes received; the limit is {max_bytes}"
        )
    try:
        raw = json.loads(bytes(data))
    except (UnicodeDecodeError, ValueError) as error:
        raise MessageRejectedError(RejectionReason.MALFORMED, f"not JSON: {error}") from None
    if not isinstance(raw, dict):
        raise MessageRejectedError(
            RejectionReason.MALFORMED, f"a message is a JSON object, got {type(raw).__name__}"
        )
    return from_dict(raw, now=now)


def from_dict(raw: Mapping[str, Any], *, now: float | None = None) -> Message:
    """Validate a decoded wire object (see :func:`decode`)."""
    message_id = raw.get("id") if isinstance(raw.get("id"), str) else None
    version = raw.get("v")
    if version not in SUPPORTED_WIRE_VERSIONS or isinstance(version, bool):
        raise MessageRejectedError(
            RejectionReason.UNKNOWN_VERSION,
            f"wire version {version!r} is not supported (this build reads "
            f"{sorted(SUPPORTED_WIRE_VERSIONS)}); upgrade the consumer",
            message_id=message_id,
        )
    type_name = raw.get("type")
    message_type = _TYPES.get(type_name) if isinstance(type_name, str) else None
    if message_type is None:
        raise MessageRejectedError(
            RejectionReason.UNKNOWN_TYPE,
            f"message type {type_name!r} is not one of {sorted(_TYPES)}",
            message_id=message_id,
        )
    guarantee_name = raw.get("guarantee")
    guarantee = _GUARANTEES.get(guarantee_name) if isinstance(guarantee_name, str) else None
    if guarantee is None:
        raise MessageRejectedError(
            RejectionReason.MALFORMED,
            f"delivery guarantee {guarantee_name!r} is not one of {sorted(_GUARANTEES)}",
            message_id=message_id,
        )
    _require(raw, "id", str, message_id, allow_empty=False)
    _require(raw, "name", str, message_id, allow_empty=False)
    _require(raw, "source", str, message_id)
    for optional in ("target", "key", "correlation_id", "causation_id"):
        _require(raw, optional, str, message_id, optional=True)
    created_at = raw.get("created_at")
    if not isinstance(created_at, int | float) or isinstance(created_at, bool):
        raise MessageRejectedError(
            RejectionReason.MALFORMED, "created_at must be a number", message_id=message_id
        )
    ttl = raw.get("ttl")
    if ttl is not None and (not isinstance(ttl, int | float) or isinstance(ttl, bool) or ttl < 0):
        raise MessageRejectedError(
            RejectionReason.MALFORMED,
            f"ttl must be a number >= 0 or null, got {ttl!r}",
            message_id=message_id,
        )
    headers = raw.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise MessageRejectedError(
            RejectionReason.MALFORMED,
            "headers must be an object of string values",
            message_id=message_id,
        )
    message = Message(
        type=message_type,
        name=raw["name"],
        payload=raw.get("payload"),
        source=raw["source"],
        target=raw.get("target"),
        id=raw["id"],
        key=raw.get("key"),
        headers=headers,
        correlation_id=raw.get("correlation_id"),
        causation_id=raw.get("causation_id"),
        created_at=float(created_at),
        ttl=None if ttl is None else float(ttl),
        guarantee=guarantee,
    )
    if now is not None and message.is_expired(now):
        raise MessageRejectedError(
            RejectionReason.EXPIRED,
            f"message {message.name!r} expired {now - message.created_at - (ttl or 0):.3f}s "
            "ago (its ttl ran out before it was handled)",
            message_id=message.id,
        )
    return message


def _require(
    raw: Mapping[str, Any],
    name: str,
    kind: type,
    message_id: str | None,
    *,
    optional: bool = False,
    allow_empty: bool = True,
) -> None:
    value = raw.get(name)
    if value is None and optional:
        return
    if not isinstance(value, kind) or (not allow_empty and not value):
        raise MessageRejectedError(
            RejectionReason.MALFORMED,
            f"field {name!r} must be a{'' if allow_empty else ' non-empty'} "
            f"{kind.__name__}{' or null' if optional else ''}, got {value!r}",
            message_id=message_id,
        )
