"""Broker throughput, for ``cblocks bench broker`` (and anyone measuring their machine).

Two cases of the issue's targets, each the median of ``rounds`` runs:

- ``in_process_at_least_once``: publish -> handle -> ack through the in-process transport,
  every message ``AT_LEAST_ONCE`` (target >= 100,000 messages/s);
- ``exactly_once_sqlite_inbox``: the same, ``EXACTLY_ONCE``, each handler appending one
  event through ``ctx.append``, committed with its inbox record in a SQLite store (target >=
  20,000 messages/s).

Both run with the default settings (``DISTRIBUTED_TRACING_ENABLED=true``; spans cost nothing
until an OpenTelemetry SDK tracer provider is installed). Measuring elapsed real time is this
module's purpose, so it reads ``time.perf_counter``; the broker itself still runs on its
injected clock. Run it with ``python -m collaborative_blocks.bench.broker``.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from collaborative_blocks.core.messaging.broker import MessageBroker, MessageContext
from collaborative_blocks.core.messaging.envelope import DeliveryGuarantee, Message, MessageType
from collaborative_blocks.core.settings import load_settings
from collaborative_blocks.stores import NewEvent, open_store

__all__ = ["BrokerBenchResult", "run_broker_bench"]

TARGETS = {"in_process_at_least_once": 100_000.0, "exactly_once_sqlite_inbox": 20_000.0}


@dataclass(frozen=True)
class BrokerBenchResult:
    case: str
    messages: int
    rates: tuple[float, ...]
    target: float

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def met(self) -> bool:
        return self.median >= self.target


async def _in_process(messages: int) -> float:
    broker = MessageBroker(settings=load_settings({}), partitions=8)
    done = asyncio.Event()
    handled = 0

    async def handler(message: Message) -> None:
        nonlocal handled
        handled += 1
        if handled == messages:
            done.set()

    await broker.subscribe("bench.*", handler)
    start = time.perf_counter()
    for n in range(messages):
        await broker.publish(
            Message(MessageType.EVENT, "bench.tick", n, source="bench", key=str(n % 64))
        )
    await done.wait()
    elapsed = time.perf_counter() - start
    await broker.close()
    return messages / elapsed


async def _exactly_once(messages: int, directory: Path) -> float:
    store = await open_store(f"sqlite+aiosqlite:///{directory / 'inbox.db'}")
    # Many keys in parallel let the store group-commit the inbox transactions.
    broker = MessageBroker(
        settings=load_settings({}),
        store=store,
        partitions=128,
        max_in_flight=2000,
    )
    committed = asyncio.Event()
    handled = 0
    original = store.append_many

    async def deposit(message: Message, ctx: MessageContext) -> None:
        ctx.append(f"account-{message.key}", [NewEvent("Deposited", b"{}")])

    async def counting(*args: object, **kwargs: object) -> list[list[int]]:
        nonlocal handled
        result = await original(*args, **kwargs)  # type: ignore[arg-type]
        handled += 1
        if handled == messages:
            committed.set()
        return result

    store.append_many = counting  # type: ignore[method-assign]
    await broker.subscribe("bench.*", deposit, group="ledger")
    start = time.perf_counter()
    for n in range(messages):
        await broker.publish(
            Message(
                MessageType.EVENT,
                "bench.deposit",
                n,
                source="bench",
                key=str(n % 256),
                guarantee=DeliveryGuarantee.EXACTLY_ONCE,
            )
        )
    await committed.wait()
    elapsed = time.perf_counter() - start
    await broker.close()
    await store.close()
    return messages / elapsed


async def run_broker_bench(
    *, in_process_messages: int = 100_000, exactly_once_messages: int = 20_000, rounds: int = 3
) -> list[BrokerBenchResult]:
    """Run both cases ``rounds`` times (interleaved) and return their results."""
    in_process: list[float] = []
    exactly_once: list[float] = []
    for _ in range(rounds):
        # Start each case from a clean heap, so one case's garbage is not the next one's cost.
        gc.collect()
        in_process.append(await _in_process(in_process_messages))
        gc.collect()
        with tempfile.TemporaryDirectory() as directory:
            exactly_once.append(await _exactly_once(exactly_once_messages, Path(directory)))
    return [
        BrokerBenchResult(
            "in_process_at_least_once",
            in_process_messages,
            tuple(in_process),
            TARGETS["in_process_at_least_once"],
        ),
        BrokerBenchResult(
            "exactly_once_sqlite_inbox",
            exactly_once_messages,
            tuple(exactly_once),
            TARGETS["exactly_once_sqlite_inbox"],
        ),
    ]


if __name__ == "__main__":
    for result in asyncio.run(run_broker_bench()):
        verdict = "met" if result.met else "NOT met"
        print(
            f"{result.case}: median {result.median:,.0f} msg/s over {len(result.rates)} rounds "
            f"({', '.join(f'{r:,.0f}' for r in result.rates)}); target {result.target:,.0f}: "
            f"{verdict}"
        )
