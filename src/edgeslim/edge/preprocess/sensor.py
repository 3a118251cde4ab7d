"""Sensor-stream preprocessing on numpy: time is axis 0 of a ``(T,)`` or ``(T, C)`` series.

The raw payload is a JSON array of numbers (or of rows of numbers); ``null`` means a missing
reading (NaN); strings and booleans are refused. Ops, in the order one usually chains them:

- ``sensor.impute``: ``drop`` rows with any NaN, or fill NaN by ``ffill`` (last valid value,
  leading gaps take the first valid value), the channel ``mean`` or ``zero``;
- ``sensor.clip``: clip outliers per channel to ``mean +- threshold * std`` (``zscore``) or to
  the ``[lower, upper]`` percentiles (``percentile``);
- ``sensor.smooth``: trailing ``moving_average`` over ``window`` samples (shorter at the
  start) or a first-order IIR ``lowpass`` ``y[t] = alpha * x[t] + (1 - alpha) * y[t-1]``;
- ``sensor.zscore``: ``(x - mean) / (std + eps)`` with fixed statistics from training or, when
  they are not given, the statistics of this series per channel;
- ``sensor.downsample``: keep every ``factor``-th sample (``decimate``) or average blocks of
  ``factor`` (``mean``, a trailing partial block is dropped);
- ``sensor.window``: sliding windows of ``size`` samples every ``stride`` samples, giving
  ``(N, size)`` or ``(N, size, C)``, at most ``MAX_WINDOW_VALUES`` (40 million) values in all;
  this ends the series ops.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from edgeslim._validate import json_kind
from edgeslim.edge.preprocess._spec import (
    ARRAY,
    SERIES,
    BuildContext,
    OpSpec,
    Param,
    choice,
    fail,
    float_range,
    int_range,
    number_or_list,
    optional,
    positive,
    register,
)
from edgeslim.errors import InferenceError

MAX_SAMPLES = 10_000_000
MAX_WINDOW_VALUES = 40_000_000
"""Most values ``sensor.window`` may give (windows x size x channels): overlapping windows
repeat each sample up to ``size`` times, so a small payload could otherwise ask for
gigabytes. The same bound as ``image.resize``'s ``MAX_RESIZED_PIXELS``."""


def to_series(raw: Any) -> np.ndarray:
    """A JSON array (``null`` = missing) to a float64 ``(T,)`` or ``(T, C)`` array."""
    if isinstance(raw, np.ndarray):
        arr = raw.astype(np.float64)
    else:
        if not isinstance(raw, list) or not raw:
            raise InferenceError(
                f"a sensor payload is a non-empty JSON array of numbers or of rows of numbers; "
                f"got {json_kind(raw)}"
            )
        arr, what = parse_numbers(raw, allow_null=True)
        if arr is None:
            raise InferenceError(f"a sensor payload holds {what}; send numbers (null for a "
                                 f"missing sample) in rows of equal length")
    if arr.ndim not in (1, 2) or arr.size == 0:
        raise InferenceError(
            f"a sensor payload must be (T,) or (T, C); got shape {list(arr.shape)}"
        )
    if arr.size > MAX_SAMPLES:
        raise InferenceError(f"a sensor payload has {arr.size} values; at most {MAX_SAMPLES}")
    if np.isinf(arr).any():
        raise InferenceError("a sensor payload holds an infinite value")
    return arr


_NOT_NUMBERS = (  # what a JSON payload holds instead of numbers, in the words of a message
    (str, "strings"), (bool, "true/false"), (np.bool_, "true/false"),
    (list, "arrays where numbers should be (rows of unequal length, or nested deeper)"),
    (dict, "objects"), (type(None), "null"),
)


def parse_numbers(raw: Any, *, allow_null: bool) -> tuple[np.ndarray | None, str]:
    """A parsed JSON array of numbers (``null`` as NaN when ``allow_null``) as float64, or
    ``(None, what)`` naming what it holds instead: a float64 conversion alone would read
    "1.5" as 1.5 and true as 1.0 (also among numbers), and null as NaN. One pass over the
    values, in C but for the type check."""
    try:
        obj = np.array(raw, dtype=object)
    except (ValueError, TypeError):
        return None, "rows of unequal length"
    bad = {t for t in set(map(type, obj.ravel()))
           if issubclass(t, (bool, np.bool_)) or not issubclass(t, numbers.Real)}
    if allow_null:
        bad.discard(type(None))
    if bad:
        return None, next((w for t, w in _NOT_NUMBERS if any(issubclass(b, t) for b in bad)),
                          "values that are not numbers")
    try:
        return obj.astype(np.float64), ""
    except OverflowError:
        return None, "a number beyond the range of float64"


def _impute(params: dict[str, Any], ctx: BuildContext) -> Any:
    method = params["method"]

    def step(x: np.ndarray) -> np.ndarray:
        nan = np.isnan(x)
        if not nan.any():
            return x
        if method == "drop":
            rows = nan if x.ndim == 1 else nan.any(axis=1)
            out = x[~rows]
            if out.shape[0] == 0:
                raise InferenceError("sensor.impute 'drop' removed every sample (all hold NaN)")
            return out
        if method == "zero":
            return np.where(nan, 0.0, x)
        x2 = x.reshape(x.shape[0], -1)
        nan2 = nan.reshape(x2.shape)
        out = x2.copy()
        for c in range(x2.shape[1]):
            col, miss = out[:, c], nan2[:, c]
            if miss.all():
                col[:] = 0.0
            elif method == "mean":
                col[miss] = col[~miss].mean()
            else:  # ffill: index of the last valid sample at or before t
                idx = np.where(~miss, np.arange(len(col)), 0)
                np.maximum.accumulate(idx, out=idx)
                first = int(np.argmax(~miss))
                idx[:first] = first
                col[:] = col[idx]
        return out.reshape(x.shape)

    return step


def _clip(params: dict[str, Any], ctx: BuildContext) -> Any:
    method = params["method"]
    threshold, lower, upper = params["threshold"], params["lower"], params["upper"]
    _verify_clip(params, "sensor.clip")

    def step(x: np.ndarray) -> np.ndarray:
        # Bounds from the samples present: a missing one (NaN) must not void its channel's.
        # numpy's nan-functions warn on a channel with no sample at all, and silencing that
        # with warnings.catch_warnings is not thread-safe: such channels are left out here.
        present = ~np.isnan(x)
        count = present.sum(axis=0)
        lo = np.full(x.shape[1:], np.nan)
        hi = np.full(x.shape[1:], np.nan)
        has = count > 0
        if method == "zscore":
            with np.errstate(invalid="ignore", divide="ignore"):  # thread-local
                mu = np.where(present, x, 0.0).sum(axis=0) / count
                sd = np.sqrt(np.where(present, (x - mu) ** 2, 0.0).sum(axis=0) / count)
            lo, hi = np.where(has, mu - threshold * sd, lo), np.where(has, mu + threshold * sd, hi)
        elif has.all():
            lo = np.nanpercentile(x, lower, axis=0)
            hi = np.nanpercentile(x, upper, axis=0)
        elif has.any():  # only (T, C) series can have both kinds of channels
            lo[has] = np.nanpercentile(x[:, has], lower, axis=0)
            hi[has] = np.nanpercentile(x[:, has], upper, axis=0)
        return np.clip(x, lo, hi)

    return step


def _verify_clip(params: dict[str, Any], where: str) -> None:
    if params["lower"] >= params["upper"]:
        raise fail("lower", where, f"below 'upper' ({params['upper']})", params["lower"])


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` samples (fewer at the start), along axis 0.

    Each mean is taken over its own window (not as a difference of running sums, where a
    missing sample or a spike long gone would leak into every later value): a window holding
    a NaN is NaN, the next ones are not.
    """
    x = np.asarray(x, dtype=np.float64) if x.dtype.kind != "f" else x
    n = x.shape[0]
    out = np.empty(x.shape, dtype=np.result_type(x.dtype, np.float32))
    head = min(window - 1, n)
    if head > 0:  # the first samples: the mean of all so far
        counts = np.arange(1, head + 1).reshape((-1,) + (1,) * (x.ndim - 1))
        out[:head] = np.cumsum(x[:head], axis=0) / counts
    if n >= window:
        out[window - 1:] = sliding_window_view(x, window, axis=0).mean(axis=-1)
    return out


def lowpass(x: np.ndarray, alpha: float) -> np.ndarray:
    """First-order IIR: ``y[0] = x[0]``, ``y[t] = alpha * x[t] + (1 - alpha) * y[t-1]``."""
    y = np.empty_like(x)
    y[0] = x[0]
    for t in range(1, x.shape[0]):
        y[t] = alpha * x[t] + (1.0 - alpha) * y[t - 1]
    return y


def _smooth(params: dict[str, Any], ctx: BuildContext) -> Any:
    method, window, alpha = params["method"], params["window"], params["alpha"]
    if method == "moving_average":
        return lambda x: moving_average(x, window)
    return lambda x: lowpass(x, alpha)


def _zscore(params: dict[str, Any], ctx: BuildContext) -> Any:
    mean, std, eps = params["mean"], params["std"], params["eps"]

    def step(x: np.ndarray) -> np.ndarray:
        mu = x.mean(axis=0) if mean is None else np.asarray(mean, dtype=np.float64)
        sd = x.std(axis=0) if std is None else np.asarray(std, dtype=np.float64)
        channels = 1 if x.ndim == 1 else x.shape[1]
        for label, v in (("mean", mu), ("std", sd)):
            if np.ndim(v) and v.size not in (1, channels):
                raise InferenceError(
                    f"sensor.zscore has {v.size} '{label}' values but the series has "
                    f"{channels} channels"
                )
        return (x - mu) / (sd + eps)

    return step


def _downsample(params: dict[str, Any], ctx: BuildContext) -> Any:
    factor, method = params["factor"], params["method"]

    def step(x: np.ndarray) -> np.ndarray:
        if method == "decimate":
            return x[::factor]
        n = x.shape[0] // factor
        if n == 0:
            raise InferenceError(
                f"sensor.downsample by {factor} needs at least {factor} samples; got {x.shape[0]}"
            )
        return x[: n * factor].reshape((n, factor, *x.shape[1:])).mean(axis=1)

    return step


def windows(x: np.ndarray, size: int, stride: int) -> np.ndarray:
    """``(N, size, ...)`` windows starting at 0, stride, 2*stride, ... that fit entirely."""
    if x.shape[0] < size:
        raise InferenceError(
            f"sensor.window of size {size} needs at least {size} samples; got {x.shape[0]}"
        )
    n = (x.shape[0] - size) // stride + 1
    per_window = size * (x.size // x.shape[0])  # samples x channels
    if n * per_window > MAX_WINDOW_VALUES:
        raise InferenceError(
            f"sensor.window of size {size} every {stride} samples gives {n} windows of "
            f"{per_window} values, {n * per_window} in all; at most {MAX_WINDOW_VALUES} are "
            f"allowed (send a shorter series)"
        )
    # a view on x (no copy): (N, ..., size) -> (N, size, ...)
    return np.moveaxis(sliding_window_view(x, size, axis=0)[::stride], -1, 1)


def _window(params: dict[str, Any], ctx: BuildContext) -> Any:
    size = params["size"]
    stride = params["stride"] or size
    return lambda x: windows(x, size, stride)


_S = frozenset({SERIES})
register(OpSpec(
    "sensor.impute", "pre", _S, SERIES,
    {"method": Param(choice("drop", "ffill", "mean", "zero"), "ffill")},
    _impute, "drop or fill missing readings",
))
register(OpSpec(
    "sensor.clip", "pre", _S, SERIES,
    {
        "method": Param(choice("zscore", "percentile"), "zscore"),
        "threshold": Param(positive(), 3.0, "zscore: clip beyond this many std"),
        "lower": Param(float_range(0.0, 100.0), 1.0, "percentile: lower percentile"),
        "upper": Param(float_range(0.0, 100.0), 99.0, "percentile: upper percentile"),
    },
    _clip, "clip outliers per channel", _verify_clip,
))
register(OpSpec(
    "sensor.smooth", "pre", _S, SERIES,
    {
        "method": Param(choice("moving_average", "lowpass"), "moving_average"),
        "window": Param(int_range(1, 100_000), 5, "moving_average: samples averaged"),
        "alpha": Param(float_range(0.0, 1.0, open_lo=True), 0.2, "lowpass: weight in (0, 1]"),
    },
    _smooth, "moving average or first-order low-pass",
))
register(OpSpec(
    "sensor.zscore", "pre", _S, SERIES,
    {
        "mean": Param(optional(number_or_list()), None, "fixed mean (default: this series')"),
        "std": Param(optional(number_or_list(positive_only=True)), None, "fixed std"),
        "eps": Param(positive(allow_zero=True), 1e-8),
    },
    _zscore, "z-score normalisation per channel",
))
register(OpSpec(
    "sensor.downsample", "pre", _S, SERIES,
    {
        "factor": Param(int_range(1, 100_000), doc="keep one sample in `factor`"),
        "method": Param(choice("decimate", "mean"), "decimate"),
    },
    _downsample, "reduce the sample rate",
))
register(OpSpec(
    "sensor.window", "pre", _S, ARRAY,
    {
        "size": Param(int_range(1, 1_000_000), doc="samples per window"),
        "stride": Param(optional(int_range(1, 1_000_000)), None, "default: size"),
    },
    _window, "sliding windows (N, size[, C])",
))

