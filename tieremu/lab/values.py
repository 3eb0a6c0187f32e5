"""How the kernel shows the value of a knob file, and how to read back the bare value that was written.

Most files show what was written. Some do not: THP files list every mode with the selected one in
brackets, resctrl schemata show every resource on its own line with padded numbers, /proc/swaps is a
table. A step names its file's form so that status and restore checks compare like with like.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PLAIN = "plain"
SELECTED = "selected"  # "always [madvise] never" -> "madvise"
SCHEMATA_MB = "schemata:MB"  # the MB line of a resctrl schemata file, as "0=100;1=50"
WORDS = "words"  # space-separated words in any spacing, e.g. cgroup.subtree_control


def parse(form: str, text: str | None) -> str | None:
    if text is None:
        return None
    if form == SELECTED:
        m = re.search(r"\[([^\]]+)\]", text)
        return m.group(1) if m else text.strip()
    if form == SCHEMATA_MB:
        domains = schemata_line(text, "MB")
        return None if domains is None else format_domains(domains)
    if form == WORDS:
        return " ".join(text.split())
    return text.strip()


def options(text: str) -> list[str]:
    """Every mode a bracket-style file offers ("always [madvise] never" -> always, madvise, never)."""
    return [w.strip("[]") for w in text.split()]


def schemata_line(text: str, resource: str) -> dict[int, str] | None:
    """The domains of one resource of a schemata file: "    MB:0=100;1= 50" -> {0: "100", 1: "50"}."""
    for line in text.splitlines():
        name, sep, rest = line.strip().partition(":")
        if sep and name.strip() == resource:
            out: dict[int, str] = {}
            for part in rest.split(";"):
                dom, eq, val = part.partition("=")
                if eq:
                    out[int(dom.strip())] = val.strip()
            return out
    return None


def format_domains(domains: dict[int, str]) -> str:
    return ";".join(f"{d}={v}" for d, v in sorted(domains.items()))


@dataclass(frozen=True)
class SwapArea:
    """One line of /proc/swaps."""

    device: str
    type: str
    size_kib: int
    used_kib: int
    priority: int


def parse_swaps(text: str) -> list[SwapArea]:
    areas = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) != 5:
            continue
        # The kernel escapes blanks and backslashes in the path as octal (\040).
        device = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[0])
        areas.append(SwapArea(device, fields[1], int(fields[2]), int(fields[3]), int(fields[4])))
    return areas
