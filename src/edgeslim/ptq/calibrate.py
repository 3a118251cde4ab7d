"""Calibration data: any user data turned into onnxruntime feed dicts.

The user's data enters through ``edgeslim.data.Dataset`` (or any iterable). Each item may be

- a dict ``{input_name: array}`` (what onnxruntime takes),
- a numpy array or torch tensor for a single-input model, with or without the batch axis,
- a tuple/list with one array per model input, in the model's input order,
- an ``(inputs, label)`` pair for a single-input model (the label is ignored),

and a whole numpy array ``(N, ...)`` is split into batches of ``batch_size``. Arrays are cast
to the dtype the model declares. ``FeedReader`` wraps the feeds as onnxruntime's
``CalibrationDataReader``, which ``quantize_static`` consumes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from edgeslim.data import Dataset
from edgeslim.errors import ConfigError

__all__ = ["CALIBRATION_METHODS", "FeedReader", "InputSpec", "input_specs", "to_feeds"]

#: Ways of turning observed activations into a quantization range.
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")

def _numpy_dtype(elem_type: int, name: str) -> Any:
    """The numpy dtype of an ONNX tensor element type (uint8 pixels, int64 token ids, ...)."""
    from onnx import helper

    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"The model's input {name!r} has ONNX element type {elem_type}, which has no numpy "
            "dtype to feed it with.") from None


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype and rank (number of axes, batch included)."""

    name: str
    dtype: Any
    rank: int
    #: the fixed size of each axis, None where the graph leaves it free (batch, sequence)
    dims: tuple[int | None, ...] = ()


def input_specs(model: Any) -> list[InputSpec]:
    """The real inputs of ``model`` (initializers listed as inputs are skipped)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        specs.append(
            InputSpec(
                value.name,
                _numpy_dtype(tensor.elem_type, value.name),
                len(tensor.shape.dim),
                tuple(d.dim_value if d.HasField("dim_value") else None
                      for d in tensor.shape.dim),
            )
        )
    return specs


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _fit(value: Any, spec: InputSpec, where: str) -> np.ndarray:
    arr = _as_array(value)
    if arr.ndim == spec.rank - 1:
        arr = arr[None]
    if arr.ndim != spec.rank:
        raise ConfigError(
            f"Calibration item {where} for input {spec.name!r} has {arr.ndim} axes; the model "
            f"expects {spec.rank} (batch first) or {spec.rank - 1} (one sample)."
        )
    for axis, (want, got) in enumerate(zip(spec.dims, arr.shape, strict=False)):
        if want is not None and want != got:
            shape = ["?" if d is None else d for d in spec.dims]
            raise ConfigError(
                f"Calibration item {where} for input {spec.name!r} has shape "
                f"{list(arr.shape)}; the model expects {shape} (axis {axis} is {got}, not "
                f"{want}).")
    if spec.dtype.kind in "iu" and arr.dtype != spec.dtype and arr.size:
        info = np.iinfo(spec.dtype)
        lo, hi = arr.min(), arr.max()
        fractions = arr.dtype.kind not in "iub" and not np.array_equal(arr, np.round(arr))
        if fractions or lo < info.min or hi > info.max:
            raise ConfigError(
                f"Calibration item {where} for input {spec.name!r} holds {arr.dtype} values "
                f"from {lo} to {hi}; the model takes {spec.dtype} (whole numbers from "
                f"{info.min} to {info.max}), and casting would change them.")
    return np.ascontiguousarray(arr.astype(spec.dtype, copy=False))


def _item_to_feed(item: Any, specs: list[InputSpec], where: str) -> dict[str, np.ndarray]:
    names = [s.name for s in specs]
    if isinstance(item, dict):
        missing = [n for n in names if n not in item]
        if missing:
            raise ConfigError(
                f"Calibration item {where} lacks model input(s) {missing}; it has "
                f"{sorted(item)}. The model's inputs are {names}."
            )
        return {s.name: _fit(item[s.name], s, where) for s in specs}
    if isinstance(item, (tuple, list)):
        if len(item) == len(specs):
            return {s.name: _fit(v, s, where) for s, v in zip(specs, item, strict=False)}
        if len(specs) == 1 and len(item) == 2:  # (inputs, label)
            return {specs[0].name: _fit(item[0], specs[0], where)}
        raise ConfigError(
            f"Calibration item {where} is a sequence of {len(item)} values; the model has "
            f"{len(specs)} input(s) {names}. Give one value per input, or a dict."
        )
    if len(specs) != 1:
        raise ConfigError(
            f"Calibration item {where} is a single array but the model has inputs {names}. "
            "Give a dict {name: array} or a tuple with one array per input."
        )
    return {specs[0].name: _fit(item, specs[0], where)}


def to_feeds(data: Any, model: Any, *, batch_size: int = 8, limit: int | None = None) -> list[dict]:
    """Materialise calibration/evaluation ``data`` as a list of onnxruntime feed dicts.

    ``data``: an ``edgeslim.data.Dataset``, any iterable of items (see module docstring), or
    one numpy array ``(N, ...)`` for a single-input model. ``limit`` caps the number of
    samples (rows) taken. Raises ``ConfigError`` for empty data or items that do not fit.
    """
    specs = input_specs(model)
    if not specs:
        raise ConfigError("The model declares no inputs, so there is nothing to calibrate.")
    if isinstance(data, np.ndarray) or hasattr(data, "detach"):
        arr = _as_array(data)
        if len(specs) != 1:
            raise ConfigError(
                f"A single array was given but the model has inputs {[s.name for s in specs]}."
            )
        arr = _fit(arr, specs[0], "(the array)")
        items: Iterable[Any] = (arr[i : i + batch_size] for i in range(0, len(arr), batch_size))
    elif isinstance(data, Dataset) or hasattr(data, "__iter__"):
        items = data
    else:
        raise ConfigError(
            f"Calibration data must be an edgeslim.data.Dataset, an iterable or a numpy array. "
            f"Got {type(data).__name__} instead."
        )
    feeds: list[dict] = []
    rows = 0
    for i, item in enumerate(items):
        feed = _item_to_feed(item, specs, f"#{i}")
        if limit is not None and rows + len(next(iter(feed.values()))) > limit:
            take = limit - rows
            if take <= 0:
                break
            feed = {k: v[:take] for k, v in feed.items()}
        feeds.append(feed)
        rows += len(next(iter(feed.values())))
        if limit is not None and rows >= limit:
            break
    if not feeds:
        raise ConfigError("The calibration data is empty; give at least one sample.")
    return feeds


class FeedReader(CalibrationDataReader):
    """onnxruntime ``CalibrationDataReader`` over a list of feed dicts (re-iterable)."""

    def __init__(self, feeds: list[dict]):
        self._feeds = feeds
        self._i = 0

    def get_next(self) -> dict | None:
        if self._i >= len(self._feeds):
            return None
        self._i += 1
        return self._feeds[self._i - 1]

    def rewind(self) -> None:
        self._i = 0

    def __len__(self) -> int:
        return len(self._feeds)
