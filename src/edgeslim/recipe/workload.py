"""What a recipe needs besides the model: data to train on, data to judge with, a metric.

A ``Workload`` ties a model to its data: training batches ``(x, y)`` (optional), evaluation
batches, example inputs for tracing, and ``evaluate(model) -> float`` (higher is better).
Built-in workloads exist for the zoo models; a user's model names one with ``data:`` in the
recipe (``digits``) or passes a ``Workload`` from Python.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from edgeslim.errors import ConfigError

__all__ = ["WORKLOADS", "Workload", "workload_for"]


@dataclass
class Workload:
    """Data and metric for one model.

    ``train``: re-iterable ``(x, y)`` batches or None (data-free steps only);
    ``eval``: re-iterable ``(x, y)`` batches; ``example_inputs``: a tensor (or tuple) of batch 1;
    ``metric``: the metric's name; ``evaluate(model)``: its value in [0, 1], higher is better.
    """

    name: str
    train: Iterable[Any] | None
    eval: Iterable[Any]
    example_inputs: Any
    metric: str
    evaluate: Callable[[Any], float]
    input_names: tuple[str, ...] = ("input",)
    output_names: tuple[str, ...] = ("logits",)


def _digits() -> Workload:
    import torch

    from edgeslim.compress.train import accuracy
    from edgeslim.zoo.digits import digits_loaders

    train, test = digits_loaders(batch_size=64, seed=0)
    return Workload(
        name="digits",
        train=train,
        eval=test,
        example_inputs=torch.zeros(1, 64),
        metric="accuracy",
        evaluate=lambda model: accuracy(model, test),
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
