"""Fidelity of a quantized model to its float original, per task.

Each metric compares the outputs of the candidate with those of the reference on the same
inputs and returns a dict of floats; ``score`` is the one number the search keeps above
``1 - max_drop``-style goals (higher is better, 1.0 means identical).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgeslim.errors import ConfigError

__all__ = ["TASKS", "classification_metrics", "embedding_metrics", "task_metrics"]

TASKS = ("classification", "embedding")


def _need_classes(rows: np.ndarray, shape: tuple[int, ...]) -> None:
    """Refuse outputs with one value per row: argmax over one column is always 0, so every
    candidate would "agree"."""
    if rows.shape[1] < 2:
        raise ConfigError(
            f"Top-1 agreement needs logits of shape (batch, classes) with 2 or more classes; "
            f"the model's output has shape {list(shape)}. For a model with one value per "
            "sample, or without a batch axis, pass eval_fn (your own score).")


def classification_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """``reference``/``candidate``: logits (N, classes). ``score`` = top-1 agreement.

    Also reports the relative logit error ``||c - r|| / ||r||``.
    """
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    cand = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    _need_classes(ref, np.shape(reference))
    agree = float(np.mean(ref.argmax(1) == cand.argmax(1)))
    rel = float(np.linalg.norm(cand - ref) / max(np.linalg.norm(ref), 1e-12))
    return {"score": agree, "top1_agreement": agree, "relative_error": rel}


def _neighbours(x: np.ndarray, k: int) -> np.ndarray:
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def embedding_metrics(
    reference: np.ndarray, candidate: np.ndarray, *, k: int = 5
) -> dict[str, float]:
    """``reference``/``candidate``: embeddings (N, D). ``score`` = mean cosine.

    Also: ``min_cosine`` and ``topk_overlap``, the mean fraction of each item's ``k`` nearest
    neighbours (cosine, among the N items) that the candidate keeps.
    """
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    cand = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    cos = (ref * cand).sum(1) / np.maximum(
        np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1), 1e-12
    )
    out = {
        "score": float(cos.mean()),
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
    }
    kk = min(k, len(ref) - 1)
    if kk >= 1:
        a, b = _neighbours(ref, kk), _neighbours(cand, kk)
        overlap = [len(set(a[i]) & set(b[i])) / kk for i in range(len(a))]
        out[f"top{k}_overlap"] = float(np.mean(overlap))
    return out


def task_metrics(task: str, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]):
    """Metrics of ``task`` over per-batch output lists (concatenated first)."""
    ref = np.concatenate([np.asarray(r).reshape(len(r), -1) for r in reference])
    cand = np.concatenate([np.asarray(c).reshape(len(c), -1) for c in candidate])
    if task == "classification":
        _need_classes(ref, np.shape(reference[0]))
        return classification_metrics(ref, cand)
    return embedding_metrics(ref, cand)
