"""Where the test inputs live: the sysfs/procfs fixture trees, and the Mooncake trace the repository ships.

Tests import it as `from fixture_paths import fixture_root`: tests/ has no __init__.py, so pytest puts
tests/ on sys.path when it imports a test module from there.
"""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "sysfs"
# The real request trace (Mooncake FAST'25 release, Apache-2.0), shipped in traces/ so a plain clone has it.
MOONCAKE_TRACE = Path(__file__).resolve().parents[1] / "traces" / "mooncake_synthetic_trace.jsonl"


def fixture_root(name: str) -> Path:
    """The root directory (holding sys/ and proc/) of the fixture tree called name."""
    root = FIXTURES / name
    if not root.is_dir():
        known = ", ".join(sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()))
        raise FileNotFoundError(f"no sysfs fixture {name!r} under {FIXTURES}; known fixtures: {known}")
    return root
