"""Collaborative Blocks: event-driven systems that work together reliably.

One append-only, globally ordered event log; everything else is a view over it.
"""

from __future__ import annotations

from collaborative_blocks.core.clock import Clock, SystemClock, VirtualClock
from collaborative_blocks.core.plugins import hookimpl
from collaborative_blocks.core.runtime import Runtime
from collaborative_blocks.core.settings import Settings, load_settings
from collaborative_blocks.errors import (
    CollaborativeBlocksError,
    ConcurrencyError,
    ConfigurationError,
    DuplicateMessageError,
    IllegalTransitionError,
    StoreError,
)
from collaborative_blocks.stores import EventStore, NewEvent, StoredEvent, open_store

__version__ = "0.1.0"

__all__ = [
    "Clock",
    "CollaborativeBlocksError",
    "ConcurrencyError",
    "ConfigurationError",
    "DuplicateMessageError",
    "EventStore",
    "IllegalTransitionError",
    "NewEvent",
    "Runtime",
    "Settings",
    "StoreError",
    "StoredEvent",
    "SystemClock",
    "VirtualClock",
    "__version__",
    "hookimpl",
    "load_settings",
    "open_store",
]
