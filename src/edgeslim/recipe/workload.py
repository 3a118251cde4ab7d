"""What a recipe needs besides the model: data to train on, data to judge with, a metric.

A ``Workload`` ties a model to its data: training batches ``(x, y)`` (optional), evaluation
batches ``(inputs, target)`` as numpy, the model's input/output names and symbolic axes, and a
``score(outputs, targets) -> float`` (higher is better) that judges the torch model and its
ONNX export alike. Built-in workloads exist for the zoo models; a user's model names one with
``data:`` in the recipe (``digits``), names a function of its own that returns a ``Workload``
(``data: package.module:callable``, see ``workload_for``), or passes a ``Workload`` from
Python.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim._callables import call_spec, import_callable, is_callable_spec
from edgeslim.errors import ConfigError

__all__ = ["DATA_ACCEPTED", "WORKLOADS", "Workload", "check_data", "check_zoo_data",
           "workload_for"]


@dataclass
class Workload:
    """Data, metric and I/O description for one model.

    ``eval_batches``: list of ``(inputs, target)`` where ``inputs`` is a tuple of numpy arrays
    in ``input_names`` order; ``score(outputs, targets)`` gets the first output and the
    targets concatenated over batches and returns a value in [0, 1].
    """

    name: str
    task: str
    train: Iterable[Any] | None
    eval_batches: list[tuple[tuple[np.ndarray, ...], np.ndarray]]
    metric: str
    score: Callable[[np.ndarray, np.ndarray], float]
    input_names: tuple[str, ...] = ("input",)
    output_names: tuple[str, ...] = ("logits",)
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    preprocessing: list[dict[str, Any]] = field(default_factory=list)
    postprocessing: list[dict[str, Any]] = field(default_factory=list)
    labels: list[str] | None = None
    extra_files: dict[str, Any] = field(default_factory=dict)
    #: inputs for post-training calibration, disjoint from ``eval_batches``
    calibration: list[tuple[np.ndarray, ...]] = field(default_factory=list)

    @property
    def example_inputs(self) -> tuple[Any, ...]:
        """Batch-1 torch tensors, in ``input_names`` order (for tracing and latency)."""
        import torch

        first = self.eval_batches[0][0]
        return tuple(torch.from_numpy(np.ascontiguousarray(a[:1])) for a in first)

    def _targets(self) -> np.ndarray:
        return np.concatenate([t for _, t in self.eval_batches])

    def evaluate(self, model: Any) -> float:
        """Score a torch model on the evaluation batches."""
        import torch

        outs = []
        model.eval()
        with torch.no_grad():
            for inputs, _ in self.eval_batches:
                out = model(*(torch.from_numpy(a) for a in inputs))
                outs.append(out.detach().numpy())
        return float(self.score(np.concatenate(outs), self._targets()))

    def evaluate_onnx(self, session: Any) -> float:
        """Score an onnxruntime session (or anything with ``run(None, feeds)``)."""
        outs = [
            session.run(None, dict(zip(self.input_names, inputs, strict=True)))[0]
            for inputs, _ in self.eval_batches
        ]
        return float(self.score(np.concatenate(outs), self._targets()))


def _top1(outputs: np.ndarray, targets: np.ndarray) -> float:
    return float((outputs.argmax(1) == targets).mean())


def _digits() -> Workload:
    from edgeslim.zoo.digits import digits_loaders, load_digits_split

    train, _ = digits_loaders(batch_size=64, seed=0)
    split = load_digits_split()
    return Workload(
        name="digits",
        task="image-classification",
        train=train,
        eval_batches=[((split.x_test,), split.y_test)],
        metric="accuracy",
        score=_top1,
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        preprocessing=[],
        postprocessing=[{"op": "softmax"}],
        labels=[str(i) for i in range(10)],
        calibration=[(split.x_train[i : i + 32],) for i in range(0, 256, 32)],
    )


def _shape_text(shape: Any) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def fit_onnx_inputs(proto: Any, input_names: tuple[str, ...], samples: list[tuple[Any, ...]],
                    data: str, where: str) -> tuple[str, ...]:
    """The names to feed the ONNX model ``proto`` the workload's inputs under, in the
    workload's order; a ``ConfigError`` naming both sides when they do not fit.

    The inputs must match in number and names (a model with one input is fed by position,
    whatever its name), rank, element type and every fixed dimension of every array in
    ``samples`` (tuples of arrays in ``input_names`` order). ``where`` names the model."""
    from onnx import helper

    known = {i.name for i in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in known]
    names, want = [v.name for v in inputs], list(input_names)
    if len(names) != len(want):
        raise ConfigError(f"{where} takes {len(names)} input(s) ({', '.join(names) or 'none'}), "
                          f"but the workload {data!r} feeds {len(want)} ({', '.join(want)}). "
                          f"Give data that fits the model ({DATA_ACCEPTED}).")
    if sorted(names) == sorted(want):
        feed = tuple(want)
    elif len(names) == 1:  # one input: fed by position, under the model's own name
        feed = (names[0],)
    else:
        raise ConfigError(f"{where} takes inputs named {', '.join(names)}, but the workload "
                          f"{data!r} feeds {', '.join(want)}.")
    for value in inputs:
        k = feed.index(value.name)
        tensor = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type) if tensor.elem_type else None
        dims = ([d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                 for d in tensor.shape.dim] if tensor.HasField("shape") else None)
        for arrays in samples:
            a = arrays[k]
            fits = dims is None or (len(dims) == a.ndim and all(
                not isinstance(d, int) or d == n for d, n in zip(dims, a.shape, strict=True)))
            if not fits or (dtype is not None and a.dtype != dtype):
                model_side = (f"{dtype} of shape {_shape_text(dims)}" if dims is not None
                              else str(dtype))
                raise ConfigError(
                    f"{where} takes input {value.name!r} as {model_side}, but the workload "
                    f"{data!r} feeds {a.dtype} of shape {_shape_text(a.shape)}. Give data that "
                    f"fits the model, or export it with a symbolic batch dimension.")
    return feed


def torch_fit_error(exc: Exception, data: str, input_names: tuple[str, ...],
                    arrays: tuple[Any, ...]) -> ConfigError:
    """The error for a torch model that raised ``exc`` on the workload's ``arrays``."""
    shapes = ", ".join(f"{n} {_shape_text(a.shape)}"
                       for n, a in zip(input_names, arrays, strict=True))
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return ConfigError(f"The model does not run on the inputs of the workload {data!r} "
                       f"({shapes}): {reason}. Give data that fits the model.")


def check_torch_fit(model: Any, wl: Workload) -> None:
    """Run ``model`` once on one example of ``wl``: a ``ConfigError`` when it does not take it."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*wl.example_inputs)
    except Exception as exc:  # whatever the model raises on inputs it does not take
        arrays = tuple(t.numpy() for t in wl.example_inputs)
        raise torch_fit_error(exc, wl.name, wl.input_names, arrays) from None
    finally:
        model.train(was_training)


def _reference_outputs(reference: Any, batches: list[tuple[tuple[np.ndarray, ...], Any]],
                       input_names: tuple[str, ...], data: str) -> list:
    """The first output of ``reference`` on each batch: an ``nn.Module``, or the path of an
    ONNX model (a user's own fp32 graph, run on onnxruntime)."""
    if isinstance(reference, (str, Path)):
        import onnx

        from edgeslim._ort import ort_session

        feed = fit_onnx_inputs(onnx.load(str(reference)), input_names,
                               [inputs for inputs, _ in batches], data,
                               f"The ONNX model {str(reference)!r}")
        session = ort_session(Path(reference))
        return [session.run(None, dict(zip(feed, inputs, strict=True)))[0]
                for inputs, _ in batches]
    import torch

    reference.eval()
    outs = []
    with torch.no_grad():
        for inputs, _ in batches:
            try:
                out = reference(*(torch.from_numpy(a) for a in inputs))
            except Exception as exc:  # whatever the model raises on inputs it does not take
                raise torch_fit_error(exc, data, input_names, inputs) from None
            outs.append(out.numpy())
    return outs


def _photos(reference: Any = None, n_eval: int = 200) -> Workload:
    """Crops of real photos: top-1 agreement with the fp32 ``reference`` (EfficientNet-Lite0
    when None)."""
    from edgeslim.datasets import photo_crops
    from edgeslim.zoo import load_model

    # the int8 preset sets ranges on the first 160 and tunes on all 2,048 (~1.2 GB)
    calib = photo_crops(2048, split="calibration")
    reference = reference if reference is not None else load_model("efficientnet-lite0")
    crops = photo_crops(n_eval, split="evaluation")
    batches = [((crops[i : i + 25],), None) for i in range(0, len(crops), 25)]
    targets = [o.argmax(1) for o in _reference_outputs(reference, batches, ("input",),
                                                         "photos")]
    return Workload(
        name="photos",
        task="image-classification",
        train=None,
        eval_batches=[(b[0], t) for b, t in zip(batches, targets, strict=True)],
        metric="top1_agreement",
        score=_top1,
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        preprocessing=[
            {"op": "image.decode", "mode": "RGB"},
            # the rounding modes reproduce zoo.efficientnet.preprocess_image bit for bit
            {"op": "image.resize", "size": 224, "rounding": "round"},
            {"op": "image.center_crop", "size": 224, "rounding": "floor"},
            {"op": "image.scale"},
            {"op": "image.normalize", "mean": 0.5, "std": 0.5},
            {"op": "image.layout", "layout": "NCHW"},
        ],
        postprocessing=[{"op": "softmax"}, {"op": "topk", "k": 5}],
        labels=_imagenet_labels(),
        calibration=[(calib[i : i + 8],) for i in range(0, len(calib), 8)],
    )


def _imagenet_labels() -> list[str] | None:
    from edgeslim.zoo.efficientnet import imagenet_labels

    labels = imagenet_labels()
    return list(labels) if labels else None


def _mean_cosine(outputs: np.ndarray, targets: np.ndarray) -> float:
    a = outputs / np.linalg.norm(outputs, axis=1, keepdims=True)
    b = targets / np.linalg.norm(targets, axis=1, keepdims=True)
    return float((a * b).sum(1).mean())


def _sentences(reference: Any = None, n_eval: int = 300) -> Workload:
    """Real English sentences: mean cosine to the fp32 ``reference``'s embeddings (MiniLM-L6
    when None)."""
    from edgeslim.datasets import english_sentences
    from edgeslim.zoo import load_model
    from edgeslim.zoo.minilm import encode, minilm_tokenizer_json

    reference = reference if reference is not None else load_model("minilm-l6")
    sentences = english_sentences(n_eval, split="evaluation")
    batches = []
    for i in range(0, len(sentences), 50):
        ids, mask = encode(sentences[i : i + 50])
        batches.append(((ids.numpy(), mask.numpy()), None))
    targets = _reference_outputs(reference, batches, ("input_ids", "attention_mask"),
                                 "sentences")
    calib_sentences = english_sentences(128, split="calibration")
    calibration = []
    for i in range(0, len(calib_sentences), 16):
        ids, mask = encode(calib_sentences[i : i + 16])
        calibration.append((ids.numpy(), mask.numpy()))
    return Workload(
        name="sentences",
        task="sentence-embedding",
        train=None,
        eval_batches=[(b[0], t) for b, t in zip(batches, targets, strict=True)],
        metric="mean_cosine",
        score=_mean_cosine,
        input_names=("input_ids", "attention_mask"),
        output_names=("embedding",),
        dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                      "attention_mask": {0: "batch", 1: "sequence"},
                      "embedding": {0: "batch"}},
        preprocessing=[{"op": "text.tokenize", "tokenizer": "tokenizer.json",
                        "max_length": 128, "padding": "longest"}],
        postprocessing=[],
        extra_files={"tokenizer.json": minilm_tokenizer_json(128).encode("utf-8")},
        calibration=calibration,
    )


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "digits": _digits,
    "photos": _photos,
    "sentences": _sentences,
}
#: the workload each zoo model is judged on
ZOO_WORKLOAD = {"digits-mlp": "digits", "digits-cnn": "digits",
                 "efficientnet-lite0": "photos", "minilm-l6": "sentences"}


#: what may name a workload (a recipe's ``data:``, ``--data``), for the messages
DATA_ACCEPTED = (f"one of {', '.join(repr(k) for k in sorted(WORKLOADS))}, or "
                 "'package.module:callable' returning a Workload")


def check_data(value: Any, name: str, func: str) -> str:
    """A data name: a built-in workload or ``'package.module:callable'``, checked by its form
    only (the callable is imported and called when the workload is built, by
    ``workload_for``)."""
    if isinstance(value, str) and (value in WORKLOADS or is_callable_spec(value)):
        return value
    raise ConfigError(f"The '{name}' parameter of {func} must be {DATA_ACCEPTED}. "
                      f"Got {value!r} instead.")


def check_zoo_data(model_name: str | None, data: str | None, given: str) -> None:
    """A zoo model is judged on its own workload: refuse another one (``given`` says where it
    was named, for the message), before the model is loaded."""
    own = ZOO_WORKLOAD.get(model_name or "")
    if own is not None and data is not None and data != own:
        raise ConfigError(f"The zoo model {model_name!r} takes its own data ({own!r}); "
                          f"{given} {data!r} does not fit it. Drop it or give {own!r}.")


def workload_for(
    model_name: str | None, data: str | None = None, *, reference: Any = None
) -> Workload:
    """The workload named ``data``, else the built-in one of zoo model ``model_name``.

    ``reference`` is the original model for workloads that judge fidelity to it (photos,
    sentences): an ``nn.Module``, or the path of a user's fp32 ONNX model, which is then
    judged against its own outputs; the zoo model is loaded when not
    given.

    ``data`` may also be ``'package.module:callable'``: a function of the user's returning a
    ``Workload``, imported as MODEL's callables are. It follows the built-ins' rule: called
    with ``reference`` when it takes a positional parameter (``def data(model)``), with no
    arguments when it takes none (``def data()``).
    """
    key = data or ZOO_WORKLOAD.get(model_name or "")
    if key is None:
        raise ConfigError(
            f"No data is known for model {model_name!r}: name a data source with 'data:' in the "
            f"recipe ({DATA_ACCEPTED}) or pass a Workload from Python."
        )
    if is_callable_spec(key):
        return _custom_workload(key, reference)
    if key not in WORKLOADS:
        raise ConfigError(f"Unknown data source {key!r}. Allowed: {DATA_ACCEPTED}.")
    builder = WORKLOADS[key]
    return builder(*_arguments(key, builder, reference))


def _arguments(spec: str, fn: Callable[..., Any], reference: Any) -> tuple[Any, ...]:
    """What a workload function is called with: ``(reference,)`` when it takes a positional
    parameter, ``()`` when it takes none; a ``ConfigError`` when it requires more."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to read (some builtins): no arguments
        return ()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                  p.VAR_POSITIONAL)]
    extra = [p.name for p in params if p.default is p.empty
             and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
             and (not positional or p is not positional[0])]
    if extra:
        raise ConfigError(f"{spec!r} requires the parameter(s) {', '.join(extra)}; a data "
                          f"callable takes none, or one: the original model. "
                          f"Expected {DATA_ACCEPTED}.")
    return (reference,) if positional else ()


def _custom_workload(spec: str, reference: Any) -> Workload:
    """The ``Workload`` that the user's ``'package.module:callable'`` returns."""
    fn = import_callable(spec, accepted=DATA_ACCEPTED, error=ConfigError)
    wl = call_spec(spec, fn, *_arguments(spec, fn, reference), accepted=DATA_ACCEPTED,
                   error=ConfigError)
    if not isinstance(wl, Workload):
        raise ConfigError(f"{spec!r} returned {type(wl).__name__}, not a Workload "
                          f"(edgeslim.recipe.workload.Workload). Expected {DATA_ACCEPTED}.")
    if not isinstance(wl.eval_batches, list) or not wl.eval_batches:
        raise ConfigError(f"The Workload of {spec!r} has no evaluation batches "
                          f"(eval_batches: a list of (inputs, target)); the bundle's metric is "
                          f"measured on them. Give at least one.")
    return wl
