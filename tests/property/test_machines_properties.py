"""Random trigger sequences on a state-machine aggregate, saved at random points:
the persisted-then-reloaded state always equals the in-memory state, and an illegal trigger
never changes the stored stream (nor the aggregate)."""

from __future__ import annotations

import asyncio
import enum
from typing import Any

from eventsourcing.domain import event
from hypothesis import given, settings
from hypothesis import strategies as st

from collaborative_blocks.core.aggregates import Repository
from collaborative_blocks.core.machines import StateMachineAggregate, transition
from collaborative_blocks.errors import CommandArgumentsError, IllegalTransitionError
from collaborative_blocks.stores.memory import MemoryEventStore


class Phase(enum.Enum):
    DRAFT = "draft"
    SUBMITTED = "submitted"
    APPROVED = "approved"
    REJECTED = "rejected"
    ARCHIVED = "archived"


class Claim(StateMachineAggregate[Phase]):
    initial = Phase.DRAFT

    @event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.amount = 0
        self.notes: list[str] = []
        self.reviews = 0

    def positive(self, amount: int) -> bool:
        return amount > 0

    def has_amount(self) -> bool:
        return self.amount > 0

    @transition(source=Phase.DRAFT, dest=None, conditions=[positive])
    def set_amount(self, amount: int) -> None:
        self.amount = amount

    @transition(source=Phase.DRAFT, dest=Phase.SUBMITTED, conditions=[has_amount])
    def submit(self) -> None:
        pass

    @transition(source=Phase.SUBMITTED, dest=Phase.APPROVED, unless=["too_large"])
    @transition(source=Phase.SUBMITTED, dest=Phase.REJECTED)
    def review(self, limit: int) -> None:
        self.reviews += 1

    def too_large(self, limit: int) -> bool:
        return self.amount > limit

    @transition(source=[Phase.REJECTED], dest=Phase.DRAFT)
    def reopen(self, note: str) -> None:
        self.notes.append(note)

    @transition(source="*", dest=None)
    def annotate(self, note: str) -> None:
        self.notes.append(note)

    @transition(source=[Phase.APPROVED, Phase.REJECTED], dest=Phase.ARCHIVED)
    def archive(self) -> None:
        pass


small_ints = st.integers(min_value=-5, max_value=50)
notes = st.text(max_size=5)
commands = st.one_of(
    st.tuples(st.just("set_amount"), st.fixed_dictionaries({"amount": small_ints})),
    st.tuples(st.just("submit"), st.just({})),
    st.tuples(st.just("review"), st.fixed_dictionaries({"limit": small_ints})),
    st.tuples(st.just("reopen"), st.fixed_dictionaries({"note": notes})),
    st.tuples(st.just("annotate"), st.fixed_dictionaries({"note": notes})),
    st.tuples(st.just("archive"), st.just({})),
    # Names and arguments the machine does not know: always refused.
    st.tuples(st.just("approve"), st.just({})),
    st.tuples(st.just("submit"), st.fixed_dictionaries({"amount": small_ints})),
)
steps = st.lists(st.tuples(commands, st.booleans()), max_size=40)


def observable(claim: Claim) -> dict[str, Any]:
    return {
        "state": claim.state,
        "version": claim.version,
        "amount": claim.amount,
        "notes": list(claim.notes),
        "reviews": claim.reviews,
        "owner": claim.owner,
    }


async def run(script: list[tuple[tuple[str, dict[str, Any]], bool]], interval: int) -> None:
    store = MemoryEventStore()
    repo = Repository(store, snapshot_interval=interval)
    claim = Claim(owner="ann")
    await repo.save(claim)
    stream = str(claim.id)
    accepted: list[str] = []
    for (trigger, payload), save_now in script:
        before = observable(claim)
        pending_before = list(claim.pending_events)
        stored_before = await store.read(stream)
        allowed = claim.may(trigger, **payload)
        try:
            claim.fire(trigger, **payload)
        except (IllegalTransitionError, CommandArgumentsError):
            assert not allowed
            assert observable(claim) == before
            assert claim.pending_events == pending_before
            assert await store.read(stream) == stored_before
        else:
            assert allowed
            assert claim.version == before["version"] + 1
            accepted.append(type(claim.pending_events[-1]).__name__)
        if save_now:
            await repo.save(claim)
            loaded = await repo.get(claim.id, Claim)
            assert observable(loaded) == observable(claim)
    await repo.save(claim)
    stored = await store.read(stream)
    # The stream holds exactly the accepted transitions: refusals left no trace.
    assert [e.topic.rsplit(".", 1)[-1] for e in stored] == ["Opened", *accepted]
    loaded = await repo.get(claim.id, Claim)
    assert observable(loaded) == observable(claim)
    # Replaying every event, ignoring snapshots, gives the same state as well.
    replayed = Repository(store)._replay(None, stored)
    assert isinstance(replayed, Claim)
    assert observable(replayed) == observable(claim)


@settings(max_examples=150, deadline=None)
@given(script=steps, interval=st.integers(min_value=1, max_value=7))
def test_reloaded_state_equals_in_memory_state_and_refusals_store_nothing(
    script: list[tuple[tuple[str, dict[str, Any]], bool]], interval: int
) -> None:
    asyncio.run(run(script, interval))
