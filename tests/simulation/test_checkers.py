"""Every checker catches a hand-made bad history (and passes the matching good one), with a
witness that names the operations involved."""

from __future__ import annotations

from typing import Any

import pytest

from collaborative_blocks.simulations import History, OpType, Violation
from collaborative_blocks.simulations.checkers import (
    FunctionChecker,
    minimise_witness,
    run_checkers,
)
from collaborative_blocks.simulations.scenarios import pipeline, replicas, transfers
from collaborative_blocks.simulations.shrink import shrink_witness


def _transfer_history(read: dict[str, Any], *, extra: int = 0) -> History:
    history = History()
    for k in range(2 + extra):
        value: dict[str, Any] = {
            "transfer": f"bank-a/{k}",
            "from": "acct:bank-a:0",
            "to": "acct:bank-b:0",
            "to_bank": "bank-b",
            "amount": 10,
        }
        history.append(k, "client-bank-a", OpType.INVOKE, "transfer", value)
        history.append(k, "client-bank-a", OpType.OK, "transfer", value)
    history.append(99, "checker", OpType.OK, "read", read)
    return history


def _good_transfers() -> dict[str, Any]:
    return {
        "balances": {"acct:bank-a:0": 80, "acct:bank-b:0": 120},
        "lowest": {"acct:bank-a:0": 0, "acct:bank-b:0": 0},
        "debits": {"bank-a/0": 1, "bank-a/1": 1},
        "credits": {"bank-a/0": 1, "bank-a/1": 1},
        "rejected": {},
        "deposited": 200,
    }


def _check(checker: Any, history: History) -> list[Violation]:
    found: list[Violation] = checker(history, {})
    return found


@pytest.mark.parametrize(
    ("checker", "spoil", "invariant"),
    [
        (
            transfers.check_no_double_apply,
            {"credits": {"bank-a/0": 2, "bank-a/1": 1}},
            "no_double_apply",
        ),
        (transfers.check_no_double_apply, {"rejected": {"bank-a/0": 1}}, "no_double_apply"),
        (
            transfers.check_conservation,
            {"balances": {"acct:bank-a:0": 80, "acct:bank-b:0": 130}},
            "conservation",
        ),
        (transfers.check_transfer_completes, {"credits": {"bank-a/0": 1}}, "transfer_completes"),
        (
            transfers.check_no_overdraft,
            {"lowest": {"acct:bank-a:0": -5, "acct:bank-b:0": 0}},
            "no_overdraft",
        ),
        (
            transfers.check_no_phantom,
            {"debits": {"bank-a/0": 1, "bank-a/1": 1, "bank-z/9": 1}},
            "no_phantom",
        ),
    ],
)
def test_transfer_checkers_catch_a_bad_history(
    checker: Any, spoil: dict[str, Any], invariant: str
) -> None:
    assert _check(checker, _transfer_history(_good_transfers())) == []
    bad = _transfer_history({**_good_transfers(), **spoil})
    found = _check(checker, bad)
    assert found
    assert all(v.invariant == invariant for v in found)
    assert found[0].witness[-1].f == "read"


def test_a_double_credit_names_the_transfer_in_its_witness() -> None:
    bad = _transfer_history({**_good_transfers(), "credits": {"bank-a/0": 2, "bank-a/1": 1}})
    (violation,) = transfers.check_no_double_apply(bad, {})
    values: list[Any] = [op.value for op in violation.witness if op.f == "transfer"]
    assert values
    assert all(v["transfer"] == "bank-a/0" for v in values)


def _pipeline_history(read: dict[str, Any], *, poison: int | None = None) -> History:
    history = History()
    for n in range(3):
        job = {"n": n, "poison": n == poison}
        history.append(n, "producer", OpType.INVOKE, "publish", job)
        history.append(n, "producer", OpType.OK, "publish", {**job, "id": f"m{n}"})
    history.append(99, "checker", OpType.OK, "read", read)
    return history


@pytest.mark.parametrize(
    ("checker", "read", "poison", "invariant"),
    [
        (
            pipeline.check_no_lost_message,
            {"processed": [0, 2], "dead_lettered": [], "in_flight": 0},
            None,
            "no_lost_message",
        ),
        (
            pipeline.check_accounting,
            {"processed": [0, 1, 2, 7], "dead_lettered": [], "in_flight": 0},
            None,
            "accounting",
        ),
        (
            pipeline.check_accounting,
            {"processed": [0, 1], "dead_lettered": [], "in_flight": 0},
            None,
            "accounting",
        ),
        (
            pipeline.check_accounting,
            {"processed": [0, 1, 2], "dead_lettered": [], "in_flight": 3},
            None,
            "accounting",
        ),
        (
            pipeline.check_poison,
            {"processed": [0, 1, 2], "dead_lettered": [], "in_flight": 0},
            1,
            "poison_dead_lettered",
        ),
        (
            pipeline.check_poison,
            {"processed": [0, 2], "dead_lettered": [], "in_flight": 0},
            1,
            "poison_dead_lettered",
        ),
    ],
)
def test_pipeline_checkers_catch_a_bad_history(
    checker: Any, read: dict[str, Any], poison: int | None, invariant: str
) -> None:
    good = {"processed": [0, 2], "dead_lettered": [1], "in_flight": 0}
    assert checker(_pipeline_history(good, poison=1), {}) == []
    found = checker(_pipeline_history(read, poison=poison), {})
    assert found
    assert all(v.invariant == invariant for v in found)


def _replica_history(values: dict[str, Any], consistent: bool = True) -> History:
    history = History()
    for i, system in enumerate(("east", "west")):
        write = {"system": system, "key": "lww.a", "value": f"{system}-{i}"}
        history.append(i, f"client-{system}", OpType.INVOKE, "write", write)
        history.append(i, f"client-{system}", OpType.OK, "write", write)
    history.append(
        9,
        "checker",
        OpType.OK,
        "read",
        {"values": {"lww.a": values}, "consistent": {"lww.a": consistent}},
    )
    return history


def test_replica_checkers_catch_divergence_and_invented_values() -> None:
    agreed = {
        "east": "east-0",
        "west": "west-1",
        "hub-1": "west-1",
        "hub-2": "west-1",
        "archive": "west-1",
    }
    assert replicas.check_converged(_replica_history(agreed), {}) == []
    assert replicas.check_no_invented_value(_replica_history(agreed), {}) == []
    diverged = {**agreed, "hub-2": "east-0"}
    (violation,) = replicas.check_converged(_replica_history(diverged), {})
    assert violation.invariant == "converged"
    assert "hub-2" in violation.message
    assert [op.f for op in violation.witness] == ["write", "write", "read"]
    assert replicas.check_converged(_replica_history(agreed, consistent=False), {})
    invented = {**agreed, "archive": ["west-1", "north-7"]}
    (violation,) = replicas.check_no_invented_value(_replica_history(invented), {})
    assert "north-7" in violation.message


def test_a_checker_that_raises_is_reported_not_hidden() -> None:
    def broken(history: History, facts: Any) -> list[Violation]:
        raise KeyError("balances")

    (violation,) = run_checkers([FunctionChecker("broken", broken)], History(), {})
    assert violation.invariant == "broken"
    assert "KeyError" in violation.message


def test_witnesses_shrink_to_the_operations_the_checker_needs() -> None:
    bad = _transfer_history(
        {
            **_good_transfers(),
            "credits": {"bank-a/0": 2, "bank-a/1": 1, "bank-a/2": 1, "bank-a/3": 1},
            "debits": {"bank-a/0": 1, "bank-a/1": 1, "bank-a/2": 1, "bank-a/3": 1},
        },
        extra=2,
    )
    padded = Violation("no_double_apply", "too many credits", tuple(bad))
    checker = FunctionChecker("no_double_apply", transfers.check_no_double_apply)
    smaller = shrink_witness(padded, checker, bad, {})
    assert [op.f for op in smaller.witness] == ["read"]  # the read alone shows a double credit
    ops = list(bad)
    assert minimise_witness(ops, lambda chosen: ops[3] in chosen) == (ops[3],)


def test_replica_checkers_catch_a_failed_write_that_is_visible_and_a_log_mismatch() -> None:
    agreed = {
        "east": "east-0",
        "west": "west-1",
        "hub-1": "west-1",
        "hub-2": "west-1",
        "archive": "west-1",
    }
    history = _replica_history(agreed)
    failed = {"system": "east", "key": "lww.a", "value": "east-2"}
    history.append(5, "client-east", OpType.INVOKE, "write", failed)
    history.append(5, "client-east", OpType.FAIL, "write", failed, "StoreUnavailableError: down")
    assert replicas.check_no_invented_value(history, {}) == []  # nobody holds east-2
    history = _replica_history({**agreed, "east": "east-2"})
    history.append(5, "client-east", OpType.INVOKE, "write", failed)
    history.append(5, "client-east", OpType.FAIL, "write", failed, "StoreUnavailableError: down")
    (violation,) = replicas.check_no_invented_value(history, {})
    assert "east-2" in violation.message
    assert "whose write failed" in violation.message
    assert violation.witness[0].type is OpType.FAIL
    assert replicas.check_matches_log(_replica_history(agreed), {}) == []
    audited = History()
    audited.append(
        9, "checker", OpType.OK, "read", {"values": {}, "consistent": {}, "audit": ["hub-1: x"]}
    )
    (violation,) = replicas.check_matches_log(audited, {})
    assert violation.invariant == "matches_log"
    assert "hub-1: x" in violation.message
