"""SmoothQuant for MatMul inputs (Xiao et al., 2023), on the ONNX graph.

Transformer activations have a few channels far larger than the rest. For every group of
MatMuls with a constant weight that read the same tensor ``x`` (Q/K/V share one), a per-channel
factor ``s_j = max|x_j|^alpha / max|W_j|^(1-alpha)`` (maxima over calibration data and over the
group's weight rows) moves difficulty from activations to weights: ``x`` is multiplied by
``1/s`` (one inserted ``Mul``) and row ``j`` of each weight by ``s_j``. In exact arithmetic
the model is unchanged: a group whose weight another node also reads is left alone.
edgeslim's own code; onnxruntime's SmoothQuant needs neural-compressor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from onnx import helper

from edgeslim.ptq._graph import Graph, add_outputs, make_session

__all__ = ["channel_absmax", "smooth_matmuls"]


def channel_absmax(
    model: Any, feeds: Sequence[dict], names: Sequence[str], *, threads: int = 2
) -> dict[str, np.ndarray]:
    """Per-last-axis-channel max |value| of tensors ``names`` over ``feeds``."""
    session = make_session(add_outputs(model, names), threads=threads)
    inputs = {i.name for i in session.get_inputs()}
    out: dict[str, np.ndarray] = {}
    for feed in feeds:
        values = session.run(list(names), {k: v for k, v in feed.items() if k in inputs})
        for name, v in zip(names, values, strict=False):
            a = np.abs(v.reshape(-1, v.shape[-1])).max(0)
            out[name] = a if name not in out else np.maximum(out[name], a)
    return out


def smooth_matmuls(
    model: Any,
    feeds: Sequence[dict],
    *,
    alpha: float = 0.5,
    exclude: Sequence[str] = (),
    threads: int = 2,
) -> tuple[Any, list[str]]:
    """Apply SmoothQuant in place to every MatMul with a 2-D constant weight.

    Returns the model and the names of the inserted ``Mul`` nodes. ``exclude``: MatMul node
    names left alone (for instance those kept in float).
    """
    graph = Graph(model)
    groups = graph.matmul_groups(exclude)
    if not groups:
        return model, []
    amax = channel_absmax(model, feeds, sorted(groups), threads=threads)
    inserted: dict[str, Any] = {}
    for x, nodes in groups.items():
        weights, members = {n.input[1] for n in nodes}, {id(n) for n in nodes}
        if any(id(r) not in members for w in weights for r in graph.consumers.get(w, [])):
            continue  # a weight read elsewhere too: scaling it would change the other reader
        wmax = np.max([np.abs(graph.array(n.input[1])).max(1) for n in nodes], axis=0)
        a = amax[x]
        if a.shape != wmax.shape:
            continue
        s = (np.maximum(a, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)).astype(
            np.float64
        )
        s = np.clip(s, 1e-2, 1e2)
        inv_name = graph.fresh_name(x + "_smooth_inv")
        graph.set_array(inv_name, (1.0 / s).astype(np.float32))
        y = graph.fresh_name(x + "_smoothed")
        mul = helper.make_node("Mul", [x, inv_name], [y], name=graph.fresh_name(x + "_smooth"))
        for name in sorted(weights):  # once each: two readers may share one weight
            w = graph.array(name)
            graph.set_array(name, (w * s[:, None]).astype(w.dtype))
        for n in nodes:
            n.input[0] = y
        inserted[x] = mul
    # insert each Mul right before the first node that reads its output
    new_nodes = []
    pending = dict(inserted)
    for node in model.graph.node:
        for inp in list(node.input):
            for x, mul in list(pending.items()):
                if inp == mul.output[0]:
                    new_nodes.append(mul)
                    del pending[x]
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return model, [m.name for m in inserted.values()]
