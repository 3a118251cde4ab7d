"""Sequential bias correction measured on the quantized model removes per-channel mean shifts."""

from __future__ import annotations

import copy

import numpy as np
import onnx

from edgeslim.ptq import ort_quantize_static, to_feeds
from edgeslim.ptq._graph import add_outputs, make_session
from edgeslim.ptq.bias_correction import apply_bias_deltas, correct_quantized_bias


def _mean_shift(float_model, qdq, x, name="/fc1/Gemm_output_0"):
    a = make_session(add_outputs(float_model, [name])).run([name], {"input": x})[0]
    q_name = next(n.output[0] for n in qdq.graph.node if n.name == "/fc1/Gemm")
    b = make_session(add_outputs(qdq, [q_name])).run([q_name], {"input": x})[0]
    return float(np.abs((b - a).mean(0)).mean())


def test_corrected_biases_cancel_the_mean_shift(digits_cnn_onnx, digits_split):
    model = onnx.load(str(digits_cnn_onnx))
    x = digits_split.x_train[:256]
    feeds = to_feeds(x, model, batch_size=64)
    # per-tensor weights with 7 bits: a coarse grid with a visible mean shift
    qdq = ort_quantize_static(model, feeds, per_channel=False, reduce_range=True)
    before = _mean_shift(model, qdq, x)
    corrected = copy.deepcopy(qdq)
    deltas = correct_quantized_bias(model, corrected, feeds)
    assert {"/conv1/Conv", "/conv2/Conv", "/fc1/Gemm", "/fc2/Gemm"} <= set(deltas)
    assert _mean_shift(model, corrected, x) < 0.5 * before
    # the float deltas carry over to a fresh quantization of the float model
    shifted = apply_bias_deltas(copy.deepcopy(model), deltas)
    requant = ort_quantize_static(shifted, feeds, per_channel=False, reduce_range=True)
    assert _mean_shift(model, requant, x) < 0.6 * before
