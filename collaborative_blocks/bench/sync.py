"""Sync engine throughput, for ``cblocks bench sync``.

Cases of issue 4, each measured over ``rounds`` rounds:

- ``chain``: ``propagate_change`` of ``changes`` changes (one key each, over 100 keys) into
  the head of a 5-system dependency chain on a fresh SQLite store, until
  ``ensure_consistency`` holds for every key; reported as changes/s (no target: the number
  is what we report);
- ``chain-concurrent``: the same with 64 ``propagate_change`` calls in flight at a time (as
  when many requests change data at once), so their appends share SQLite commits;
- ``vector-clock``: ``VectorClock.compare`` followed by ``merge`` on 5-node clocks
  (target >= 100,000 compare-and-merge/s).

Measuring elapsed real time is this module's purpose, so it reads ``time.perf_counter``; the
engine itself runs on its injected clock. Run it with ``python -m
collaborative_blocks.bench.sync``.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from collaborative_blocks.bench._stats import (
    CaseResult,
    Contender,
    Measurement,
    ProgressCallback,
    interleave,
)
from collaborative_blocks.core.plugins import make_plugin_manager
from collaborative_blocks.core.runtime import Runtime
from collaborative_blocks.core.settings import load_settings
from collaborative_blocks.core.sync.engine import RealTimeSyncEngine
from collaborative_blocks.core.sync.resolvers import ResolverRegistry, VectorClock
from collaborative_blocks.errors import CollaborativeBlocksError
from collaborative_blocks.stores import open_store

__all__ = ["CASES", "SyncBenchConfig", "planned_measurements", "run_sync_bench"]

CASES = ("chain", "chain-concurrent", "vector-clock")
#: Changes in flight at once in ``chain-concurrent`` (their appends share SQLite commits).
WINDOW = 64
VECTOR_CLOCK_TARGET = 100_000.0
CHAIN = ("s0", "s1", "s2", "s3", "s4")
KEYS = 100
OURS = "ours"
NO_TARGET = "no target (the number is reported)"


@dataclass(frozen=True)
class SyncBenchConfig:
    """Sizes; :meth:`quick` gives tiny sizes for tests."""

    rounds: int = 3
    changes: int = 10_000
    clock_operations: int = 200_000

    @classmethod
    def quick(cls, **overrides: Any) -> SyncBenchConfig:
        sizes: dict[str, Any] = {"rounds": 1, "changes": 200, "clock_operations": 5_000}
        sizes.update(overrides)
        return cls(**sizes)


def planned_measurements(cfg: SyncBenchConfig) -> int:
    return len(CASES) * cfg.rounds


def _resolvers() -> ResolverRegistry | None:
    """The built-in resolvers, or None when no plugin provides ``last_write_wins``."""
    registry = ResolverRegistry.from_plugin_manager(make_plugin_manager())
    return registry if "last_write_wins" in registry.names else None


async def _chain(
    changes: int, directory: Path, resolvers: ResolverRegistry, window: int = 1
) -> float:
    store = await open_store(f"sqlite+aiosqlite:///{directory / 'sync.db'}")
    # Default settings, not the environment's: MESSAGE_BROKER_URL stays in-process.
    runtime = Runtime(settings=load_settings({}), store=store)
    engine = RealTimeSyncEngine(runtime, store=store, resolvers=resolvers)
    await engine.register_system(CHAIN[0])
    for upstream, system in itertools.pairwise(CHAIN):
        await engine.register_system(system, [upstream])
    start = time.perf_counter()
    for first in range(0, changes, window):
        await asyncio.gather(
            *(
                engine.propagate_change(CHAIN[0], {f"key-{n % KEYS}": n})
                for n in range(first, min(changes, first + window))
            )
        )
    for k in range(min(KEYS, changes)):
        if not await engine.ensure_consistency(f"key-{k}", 600):
            raise CollaborativeBlocksError(
                f"bench: key-{k} did not converge: {engine.last_inconsistency}"
            )
    elapsed = time.perf_counter() - start
    await engine.close()
    await runtime.close()
    await store.close()
    return changes / elapsed


async def _chain_fresh(changes: int, resolvers: ResolverRegistry, window: int = 1) -> float:
    with tempfile.TemporaryDirectory(prefix="cb-bench-sync-") as directory:
        return await _chain(changes, Path(directory), resolvers, window)


async def _vector_clocks(operations: int) -> float:
    nodes = list(CHAIN)
    left = VectorClock({node: i + 1 for i, node in enumerate(nodes)})
    right = VectorClock({node: 5 - i for i, node in enumerate(nodes)})
    start = time.perf_counter()
    for _ in range(operations):
        left.compare(right)
        left.merge(right)
    elapsed = time.perf_counter() - start
    await asyncio.sleep(0)
    return operations / elapsed


def _fresh(contender: Contender) -> Contender:
    async def run() -> float:
        # Start each measurement from a clean heap: one's garbage is not the next one's cost.
        gc.collect()
        return await contender()

    return run


async def run_sync_bench(
    cfg: SyncBenchConfig, progress: ProgressCallback | None = None
) -> list[CaseResult]:
    """Run both cases, ``cfg.rounds`` rounds each, and return their results."""
    results: list[CaseResult] = []
    resolvers = _resolvers()
    for key, window, how in (
        ("chain", 1, "one change at a time"),
        ("chain-concurrent", WINDOW, f"{WINDOW} changes in flight"),
    ):
        chain = CaseResult(
            key,
            f"propagate_change through a {len(CHAIN)}-system chain on SQLite, {how}, "
            "until consistent",
            "changes/s",
            OURS,
            NO_TARGET,
            1.0,
        )
        if resolvers is None:
            chain.unavailable = (
                "no last_write_wins resolver installed (collaborative_blocks.plugins.resolvers)"
            )
            results.append(chain)
            continue
        run_chain = partial(_chain_fresh, cfg.changes, resolvers, window)
        await interleave(chain, [(OURS, _fresh(run_chain))], cfg.rounds, progress)
        # No target: the baseline row repeats our number, so the table shows it as is.
        chain.measurements[NO_TARGET] = Measurement(
            NO_TARGET, list(chain.measurements[OURS].samples)
        )
        chain.notes.append(
            f"{cfg.changes:,} changes over {KEYS} keys (last_write_wins), {how}, a fresh SQLite "
            f"file each; {len(CHAIN) - 1} deliveries per change through the in-process broker"
        )
        results.append(chain)

    clocks = CaseResult(
        "vector-clock",
        "VectorClock compare + merge, 5 nodes",
        "ops/s",
        OURS,
        f"target {VECTOR_CLOCK_TARGET:,.0f} ops/s",
        1.0,
    )
    operations = cfg.clock_operations

    async def run_clocks() -> float:
        return await _vector_clocks(operations)

    await interleave(clocks, [(OURS, _fresh(run_clocks))], cfg.rounds, progress)
    clocks.measurements[clocks.baseline] = Measurement(
        clocks.baseline, [VECTOR_CLOCK_TARGET] * cfg.rounds
    )
    clocks.notes.append(f"{operations:,} compare-and-merge pairs per measurement")
    results.append(clocks)
    return results


if __name__ == "__main__":
    from collaborative_blocks.cli.bench import results_markdown

    print(results_markdown(asyncio.run(run_sync_bench(SyncBenchConfig()))))
