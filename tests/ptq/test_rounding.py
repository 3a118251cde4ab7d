"""GPTQ rounding + bias correction against plain rounding, and against onnxruntime's grid."""

from __future__ import annotations

import copy

import numpy as np
import onnx

from edgeslim.ptq import ort_quantize_static, round_weights, to_feeds
from edgeslim.ptq._graph import Graph, add_outputs, make_session
from edgeslim.ptq.rounding import weight_grid


def _layer_error(float_model, rounded, x, name):
    """Mean squared error and largest per-channel mean error of node ``name``'s output."""
    out = Graph(float_model).nodes[name].output[0]
    a = make_session(add_outputs(float_model, [out])).run([out], {"input": x})[0]
    b = make_session(add_outputs(rounded, [out])).run([out], {"input": x})[0]
    return float(np.mean((a - b) ** 2)), float(np.abs((a - b).mean(axis=(0, 2, 3))).max())


def test_gptq_and_bias_correction_beat_nearest(digits_cnn_onnx, digits_split):
    model = onnx.load(str(digits_cnn_onnx))
    feeds = to_feeds(digits_split.x_train[:256], model, batch_size=64)
    x = digits_split.x_train[:256]
    near, stats = round_weights(
        copy.deepcopy(model), feeds, method="nearest", bias_correction=False
    )
    gptq, _ = round_weights(
        copy.deepcopy(model), feeds, method="gptq", bias_correction=True, stats=stats
    )
    mse_near, bias_near = _layer_error(model, near, x, "/conv2/Conv")
    mse_gptq, bias_gptq = _layer_error(model, gptq, x, "/conv2/Conv")
    assert mse_gptq < 0.7 * mse_near
    assert bias_gptq < bias_near


def test_rounded_weights_survive_onnxruntime_quantization(digits_cnn_onnx, digits_split):
    """onnxruntime recomputes the same per-channel scale and keeps the GPTQ integers."""
    model = onnx.load(str(digits_cnn_onnx))
    feeds = to_feeds(digits_split.x_train[:128], model, batch_size=64)
    rounded, _ = round_weights(copy.deepcopy(model), feeds)
    q = ort_quantize_static(rounded, feeds, per_channel=True)
    qg, rg = Graph(q), Graph(rounded)
    qmin, qmax = weight_grid()
    checked = 0
    for node in rg.weighted_nodes(("Conv",)):
        dq = next(
            n
            for n in q.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0].startswith(node.input[1])
        )
        ints = qg.array(dq.input[0]).astype(np.float64)
        scale = qg.array(dq.input[1]).astype(np.float64)
        w = rg.array(node.input[1]).astype(np.float64)
        deq = ints * scale.reshape(-1, *(1,) * (w.ndim - 1))
        np.testing.assert_allclose(deq, w, rtol=0, atol=1e-6 * np.abs(w).max())
        assert ints.min() >= qmin and ints.max() <= qmax
        checked += 1
    assert checked == 2
