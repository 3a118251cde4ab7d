"""A user's own model and data, named as 'package.module:callable' (``tests.cli._custom_data:
digits_top2``) by the recipes of tests/cli/test_custom_data.py; also the ways such a callable
goes wrong."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from edgeslim.recipe.workload import Workload

#: not a function: a spec naming it is refused
NOT_CALLABLE = 3


def mlp() -> nn.Module:
    """A small untrained MLP on the 64 digit pixels: a user's own model."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits, pixels in [0, 1]: x_train, x_test, y_train, y_test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    return train_test_split((x / 16).astype(np.float32), y.astype(np.int64), test_size=0.25,
                            random_state=0, stratify=y)


def top2(outputs: np.ndarray, targets: np.ndarray) -> float:
    """The share of rows whose label is among the two highest outputs."""
    best2 = np.argsort(outputs, axis=1)[:, -2:]
    return float((best2 == targets[:, None]).any(1).mean())


def digits_top2() -> Workload:
    """Takes no parameter: labelled digits, judged by top-2 accuracy."""
    x_train, x_test, y_train, y_test = digits_split()
    train = [(torch.from_numpy(x_train[i : i + 64]), torch.from_numpy(y_train[i : i + 64]))
             for i in range(0, len(x_train), 64)]
    return Workload(
        name="my-digits",
        task="image-classification",
        train=train,
        eval_batches=[((x_test,), y_test)],
        metric="top2_accuracy",
        score=top2,
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        calibration=[(x_train[i : i + 32],) for i in range(0, 128, 32)],
    )


def agreement(model: nn.Module) -> Workload:
    """Takes one parameter, the original model: random inputs, judged by top-1 agreement
    with it (a model that is not the original agrees on about a tenth of them)."""
    x = np.random.default_rng(0).random((200, 64), dtype=np.float32)
    with torch.no_grad():
        targets = model.eval()(torch.from_numpy(x)).argmax(1).numpy()
    return Workload(
        name="my-agreement",
        task="image-classification",
        train=None,
        eval_batches=[((x,), targets)],
        metric="agreement",
        score=lambda out, t: float((out.argmax(1) == t).mean()),
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )


def images() -> Workload:
    """Digits as (batch, 1, 8, 8) images: not what a 64-input MLP takes."""
    wl = digits_top2()
    (x,), y = wl.eval_batches[0]
    return dataclasses.replace(wl, name="my-images", eval_batches=[((x.reshape(-1, 1, 8, 8),), y)],
                               calibration=[])


def unlabelled() -> Workload:
    """No training data."""
    return dataclasses.replace(digits_top2(), name="my-unlabelled", train=None)


def raises() -> Workload:
    raise RuntimeError("the data folder /nowhere is empty")


def not_a_workload() -> dict:
    return {"eval_batches": []}


def two_parameters(model: nn.Module, split: str) -> Workload:
    return digits_top2()


def no_eval_batches() -> Workload:
    return dataclasses.replace(digits_top2(), eval_batches=[])
