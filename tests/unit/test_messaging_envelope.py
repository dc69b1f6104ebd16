"""The message envelope and its wire format: round trips and every kind of rejection."""

from __future__ import annotations

import json
import random

import pytest

from collaborative_blocks.core.messaging import DeliveryGuarantee, Message, MessageType
from collaborative_blocks.core.messaging.envelope import (
    WIRE_VERSION,
    decode,
    encode,
    new_message_id,
)
from collaborative_blocks.core.randomness import random_id
from collaborative_blocks.errors import MessageRejectedError, RejectionReason


def make(**fields: object) -> Message:
    base: dict[str, object] = {
        "source": "shop",
        "target": "billing",
        "headers": {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        "correlation_id": "c-1",
        "causation_id": "m-0",
        "ttl": 60.0,
        "guarantee": DeliveryGuarantee.EXACTLY_ONCE,
        "key": "order-7",
    }
    base.update(fields)
    return Message.new(
        MessageType.COMMAND,
        "charge",
        {"amount": 12.5, "items": [1, 2], "note": "é"},
        now=1_700_000_000.0,
        rng=random.Random(3),
        **base,  # type: ignore[arg-type]
    )


def test_round_trip_keeps_every_field() -> None:
    message = make()
    assert decode(encode(message)) == message


def test_ids_are_unique_and_time_sortable() -> None:
    rng = random.Random(1)
    ids = [new_message_id(1_700_000_000.0 + i / 1000, rng) for i in range(500)]
    assert len(set(ids)) == 500
    assert ids == sorted(ids)


def test_fast_id_matches_the_runtime_random_id() -> None:
    for seed in range(20):
        now = 1_700_000_000.123 + seed
        assert new_message_id(now, random.Random(seed)) == random_id(now, random.Random(seed))


def wire(**changes: object) -> bytes:
    raw = make().to_dict()
    raw.update(changes)  # type: ignore[arg-type]
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{not json", RejectionReason.MALFORMED),
        (b"\xff\xfe", RejectionReason.MALFORMED),
        (b"[1, 2]", RejectionReason.MALFORMED),
        (wire(v=99), RejectionReason.UNKNOWN_VERSION),
        (wire(v=None), RejectionReason.UNKNOWN_VERSION),
        (wire(v=True), RejectionReason.UNKNOWN_VERSION),
        (wire(type="shout"), RejectionReason.UNKNOWN_TYPE),
        (wire(guarantee="maybe"), RejectionReason.MALFORMED),
        (wire(name=""), RejectionReason.MALFORMED),
        (wire(id=7), RejectionReason.MALFORMED),
        (wire(headers={"a": 1}), RejectionReason.MALFORMED),
        (wire(created_at="yesterday"), RejectionReason.MALFORMED),
        (wire(ttl=-1), RejectionReason.MALFORMED),
        (wire(target=5), RejectionReason.MALFORMED),
    ],
)
def test_bad_wire_input_is_rejected_with_its_reason(data: bytes, reason: RejectionReason) -> None:
    with pytest.raises(MessageRejectedError) as caught:
        decode(data)
    assert caught.value.reason is reason
    assert caught.value.detail


def test_expired_message_is_rejected_when_now_is_given() -> None:
    data = encode(make(ttl=10.0))
    assert decode(data, now=1_700_000_005.0).ttl == 10.0
    with pytest.raises(MessageRejectedError) as caught:
        decode(data, now=1_700_000_011.0)
    assert caught.value.reason is RejectionReason.EXPIRED


def test_oversized_messages_are_rejected_both_ways() -> None:
    big = make()
    with pytest.raises(MessageRejectedError) as caught:
        encode(big, max_bytes=100)
    assert caught.value.reason is RejectionReason.OVERSIZED
    with pytest.raises(MessageRejectedError) as caught:
        decode(encode(big), max_bytes=100)
    assert caught.value.reason is RejectionReason.OVERSIZED


def test_payload_that_is_not_json_cannot_be_encoded() -> None:
    with pytest.raises(MessageRejectedError) as caught:
        encode(Message(MessageType.EVENT, "x", {1, 2}, id="i"))  # type: ignore[arg-type]
    assert caught.value.reason is RejectionReason.MALFORMED


def test_message_without_id_cannot_be_encoded() -> None:
    with pytest.raises(MessageRejectedError, match="no id"):
        encode(Message(MessageType.EVENT, "x"))


def test_wire_object_is_versioned() -> None:
    assert json.loads(encode(make()))["v"] == WIRE_VERSION


def test_ordering_key_defaults() -> None:
    event = Message(MessageType.EVENT, "e", source="shop")
    command = Message(MessageType.COMMAND, "c", source="shop", target="billing")
    keyed = Message(MessageType.COMMAND, "c", source="shop", target="billing", key="k")
    assert (event.ordering_key, command.ordering_key, keyed.ordering_key) == (
        "shop",
        "billing",
        "k",
    )
