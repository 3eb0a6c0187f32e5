"""The durable record of an applied (or half-applied) profile: one JSON file per profile in the state dir.

Each step is on disk before the kernel sees the write: the whole file is rewritten to a temporary file,
fsynced, renamed over the journal and the directory fsynced, so after a crash or power loss the journal
holds every step that may have happened (and possibly one that did not, which undo tolerates). A journal
that exists means the profile is active, or was being applied by a process that died: teardown uses it
either way.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tieremu.errors import LabStateError, TieremuError
from tieremu.lab.steps import Step, step_from_json, step_to_json
from tieremu.numa.sysfs import resolve_root
from tieremu.safefile import check_destination, create_exclusive

STATE_ENV = "TIEREMU_LAB_STATE"
DEFAULT_STATE = "/var/lib/tieremu/lab"
VERSION = 1


def state_dir(state: str | os.PathLike[str] | None = None, root: str | os.PathLike[str] | None = None) -> Path:
    """The given dir, else $TIEREMU_LAB_STATE, else /var/lib/tieremu/lab under the sysfs root: in test mode (a
    fixture root) the journals live inside the fixture, so a test never marks the host's state as applied."""
    if state is not None:
        return Path(state)
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    return resolve_root(root) / DEFAULT_STATE.lstrip("/")


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Entry:
    """One recorded step and the action it belongs to."""

    action: str
    step: Step


@dataclass
class Journal:
    path: Path
    profile: str
    source: str
    root: str
    pid: int
    pid_start: str | None
    started_utc: str
    applied_utc: str | None = None
    skipped: list[str] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)

    @classmethod
    def create(cls, state: Path, profile: str, source: str, root: str, skipped: list[str]) -> Journal:
        """Start the journal of profile; fails if one exists (active, or left by a crash: tear it down first)."""
        if not state.is_dir():
            # Readable by all: a run manifest written by an unprivileged user must still see active profiles.
            state.mkdir(parents=True, mode=0o755)
            _fsync_dir(state.parent)
        journal = cls(path=journal_path(state, profile), profile=profile, source=source, root=root, pid=os.getpid(),
                      pid_start=process_start(os.getpid()), started_utc=now_utc(), skipped=list(skipped))
        tmp = journal._write_tmp()
        try:
            # link(2) fails when the name exists: only one apply of a profile can hold its journal.
            os.link(tmp, journal.path)
        except FileExistsError:
            raise LabStateError(f"profile {profile} already has a journal at {journal.path}: it is applied, "
                                "being applied, or was left by a crash; run `tieremu lab teardown "
                                f"{profile}` first") from None
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(state)
        return journal

    @classmethod
    def load(cls, path: Path) -> Journal:
        try:
            data = json.loads(path.read_text())
            return cls(path=path, profile=data["profile"], source=data["source"], root=data["root"],
                       pid=data["pid"], pid_start=data.get("pid_start"), started_utc=data["started_utc"],
                       applied_utc=data.get("applied_utc"), skipped=list(data.get("skipped", [])),
                       entries=[Entry(e["action"], step_from_json(e["step"])) for e in data["entries"]])
        except FileNotFoundError:
            raise LabStateError(f"no journal at {path}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LabStateError(f"journal {path} is unreadable ({exc}); restore by hand from its contents") from None

    def record(self, action: str, step: Step) -> None:
        self.entries.append(Entry(action, step))
        self.save()

    def mark_applied(self) -> None:
        self.applied_utc = now_utc()
        self.save()

    def drop_last(self) -> None:
        """Forget the newest entry once undone, so a teardown cut short resumes where it stopped."""
        self.entries.pop()
        self.save()

    def save(self) -> None:
        tmp = self._write_tmp()
        try:
            check_destination(self.path)  # never rename over a link or device planted at the journal's name
        except TieremuError as exc:
            tmp.unlink(missing_ok=True)
            raise LabStateError(str(exc)) from None
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        _fsync_dir(self.path.parent)

    @property
    def applying_elsewhere(self) -> bool:
        """Another live process is applying this profile right now."""
        if self.applied_utc is not None or self.pid == os.getpid():
            return False
        start = process_start(self.pid)
        return start is not None and (self.pid_start is None or start == self.pid_start)

    @property
    def state(self) -> str:
        if self.applied_utc is not None:
            return "applied"
        return "being applied" if self.applying_elsewhere else "incomplete (the applying process died)"

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "profile": self.profile, "source": self.source, "root": self.root,
                "pid": self.pid, "pid_start": self.pid_start, "started_utc": self.started_utc,
                "applied_utc": self.applied_utc, "skipped": self.skipped,
                "entries": [{"action": e.action, "step": step_to_json(e.step)} for e in self.entries]}

    def _write_tmp(self) -> Path:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            fd = create_exclusive(tmp, os.O_WRONLY, 0o644)
        except TieremuError as exc:
            raise LabStateError(str(exc)) from None
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(self.to_json(), indent=1).encode())
            f.flush()
            os.fsync(f.fileno())
        return tmp


def journal_path(state: Path, profile: str) -> Path:
    return state / f"{profile}.json"


def journals(state: Path) -> list[Path]:
    try:
        return sorted(p for p in state.glob("*.json") if p.is_file())
    except OSError:
        return []


def process_start(pid: int) -> str | None:
    """The start time of pid (clock ticks since boot), so a recycled pid is not taken for the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; fields after the last ')' are fixed.
    return stat.rsplit(")", 1)[1].split()[19]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
