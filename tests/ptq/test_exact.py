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
