"""Time and randomness are injected: the library never reads the wall clock, sleeps on it or
uses the global random generator directly (the chaos simulator depends on this).

Allowed: core/clock.py and core/randomness.py (they ARE the injected sources), the benchmark
package (it measures wall time on purpose) and the CLI (it reports to a person).
``asyncio.sleep(0)`` (a yield, not a wait) is allowed everywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "collaborative_blocks"
ALLOWED = {
    PACKAGE / "core" / "clock.py",
    PACKAGE / "core" / "randomness.py",
}
ALLOWED_DIRS = {PACKAGE / "bench", PACKAGE / "cli", PACKAGE / "testing"}

FORBIDDEN_CALLS = {
    ("time", "time"),
    ("time", "monotonic"),
    ("time", "perf_counter"),
    ("time", "sleep"),
    ("datetime", "now"),
    ("datetime", "utcnow"),
    ("random", "random"),
    ("random", "randint"),
    ("random", "uniform"),
    ("random", "choice"),
    ("random", "shuffle"),
    ("random", "getrandbits"),
    ("uuid", "uuid1"),
}


def _violations(path: Path) -> list[str]:
    found = []
    label = path.relative_to(PACKAGE.parent) if PACKAGE in path.parents else path.name
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", None)
        attr = node.func.attr
        if (name, attr) in FORBIDDEN_CALLS:
            found.append(f"{label}:{node.lineno} {name}.{attr}()")
        if (name, attr) == ("asyncio", "sleep"):
            arg = node.args[0] if node.args else None
            if not (isinstance(arg, ast.Constant) and arg.value == 0):
                found.append(
                    f"{label}:{node.lineno} asyncio.sleep(non-zero): use the injected clock.sleep()"
                )
    return found


def test_library_code_takes_time_and_randomness_from_injected_sources() -> None:
    problems: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in ALLOWED or any(d in path.parents for d in ALLOWED_DIRS):
            continue
        problems.extend(_violations(path))
    assert not problems, "wall-clock or global-random use:\n" + "\n".join(problems)


def test_the_checker_catches_a_planted_violation(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import time, asyncio\nx = time.time()\nasync def f():\n    await asyncio.sleep(1)\n"
    )
    assert len(_violations(planted)) == 2
