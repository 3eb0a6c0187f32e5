"""Result folders written so that a partial run never looks complete.

A run writes into `<root>/<experiment>/<timestamp>.partial/`; only `finish()` renames it to
`<timestamp>/`. A run that raises is renamed `<timestamp>.failed/` with the error in `error.txt`.
Each file is written to a temporary name and renamed, so no reader sees half a file.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import fcntl
import io
import json
import os
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any

from tieremu.errors import TieremuError
from tieremu.safefile import UnsafeFileError, atomic_write


class ResultError(TieremuError):
    """A result folder cannot be created, locked, written or resumed; the message names the folder."""

DEFAULT_ROOT = Path("results")
MARKER = "manifest.json"  # every result folder has one, written first; --resume takes no folder without it


class ResultDir:
    """A new result folder, locked (flock) from creation until the object is closed, so no concurrent run or
    `--resume` writes into it."""

    def __init__(self, root: Path, experiment: str, timestamp: str | None = None) -> None:
        stamp = timestamp or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(root) / experiment
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ResultError(f"cannot create the result folder under {base}: {exc.strerror}") from None
        self.final, self.path = _new_folder(base, stamp)
        self._lock = lock_folder(self.path)

    def write_text(self, name: str, text: str) -> Path:
        """Write one file atomically (never through a symlink or over a special file); a full disk or a read-only
        folder is a ResultError, not a traceback."""
        target = self.path / name
        try:
            return atomic_write(target, text)
        except UnsafeFileError as exc:
            raise ResultError(str(exc)) from None

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")

    def write_csv(self, name: str, rows: list[dict[str, Any]]) -> Path:
        """Rows as CSV; the header is the union of the rows' keys in first-seen order."""
        fields = list(dict.fromkeys(k for row in rows for k in row))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return self.write_text(name, buf.getvalue())

    def finish(self) -> Path:
        _rename(self.path, self.final)
        self.path = self.final
        return self.final

    def close(self) -> None:
        """Release the folder's lock (the folder stays)."""
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def __enter__(self) -> ResultDir:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if exc is None:
                if self.path != self.final:
                    self.finish()
                return
            # The error file is a courtesy: on a full disk it cannot be written, and the run's own error wins.
            with contextlib.suppress(ResultError):
                self.write_text("error.txt", "".join(traceback.format_exception(kind, exc, tb)))
            with contextlib.suppress(ResultError):
                _rename(self.path, self.final.with_name(self.final.name + ".failed"))
                self.path = self.final.with_name(self.final.name + ".failed")
            if isinstance(exc, KeyboardInterrupt):
                # Ctrl-C or a signal (tieremu.processes.Terminated): the CLI names the folder left behind, which only
                # this object knows; an interrupt carries no other state, so the path rides on it.
                exc.result_folder = self.path  # type: ignore[attr-defined]
        finally:
            self.close()


class ReopenedResultDir(ResultDir):
    """An existing result folder made partial again for `--resume` (done, partial or failed): while runs are
    added it must not look complete, and `finish()` renames it back exactly as a new folder would be. Only a
    tieremu result folder of this experiment is taken, and only when no other run holds it."""

    def __init__(self, folder: Path, experiment: str) -> None:  # no super().__init__: that creates a new folder
        folder = Path(folder)
        if folder.is_symlink() or not folder.is_dir():
            raise ResultError(f"--resume {folder}: no such result folder")
        stamp = folder.name.removesuffix(".partial").removesuffix(".failed")
        if folder.parent.name != experiment:
            raise ResultError(f"--resume {folder}: the folder belongs to experiment {folder.parent.name!r}, "
                              f"not {experiment!r}; resume it with its own spec")
        check_result_folder(folder, experiment)
        self._lock = lock_folder(folder)  # before the rename: a concurrent --resume finds it held
        try:
            self.final = folder.with_name(stamp)
            self.path = self.final.with_name(stamp + ".partial")
            if folder != self.path:
                _rename(folder, self.path)
            error = self.path / "error.txt"
            if error.exists():  # the earlier attempt's failure: kept, but no longer the folder's verdict
                _rename(error, self.path / "error.previous.txt")
        except BaseException:
            self.close()
            raise


def check_result_folder(folder: Path, experiment: str) -> None:
    """Refuse a folder that is not a tieremu result folder of `experiment` (a user's data must never be renamed
    or written into)."""
    marker = folder / MARKER
    try:
        data = json.loads(marker.read_text()) if marker.is_file() and not marker.is_symlink() else None
    except (OSError, ValueError):
        data = None
    named = data.get("extra", {}).get("experiment") if isinstance(data, dict) and \
        isinstance(data.get("extra"), dict) else None
    if not isinstance(data, dict) or "tieremu_version" not in data or named != experiment:
        raise ResultError(f"--resume {folder}: not a tieremu result folder of experiment {experiment!r} (no "
                          f"valid {MARKER}); nothing was changed. Give a folder a run of this spec created")


def lock_folder(folder: Path) -> int:
    """Hold an exclusive flock on the folder itself (it follows the folder through renames); another process
    holding it is a ResultError naming the folder."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ResultError(f"cannot open the result folder {folder}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ResultError(f"{folder} is in use by another tieremu run (it holds the folder's lock); wait for it "
                          "to finish or stop it") from None
    return fd


def _new_folder(base: Path, stamp: str) -> tuple[Path, Path]:
    """A fresh `<stamp>[-N].partial` folder; two runs started in the same second get different ones."""
    for n in range(1000):
        name = stamp if n == 0 else f"{stamp}-{n}"
        final = base / name
        partial = final.with_name(name + ".partial")
        if any(p.exists() or p.is_symlink() for p in (final, final.with_name(name + ".failed"))):
            continue
        try:
            partial.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise ResultError(f"cannot create the result folder {partial}: {exc.strerror}") from None
        return final, partial
    raise ResultError(f"cannot find a free result folder name for {stamp} under {base}")


def _rename(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError as exc:
        raise ResultError(f"cannot rename {src} to {dst.name}: {exc.strerror}") from None
