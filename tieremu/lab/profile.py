"""Lab profiles: a named list of actions read strictly from YAML.

    name: cxl-cpuless-node1
    description: ...
    actions:
      - kind: node_cpus
        node: 1
        online: false
        required: true      # default; false: skip the action where this machine cannot do it
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tieremu.configfile import Section, load_yaml
from tieremu.errors import ConfigError
from tieremu.lab.actions import KINDS, Action

SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "lab"
NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}"


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    source: str
    actions: tuple[Action, ...]


def load_profile(path: str | Path) -> Profile:
    top = load_yaml(path)
    name = top.get("name", str, check=lambda n: None if re.fullmatch(NAME, n) and ".." not in n else
                   "must be letters, digits, '_', '.', '-' (it names the journal file)")
    description = top.get("description", str, "")
    entries = top.sections("actions")
    if not entries:
        raise top.error("actions", "a profile needs at least one action")
    actions = tuple(_action(sec) for sec in entries)
    top.done()
    return Profile(name=name, description=description, source=str(Path(path).resolve()), actions=actions)


def _action(sec: Section) -> Action:
    kind = sec.get("kind", str, choices=sorted(KINDS))
    cls = KINDS[kind]
    # Unknown keys first: a misspelt parameter should be named as such, not reported as a missing one.
    valid = ("kind", "required", *cls.params)
    unknown = sorted(k for k in sec.data if k not in valid)
    if unknown:
        raise sec.error(unknown[0], f"unknown key for kind {kind}; valid keys here: {', '.join(valid)}")
    required = sec.get("required", bool, True)
    action = cls.from_section(sec, required)
    sec.done()
    return action


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml")) if SHIPPED.is_dir() else []


def find_profile(ref: str) -> Path | None:
    """A profile file: ref itself when it is a file, else a shipped profile of that name (configs/lab/)."""
    given = Path(ref)
    if given.is_file():
        return given
    for candidate in (SHIPPED / ref, SHIPPED / f"{ref}.yaml", Path("configs", "lab", f"{ref}.yaml")):
        if candidate.is_file():
            return candidate
    return None


def resolve_profile(ref: str) -> Profile:
    path = find_profile(ref)
    if path is None:
        raise ConfigError(f"no lab profile {ref!r}: not a file, nor one of the shipped profiles "
                          f"({', '.join(shipped_profiles()) or 'none'})")
    return load_profile(path)
