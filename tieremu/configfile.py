"""Strict reading of YAML config files: every error names the file, the key path, the bad value and what is valid.

Specs read their fields through a `Section`, then call `done()`: any key that was not read is unknown, and
unknown keys are errors rather than silently ignored (a typo must not change an experiment).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tieremu.errors import ConfigError

T = TypeVar("T")
_REQUIRED: Any = object()


def load_yaml(path: str | Path) -> Section:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return Section(data, "", path)


class Section:
    """One mapping of a config file, with the key path that leads to it."""

    def __init__(self, data: Mapping[str, Any], path: str, source: str | Path) -> None:
        self.data = data
        self.path = path
        self.source = Path(source)
        self._seen: set[str] = set()

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.key_path(key)}: {problem}")

    def get(self, key: str, kind: type[T] | tuple[type, ...], default: Any = _REQUIRED,
            *, choices: Iterable[Any] | None = None, check: Callable[[Any], str | None] | None = None) -> T:
        """The value at key, type-checked; `check` returns a problem string for a bad value."""
        self._seen.add(key)
        if key not in self.data or self.data[key] is None:
            if default is _REQUIRED:
                raise self.error(key, "required key is missing")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # YAML ints are valid floats; bools are not numbers.
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.error(key, f"expected {names}, got {value!r}")
        if choices is not None:
            valid = list(choices)
            if value not in valid:
                raise self.error(key, f"{value!r} is not valid; valid: {', '.join(map(str, valid))}")
        if check is not None and (problem := check(value)) is not None:
            raise self.error(key, f"{value!r}: {problem}")
        return value

    def section(self, key: str, default_empty: bool = False) -> Section:
        value = self.get(key, dict, {} if default_empty else _REQUIRED)
        return Section(value, self.key_path(key), self.source)

    def has(self, key: str) -> bool:
        """Whether key is present; asking makes it a known key of this section."""
        self._seen.add(key)
        return key in self.data

    def sections(self, key: str) -> list[Section]:
        items = self.get(key, list)
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise self.error(f"{key}[{i}]", f"expected a mapping, got {item!r}")
            out.append(Section(item, f"{self.key_path(key)}[{i}]", self.source))
        return out

    def ints(self, key: str, default: Any = _REQUIRED) -> tuple[int, ...]:
        """A list of integers, or one integer taken as a list of one."""
        value = self.get(key, (list, int), default)
        if value is default and default is not _REQUIRED:
            return value
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise self.error(key, f"expected integers, got {value!r}")
        return tuple(items)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            valid = ", ".join(sorted(self._seen))
            raise self.error(unknown[0], f"unknown key; valid keys here: {valid}")

    def relative_path(self, value: str) -> Path:
        """A path in the file is relative to the file, not to wherever the command runs."""
        p = Path(value)
        return p if p.is_absolute() else (self.source.parent / p)


def positive(value: float) -> str | None:
    return None if value > 0 else "must be positive"
