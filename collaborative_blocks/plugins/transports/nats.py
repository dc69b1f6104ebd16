"""NATS JetStream transport (``nats://HOST:PORT``, ``tls://`` for TLS).

All subjects of the transport live in one JetStream stream (the *subject space*
``PREFIX.>``); a protocol subject ``cb.inbox.billing`` is the NATS subject
``PREFIX.cb.inbox.billing`` (tokens NATS cannot carry are escaped). Each consumer group is a
durable pull consumer on that subject (``ack_wait`` = the ack timeout, explicit acks), shared
by every member of the group: JetStream hands each message to one member at a time,
redelivers what is not acked within ``ack_wait``, and counts deliveries (the delivery's
``attempt``). ``nack(delay)`` is a NAK with that delay. Every message is published with its
id in the ``Nats-Msg-Id`` header, so a publish retried after a lost reply is stored once
(within the stream's duplicate window; the broker's inbox covers the rest).

Configuration, in the URL's query string::

    nats://localhost:4222?stream=CB&prefix=cbm&retention=interest&duplicate_window=120

- ``stream`` (``CB``): the JetStream stream; created when missing, used as it is otherwise
  (it must capture ``PREFIX.>``).
- ``prefix`` (``cbm``): first subject token of everything this transport publishes.
- ``retention`` (``interest``): ``interest`` keeps a message until every group has acked it
  (a subject nobody consumes keeps nothing, like the in-process transport); ``limits`` keeps
  messages until ``max_age``/``max_bytes`` (a group created later sees older messages).
- ``storage`` (``file``) or ``memory``; ``replicas`` (``1``).
- ``duplicate_window`` (``120``): seconds during which a repeated ``Nats-Msg-Id`` is dropped.
- ``max_age`` (``0`` = forever) and ``max_bytes`` (``-1`` = unbounded): stream limits.
- ``max_deliver`` (``-1``): deliveries before JetStream gives up; the broker dead-letters
  after ``MAX_RETRY_ATTEMPTS`` itself, so leave it unlimited.
- ``max_ack_pending`` (``20000``): unacked messages per group, across all its members.
- ``retry_for`` (``30``): seconds to retry while the server is away before
  :class:`~collaborative_blocks.errors.TransportUnavailableError`.
- ``max_block`` (``2``): longest single pull request, in seconds.
- ``max_message_bytes`` (1 MiB): the largest message accepted (also bounded by the server's
  ``max_payload``).

Guarantees: AT_MOST_ONCE, AT_LEAST_ONCE and (with the broker's inbox) EXACTLY_ONCE. nats-py
is imported only when a ``nats://`` URL is opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from collaborative_blocks import hookimpl
from collaborative_blocks.core.clock import Clock
from collaborative_blocks.core.extensions import TransportFactory
from collaborative_blocks.core.messaging.envelope import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DeliveryGuarantee,
    Message,
    encode,
)
from collaborative_blocks.core.messaging.transport import (
    Delivery,
    Subscription,
    Transport,
    TransportCapabilities,
)
from collaborative_blocks.errors import ConfigurationError, TransportUnavailableError
from collaborative_blocks.errors import redact_url as _redact

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

    from collaborative_blocks.core.runtime import Runtime

__all__ = ["NatsJetStreamTransport", "NatsOptions", "NatsTransportFactory"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
MSG_ID_HEADER = "Nats-Msg-Id"
_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_\-]+")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_\-]")


@dataclass(frozen=True, slots=True)
class NatsOptions:
    """The transport's URL options (see the module docstring)."""

    stream: str = "CB"
    prefix: str = "cbm"
    retention: str = "interest"
    storage: str = "file"
    replicas: int = 1
    duplicate_window: float = 120.0
    max_age: float = 0.0
    max_bytes: int = -1
    max_deliver: int = -1
    max_ack_pending: int = 20_000
    retry_for: float = 30.0
    max_block: float = 2.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    @classmethod
    def from_query(cls, url: str, query: dict[str, str]) -> NatsOptions:
        base = cls()

        def number(name: str, kind: Callable[[str], _T], default: _T) -> _T:
            if name not in query:
                return default
            try:
                return kind(query.pop(name))
            except ValueError:
                raise ConfigurationError(
                    f"{name} in {_redact(url)!r} must be a number (see docs/transports.md)"
                ) from None

        options = cls(
            stream=query.pop("stream", base.stream),
            prefix=query.pop("prefix", base.prefix),
            retention=query.pop("retention", base.retention).lower(),
            storage=query.pop("storage", base.storage).lower(),
            replicas=number("replicas", int, base.replicas),
            duplicate_window=number("duplicate_window", float, base.duplicate_window),
            max_age=number("max_age", float, base.max_age),
            max_bytes=number("max_bytes", int, base.max_bytes),
            max_deliver=number("max_deliver", int, base.max_deliver),
            max_ack_pending=number("max_ack_pending", int, base.max_ack_pending),
            retry_for=number("retry_for", float, base.retry_for),
            max_block=number("max_block", float, base.max_block),
            max_message_bytes=number("max_message_bytes", int, base.max_message_bytes),
        )
        problems = []
        if options.retention not in {"interest", "limits"}:
            problems.append(f"retention={options.retention!r} (use interest or limits)")
        if options.storage not in {"file", "memory"}:
            problems.append(f"storage={options.storage!r} (use file or memory)")
        if not _SAFE_TOKEN.fullmatch(options.stream):
            problems.append(f"stream={options.stream!r} (letters, digits, - and _ only)")
        if not all(_SAFE_TOKEN.fullmatch(t) for t in options.prefix.split(".")):
            problems.append(f"prefix={options.prefix!r} (dot-separated letters, digits, - _)")
        if options.max_block <= 0 or options.retry_for < 0 or options.max_message_bytes < 1:
            problems.append("max_block must be > 0, retry_for >= 0, max_message_bytes >= 1")
        if problems:
            raise ConfigurationError(f"invalid option in {_redact(url)!r}: " + "; ".join(problems))
        return options


def _token(text: str) -> str:
    """One subject token NATS accepts, reversibly: anything but [A-Za-z0-9_-] is ~HH."""
    if text and _SAFE_TOKEN.fullmatch(text):
        return text
    return (
        "".join(
            char if _SAFE_TOKEN.fullmatch(char) else "".join(f"~{b:02X}" for b in char.encode())
            for char in text
        )
        or "~"
    )


def _durable_name(subject: str, group: str) -> str:
    """A consumer name NATS accepts, unique per (subject, group), readable in `nats con ls`."""
    digest = hashlib.sha256(f"{subject}\0{group}".encode()).hexdigest()[:16]
    return f"{_UNSAFE_NAME.sub('_', group)[:40]}_{digest}"


def _is_transient(error: BaseException) -> bool:
    from nats.errors import (
        ConnectionClosedError,
        ConnectionReconnectingError,
        NoRespondersError,
        OutboundBufferLimitError,
        StaleConnectionError,
    )
    from nats.errors import TimeoutError as NatsTimeoutError
    from nats.js.errors import ServiceUnavailableError

    return isinstance(
        error,
        NatsTimeoutError
        | NoRespondersError
        | ConnectionClosedError
        | ConnectionReconnectingError
        | OutboundBufferLimitError
        | StaleConnectionError
        | ServiceUnavailableError
        | TimeoutError
        | OSError,
    )


class NatsDelivery:
    """One JetStream message handed to one member of a group."""

    __slots__ = ("_msg", "_settled", "_subscription", "attempt", "body", "sequence", "subject")

    def __init__(self, subscription: _NatsSubscription, msg: Msg) -> None:
        self._subscription = subscription
        self._msg = msg
        self._settled = False
        metadata = msg.metadata
        self.attempt = int(metadata.num_delivered)
        self.sequence = int(metadata.sequence.stream)
        self.body: Message | bytes = msg.data
        self.subject = subscription.subject

    async def ack(self) -> None:
        if self._settled:
            return
        self._settled = True
        self._subscription._release(self.sequence)
        with contextlib.suppress(Exception):
            # A lost ack only means a redelivery after ack_wait, which at-least-once allows.
            await self._msg.ack()

    async def nack(self, delay: float = 0.0) -> None:
        if self._settled:
            return
        self._settled = True
        self._subscription._release(self.sequence)
        with contextlib.suppress(Exception):
            await self._msg.nak(delay=delay if delay > 0 else None)

    async def in_progress(self) -> None:
        """Tell JetStream the handler is still working: restarts this delivery's ack_wait."""
        if not self._settled:
            with contextlib.suppress(Exception):
                await self._msg.in_progress()


class _NatsSubscription:
    def __init__(
        self,
        transport: NatsJetStreamTransport,
        subject: str,
        pull: JetStreamContext.PullSubscription,
        ack_timeout: float,
        prefetch: int,
    ) -> None:
        self.transport = transport
        self.subject = subject
        self._pull = pull
        self._ack_timeout = ack_timeout
        self._prefetch = prefetch
        self._held: dict[int, float] = {}
        self._closed = False
        self._room = asyncio.Event()
        self._closing = asyncio.Event()

    def _stopped(self) -> bool:
        return self._closed or self.transport._closed

    def _release(self, sequence: int) -> None:
        self._held.pop(sequence, None)
        self._room.set()

    def _free(self, now: float) -> int:
        if len(self._held) >= self._prefetch:
            # Past ack_wait JetStream has taken it back: it no longer counts as held.
            for sequence in [s for s, deadline in self._held.items() if deadline <= now]:
                del self._held[sequence]
        return self._prefetch - len(self._held)

    async def fetch(self, max_messages: int) -> Sequence[Delivery]:
        transport = self.transport
        clock = transport._clock
        delay = 0.05
        give_up: float | None = None
        while True:
            if self._stopped():
                return []
            now = clock.monotonic()
            room = min(max_messages, self._free(now))
            if room <= 0:
                self._room.clear()
                await self._wait_for(self._room.wait())
                continue
            try:
                msgs = await self._wait_for(
                    self._pull.fetch(room, timeout=transport._options.max_block)
                )
            except Exception as error:
                if self._stopped():
                    return []
                if transport._nc.is_closed:
                    raise transport._unavailable(error) from error
                from nats.errors import TimeoutError as NatsTimeoutError

                if isinstance(error, NatsTimeoutError | TimeoutError):
                    continue  # nothing arrived within max_block
                if not _is_transient(error):
                    raise
                now = clock.monotonic()
                give_up = give_up if give_up is not None else now + transport._options.retry_for
                if now + delay > give_up:
                    raise transport._unavailable(error) from error
                await clock.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if msgs is None:
                return []
            give_up = None
            deadline = clock.monotonic() + self._ack_timeout
            out: list[Delivery] = []
            for msg in msgs:
                delivery = NatsDelivery(self, msg)
                self._held[delivery.sequence] = deadline
                out.append(delivery)
            if out:
                return out

    async def _wait_for(self, awaitable: Awaitable[_T]) -> _T | None:
        """Await ``awaitable`` unless the subscription closes first (then None)."""
        work = asyncio.ensure_future(awaitable)
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((work, closing), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # Our caller was cancelled (a broker stopping): the pull must not outlive it.
            work.cancel()
            raise
        finally:
            closing.cancel()
        if work.done():
            return work.result()
        # A pull request cancelled here may still be answered: those messages are never
        # acked and JetStream redelivers them after ack_wait.
        work.cancel()
        with contextlib.suppress(BaseException):
            await work
        return None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self.transport._subscriptions.discard(self)
        with contextlib.suppress(Exception):
            await self._pull.unsubscribe()


class NatsJetStreamTransport:
    """Durable pull consumers on one JetStream stream (see the module docstring)."""

    def __init__(self, nc: NATS, *, url: str, clock: Clock, options: NatsOptions) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._clock = clock
        self._options = options
        self.url = _redact(url)
        self.capabilities = TransportCapabilities(
            guarantees=frozenset(DeliveryGuarantee),
            durable=options.storage == "file",
            survives_consumer_crash=True,
            max_message_bytes=min(options.max_message_bytes, max(nc.max_payload, 1)),
        )
        self._closed = False
        self._subscriptions: set[_NatsSubscription] = set()

    @property
    def stream(self) -> str:
        """The JetStream stream holding this transport's subjects."""
        return self._options.stream

    def nats_subject(self, subject: str) -> str:
        """The NATS subject that carries ``subject``."""
        return ".".join([self._options.prefix, *(_token(t) for t in subject.split("."))])

    def _unavailable(self, error: BaseException | None) -> TransportUnavailableError:
        return TransportUnavailableError(
            f"NATS at {self.url} stopped answering ({error}) and did not come back within "
            f"{self._options.retry_for:g}s; check the server (JetStream keeps unacknowledged "
            "messages and redelivers them once it is back)"
        )

    async def _retrying(self, command: Callable[[], Awaitable[_T]]) -> _T:
        clock = self._clock
        give_up = clock.monotonic() + self._options.retry_for
        delay = 0.05
        while True:
            if self._closed:
                raise TransportUnavailableError(f"transport {self.url} is closed")
            try:
                return await command()
            except Exception as error:
                if not _is_transient(error):
                    raise
                if self._nc.is_closed or clock.monotonic() + delay > give_up:
                    raise self._unavailable(error) from error
                log.warning("NATS at %s: %r; retrying in %.2fs", self.url, error, delay)
                await clock.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def ensure_stream(self) -> None:
        """Create the stream when it is missing; check that an existing one fits."""
        from nats.js import api
        from nats.js.errors import BadRequestError, NotFoundError

        options = self._options
        wanted = f"{options.prefix}.>"
        try:
            info = await self._js.stream_info(options.stream)
        except NotFoundError:
            config = api.StreamConfig(
                name=options.stream,
                subjects=[wanted],
                retention=api.RetentionPolicy(options.retention),
                storage=api.StorageType(options.storage),
                num_replicas=options.replicas,
                duplicate_window=options.duplicate_window,
                max_age=options.max_age or None,
                max_bytes=options.max_bytes,
                discard=api.DiscardPolicy.OLD,
            )
            try:
                await self._js.add_stream(config)
                return
            except BadRequestError:
                # Another process created it at the same time: check theirs instead.
                info = await self._js.stream_info(options.stream)
        subjects = info.config.subjects or []
        if wanted not in subjects and ">" not in subjects:
            raise ConfigurationError(
                f"JetStream stream {options.stream!r} on {self.url} captures {subjects}, not "
                f"{wanted!r}; choose another stream= or prefix= in MESSAGE_BROKER_URL"
            )

    async def publish(self, subject: str, message: Message | bytes) -> None:
        if self._closed:
            raise TransportUnavailableError(f"transport {self.url} is closed")
        headers: dict[str, str] | None = None
        if isinstance(message, Message):
            body = encode(message, max_bytes=self.capabilities.max_message_bytes)
            headers = {MSG_ID_HEADER: message.id}
        else:
            body = bytes(message)
        target = self.nats_subject(subject)

        async def send() -> object:
            return await self._js.publish(
                target, body, headers=dict(headers) if headers else None, stream=self.stream
            )

        await self._retrying(send)

    async def subscribe(
        self,
        subject: str,
        *,
        group: str,
        consumer: str,
        ack_timeout: float = 30.0,
        prefetch: int = 100,
    ) -> Subscription:
        from nats.js import api
        from nats.js.errors import BadRequestError, NotFoundError

        if self._closed:
            raise TransportUnavailableError(f"transport {self.url} is closed")
        if prefetch < 1:
            raise ConfigurationError(f"prefetch must be >= 1, got {prefetch}")
        if ack_timeout <= 0:
            raise ConfigurationError(f"ack_timeout must be > 0, got {ack_timeout}")
        options = self._options
        durable = _durable_name(subject, group)
        config = api.ConsumerConfig(
            durable_name=durable,
            name=durable,
            description=f"group {group!r} on {subject!r}",
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ack_timeout,
            max_deliver=options.max_deliver,
            max_ack_pending=options.max_ack_pending,
            filter_subject=self.nats_subject(subject),
        )

        async def ensure_consumer() -> object:
            try:
                info = await self._js.consumer_info(options.stream, durable)
            except NotFoundError:
                # Creating an identical durable twice is accepted, so racing members agree.
                return await self._js.add_consumer(options.stream, config)
            if info.config.ack_wait is not None and abs(info.config.ack_wait - ack_timeout) > 1e-3:
                # One ack_wait per group on the server: the latest member's wins, as a
                # deployment that changes the ack timeout expects.
                try:
                    return await self._js.add_consumer(options.stream, config)
                except BadRequestError as error:
                    log.warning(
                        "NATS consumer %s keeps ack_wait=%ss (update to %ss refused: %s)",
                        durable,
                        info.config.ack_wait,
                        ack_timeout,
                        error,
                    )
            return info

        await self._retrying(ensure_consumer)

        async def bind() -> JetStreamContext.PullSubscription:
            return await self._js.pull_subscribe_bind(durable=durable, stream=options.stream)

        pull = await self._retrying(bind)
        subscription = _NatsSubscription(self, subject, pull, ack_timeout, prefetch)
        self._subscriptions.add(subscription)
        return subscription

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for subscription in list(self._subscriptions):
            await subscription.close()
        with contextlib.suppress(Exception):
            await self._nc.drain()
        with contextlib.suppress(Exception):
            await self._nc.close()


class NatsTransportFactory:
    schemes = ("nats", "tls")

    async def open(self, url: str, *, runtime: Runtime) -> Transport:
        return await open_nats_transport(url, clock=runtime.clock)


async def open_nats_transport(url: str, *, clock: Clock) -> NatsJetStreamTransport:
    """Connect to NATS at ``url``, make sure the stream exists, and return the transport.

    Raises :class:`TransportUnavailableError` when the server does not answer or has no
    JetStream.
    """
    try:
        import nats
    except ImportError as error:  # pragma: no cover - depends on the installation
        raise ConfigurationError(
            f"MESSAGE_BROKER_URL={_redact(url)!r} needs nats-py: pip install "
            "'collaborative-blocks[nats]'"
        ) from error

    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    options = NatsOptions.from_query(url, query)
    if query:
        raise ConfigurationError(
            f"unknown option(s) {sorted(query)} in {_redact(url)!r}; see docs/transports.md"
        )
    server = urlunsplit(parts._replace(query=""))
    host, port = parts.hostname or "127.0.0.1", parts.port or 4222
    # nats-py retries an unreachable server for minutes at start-up; fail fast instead.
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5.0)
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    except (TimeoutError, OSError) as error:
        raise TransportUnavailableError(
            f"NATS at {_redact(url)} is not reachable ({error}); start it with JetStream "
            "(`nats-server -js`) or point MESSAGE_BROKER_URL at a running server"
        ) from error

    async def on_error(error: Exception) -> None:
        log.warning("NATS at %s: %r", _redact(url), error)

    try:
        nc = await nats.connect(
            servers=[server],
            connect_timeout=5,
            reconnect_time_wait=1,
            max_reconnect_attempts=max(int(options.retry_for), 1),
            error_cb=on_error,
            name="collaborative-blocks",
        )
    except Exception as error:
        raise TransportUnavailableError(
            f"NATS at {_redact(url)} refused the connection ({error}); check the URL and "
            "credentials in MESSAGE_BROKER_URL"
        ) from error
    transport = NatsJetStreamTransport(nc, url=url, clock=clock, options=options)
    try:
        await nc.jetstream().account_info()
    except Exception as error:
        await nc.close()
        raise TransportUnavailableError(
            f"NATS at {_redact(url)} has no JetStream ({error}); start the server with "
            "`nats-server -js` (or enable jetstream in its configuration)"
        ) from error
    try:
        await transport.ensure_stream()
    except Exception:
        await nc.close()
        raise
    return transport


@hookimpl
def cb_transport_factories() -> Sequence[TransportFactory]:
    return [NatsTransportFactory()]
