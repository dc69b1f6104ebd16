"""Benchmarks: the framework measured against baselines in the same run, on the same machine.

This machine may be shared and noisy, so every benchmark interleaves its contenders round by
round (baseline, ours, baseline, ours, ...), each round in a fresh directory or database, and
reports medians and the ratio of medians. ``cblocks bench store`` runs :mod:`.store`.
"""

from __future__ import annotations

from collaborative_blocks.bench._stats import CaseResult, Measurement, machine_info
from collaborative_blocks.bench.store import StoreBenchConfig, run_store_bench

__all__ = [
    "CaseResult",
    "Measurement",
    "StoreBenchConfig",
    "machine_info",
    "run_store_bench",
]
