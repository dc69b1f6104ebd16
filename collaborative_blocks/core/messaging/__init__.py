"""Cross-system messaging: the envelope, the transport interface, the broker and connector.

See docs/messaging.md for a guided tour.
"""

from __future__ import annotations

from collaborative_blocks.core.messaging.envelope import (
    DeliveryGuarantee,
    JSONValue,
    Message,
    MessageType,
    decode,
    encode,
)
from collaborative_blocks.core.messaging.transport import (
    Delivery,
    Subscription,
    Transport,
    TransportCapabilities,
)

__all__ = [
    "Delivery",
    "DeliveryGuarantee",
    "JSONValue",
    "Message",
    "MessageType",
    "Subscription",
    "Transport",
    "TransportCapabilities",
    "decode",
    "encode",
]
