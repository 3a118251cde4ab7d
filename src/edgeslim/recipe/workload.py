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
    )


WORKLOADS: dict[str, Callable[[], Workload]] = {"digits": _digits}
_ZOO_WORKLOAD = {"digits-mlp": "digits", "digits-cnn": "digits"}


def workload_for(model_name: str | None, data: str | None = None) -> Workload:
    """The workload named ``data``, else the built-in one of zoo model ``model_name``."""
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
    return WORKLOADS[key]()
