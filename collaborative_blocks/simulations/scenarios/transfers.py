"""``transfers``: money moves between accounts on three banks, EXACTLY_ONCE.

Each bank (a node) owns three accounts (event streams in the durable store). A client of a
bank asks it to transfer an amount from one of its accounts to an account of another bank:
the bank's ``debit`` handler checks the balance, appends ``Debited`` to the account (with
``expected_version``, so concurrent changes conflict instead of overdrawing) and, in the
same transaction (the broker's inbox and outbox), sends ``credit`` to the other bank, whose
handler appends ``Credited``. Both commands are ``EXACTLY_ONCE``: the inbox in the store
makes a redelivered or duplicated command a no-op. Invariants:

- ``no_double_apply``: no transfer is debited, credited or rejected twice (or debited and
  rejected);
- ``conservation``: once settled, the sum of all balances is what was deposited;
- ``transfer_completes``: every acknowledged transfer is either debited and credited, or
  rejected; none is half done (a command the broker dead-lettered after its retries counts
  as rejected for a debit and as parked money, still conserved, for a credit);
- ``no_overdraft``: no account's balance ever goes below zero;
- ``no_phantom``: every debit or credit belongs to a transfer a client asked for.
"""

from __future__ import annotations

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
from collaborative_blocks.stores.base import EventStore, NewEvent

__all__ = ["TransfersScenario"]

OPENED = "bank:Opened"
DEBITED = "bank:Debited"
CREDITED = "bank:Credited"
REJECTED = "bank:Rejected"
INITIAL_BALANCE = 100
ACCOUNTS_PER_BANK = 3


def account_stream(bank: str, number: int) -> str:
    return f"acct:{bank}:{number}"


def rejections_stream(bank: str) -> str:
    return f"rejected:{bank}"


def _encode(data: Mapping[str, JSONValue]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


async def _balance(
    store: EventStore, stream: str, cache: dict[str, tuple[int, int]]
) -> tuple[int, int]:
    """The account's balance and version: the node's cached fold plus the events after it.

    The cache is in-memory state of the node (a crash loses it); it only ever holds what
    was read from the store, so it never runs ahead of the log.
    """
    balance, version = cache.get(stream, (0, 0))
    for event in await store.read(stream, from_version=version + 1):
        amount = int(json.loads(event.state)["amount"])
        balance += -amount if event.topic == DEBITED else amount
        version = event.version
    cache[stream] = (balance, version)
    return balance, version


class TransfersScenario(Scenario):
    name = "transfers"
    description = (
        "money transfers between three banks with EXACTLY_ONCE commands: money conserved, "
        "no transfer applied twice"
    )
    default_faults = (
        "drop=0.05,duplicate=0.1,reorder=0.1,delay=0.01-0.3,crash=0.01,store_fail=0.02,"
        "slow_write=0.05:0.5,skew=2"
    )
    invariants = (
        "no_double_apply",
        "conservation",
        "transfer_completes",
        "no_overdraft",
        "no_phantom",
        "liveness",
    )
    required_coverage = ("redelivery", "deduplication")
    nodes = ("bank-a", "bank-b", "bank-c")
    safety_seconds = 15.0
    liveness_seconds = 120.0
    #: Concurrent clients per bank, the transfers each asks for in the safety phase, and the
    #: mean pause between two of them.
    clients_per_bank = 4
    transfers_per_client = 25
    interval = 0.25
    max_amount = 40

    def accounts(self) -> list[str]:
        return [account_stream(b, i) for b in self.nodes for i in range(ACCOUNTS_PER_BANK)]

    async def setup(self, world: World) -> None:
        for stream in self.accounts():
            await world.durable.append(
                stream, [NewEvent(OPENED, _encode({"amount": INITIAL_BALANCE}))]
            )

    async def start_node(self, world: World, node: Node) -> None:
        bank = node.name
        cache: dict[str, tuple[int, int]] = node.state.setdefault("balances", {})

        async def handle(message: Message, ctx: MessageContext) -> None:
            data: Any = message.payload
            if message.name == "debit":
                await self._debit(bank, data, ctx, cache)
            elif message.name == "credit":
                _, version = await _balance(ctx.store, data["to"], cache)
                ctx.append(
                    data["to"],
                    [
                        NewEvent(
                            CREDITED,
                            _encode({"transfer": data["transfer"], "amount": data["amount"]}),
                        )
                    ],
                    expected_version=version,
                )

        await node.broker.subscribe("*", world.chaotic(node, handle), target=bank, system=bank)

    async def _debit(
        self, bank: str, data: Any, ctx: MessageContext, cache: dict[str, tuple[int, int]]
    ) -> None:
        balance, version = await _balance(ctx.store, data["from"], cache)
        transfer = data["transfer"]
        if balance < data["amount"]:
            ctx.append(
                rejections_stream(bank),
                [NewEvent(REJECTED, _encode({"transfer": transfer, "balance": balance}))],
            )
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
                guarantee=DeliveryGuarantee.EXACTLY_ONCE,
            )
        )

    async def workload(self, world: World, phase: Phase) -> None:
        if phase is not Phase.SAFETY:
            return
        clients = [
            world.spawn(self._client(world, bank, c), name=f"client {bank} {c}")
            for bank in self.nodes
            for c in range(self.clients_per_bank)
        ]
        for client in clients:
            await client

    async def _client(self, world: World, bank: str, number: int) -> None:
        rng = world.rng(f"client:{bank}:{number}")
        node = world.node(bank)
        others = [b for b in self.nodes if b != bank]
        process = f"client-{bank}-{number}"
        for j in range(self.transfers_per_client):
            k = j * self.clients_per_bank + number
            await world.clock.sleep(rng.uniform(0.0, 2 * self.interval))
            to_bank = rng.choice(others)
            transfer: dict[str, JSONValue] = {
                "transfer": f"{bank}/{k}",
                "from": account_stream(bank, rng.randrange(ACCOUNTS_PER_BANK)),
                "to": account_stream(to_bank, rng.randrange(ACCOUNTS_PER_BANK)),
                "to_bank": to_bank,
                "amount": rng.randint(1, self.max_amount),
            }
            message = Message(
                MessageType.COMMAND,
                "debit",
                transfer,
                source=process,
                target=bank,
                key=str(transfer["from"]),
                guarantee=DeliveryGuarantee.EXACTLY_ONCE,
            )

            async def send(
                message: Message = message, transfer: dict[str, JSONValue] = transfer
            ) -> JSONValue:
                sent = await node.call(node.broker.publish(message))
                return {**transfer, "message": sent.id}

            await world.operation(process, "transfer", transfer, send)

    async def _state(self, world: World) -> dict[str, Any]:
        """The outcome so far, folded incrementally from the durable store."""
        seen: dict[str, Any] = world.scenario_state.setdefault(
            "fold",
            {
                "versions": {},
                "balances": {},
                "lowest": {},
                "debits": {},
                "credits": {},
                "rejected": {},
            },
        )
        versions, balances, lowest = seen["versions"], seen["balances"], seen["lowest"]
        debits, credits, rejected = seen["debits"], seen["credits"], seen["rejected"]
        for stream in self.accounts():
            balance = balances.get(stream, 0)
            low = lowest.get(stream, 0)
            for event in await world.durable.read(stream, from_version=versions.get(stream, 0) + 1):
                data = json.loads(event.state)
                versions[stream] = event.version
                if event.topic == DEBITED:
                    balance -= int(data["amount"])
                    debits[data["transfer"]] = debits.get(data["transfer"], 0) + 1
                else:
                    balance += int(data["amount"])
                    if event.topic == CREDITED:
                        credits[data["transfer"]] = credits.get(data["transfer"], 0) + 1
                low = min(low, balance)
            balances[stream] = balance
            lowest[stream] = low
        for bank in self.nodes:
            stream = rejections_stream(bank)
            for event in await world.durable.read(stream, from_version=versions.get(stream, 0) + 1):
                versions[stream] = event.version
                transfer = json.loads(event.state)["transfer"]
                rejected[transfer] = rejected.get(transfer, 0) + 1
        # Commands the broker gave up on (retries exhausted): a dead-lettered debit never
        # moved money; a dead-lettered credit parks its amount in the queue until replayed.
        parked: dict[str, int] = {}
        unsent: list[str] = []
        for letter in await DeadLetterQueue(
            clock=world.clock, rng=world.rng("dlq"), store=world.durable
        ).list():
            if letter.message is None:
                continue
            payload: Any = letter.message.payload
            if letter.message.name == "credit":
                parked[payload["transfer"]] = int(payload["amount"])
            elif letter.message.name == "debit":
                unsent.append(payload["transfer"])
        return {
            "balances": dict(balances),
            "lowest": dict(lowest),
            "debits": dict(sorted(debits.items())),
            "credits": dict(sorted(credits.items())),
            "rejected": dict(sorted(rejected.items())),
            "dead_lettered_credits": dict(sorted(parked.items())),
            "dead_lettered_debits": sorted(set(unsent)),
            "deposited": INITIAL_BALANCE * len(balances),
        }

    async def settled(self, world: World) -> bool:
        if world.network.in_flight() or world.delayed:
            return False
        state = await self._state(world)
        return set(state["debits"]) <= set(state["credits"]) | set(state["dead_lettered_credits"])

    def unsettled(self, world: World) -> str:
        return (
            f"{world.network.in_flight()} messages in flight, {world.delayed} delayed, or a "
            "debited transfer was never credited"
        )

    async def final_reads(self, world: World) -> dict[str, Any]:
        state = await self._state(world)
        world.record("checker", OpType.OK, "read", state)
        return state

    def checkers(self) -> Sequence[Checker]:
        return (
            FunctionChecker("no_double_apply", check_no_double_apply),
            FunctionChecker("conservation", check_conservation),
            FunctionChecker("transfer_completes", check_transfer_completes),
            FunctionChecker("no_overdraft", check_no_overdraft),
            FunctionChecker("no_phantom", check_no_phantom),
        )


def _final(history: History) -> tuple[Operation, Any] | None:
    found = reads(history)
    if not found:
        return None
    return found[-1], found[-1].value


def _transfers(history: History) -> dict[str, tuple[Operation, Operation | None]]:
    done = history.completions()
    out: dict[str, tuple[Operation, Operation | None]] = {}
    for op in history.invocations():
        value: Any = op.value
        if op.f == "transfer" and isinstance(value, Mapping):
            out[str(value["transfer"])] = (op, done.get(op.index))
    return out


def _witness(
    transfers: Mapping[str, tuple[Operation, Operation | None]], name: str, read: Operation
) -> tuple[Operation, ...]:
    invoke, completion = transfers.get(name, (None, None))
    return tuple(op for op in (invoke, completion, read) if op is not None)


def check_no_double_apply(history: History, facts: Mapping[str, Any]) -> list[Violation]:
    final = _final(history)
    if final is None:
        return [Violation("no_double_apply", "no final read was recorded")]
    read, state = final
    transfers = _transfers(history)
    violations = []
    for kind in ("debits", "credits", "rejected"):
        for name, count in state[kind].items():
            if count > 1:
                violations.append(
                    Violation(
                        "no_double_apply",
                        f"transfer {name} has {count} {kind} (at most one allowed)",
                        _witness(transfers, name, read),
                    )
                )
    for name in sorted(set(state["debits"]) & set(state["rejected"])):
        violations.append(
            Violation(
                "no_double_apply",
                f"transfer {name} was both debited and rejected",
                _witness(transfers, name, read),
            )
        )
    return violations


def check_conservation(history: History, facts: Mapping[str, Any]) -> list[Violation]:
    final = _final(history)
    if final is None:
        return [Violation("conservation", "no final read was recorded")]
    read, state = final
    parked = state.get("dead_lettered_credits", {})
    total = sum(state["balances"].values()) + sum(
        amount for name, amount in parked.items() if name not in state["credits"]
    )
    if total == state["deposited"]:
        return []
    transfers = _transfers(history)
    unbalanced = sorted(
        name
        for name in set(state["debits"]) | set(state["credits"])
        if state["debits"].get(name, 0) != state["credits"].get(name, 0) and name not in parked
    )
    witness = tuple(op for name in unbalanced[:2] for op in _witness(transfers, name, read)[:-1])
    return [
        Violation(
            "conservation",
            f"the balances (plus dead-lettered credits) sum to {total}, but "
            f"{state['deposited']} was deposited (unbalanced transfers: "
            f"{', '.join(unbalanced[:5]) or 'none'})",
            (*witness, read),
        )
    ]


def check_transfer_completes(history: History, facts: Mapping[str, Any]) -> list[Violation]:
    final = _final(history)
    if final is None:
        return [Violation("transfer_completes", "no final read was recorded")]
    read, state = final
    violations = []
    for name, (invoke, completion) in sorted(_transfers(history).items()):
        debited = name in state["debits"]
        credited = name in state["credits"] or name in state.get("dead_lettered_credits", {})
        rejected = name in state["rejected"] or name in state.get("dead_lettered_debits", ())
        acknowledged = completion is not None and completion.type is OpType.OK
        if debited != credited or (acknowledged and not (debited or rejected)):
            violations.append(
                Violation(
                    "transfer_completes",
                    f"transfer {name} is half done or missing (debited={debited}, "
                    f"credited={credited}, rejected={rejected}, acknowledged={acknowledged})",
                    tuple(op for op in (invoke, completion, read) if op is not None),
                )
            )
    return violations


def check_no_overdraft(history: History, facts: Mapping[str, Any]) -> list[Violation]:
    final = _final(history)
    if final is None:
        return []
    read, state = final
    return [
        Violation("no_overdraft", f"account {stream} went down to {low}", (read,))
        for stream, low in sorted(state["lowest"].items())
        if low < 0
    ]


def check_no_phantom(history: History, facts: Mapping[str, Any]) -> list[Violation]:
    final = _final(history)
    if final is None:
        return []
    read, state = final
    asked = set(_transfers(history))
    applied = set(state["debits"]) | set(state["credits"]) | set(state["rejected"])
    return [
        Violation("no_phantom", f"transfer {name} was applied but never asked for", (read,))
        for name in sorted(applied - asked)
    ]
