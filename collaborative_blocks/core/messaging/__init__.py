"""Cross-system messaging: the envelope, the transport interface, the broker and connector.

See docs/messaging.md for a guided tour.
"""

from __future__ import annotations

from collaborative_blocks.core.messaging.broker import (
    DEFAULT_GUARANTEES,
    BrokerSubscription,
    DeliveryReceipt,
    Handler,
    MessageBroker,
    MessageContext,
    ReceiptStatus,
    RetryPolicy,
    open_transport,
)
from collaborative_blocks.core.messaging.connector import SystemConnector
from collaborative_blocks.core.messaging.deadletters import (
    AttemptError,
    DeadLetter,
    DeadLetterQueue,
    DeadLetterReason,
)
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
    "DEFAULT_GUARANTEES",
    "AttemptError",
    "BrokerSubscription",
    "DeadLetter",
    "DeadLetterQueue",
    "DeadLetterReason",
    "Delivery",
    "DeliveryGuarantee",
    "DeliveryReceipt",
    "Handler",
    "JSONValue",
    "Message",
    "MessageBroker",
    "MessageContext",
    "MessageType",
    "ReceiptStatus",
    "RetryPolicy",
    "Subscription",
    "SystemConnector",
    "Transport",
    "TransportCapabilities",
    "decode",
    "encode",
    "open_transport",
]
