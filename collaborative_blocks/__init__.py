"""Collaborative Blocks: event-driven systems that work together reliably.

One append-only, globally ordered event log; everything else is a view over it. This module
re-exports the user's API (the names of the specification) and little else; everything is
also importable from its own module.
"""

from __future__ import annotations

from collaborative_blocks.core.aggregates import Aggregate, Repository, event, event_clock
from collaborative_blocks.core.clock import Clock, SystemClock, VirtualClock
from collaborative_blocks.core.machines import StateMachineAggregate, transition
from collaborative_blocks.core.messaging import (
    DeadLetter,
    DeadLetterReason,
    DeliveryGuarantee,
    DeliveryReceipt,
    Message,
    MessageBroker,
    MessageContext,
    MessageType,
    RetryPolicy,
    SystemConnector,
    Transport,
    TransportCapabilities,
)
from collaborative_blocks.core.plugins import hookimpl
from collaborative_blocks.core.runtime import Runtime
from collaborative_blocks.core.settings import Settings, load_settings
from collaborative_blocks.core.sync import EventStream, RealTimeSyncEngine, VectorClock
from collaborative_blocks.errors import (
    AggregateNotFoundError,
    CollaborativeBlocksError,
    CommandArgumentsError,
    ConcurrencyError,
    ConfigurationError,
    DependencyCycleError,
    DuplicateMessageError,
    DuplicateSystemError,
    GuardRejectedError,
    HandlerTimeoutError,
    IllegalTransitionError,
    MessageRejectedError,
    MessagingError,
    NoRouteError,
    PluginError,
    PublishTimeoutError,
    QueryTimeoutError,
    RemoteHandlerError,
    ResolverFailedError,
    StoreError,
    StoreUnavailableError,
    StreamHandlerError,
    SyncError,
    SyncSerializationError,
    TopologyError,
    UnknownDependencyError,
    UnknownSchemeError,
    UnknownSystemError,
    UnsupportedGuaranteeError,
)
from collaborative_blocks.stores import EventStore, NewEvent, StoredEvent, Tracking, open_store

__version__ = "0.1.0"

__all__ = [
    "Aggregate",
    "AggregateNotFoundError",
    "Clock",
    "CollaborativeBlocksError",
    "CommandArgumentsError",
    "ConcurrencyError",
    "ConfigurationError",
    "DeadLetter",
    "DeadLetterReason",
    "DeliveryGuarantee",
    "DeliveryReceipt",
    "DependencyCycleError",
    "DuplicateMessageError",
    "DuplicateSystemError",
    "EventStore",
    "EventStream",
    "GuardRejectedError",
    "HandlerTimeoutError",
    "IllegalTransitionError",
    "Message",
    "MessageBroker",
    "MessageContext",
    "MessageRejectedError",
    "MessageType",
    "MessagingError",
    "NewEvent",
    "NoRouteError",
    "PluginError",
    "PublishTimeoutError",
    "QueryTimeoutError",
    "RealTimeSyncEngine",
    "RemoteHandlerError",
    "Repository",
    "ResolverFailedError",
    "RetryPolicy",
    "Runtime",
    "Settings",
    "StateMachineAggregate",
    "StoreError",
    "StoreUnavailableError",
    "StoredEvent",
    "StreamHandlerError",
    "SyncError",
    "SyncSerializationError",
    "SystemClock",
    "SystemConnector",
    "TopologyError",
    "Tracking",
    "Transport",
    "TransportCapabilities",
    "UnknownDependencyError",
    "UnknownSchemeError",
    "UnknownSystemError",
    "UnsupportedGuaranteeError",
    "VectorClock",
    "VirtualClock",
    "__version__",
    "event",
    "event_clock",
    "hookimpl",
    "load_settings",
    "open_store",
    "transition",
]
