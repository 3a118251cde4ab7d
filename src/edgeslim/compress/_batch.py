"""How the torch-side techniques read batches and call models (shared by structured pruning
and distillation).

A batch is ``(x, y)``, ``(x,)``, ``{"x": x, "y": y}``, a bare input ``x``, or a dict of
keyword inputs for models called as ``model(**inputs)`` (Hugging Face style). An input ``x``
is a tensor (or numpy array), a tuple of positional inputs, or a dict of keyword inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Batches", "call_model", "describe", "primary_output", "split_batch", "to_torch"]


def to_torch(value: Any) -> Any:
    """numpy arrays -> tensors, recursively through tuples, lists and dicts."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, Mapping):
        return {k: to_torch(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_torch(v) for v in value)
    return value


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, labels or None)`` from one batch (see the module docstring for the forms)."""
    if isinstance(batch, Mapping):
        if "x" in batch:
            y = batch.get("y")
            return to_torch(batch["x"]), None if y is None else torch.as_tensor(y)
        return to_torch(dict(batch)), None
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return to_torch(batch[0]), None
        if len(batch) >= 2:
            y = batch[1]
            return to_torch(batch[0]), None if y is None else torch.as_tensor(y)
    return to_torch(batch), None


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple/list, else
    ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def primary_output(out: Any) -> torch.Tensor:
    """The tensor a model "answers": itself, ``logits``, ``last_hidden_state`` or the first
    tensor of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        for key in ("logits", "last_hidden_state"):
            if isinstance(out.get(key), torch.Tensor):
                return out[key]
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"the model returned {type(out).__name__}, which holds no tensor")


def describe(value: Any) -> str:
    """Shapes of an input structure, for messages: ``(1, 64)``, ``[(1, 3), (2,)]``,
    ``{input_ids: (2, 16)}``."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return str(tuple(value.shape))
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(describe(v) for v in value) + "]"
    return type(value).__name__


class Batches:
    """Re-iterable view of the user's data yielding ``{"x": inputs, "y": labels}``.

    Labels are an empty int64 tensor when the data has none, so ``train.fit`` (which reads
    ``batch["x"], batch["y"]``) can drive it. A generator function is called anew per pass.
    """

    NO_LABELS = torch.empty(0, dtype=torch.long)

    def __init__(self, source: Iterable[Any]):
        self._source = source

    def _iter_source(self) -> Iterable[Any]:
        src = self._source
        if callable(src) and not hasattr(src, "__iter__"):
            return src()  # type: ignore[no-any-return]
        return src

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self._iter_source():
            x, y = split_batch(batch)
            yield {"x": x, "y": self.NO_LABELS if y is None else y}

    def __len__(self) -> int:
        return len(self._source)  # type: ignore[arg-type]

    def first(self) -> tuple[Any, torch.Tensor | None] | None:
        """The first batch as ``(inputs, labels or None)``, or None when the data is empty."""
        for batch in self._iter_source():
            return split_batch(batch)
        return None


def has_labels(y: torch.Tensor | None) -> bool:
    return y is not None and y.numel() > 0
