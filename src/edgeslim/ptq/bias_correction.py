"""Empirical bias correction on the quantized model itself (Nagel et al., 2019, section 4.2).

Rounding weights and activations shifts the mean of each layer's output; the shift accumulates
through the network. Going through the Conv/Gemm nodes of a QDQ model in graph order, this
measures the per-channel mean of each node's output in the quantized model on calibration
data, compares it with the float model's, and removes the difference from that node's int32
bias (so later layers are measured with the earlier corrections in place). The corrections
are returned as float deltas too, so they can be applied to the float model's biases and
survive re-quantization with other settings. edgeslim's own code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgeslim.progress import progress_bar
from edgeslim.ptq._graph import Graph, add_outputs, make_session

__all__ = ["apply_bias_deltas", "correct_quantized_bias"]


def _channel_mean(v: np.ndarray) -> np.ndarray:
    return v.mean(axis=0) if v.ndim == 2 else np.moveaxis(v, 1, 0).reshape(v.shape[1], -1).mean(1)


def _float_means(model: Any, feeds: Sequence[dict], names: list[str], threads: int) -> dict:
    session = make_session(add_outputs(model, names), threads=threads)
    inputs = {i.name for i in session.get_inputs()}
    sums: dict[str, np.ndarray] = {}
    for feed in feeds:
        values = session.run(names, {k: v for k, v in feed.items() if k in inputs})
        for name, v in zip(names, values, strict=True):
            m = _channel_mean(v.astype(np.float64)) * len(v)
            sums[name] = m if name not in sums else sums[name] + m
    n = sum(len(next(iter(f.values()))) for f in feeds)
    return {k: v / n for k, v in sums.items()}


def correct_quantized_bias(
    float_model: Any,
    qdq_model: Any,
    feeds: Sequence[dict],
    *,
    threads: int = 2,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Correct the int32 biases of ``qdq_model`` in place; return float deltas per node name.

    Only nodes whose bias is a DequantizeLinear of an int32 initializer are corrected (that
    is how onnxruntime's QDQ quantizer stores biases).
    """
    fgraph = Graph(float_model)
    targets = []
    qgraph = Graph(qdq_model)
    for node in qdq_model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        dq = qgraph.producer.get(node.input[2])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        ints = qgraph.array(dq.input[0])
        fnode = fgraph.nodes.get(node.name)
        if ints is None or ints.dtype != np.int32 or fnode is None:
            continue
        # onnxruntime may drop a Relu/Clip after the node and rename its output; the values
        # are still the node's own (pre-activation) outputs, as in the float model
        targets.append((node, dq, fnode.output[0]))
    if not targets:
        return {}
    reference = _float_means(float_model, feeds, [f for _, _, f in targets], threads)
    deltas: dict[str, np.ndarray] = {}
    with progress_bar("bias correction", total=len(targets), enabled=progress) as advance:
        for node, dq, float_name in targets:
            out = node.output[0]
            session = make_session(add_outputs(qdq_model, [out]), threads=threads)
            inputs = {i.name for i in session.get_inputs()}
            total, count = 0.0, 0
            for feed in feeds:
                v = session.run([out], {k: x for k, x in feed.items() if k in inputs})[0]
                total = total + _channel_mean(v.astype(np.float64)) * len(v)
                count += len(v)
            shift = total / count - reference[float_name]
            ints = qgraph.array(dq.input[0])
            scale = qgraph.array(dq.input[1]).astype(np.float64)
            step = np.round(-shift / scale).astype(np.int64)
            qgraph.set_array(dq.input[0], (ints.astype(np.int64) + step).astype(np.int32))
            deltas[node.name] = step * scale
            advance(1)
    return deltas


def apply_bias_deltas(model: Any, deltas: dict[str, np.ndarray]) -> Any:
    """Add ``deltas`` (from ``correct_quantized_bias``) to the float biases of ``model``."""
    graph = Graph(model)
    for name, delta in deltas.items():
        node = graph.nodes.get(name)
        if node is None or len(node.input) < 3 or not node.input[2]:
            continue
        bias = graph.array(node.input[2])
        if bias is not None and bias.size == delta.size:
            graph.set_array(node.input[2], (bias + delta.reshape(bias.shape)).astype(bias.dtype))
    return model
