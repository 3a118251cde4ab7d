"""Integer kernels in model.onnx give exact integers on every CPU (ptq/exact.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
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


def _pointwise_chain(w_expand: np.ndarray, w_dw: np.ndarray, w_project: np.ndarray,
                     extra_output: bool = False) -> object:
    """x -> 1x1 QLinearConv -> depthwise 3x3 QLinearConv -> 1x1 QLinearConv, int8 weights with
    per-channel scales (the shape of an inverted-residual block in a QOperator model)."""
    c_in, mid = w_expand.shape[1], w_expand.shape[0]
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "s1"),
             numpy_helper.from_array(np.array(0, np.uint8), "z0"),
             numpy_helper.from_array(np.array(128, np.uint8), "z128")]
    nodes = []
    x_scale, x_zero = "s1", "z0"
    for name, w, x, y, ys, group, pads in (
            ("expand", w_expand, "x", "e", 3000.0, 1, [0, 0, 0, 0]),
            ("dw", w_dw, "e", "d", 1200.0, mid, [1, 1, 1, 1]),
            ("project", w_project, "d", "y", 6000.0, 1, [0, 0, 0, 0])):
        rows = w.shape[0]
        rng = np.random.default_rng(rows)
        inits += [numpy_helper.from_array(w, f"{name}_w"),
                  numpy_helper.from_array(rng.uniform(0.5, 1.5, rows).astype(np.float32),
                                          f"{name}_ws"),
                  numpy_helper.from_array(np.zeros(rows, np.int8), f"{name}_wz"),
                  numpy_helper.from_array(np.array(ys, np.float32), f"{name}_ys"),
                  numpy_helper.from_array(rng.integers(-999, 999, rows).astype(np.int32),
                                          f"{name}_b")]
        nodes.append(helper.make_node(
            "QLinearConv", [x, x_scale, x_zero, f"{name}_w", f"{name}_ws", f"{name}_wz",
                            f"{name}_ys", "z128", f"{name}_b"],
            [y], name=name, group=group, kernel_shape=list(w.shape[2:]), pads=pads))
        x_scale, x_zero = f"{name}_ys", "z128"  # the next node reads this one's output
    outputs = [helper.make_tensor_value_info("y", TensorProto.UINT8, None)]
    if extra_output:  # a second reader of the depthwise output: its channels must stay put
        outputs.append(helper.make_tensor_value_info("d", TensorProto.UINT8, None))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, c_in, 6, 6])],
        outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _u8u8(model: object) -> object:
    """Every int8 weight as uint8 + 128 with zero point 128, by hand: exact on every CPU."""
    for t in model.graph.initializer:
        if t.name.endswith(("_w", "_wz")):
            shifted = numpy_helper.to_array(t).astype(np.int16) + 128
            t.CopyFrom(numpy_helper.from_array(shifted.astype(np.uint8), t.name))
    return model


def _weight(model: object, name: str) -> object:
    return next(t for t in model.graph.initializer if t.name == name)


def test_pointwise_conv_keeps_int8_weights_when_its_channels_can_be_paired():
    """Neighbouring input channels of the projection have weights of one sign near 127 (their
    u8 x s8 sums saturate without VNNI); pairing each with a channel of the other sign makes the
    kernel exact, and the reorder upstream keeps every output the same."""
    rng = np.random.default_rng(3)
    mid, c_out = 16, 8
    signs = np.repeat([1, -1], mid // 2)  # channels 0..7 positive, 8..15 negative
    w_project = (signs * rng.integers(100, 128, (c_out, mid))).astype(np.int8)
    w_project = w_project.reshape(c_out, mid, 1, 1)
    w_expand = rng.integers(-127, 128, (mid, 4, 1, 1)).astype(np.int8)
    w_dw = rng.integers(-127, 128, (mid, 1, 3, 3)).astype(np.int8)
    x = rng.choice(np.array([0, 255], np.uint8), size=(1, 4, 6, 6))
    build = lambda **kw: _pointwise_chain(w_expand, w_dw, w_project, **kw)  # noqa: E731
    run = lambda m: ort_session(m.SerializeToString(), threads=1).run(None, {"x": x})  # noqa: E731

    fixed = unsaturated(build())
    w = _weight(fixed, "project_w")
    assert w.data_type == TensorProto.INT8
    pairs = numpy_helper.to_array(w).astype(np.int16)[:, :, 0, 0].reshape(c_out, mid // 2, 2)
    assert (np.maximum(pairs, 0).sum(-1) <= 128).all()
    assert (np.minimum(pairs, 0).sum(-1) >= -128).all()
    # the expansion and the depthwise convolution were reordered to match, not the input
    order = [int(np.flatnonzero((w_project[:, :, 0, 0] == col[:, None]).all(0))[0])
             for col in numpy_helper.to_array(w)[:, :, 0, 0].T]
    assert sorted(order) == list(range(mid)) and order != list(range(mid))
    np.testing.assert_array_equal(
        numpy_helper.to_array(_weight(fixed, "dw_w")), w_dw[order])
    np.testing.assert_array_equal(
        numpy_helper.to_array(_weight(fixed, "expand_b")),
        numpy_helper.to_array(_weight(build(), "expand_b"))[order])
    got, want = run(fixed)[0], run(_u8u8(build()))[0]
    assert np.ptp(want) > 100
    np.testing.assert_array_equal(got, want)

    # when the depthwise output has another reader, nothing is reordered: u8 x u8
    shared = unsaturated(build(extra_output=True))
    assert _weight(shared, "project_w").data_type == TensorProto.UINT8
    np.testing.assert_array_equal(numpy_helper.to_array(_weight(shared, "dw_w")), w_dw)
    np.testing.assert_array_equal(run(shared)[0], want)


def test_pair_channels_finds_an_order_or_says_none():
    from edgeslim.ptq.exact import pair_channels

    rng = np.random.default_rng(4)
    w = (np.repeat([1, -1], 6) * rng.integers(70, 128, (5, 12))).astype(np.int8)
    order = pair_channels(w)
    assert sorted(order.tolist()) == list(range(12))
    # every pair it makes mixes the signs: two weights over 64 of one sign would clash
    assert all(np.sign(w[0, a]) != np.sign(w[0, b]) for a, b in order.reshape(-1, 2))
    # all of one sign and over 64: no order works
    assert pair_channels(np.abs(w)) is None
    # an odd column left over meets the kernel's zero padding
    assert sorted(pair_channels(w[:, :11]).tolist()) == list(range(11))
    with pytest.raises(ValueError, match="2-D int8"):
        pair_channels(w.astype(np.int16))
    # past PAIR_MAX_CHANNELS columns it does not try (the pair table grows with their square)
    from edgeslim.ptq.exact import PAIR_MAX_CHANNELS

    assert pair_channels(np.zeros((2, PAIR_MAX_CHANNELS + 1), np.int8)) is None
    assert pair_channels(np.zeros((2, 64), np.int8)) is not None


def test_narrow_unpaired_keeps_8_bits_only_where_the_channels_pair():
    """The projection pairs (8 bits kept), the depthwise convolution cannot saturate (kept);
    the expansion, whose input is the graph's, cannot be reordered: 7 bits, twice the scale,
    half the bias. Every kernel is then u8 x s8 in model.onnx, and gives what the exact u8 x u8
    form of the same integers gives."""
    from edgeslim.ptq.exact import narrow_unpaired

    rng = np.random.default_rng(5)
    mid, c_out = 16, 8
    signs = np.repeat([1, -1], mid // 2)
    w_project = (signs * rng.integers(100, 128, (c_out, mid))).astype(np.int8)
    w_project = w_project.reshape(c_out, mid, 1, 1)
    w_expand = rng.integers(-127, 128, (mid, 4, 1, 1)).astype(np.int8)
    w_dw = rng.integers(-127, 128, (mid, 1, 3, 3)).astype(np.int8)
    model = _pointwise_chain(w_expand, w_dw, w_project)
    scale = numpy_helper.to_array(_weight(model, "expand_ws")).copy()
    bias = numpy_helper.to_array(_weight(model, "expand_b")).copy()

    assert narrow_unpaired(model) == ["expand"]
    got = numpy_helper.to_array(_weight(model, "expand_w"))
    assert got.dtype == np.int8 and np.abs(got.astype(np.int16)).max() <= 64
    assert np.abs(got.astype(np.int16) * 2 - w_expand).max() <= 1
    np.testing.assert_allclose(numpy_helper.to_array(_weight(model, "expand_ws")), 2 * scale)
    assert np.abs(numpy_helper.to_array(_weight(model, "expand_b")) * 2 - bias).max() <= 1
    np.testing.assert_array_equal(numpy_helper.to_array(_weight(model, "dw_w")), w_dw)
    np.testing.assert_array_equal(numpy_helper.to_array(_weight(model, "project_w")), w_project)
    assert narrow_unpaired(model) == []  # nothing left to narrow

    reference = _u8u8(copy.deepcopy(model))  # the narrowed model in the exact u8 x u8 form
    fixed = unsaturated(model)
    assert all(_weight(fixed, f"{n}_w").data_type == TensorProto.INT8
               for n in ("expand", "dw", "project"))
    x = rng.choice(np.array([0, 255], np.uint8), size=(1, 4, 6, 6))
    run = lambda m: ort_session(m.SerializeToString(), threads=1).run(None, {"x": x})[0]  # noqa: E731
    want = run(reference)
    assert np.ptp(want) > 100
    np.testing.assert_array_equal(run(fixed), want)  # u8 x s8 everywhere, and exact
