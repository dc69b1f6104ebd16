"""The in-process transport passes the transport conformance suite."""

from __future__ import annotations

import asyncio

from collaborative_blocks.core.clock import Clock, VirtualClock
from collaborative_blocks.core.messaging import Transport
from collaborative_blocks.plugins.transports.memory import MemoryTransport
from collaborative_blocks.testing.transport_conformance import TransportConformance


class TestMemoryTransport(TransportConformance):
    async def open_transport(self, clock: Clock) -> Transport:
        return MemoryTransport(clock=clock)


async def test_closed_group_does_not_hold_publishers_back() -> None:
    transport = MemoryTransport(clock=VirtualClock(), max_backlog=2)
    subscription = await transport.subscribe("s", group="gone", consumer="c")
    await transport.publish("s", b"1")
    await subscription.close()
    for n in range(5):  # would wait forever at the third if the group were kept
        await asyncio.wait_for(transport.publish("s", str(n).encode()), 5)
    assert transport.backlog("s") == 0


async def test_group_of_a_dead_consumer_keeps_its_messages() -> None:
    clock = VirtualClock()
    transport = MemoryTransport(clock=clock)
    dead = await transport.subscribe("s", group="g", consumer="a", ack_timeout=1.0)
    await transport.publish("s", b"held")
    assert [d.body for d in await dead.fetch(1)] == [b"held"]
    # "a" dies without closing; a new consumer of the group gets the message later.
    heir = await transport.subscribe("s", group="g", consumer="b", ack_timeout=1.0)
    fetch = asyncio.ensure_future(heir.fetch(1))
    await clock.advance(2.0)
    (delivery,) = await fetch
    assert (delivery.body, delivery.attempt) == (b"held", 2)
