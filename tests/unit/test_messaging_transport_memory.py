"""The in-process transport passes the transport conformance suite."""

from __future__ import annotations

from collaborative_blocks.core.clock import Clock
from collaborative_blocks.core.messaging import Transport
from collaborative_blocks.plugins.transports.memory import MemoryTransport
from collaborative_blocks.testing.transport_conformance import TransportConformance


class TestMemoryTransport(TransportConformance):
    async def open_transport(self, clock: Clock) -> Transport:
        return MemoryTransport(clock=clock)
