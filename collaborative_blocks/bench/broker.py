"""Broker throughput, for ``cblocks bench broker`` (and anyone measuring their machine).

Cases of issue 3's targets, each measured over ``rounds`` interleaved rounds:

- ``in-process``: publish -> handle -> ack through the in-process transport, every message
  ``AT_LEAST_ONCE`` (target >= 100,000 messages/s);
- ``exactly-once``: the same, ``EXACTLY_ONCE``, each handler appending one event through
  ``ctx.append``, committed with its inbox record in a SQLite store (target >= 20,000
  messages/s);
- ``redis-faststream``: our broker over Redis Streams (``redis://``, AT_LEAST_ONCE, a
  counting handler) against FastStream's Redis stream subscriber (a consumer group,
  ``AckPolicy.MANUAL``, ``msg.ack()``) doing the same work on the same Redis (target >= 1.5x);
- ``redis-raw``: the same run of ours against a raw redis-py asyncio loop doing the same
  XADD (pipelined) / XREADGROUP / XACK work, the limit (target >= 0.5x).

The two absolute targets are reported like the ratios: their "baseline" is the target rate
itself, so the ratio is how far above or below it the median landed. The Redis contenders
(see :mod:`._redis_broker`) run interleaved in one loop, ours once per round, so both Redis
ratios come from the same measurements of ours.

All run with the default settings (``DISTRIBUTED_TRACING_ENABLED=true``; spans cost nothing
until an OpenTelemetry SDK tracer provider is installed). Measuring elapsed real time is this
module's purpose, so it reads ``time.perf_counter``; the broker itself still runs on its
injected clock. Run it with ``python -m collaborative_blocks.bench.broker``.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from collaborative_blocks.bench import _redis_broker
from collaborative_blocks.bench._stats import (
    CaseResult,
    Contender,
    Measurement,
    ProgressCallback,
    interleave,
)
from collaborative_blocks.core.messaging.broker import MessageBroker, MessageContext
from collaborative_blocks.core.messaging.envelope import DeliveryGuarantee, Message, MessageType
from collaborative_blocks.core.settings import load_settings
from collaborative_blocks.stores import NewEvent, open_store

__all__ = ["CASES", "DEFAULT_REDIS_URL", "BrokerBenchConfig", "run_broker_bench"]

#: The name of each case, for ``--case``.
CASES = ("in-process", "exactly-once", "redis-faststream", "redis-raw")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"

IN_PROCESS_TARGET = 100_000.0
EXACTLY_ONCE_TARGET = 20_000.0
OURS = "ours"
FASTSTREAM = "FastStream (stream group, manual ack)"
RAW = "raw redis-py pipeline"
TRANSPORT_ONLY = "our Redis transport alone (no broker)"


@dataclass(frozen=True)
class BrokerBenchConfig:
    """Sizes and options; :meth:`quick` gives tiny sizes for tests."""

    rounds: int = 5
    cases: tuple[str, ...] = CASES
    redis: str = DEFAULT_REDIS_URL
    in_process_messages: int = 100_000
    exactly_once_messages: int = 20_000
    redis_messages: int = 20_000

    @classmethod
    def quick(cls, **overrides: Any) -> BrokerBenchConfig:
        sizes: dict[str, Any] = {
            "rounds": 1,
            "in_process_messages": 2_000,
            "exactly_once_messages": 500,
            "redis_messages": 300,
        }
        sizes.update(overrides)
        return cls(**sizes)


def planned_measurements(cfg: BrokerBenchConfig) -> int:
    """How many measurements a run makes at most (for a progress bar)."""
    per_round = sum(1 for case in ("in-process", "exactly-once") if case in cfg.cases)
    redis = [case for case in ("redis-faststream", "redis-raw") if case in cfg.cases]
    if redis:
        per_round += 1 + len(redis) + (1 if "redis-raw" in redis else 0)
    return per_round * cfg.rounds


def sequence_of_cases(value: Sequence[str]) -> tuple[str, ...]:
    """``--case in-process --case redis-raw`` or ``--case in-process,redis-raw``."""
    out: list[str] = []
    for item in value:
        out.extend(part.strip().lower() for part in item.split(",") if part.strip())
    return tuple(out)


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


def _fixed_target(case: CaseResult, rate: float, rounds: int) -> None:
    case.measurements[case.baseline] = Measurement(case.baseline, [rate] * rounds)


def _fresh(contender: Contender) -> Contender:
    async def run() -> float:
        # Start each measurement from a clean heap: one's garbage is not the next one's cost.
        gc.collect()
        return await contender()

    return run


async def _exactly_once_fresh(messages: int) -> float:
    with tempfile.TemporaryDirectory(prefix="cb-bench-") as directory:
        return await _exactly_once(messages, Path(directory))


async def _redis_cases(
    cfg: BrokerBenchConfig, progress: ProgressCallback | None
) -> list[CaseResult]:
    title = "Redis Streams AT_LEAST_ONCE"
    unit = "msg/s"
    wanted: list[tuple[CaseResult, Contender]] = []
    url, messages = cfg.redis, cfg.redis_messages
    if "redis-faststream" in cfg.cases:
        case = CaseResult("redis-faststream", title, unit, OURS, FASTSTREAM, 1.5)
        if importlib.util.find_spec("faststream") is None:
            case.unavailable = "n/a: FastStream is not installed (pip install 'faststream[redis]')"
        wanted.append((case, partial(_redis_broker.faststream_over_redis, url, messages)))
    if "redis-raw" in cfg.cases:
        case = CaseResult("redis-raw", title, unit, OURS, RAW, 0.5)
        wanted.append((case, partial(_redis_broker.raw_pipeline, url, messages)))
    if not wanted:
        return []
    reason = await _redis_broker.redis_unreachable(url)
    for case, _ in wanted:
        case.notes.append(
            f"{messages:,} messages per measurement from {_redis_broker.PUBLISHERS} concurrent "
            "publishers, one consumer; fresh streams per measurement"
        )
        if reason is not None:
            case.unavailable = reason
    runnable = [(case, contender) for case, contender in wanted if case.unavailable is None]
    if not runnable:
        return [case for case, _ in wanted]

    # One interleaved run for both baselines: ours is measured once per round and each
    # ratio compares measurements taken side by side.
    together = CaseResult("redis", title, unit, OURS, runnable[0][0].baseline, 0.0)
    ours = partial(_redis_broker.ours_over_redis, url, messages)
    contenders: list[tuple[str, Contender]] = [(OURS, _fresh(ours))]
    contenders += [(case.baseline, _fresh(contender)) for case, contender in runnable]
    if any(case.key == "redis-raw" for case, _ in runnable):
        # Splits our distance from the limit into the transport's share and the broker's.
        transport = partial(_redis_broker.transport_only, url, messages)
        contenders.append((TRANSPORT_ONLY, _fresh(transport)))
    await interleave(together, contenders, cfg.rounds, progress)
    for case, _ in runnable:
        case.measurements[OURS] = together.measurements[OURS]
        case.measurements[case.baseline] = together.measurements[case.baseline]
        if case.key == "redis-raw":
            case.measurements[TRANSPORT_ONLY] = together.measurements[TRANSPORT_ONLY]
    return [case for case, _ in wanted]


async def run_broker_bench(
    cfg: BrokerBenchConfig, progress: ProgressCallback | None = None
) -> list[CaseResult]:
    """Run the chosen cases, ``cfg.rounds`` interleaved rounds each, and return their results."""
    results: list[CaseResult] = []
    if "in-process" in cfg.cases:
        case = CaseResult(
            "in-process",
            "in-process AT_LEAST_ONCE",
            "msg/s",
            OURS,
            f"target {IN_PROCESS_TARGET:,.0f} msg/s",
            1.0,
        )
        messages = cfg.in_process_messages

        async def in_process() -> float:
            return await _in_process(messages)

        await interleave(case, [(OURS, _fresh(in_process))], cfg.rounds, progress)
        _fixed_target(case, IN_PROCESS_TARGET, cfg.rounds)
        case.notes.append(f"{messages:,} messages per measurement")
        results.append(case)
    if "exactly-once" in cfg.cases:
        case = CaseResult(
            "exactly-once",
            "EXACTLY_ONCE through the SQLite inbox",
            "msg/s",
            OURS,
            f"target {EXACTLY_ONCE_TARGET:,.0f} msg/s",
            1.0,
        )
        eo_messages = cfg.exactly_once_messages

        async def exactly_once() -> float:
            return await _exactly_once_fresh(eo_messages)

        await interleave(case, [(OURS, _fresh(exactly_once))], cfg.rounds, progress)
        _fixed_target(case, EXACTLY_ONCE_TARGET, cfg.rounds)
        case.notes.append(f"{eo_messages:,} messages per measurement, a fresh SQLite file each")
        results.append(case)
    results.extend(await _redis_cases(cfg, progress))
    return results


if __name__ == "__main__":
    from collaborative_blocks.cli.bench import results_markdown

    print(results_markdown(asyncio.run(run_broker_bench(BrokerBenchConfig()))))
