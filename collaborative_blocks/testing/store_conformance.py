"""The event store conformance suite: what every :class:`EventStore` must do, as tests.

Subclass :class:`StoreConformance` in a test module, tell it how to open your store, and
pytest runs every test below against it (the class name of the subclass must start with
``Test`` so pytest collects it)::

    import pytest
    from collaborative_blocks.stores import EventStore
    from collaborative_blocks.stores.sqlite import open_sqlite_store
    from collaborative_blocks.testing import StoreConformance

    class TestMySQLiteStore(StoreConformance):
        durable = True  # reopening sees what was written before

        @pytest.fixture(autouse=True)
        def _database(self, tmp_path):
            self.url = f"sqlite:///{tmp_path / 'events.db'}"

        async def open_store(self) -> EventStore:
            return await open_sqlite_store(self.url)

``open_store`` is called once per test for a fresh, empty store, and again after that store
was closed when the test checks durability (only if ``durable`` is true): the second call must
open the same storage. Per-test setup (a temporary file or database) goes into an autouse
fixture on the subclass, as above; it runs before ``open_store``.

Class attributes tune the suite to what a store promises:

- ``durable``: committed data survives ``close()`` and a new ``open_store()``.
- ``dense_positions``: committed positions are exactly ``1..max_position`` (no gaps even
  after rejected appends). A store whose positions come from a non-transactional sequence
  may leave gaps; it sets this to ``False`` and the suite then checks only that positions
  strictly increase and that readers never skip a committed one.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, ClassVar

import pytest

from collaborative_blocks.errors import (
    ConcurrencyError,
    DuplicateMessageError,
    EventSerializationError,
    StoreClosedError,
    TrackingConflictError,
)
from collaborative_blocks.stores.base import (
    AppendRequest,
    EventStore,
    NewEvent,
    Snapshot,
    StoredEvent,
    Tracking,
)

__all__ = ["StoreConformance"]

# A safety net so that a store which fails to wake a subscriber fails the test instead of
# hanging the run; no test asserts anything about how long an operation takes.
HANG_GUARD_SECONDS = 30.0


def _events(n: int, topic: str = "Happened", start: int = 0) -> list[NewEvent]:
    return [NewEvent(topic, f"state-{start + i}".encode()) for i in range(n)]


async def _take(iterator: AsyncIterator[StoredEvent], n: int) -> list[StoredEvent]:
    """The next ``n`` events of a subscription (fails instead of hanging forever)."""

    async def take() -> list[StoredEvent]:
        out: list[StoredEvent] = []
        while len(out) < n:
            out.append(await anext(iterator))
        return out

    return await asyncio.wait_for(take(), HANG_GUARD_SECONDS)


async def _close_iterator(iterator: AsyncIterator[StoredEvent]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


def _bad_requests() -> list[tuple[str, Callable[[], AppendRequest]]]:
    """Requests the store must refuse with EventSerializationError (built lazily)."""
    good = [NewEvent("T", b"x")]
    return [
        ("empty stream id", lambda: AppendRequest("", good)),
        ("stream id not a string", lambda: AppendRequest(42, good)),  # type: ignore[arg-type]
        ("stream id too long", lambda: AppendRequest("s" * 256, good)),
        ("state is str", lambda: AppendRequest("s", [NewEvent("T", "text")])),  # type: ignore[arg-type]
        ("state is None", lambda: AppendRequest("s", [NewEvent("T", None)])),  # type: ignore[arg-type]
        ("empty topic", lambda: AppendRequest("s", [NewEvent("", b"x")])),
        ("topic too long", lambda: AppendRequest("s", [NewEvent("t" * 256, b"x")])),
        ("not a NewEvent", lambda: AppendRequest("s", [("T", b"x")])),  # type: ignore[list-item]
        ("negative expected_version", lambda: AppendRequest("s", good, expected_version=-1)),
        ("expected_version not int", lambda: AppendRequest("s", good, expected_version="1")),  # type: ignore[arg-type]
        ("negative first_version", lambda: AppendRequest("s", good, first_version=-1)),
        (
            "both expected_version and first_version",
            lambda: AppendRequest("s", good, expected_version=0, first_version=1),
        ),
    ]


class StoreConformance(abc.ABC):
    """Abstract test suite for :class:`~collaborative_blocks.stores.base.EventStore`.

    Implement :meth:`open_store`; set ``durable``/``dense_positions`` to what the store
    promises. Every public method of the interface is covered: append and append_many
    (positions, versions, optimistic concurrency, ``first_version``, atomicity, bad input),
    read, read_all, max_position, stream_version, streams, stats, subscribe (catch-up, live,
    filters, concurrent commits), tracking (consumer positions and the inbox, atomic with the
    events), snapshots and close.
    """

    durable: ClassVar[bool] = False
    dense_positions: ClassVar[bool] = True

    @abc.abstractmethod
    async def open_store(self) -> EventStore:
        """Open the store under test: empty on the first call of a test; the same storage
        again on later calls (after the previous store was closed) when ``durable``."""

    # -- fixtures and helpers ----------------------------------------------------------------

    @pytest.fixture
    async def store(self) -> AsyncIterator[EventStore]:
        store = await self.open_store()
        try:
            yield store
        finally:
            await store.close()

    async def reopen(self, store: EventStore) -> EventStore:
        """Close ``store`` and open its storage again (durable stores only)."""
        await store.close()
        return await self.open_store()

    def require_durable(self) -> None:
        if not self.durable:
            pytest.skip(f"{type(self).__name__} is not durable (durable = False)")

    async def assert_log(self, store: EventStore, expected: Sequence[tuple[str, int]]) -> None:
        """The whole log holds exactly ``expected`` (stream, version) pairs, in order."""
        log = await store.read_all()
        assert [(e.stream, e.version) for e in log] == list(expected)
        positions = [e.position for e in log]
        assert positions == sorted(set(positions)), "positions must strictly increase"
        if self.dense_positions:
            assert positions == list(range(1, len(log) + 1))
        assert await store.max_position() == (positions[-1] if positions else 0)

    # -- append ------------------------------------------------------------------------------

    async def test_append_to_new_stream(self, store: EventStore) -> None:
        positions = await store.append("acc-1", _events(3), expected_version=0)
        assert len(positions) == 3
        assert positions == sorted(positions)
        if self.dense_positions:
            assert positions == [1, 2, 3]
        events = await store.read("acc-1")
        assert [e.version for e in events] == [1, 2, 3]
        assert [e.position for e in events] == positions
        assert [e.state for e in events] == [b"state-0", b"state-1", b"state-2"]
        assert all(e.stream == "acc-1" and e.topic == "Happened" for e in events)
        assert await store.stream_version("acc-1") == 3
        assert await store.max_position() == positions[-1]

    async def test_stored_event_has_eventsourcing_names(self, store: EventStore) -> None:
        [position] = await store.append("acc-1", [NewEvent("T", b"s")])
        [event] = await store.read("acc-1")
        assert event.originator_id == "acc-1"
        assert event.originator_version == 1
        assert event.id == position

    async def test_versions_continue_and_positions_increase(self, store: EventStore) -> None:
        first = await store.append("a", _events(2), expected_version=0)
        other = await store.append("b", _events(1), expected_version=0)
        second = await store.append("a", _events(2, start=2), expected_version=2)
        assert first[-1] < other[0] < second[0]
        assert [e.version for e in await store.read("a")] == [1, 2, 3, 4]
        await self.assert_log(store, [("a", 1), ("a", 2), ("b", 1), ("a", 3), ("a", 4)])

    async def test_expected_version_none_does_not_check(self, store: EventStore) -> None:
        await store.append("a", _events(1), expected_version=None)
        await store.append("a", _events(1), expected_version=None)
        await store.append("a", _events(1))
        assert await store.stream_version("a") == 3

    async def test_expected_version_zero_requires_a_new_stream(self, store: EventStore) -> None:
        await store.append("a", _events(1), expected_version=0)
        with pytest.raises(ConcurrencyError) as caught:
            await store.append("a", _events(1), expected_version=0)
        assert (caught.value.stream, caught.value.expected, caught.value.actual) == ("a", 0, 1)
        assert "a" in str(caught.value)
        await self.assert_log(store, [("a", 1)])

    @pytest.mark.parametrize("expected", [0, 1, 3, 7])
    async def test_wrong_expected_version_writes_nothing(
        self, store: EventStore, expected: int
    ) -> None:
        await store.append("a", _events(2), expected_version=0)
        with pytest.raises(ConcurrencyError) as caught:
            await store.append("a", _events(5), expected_version=expected)
        assert caught.value.expected == expected
        assert caught.value.actual == 2
        await self.assert_log(store, [("a", 1), ("a", 2)])
        # The store stays usable and the right version still works.
        await store.append("a", _events(1), expected_version=2)
        assert await store.stream_version("a") == 3

    async def test_empty_append_checks_version_and_writes_nothing(self, store: EventStore) -> None:
        assert await store.append("a", [], expected_version=0) == []
        assert await store.stream_version("a") == 0
        await store.append("a", _events(1))
        assert await store.append("a", [], expected_version=1) == []
        with pytest.raises(ConcurrencyError):
            await store.append("a", [], expected_version=0)
        await self.assert_log(store, [("a", 1)])
        assert [s.stream for s in await store.streams()] == ["a"]

    async def test_state_bytes_round_trip(self, store: EventStore) -> None:
        states = [b"", b"\x00\x01\xff" * 100, bytearray(b"array"), memoryview(b"view")]
        await store.append("s", [NewEvent("T", s) for s in states])  # type: ignore[arg-type]
        read = await store.read("s")
        assert [e.state for e in read] == [b"", b"\x00\x01\xff" * 100, b"array", b"view"]
        assert all(type(e.state) is bytes for e in read)
        assert all(type(e.state) is bytes for e in await store.read_all())

    async def test_unicode_and_long_names(self, store: EventStore) -> None:
        stream = "konto-ü-日本-" + "x" * 200
        topic = "módulo:Évènement" + "y" * 200
        await store.append(stream, [NewEvent(topic, b"1")])
        [event] = await store.read(stream)
        assert (event.stream, event.topic) == (stream, topic)
        assert [s.stream for s in await store.streams()] == [stream]

    async def test_large_batch_in_one_append(self, store: EventStore) -> None:
        positions = await store.append("big", _events(1000), expected_version=0)
        assert len(positions) == 1000
        assert positions == sorted(set(positions))
        events = await store.read("big")
        assert [e.version for e in events] == list(range(1, 1001))

    # -- first_version -----------------------------------------------------------------------

    async def test_first_version_numbers_events(self, store: EventStore) -> None:
        await store.append_many([AppendRequest("agg", _events(3), first_version=0)])
        assert [e.version for e in await store.read("agg")] == [0, 1, 2]
        assert await store.stream_version("agg") == 2
        await store.append_many([AppendRequest("agg", _events(2), first_version=3)])
        assert [e.version for e in await store.read("agg")] == [0, 1, 2, 3, 4]
        # A later append without first_version continues after the last version.
        await store.append("agg", _events(1), expected_version=4)
        assert await store.stream_version("agg") == 5

    @pytest.mark.parametrize("first_version", [0, 1, 2])
    async def test_first_version_at_or_below_current_conflicts(
        self, store: EventStore, first_version: int
    ) -> None:
        await store.append_many([AppendRequest("agg", _events(3), first_version=0)])
        with pytest.raises(ConcurrencyError) as raised:
            await store.append_many([AppendRequest("agg", _events(1), first_version=first_version)])
        assert raised.value.first_version == first_version
        assert raised.value.actual == 2
        assert f"numbered from version {first_version}" in str(raised.value)
        assert [e.version for e in await store.read("agg")] == [0, 1, 2]
        await self.assert_log(store, [("agg", 0), ("agg", 1), ("agg", 2)])

    async def test_first_version_on_stream_numbered_from_one(self, store: EventStore) -> None:
        await store.append("s", _events(2))
        with pytest.raises(ConcurrencyError):
            await store.append_many([AppendRequest("s", _events(1), first_version=2)])
        await store.append_many([AppendRequest("s", _events(1), first_version=3)])
        assert [e.version for e in await store.read("s")] == [1, 2, 3]

    # -- append_many: atomic across streams --------------------------------------------------

    async def test_append_many_returns_positions_per_request(self, store: EventStore) -> None:
        result = await store.append_many(
            [
                AppendRequest("a", _events(2), expected_version=0),
                AppendRequest("b", [], expected_version=0),
                AppendRequest("c", _events(1), expected_version=0),
            ]
        )
        assert [len(r) for r in result] == [2, 0, 1]
        flat = [p for r in result for p in r]
        assert flat == sorted(set(flat))
        assert [e.position for e in await store.read("a")] == result[0]
        assert [e.position for e in await store.read("c")] == result[2]
        await self.assert_log(store, [("a", 1), ("a", 2), ("c", 1)])

    async def test_append_many_with_no_requests(self, store: EventStore) -> None:
        assert await store.append_many([]) == []
        assert await store.max_position() == 0

    async def test_append_many_same_stream_twice_chains_versions(self, store: EventStore) -> None:
        result = await store.append_many(
            [
                AppendRequest("a", _events(2), expected_version=0),
                AppendRequest("a", _events(1, start=2), expected_version=2),
            ]
        )
        assert [len(r) for r in result] == [2, 1]
        assert [e.version for e in await store.read("a")] == [1, 2, 3]
        assert [e.state for e in await store.read("a")] == [b"state-0", b"state-1", b"state-2"]

    async def test_append_many_same_stream_twice_checks_chained_version(
        self, store: EventStore
    ) -> None:
        with pytest.raises(ConcurrencyError):
            await store.append_many(
                [
                    AppendRequest("a", _events(2), expected_version=0),
                    AppendRequest("a", _events(1), expected_version=0),
                ]
            )
        await self.assert_log(store, [])

    @pytest.mark.parametrize("bad_index", [0, 1, 2])
    async def test_append_many_conflict_anywhere_writes_nothing(
        self, store: EventStore, bad_index: int
    ) -> None:
        await store.append("b", _events(1))
        requests = [
            AppendRequest("a", _events(2), expected_version=0),
            AppendRequest("b", _events(2), expected_version=1),
            AppendRequest("c", _events(2), expected_version=0),
        ]
        stream = requests[bad_index].stream
        requests[bad_index] = AppendRequest(stream, _events(2), expected_version=5)
        with pytest.raises(ConcurrencyError) as caught:
            await store.append_many(requests)
        assert caught.value.stream == stream
        await self.assert_log(store, [("b", 1)])
        assert await store.stream_version("a") == 0
        assert await store.stream_version("c") == 0

    @pytest.mark.parametrize("case", [name for name, _ in _bad_requests()])
    async def test_bad_input_is_refused_and_store_stays_usable(
        self, store: EventStore, case: str
    ) -> None:
        await store.append("kept", _events(1))
        make = dict(_bad_requests())[case]
        with pytest.raises(EventSerializationError):
            await store.append_many(
                [AppendRequest("other", _events(1), expected_version=0), make()]
            )
        with pytest.raises(EventSerializationError):
            await store.append_many([make()])
        await self.assert_log(store, [("kept", 1)])
        await store.append("kept", _events(1), expected_version=1)
        await store.append("other", _events(1), expected_version=0)
        assert await store.stream_version("kept") == 2

    async def test_bad_input_through_append(self, store: EventStore) -> None:
        with pytest.raises(EventSerializationError, match="state must be bytes"):
            await store.append("s", [NewEvent("T", {"a": 1})])  # type: ignore[arg-type]
        with pytest.raises(EventSerializationError):
            await store.append("", _events(1))
        assert await store.max_position() == 0
        assert await store.append("s", _events(1)) != []

    async def test_concurrent_appends_with_same_expected_version(self, store: EventStore) -> None:
        await store.append("hot", _events(1))
        results = await asyncio.gather(
            *(store.append("hot", _events(1, start=i), expected_version=1) for i in range(20)),
            return_exceptions=True,
        )
        winners = [r for r in results if isinstance(r, list)]
        losers = [r for r in results if isinstance(r, BaseException)]
        assert len(winners) == 1
        assert len(losers) == 19
        assert all(isinstance(r, ConcurrencyError) for r in losers)
        assert [e.version for e in await store.read("hot")] == [1, 2]

    async def test_concurrent_callers_get_their_own_results(self, store: EventStore) -> None:
        async def caller(i: int) -> list[int]:
            return await store.append(f"s-{i}", _events(i % 3 + 1), expected_version=0)

        async def bad(i: int) -> list[int]:
            return await store.append(f"s-{i}", _events(1), expected_version=9)

        async def invalid(i: int) -> list[int]:
            return await store.append(f"s-{i}", [NewEvent("T", "str")])  # type: ignore[arg-type]

        calls = [
            bad(i) if i % 5 == 0 else invalid(i) if i % 7 == 0 else caller(i) for i in range(40)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        expected_log: list[tuple[str, int]] = []
        for i, result in enumerate(results):
            if i % 5 == 0:
                assert isinstance(result, ConcurrencyError)
            elif i % 7 == 0:
                assert isinstance(result, EventSerializationError)
            else:
                assert isinstance(result, list)
                events = await store.read(f"s-{i}")
                assert [e.position for e in events] == result
                assert [e.version for e in events] == list(range(1, i % 3 + 2))
                expected_log.extend((f"s-{i}", e.version) for e in events)
        log = await store.read_all()
        assert sorted((e.stream, e.version) for e in log) == sorted(expected_log)
        await self.assert_log(store, [(e.stream, e.version) for e in log])

    # -- read --------------------------------------------------------------------------------

    async def test_read_ranges(self, store: EventStore) -> None:
        await store.append("a", _events(10))
        await store.append("b", _events(2))

        async def versions(**kwargs: Any) -> list[int]:
            return [e.version for e in await store.read("a", **kwargs)]

        assert await versions() == list(range(1, 11))
        assert await versions(from_version=4) == list(range(4, 11))
        assert await versions(from_version=4, to_version=6) == [4, 5, 6]
        assert await versions(to_version=2) == [1, 2]
        assert await versions(limit=3) == [1, 2, 3]
        assert await versions(from_version=8, limit=5) == [8, 9, 10]
        assert await versions(backwards=True) == list(range(10, 0, -1))
        assert await versions(backwards=True, limit=3) == [10, 9, 8]
        assert await versions(backwards=True, from_version=5, limit=2) == [10, 9]
        assert await versions(backwards=True, to_version=5, limit=2) == [5, 4]
        assert await versions(backwards=True, from_version=3, to_version=5) == [5, 4, 3]
        assert await versions(from_version=11) == []
        assert await versions(from_version=6, to_version=5) == []
        assert await versions(limit=0) == []
        assert await store.read("missing") == []
        assert await store.read("") == []

    async def test_read_returns_only_that_stream(self, store: EventStore) -> None:
        await store.append("a", _events(1))
        await store.append("ab", _events(1))
        await store.append("a%", _events(1))
        assert {e.stream for e in await store.read("a")} == {"a"}
        assert {e.stream for e in await store.read("a%")} == {"a%"}

    # -- read_all ----------------------------------------------------------------------------

    async def test_read_all_ranges(self, store: EventStore) -> None:
        positions: list[int] = []
        for i in range(10):
            positions += await store.append(f"s{i % 3}", [NewEvent(f"T{i % 2}", b"%d" % i)])

        async def got(**kwargs: Any) -> list[int]:
            return [e.position for e in await store.read_all(**kwargs)]

        p = positions
        assert await got() == p
        assert await got(from_position=0) == p
        assert await got(from_position=p[3]) == p[3:]
        assert await got(from_position=p[3], to_position=p[5]) == p[3:6]
        assert await got(to_position=p[1]) == p[:2]
        assert await got(limit=4) == p[:4]
        assert await got(from_position=p[8], limit=4) == p[8:]
        assert await got(from_position=p[-1] + 1) == []
        assert await got(from_position=p[5], to_position=p[4]) == []
        assert await got(limit=0) == []
        assert await got(topics=["T1"]) == p[1::2]
        assert await got(topics=["T0", "T1"]) == p
        assert await got(topics=["T0"], limit=2) == p[0:4:2]
        assert await got(topics=["T0"], from_position=p[1], to_position=p[6]) == p[2:7:2]
        assert await got(topics=["nope"]) == []
        states = [e.state for e in await store.read_all()]
        assert states == [b"%d" % i for i in range(10)]

    async def test_read_all_empty_store(self, store: EventStore) -> None:
        assert await store.read_all() == []
        assert await store.max_position() == 0

    # -- stream_version, streams, stats ------------------------------------------------------

    async def test_stream_version(self, store: EventStore) -> None:
        assert await store.stream_version("a") == 0
        await store.append("a", _events(4))
        assert await store.stream_version("a") == 4
        assert await store.stream_version("b") == 0

    async def test_streams(self, store: EventStore) -> None:
        pa = await store.append("order-2", _events(2))
        pb = await store.append("acc-1", _events(1))
        pc = await store.append("order-1", _events(3))
        pa += await store.append("order-2", _events(1))
        infos = await store.streams()
        assert [i.stream for i in infos] == ["acc-1", "order-1", "order-2"]
        by_name = {i.stream: i for i in infos}
        assert (by_name["order-2"].version, by_name["order-2"].first_position) == (3, pa[0])
        assert by_name["order-2"].last_position == pa[-1]
        assert (by_name["acc-1"].first_position, by_name["acc-1"].last_position) == (pb[0],) * 2
        assert (by_name["order-1"].version, by_name["order-1"].last_position) == (3, pc[-1])
        assert [i.stream for i in await store.streams(prefix="order-")] == ["order-1", "order-2"]
        assert [i.stream for i in await store.streams(limit=2)] == ["acc-1", "order-1"]
        assert [i.stream for i in await store.streams(prefix="order-", limit=1)] == ["order-1"]
        assert await store.streams(prefix="zzz") == []
        # A prefix is literal text, not a pattern.
        await store.append("a_b", _events(1))
        await store.append("axb", _events(1))
        assert [i.stream for i in await store.streams(prefix="a_")] == ["a_b"]

    async def test_stats(self, store: EventStore) -> None:
        empty = await store.stats()
        assert (empty.events, empty.streams, empty.max_position) == (0, 0, 0)
        assert empty.topics == {}
        assert empty.consumers == {}
        await store.append("a", [NewEvent("X", b""), NewEvent("Y", b""), NewEvent("X", b"")])
        positions = await store.append(
            "b", [NewEvent("X", b"")], tracking=Tracking("proj", position=2)
        )
        await store.append("c", [], tracking=Tracking("inbox-only", message_id="m1"))
        stats = await store.stats()
        assert (stats.events, stats.streams, stats.max_position) == (4, 2, positions[-1])
        assert stats.topics == {"X": 3, "Y": 1}
        assert stats.consumers == {"proj": 2, "inbox-only": None}

    # -- tracking ----------------------------------------------------------------------------

    async def test_consumer_position_recorded_with_events(self, store: EventStore) -> None:
        assert await store.consumer_position("proj") is None
        await store.append("a", _events(1), tracking=Tracking("proj", position=1))
        assert await store.consumer_position("proj") == 1
        await store.append("a", _events(1), tracking=Tracking("proj", position=5))
        assert await store.consumer_position("proj") == 5
        assert await store.consumer_position("other") is None

    async def test_tracking_without_events(self, store: EventStore) -> None:
        assert await store.append_many([], tracking=Tracking("proj", position=3)) == []
        assert await store.consumer_position("proj") == 3
        assert await store.append("a", [], tracking=Tracking("proj", position=4)) == []
        assert await store.consumer_position("proj") == 4
        assert await store.max_position() == 0

    @pytest.mark.parametrize("position", [0, 4, 5])
    async def test_consumer_position_must_increase(self, store: EventStore, position: int) -> None:
        await store.append("a", _events(1), tracking=Tracking("proj", position=5))
        with pytest.raises(TrackingConflictError) as caught:
            await store.append_many(
                [AppendRequest("a", _events(1)), AppendRequest("b", _events(2))],
                tracking=Tracking("proj", position=position),
            )
        assert (caught.value.consumer, caught.value.recorded) == ("proj", 5)
        assert caught.value.position == position
        await self.assert_log(store, [("a", 1)])
        assert await store.consumer_position("proj") == 5
        # Positions are per consumer.
        await store.append("a", _events(1), tracking=Tracking("other", position=position))
        assert await store.consumer_position("other") == position

    async def test_inbox_holds_a_message_once(self, store: EventStore) -> None:
        assert not await store.has_processed("worker", "msg-1")
        await store.append("a", _events(1), tracking=Tracking("worker", message_id="msg-1"))
        assert await store.has_processed("worker", "msg-1")
        assert not await store.has_processed("worker", "msg-2")
        assert not await store.has_processed("someone-else", "msg-1")
        with pytest.raises(DuplicateMessageError) as caught:
            await store.append("b", _events(3), tracking=Tracking("worker", message_id="msg-1"))
        assert (caught.value.consumer, caught.value.message_id) == ("worker", "msg-1")
        await self.assert_log(store, [("a", 1)])
        # Inboxes are per consumer.
        await store.append("b", _events(1), tracking=Tracking("someone-else", message_id="msg-1"))
        assert await store.has_processed("someone-else", "msg-1")

    async def test_tracking_position_and_message_together(self, store: EventStore) -> None:
        await store.append("a", _events(1), tracking=Tracking("c", position=3, message_id="m1"))
        assert await store.consumer_position("c") == 3
        assert await store.has_processed("c", "m1")
        # A fresh message with a stale position: refused, the message is not recorded.
        with pytest.raises(TrackingConflictError):
            await store.append("a", _events(1), tracking=Tracking("c", position=3, message_id="m2"))
        assert not await store.has_processed("c", "m2")
        # A duplicate message with a fresh position: refused, the position does not move.
        with pytest.raises(DuplicateMessageError):
            await store.append("a", _events(1), tracking=Tracking("c", position=9, message_id="m1"))
        assert await store.consumer_position("c") == 3
        await self.assert_log(store, [("a", 1)])

    async def test_rejected_append_records_no_tracking(self, store: EventStore) -> None:
        await store.append("a", _events(1))
        with pytest.raises(ConcurrencyError):
            await store.append(
                "a",
                _events(1),
                expected_version=0,
                tracking=Tracking("proj", position=7, message_id="m"),
            )
        assert await store.consumer_position("proj") is None
        assert not await store.has_processed("proj", "m")
        with pytest.raises(EventSerializationError):
            await store.append(
                "a",
                [NewEvent("T", "bad")],  # type: ignore[arg-type]
                tracking=Tracking("proj", position=7),
            )
        assert await store.consumer_position("proj") is None
        # Nothing was held back: the same tracking goes through now.
        await store.append("a", _events(1), tracking=Tracking("proj", position=7, message_id="m"))
        assert await store.consumer_position("proj") == 7

    async def test_concurrent_duplicate_deliveries_apply_once(self, store: EventStore) -> None:
        results = await asyncio.gather(
            *(
                store.append(f"effect-{i}", _events(1), tracking=Tracking("w", message_id="m"))
                for i in range(10)
            ),
            return_exceptions=True,
        )
        assert sum(isinstance(r, list) for r in results) == 1
        assert sum(isinstance(r, DuplicateMessageError) for r in results) == 9
        assert len(await store.read_all()) == 1

    # -- snapshots ---------------------------------------------------------------------------

    async def test_snapshots(self, store: EventStore) -> None:
        assert await store.latest_snapshot("agg") is None
        first = Snapshot("agg", 10, "mod:Agg", b"state-10")
        await store.save_snapshot(first)
        assert await store.latest_snapshot("agg") == first
        newer = Snapshot("agg", 20, "mod:Agg", b"\x00state-20")
        await store.save_snapshot(newer)
        assert await store.latest_snapshot("agg") == newer
        # An older snapshot arriving late does not replace a newer one.
        await store.save_snapshot(Snapshot("agg", 15, "mod:Agg", b"late"))
        assert await store.latest_snapshot("agg") == newer
        assert await store.latest_snapshot("other") is None
        # Snapshots are not events.
        assert await store.read_all() == []
        assert await store.max_position() == 0
        snapshot = await store.latest_snapshot("agg")
        assert snapshot is not None
        assert type(snapshot.state) is bytes

    # -- subscribe ---------------------------------------------------------------------------

    async def test_subscribe_catches_up_then_follows_live(self, store: EventStore) -> None:
        committed = await store.append("a", _events(3))
        subscription = store.subscribe(from_position=1)
        try:
            assert [e.position for e in await _take(subscription, 3)] == committed
            more = await store.append("b", _events(2))
            got = await _take(subscription, 2)
            assert [e.position for e in got] == more
            assert [(e.stream, e.version) for e in got] == [("b", 1), ("b", 2)]
        finally:
            await _close_iterator(subscription)

    async def test_subscribe_from_a_position(self, store: EventStore) -> None:
        committed = await store.append("a", _events(5))
        subscription = store.subscribe(from_position=committed[2])
        try:
            got = await _take(subscription, 2)
            assert [e.position for e in got] == committed[2:4]
        finally:
            await _close_iterator(subscription)

    async def test_subscribe_waits_on_an_empty_store(self, store: EventStore) -> None:
        subscription = store.subscribe()
        try:
            reader = asyncio.ensure_future(_take(subscription, 2))
            # The reader is parked on the commit signal before anything is appended.
            await asyncio.sleep(0)
            positions = await store.append("a", _events(1))
            positions += await store.append("b", _events(1))
            assert [e.position for e in await reader] == positions
        finally:
            await _close_iterator(subscription)

    async def test_subscribe_with_topic_filter(self, store: EventStore) -> None:
        await store.append("a", [NewEvent("Keep", b"1"), NewEvent("Drop", b"2")])
        subscription = store.subscribe(topics=["Keep"], batch_size=1)
        try:
            [first] = await _take(subscription, 1)
            assert first.state == b"1"
            await store.append("a", [NewEvent("Drop", b"3")] * 3 + [NewEvent("Keep", b"4")])
            [second] = await _take(subscription, 1)
            assert second.state == b"4"
            assert second.topic == "Keep"
        finally:
            await _close_iterator(subscription)

    @pytest.mark.parametrize("batch_size", [1, 3, 500])
    async def test_subscribe_sees_events_committed_while_catching_up(
        self, store: EventStore, batch_size: int
    ) -> None:
        expected = await store.append("a", _events(7))
        subscription = store.subscribe(batch_size=batch_size)
        seen: list[StoredEvent] = []
        try:
            for round_ in range(5):
                seen += await _take(subscription, 1)
                # Commit more while the subscriber is still behind, from several tasks.
                batches = await asyncio.gather(
                    *(store.append(f"w{round_}-{k}", _events(2)) for k in range(3))
                )
                expected += [p for batch in batches for p in batch]
            seen += await _take(subscription, len(expected) - len(seen))
        finally:
            await _close_iterator(subscription)
        log = await store.read_all()
        assert sorted(expected) == [e.position for e in log]
        assert [e.position for e in seen] == [e.position for e in log]
        assert seen == log

    async def test_two_subscribers_see_the_same_log(self, store: EventStore) -> None:
        one = store.subscribe()
        two = store.subscribe(batch_size=2)
        try:
            readers = [asyncio.ensure_future(_take(s, 12)) for s in (one, two)]
            for i in range(4):
                await store.append(f"s{i}", _events(3))
            got_one, got_two = await asyncio.gather(*readers)
            assert got_one == got_two == await store.read_all()
        finally:
            await _close_iterator(one)
            await _close_iterator(two)

    async def test_breaking_out_stops_the_subscription(self, store: EventStore) -> None:
        await store.append("a", _events(3))
        seen: list[int] = []
        subscription = store.subscribe()
        async with contextlib.aclosing(subscription):  # type: ignore[type-var]
            async for event in subscription:
                seen.append(event.version)
                if len(seen) == 2:
                    break
        assert seen == [1, 2]
        with pytest.raises(StopAsyncIteration):
            await anext(subscription)
        # The store is unaffected and a new subscription starts where asked.
        await store.append("a", _events(1))
        again = store.subscribe(from_position=3)
        try:
            assert [e.version for e in await _take(again, 2)] == [3, 4]
        finally:
            await _close_iterator(again)

    # -- close -------------------------------------------------------------------------------

    async def test_closed_store_refuses_everything(self) -> None:
        store = await self.open_store()
        await store.append("a", _events(1))
        await store.close()
        await store.close()  # closing twice is harmless
        calls: list[Any] = [
            store.append("a", _events(1)),
            store.append_many([AppendRequest("a", _events(1))]),
            store.read("a"),
            store.read_all(),
            store.max_position(),
            store.stream_version("a"),
            store.streams(),
            store.stats(),
            store.consumer_position("c"),
            store.has_processed("c", "m"),
            store.save_snapshot(Snapshot("a", 1, "T", b"")),
            store.latest_snapshot("a"),
            anext(store.subscribe()),
        ]
        for call in calls:
            with pytest.raises(StoreClosedError):
                await call

    async def test_close_ends_a_waiting_subscriber(self) -> None:
        store = await self.open_store()
        await store.append("a", _events(1))
        subscription = store.subscribe()
        try:
            assert len(await _take(subscription, 1)) == 1
            waiting = asyncio.ensure_future(_take(subscription, 1))
            await asyncio.sleep(0)
            await store.close()
            with pytest.raises((StoreClosedError, StopAsyncIteration)):
                await waiting
        finally:
            await store.close()

    async def test_close_finishes_pending_appends(self) -> None:
        store = await self.open_store()
        tasks = [asyncio.ensure_future(store.append(f"s{i}", _events(2))) for i in range(30)]
        await asyncio.sleep(0)
        await store.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        acknowledged = {f"s{i}": r for i, r in enumerate(results) if isinstance(r, list)}
        for result in results:
            assert isinstance(result, list | StoreClosedError), result
        assert acknowledged, "appends started before close() should complete"
        if self.durable:
            store = await self.open_store()
            try:
                for stream, positions in acknowledged.items():
                    assert [e.position for e in await store.read(stream)] == positions
            finally:
                await store.close()

    # -- durability --------------------------------------------------------------------------

    async def test_everything_survives_reopen(self, store: EventStore) -> None:
        self.require_durable()
        before = await store.append_many(
            [AppendRequest("a", _events(2)), AppendRequest("agg", _events(2), first_version=0)],
            tracking=Tracking("proj", position=4, message_id="m-1"),
        )
        await store.save_snapshot(Snapshot("agg", 1, "mod:Agg", b"snap"))
        reopened = await self.reopen(store)
        try:
            log = await reopened.read_all()
            assert [e.position for e in log] == [p for r in before for p in r]
            assert [(e.stream, e.version) for e in log] == [
                ("a", 1),
                ("a", 2),
                ("agg", 0),
                ("agg", 1),
            ]
            assert await reopened.consumer_position("proj") == 4
            assert await reopened.has_processed("proj", "m-1")
            assert await reopened.latest_snapshot("agg") == Snapshot("agg", 1, "mod:Agg", b"snap")
            with pytest.raises(ConcurrencyError):
                await reopened.append("a", _events(1), expected_version=0)
            with pytest.raises(DuplicateMessageError):
                await reopened.append("a", [], tracking=Tracking("proj", message_id="m-1"))
            after = await reopened.append("a", _events(1), expected_version=2)
            assert after[0] > log[-1].position
        finally:
            await reopened.close()
