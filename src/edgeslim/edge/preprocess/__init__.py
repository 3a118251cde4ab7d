"""Preprocessing and postprocessing steps declared as data in a bundle's manifest.

A step is ``{"op": NAME, **params}``. The registry below is the one place that knows the ops;
``validate_steps`` checks a list of steps (the bundle writer calls it at build time, so a bad
step is refused before a bundle exists) and ``Pipeline`` / ``PostPipeline`` run them on a node.

Preprocessing ops (raw input -> model inputs):

- images (raw: JPEG/PNG bytes): ``image.decode``, ``image.resize``, ``image.center_crop``,
  ``image.scale``, ``image.normalize``, ``image.layout``;
- text (raw: a string or list of strings): ``text.tokenize``;
- sensor streams (raw: JSON array ``(T,)`` or ``(T, C)``, ``null`` = missing):
  ``sensor.impute``, ``sensor.clip``, ``sensor.smooth``, ``sensor.zscore``,
  ``sensor.downsample``, ``sensor.window``;
- any numeric array: ``reshape``, ``transpose``, ``expand_dims``, ``cast``.

Postprocessing ops (model outputs -> answer): ``mean_pool``, ``l2_normalize``, ``softmax``,
``topk``.

Example::

    >>> steps = [{"op": "sensor.impute", "method": "zero"}, {"op": "reshape", "shape": [1, -1]}]
    >>> validate_steps(steps)
    >>> Pipeline(steps, inputs=[{"name": "x", "dtype": "float32"}]).apply([1.0, None])["x"]
    array([[1., 0.]], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from edgeslim.edge.preprocess import array as _array
from edgeslim.edge.preprocess import image as _image  # noqa: F401
from edgeslim.edge.preprocess import post as _post
from edgeslim.edge.preprocess import sensor as _sensor
from edgeslim.edge.preprocess import text as _text  # noqa: F401
from edgeslim.edge.preprocess._spec import (
    ARRAY,
    BYTES,
    FINAL_KINDS,
    HWC,
    REGISTRY,
    SERIES,
    TEXT,
    TOKENS,
    BuildContext,
    OpSpec,
)
from edgeslim.errors import ConfigError, InferenceError

__all__ = [
    "REGISTRY",
    "Pipeline",
    "PostPipeline",
    "allowed_ops",
    "validate_steps",
]

_STAGE_LABEL = {"pre": "preprocessing", "post": "postprocessing"}


def allowed_ops(stage: str | None = None) -> list[str]:
    """Names of the registered ops, for ``stage`` ``"pre"``/``"post"`` or all."""
    return sorted(n for n, s in REGISTRY.items() if stage is None or s.stage == stage)


def _check(
    steps: Any, stage: str | None, files: Collection[str] | None
) -> tuple[str, list[tuple[OpSpec, dict[str, Any]]]]:
    """Validate and normalise ``steps``; returns the stage and ``(spec, params)`` pairs."""
    if stage is not None and stage not in _STAGE_LABEL:
        raise ConfigError(f"stage must be 'pre' or 'post'; got {stage!r}")
    if not isinstance(steps, (list, tuple)):
        raise ConfigError(
            f"processing steps must be a list of {{'op': NAME, ...}} objects; "
            f"got {type(steps).__name__}"
        )
    out: list[tuple[OpSpec, dict[str, Any]]] = []
    kind: str | None = None
    for i, step in enumerate(steps):
        label = _STAGE_LABEL.get(stage or "", "processing")
        if not isinstance(step, Mapping) or not isinstance(step.get("op"), str):
            raise ConfigError(
                f"{label} step {i} must be an object with a string 'op'; got {step!r}"
            )
        op = step["op"]
        spec = REGISTRY.get(op)
        if spec is None:
            raise ConfigError(
                f"{label} step {i}: unknown op {op!r}; allowed ops: "
                + ", ".join(allowed_ops(stage))
            )
        if stage is None:
            stage = spec.stage
            label = _STAGE_LABEL[stage]
        if spec.stage != stage:
            raise ConfigError(
                f"{label} step {i}: op {op!r} is a {_STAGE_LABEL[spec.stage]} op; "
                f"{label} ops are: " + ", ".join(allowed_ops(stage))
            )
        where = f"{label} step {i} (op '{op}')"
        unknown = sorted(set(step) - {"op"} - set(spec.params))
        if unknown:
            raise ConfigError(
                f"{where} has no parameter {unknown[0]!r}; allowed parameters: "
                + (", ".join(spec.params) or "none")
            )
        params: dict[str, Any] = {}
        for name, p in spec.params.items():
            if name in step:
                params[name] = p.check(step[name], name, where)
            elif p.required:
                raise ConfigError(f"{where} needs the parameter {name!r} ({p.doc})")
            else:
                params[name] = p.default
        if spec.verify is not None:
            spec.verify(params, where)
        if spec.stage == "pre":
            if kind is not None and kind not in spec.accepts:
                prev = out[-1][0].name
                raise ConfigError(
                    f"{where} takes {' or '.join(sorted(spec.accepts))} input, but step {i - 1} "
                    f"(op '{prev}') gives {kind}; reorder the steps"
                )
            kind = spec.produces
        if files is not None and op == "text.tokenize" and params["tokenizer"] not in files:
            raise ConfigError(
                f"{where} names the file {params['tokenizer']!r}, which the bundle does not "
                f"carry; files: {', '.join(sorted(files)) or 'none'}"
            )
        out.append((spec, params))
    if stage == "pre" and kind is not None and kind not in FINAL_KINDS:
        hint = {
            "image": "add image.scale (and image.layout)",
            "bytes": "add image.decode",
            "text": "add text.tokenize",
        }.get(kind, "")
        raise ConfigError(f"preprocessing ends with {kind}, which is no model input; {hint}")
    return stage or "pre", out


def validate_steps(
    steps: list[dict[str, Any]],
    *,
    stage: str | None = None,
    files: Collection[str] | None = None,
    outputs: Sequence[Any] | None = None,
) -> None:
    """Raise ``ConfigError`` unless ``steps`` is a valid pre- or postprocessing list.

    ``stage`` is ``"pre"`` or ``"post"``; by default it is taken from the first step and every
    step must share it. ``files``, when given, are the names of the extra files the bundle
    carries, so a step naming a missing file (``text.tokenize``'s ``tokenizer``) is refused.
    ``outputs``, when given, are the model outputs from the manifest (``{"name", "shape",
    ...}``), so a postprocessing step that cannot work on its output's rank (an ``axis`` out
    of range, ``mean_pool`` on an output that is not ``(B, L, H)``) is refused.
    The message names the step index, the op, the bad parameter and what is allowed.
    """
    stage, checked = _check(steps, stage, files)
    if stage == "post" and outputs is not None:
        _check_ranks(checked, outputs)


def _check_ranks(checked: list[tuple[OpSpec, dict[str, Any]]], outputs: Sequence[Any]) -> None:
    ranks: dict[str, int] = {}
    for item in outputs:
        if isinstance(item, str):
            continue
        shape = item.get("shape") if isinstance(item, Mapping) else getattr(item, "shape", None)
        if isinstance(shape, (list, tuple)):
            ranks[item["name"] if isinstance(item, Mapping) else item.name] = len(shape)
    names = [n for n, _ in _input_specs(outputs)]
    _post.check_ranks([(spec.name, params) for spec, params in checked], ranks,
                      names[0] if names else None)


def _input_specs(inputs: Sequence[Any] | None) -> list[tuple[str, np.dtype | None]]:
    specs = []
    for item in inputs or []:
        if isinstance(item, str):
            specs.append((item, None))
        else:
            name = item["name"] if isinstance(item, Mapping) else item.name
            dt = item.get("dtype") if isinstance(item, Mapping) else getattr(item, "dtype", None)
            specs.append((name, np.dtype(dt) if dt is not None else None))
    return specs


class Pipeline:
    """Runs preprocessing steps on one raw payload, giving the model's input arrays.

    ``inputs`` are the model inputs from the manifest (``{"name", "dtype", ...}`` dicts or
    names): a single array result goes to the only input, a token dict is filtered to the
    declared names, and every array is cast to the declared dtype. ``files`` maps bundle file
    names to bytes (for ``text.tokenize``).
    """

    def __init__(
        self,
        steps: list[dict[str, Any]],
        *,
        inputs: Sequence[Any] | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        _, checked = _check(steps, "pre", None)
        self.inputs = _input_specs(inputs)
        ctx = BuildContext(files=dict(files or {}), input_names=[n for n, _ in self.inputs])
        self._fns = [spec.build(params, ctx) for spec, params in checked]
        first = checked[0][0].accepts if checked else frozenset({ARRAY})
        self.raw_kind: str = (
            BYTES if BYTES in first else TEXT if TEXT in first else
            SERIES if first == frozenset({SERIES}) else ARRAY
        )
        """What the raw payload must be: ``bytes`` (an image), ``text``, ``series``, ``array``."""

    def apply(self, raw: Any) -> dict[str, np.ndarray]:
        """Raw payload -> ``{input name: array}``; bad payloads raise ``InferenceError``."""
        return self.apply_with_context(raw)[0]

    def apply_with_context(
        self, raw: Any
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``apply``, plus the postprocessing context: every array preprocessing gave, also
        those the model does not take (``text.tokenize``'s ``attention_mask`` for
        ``mean_pool`` when the model takes only ``input_ids``)."""
        if self.raw_kind == SERIES:
            value: Any = _sensor.to_series(raw)
        elif self.raw_kind == ARRAY:
            value = _to_array(raw)
        else:
            value = raw
        # Extreme values overflow to inf or NaN; the answer says so (a 422 at the server, or a
        # 400 when a value does not fit the input's dtype), so numpy's warnings would only
        # repeat it in the log.
        with np.errstate(over="ignore", invalid="ignore"):
            for fn in self._fns:
                value = fn(value)
            inputs = self._to_inputs(value)
        return inputs, ({**value, **inputs} if isinstance(value, dict) else dict(inputs))

    def _to_inputs(self, value: Any) -> dict[str, np.ndarray]:
        if isinstance(value, dict):
            if not self.inputs:
                return value
            missing = [n for n, _ in self.inputs if n not in value]
            if missing:
                raise InferenceError(
                    f"preprocessing gives {sorted(value)} but the model also needs {missing}"
                )
            return {n: _cast(value[n], dt, n) for n, dt in self.inputs}
        if len(self.inputs) > 1:
            raise InferenceError(
                f"preprocessing gives one array but the model has {len(self.inputs)} inputs: "
                f"{[n for n, _ in self.inputs]}"
            )
        name, dt = self.inputs[0] if self.inputs else ("input", None)
        return {name: _cast(np.asarray(value), dt, name)}


def _to_array(raw: Any) -> np.ndarray:
    if isinstance(raw, np.ndarray):
        return raw
    arr, what = _sensor.parse_numbers(raw, allow_null=False)
    if arr is None:
        raise InferenceError(f"the payload holds {what}; send a JSON array of numbers")
    if np.isinf(arr).any():
        raise InferenceError("the payload holds an infinite value (Infinity, or a number beyond "
                             "the range of float64 such as 1e400); send finite numbers")
    if arr.size > _sensor.MAX_SAMPLES:
        raise InferenceError(f"the payload has {arr.size} values; at most {_sensor.MAX_SAMPLES}")
    return arr


def _cast(arr: np.ndarray, dt: np.dtype | None, name: str) -> np.ndarray:
    if dt is None or arr.dtype == dt:
        return np.asarray(arr, order="C")  # not ascontiguousarray: a scalar stays rank 0
    return np.asarray(_array.cast_exactly(arr, dt, f"input '{name}'"), order="C")


class PostPipeline:
    """Runs postprocessing steps on the model's outputs.

    ``apply(outputs, context)`` takes ``{output name: array}`` and what preprocessing gave
    (the context from ``Pipeline.apply_with_context``, e.g. ``attention_mask`` for
    ``mean_pool``, also when the model does not take it) and returns the results: the outputs,
    transformed, plus ``"topk"`` when that step runs.
    """

    def __init__(
        self,
        steps: list[dict[str, Any]],
        *,
        outputs: Sequence[Any] | None = None,
        labels: list[str] | None = None,
    ) -> None:
        _, checked = _check(steps, "post", None)
        if outputs is not None:
            _check_ranks(checked, outputs)
        names = [n for n, _ in _input_specs(outputs)]
        ctx = BuildContext(labels=list(labels) if labels else None, output_names=names)
        self._fns = [spec.build(params, ctx) for spec, params in checked]

    def apply(
        self, outputs: Mapping[str, np.ndarray], context: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, Any]:
        results: dict[str, Any] = dict(outputs)
        ctx = dict(context or {})
        with np.errstate(over="ignore", invalid="ignore"):  # as in ``Pipeline.apply``
            for fn in self._fns:
                results = fn(results, ctx)
        return results


# Kinds re-exported for callers that route raw payloads.
KINDS = {"bytes": BYTES, "text": TEXT, "series": SERIES, "array": ARRAY, "hwc": HWC,
         "tokens": TOKENS}
