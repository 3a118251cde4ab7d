"""Postprocessing on model outputs: mean_pool, l2_normalize, softmax, topk.

Each step works on one output (``output`` parameter, default the model's first output) and
replaces it; ``topk`` adds a ``"topk"`` result: per batch row, a list of ``{"index", "label",
"score"}`` sorted by score (labels from the manifest when it has them). ``mean_pool`` averages
token embeddings ``(B, L, H)`` over the attention mask ``(B, L)`` from preprocessing, giving
``(B, H)``, as sentence-transformers does (the mask sum is clamped at 1e-9).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeslim.edge.preprocess._spec import (
    BuildContext,
    OpSpec,
    Param,
    axis,
    int_range,
    nonempty_str,
    optional,
    positive,
    register,
)
from edgeslim.errors import ConfigError, InferenceError

Results = dict[str, Any]


def _target(params: dict[str, Any], ctx: BuildContext, op: str) -> Any:
    explicit = params["output"]

    def pick(results: Results) -> str:
        name = explicit or (ctx.output_names[0] if ctx.output_names else next(iter(results)))
        if name not in results or not isinstance(results[name], np.ndarray):
            raise InferenceError(
                f"{op} works on the output {name!r}, which the model did not produce; "
                f"outputs: {sorted(results)}"
            )
        return name

    return pick


def check_axis(op: str, ax: int, name: str, shape: tuple[int, ...] | list[Any]) -> None:
    """``InferenceError`` unless ``ax`` is an axis of an output of ``shape``."""
    rank = len(shape)
    if not -rank <= ax < rank:
        raise InferenceError(f"{op} works along axis {ax}, but output {name!r} has shape "
                             f"{list(shape)}: {_axes_allowed(rank)}")


def _axes_allowed(rank: int) -> str:
    if rank == 0:
        return "a scalar has no axis to work along"
    return f"its axes are {-rank} to {rank - 1}"


def check_ranks(steps: list[tuple[str, dict[str, Any]]], ranks: dict[str, int],
                first: str | None) -> None:
    """``ConfigError`` for a step that cannot work on the declared rank of its output.

    ``steps``: ``(op, params)`` pairs, checked; ``ranks``: the outputs' declared ranks (from
    the manifest's shapes); ``first``: the first output, the default ``output`` of a step.
    ``mean_pool`` needs rank 3 and leaves rank 2; ``softmax`` and ``l2_normalize`` need their
    ``axis`` to be one of the output's axes.
    """
    ranks = dict(ranks)
    for i, (op, params) in enumerate(steps):
        name = params.get("output") or first
        rank = ranks.get(name) if name is not None else None
        if rank is None:
            continue
        where = f"postprocessing step {i} (op '{op}')"
        if op == "mean_pool":
            if rank != 3:
                raise ConfigError(f"{where} needs an output (B, L, H) of rank 3; output "
                                  f"{name!r} has rank {rank}")
            ranks[name] = 2
        elif op in ("softmax", "l2_normalize") and not -rank <= params["axis"] < rank:
            raise ConfigError(f"The 'axis' parameter of {where} must be an axis of output "
                              f"{name!r} of rank {rank} ({_axes_allowed(rank)}). Got "
                              f"{params['axis']} instead.")


def mean_pool(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``sum(x * mask) / max(sum(mask), 1e-9)`` over axis 1: ``(B, L, H), (B, L) -> (B, H)``."""
    m = mask.astype(x.dtype)[..., None]
    return (x * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def l2_normalize(x: np.ndarray, ax: int = -1, eps: float = 1e-12) -> np.ndarray:
    """``x / max(||x||_2, eps)`` along ``ax``."""
    n = np.sqrt((x.astype(np.float64) ** 2).sum(axis=ax, keepdims=True))
    return (x / np.maximum(n, eps)).astype(x.dtype)


def softmax(x: np.ndarray, ax: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``ax``."""
    z = x - x.max(axis=ax, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=ax, keepdims=True)


def _mean_pool(params: dict[str, Any], ctx: BuildContext) -> Any:
    pick, mask_name = _target(params, ctx, "mean_pool"), params["mask"]

    def step(results: Results, context: dict[str, np.ndarray]) -> Results:
        name = pick(results)
        x = results[name]
        mask = context.get(mask_name)
        if mask is None:
            raise InferenceError(
                f"mean_pool needs the {mask_name!r} array from preprocessing (text.tokenize)"
            )
        if x.ndim != 3 or mask.shape != x.shape[:2]:
            raise InferenceError(
                f"mean_pool needs an output (B, L, H) and a mask (B, L); got "
                f"{list(x.shape)} and {list(mask.shape)}"
            )
        return {**results, name: mean_pool(x, mask)}

    return step


def _l2(params: dict[str, Any], ctx: BuildContext) -> Any:
    pick, ax, eps = _target(params, ctx, "l2_normalize"), params["axis"], params["eps"]

    def step(results: Results, context: dict[str, np.ndarray]) -> Results:
        name = pick(results)
        check_axis("l2_normalize", ax, name, results[name].shape)
        return {**results, name: l2_normalize(results[name], ax, eps)}

    return step


def _softmax(params: dict[str, Any], ctx: BuildContext) -> Any:
    pick, ax = _target(params, ctx, "softmax"), params["axis"]

    def step(results: Results, context: dict[str, np.ndarray]) -> Results:
        name = pick(results)
        check_axis("softmax", ax, name, results[name].shape)
        return {**results, name: softmax(results[name], ax)}

    return step


def _topk(params: dict[str, Any], ctx: BuildContext) -> Any:
    pick, k, labels = _target(params, ctx, "topk"), params["k"], ctx.labels

    def step(results: Results, context: dict[str, np.ndarray]) -> Results:
        name = pick(results)
        x = results[name]
        rows = x.reshape(1, -1) if x.ndim == 1 else x.reshape(x.shape[0], -1)
        kk = min(k, rows.shape[1])
        top = []
        for row in rows:
            idx = np.argsort(-row, kind="stable")[:kk]
            top.append([
                {
                    "index": int(i),
                    "label": labels[i] if labels and i < len(labels) else str(int(i)),
                    "score": float(row[i]),
                }
                for i in idx
            ])
        return {**results, "topk": top}

    return step


_OUT = Param(optional(nonempty_str), None, "output name (default: the first output)")
register(OpSpec(
    "mean_pool", "post", frozenset(), None,
    {"output": _OUT, "mask": Param(nonempty_str, "attention_mask", "mask from preprocessing")},
    _mean_pool, "average over the attention mask: (B, L, H) -> (B, H)",
))
register(OpSpec(
    "l2_normalize", "post", frozenset(), None,
    {"output": _OUT, "axis": Param(axis, -1), "eps": Param(positive(), 1e-12)},
    _l2, "divide by the L2 norm",
))
register(OpSpec(
    "softmax", "post", frozenset(), None,
    {"output": _OUT, "axis": Param(axis, -1)},
    _softmax, "softmax",
))
register(OpSpec(
    "topk", "post", frozenset(), None,
    {"output": _OUT, "k": Param(int_range(1, 100_000), 5, "how many classes")},
    _topk, "the k best classes per row with labels",
))
