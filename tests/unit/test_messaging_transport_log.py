"""The log-backed transport passes the transport conformance suite, on memory and SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest

from collaborative_blocks import Runtime, load_settings
from collaborative_blocks.core.clock import Clock, VirtualClock
from collaborative_blocks.core.messaging import MessageBroker, Transport
from collaborative_blocks.errors import ConfigurationError, StoreClosedError
from collaborative_blocks.plugins.transports.log import LogTransport
from collaborative_blocks.stores import open_store
from collaborative_blocks.stores.memory import MemoryEventStore
from collaborative_blocks.testing.transport_conformance import TransportConformance


class TestLogTransportOnMemory(TransportConformance):
    async def open_transport(self, clock: Clock) -> Transport:
        return LogTransport(MemoryEventStore(), clock=clock, owns_store=True)


class TestLogTransportOnSQLite(TransportConformance):
    @pytest.fixture(autouse=True)
    def _database(self, tmp_path: Path) -> None:
        self.url = f"sqlite+aiosqlite:///{tmp_path / 'log.db'}"

    async def open_transport(self, clock: Clock) -> Transport:
        store = await open_store(self.url)
        return LogTransport(store, clock=clock, owns_store=True)


class TestLogTransportAcrossProcesses(TransportConformance):
    """Real time, so a consumer in another process (killed with SIGKILL) can take part."""

    virtual_time = False
    ack_timeout = 1.0

    @pytest.fixture(autouse=True)
    def _database(self, tmp_path: Path) -> None:
        self.url = f"sqlite+aiosqlite:///{tmp_path / 'log.db'}"

    def process_url(self) -> str | None:
        return f"log+{self.url}?poll_interval=0.05"

    async def open_transport(self, clock: Clock) -> Transport:
        store = await open_store(self.url)
        return LogTransport(store, clock=clock, owns_store=True, poll_interval=0.05)


async def test_broker_opens_log_transport_from_the_url(tmp_path: Path) -> None:
    url = f"log+sqlite+aiosqlite:///{tmp_path / 'm.db'}?poll_interval=0.2"
    async with Runtime(load_settings({}), clock=VirtualClock()) as runtime:
        broker = MessageBroker(url, runtime=runtime, tracing=False)
        await broker.start()
        transport = broker.transport
        assert isinstance(transport, LogTransport)
        assert transport.poll_interval == 0.2
        assert transport.capabilities.durable
        assert transport.capabilities.survives_consumer_crash
        await broker.close()


async def test_bad_poll_interval_is_a_configuration_error() -> None:
    async with Runtime(load_settings({}), clock=VirtualClock()) as runtime:
        broker = MessageBroker("log+memory://?poll_interval=soon", runtime=runtime)
        with pytest.raises(ConfigurationError, match="poll_interval"):
            await broker.start()


async def test_log_scheme_alone_uses_the_event_store_url(tmp_path: Path) -> None:
    settings = load_settings({"EVENT_STORE_URL": f"sqlite+aiosqlite:///{tmp_path / 'e.db'}"})
    broker = MessageBroker("log://", settings=settings, clock=VirtualClock(), tracing=False)
    await broker.start()
    transport = broker.transport
    assert isinstance(transport, LogTransport)
    assert transport.store.url.startswith("sqlite")
    await broker.close()
    with pytest.raises(StoreClosedError):
        await transport.store.max_position()  # the broker closed what it opened
