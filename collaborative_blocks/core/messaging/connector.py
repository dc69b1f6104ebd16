"""A system's connection to the broker: send commands, publish events, ask queries, and
register what this system answers.

```python
billing = SystemConnector("billing", broker)
billing.on_command("charge", charge)                  # handler(message[, ctx])
billing.on_query("balance", balance)                  # its return value is the response
billing.on_event("orders.*", on_order_event)

shop = SystemConnector("shop", broker)
await shop.send_command("billing", "charge", {"order": 7, "amount": 120})
await shop.publish_event("orders.created", {"order": 7})
balance = await shop.query("billing", "balance", {"account": "a-1"}, timeout=5)
receipt = await shop.request("billing", "charge", {"order": 8, "amount": 5}, timeout=5)
```

``request`` sends a command and waits for its handler's return value (a request/reply
command, what a workflow step does): the command carries a ``reply-to`` header, and the
handler's result, or its failure (error type and message), comes back as the reply. A failed
handler is not redelivered by the broker: the caller decides whether to retry.

Registration is synchronous and takes effect when the broker starts (``await
connector.start()``, ``await broker.start()`` or the first publish through the broker).
Each connector instance has its own reply address, so several instances of one system can
ask queries concurrently; they share the system's inbox (commands and queries) as one
consumer group, and each ``on_event`` pattern is one group per system.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Awaitable, Mapping
from typing import TypeVar

from collaborative_blocks.core.clock import SystemClock
from collaborative_blocks.core.messaging.broker import (
    ContextHandler,
    Handler,
    MessageBroker,
    MessageContext,
    PermanentFailure,
    _ConsumerSpec,
    adapt_handler,
    current_message,
    inbox_subject,
    name_matcher,
    reply_subject,
)
from collaborative_blocks.core.messaging.deadletters import DeadLetterReason
from collaborative_blocks.core.messaging.envelope import (
    DeliveryGuarantee,
    JSONValue,
    Message,
    MessageType,
)
from collaborative_blocks.errors import (
    MessagingError,
    PublishTimeoutError,
    QueryTimeoutError,
    RemoteCommandError,
    RemoteHandlerError,
)

__all__ = ["IDEMPOTENCY_KEY", "REPLY_TO", "SystemConnector"]

#: Header naming the reply address of a query or a request (a command expecting a reply).
REPLY_TO = "reply-to"
#: Header a sender sets so the target can recognise a repeated request (same key, same
#: logical operation) and return the earlier result instead of repeating the effect.
IDEMPOTENCY_KEY = "idempotency-key"

H = TypeVar("H", bound=Handler)


class SystemConnector:
    """One system (``system_id``) on a :class:`MessageBroker`.

    ``query_timeout`` is the default wait for a response; ``default_guarantees`` override
    the broker's per message type for what this connector sends.
    """

    def __init__(
        self,
        system_id: str,
        broker: MessageBroker,
        *,
        instance: str | None = None,
        query_timeout: float = 30.0,
        default_guarantees: Mapping[MessageType, DeliveryGuarantee] | None = None,
    ) -> None:
        if not system_id or not isinstance(system_id, str):
            raise MessagingError(f"system_id must be a non-empty string, got {system_id!r}")
        self.system_id = system_id
        self.broker = broker
        self.address = f"{system_id}.{instance or broker.new_id()}"
        self.query_timeout = query_timeout
        self.default_guarantees = dict(default_guarantees or {})
        self._commands: dict[str, ContextHandler] = {}
        self._queries: dict[str, ContextHandler] = {}
        self._pending: dict[str, asyncio.Future[JSONValue]] = {}
        self._requests: set[str] = set()  # correlation ids of pending requests (not queries)
        self._inbox: _ConsumerSpec | None = None
        self._replies: _ConsumerSpec | None = None
        self._events: list[_ConsumerSpec] = []
        # Reply deadlines of pending queries and requests, earliest first, expired by one
        # timer task per connector (not a sleeper task and an asyncio.wait per call).
        self._deadlines: list[_Deadline] = []
        self._deadline_seq = itertools.count()
        self._timer: asyncio.Task[None] | None = None
        self._timer_at = math.inf

    # -- registering what this system answers -------------------------------------------------

    def on_command(self, action: str, handler: H) -> H:
        """Handle commands named ``action`` sent to this system (one handler per action)."""
        self._check_free(action, self._commands, "command")
        self._commands[action] = adapt_handler(handler)
        self._ensure_inbox()
        return handler

    def on_query(self, name: str, handler: H) -> H:
        """Answer queries named ``name``; the handler's return value (JSON) is the response."""
        self._check_free(name, self._queries, "query")
        self._queries[name] = adapt_handler(handler)
        self._ensure_inbox()
        return handler

    def on_event(self, pattern: str, handler: H, *, group: str | None = None) -> H:
        """Handle events whose name matches the glob ``pattern``, once per system."""
        spec = _ConsumerSpec(
            subject="cb.events",
            group=group or f"{self.system_id}:events:{pattern}",
            system=self.system_id,
            processor=adapt_handler(handler),
            matches=name_matcher(pattern),
            partitions=self.broker.partitions,
        )
        self.broker.register(spec)
        self._events.append(spec)
        return handler

    def _check_free(self, name: str, table: Mapping[str, object], kind: str) -> None:
        if not name:
            raise MessagingError(f"a {kind} name must be a non-empty string")
        if name in table:
            raise MessagingError(
                f"{self.system_id!r} already has a handler for {kind} {name!r}; one per name"
            )

    def _ensure_inbox(self) -> None:
        if self._inbox is None:
            self._inbox = _ConsumerSpec(
                subject=inbox_subject(self.system_id),
                group=self.system_id,
                system=self.system_id,
                processor=self._handle_inbox,
                matches=lambda name: True,
                partitions=self.broker.partitions,
                served_target=self.system_id,
            )
            self.broker.register(self._inbox)

    async def start(self) -> SystemConnector:
        """Start serving what was registered (the broker's first publish does it too)."""
        await self.broker.start()
        return self

    async def close(self) -> None:
        """Stop this connector's consumers; pending queries fail."""
        for spec in [self._inbox, self._replies, *self._events]:
            if spec is not None:
                await self.broker._stop_consumer(spec)
        self._inbox = self._replies = None
        self._events.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()
        self._timer_at = math.inf
        for future in self._pending.values():
            if not future.done():
                future.set_exception(MessagingError(f"connector {self.address} was closed"))
        self._pending.clear()

    # -- sending ----------------------------------------------------------------------------

    async def send_command(
        self,
        target: str,
        action: str,
        payload: JSONValue = None,
        *,
        guarantee: DeliveryGuarantee | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 -- the seed API; runs on the injected clock
        key: str | None = None,
        ttl: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Send command ``action`` to ``target``; returns the message id.

        ``timeout`` bounds how long to wait for the transport to take the message
        (backpressure), raising :class:`PublishTimeoutError`.
        """
        message = self._message(MessageType.COMMAND, action, payload, target, guarantee, key, ttl)
        if headers:
            message = message.with_headers({**headers})
        sent = await self._publish(message, timeout)
        return sent.id

    async def publish_event(
        self,
        event_type: str,
        data: JSONValue = None,
        *,
        guarantee: DeliveryGuarantee | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 -- the seed API; runs on the injected clock
        key: str | None = None,
        ttl: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Broadcast event ``event_type``; returns the message id."""
        message = self._message(MessageType.EVENT, event_type, data, None, guarantee, key, ttl)
        if headers:
            message = message.with_headers({**headers})
        sent = await self._publish(message, timeout)
        return sent.id

    async def query(
        self,
        target: str,
        name: str,
        params: JSONValue = None,
        *,
        guarantee: DeliveryGuarantee | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 -- the seed API; runs on the injected clock
        key: str | None = None,
    ) -> JSONValue:
        """Ask ``target`` query ``name`` and wait for its response.

        Raises :class:`QueryTimeoutError` when no response comes within ``timeout`` seconds
        (default ``query_timeout``), :class:`RemoteHandlerError` when the target's handler
        failed or has no handler for ``name``, :class:`NoRouteError` when nobody serves
        ``target`` on an in-process broker.
        """
        wait = self.query_timeout if timeout is None else timeout
        message = self._message(MessageType.QUERY, name, params, target, guarantee, key, wait)
        return await self._ask(message, wait, None, None)

    async def request(
        self,
        target: str,
        action: str,
        payload: JSONValue = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 -- runs on the injected clock
        message_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        key: str | None = None,
        guarantee: DeliveryGuarantee | None = None,
    ) -> JSONValue:
        """Send command ``action`` to ``target`` and wait for its handler's return value.

        The command carries a ``reply-to`` header; the target's ``on_command`` handler runs
        as for :meth:`send_command`, and what it returns (JSON) comes back as the reply. A
        handler that raises, or a missing handler, comes back as
        :class:`RemoteCommandError` (a :class:`RemoteHandlerError`; ``error_type`` is the
        error's class name) and is *not* redelivered by the broker: retrying is the
        caller's decision. No reply within
        ``timeout`` seconds (default ``query_timeout``, on the broker's clock) raises
        :class:`QueryTimeoutError`; the command may still run later (at-least-once), so a
        caller that retries should send an :data:`IDEMPOTENCY_KEY` header the target can
        deduplicate on.

        ``message_id``: use this id instead of a fresh one (a deterministic id such as
        ``run:step:attempt`` lets the target and the logs recognise a redelivery).
        ``key``: the ordering key (default: the target, so one target handles its commands
        one at a time; give distinct keys to let them run in parallel). ``headers`` are
        added to the message's (trace context is added by the broker).
        """
        wait = self.query_timeout if timeout is None else timeout
        message = self._message(MessageType.COMMAND, action, payload, target, guarantee, key, wait)
        return await self._ask(message, wait, message_id, headers)

    async def _ask(
        self,
        message: Message,
        wait: float,
        message_id: str | None,
        headers: Mapping[str, str] | None,
    ) -> JSONValue:
        """Publish ``message`` with this connector's reply address; wait for the reply."""
        self._ensure_replies()
        correlation_id = message.correlation_id or self.broker.new_id()
        message = Message(
            type=message.type,
            name=message.name,
            payload=message.payload,
            source=message.source,
            target=message.target,
            id=message_id or "",
            key=message.key,
            headers={**message.headers, **(headers or {}), REPLY_TO: self.address},
            correlation_id=correlation_id,
            causation_id=message.causation_id,
            ttl=wait,
            guarantee=message.guarantee,
        )
        future: asyncio.Future[JSONValue] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        if message.type is MessageType.COMMAND:
            self._requests.add(correlation_id)
        target = message.target or ""
        try:
            await self.broker.publish(message)
            return await self._wait(future, wait, target, message.name, correlation_id)
        finally:
            pending = self._pending
            pending.pop(correlation_id, None)
            self._requests.discard(correlation_id)
            if not pending and self._deadlines:
                self._deadlines.clear()
                if self._timer is not None and type(self.broker.clock) is not SystemClock:
                    # On a virtual clock a timer asleep until a stale deadline would keep the
                    # clock from being idle; on the system clock it costs nothing and is
                    # kept, saving a task per call when calls come one at a time.
                    self._timer.cancel()
                    self._timer = None
                    self._timer_at = math.inf

    def _message(
        self,
        kind: MessageType,
        name: str,
        payload: JSONValue,
        target: str | None,
        guarantee: DeliveryGuarantee | None,
        key: str | None,
        ttl: float | None,
    ) -> Message:
        cause = current_message.get()
        return Message(
            type=kind,
            name=name,
            payload=payload,
            source=self.system_id,
            target=target,
            key=key,
            correlation_id=(cause.correlation_id or cause.id) if cause is not None else None,
            causation_id=cause.id if cause is not None else None,
            ttl=ttl,
            guarantee=guarantee
            or self.default_guarantees.get(kind)
            or self.broker.guarantee_for(kind),
        )

    async def _publish(self, message: Message, seconds: float | None) -> Message:
        if seconds is None:
            return await self.broker.publish(message)
        task = asyncio.ensure_future(self.broker.publish(message))
        try:
            if await self._race(task, seconds):
                return task.result()
        finally:
            task.cancel()
        raise PublishTimeoutError(
            f"the transport did not take {message.type.name} {message.name!r} within "
            f"{seconds}s; its consumers are lagging (backpressure). Retry later or raise "
            "timeout="
        )

    async def _race(self, awaitable: Awaitable[object], seconds: float) -> bool:
        """Wait for ``awaitable`` at most ``seconds`` of the broker's clock."""
        future = asyncio.ensure_future(awaitable)
        sleeper = asyncio.ensure_future(self.broker.clock.sleep(seconds))
        try:
            await asyncio.wait((future, sleeper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
        return future.done()

    async def _wait(
        self,
        future: asyncio.Future[JSONValue],
        seconds: float,
        target: str,
        name: str,
        correlation_id: str,
    ) -> JSONValue:
        if not future.done():
            self._arm(future, seconds, target, name, correlation_id)
        return await future

    def _arm(
        self,
        future: asyncio.Future[JSONValue],
        seconds: float,
        target: str,
        name: str,
        correlation_id: str,
    ) -> None:
        """Fail ``future`` with :class:`QueryTimeoutError` if no reply came within ``seconds``
        of the broker's clock."""
        deadline = self.broker.clock.monotonic() + seconds
        entry = (deadline, next(self._deadline_seq), future, target, name, seconds, correlation_id)
        deadlines = self._deadlines
        if len(deadlines) > 64 and len(deadlines) > 2 * len(self._pending):
            # Answered calls leave their entry behind; drop them once they are the majority.
            deadlines[:] = [d for d in deadlines if not d[2].done()]
            heapq.heapify(deadlines)
        heapq.heappush(deadlines, entry)
        timer = self._timer
        if timer is None or timer.done() or deadline < self._timer_at:
            if timer is not None:
                timer.cancel()
            self._timer_at = deadline
            self._timer = asyncio.get_running_loop().create_task(
                self._expire(), name=f"cb-reply-deadlines {self.address}"
            )

    async def _expire(self) -> None:
        """The timer: fail each pending call whose deadline passed, sleeping in between
        until the earliest one; ends when none is left."""
        deadlines = self._deadlines
        clock = self.broker.clock
        while deadlines:
            deadline, _, future, target, name, seconds, correlation_id = deadlines[0]
            if future.done():
                heapq.heappop(deadlines)
                continue
            now = clock.monotonic()
            if deadline <= now:
                heapq.heappop(deadlines)
                future.set_exception(QueryTimeoutError(target, name, seconds, correlation_id))
                continue
            self._timer_at = deadline
            await clock.sleep(deadline - now)
        self._timer_at = math.inf

    # -- receiving --------------------------------------------------------------------------

    async def _handle_inbox(self, message: Message, ctx: MessageContext) -> object:
        if message.type is MessageType.COMMAND:
            if REPLY_TO in message.headers:
                await self._answer(message, ctx, self._commands, "command")
                return None
            handler = self._commands.get(message.name)
            if handler is None:
                raise PermanentFailure(
                    DeadLetterReason.NO_HANDLER,
                    f"{self.system_id!r} has no handler for command {message.name!r} "
                    f"(it handles: {', '.join(sorted(self._commands)) or 'no commands'}); "
                    "register one with connector.on_command",
                )
            return await handler(message, ctx)
        if message.type is MessageType.QUERY:
            await self._answer(message, ctx, self._queries, "query")
            return None
        raise PermanentFailure(
            DeadLetterReason.NO_HANDLER,
            f"{message.type.name} {message.name!r} arrived in {self.system_id!r}'s inbox, "
            "which takes only commands and queries",
        )

    async def _answer(
        self,
        message: Message,
        ctx: MessageContext,
        handlers: Mapping[str, ContextHandler],
        kind: str,
    ) -> None:
        """Run the handler of a query or request and send its result (or failure) back."""
        reply_to = message.headers.get(REPLY_TO)
        handler = handlers.get(message.name)
        if handler is None:
            register = "on_query" if kind == "query" else "on_command"
            body: JSONValue = {
                "ok": False,
                "error_type": "NoHandler",
                "error": f"{self.system_id!r} has no handler for {kind} {message.name!r} "
                f"(it {'answers' if kind == 'query' else 'handles'}: "
                f"{', '.join(sorted(handlers)) or f'no {kind}s'}); register one with "
                f"connector.{register}",
            }
        else:
            try:
                body = {"ok": True, "result": _as_json(await handler(message, ctx), kind)}
            except Exception as error:
                body = {"ok": False, "error_type": type(error).__name__, "error": str(error)}
        if reply_to is None:
            raise PermanentFailure(
                DeadLetterReason.MALFORMED,
                f"{kind} {message.name!r} has no {REPLY_TO!r} header, so it cannot be answered",
            )
        ctx.publish(
            Message(
                type=MessageType.RESPONSE,
                name=message.name,
                payload=body,
                source=self.system_id,
                target=reply_to,
                correlation_id=message.correlation_id,
                causation_id=message.id,
                guarantee=self.broker.guarantee_for(MessageType.RESPONSE),
            )
        )

    def _ensure_replies(self) -> None:
        if self._replies is None:
            self._replies = _ConsumerSpec(
                subject=reply_subject(self.address),
                group=self.address,
                system=self.system_id,
                processor=self._handle_response,
                matches=lambda name: True,
                partitions=1,
            )
            self.broker.register(self._replies)

    async def _handle_response(self, message: Message, ctx: MessageContext) -> None:
        future = self._pending.get(message.correlation_id or "")
        if future is None or future.done():
            raise PermanentFailure(
                DeadLetterReason.UNKNOWN_CORRELATION_ID,
                f"response {message.name!r} for correlation id {message.correlation_id!r} "
                f"reached {self.address!r}, where no query is waiting for it (it came after "
                "the query timed out, or was never asked)",
            )
        payload = message.payload
        if not isinstance(payload, Mapping) or "ok" not in payload:
            future.set_exception(
                RemoteHandlerError(
                    message.source, message.name, "MalformedResponse", f"got {payload!r}"
                )
            )
        elif payload["ok"]:
            future.set_result(payload.get("result"))
        else:
            failure = (
                RemoteCommandError
                if message.correlation_id in self._requests
                else RemoteHandlerError
            )
            future.set_exception(
                failure(
                    message.source,
                    message.name,
                    str(payload.get("error_type")),
                    str(payload.get("error")),
                )
            )


_Deadline = tuple[float, int, "asyncio.Future[JSONValue]", str, str, float, str]


def _as_json(value: object, kind: str = "query") -> JSONValue:
    if value is None or isinstance(value, bool | int | float | str | list | tuple | dict):
        return value
    raise TypeError(
        f"a {kind} handler answering a reply must return JSON (dict, list, str, number, bool "
        f"or None), got {type(value).__name__}"
    )
