"""Generic array steps usable after any numeric step: reshape, transpose, expand_dims, cast."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgeslim.edge.preprocess._spec import (
    ARRAY,
    HWC,
    SERIES,
    BuildContext,
    OpSpec,
    Param,
    axis,
    dtype,
    int_list,
    register,
)
from edgeslim.errors import InferenceError

_NUMERIC = frozenset({ARRAY, HWC, SERIES})


def _reshape(params: dict[str, Any], ctx: BuildContext) -> Any:
    shape = tuple(params["shape"])

    def step(x: np.ndarray) -> np.ndarray:
        try:
            return x.reshape(shape)
        except ValueError:
            raise InferenceError(
                f"reshape cannot turn shape {list(x.shape)} ({x.size} values) into "
                f"{list(shape)}"
            ) from None

    return step


def _transpose(params: dict[str, Any], ctx: BuildContext) -> Any:
    axes = tuple(params["axes"])

    def step(x: np.ndarray) -> np.ndarray:
        if sorted(axes) != list(range(x.ndim)):
            raise InferenceError(
                f"transpose axes {list(axes)} do not permute the {x.ndim} axes of shape "
                f"{list(x.shape)}"
            )
        return np.ascontiguousarray(np.transpose(x, axes))

    return step


def _expand_dims(params: dict[str, Any], ctx: BuildContext) -> Any:
    ax = params["axis"]

    def step(x: np.ndarray) -> np.ndarray:
        if not -x.ndim - 1 <= ax <= x.ndim:
            raise InferenceError(
                f"expand_dims axis {ax} is out of range for shape {list(x.shape)}: the new "
                f"axis goes at {-x.ndim - 1} to {x.ndim}"
            )
        return np.expand_dims(x, ax)

    return step


def cast_exactly(arr: np.ndarray, dt: np.dtype, what: str) -> np.ndarray:
    """``arr`` cast to ``dt``, or an ``InferenceError`` naming ``what`` when the cast would
    change a value beyond truncation: a finite number beyond the range of a float type, a
    number beyond the range of an integer type (it would wrap around), NaN or infinity cast to
    integers."""
    out = arr.astype(dt)
    if arr.size == 0 or arr.dtype.kind not in "iuf" or np.can_cast(arr.dtype, dt, "safe"):
        return out  # (a widening cast changes no value)
    bad: Any = None
    if out.dtype.kind == "f":  # finite numbers that became infinite
        over = np.isinf(out)
        if over.any() and arr.dtype.kind == "f":
            over &= ~np.isinf(arr)
        bad = arr[over].flat[0].item() if over.any() else None
    elif out.dtype.kind in "iu":
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = arr[~np.isfinite(arr)].flat[0].item()
        else:  # fractions are truncated, as numpy casts them (truncation keeps the order)
            info = np.iinfo(out.dtype)
            lo, hi = math.trunc(arr.min().item()), math.trunc(arr.max().item())
            if lo < info.min or hi > info.max:
                whole = np.trunc(arr) if arr.dtype.kind == "f" else arr
                bad = arr[(whole < info.min) | (whole > info.max)].flat[0].item()
    if bad is not None:
        raise InferenceError(f"{what} holds a value out of the range of {dt}: {bad}; send "
                             f"values that fit it")
    return out


def _cast(params: dict[str, Any], ctx: BuildContext) -> Any:
    dt = np.dtype(params["dtype"])
    return lambda x: cast_exactly(x, dt, f"cast to {dt}: the array")


register(OpSpec(
    "reshape", "pre", _NUMERIC, ARRAY,
    {"shape": Param(int_list(1, allow_minus_one=True), doc="new shape; one -1 is inferred")},
    _reshape, "reshape (row-major)",
))
register(OpSpec(
    "transpose", "pre", _NUMERIC, ARRAY,
    {"axes": Param(int_list(1), doc="permutation of the axes")},
    _transpose, "permute axes",
))
register(OpSpec(
    "expand_dims", "pre", _NUMERIC, ARRAY,
    {"axis": Param(axis, 0, "where the new axis goes")},
    _expand_dims, "insert an axis of length 1 (e.g. the batch axis)",
))
register(OpSpec(
    "cast", "pre", _NUMERIC, ARRAY,
    {"dtype": Param(dtype, doc="numpy dtype name")},
    _cast, "convert the element type (the model's input dtype is applied at the end anyway)",
))
