"""Cross-layer equalization (Nagel et al., 2019, "Data-Free Quantization") on the ONNX graph.

For a pair ``Conv1 -> act -> Conv2`` where ``act`` is positively homogeneous (Relu, identity,
a zero Pad, or Clip(0, hi) under the condition below), output channel ``i`` of Conv1 is divided
by ``s_i`` and input channel ``i`` of Conv2 multiplied by it; with
``s_i = sqrt(r1_i / r2_i)`` (``r`` = max |weight| of that channel) both weights get the range
``sqrt(r1_i r2_i)``, which is what a per-tensor or depthwise grid wants.

ReLU6 (``Clip(0, 6)``) is not homogeneous: after scaling, channel ``i`` clips at ``6 s_i``
instead of 6. A channel is therefore equalized only when its pre-activation maximum on the
calibration data stays below ``margin * min(6, 6 s_i)``, where neither clip is ever reached;
the other channels keep ``s_i = 1``. The float outputs are unchanged on data like the
calibration data (``tests/ptq`` checks this). Bias correction lives in ``rounding.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeslim.ptq._graph import Graph, add_outputs, make_session

__all__ = ["EqualizedPair", "equalize", "find_pairs"]

_PASS_THROUGH = ("Relu", "Pad", "Identity")


@dataclass(frozen=True)
class EqualizedPair:
    """One equalized pair: node names, channels scaled, and the spread of the scales."""

    first: str
    second: str
    channels: int
    scaled: int
    max_scale: float
    min_scale: float


def _clip_bounds(graph: Graph, node: Any) -> tuple[float | None, float | None]:
    lo = graph.attr(node, "min")
    hi = graph.attr(node, "max")
    if len(node.input) > 1 and node.input[1]:
        v = graph.array(node.input[1])
        lo = None if v is None else float(v)
        if v is None:
            return (np.nan, np.nan)
    if len(node.input) > 2 and node.input[2]:
        v = graph.array(node.input[2])
        if v is None:
            return (np.nan, np.nan)
        hi = float(v)
    return lo, hi


def find_pairs(model: Any) -> list[tuple[Any, list[Any], Any]]:
    """``(conv1, path, conv2)`` triples that cross-layer equalization can rescale.

    ``path`` holds the nodes between them (activation, Pad). Conv1's output (and every tensor
    on the path) must feed nothing else; Conv2 must be a group-1 or depthwise Conv.
    """
    graph = Graph(model)
    pairs = []
    for conv1 in graph.weighted_nodes(("Conv",)):
        path = []
        tensor = conv1.output[0]
        ok = True
        while True:
            users = graph.consumers.get(tensor, [])
            if len(users) != 1 or tensor in graph.graph_outputs:
                ok = False
                break
            nxt = users[0]
            if nxt.op_type == "Conv":
                break
            if nxt.op_type == "Clip":
                lo, hi = _clip_bounds(graph, nxt)
                if lo != 0.0 or hi is None or not np.isfinite(hi):
                    ok = False
                    break
            elif nxt.op_type == "Pad":
                mode = graph.attr(nxt, "mode", b"constant")
                value = graph.array(nxt.input[2]) if len(nxt.input) > 2 and nxt.input[2] else 0
                if mode not in (b"constant", "constant") or (value is not None and np.any(value)):
                    ok = False
                    break
            elif nxt.op_type not in _PASS_THROUGH:
                ok = False
                break
            path.append(nxt)
            tensor = nxt.output[0]
        if not ok:
            continue
        conv2 = graph.consumers[tensor][0]
        if conv2.input[0] != tensor or conv2.input[1] not in graph.initializers:
            continue
        group = int(graph.attr(conv2, "group", 1))
        w1 = graph.array(conv1.input[1])
        w2 = graph.array(conv2.input[1])
        depthwise = group == w2.shape[0] == w1.shape[0] and w2.shape[1] == 1
        if int(graph.attr(conv1, "group", 1)) not in (1, w1.shape[0]) and not depthwise:
            continue
        if group != 1 and not depthwise:
            continue
        pairs.append((conv1, path, conv2))
    return pairs


def _preact_max(model: Any, feeds: Sequence[dict], names: list[str], threads: int) -> dict:
    session = make_session(add_outputs(model, names), threads=threads)
    inputs = {i.name for i in session.get_inputs()}
    out: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, v in zip(
            names, session.run(names, {k: x for k, x in feed.items() if k in inputs}), strict=False
        ):
            m = np.moveaxis(v, 1, 0).reshape(v.shape[1], -1).max(1)
            out[name] = m if name not in out else np.maximum(out[name], m)
    return out


def equalize(
    model: Any,
    feeds: Sequence[dict] | None = None,
    *,
    iterations: int = 2,
    margin: float = 0.95,
    threads: int = 2,
) -> tuple[Any, list[EqualizedPair]]:
    """Cross-layer equalization of every safe Conv pair of ``model`` (edited in place).

    ``feeds`` (calibration feed dicts) are needed only when a pair passes through a bounded
    Clip (ReLU6): without them such pairs are skipped. Returns the model and one
    ``EqualizedPair`` per pair touched (last iteration).
    """
    report: list[EqualizedPair] = []
    for _ in range(iterations):
        pairs = find_pairs(model)
        clipped = [p for p in pairs if any(n.op_type == "Clip" for n in p[1])]
        maxima = (
            _preact_max(model, feeds, sorted({p[0].output[0] for p in clipped}), threads)
            if clipped and feeds
            else {}
        )
        graph = Graph(model)
        report = []
        for conv1, path, conv2 in pairs:
            w1 = graph.array(conv1.input[1]).astype(np.float64)
            w2 = graph.array(conv2.input[1]).astype(np.float64)
            depthwise = int(graph.attr(conv2, "group", 1)) > 1
            r1 = np.abs(w1).reshape(w1.shape[0], -1).max(1)
            r2 = (
                np.abs(w2).reshape(w2.shape[0], -1).max(1)
                if depthwise
                else np.abs(w2).transpose(1, 0, 2, 3).reshape(w2.shape[1], -1).max(1)
            )
            s = np.sqrt(np.maximum(r1, 1e-12) / np.maximum(r2, 1e-12))
            s[(r1 < 1e-12) | (r2 < 1e-12)] = 1.0
            clips = [n for n in path if n.op_type == "Clip"]
            if clips:
                if conv1.output[0] not in maxima:
                    continue
                hi = min(_clip_bounds(graph, c)[1] for c in clips)
                peak = maxima[conv1.output[0]]
                safe = peak < margin * hi * np.minimum(1.0, s)
                s = np.where(safe, s, 1.0)
            if np.allclose(s, 1.0):
                continue
            shape1 = (-1,) + (1,) * (w1.ndim - 1)
            graph.set_array(conv1.input[1], (w1 / s.reshape(shape1)).astype(np.float32))
            if len(conv1.input) > 2 and conv1.input[2]:
                b1 = graph.array(conv1.input[2]).astype(np.float64)
                graph.set_array(conv1.input[2], (b1 / s).astype(np.float32))
            if depthwise:
                w2n = w2 * s.reshape(shape1)
            else:
                w2n = w2 * s.reshape(1, -1, *(1,) * (w2.ndim - 2))
            graph.set_array(conv2.input[1], w2n.astype(np.float32))
            report.append(
                EqualizedPair(
                    conv1.name,
                    conv2.name,
                    len(s),
                    int(np.sum(~np.isclose(s, 1.0))),
                    float(s.max()),
                    float(s.min()),
                )
            )
    return model, report
