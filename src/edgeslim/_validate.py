"""Declarative parameter checks, done once at the public boundary.

Messages follow one shape: "The 'NAME' parameter of FUNC must be WHAT. Got VALUE instead."
Never ``assert`` on user input: asserts vanish under ``python -O``.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from edgeslim.errors import ConfigError


def _real(value: Any) -> bool:
    """A real number that is not a bool: Python's int and float, and numpy's scalars too
    (numpy registers them as ``numbers.Real``; its bool is not one)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fail(name: str, func: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"The '{name}' parameter of {func} must be {what}. Got {value!r} instead.")


def check_fraction(value: Any, name: str, func: str, *, closed_right: bool = False) -> float:
    """A float in [0, 1) (or [0, 1] with ``closed_right``)."""
    right = "]" if closed_right else ")"
    what = f"a float in the range [0.0, 1.0{right}"
    if not _real(value) or math.isnan(value):
        raise _fail(name, func, what, value)
    ok = 0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0
    if not ok:
        raise _fail(name, func, what, value)
    return float(value)


def check_int_range(value: Any, name: str, func: str, lo: int, hi: int) -> int:
    """An int in [lo, hi]."""
    if not _real(value) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise _fail(name, func, f"an int in the range [{lo}, {hi}]", value)
    return int(value)


def check_positive(value: Any, name: str, func: str, *, allow_zero: bool = False) -> float:
    """A finite float > 0 (or >= 0)."""
    what = "a finite float >= 0" if allow_zero else "a finite float > 0"
    if not _real(value) or not math.isfinite(value):
        raise _fail(name, func, what, value)
    if value < 0 or (value == 0 and not allow_zero):
        raise _fail(name, func, what, value)
    return float(value)


def check_choice(value: Any, name: str, func: str, choices: Collection[str]) -> str:
    """One of a fixed set of strings (a list or a mapping is refused, not hashed)."""
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in sorted(choices))
        raise _fail(name, func, f"one of {allowed}", value)
    return str(value)


def json_kind(value: Any) -> str:
    """What a value decoded from JSON was, in JSON's words (for messages to HTTP clients)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last
    silently: a second ``steps:`` would drop the first one's steps). Raises ``yaml.YAMLError``,
    which ``yaml_error_line`` turns into one line."""
    import yaml

    class _UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    repeated = key in seen
                except TypeError:  # an unhashable key: the base class says so
                    break
                if repeated:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is given twice (each key may appear once "
                                    "in a mapping)", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects


def yaml_error_line(exc: Exception) -> str:
    """A YAML (or decoding) error as one line: where it is and what is wrong, without the
    parser's multi-line excerpt of the file."""
    mark = getattr(exc, "problem_mark", None)
    at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or (str(exc).strip().splitlines() or [""])[0]
    return f"{at}{problem}"


def check_path(value: Any, name: str, func: str) -> Path:
    """A filesystem path given as ``str`` or ``os.PathLike`` (not None, a number, ...)."""
    if isinstance(value, (str, os.PathLike)) and str(value) != "":
        return Path(value)
    raise _fail(name, func, "a path (str or os.PathLike)", value)
