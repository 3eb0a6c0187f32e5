"""Result folders written so that a partial run never looks complete.

A run writes into `<root>/<experiment>/<timestamp>.partial/`; only `finish()` renames it to
`<timestamp>/`. A run that raises is renamed `<timestamp>.failed/` with the error in `error.txt`.
Each file is written to a temporary name and renamed, so no reader sees half a file.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any

DEFAULT_ROOT = Path("results")


class ResultDir:
    def __init__(self, root: Path, experiment: str, timestamp: str | None = None) -> None:
        stamp = timestamp or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.final = root / experiment / stamp
        self.path = self.final.with_name(stamp + ".partial")
        self.path.mkdir(parents=True, exist_ok=False)

    def write_text(self, name: str, text: str) -> Path:
        target = self.path / name
        tmp = target.with_name(f".{name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
        return target

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
        os.replace(self.path, self.final)
        self.path = self.final
        return self.final

    def __enter__(self) -> ResultDir:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is None:
            if self.path != self.final:
                self.finish()
            return
        self.write_text("error.txt", "".join(traceback.format_exception(kind, exc, tb)))
        os.replace(self.path, self.final.with_name(self.final.name + ".failed"))
