"""Randomness, injected: one seeded source per runtime, handed to components that need it.

Components never call the ``random`` module's global functions; they take a ``Random`` so a
seed reproduces a run.
"""

from __future__ import annotations

import os
import random

__all__ = ["Random", "new_random", "random_id"]

Random = random.Random


def new_random(seed: int | None = None) -> random.Random:
    """A fresh source: seeded when ``seed`` is given, else from the operating system."""
    return random.Random(seed if seed is not None else int.from_bytes(os.urandom(8), "big"))


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def random_id(now: float, rng: random.Random) -> str:
    """A 26-character, time-sortable id (ULID layout) from an injected clock reading and RNG."""
    value = (int(now * 1000) & ((1 << 48) - 1)) << 80 | rng.getrandbits(80)
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))
