"""``pipeline``: AT_LEAST_ONCE producer -> stage -> sink under a faulty network.

A producer publishes numbered ``job.created`` events; the stage turns each into a
``job.staged`` event; the sink appends ``Processed`` to the store. Some jobs are poison (the
stage always fails on them) and must be dead-lettered. Invariants:

- ``no_lost_message``: every job whose publish was acknowledged is processed by the sink or
  dead-lettered (at-least-once: duplicates are allowed, losses are not);
- ``accounting``: published = processed + dead-lettered + in flight, with nothing in flight
  once the run settled, and nothing processed that was never published;
- ``poison_dead_lettered``: a poison job is dead-lettered and never reaches the sink.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any

from collaborative_blocks.core.messaging.broker import MessageContext
from collaborative_blocks.core.messaging.deadletters import DeadLetterQueue
from collaborative_blocks.core.messaging.envelope import (
    DeliveryGuarantee,
    JSONValue,
    Message,
    MessageType,
)
from collaborative_blocks.simulations.checkers import Checker, FunctionChecker, reads
from collaborative_blocks.simulations.results import History, Operation, OpType, Violation
from collaborative_blocks.simulations.scenarios.base import Scenario
from collaborative_blocks.simulations.world import Node, Phase, World
from collaborative_blocks.stores.base import NewEvent

__all__ = ["PipelineScenario"]

SINK_STREAM = "pipeline-sink"
PROCESSED = "pipeline:Processed"


class PoisonJobError(Exception):
    """The stage cannot handle a poison job, however often it tries."""


class PipelineScenario(Scenario):
    name = "pipeline"
    description = (
        "AT_LEAST_ONCE producer -> stage -> sink: no acknowledged message lost, "
        "published = processed + dead-lettered + in flight"
    )
    default_faults = (
        "drop=0.05,duplicate=0.05,reorder=0.1,delay=0.01-0.5,crash=0.01,store_fail=0.02,"
        "handler_error=0.05,handler_hang=0.01"
    )
    invariants = ("no_lost_message", "accounting", "poison_dead_lettered", "liveness")
    required_coverage = ("redelivery", "dead_letter", "retry")
    nodes = ("producer", "stage", "sink")
    safety_seconds = 15.0
    liveness_seconds = 120.0
    #: Jobs published in the safety phase, and every how many a poison one comes.
    jobs = 600
    burst = 20
    poison_every = 100
    publish_interval = 0.4

    async def start_node(self, world: World, node: Node) -> None:
        if node.name == "stage":

            async def stage(message: Message, ctx: MessageContext) -> None:
                payload = message.payload
                assert isinstance(payload, Mapping)
                if payload.get("poison"):
                    raise PoisonJobError(f"job {payload['n']} is poison")
                ctx.publish(
                    Message(
                        MessageType.EVENT,
                        "job.staged",
                        {"n": payload["n"]},
                        source="stage",
                        key=str(payload["n"]),
                        guarantee=DeliveryGuarantee.AT_LEAST_ONCE,
                    )
                )

            await node.broker.subscribe(
                "job.created", world.chaotic(node, stage), group="stage", system="stage"
            )
        elif node.name == "sink":

            async def sink(message: Message, ctx: MessageContext) -> None:
                payload = message.payload
                assert isinstance(payload, Mapping)
                body = json.dumps({"n": payload["n"], "message": message.id}).encode()
                ctx.append(SINK_STREAM, [NewEvent(PROCESSED, body)])

            await node.broker.subscribe(
                "job.staged", world.chaotic(node, sink), group="sink", system="sink"
            )

    async def workload(self, world: World, phase: Phase) -> None:
        if phase is not Phase.SAFETY:
            return
        producer = world.node("producer")
        n = 0
        while n < self.jobs:
            if not producer.up:
                await world.clock.sleep(0.5)
                continue
            # A burst of concurrent publishes, as a busy producer makes them.
            burst = range(n, min(n + self.burst, self.jobs))
            await asyncio.gather(*(self._publish(world, producer, i) for i in burst))
            n = burst.stop
            await world.clock.sleep(self.publish_interval)

    async def _publish(self, world: World, producer: Node, n: int) -> None:
        poison = n % self.poison_every == self.poison_every // 2
        job: dict[str, JSONValue] = {"n": n, "poison": poison}
        message = Message(
            MessageType.EVENT,
            "job.created",
            job,
            source="producer",
            key=str(n),
            guarantee=DeliveryGuarantee.AT_LEAST_ONCE,
        )

        async def publish() -> JSONValue:
            sent = await producer.call(producer.broker.publish(message))
            return {**job, "id": sent.id}

        # One process per concurrent publisher of a burst (one operation in flight each).
        await world.operation(f"producer-{n % self.burst}", "publish", job, publish)

    async def _outcome(self, world: World) -> tuple[set[int], set[int]]:
        processed = {int(json.loads(e.state)["n"]) for e in await world.durable.read(SINK_STREAM)}
        letters = await DeadLetterQueue(
            clock=world.clock, rng=world.rng("dlq"), store=world.durable
        ).list()
        dead = set()
        for letter in letters:
            if letter.message is not None and isinstance(letter.message.payload, Mapping):
                payload: Any = letter.message.payload
                dead.add(int(payload["n"]))
        return processed, dead

    def _published(self, world: World) -> set[int]:
        return {
            int(_value(op)["n"])
            for op in world.history
            if op.type is OpType.OK and op.f == "publish" and isinstance(op.value, Mapping)
        }

    async def settled(self, world: World) -> bool:
        if world.network.in_flight() or world.delayed:
            return False
        processed, dead = await self._outcome(world)
        return self._published(world) <= processed | dead

    def unsettled(self, world: World) -> str:
        return (
            f"{world.network.in_flight()} messages in flight, {world.delayed} delayed in the "
            "network, or an acknowledged job neither processed nor dead-lettered"
        )

    async def final_reads(self, world: World) -> dict[str, Any]:
        processed, dead = await self._outcome(world)
        in_flight = world.network.in_flight() + world.delayed
        value: dict[str, JSONValue] = {
            "processed": sorted(processed),
            "dead_lettered": sorted(dead),
            "in_flight": in_flight,
        }
        world.record("checker", OpType.OK, "read", value)
        return value

    def checkers(self) -> Sequence[Checker]:
        return (
            FunctionChecker("no_lost_message", check_no_lost_message),
            FunctionChecker("accounting", check_accounting),
            FunctionChecker("poison_dead_lettered", check_poison),
        )


def _value(op: Operation) -> Any:
    """An operation's JSON value, to be read by key (the scenario wrote it)."""
    return op.value


def _final(history: History) -> tuple[Operation | None, set[int], set[int], int]:
    found = reads(history)
    if not found:
        return None, set(), set(), 0
    op = found[-1]
    value = _value(op)
    return (
        op,
        set(value["processed"]),
        set(value["dead_lettered"]),
        int(value["in_flight"]),
    )


def _publishes(history: History) -> dict[int, tuple[Operation, Operation | None]]:
    done = history.completions()
    out: dict[int, tuple[Operation, Operation | None]] = {}
    for op in history.invocations():
        if op.f == "publish" and isinstance(op.value, Mapping):
            out[int(_value(op)["n"])] = (op, done.get(op.index))
    return out


def check_no_lost_message(history: History, facts: Mapping[str, Any]) -> list[Violation]:
    read, processed, dead, _ = _final(history)
    if read is None:
        return [Violation("no_lost_message", "no final read was recorded")]
    violations = []
    for n, (invoke, completion) in sorted(_publishes(history).items()):
        acknowledged = completion is not None and completion.type is OpType.OK
        if acknowledged and n not in processed and n not in dead:
            violations.append(
                Violation(
                    "no_lost_message",
                    f"job {n} was published (acknowledged) but neither processed nor dead-lettered",
                    (invoke, read) if completion is None else (invoke, completion, read),
                )
            )
    return violations


def check_accounting(history: History, facts: Mapping[str, Any]) -> list[Violation]:
    read, processed, dead, in_flight = _final(history)
    if read is None:
        return [Violation("accounting", "no final read was recorded")]
    publishes = _publishes(history)
    acknowledged = {n for n, (_, c) in publishes.items() if c is not None and c.type is OpType.OK}
    maybe = {n for n, (_, c) in publishes.items() if c is None or c.type is OpType.INFO}
    violations = []
    for n in sorted((processed | dead) - acknowledged - maybe):
        witness: tuple[Operation, ...] = (publishes[n][0], read) if n in publishes else (read,)
        violations.append(
            Violation(
                "accounting",
                f"job {n} was processed or dead-lettered but never (possibly) published",
                witness,
            )
        )
    accounted = len(acknowledged & (processed | dead)) + in_flight
    if accounted < len(acknowledged):
        missing = sorted(acknowledged - processed - dead)
        witness = tuple(op for n in missing[:2] for op in publishes[n] if op is not None)
        violations.append(
            Violation(
                "accounting",
                f"published {len(acknowledged)} != processed or dead-lettered "
                f"{len(acknowledged & (processed | dead))} + in flight {in_flight}",
                (*witness, read),
            )
        )
    if in_flight:
        violations.append(
            Violation("accounting", f"{in_flight} messages still in flight after settling", (read,))
        )
    return violations


def check_poison(history: History, facts: Mapping[str, Any]) -> list[Violation]:
    read, processed, dead, _ = _final(history)
    if read is None:
        return []
    violations = []
    for n, (invoke, completion) in sorted(_publishes(history).items()):
        value = invoke.value
        if not (isinstance(value, Mapping) and value.get("poison")):
            continue
        if n in processed:
            violations.append(
                Violation(
                    "poison_dead_lettered",
                    f"poison job {n} reached the sink",
                    (invoke, read),
                )
            )
        elif completion is not None and completion.type is OpType.OK and n not in dead:
            violations.append(
                Violation(
                    "poison_dead_lettered",
                    f"poison job {n} was acknowledged but never dead-lettered",
                    (invoke, read) if completion is None else (invoke, completion, read),
                )
            )
    return violations
