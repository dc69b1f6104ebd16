from __future__ import annotations

from collaborative_blocks import Runtime, VirtualClock, hookimpl, load_settings


async def test_runtime_injects_clock_and_seeded_randomness() -> None:
    def ids(seed: int) -> list[str]:
        runtime = Runtime(load_settings({}), clock=VirtualClock(start=10.0), seed=seed)
        return [runtime.new_id() for _ in range(3)]

    assert ids(7) == ids(7)
    assert ids(7) != ids(8)


async def test_runtime_opens_its_store_once_and_tells_plugins() -> None:
    started: list[Runtime] = []

    class Watcher:
        @hookimpl
        def cb_runtime_started(self, runtime: Runtime) -> None:
            started.append(runtime)

    async with Runtime(load_settings({"EVENT_STORE_URL": "memory://"}), plugins=[Watcher()]) as rt:
        first = await rt.store()
        assert await rt.store() is first
        assert started == [rt]
