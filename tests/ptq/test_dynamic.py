"""Row-wise dynamic int8, int8 embeddings, SmoothQuant and MatMulNBits against references."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeslim.ptq import (
    quantize_embeddings,
    quantize_weight_only,
    rowwise_dynamic,
    smooth_matmuls,
)
from edgeslim.ptq._graph import make_session

from .conftest import conv_chain, mlp


def _reference_rowwise(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """numpy transcription of the row-wise scheme (module docstring of dynamic.py)."""
    s = np.maximum(np.abs(x).max(-1, keepdims=True), 1e-12) / 127
    q = np.round(x / s)  # in [-127, 127]
    ws = np.maximum(np.abs(w).max(0), 1e-12) / 127
    wq = np.clip(np.round(w / ws), -127, 127)
    return (q @ wq) * ws * s


def test_rowwise_matches_numpy_reference():
    model = mlp()
    x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    x[0] *= 50  # one loud row must not spoil the others
    w = numpy_helper.to_array(model.graph.initializer[0])
    single = copy.deepcopy(model)
    q, names = rowwise_dynamic(single, include=["fc1"])
    assert names == ["fc1"]
    sess = make_session(q)
    out_name = "fc1_y"
    from edgeslim.ptq._graph import add_outputs

    got = make_session(add_outputs(q, [out_name])).run([out_name], {"input": x})[0]
    np.testing.assert_allclose(got, _reference_rowwise(x, w), rtol=1e-5, atol=1e-5)
    # whole model: close to float, quiet rows keep their precision
    full, _ = rowwise_dynamic(copy.deepcopy(model))
    ref = make_session(model).run(None, {"input": x})[0]
    out = make_session(full).run(None, {"input": x})[0]
    rel = np.linalg.norm(out[1:] - ref[1:]) / np.linalg.norm(ref[1:])
    assert rel < 0.02
    assert sess.get_inputs()[0].name == "input"


def _embedding_model(rows: int = 2000, dim: int = 32) -> onnx.ModelProto:
    table = np.random.default_rng(3).normal(size=(rows, dim)).astype(np.float32)
    table[5] *= 100
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="lookup")],
        "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", "sequence", dim])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_int8_embeddings_per_row():
    model = _embedding_model()
    table = numpy_helper.to_array(model.graph.initializer[0])
    q = copy.deepcopy(model)
    assert quantize_embeddings(q) == ["lookup"]
    ids = np.array([[0, 5, 1999, 7]], np.int64)
    got = make_session(q).run(None, {"ids": ids})[0]
    scale = np.abs(table).max(1, keepdims=True) / 127
    ref = np.round(table / scale) * scale
    np.testing.assert_allclose(got[0], ref[ids[0]], rtol=1e-6, atol=1e-6)
    size = sum(t.ByteSize() for t in q.graph.initializer)
    assert size < 0.3 * model.graph.initializer[0].ByteSize()
    small = _embedding_model(rows=100)
    assert quantize_embeddings(small) == []  # small tables (positions) stay float


def test_smoothing_keeps_float_outputs_and_flattens_channels():
    model = mlp()
    rng = np.random.default_rng(4)
    scale = np.ones(16, np.float32)
    scale[3] = 60.0  # an outlier channel, as in transformer activations
    feeds = [{"input": (rng.normal(size=(8, 16)) * scale).astype(np.float32)} for _ in range(4)]
    x = feeds[0]["input"]
    before = make_session(model).run(None, {"input": x})[0]
    smoothed, muls = smooth_matmuls(copy.deepcopy(model), feeds, alpha=0.5)
    assert len(muls) == 3
    after = make_session(smoothed).run(None, {"input": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    q_plain, _ = rowwise_dynamic(copy.deepcopy(model))
    q_smooth, _ = rowwise_dynamic(copy.deepcopy(smoothed))

    def err(m):
        out = make_session(m).run(None, {"input": x})[0]
        return np.linalg.norm(out - before) / np.linalg.norm(before)

    assert err(q_smooth) < err(q_plain)


def test_weight_only_int8_and_int4():
    model = mlp()
    x = np.random.default_rng(5).normal(size=(4, 16)).astype(np.float32)
    ref = make_session(model).run(None, {"input": x})[0]
    errs = {}
    for bits in (8, 4):
        q = quantize_weight_only(copy.deepcopy(model), bits=bits, block_size=16)
        assert sum(n.op_type == "MatMulNBits" for n in q.graph.node) == 3
        out = make_session(q).run(None, {"input": x})[0]
        errs[bits] = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert errs[8] < 0.05 and errs[8] < errs[4] < 0.2


def test_weight_only_refuses_a_model_without_matmul_weights():
    """A CNN's layers are Conv and Gemm: nothing for MatMulNBits, said instead of a model
    returned unchanged."""
    from edgeslim.errors import ConfigError

    with pytest.raises(ConfigError, match="has none to quantize; its linear layers are Conv"):
        quantize_weight_only(conv_chain(), bits=4)
    model = mlp()
    every = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    with pytest.raises(ConfigError, match="Use the static or dynamic scheme"):
        quantize_weight_only(model, bits=4, exclude=every)


def _two_branch_model(seed: int = 0) -> onnx.ModelProto:
    """quiet (B,S,16) -> MatMul 16x24 + b -> y1;  loud (B,S,16) -> MatMul 16x8 + b -> y2."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    for name, (k, n) in {"quiet": (16, 24), "loud": (16, 8)}.items():
        inits.append(numpy_helper.from_array(rng.normal(size=(k, n)).astype(np.float32),
                                             f"{name}_w"))
        inits.append(numpy_helper.from_array(rng.normal(size=n).astype(np.float32),
                                             f"{name}_b"))
        nodes.append(helper.make_node("MatMul", [name, f"{name}_w"], [f"{name}_mm"],
                                      name=f"{name}_fc"))
        nodes.append(helper.make_node("Add", [f"{name}_mm", f"{name}_b"], [f"{name}_y"],
                                      name=f"{name}_bias"))
    graph = helper.make_graph(
        nodes,
        "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", 16])
         for n in ("quiet", "loud")],
        [helper.make_tensor_value_info("quiet_y", TensorProto.FLOAT, ["b", "s", 24]),
         helper.make_tensor_value_info("loud_y", TensorProto.FLOAT, ["b", "s", 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _two_branch_feeds(n: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        loud = rng.normal(size=(1, 12, 16)).astype(np.float32)
        loud[0, 0] *= 40  # one token far louder than the rest, as [CLS] in BERT's FFN
        feeds.append({"quiet": rng.normal(size=(1, 12, 16)).astype(np.float32), "loud": loud})
    return feeds


def test_static_inputs_take_the_quiet_tensor_and_leave_the_loud_one_row_wise():
    from edgeslim.ptq import static_inputs

    model = _two_branch_model()
    feeds = _two_branch_feeds(6)
    ranges, stats = static_inputs(model, feeds, max_spread=4.0)
    assert set(stats) == {"quiet", "loud"}
    assert list(ranges) == ["quiet"]
    assert stats["quiet"]["spread"] < 4.0 < 20.0 < stats["loud"]["spread"]
    every = np.concatenate([f["quiet"] for f in feeds])
    assert ranges["quiet"] == (float(every.min()), float(every.max()))
    everything, _ = static_inputs(model, feeds, max_spread=1000.0)
    assert set(everything) == {"quiet", "loud"}
    none, _ = static_inputs(model, feeds, max_spread=1.0)
    assert none == {}


def test_static_input_matches_numpy_reference_with_the_bias_in_the_kernel():
    model = _two_branch_model()
    x = _two_branch_feeds(1)[0]
    lo, hi = -3.0, 4.5
    q, names = rowwise_dynamic(copy.deepcopy(model), static_ranges={"quiet": (lo, hi)})
    assert sorted(names) == ["loud_fc", "quiet_fc"]
    ops = [n.op_type for n in q.graph.node]
    # quiet: QuantizeLinear + MatMulIntegerToFloat with the bias; loud: row-wise, Add kept
    assert ops.count("QuantizeLinear") == 2 and ops.count("Add") == 1
    assert ops.count("ReduceMax") == 1 and "quiet_bias" not in {n.name for n in q.graph.node}
    out = dict(zip(["quiet_y", "loud_y"], make_session(q).run(["quiet_y", "loud_y"], x),
                   strict=True))
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    b = numpy_helper.to_array(model.graph.initializer[1]).astype(np.float64)
    scale = np.float32((hi - lo) / 255)
    zero = np.round(-lo / scale)
    xq = np.clip(np.round(x["quiet"] / scale) + zero, 0, 255) - zero
    ws = np.abs(w).max(0) / 127
    ref = (xq @ np.clip(np.round(w / ws), -127, 127)) * scale * ws + b
    np.testing.assert_allclose(out["quiet_y"], ref, rtol=1e-5, atol=1e-4)
    wl = numpy_helper.to_array(model.graph.initializer[2])
    bl = numpy_helper.to_array(model.graph.initializer[3])
    np.testing.assert_allclose(out["loud_y"], _reference_rowwise(x["loud"], wl) + bl,
                               rtol=1e-5, atol=1e-4)


def test_answers_do_not_depend_on_what_else_is_in_the_batch():
    """Row-wise and calibrated ranges make each row's result its own: a request batched with
    others gets the answer it gets alone. onnxruntime's quantize_dynamic (one range for the
    whole batch) does not."""
    from edgeslim.ptq import quantize_dynamic_ort, static_inputs

    model = _two_branch_model()
    feeds = _two_branch_feeds(8)
    ranges, _ = static_inputs(model, feeds, max_spread=4.0)
    ours, _ = rowwise_dynamic(copy.deepcopy(model), static_ranges=ranges)
    theirs = quantize_dynamic_ort(copy.deepcopy(model), per_channel=True)
    batch = {k: np.concatenate([f[k] for f in feeds]) for k in ("quiet", "loud")}

    def alone_vs_batched(m):
        sess = make_session(m)
        together = sess.run(None, batch)
        alone = [np.concatenate(o) for o in zip(*(sess.run(None, f) for f in feeds), strict=True)]
        return max(float(np.abs(a - t).max()) for a, t in zip(alone, together, strict=True))

    assert alone_vs_batched(ours) == 0.0
    assert alone_vs_batched(theirs) > 1e-3


def _int8_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node
            if n.op_type == "MatMulIntegerToFloat"}


def test_gptq_rounding_lowers_the_dynamic_schemes_error_and_spares_float_nodes(tmp_path):
    from edgeslim.ptq import quantize

    model = mlp(seed=3)
    rng = np.random.default_rng(0)
    # correlated inputs: what error-compensating rounding exploits
    mix = rng.normal(size=(16, 16))
    calib = [{"input": (rng.normal(size=(32, 16)) @ mix).astype(np.float32)} for _ in range(8)]
    evals = [{"input": (rng.normal(size=(32, 16)) @ mix).astype(np.float32)} for _ in range(8)]

    def run(rounding, exclude=()):
        return quantize(model, calib, evals, task="embedding", scheme="dynamic",
                        weight_rounding=rounding, smooth_alpha=None, quantize_embeddings=False,
                        exclude=list(exclude), max_drop=1.0, time_budget_s=60,
                        progress=False).model

    def error(q):
        ref, got = make_session(model), make_session(q)
        num = sum(float(np.sum((got.run(None, f)[0] - ref.run(None, f)[0]) ** 2)) for f in evals)
        den = sum(float(np.sum(ref.run(None, f)[0] ** 2)) for f in evals)
        return num / den

    nearest, gptq = run("nearest"), run("gptq")
    assert error(gptq) < 0.8 * error(nearest)
    # the same grid (each column keeps its largest magnitude), other integers inside it
    a, b = _int8_weights(nearest), _int8_weights(gptq)
    assert a.keys() == b.keys() == {"fc1", "fc2", "fc3"}
    for name in a:
        np.testing.assert_array_equal(np.abs(a[name].astype(np.int16) - 128).max(0),
                                      np.abs(b[name].astype(np.int16) - 128).max(0))
    assert any(np.any(a[n] != b[n]) for n in a)
    # a node kept in float (by the user, or by the search's fallback) keeps its float
    # weights, not the rounded ones
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    kept = quantize(model, calib, evals, task="embedding", scheme="dynamic",
                    smooth_alpha=None, quantize_embeddings=False, exclude=["fc2"],
                    max_drop=1.0, time_budget_s=60, progress=False)
    from edgeslim.ptq.builders import Builder

    builder = Builder(model, calib, dict(kept.config, exclude=[], threads=2), tmp_path)
    fallback = builder.build(["fc2"])
    for q in (kept.model, fallback):
        assert "fc2" not in _int8_weights(q)
        inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
        np.testing.assert_array_equal(inits["fc2_w"], original["fc2_w"])
    assert _int8_weights(fallback).keys() == {"fc1", "fc3"}
