"""Chaos with real processes: worker processes over Redis and PostgreSQL, and their history.

The simulator (:mod:`collaborative_blocks.simulations`) runs the framework on virtual time;
this module is its counterpart on the real edge: worker processes that serve the
``transfers`` and ``pipeline`` workloads through a :class:`MessageBroker` on
``MESSAGE_BROKER_URL`` (Redis Streams) with the event store on ``EVENT_STORE_URL``
(PostgreSQL), so that a test can SIGKILL them at random points, restart them, and judge the
outcome with the very checkers of the simulated scenarios.

Each process (every worker incarnation, and the driver) appends its operations to its own
JSON-lines file through a :class:`HistoryWriter`: one line per ``invoke`` / ``ok`` / ``fail``
/ ``info`` record, with a per-process sequence number and the real clock's reading.
:func:`merge_histories` merges those files by time into one
:class:`~collaborative_blocks.simulations.results.History`; an invocation left open by a
process that was killed becomes ``info`` (its outcome is unknown, as in Jepsen) at the time
of the kill.

Run a worker with ``python -m collaborative_blocks.simulations.processes ROLE --name NAME
--history FILE`` (roles: ``bank`` with ``--bank``, ``stage``, ``sink``); it prints ``ready``
on stdout once it consumes. Options: ``--think S`` (a random pause of up to S seconds in each
handler, so kills land inside handlers), ``--crash-after-commit P`` (the chance to SIGKILL
itself right after committing a handler's effects, before the ack) until the
``--calm-file`` exists, ``--guarantee`` (what a bank sends credits with; ``at_least_once`` is
a planted bug), ``--max-retries``. A ``deadly`` job kills the stage worker that handles it.

This module is an edge like ``bench/``: it runs on the real clock (:class:`SystemClock`), on
purpose; ``tests/integration/test_chaos_processes.py`` drives it (see docs/chaos.md).
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import os
import signal
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from collaborative_blocks.core.clock import Clock, SystemClock
from collaborative_blocks.core.messaging.broker import MessageBroker, MessageContext, RetryPolicy
from collaborative_blocks.core.messaging.connector import SystemConnector
from collaborative_blocks.core.messaging.deadletters import DeadLetterQueue
from collaborative_blocks.core.messaging.envelope import (
    DeliveryGuarantee,
    JSONValue,
    Message,
    MessageType,
)
from collaborative_blocks.core.randomness import Random, new_random
from collaborative_blocks.core.settings import load_settings
from collaborative_blocks.simulations.results import History, Operation, OpType
from collaborative_blocks.stores import DelegatingStore, open_store
from collaborative_blocks.stores.base import (
    AppendRequest,
    EventStore,
    NewEvent,
    Tracking,
)

__all__ = [
    "ACCOUNTS_PER_BANK",
    "BANKS",
    "CrashAfterCommitStore",
    "INITIAL_BALANCE",
    "HistoryRecord",
    "HistoryWriter",
    "PoisonJobError",
    "Think",
    "account_stream",
    "main",
    "merge_histories",
    "open_accounts",
    "read_history_file",
    "read_pipeline_outcome",
    "read_transfers_state",
    "run_worker",
    "serve_bank",
    "serve_sink",
    "serve_stage",
    "worker_broker",
]

BANKS = ("bank-a", "bank-b", "bank-c")
ACCOUNTS_PER_BANK = 3
INITIAL_BALANCE = 100

OPENED = "chaos-bank:Opened"
DEBITED = "chaos-bank:Debited"
CREDITED = "chaos-bank:Credited"
REJECTED = "chaos-bank:Rejected"
SINK_STREAM = "chaos-pipeline-sink"
PROCESSED = "chaos-pipeline:Processed"

#: What a killed process's open invocations get as their error.
KILLED = "the process was killed (SIGKILL) before it recorded an outcome"


def account_stream(bank: str, number: int) -> str:
    return f"chaos-acct:{bank}:{number}"


def rejections_stream(bank: str) -> str:
    return f"chaos-rejected:{bank}"


def all_accounts() -> list[str]:
    return [account_stream(bank, n) for bank in BANKS for n in range(ACCOUNTS_PER_BANK)]


def _encode(data: Mapping[str, JSONValue]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


# -- the history each process writes -----------------------------------------------------------


#: One line of a process's history file: an :class:`Operation` whose ``index`` is the
#: process's own sequence number (the merged :class:`History` renumbers them).
HistoryRecord = Operation


class HistoryWriter:
    """Appends one process's operations to a JSON-lines file, one ``write`` per line.

    Each line goes to the kernel before :meth:`record` returns (``O_APPEND``, no user-space
    buffer), so a SIGKILL loses at most the line being written, never one already recorded;
    :func:`read_history_file` skips a torn last line.
    """

    def __init__(self, path: Path, process: str, *, clock: Clock) -> None:
        self.path = path
        self.process = process
        self._clock = clock
        self._seq = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def record(
        self, type: OpType, f: str, value: JSONValue = None, error: str | None = None
    ) -> HistoryRecord:
        self._seq += 1
        entry = HistoryRecord(self._seq, self._clock.now(), self.process, type, f, value, error)
        line = json.dumps(entry.to_json(), sort_keys=True, separators=(",", ":")) + "\n"
        os.write(self._fd, line.encode())
        return entry

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_history_file(path: Path) -> list[HistoryRecord]:
    """A process's records in sequence order; a line torn by a kill is skipped."""
    records = []
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            records.append(HistoryRecord.from_json(json.loads(line)))
        except (ValueError, KeyError):
            continue  # only the last line can be torn; the writer never writes half of one
    records.sort(key=lambda r: r.index)
    return records


def merge_histories(
    paths: Iterable[Path],
    *,
    killed: Mapping[str, float] | None = None,
    start: float | None = None,
) -> History:
    """One :class:`History` from the processes' files, merged by their clock readings.

    ``killed`` maps a process name to when it was SIGKILLed: its invocations left open get
    an ``info`` record at that time (their outcome is unknown). Open invocations of a process
    not named there stay open (a live client still waiting). Times become seconds since
    ``start`` (default: the earliest record).
    """
    killed = dict(killed or {})
    streams = [read_history_file(path) for path in paths]
    synthetic: list[HistoryRecord] = []
    for records in streams:
        open_ops: dict[tuple[str, str], list[HistoryRecord]] = {}
        for record in records:
            key = (record.process, record.f)
            if record.type is OpType.INVOKE:
                open_ops.setdefault(key, []).append(record)
            elif open_ops.get(key):
                open_ops[key].pop(0)
        for (process, f), waiting in open_ops.items():
            if process not in killed:
                continue
            for invoke in waiting:
                synthetic.append(
                    HistoryRecord(
                        invoke.index,
                        max(killed[process], invoke.time),
                        process,
                        OpType.INFO,
                        f,
                        invoke.value,
                        KILLED,
                    )
                )
    synthetic.sort(key=lambda r: (r.time, r.process, r.index))
    merged: Iterator[HistoryRecord] = heapq.merge(*streams, synthetic, key=lambda r: r.time)
    records = list(merged)
    origin = start if start is not None else min((r.time for r in records), default=0.0)
    history = History()
    for record in records:
        history.append(
            round(record.time - origin, 6),
            record.process,
            record.type,
            record.f,
            record.value,
            record.error,
        )
    return history


# -- reading the outcome from the store ----------------------------------------------------------


async def open_accounts(store: EventStore) -> None:
    """Deposit :data:`INITIAL_BALANCE` in every account (once, before the workers start)."""
    for stream in all_accounts():
        await store.append(
            stream, [NewEvent(OPENED, _encode({"amount": INITIAL_BALANCE}))], expected_version=0
        )


async def _dead_letters(store: EventStore) -> list[Message]:
    queue = DeadLetterQueue(clock=SystemClock(), rng=new_random(), store=store)
    return [letter.message for letter in await queue.list() if letter.message is not None]


async def read_transfers_state(store: EventStore) -> dict[str, Any]:
    """The banks' outcome, in the shape of the ``transfers`` scenario's final ``read``
    (balances, lowest balance per account, debits / credits / rejections per transfer,
    dead-lettered commands, the amount deposited), so its checkers judge it."""
    balances: dict[str, int] = {}
    lowest: dict[str, int] = {}
    debits: dict[str, int] = {}
    credits: dict[str, int] = {}
    rejected: dict[str, int] = {}
    for stream in all_accounts():
        balance = low = 0
        for event in await store.read(stream):
            data = json.loads(event.state)
            amount = int(data["amount"])
            if event.topic == DEBITED:
                balance -= amount
                debits[data["transfer"]] = debits.get(data["transfer"], 0) + 1
            else:
                balance += amount
                if event.topic == CREDITED:
                    credits[data["transfer"]] = credits.get(data["transfer"], 0) + 1
            low = min(low, balance)
        balances[stream] = balance
        lowest[stream] = low
    for bank in BANKS:
        for event in await store.read(rejections_stream(bank)):
            name = json.loads(event.state)["transfer"]
            rejected[name] = rejected.get(name, 0) + 1
    parked: dict[str, int] = {}
    unsent: set[str] = set()
    for message in await _dead_letters(store):
        payload: Any = message.payload
        if message.name == "credit":
            parked[payload["transfer"]] = int(payload["amount"])
        elif message.name == "debit":
            unsent.add(payload["transfer"])
    return {
        "balances": balances,
        "lowest": lowest,
        "debits": dict(sorted(debits.items())),
        "credits": dict(sorted(credits.items())),
        "rejected": dict(sorted(rejected.items())),
        "dead_lettered_credits": dict(sorted(parked.items())),
        "dead_lettered_debits": sorted(unsent),
        "deposited": INITIAL_BALANCE * len(balances),
    }


async def read_pipeline_outcome(store: EventStore) -> tuple[list[int], set[int]]:
    """The jobs the sink processed (every time it did: duplicates repeat) and the jobs
    dead-lettered by the stage or the sink."""
    processed = [int(json.loads(e.state)["n"]) for e in await store.read(SINK_STREAM)]
    dead = set()
    for message in await _dead_letters(store):
        payload: Any = message.payload
        if isinstance(payload, Mapping) and "n" in payload:
            dead.add(int(payload["n"]))
    return processed, dead


# -- a store that dies in the worst window --------------------------------------------------------


class CrashAfterCommitStore(DelegatingStore):
    """Delegates to ``inner``; right after a commit that holds a handler's effects (an append
    to one of this module's ``chaos-`` streams) it SIGKILLs its own process with probability
    ``probability``: the effect is durable, the message not yet acknowledged. That is the
    window where a redelivery must not repeat the effect (EXACTLY_ONCE's inbox)."""

    def __init__(
        self, inner: EventStore, probability: float, rng: Random, calm: Path | None = None
    ) -> None:
        super().__init__(inner)
        self._probability = probability
        self._rng = rng
        #: Once this file exists, no more crashes (the chaos phase is over: let it drain).
        self._calm = calm

    async def append_many(
        self, requests: Sequence[AppendRequest], *, tracking: Tracking | None = None
    ) -> list[list[int]]:
        positions = await self.inner.append_many(requests, tracking=tracking)
        if (
            any(r.stream.startswith("chaos-") for r in requests)
            and self._rng.random() < self._probability
            and not (self._calm is not None and self._calm.exists())
        ):
            os.kill(os.getpid(), signal.SIGKILL)
        return positions


# -- the workers -----------------------------------------------------------------------------------


def worker_broker(store: EventStore, *, clock: Clock, max_retries: int = 5) -> MessageBroker:
    """A broker on ``MESSAGE_BROKER_URL`` with short timeouts, so that what a killed worker
    held comes back within seconds (XAUTOCLAIM after ``ack_timeout``)."""
    return MessageBroker(
        store=store,
        settings=load_settings(),
        clock=clock,
        rng=new_random(),
        tracing=False,
        handler_timeout=1.5,
        ack_timeout=3.0,
        retry=RetryPolicy(max_retries=max_retries, base_delay=0.05, max_delay=0.5),
        partitions=4,
        max_in_flight=64,
    )


async def _balance(store: EventStore, stream: str) -> tuple[int, int]:
    balance = version = 0
    for event in await store.read(stream):
        amount = int(json.loads(event.state)["amount"])
        balance += -amount if event.topic == DEBITED else amount
        version = event.version
    return balance, version


class Think:
    """A random pause inside a handler (the latency of real work), so that kills land
    mid-handler often; 0 means none."""

    def __init__(self, seconds: float, clock: Clock) -> None:
        self.seconds = seconds
        self.clock = clock
        self.rng = new_random()

    async def __call__(self) -> None:
        if self.seconds > 0:
            await self.clock.sleep(self.rng.uniform(0.0, self.seconds))


def serve_bank(
    connector: SystemConnector,
    history: HistoryWriter,
    think: Think | None = None,
    guarantee: DeliveryGuarantee = DeliveryGuarantee.EXACTLY_ONCE,
) -> None:
    """``debit`` (check the balance, debit, send ``credit`` through the outbox, or reject)
    and ``credit``. With the ``guarantee`` EXACTLY_ONCE (for the credits it sends; the
    driver chooses the debits') the effect and the inbox record are one transaction;
    AT_LEAST_ONCE is the planted bug a chaos test must catch."""
    bank = connector.system_id
    pause = think or Think(0.0, SystemClock())

    async def debit(message: Message, ctx: MessageContext) -> None:
        data: Any = message.payload
        transfer = data["transfer"]
        history.record(OpType.INVOKE, "debit", {"transfer": transfer, "attempt": ctx.attempt})
        try:
            balance, version = await _balance(ctx.store, data["from"])
            await pause()
        except Exception as error:
            history.record(OpType.FAIL, "debit", {"transfer": transfer}, repr(error))
            raise
        if balance < data["amount"]:
            ctx.append(
                rejections_stream(bank),
                [NewEvent(REJECTED, _encode({"transfer": transfer, "balance": balance}))],
            )
            history.record(OpType.OK, "debit", {"transfer": transfer, "outcome": "rejected"})
            return
        ctx.append(
            data["from"],
            [NewEvent(DEBITED, _encode({"transfer": transfer, "amount": data["amount"]}))],
            expected_version=version,
        )
        ctx.publish(
            Message(
                MessageType.COMMAND,
                "credit",
                {"transfer": transfer, "to": data["to"], "amount": data["amount"]},
                target=data["to_bank"],
                key=data["to"],
                guarantee=guarantee,
            )
        )
        # OK: the handler decided; the broker commits the effect with the inbox record next
        # (a kill before that commit makes this attempt's effect vanish, and redelivery
        # repeats it).
        history.record(OpType.OK, "debit", {"transfer": transfer, "outcome": "debited"})

    async def credit(message: Message, ctx: MessageContext) -> None:
        data: Any = message.payload
        transfer = data["transfer"]
        history.record(OpType.INVOKE, "credit", {"transfer": transfer, "attempt": ctx.attempt})
        try:
            _, version = await _balance(ctx.store, data["to"])
            await pause()
        except Exception as error:
            history.record(OpType.FAIL, "credit", {"transfer": transfer}, repr(error))
            raise
        ctx.append(
            data["to"],
            [NewEvent(CREDITED, _encode({"transfer": transfer, "amount": data["amount"]}))],
            expected_version=version,
        )
        history.record(OpType.OK, "credit", {"transfer": transfer, "outcome": "credited"})

    connector.on_command("debit", debit)
    connector.on_command("credit", credit)


class PoisonJobError(Exception):
    """The stage cannot handle a poison job, however often it tries."""


def serve_stage(
    connector: SystemConnector, history: HistoryWriter, think: Think | None = None
) -> None:
    """``job.created`` -> ``job.staged`` (AT_LEAST_ONCE); a poison job always fails, a
    deadly one (also poison) SIGKILLs the worker that handles it."""
    pause = think or Think(0.0, SystemClock())

    async def stage(message: Message, ctx: MessageContext) -> None:
        payload: Any = message.payload
        n = int(payload["n"])
        history.record(OpType.INVOKE, "stage", {"n": n, "attempt": ctx.attempt})
        await pause()
        if payload.get("deadly"):
            # A job that kills its consumer (a segfaulting library, an OOM): the broker must
            # dead-letter it after a bounded number of deliveries, not loop forever.
            os.kill(os.getpid(), signal.SIGKILL)
        if payload.get("poison"):
            history.record(OpType.FAIL, "stage", {"n": n}, "poison")
            raise PoisonJobError(f"job {n} is poison")
        ctx.publish(
            Message(
                MessageType.EVENT,
                "job.staged",
                {"n": n},
                key=str(n),
                guarantee=DeliveryGuarantee.AT_LEAST_ONCE,
            )
        )
        history.record(OpType.OK, "stage", {"n": n})

    connector.on_event("job.created", stage, group="stage")


def serve_sink(
    connector: SystemConnector, history: HistoryWriter, think: Think | None = None
) -> None:
    """``job.staged`` -> a ``Processed`` event in the store (AT_LEAST_ONCE: may repeat)."""
    pause = think or Think(0.0, SystemClock())

    async def sink(message: Message, ctx: MessageContext) -> None:
        payload: Any = message.payload
        n = int(payload["n"])
        history.record(OpType.INVOKE, "sink", {"n": n, "attempt": ctx.attempt})
        await pause()
        ctx.append(SINK_STREAM, [NewEvent(PROCESSED, _encode({"n": n, "message": message.id}))])
        history.record(OpType.OK, "sink", {"n": n})

    connector.on_event("job.staged", sink, group="sink")


async def run_worker(
    role: str,
    name: str,
    history_path: Path,
    bank: str | None = None,
    think: float = 0.0,
    crash_after_commit: float = 0.0,
    guarantee: DeliveryGuarantee = DeliveryGuarantee.EXACTLY_ONCE,
    calm: Path | None = None,
    max_retries: int = 5,
) -> None:
    """Serve ``role`` until killed; print ``ready`` once the consumers run. ``think``: the
    longest random pause a handler makes, in seconds; ``crash_after_commit``: the chance
    to SIGKILL itself right after committing a handler's effects (before the ack), until
    the file ``calm`` exists; ``guarantee``: what a bank sends its credits with;
    ``max_retries``: the broker's retries before a message is dead-lettered."""
    clock = SystemClock()
    pause = Think(think, clock)
    settings = load_settings()
    history = HistoryWriter(history_path, name, clock=clock)
    store = await open_store(settings.event_store_url, clock=clock)
    if crash_after_commit > 0:
        store = CrashAfterCommitStore(store, crash_after_commit, new_random(), calm)
    broker = worker_broker(store, clock=clock, max_retries=max_retries)
    try:
        if role == "bank":
            if bank is None:
                raise SystemExit("a bank worker needs --bank NAME")
            serve_bank(SystemConnector(bank, broker, instance=name), history, pause, guarantee)
        elif role == "stage":
            serve_stage(SystemConnector("stage", broker, instance=name), history, pause)
        elif role == "sink":
            serve_sink(SystemConnector("sink", broker, instance=name), history, pause)
        else:
            raise SystemExit(f"unknown role {role!r}: use bank, stage or sink")
        await broker.start()
        history.record(OpType.INFO, "start", {"role": role})
        print("ready", flush=True)
        await asyncio.Event().wait()  # until SIGKILL (or SIGTERM)
    finally:
        await broker.close()
        await store.close()
        history.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("role", choices=("bank", "stage", "sink"))
    parser.add_argument("--name", required=True, help="this incarnation's process name")
    parser.add_argument("--history", required=True, type=Path, help="its JSON-lines file")
    parser.add_argument("--bank", help="the bank a bank worker serves")
    parser.add_argument(
        "--think", type=float, default=0.0, help="longest random pause in a handler (seconds)"
    )
    parser.add_argument(
        "--crash-after-commit",
        type=float,
        default=0.0,
        help="chance to SIGKILL itself right after a handler's commit, before the ack",
    )
    parser.add_argument(
        "--guarantee",
        choices=[g.name.lower() for g in DeliveryGuarantee],
        default="exactly_once",
        help="the guarantee a bank sends credits with (at_least_once is a planted bug)",
    )
    parser.add_argument(
        "--calm-file", type=Path, help="once this file exists, no more --crash-after-commit"
    )
    parser.add_argument(
        "--max-retries", type=int, default=5, help="retries before a message is dead-lettered"
    )
    args = parser.parse_args(argv)
    asyncio.run(
        run_worker(
            args.role,
            args.name,
            args.history,
            args.bank,
            args.think,
            args.crash_after_commit,
            DeliveryGuarantee[args.guarantee.upper()],
            args.calm_file,
            args.max_retries,
        )
    )


if __name__ == "__main__":
    main()
