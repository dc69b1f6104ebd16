"""command -> event -> query across three systems in three processes is one trace.

Three worker processes, one system each, share a networked transport (Redis Streams, then
NATS JetStream; streams of their own per test). ``alpha`` sends the command ``reserve`` to
``beta``; beta's handler publishes the event ``reserved``; ``gamma`` handles it by asking
``alpha`` the query ``stock`` and printing the answer. Every process has its own
OpenTelemetry SDK tracer provider, given to its broker explicitly (no global provider),
exporting finished spans as JSON lines to a file. The test collects the spans of all three
processes and checks that they form one trace whose PRODUCER -> CONSUMER parent links cross
every hop. Run as a script, this file is the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from collaborative_blocks import load_settings
from collaborative_blocks.core.clock import SystemClock
from collaborative_blocks.core.messaging import Message, MessageBroker, SystemConnector
from collaborative_blocks.testing.services import require_nats, require_redis

SYSTEMS = ("alpha", "beta", "gamma")


class JsonLinesSpanExporter(SpanExporter):
    """Writes each finished span as one JSON line: ids, parent, name, kind, system."""

    def __init__(self, path: Path, system: str) -> None:
        self._file = path.open("a", encoding="utf-8")
        self._system = system

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            assert span.context is not None
            record = {
                "trace_id": f"{span.context.trace_id:032x}",
                "span_id": f"{span.context.span_id:016x}",
                "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
                "name": span.name,
                "kind": span.kind.name,
                "system": self._system,
            }
            self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._file.close()


async def read_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def work(system: str, url: str, spans_path: str) -> None:
    provider = TracerProvider()
    provider.add_span_processor(
        SimpleSpanProcessor(JsonLinesSpanExporter(Path(spans_path), system))
    )
    broker = MessageBroker(
        url,
        clock=SystemClock(),
        settings=load_settings({"DISTRIBUTED_TRACING_ENABLED": "true"}),
        tracer_provider=provider,
    )
    connector = SystemConnector(system, broker)

    async def reserve(message: Message) -> None:
        await connector.publish_event("reserved", {"item": "widget"})

    async def on_reserved(message: Message) -> None:
        answer = await connector.query("alpha", "stock", {"item": "widget"}, timeout=30)
        print("answered", json.dumps(answer), flush=True)

    async def stock(message: Message) -> object:
        return {"item": "widget", "stock": 5}

    if system == "alpha":
        connector.on_query("stock", stock)
    elif system == "beta":
        connector.on_command("reserve", reserve)
    else:
        connector.on_event("reserved", on_reserved)
    await connector.start()
    print("ready", flush=True)
    while (line := (await read_line()).strip()) != "stop":
        if line == "go":
            await connector.send_command("beta", "reserve", {"item": "widget"})
    await broker.close()
    provider.shutdown()
    print("stopped", flush=True)


class Worker:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def expect(self, prefix: str) -> str:
        assert self.process.stdout is not None
        while True:
            raw = await asyncio.wait_for(self.process.stdout.readline(), 60)
            assert raw, f"worker exited early with code {await self.process.wait()}"
            line = raw.decode().strip()
            if line.startswith(prefix):
                return line

    async def tell(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{line}\n".encode())
        await self.process.stdin.drain()


async def _redis_url() -> AsyncIterator[str]:
    require_redis()
    from redis.asyncio import Redis

    prefix = f"cbtrace:{uuid.uuid4().hex[:10]}:"
    yield f"redis://127.0.0.1:6379/0?prefix={prefix}"
    client = Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def _nats_url() -> AsyncIterator[str]:
    require_nats()
    import nats

    tag = uuid.uuid4().hex[:10]
    yield f"nats://127.0.0.1:4222?stream=CBTRACE_{tag}&prefix=cbtrace{tag}"
    nc = await nats.connect("nats://127.0.0.1:4222")
    try:
        await nc.jetstream().delete_stream(f"CBTRACE_{tag}")
    finally:
        await nc.close()


@pytest.fixture(params=["redis", "nats"])
async def broker_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A networked transport URL with streams of its own, removed afterwards."""
    urls = _redis_url() if request.param == "redis" else _nats_url()
    yield await anext(urls)
    with contextlib.suppress(StopAsyncIteration):
        await anext(urls)


async def test_command_event_query_across_three_processes_is_one_trace(
    broker_url: str, tmp_path: Path
) -> None:
    spans_path = tmp_path / "spans.jsonl"
    workers: dict[str, Worker] = {}
    try:
        for system in SYSTEMS:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                system,
                broker_url,
                str(spans_path),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            workers[system] = Worker(process)
        for worker in workers.values():
            await worker.expect("ready")
        await workers["alpha"].tell("go")
        answered = await workers["gamma"].expect("answered")
        assert json.loads(answered.split(" ", 1)[1]) == {"item": "widget", "stock": 5}
        for worker in workers.values():
            await worker.tell("stop")
        for worker in workers.values():
            await worker.expect("stopped")
            assert await asyncio.wait_for(worker.process.wait(), 60) == 0
    finally:
        for worker in workers.values():
            if worker.process.returncode is None:
                worker.process.kill()
                await worker.process.wait()

    spans: list[dict[str, Any]] = [json.loads(line) for line in spans_path.read_text().splitlines()]
    assert {s["system"] for s in spans} == set(SYSTEMS), "every process exported spans"
    assert len({s["trace_id"] for s in spans}) == 1, f"one trace, got {spans}"
    by_id = {s["span_id"]: s for s in spans}

    def one(name: str, kind: str) -> dict[str, Any]:
        found = [s for s in spans if s["name"] == name and s["kind"] == kind]
        assert len(found) == 1, f"one {kind} span {name!r}, got {found}"
        return found[0]

    chain = [
        (one("send cb.inbox.beta", "PRODUCER"), "alpha"),
        (one("process cb.inbox.beta", "CONSUMER"), "beta"),
        (one("send cb.events", "PRODUCER"), "beta"),
        (one("process cb.events", "CONSUMER"), "gamma"),
        (one("send cb.inbox.alpha", "PRODUCER"), "gamma"),
        (one("process cb.inbox.alpha", "CONSUMER"), "alpha"),
        (one("send cb.replies.{address}", "PRODUCER"), "alpha"),
        (one("process cb.replies.{address}", "CONSUMER"), "gamma"),
    ]
    root = chain[0][0]
    assert root["parent_id"] is None, "the command is where the trace starts"
    for (parent, _), (child, system) in itertools.pairwise(chain):
        assert child["system"] == system
        assert by_id.get(child["parent_id"]) is parent, (
            f"{child['name']} ({system}) is not a child of {parent['name']}"
        )


if __name__ == "__main__":
    asyncio.run(work(*sys.argv[1:4]))
