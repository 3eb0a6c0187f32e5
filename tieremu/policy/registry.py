"""Policies by name, with their parameters checked against the policy's own constructor.

Built-in names are listed by `names()`. A user policy needs no change here: name it `package.module:ClassName`
and it is imported. Parameters are the constructor's keyword-only arguments; an unknown one, or a value of the
wrong type, is an error naming the parameter and the valid ones.

A policy with parameters has a label, its name followed by the parameters as a JSON object
(`hotcold{"quota":8}`): experiment specs turn `{name: hotcold, quota: 8}` into it, so that a run, its id and its
report rows carry one string, and `get_policy` takes a label wherever it takes a name.
"""

from __future__ import annotations

import importlib
import inspect
import json
import types
import typing
from collections.abc import Mapping

from tieremu.errors import PolicyError
from tieremu.policy.base import Policy, PolicyContext
from tieremu.policy.belady import Belady
from tieremu.policy.hotcold import HotCold
from tieremu.policy.layerahead import LayerAhead
from tieremu.policy.prefetch import Lookahead
from tieremu.policy.recency import LFU, LRU, LRUEpoch
from tieremu.policy.static import AllFastest, AllSlowest, Interleave, Split

BUILTIN: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (AllFastest, AllSlowest, Interleave, Split, LRU, LFU, LRUEpoch, HotCold, Lookahead, LayerAhead,
                Belady)
}


def names() -> tuple[str, ...]:
    return tuple(sorted(BUILTIN))


def policy_class(name: str) -> type[Policy]:
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise PolicyError(f"unknown policy {name!r}; valid: {', '.join(names())}, or package.module:ClassName "
                          "for a policy of your own")
    module_name, _, class_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PolicyError(f"policy {name!r}: cannot import module {module_name!r} ({exc})") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise PolicyError(f"policy {name!r}: {module_name} has no Policy subclass named {class_name!r}")
    if inspect.isabstract(cls):
        raise PolicyError(f"policy {name!r}: {class_name} leaves abstract methods unimplemented: "
                          f"{', '.join(sorted(cls.__abstractmethods__))}")
    return cls


def parameters(cls: type[Policy]) -> dict[str, inspect.Parameter]:
    """The tunable parameters of a policy class: its constructor's keyword-only arguments."""
    signature = inspect.signature(cls.__init__)
    return {p.name: p for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def policy_label(name: str, params: Mapping[str, object]) -> str:
    """`name` alone, or followed by its parameters as a JSON object (sorted keys, no spaces)."""
    if not params:
        return name
    return name + json.dumps(dict(params), sort_keys=True, separators=(",", ":"))


def split_label(label: str) -> tuple[str, dict[str, object]]:
    """A label's policy name and parameters (see policy_label)."""
    name, brace, rest = label.partition("{")
    if not brace:
        return label, {}
    try:
        params = json.loads(brace + rest)
    except ValueError:
        raise PolicyError(f"policy {label!r}: the parameters after {name!r} are not a JSON object") from None
    if not isinstance(params, dict):
        raise PolicyError(f"policy {label!r}: the parameters after {name!r} are not a JSON object")
    return name, params


def label_problem(label: str) -> str | None:
    """Why a label cannot be run (its name or a parameter), or None: checked before any work."""
    try:
        get_policy(label, None, PolicyContext(future=()))
    except PolicyError as exc:
        return str(exc)
    return None


def get_policy(name: str, params: Mapping[str, object] | None = None,
               context: PolicyContext | None = None) -> Policy:
    name, labelled = split_label(name)
    params = {**labelled, **(params or {})}
    cls = policy_class(name)
    accepted = parameters(cls)
    hints = typing.get_type_hints(cls.__init__)
    values = {}
    for key, value in (params or {}).items():
        if key not in accepted:
            valid = ", ".join(sorted(accepted)) or "none"
            raise PolicyError(f"policy {name}: unknown parameter {key!r}; valid parameters: {valid}")
        values[key] = _coerce(name, key, value, hints.get(key, object))
    return cls(context or PolicyContext(), **values)


def _coerce(policy: str, key: str, value: object, hint: object) -> object:
    """Check a value against the parameter's annotation; ints pass as floats, lists as tuples."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is tuple and isinstance(value, list | tuple):
            (item,) = typing.get_args(option)[:1]
            try:
                return tuple(_coerce(policy, key, v, item) for v in value)
            except PolicyError:
                pass
        if option is object:
            return value
    expected = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise PolicyError(f"policy {policy}: parameter {key}={value!r} must be {expected}")
