"""Valid graphs of shapes the zoo does not have: residual branches, one-logit heads, models
without a batch axis. Each once gave a wrong model or a wrong verdict without an error."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeslim.errors import ConfigError
from edgeslim.ptq import quantize
from edgeslim.ptq._graph import make_session


def _model(nodes, inputs, outputs, arrays, opset=17):
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in arrays.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _value(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _run(model, x, name="x"):
    return make_session(model, threads=1).run(None, {name: x})[0]


def residual_mlp(seed=0):
    """y = relu(x W1) W2 + x; logits = y W3: onnxruntime's preprocessing fuses the second
    MatMul and the Add into Gemm(hr, W2, C=x), a C that the graph computes."""
    rng = np.random.default_rng(seed)
    arrays = {
        "W1": (rng.normal(size=(16, 16)) / 4).astype(np.float32),
        "W2": (rng.normal(size=(16, 16)) / 4).astype(np.float32),
        "W3": (rng.normal(size=(16, 10)) / 4).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("MatMul", ["hr", "W2"], ["h2"], name="fc2"),
        helper.make_node("Add", ["h2", "x"], ["y"], name="residual"),
        helper.make_node("MatMul", ["y", "W3"], ["logits"], name="fc3"),
    ]
    return _model(nodes, [_value("x", ["N", 16])], [_value("logits", ["N", 10])], arrays)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"weight_rounding": "nearest", "bias_correction": False}],
    ids=["gptq", "nearest"],
)
def test_a_residual_branch_fused_into_gemm_is_kept(kwargs):
    model = residual_mlp()
    x = np.random.default_rng(1).normal(size=(512, 16)).astype(np.float32)
    res = quantize(model, x[:256], x[256:], max_drop=0.0, time_budget_s=120, progress=False,
                   threads=1, **kwargs)
    ref, got = _run(model, x[256:]), _run(res.model, x[256:])
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 0.05, rel  # the skip branch cut off gave 0.86
    assert res.goal_met and res.metrics["top1_agreement"] == 1.0


def test_top1_agreement_refuses_one_logit_outputs():
    rng = np.random.default_rng(0)
    model = _model(
        [helper.make_node("MatMul", ["x", "W"], ["logit"], name="fc")],
        [_value("x", ["N", 16])], [_value("logit", ["N", 1])],
        {"W": rng.normal(size=(16, 1)).astype(np.float32)},
    )
    x = rng.normal(size=(64, 16)).astype(np.float32)
    with pytest.raises(ConfigError, match=r"2 or more classes.*shape \[8, 1\].*eval_fn"):
        quantize(model, x, x, progress=False, threads=1)
    # with the user's own score the same model quantizes
    res = quantize(model, x, x, progress=False, threads=1,
                   eval_fn=lambda m: -float(np.abs(_run(m, x) - _run(model, x)).mean()))
    assert res.model is not None


def test_top1_agreement_refuses_outputs_without_a_batch_axis():
    rng = np.random.default_rng(0)
    model = _model(
        [helper.make_node("MatMul", ["x", "W"], ["logits"], name="fc")],
        [_value("x", [16])], [_value("logits", [10])],
        {"W": rng.normal(size=(16, 10)).astype(np.float32)},
    )
    samples = [rng.normal(size=16).astype(np.float32) for _ in range(8)]
    with pytest.raises(ConfigError, match=r"shape \[10\]"):
        quantize(model, samples, samples, progress=False, threads=1)


@pytest.mark.parametrize("second_reads", ["x", "r1"], ids=["same-input", "tied-weights"])
def test_smoothing_leaves_the_float_model_unchanged_when_weights_are_shared(second_reads):
    from edgeslim.ptq import smooth_matmuls

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["y1"], name="mm1"),
        helper.make_node("Relu", ["y1"], ["r1"], name="relu"),
        helper.make_node("MatMul", [second_reads, "W"], ["y2"], name="mm2"),
        helper.make_node("Add", ["y2", "r1"], ["out"], name="add"),
    ]
    model = _model(nodes, [_value("x", ["N", 16])], [_value("out", ["N", 16])],
                   {"W": rng.normal(size=(16, 16)).astype(np.float32)})
    x = (rng.normal(size=(32, 16)) * np.linspace(0.1, 30, 16)).astype(np.float32)
    ref = _run(model, x)
    smoothed, _ = smooth_matmuls(onnx.ModelProto.FromString(model.SerializeToString()),
                                 [{"x": x}], alpha=0.5)
    got = _run(smoothed, x)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()  # was off by 5x
    res = quantize(model, x[:16], x[16:], task="embedding", scheme="dynamic", max_drop=0.01,
                   progress=False, threads=1)
    assert res.goal_met and res.excluded == []


def _conv_net(weight, x_shape, **conv_attrs):
    out = weight.shape[0]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", **conv_attrs),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("ReduceMean", ["r"], ["logits"], name="pool",
                         axes=[2, 3][: len(x_shape) - 2], keepdims=0),
    ]
    return _model(nodes, [_value("x", ["N", *x_shape[1:]])], [_value("logits", ["N", out])],
                  {"w": weight}, opset=13)


def _rounded(model, x):
    from edgeslim.ptq import round_weights, to_feeds

    copy = onnx.ModelProto.FromString(model.SerializeToString())
    round_weights(copy, to_feeds(x, copy), threads=1)
    return numpy_helper.to_array(copy.graph.initializer[0])


@pytest.mark.parametrize("auto_pad, pads", [("SAME_UPPER", [0, 0, 1, 1]),
                                            ("SAME_LOWER", [1, 1, 0, 0])])
def test_gptq_reads_auto_pad_as_the_pads_it_means(auto_pad, pads):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 3, 3, 3)).astype(np.float32)
    x = rng.normal(size=(16, 3, 4, 4)).astype(np.float32)
    auto = _conv_net(w, x.shape, auto_pad=auto_pad, strides=[2, 2])
    explicit = _conv_net(w, x.shape, pads=pads, strides=[2, 2])
    np.testing.assert_allclose(_run(auto, x), _run(explicit, x), rtol=1e-5, atol=1e-6)
    # the rounding saw the same patches: the same integers (it once ignored auto_pad and
    # found no patches on small maps, zeroing every weight as "dead")
    got, want = _rounded(auto, x), _rounded(explicit, x)
    np.testing.assert_array_equal(got, want)
    assert np.count_nonzero(got) > 0.9 * got.size


def test_gptq_rounds_a_1d_convolution_as_a_2d_one_of_height_1():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 2, 3)).astype(np.float32)
    x = rng.normal(size=(16, 2, 20)).astype(np.float32)
    one = _conv_net(w, x.shape, pads=[1, 1], dilations=[2])
    two = _conv_net(w[:, :, None, :], (16, 2, 1, 20), pads=[0, 1, 0, 1], dilations=[1, 2])
    np.testing.assert_array_equal(_rounded(one, x)[:, :, None, :], _rounded(two, x[:, :, None, :]))


def test_static_int8_takes_a_matmul_with_a_3d_weight():
    rng = np.random.default_rng(0)
    model = _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="bmm"),
         helper.make_node("ReduceMean", ["y"], ["logits"], name="pool", axes=[1, 2],
                          keepdims=0)],
        [_value("x", ["N", 4, 2, 8])], [_value("logits", ["N", 6])],
        {"W": rng.normal(size=(4, 8, 6)).astype(np.float32)},
    )
    x = rng.normal(size=(32, 4, 2, 8)).astype(np.float32)
    res = quantize(model, x, x, progress=False, threads=1)  # a reshape error before
    assert res.metrics["top1_agreement"] >= 0.9


def test_preprocessing_leaves_nothing_in_the_working_directory(tmp_path, monkeypatch):
    from edgeslim.ptq.static import preprocess

    # a batch axis MatMul broadcasts symbolically against a fixed 4: onnxruntime's symbolic
    # shape inference gives up on it and saved what it had into the working directory
    model = _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="bmm")],
        [_value("x", ["N", 4, 8])], [_value("y", ["N", 4, 6])],
        {"W": np.ones((4, 8, 6), np.float32)},
    )
    monkeypatch.chdir(tmp_path)
    assert preprocess(model) is not None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("opset", [11, 12])
def test_static_int8_takes_models_older_than_opset_13(opset):
    from edgeslim.ptq._graph import opset_of

    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    model = _conv_net(w, (1, 3, 8, 8), pads=[1, 1, 1, 1])
    model.opset_import[0].version = opset  # Conv, Relu and ReduceMean read the same there
    onnx.checker.check_model(model)
    x = rng.normal(size=(64, 3, 8, 8)).astype(np.float32)
    # per-channel DequantizeLinear needs opset 13: an onnxruntime InvalidGraph before
    res = quantize(model, x[:32], x[32:], progress=False, threads=1)
    assert opset_of(res.model) >= 13
    assert res.metrics["top1_agreement"] >= 0.9


def _uint8_model():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Cast", ["x"], ["xf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["xf", "W"], ["logits"], name="fc")]
    return _model(nodes, [_value("x", ["N", 16], TensorProto.UINT8)],
                  [_value("logits", ["N", 10])],
                  {"W": rng.normal(size=(16, 10)).astype(np.float32)})


def test_uint8_inputs_are_fed_as_uint8():
    model = _uint8_model()
    x = np.random.default_rng(1).integers(0, 256, size=(64, 16))  # int64 from numpy
    # the calibration data went in as float32, which onnxruntime refused for a uint8 input
    res = quantize(model, x[:32], x[32:], progress=False, threads=1)
    assert res.goal_met


@pytest.mark.parametrize("bad, shown", [(300, "300"), (-1, "-1"), (2.5, "2.5")])
def test_values_a_cast_would_change_are_refused(bad, shown):
    model = _uint8_model()
    x = np.random.default_rng(1).integers(0, 256, size=(16, 16)).astype(np.float64)
    x[3, 4] = bad
    with pytest.raises(ConfigError, match=rf"'x' holds float64 values .*{shown}.*uint8"):
        quantize(model, x, x, progress=False, threads=1)


@pytest.mark.parametrize("scheme", ["dynamic", "weight_only"])
def test_schemes_for_matmuls_refuse_a_model_without_one(scheme):
    rng = np.random.default_rng(0)
    model = _model(
        [helper.make_node("Gemm", ["x", "W", "b"], ["logits"], name="fc", transB=1)],
        [_value("x", ["N", 16])], [_value("logits", ["N", 10])],
        {"W": rng.normal(size=(10, 16)).astype(np.float32), "b": np.zeros(10, np.float32)},
    )
    x = rng.normal(size=(32, 16)).astype(np.float32)
    # the dynamic scheme returned the float model unchanged, as if it were quantized
    with pytest.raises(ConfigError, match=r"MatMuls with constant weights.*are Gemm"):
        quantize(model, x, x, scheme=scheme, bits=4 if scheme == "weight_only" else 8,
                 progress=False, threads=1)


def test_per_tensor_static_int8_keeps_an_older_opset():
    from edgeslim.ptq._graph import opset_of

    rng = np.random.default_rng(0)
    model = _conv_net(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), (1, 3, 8, 8),
                      pads=[1, 1, 1, 1])
    model.opset_import[0].version = 11
    x = rng.normal(size=(32, 3, 8, 8)).astype(np.float32)
    res = quantize(model, x, x, per_channel=False, progress=False, threads=1)
    assert opset_of(res.model) == 11  # no conversion where none is needed
