"""Strict reading of YAML config files: every error names the file, the key path, the bad value and what is valid.

Specs read their fields through a `Section`, then call `done()`: any key that was not read is unknown, and
unknown keys are errors rather than silently ignored (a typo must not change an experiment).
"""

from __future__ import annotations

import os
import reprlib
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tieremu.errors import ConfigError
from tieremu.numbers import Range, finite_problem, number_problem

T = TypeVar("T")
_REQUIRED: Any = object()


MAX_CONFIG_BYTES = 1 << 20  # 1 MiB: far more than any tier map, spec or profile; a bigger input is a mistake
MAX_ALIASES = 100  # YAML aliases (`*name`) per file: enough for shared snippets, far too few for an alias bomb
MAX_NODES = 100_000  # values after aliases are expanded: bounds the work of reading and printing any value


def load_yaml(path: str | Path) -> Section:
    """A YAML mapping read strictly: a regular UTF-8 file of at most MAX_CONFIG_BYTES, no duplicate keys, aliases
    within budget. Every refusal is a ConfigError naming the file (and the key where there is one)."""
    path = Path(path)
    text = read_config_text(path)
    data = parse_yaml(text, path)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return Section(data, "", path)


def read_config_text(path: Path, limit: int = MAX_CONFIG_BYTES) -> str:
    """The text of a config file: a regular file (not a device or FIFO, which may never end), at most `limit`
    bytes, UTF-8."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError:  # a NUL byte in the path
        raise ConfigError(f"{show(str(path))}: not a valid path") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{path}: not a regular file; give a config file")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) > limit:
        raise ConfigError(f"{path}: larger than {limit // 1024} KiB; a config file is never this big")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x}); save it as "
                          "UTF-8") from None


def parse_yaml(text: str, source: str | Path) -> Any:
    """YAML through the strict loader; every YAML problem a ConfigError naming the source."""
    loader: _StrictLoader | None = None
    try:
        loader = _StrictLoader(text)  # the reader checks every character here already
        loader.name = str(source)  # marks in YAML errors name the file
        return loader.get_single_data()
    except _TooBig as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {_clip(str(exc), 400)}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # e.g. a date like 2024-13-45
        raise ConfigError(f"{source}: not valid YAML: {_clip(str(exc), 400)}") from None
    finally:
        if loader is not None:
            loader.dispose()


class _TooBig(Exception):
    pass


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and counts aliases and the size of what they expand to."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise _TooBig(f"more than {MAX_ALIASES} YAML aliases (line {mark.line + 1}); write the values out")
        return super().compose_node(parent, index)

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None and _expanded_size(node, {}) > MAX_NODES:
            raise _TooBig(f"its aliases expand to more than {MAX_NODES} values (an alias bomb?); write them out")
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a scalar",
                                                        key_node.start_mark) from None
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_clip(repr(key), 60)} (first on line {first.start_mark.line + 1}); "
                    "a key may appear once per mapping", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many nodes `node` stands for once aliases are expanded (shared nodes counted at every use)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once, not forever
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    memo[id(node)] = min(size, MAX_NODES + 1)
    return memo[id(node)]


_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3


def show(value: Any) -> str:
    """A value for an error message: short, whatever its size (an expanded alias may be huge)."""
    return _REPR.repr(value)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
            *, choices: Iterable[Any] | None = None, check: Callable[[Any], str | None] | None = None,
            valid: Range | None = None) -> T:
        """The value at key, type-checked; a float must be finite, a number within `valid` when given; `check`
        returns a problem string for a bad value."""
        self._seen.add(key)
        if key not in self.data or self.data[key] is None:
            if default is _REQUIRED:
                raise self.error(key, "required key is missing")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # YAML ints are valid floats; bools are not numbers.
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:
                raise self.error(key, f"{show(value)} is too large for a number") from None
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.error(key, f"expected {names}, got {show(value)}")
        if (problem := finite_problem(value)) is not None:
            raise self.error(key, problem)
        if valid is not None and (problem := number_problem(value, valid)) is not None:
            raise self.error(key, problem)
        if choices is not None:
            options = list(choices)
            if value not in options:
                raise self.error(key, f"{show(value)} is not valid; valid: {', '.join(map(str, options))}")
        if check is not None and (problem := check(value)) is not None:
            raise self.error(key, f"{show(value)}: {problem}")
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
                raise self.error(f"{key}[{i}]", f"expected a mapping, got {show(item)}")
            out.append(Section(item, f"{self.key_path(key)}[{i}]", self.source))
        return out

    def ints(self, key: str, default: Any = _REQUIRED) -> tuple[int, ...]:
        """A list of integers, or one integer taken as a list of one."""
        value = self.get(key, (list, int), default)
        if value is default and default is not _REQUIRED:
            return value
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise self.error(key, f"expected integers, got {show(value)}")
        return tuple(items)

    def done(self) -> None:
        unknown = sorted((k for k in self.data if k not in self._seen), key=str)
        if unknown:
            valid = ", ".join(sorted(self._seen))
            raise self.error(show(unknown[0]) if not isinstance(unknown[0], str) else unknown[0],
                             f"unknown key; valid keys here: {valid}")

    def relative_path(self, value: str) -> Path:
        """A path in the file is relative to the file, not to wherever the command runs."""
        p = Path(value)
        return p if p.is_absolute() else (self.source.parent / p)


def positive(value: float) -> str | None:
    return None if value > 0 else "must be positive"
