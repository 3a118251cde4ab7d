"""Integer kernels in model.onnx give exact integers on every CPU (ptq/exact.py)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from edgeslim._ort import ort_session
from edgeslim.ptq._graph import make_session
from edgeslim.ptq.exact import unsaturated

K, N = 256, 64


def _matmul_integer(w: np.ndarray) -> object:
    inits = [numpy_helper.from_array(w, "W"),
             numpy_helper.from_array(np.array(0, np.int8), "wz"),
             numpy_helper.from_array(np.array(128, np.uint8), "xz")]
    node = helper.make_node("MatMulInteger", ["x", "W", "xz", "wz"], ["y"], name="mm")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, K])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [None, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_a_product_that_saturates_16_bit_lanes_comes_out_exact():
    rng = np.random.default_rng(0)
    # activations and weights at the ends of their ranges: pairs of products exceed 32,767,
    # which u8 x s8 kernels without VNNI clip
    x = rng.choice(np.array([0, 255], np.uint8), size=(32, K))
    w = rng.choice(np.array([-127, 127], np.int8), size=(K, N))
    want = (x.astype(np.int64) - 128) @ w.astype(np.int64)
    model = _matmul_integer(w)
    got = make_session(model, threads=1).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    # the model written out (what a bundle carries) is exact under a plain session too
    fixed = unsaturated(model)
    weight = next(t for t in fixed.graph.initializer if t.name == "W")
    zero = next(t for t in fixed.graph.initializer if t.name == "wz")
    assert weight.data_type == TensorProto.UINT8 and zero.data_type == TensorProto.UINT8
    assert int(numpy_helper.to_array(zero)) == 128
    np.testing.assert_array_equal(
        numpy_helper.to_array(weight).astype(np.int16) - 128, w.astype(np.int16))
    plain = ort_session(fixed.SerializeToString(), threads=1).run(None, {"x": x})[0]
    np.testing.assert_array_equal(plain, want)


def test_7_bit_weights_stay_int8_and_exact():
    rng = np.random.default_rng(1)
    x = rng.choice(np.array([0, 255], np.uint8), size=(32, K))
    w = rng.choice(np.array([-64, 64], np.int8), size=(K, N))
    want = (x.astype(np.int64) - 128) @ w.astype(np.int64)
    fixed = unsaturated(_matmul_integer(w))
    weight = next(t for t in fixed.graph.initializer if t.name == "W")
    assert weight.data_type == TensorProto.INT8  # u8 x s8: the fast kernels without VNNI
    np.testing.assert_array_equal(numpy_helper.to_array(weight), w)
    plain = ort_session(fixed.SerializeToString(), threads=1).run(None, {"x": x})[0]
    np.testing.assert_array_equal(plain, want)
    # one weight past 64 and the tensor is rewritten to u8 x u8 as any other
    w[0, 0] = 65
    again = unsaturated(_matmul_integer(w))
    assert next(t for t in again.graph.initializer if t.name == "W").data_type == \
        TensorProto.UINT8


def _qlinear_conv(w: np.ndarray, group: int) -> object:
    c_out = w.shape[0]
    inits = [numpy_helper.from_array(w, "W"),
             numpy_helper.from_array(np.array(1.0, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, np.uint8), "xz"),
             numpy_helper.from_array(np.ones(c_out, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(c_out, np.int8), "wz"),
             numpy_helper.from_array(np.array(2400.0, np.float32), "ys"),
             numpy_helper.from_array(np.array(128, np.uint8), "yz")]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "W", "ws", "wz", "ys", "yz"],
                            ["y"], group=group, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_depthwise_weights_stay_int8_and_exact():
    """onnxruntime's depthwise kernel multiplies in 16/32 bits: its u8 x s8 form (kept, the
    faster one) gives what the u8 x u8 form gives, weights and activations at their ends."""
    rng = np.random.default_rng(2)
    x = rng.choice(np.array([0, 255], np.uint8), size=(1, 16, 8, 8))
    w = rng.choice(np.array([-128, 127], np.int8), size=(16, 1, 3, 3))
    kept = unsaturated(_qlinear_conv(w, group=16))
    assert next(t for t in kept.graph.initializer if t.name == "W").data_type == TensorProto.INT8
    # the u8 x u8 form, by hand
    ref = _qlinear_conv(w, group=16)
    for t in ref.graph.initializer:
        if t.name in ("W", "wz"):
            shifted = numpy_helper.to_array(t).astype(np.int16) + 128
            t.CopyFrom(numpy_helper.from_array(shifted.astype(np.uint8), t.name))
    run = lambda m: ort_session(m.SerializeToString(), threads=1).run(None, {"x": x})[0]  # noqa: E731
    got, want = run(kept), run(ref)
    assert np.ptp(want) > 100  # the outputs span the range: a saturated sum would show
    np.testing.assert_array_equal(got, want)
    # a full convolution is no depthwise one: rewritten to u8 x u8
    full = unsaturated(_qlinear_conv(rng.choice(np.array([-128, 127], np.int8),
                                                size=(16, 16, 3, 3)), group=1))  # fmt: skip
    assert next(t for t in full.graph.initializer if t.name == "W").data_type == \
        TensorProto.UINT8
