"""The NATS JetStream transport against the NATS server on this machine."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from collaborative_blocks.core.clock import Clock, SystemClock
from collaborative_blocks.core.messaging.envelope import DeliveryGuarantee, Message, MessageType
from collaborative_blocks.core.messaging.transport import Delivery, Subscription, Transport
from collaborative_blocks.core.randomness import new_random
from collaborative_blocks.core.runtime import Runtime
from collaborative_blocks.errors import ConfigurationError, TransportUnavailableError
from collaborative_blocks.plugins.transports.nats import (
    NatsDelivery,
    NatsJetStreamTransport,
    NatsTransportFactory,
    _durable_name,
    open_nats_transport,
)
from collaborative_blocks.testing.services import require_nats
from collaborative_blocks.testing.transport_conformance import (
    TransportConformance,
    body_message,
)

pytestmark = pytest.mark.nats

NATS_URL = "nats://127.0.0.1:4222"


def _test_url(**extra: str) -> str:
    # A stream and a subject prefix per test: tests never see each other's messages.
    tag = uuid.uuid4().hex[:10]
    query = {"stream": f"CBTEST_{tag}", "prefix": f"cbtest{tag}", "storage": "memory", **extra}
    return NATS_URL + "?" + "&".join(f"{k}={v}" for k, v in query.items())


async def _delete_stream(transport: NatsJetStreamTransport) -> None:
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        await nc.jetstream().delete_stream(transport.stream)
    finally:
        await nc.close()


class TestNatsConformance(TransportConformance):
    virtual_time = False
    ack_timeout = 1.0

    url: str | None = None

    def process_url(self) -> str | None:
        return self.url

    @pytest.fixture
    async def transport(self, clock: Clock) -> AsyncIterator[Transport]:
        require_nats()
        url = self.url = _test_url()
        transport = await NatsTransportFactory().open(url, runtime=Runtime(clock=clock))
        assert isinstance(transport, NatsJetStreamTransport)
        try:
            yield transport
        finally:
            await transport.close()
            await _delete_stream(transport)


@pytest.fixture
async def nats_transport() -> AsyncIterator[NatsJetStreamTransport]:
    require_nats()
    transport = await open_nats_transport(_test_url(), clock=SystemClock())
    try:
        yield transport
    finally:
        await transport.close()
        await _delete_stream(transport)


async def _fetch(subscription: Subscription, count: int = 1) -> list[Delivery]:
    return list(await asyncio.wait_for(subscription.fetch(count), 20))


def _message(n: int) -> Message:
    return Message.new(
        MessageType.COMMAND,
        "ship",
        {"n": n},
        now=SystemClock().now(),
        rng=new_random(n),
        source="test",
        target="billing",
    )


async def test_declares_every_guarantee_and_crash_safety(
    nats_transport: NatsJetStreamTransport,
) -> None:
    capabilities = nats_transport.capabilities
    assert capabilities.guarantees == frozenset(DeliveryGuarantee)
    assert capabilities.survives_consumer_crash


async def test_unreachable_server_at_start_up_is_a_typed_error_naming_the_url() -> None:
    with pytest.raises(TransportUnavailableError, match=r"127\.0\.0\.1:1\b") as caught:
        await open_nats_transport("nats://127.0.0.1:1", clock=SystemClock())
    assert "nats-server -js" in str(caught.value)


async def test_unknown_option_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="retension"):
        await open_nats_transport(f"{NATS_URL}?retension=interest", clock=SystemClock())


async def test_subjects_nats_cannot_carry_are_escaped(
    nats_transport: NatsJetStreamTransport,
) -> None:
    subject = "cb.inbox.billing team*>"
    assert " " not in nats_transport.nats_subject(subject)
    subscription = await nats_transport.subscribe(subject, group="g g", consumer="c1")
    await nats_transport.publish(subject, b"payload")
    delivery = (await _fetch(subscription))[0]
    assert delivery.subject == subject
    assert delivery.body == b"payload"
    await delivery.ack()


async def test_a_publish_repeated_with_the_same_message_id_is_stored_once(
    nats_transport: NatsJetStreamTransport,
) -> None:
    subject = "cb.inbox.billing"
    subscription = await nats_transport.subscribe(subject, group="g", consumer="c1")
    first, second = _message(1), _message(2)
    # A producer that lost the publish reply sends again: the Nats-Msg-Id header makes
    # JetStream drop the repeat.
    await nats_transport.publish(subject, first)
    await nats_transport.publish(subject, first)
    await nats_transport.publish(subject, second)
    got: list[Delivery] = []
    while len(got) < 2:
        got.extend(await _fetch(subscription, 10))
    assert [body_message(d.body).id for d in got] == [first.id, second.id]
    for delivery in got:
        await delivery.ack()
    info = await nats_transport._js.stream_info(nats_transport.stream)
    assert info.state.messages <= 2  # interest retention: acked messages may already be gone


async def test_redelivery_after_ack_wait_counts_attempts(
    nats_transport: NatsJetStreamTransport,
) -> None:
    subject = "orders"
    subscription = await nats_transport.subscribe(
        subject, group="g", consumer="c1", ack_timeout=0.5
    )
    await nats_transport.publish(subject, b"once")
    first = (await _fetch(subscription))[0]
    assert first.attempt == 1
    second = (await _fetch(subscription))[0]
    assert second.body == b"once"
    assert second.attempt == 2
    await second.ack()


async def test_competing_consumers_each_get_a_share_and_none_twice(
    nats_transport: NatsJetStreamTransport,
) -> None:
    subject = "work"
    workers = [
        await nats_transport.subscribe(subject, group="g", consumer=f"c{i}", prefetch=5)
        for i in range(3)
    ]
    total = 60
    for n in range(total):
        await nats_transport.publish(subject, f"m{n}".encode())
    seen: dict[int, list[bytes]] = {i: [] for i in range(3)}
    while sum(len(v) for v in seen.values()) < total:
        for index, worker in enumerate(workers):
            for delivery in await _fetch(worker, 5):
                assert isinstance(delivery.body, bytes)
                seen[index].append(delivery.body)
                await delivery.ack()
            if sum(len(v) for v in seen.values()) >= total:
                break
    everything = [body for bodies in seen.values() for body in bodies]
    assert len(everything) == len(set(everything)) == total
    assert all(seen[i] for i in range(3)), f"a consumer got no share: {seen}"


async def test_in_progress_keeps_a_long_handler_s_message(
    nats_transport: NatsJetStreamTransport,
) -> None:
    subject = "slow"
    mine = await nats_transport.subscribe(subject, group="g", consumer="c1", ack_timeout=1.0)
    other = await nats_transport.subscribe(subject, group="g", consumer="c2", ack_timeout=1.0)
    await nats_transport.publish(subject, b"slow")
    delivery = (await _fetch(mine))[0]
    assert isinstance(delivery, NatsDelivery)
    waiting = asyncio.ensure_future(other.fetch(1))
    try:
        # A handler working for three ack waits, reporting progress as it goes.
        for _ in range(6):
            await delivery.in_progress()
            await asyncio.sleep(0.5)  # the handler's work, not a wait for an event
        await delivery.ack()
        info = await nats_transport._js.consumer_info(
            nats_transport.stream, _durable_name(subject, "g")
        )
        assert info.num_redelivered == 0
        assert not waiting.done(), "a message in progress went to another consumer"
    finally:
        waiting.cancel()


class _PrivateNats:
    """A nats-server (with JetStream on disk) of this test alone, to kill and restart."""

    def __init__(self, port: int, store: str) -> None:
        self.port = port
        self.store = store
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            "nats-server",
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-sd",
            self.store,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.process.stderr is not None
        while True:
            line = await asyncio.wait_for(self.process.stderr.readline(), 20)
            assert line, "nats-server exited during start-up"
            if b"Server is ready" in line:
                return

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@pytest.fixture
async def private_nats(tmp_path: Path) -> AsyncIterator[_PrivateNats]:
    import shutil
    import socket

    require_nats()
    if shutil.which("nats-server") is None:
        pytest.skip("nats-server is not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = _PrivateNats(port, str(tmp_path))
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


async def test_nats_restarting_mid_run_keeps_what_it_stored(private_nats: _PrivateNats) -> None:
    transport = await open_nats_transport(f"{private_nats.url}?retry_for=30", clock=SystemClock())
    try:
        subscription = await transport.subscribe("jobs", group="g", consumer="c1")
        await transport.publish("jobs", b"before")
        await private_nats.kill()
        # Published while the server is away: retried with backoff until it is back.
        publishing = asyncio.ensure_future(transport.publish("jobs", b"during"))
        await private_nats.start()
        await asyncio.wait_for(publishing, 30)
        got: list[Delivery] = []
        while len(got) < 2:
            got.extend(await _fetch(subscription, 2))
        assert [d.body for d in got] == [b"before", b"during"]
        for delivery in got:
            await delivery.ack()
    finally:
        await transport.close()


async def test_nats_gone_for_longer_than_retry_for_is_a_typed_error(
    private_nats: _PrivateNats,
) -> None:
    transport = await open_nats_transport(f"{private_nats.url}?retry_for=1", clock=SystemClock())
    try:
        await private_nats.kill()
        with pytest.raises(TransportUnavailableError, match=str(private_nats.port)):
            await transport.publish("jobs", b"lost?")
    finally:
        await transport.close()


async def test_the_broker_runs_over_nats_events_and_queries() -> None:
    from collaborative_blocks.core.messaging.broker import MessageBroker
    from collaborative_blocks.core.messaging.connector import SystemConnector

    require_nats()
    url = _test_url()
    broker = MessageBroker(url)
    received: asyncio.Queue[str] = asyncio.Queue()

    async def on_order(message: Message) -> None:
        await received.put(message.name)

    async def total(message: Message) -> dict[str, int]:
        return {"total": 42}

    try:
        await broker.subscribe("orders.*", on_order)
        shop = SystemConnector("shop", broker)
        billing = SystemConnector("billing", broker)
        billing.on_query("total", total)
        await billing.start()
        await shop.publish_event("orders.created", {"id": 1})
        assert await asyncio.wait_for(received.get(), 20) == "orders.created"
        assert await shop.query("billing", "total", {}, timeout=20) == {"total": 42}
    finally:
        transport = broker.transport
        await broker.close()
        assert isinstance(transport, NatsJetStreamTransport)
        await _delete_stream(transport)
