"""What a recipe needs besides the model: data to train on, data to judge with, a metric.

A ``Workload`` ties a model to its data: training batches ``(x, y)`` (optional), evaluation
batches ``(inputs, target)`` as numpy, the model's input/output names and symbolic axes, and a
``score(outputs, targets) -> float`` (higher is better) that judges the torch model and its
ONNX export alike. Built-in workloads exist for the zoo models; a user's model names one with
``data:`` in the recipe (``digits``) or passes a ``Workload`` from Python.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim.errors import ConfigError

__all__ = ["WORKLOADS", "Workload", "workload_for"]


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


def _reference_outputs(reference: Any, batches: list[tuple[tuple[np.ndarray, ...], Any]]) -> list:
    """The first output of ``reference`` on each batch: an ``nn.Module``, or an ONNX model (a
    path or an ``onnx.ModelProto``: a user's own fp32 graph, run on onnxruntime, its inputs fed
    in order)."""
    if isinstance(reference, (str, Path)) or hasattr(reference, "graph"):
        from edgeslim._ort import ort_session

        session = ort_session(Path(reference) if isinstance(reference, str) else reference)
        names = [i.name for i in session.get_inputs()]
        return [session.run(None, dict(zip(names, inputs, strict=True)))[0]
                for inputs, _ in batches]
    import torch

    reference.eval()
    with torch.no_grad():
        return [reference(*(torch.from_numpy(a) for a in inputs)).numpy()
                for inputs, _ in batches]


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
    targets = [o.argmax(1) for o in _reference_outputs(reference, batches)]
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
    targets = _reference_outputs(reference, batches)
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
_ZOO_WORKLOAD = {"digits-mlp": "digits", "digits-cnn": "digits",
                 "efficientnet-lite0": "photos", "minilm-l6": "sentences"}


def workload_for(
    model_name: str | None, data: str | None = None, *, reference: Any = None
) -> Workload:
    """The workload named ``data``, else the built-in one of zoo model ``model_name``.

    ``reference`` is the original model for workloads that judge fidelity to it (photos,
    sentences): an ``nn.Module``, or the path (or ``onnx.ModelProto``) of a user's fp32 ONNX
    model, which is then judged against its own outputs; the zoo model is loaded when not
    given.
    """
    key = data or _ZOO_WORKLOAD.get(model_name or "")
    if key is None:
        raise ConfigError(
            f"No data is known for model {model_name!r}: name a data source with 'data:' in the "
            f"recipe (one of {', '.join(sorted(WORKLOADS))}) or pass a Workload from Python."
        )
    if key not in WORKLOADS:
        raise ConfigError(
            f"Unknown data source {key!r}. Allowed: {', '.join(sorted(WORKLOADS))}."
        )
    if key == "digits":
        return WORKLOADS[key]()
    return WORKLOADS[key](reference)
