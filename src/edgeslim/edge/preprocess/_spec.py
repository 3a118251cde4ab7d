"""Declarative step specs: each op names its parameters, their checks and defaults.

An op is data in the manifest, ``{"op": NAME, **params}``. Every op is described once by an
``OpSpec``: the stage it belongs to (``"pre"`` runs on raw input before the model, ``"post"`` on
the model's outputs), the kind of value it accepts and produces (so a pipeline whose steps do
not fit together is refused when the bundle is built), its parameters and a ``build`` function
that turns checked parameters into a callable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeslim._validate import check_choice, check_int_range, check_positive
from edgeslim.errors import ConfigError

# Kinds of values that flow between preprocessing steps.
BYTES = "bytes"  # raw encoded image (JPEG/PNG)
IMAGE = "image"  # decoded PIL image
HWC = "hwc"  # float32 array (H, W, C)
TEXT = "text"  # str or list[str]
TOKENS = "tokens"  # dict of int64 arrays (B, L): input_ids, attention_mask, token_type_ids
SERIES = "series"  # float64 array (T,) or (T, C), time on axis 0
ARRAY = "array"  # any numeric array
# Kinds a preprocessing pipeline may end with (they map onto model inputs).
FINAL_KINDS = frozenset({HWC, TOKENS, SERIES, ARRAY})

_MISSING: Any = object()

Check = Callable[[Any, str, str], Any]


@dataclass(frozen=True)
class Param:
    """One parameter of an op: ``check(value, name, where)`` returns the normalised value."""

    check: Check
    default: Any = _MISSING
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is _MISSING


@dataclass(frozen=True)
class OpSpec:
    """An op: stage, kinds it accepts/produces, parameters and a factory for its callable.

    ``build(params, ctx)`` returns the step function. For preprocessing the function maps a
    value to a value; for postprocessing it maps ``(results, context)`` to new results.
    """

    name: str
    stage: str
    accepts: frozenset[str]
    produces: str | None
    params: Mapping[str, Param]
    build: Callable[[dict[str, Any], BuildContext], Callable[..., Any]]
    doc: str = ""
    verify: Callable[[dict[str, Any], str], None] | None = None
    """Cross-parameter check ``verify(params, where)`` raising ``ConfigError``."""


@dataclass
class BuildContext:
    """What a step may need beyond its own parameters: bundle files, labels, model I/O."""

    files: Mapping[str, bytes] = field(default_factory=dict)
    labels: list[str] | None = None
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)


REGISTRY: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    """Add an op to the registry (names are unique)."""
    if spec.name in REGISTRY:
        raise ValueError(f"op {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec


# ---------------------------------------------------------------- parameter checks


def fail(name: str, where: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"The '{name}' parameter of {where} must be {what}. Got {value!r} instead.")


def int_range(lo: int, hi: int) -> Check:
    return lambda v, n, w: check_int_range(v, n, w, lo, hi)


def positive(allow_zero: bool = False) -> Check:
    return lambda v, n, w: check_positive(v, n, w, allow_zero=allow_zero)


def choice(*choices: str) -> Check:
    return lambda v, n, w: check_choice(v, n, w, choices)


def boolean(v: Any, n: str, w: str) -> bool:
    if not isinstance(v, bool):
        raise fail(n, w, "true or false", v)
    return v


def nonempty_str(v: Any, n: str, w: str) -> str:
    if not isinstance(v, str) or not v:
        raise fail(n, w, "a non-empty string", v)
    return v


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def number(v: Any, n: str, w: str) -> float:
    if not _is_number(v):
        raise fail(n, w, "a finite number", v)
    return float(v)


def number_or_list(positive_only: bool = False) -> Check:
    """A finite number or a non-empty list of them (one per channel)."""
    what = "a positive number or a list of positive numbers" if positive_only else (
        "a finite number or a list of finite numbers")

    def check(v: Any, n: str, w: str) -> float | list[float]:
        items = v if isinstance(v, list) else [v]
        if not items or not all(_is_number(x) for x in items):
            raise fail(n, w, what, v)
        if positive_only and not all(x > 0 for x in items):
            raise fail(n, w, what, v)
        return [float(x) for x in items] if isinstance(v, list) else float(v)

    return check


def size_or_pair(v: Any, n: str, w: str) -> int | tuple[int, int]:
    """An int in [1, 16384] or a ``[height, width]`` pair of them."""
    what = "an int in [1, 16384] or a [height, width] list of two such ints"

    def ok(x: Any) -> bool:
        return not isinstance(x, bool) and isinstance(x, int) and 1 <= x <= 16384

    if ok(v):
        return int(v)
    if isinstance(v, list) and len(v) == 2 and all(ok(x) for x in v):
        return (int(v[0]), int(v[1]))
    raise fail(n, w, what, v)


def int_list(min_len: int = 1, allow_minus_one: bool = False) -> Check:
    def check(v: Any, n: str, w: str) -> list[int]:
        lo = -1 if allow_minus_one else 0
        what = f"a list of at least {min_len} ints >= {lo}"
        if allow_minus_one:
            what += " (at most one -1)"
        if (
            not isinstance(v, list)
            or len(v) < min_len
            or not all(not isinstance(x, bool) and isinstance(x, int) and x >= lo for x in v)
            or (allow_minus_one and v.count(-1) > 1)
        ):
            raise fail(n, w, what, v)
        return [int(x) for x in v]

    return check


def float_range(lo: float, hi: float, *, open_lo: bool = False) -> Check:
    """A finite float in ``[lo, hi]`` (or ``(lo, hi]``)."""
    what = f"a float in the range {'(' if open_lo else '['}{lo}, {hi}]"

    def check(v: Any, n: str, w: str) -> float:
        if not _is_number(v) or v > hi or v < lo or (open_lo and v == lo):
            raise fail(n, w, what, v)
        return float(v)

    return check


def optional(check: Check) -> Check:
    """``None`` or what ``check`` accepts."""
    return lambda v, n, w: None if v is None else check(v, n, w)


def axis(v: Any, n: str, w: str) -> int:
    return check_int_range(v, n, w, -8, 7)


DTYPES = ("bool", "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
          "uint16", "uint32", "uint64")
dtype = choice(*DTYPES)
