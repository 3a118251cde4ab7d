"""The QOperator simulator against onnxruntime, float logits, and end-to-end tuning."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeslim.errors import ConfigError, ModelError
from edgeslim.ptq import quantize
from edgeslim.ptq._graph import make_session
from edgeslim.ptq.finetune import QOperatorSimulator, finetune_qoperator, float_logits
from edgeslim.ptq.static import ort_quantize_static


def small_cnn(seed: int = 0, stem_pads: tuple[int, ...] = (1, 1, 1, 1)) -> onnx.ModelProto:
    """(N,3,12,12) -> Conv 3x3 s2 + Relu6 -> depthwise 3x3 + Relu6 -> Conv 1x1, + residual
    Add -> GlobalAveragePool -> Flatten -> Gemm (1000 logits): the ops of efficientnet-lite0."""
    rng = np.random.default_rng(seed)
    arrays = {
        "w1": rng.normal(size=(8, 3, 3, 3)) * 0.5,
        "b1": rng.normal(size=8) * 0.2,
        "w2": rng.normal(size=(8, 1, 3, 3)) * 0.6,
        "b2": rng.normal(size=8) * 0.2,
        "w3": rng.normal(size=(8, 8, 1, 1)) * 0.4,
        "b3": rng.normal(size=8) * 0.1,
        "wf": rng.normal(size=(1000, 8)),
        "bf": rng.normal(size=1000) * 0.1,
        "lo": np.array(0.0),
        "hi": np.array(6.0),
    }
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    nodes = [
        helper.make_node(
            "Conv", ["input", "w1", "b1"], ["c1"], name="stem", pads=list(stem_pads), strides=[2, 2]
        ),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="act1"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="dw", group=8, pads=[1] * 4),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["a2"], name="act2"),
        helper.make_node("Conv", ["a2", "w3", "b3"], ["c3"], name="project"),
        helper.make_node("Add", ["c3", "a2"], ["s"], name="add"),
        helper.make_node("GlobalAveragePool", ["s"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat", axis=1),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 12, 12])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def setup():
    model = small_cnn()
    rng = np.random.default_rng(1)
    calib = rng.uniform(-1, 1, size=(64, 3, 12, 12)).astype(np.float32)
    test = rng.uniform(-1, 1, size=(32, 3, 12, 12)).astype(np.float32)
    feeds = [{"input": calib[i : i + 8]} for i in range(0, 64, 8)]
    q = ort_quantize_static(model, feeds, quant_format="qoperator")
    return model, q, calib, test


@pytest.mark.parametrize("exclude", [["add"], ["gap", "fc"], ["stem", "act1", "dw"]])
def test_simulator_replays_nodes_kept_in_float(setup, exclude):
    import torch

    model, _, calib, test = setup
    feeds = [{"input": calib[i : i + 8]} for i in range(0, 64, 8)]
    q = ort_quantize_static(model, feeds, quant_format="qoperator", exclude=exclude)
    assert {n.op_type for n in q.graph.node} & {"Add", "Gemm", "Conv"}
    with torch.no_grad():
        sim = QOperatorSimulator(q)(torch.from_numpy(test)).numpy()
    assert rel(sim, outputs(q, test)) < 0.01


@pytest.mark.parametrize("exclude", [[], ["stem", "act1", "dw"]])
def test_simulator_replays_asymmetric_conv_pads(exclude):
    """TF "same" padding of a stride-2 conv (none top/left, one bottom/right), as the export
    merges it into the convolution, quantized and kept in float."""
    import torch

    rng = np.random.default_rng(2)
    calib = rng.uniform(-1, 1, size=(32, 3, 12, 12)).astype(np.float32)
    feeds = [{"input": calib[i : i + 8]} for i in range(0, 32, 8)]
    q = ort_quantize_static(small_cnn(stem_pads=(0, 0, 1, 1)), feeds, quant_format="qoperator",
                            exclude=exclude)  # fmt: skip
    stem = next(n for n in q.graph.node if n.op_type in ("Conv", "QLinearConv"))
    assert list(helper.get_attribute_value(
        next(a for a in stem.attribute if a.name == "pads"))) == [0, 0, 1, 1]
    with torch.no_grad():
        sim = QOperatorSimulator(q)(torch.from_numpy(calib)).numpy()
    assert rel(sim, outputs(q, calib)) < 0.01


def outputs(model, x):
    return make_session(model).run(None, {"input": x})[0]


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_simulator_replays_onnxruntime_integers(setup):
    import torch

    _, q, _, test = setup
    ops = {n.op_type for n in q.graph.node}
    assert {"QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm"} <= ops
    with torch.no_grad():
        sim = QOperatorSimulator(q)(torch.from_numpy(test)).numpy()
    ort = outputs(q, test)
    step = float(
        numpy_helper.to_array(next(t for t in q.graph.initializer if "logits_scale" in t.name))
    )
    # the same integers up to rare off-by-one roundings of float vs int32 accumulation
    assert np.mean(np.abs(sim - ort) > step / 2) < 0.02
    assert rel(sim, ort) < 0.01


def test_export_without_tuning_is_the_same_model(setup):
    _, q, _, test = setup
    exported = QOperatorSimulator(q).export()
    np.testing.assert_array_equal(outputs(exported, test), outputs(q, test))


def test_float_logits_drops_the_output_requantization(setup):
    model, q, _, test = setup
    qf = float_logits(copy.deepcopy(q))
    assert not any(n.op_type == "DequantizeLinear" for n in qf.graph.node)
    gemm = next(n for n in qf.graph.node if n.op_type == "QGemm")
    assert len(gemm.input) == 7 and gemm.output[0] == "logits"
    assert not any("logits_scale" in t.name for t in qf.graph.initializer)
    ref = outputs(model, test)
    assert rel(outputs(qf, test), ref) <= rel(outputs(q, test), ref) + 1e-6


def test_finetune_lowers_the_error_of_the_int8_model(setup):
    model, q, calib, test = setup
    ref_session = make_session(model)
    before = rel(outputs(q, test), outputs(model, test))
    tuned = finetune_qoperator(
        q,
        lambda x: ref_session.run(None, {"input": x})[0],
        calib,
        steps=80,
        batch_size=16,
    )
    after = rel(outputs(tuned, test), outputs(model, test))
    assert after < before
    # same graph, same sizes: only initializer values changed
    assert [n.op_type for n in tuned.graph.node] == [n.op_type for n in q.graph.node]
    assert abs(tuned.ByteSize() - q.ByteSize()) < 64


def test_unsupported_op_is_a_model_error(setup):
    _, q, _, _ = setup
    bad = copy.deepcopy(q)
    bad.graph.node.append(helper.make_node("Softmax", ["logits"], ["probs"], name="sm"))
    with pytest.raises(ModelError, match="Softmax"):
        QOperatorSimulator(bad)


def test_quantize_keeps_the_stem_float_and_tunes(setup, tmp_path):
    model, _, calib, test = setup
    res = quantize(
        model,
        calib,
        test,
        method="percentile",
        quant_format="qoperator",
        max_drop=0.0,
        float_leading_units=1,
        float_logits=True,
        finetune_share=0.5,
        time_budget_s=40,
        progress=False,
    )
    assert {"stem", "act1", "dw"} <= set(res.excluded)
    assert any(n.op_type == "Conv" and n.name == "stem" for n in res.model.graph.node)
    assert not any(n.op_type == "DequantizeLinear" for n in res.model.graph.node)
    stages = [h["stage"] for h in res.history]
    assert res.goal_met or "finetune" in stages or res.metrics["relative_error"] < 0.02


def test_bad_finetune_share_is_a_config_error(setup):
    model, _, calib, _ = setup
    with pytest.raises(ConfigError, match="finetune_share"):
        quantize(model, calib, finetune_share=1.5, progress=False)


def test_finetune_with_a_step_count_gives_the_same_model_every_run(setup):
    """The learning rates follow the steps, not the clock: a slow start (a busy machine)
    changes nothing as long as the steps end within the budget."""
    import time

    model, q, calib, _ = setup
    ref_session = make_session(model)

    def tune(first_call_delay: float):
        calls = []

        def float_fn(x):
            if not calls:
                time.sleep(first_call_delay)
            calls.append(1)
            return ref_session.run(None, {"input": x})[0]

        return finetune_qoperator(q, float_fn, calib, steps=12, batch_size=8, time_budget_s=10)

    quick, slow_start = tune(0.0), tune(1.5)
    assert quick.SerializeToString() == slow_start.SerializeToString()
    assert quick.SerializeToString() != q.SerializeToString()


@pytest.mark.parametrize("steps", [0, -5, 2.5, True])
def test_bad_finetune_steps_is_a_config_error(setup, steps):
    model, _, calib, _ = setup
    with pytest.raises(ConfigError, match="finetune_steps"):
        quantize(model, calib, finetune_steps=steps, progress=False)


def test_finetune_needs_steps_or_a_time_budget(setup):
    _, q, calib, _ = setup
    with pytest.raises(ConfigError, match="steps"):
        finetune_qoperator(q, lambda x: x, calib)
    with pytest.raises(ConfigError, match="'steps'"):
        finetune_qoperator(q, lambda x: x, calib, steps=0)


def test_a_zero_time_budget_runs_one_step_and_a_negative_one_is_refused(setup):
    model, q, calib, _ = setup
    ref_session = make_session(model)
    calls = []

    def float_fn(x):
        calls.append(len(x))
        return ref_session.run(None, {"input": x})[0]

    finetune_qoperator(q, float_fn, calib, time_budget_s=0, batch_size=4)
    assert calls == [4]
    with pytest.raises(ConfigError, match=r"time_budget_s.*-1"):
        finetune_qoperator(q, float_fn, calib, time_budget_s=-1)


def kl(a, b):
    """Mean KL divergence from softmax(b) to softmax(a) over rows."""
    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    lb, la = log_softmax(b.astype(np.float64)), log_softmax(a.astype(np.float64))
    return float(np.mean(np.sum(np.exp(lb) * (lb - la), axis=1)))


def test_finetune_with_the_kl_loss_brings_the_softmax_closer(setup):
    model, q, calib, test = setup
    ref_session = make_session(model)
    ref = outputs(model, test)
    before = kl(outputs(q, test), ref)
    losses = []
    tuned = finetune_qoperator(
        q,
        lambda x: ref_session.run(None, {"input": x})[0],
        calib,
        steps=80,
        batch_size=16,
        loss="kl",
        log=lambda step, value: losses.append(value),
    )
    assert kl(outputs(tuned, test), ref) < before
    # what was logged is the KL, not the squared error of the logits
    with_mse = []
    finetune_qoperator(q, lambda x: ref_session.run(None, {"input": x})[0], calib, steps=1,
                       batch_size=16, log=lambda step, value: with_mse.append(value))
    assert losses[0] != pytest.approx(with_mse[0])
    assert [n.op_type for n in tuned.graph.node] == [n.op_type for n in q.graph.node]


def test_an_unknown_finetune_loss_is_a_config_error(setup):
    model, q, calib, _ = setup
    with pytest.raises(ConfigError, match=r"'loss'.*'kl', 'mse'.*'hinge'"):
        finetune_qoperator(q, lambda x: x, calib, steps=1, loss="hinge")
    with pytest.raises(ConfigError, match=r"finetune_loss.*'ce'"):
        quantize(model, calib, finetune_loss="ce", progress=False)


def _weights(model):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: inits[n.input[3]] for n in model.graph.node
            if n.op_type in ("QLinearConv", "QGemm")}


def test_tuning_keeps_7_bit_weights_within_7_bits(setup):
    """reduce_range weights span -64..64 (u8 x s8 stays exact without VNNI); a weight at the
    edge tuned one step outward would leave that range."""
    model, _, calib, _ = setup
    feeds = [{"input": calib[i : i + 8]} for i in range(0, 64, 8)]
    q7 = ort_quantize_static(model, feeds, quant_format="qoperator", reduce_range=True)
    before = _weights(q7)
    assert max(int(np.abs(w.astype(np.int16)).max()) for w in before.values()) == 64
    ref = make_session(model)
    # a target 3x louder than the float model: the tuning wants every weight larger
    tuned = finetune_qoperator(q7, lambda x: 3.0 * ref.run(None, {"input": x})[0], calib,
                               steps=40, batch_size=16, lr_weight=1.0)
    after = _weights(tuned)
    assert any(np.any(after[k] != before[k]) for k in before)
    for k, w in after.items():
        assert int(np.abs(w.astype(np.int16)).max()) <= 64, k


def test_a_7_bit_model_keeps_its_fast_exact_kernels(setup, tmp_path):
    """With reduce_range the tuned weights stay within +-64, so model.onnx keeps them int8
    (u8 x s8, which no CPU saturates at that range) instead of the slower u8 x u8 form."""
    model, _, calib, test = setup
    res = quantize(model, calib, test, method="percentile", quant_format="qoperator",
                   reduce_range=True, max_drop=0.0, finetune_share=0.5, finetune_steps=20,
                   time_budget_s=40, progress=False)  # fmt: skip
    weights = _weights(res.model)
    assert weights and all(w.dtype == np.int8 and np.abs(w.astype(np.int16)).max() <= 64
                           for w in weights.values())  # fmt: skip
    path = tmp_path / "q7.onnx"
    res.save(path)
    from edgeslim._ort import ort_session

    np.testing.assert_array_equal(
        ort_session(str(path), threads=1).run(None, {"input": test})[0], outputs(res.model, test))


def test_unpaired_reduce_range_narrows_only_what_would_need_u8_x_u8(setup, tmp_path):
    """reduce_range='unpaired': 7 bits for the weights that could saturate a u8 x s8 lane at 8
    bits (here the stem, the projection, whose input also feeds the residual Add so its
    channels cannot be reordered, and the classifier), 8 for the depthwise convolution, which
    cannot saturate. model.onnx then has no u8 x u8 kernel left, and runs as simulated."""
    model, _, calib, test = setup
    res = quantize(model, calib, test, method="percentile", quant_format="qoperator",
                   reduce_range="unpaired", max_drop=1.0, time_budget_s=40,
                   progress=False)  # fmt: skip
    weights = _weights(res.model)
    assert sorted(weights) == ["dw_quant", "fc_quant", "project_quant", "stem_quant"]
    assert all(w.dtype == np.int8 for w in weights.values()), {k: w.dtype for k, w in
                                                               weights.items()}
    peaks = {k: int(np.abs(w.astype(np.int16)).max()) for k, w in weights.items()}
    dw = [k for k in peaks if k.startswith("dw")]
    assert dw and peaks[dw[0]] > 64, peaks  # 8 bits kept
    assert all(p <= 64 for k, p in peaks.items() if k not in dw), peaks
    path = tmp_path / "q78.onnx"
    res.save(path)
    from edgeslim._ort import ort_session

    np.testing.assert_array_equal(
        ort_session(str(path), threads=1).run(None, {"input": test})[0], outputs(res.model, test))


def test_reduce_range_takes_true_false_or_unpaired(setup):
    model, _, calib, _ = setup
    with pytest.raises(ConfigError, match=r"'reduce_range'.*'unpaired'.*'sometimes'"):
        quantize(model, calib, reduce_range="sometimes", progress=False)
    with pytest.raises(ConfigError, match=r"'unpaired' only with quant_format='qoperator'"):
        quantize(model, calib, reduce_range="unpaired", quant_format="qdq", progress=False)
