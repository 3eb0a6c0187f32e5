"""Properties of the source tree that tools depend on."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_symlinks_in_the_tree() -> None:
    """Fixture trees imitate sysfs, whose symlinks point back up the tree. Committed as symlinks they form
    loops, and setuptools follows links while building the package: `pip install -e .` then never ends."""
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-s"], capture_output=True, text=True, check=True)
    links = [line.split("\t", 1)[1] for line in out.stdout.splitlines() if line.startswith("120000")]
    untracked = [os.path.relpath(os.path.join(d, n), REPO) for d, dirs, files in os.walk(REPO / "tests")
                 for n in dirs + files if os.path.islink(os.path.join(d, n))]  # os.walk does not follow links
    assert links == [] and untracked == [], "replace these symlinks with plain files: " + ", ".join(links + untracked)
