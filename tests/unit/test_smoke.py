from collaborative_blocks import NewEvent, open_store


async def test_memory_store_round_trip() -> None:
    store = await open_store("memory://")
    assert await store.append("a", [NewEvent("T", b"x")], expected_version=0) == [1]
    assert [e.state for e in await store.read("a")] == [b"x"]
