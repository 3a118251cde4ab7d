"""Histogram calibration (percentile, entropy) a batch at a time gives onnxruntime's ranges and
model, bit for bit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edgeslim.errors import ConfigError
from edgeslim.ptq import static
from edgeslim.ptq.static import ort_quantize_static

from .conftest import conv_chain


def feeds(sizes=(8, 8, 8, 8), seed=0):
    rng = np.random.default_rng(seed)
    # heavy tails, so that the 99.9th percentile cuts well inside the range, and batches whose
    # largest magnitude grows, so that a histogram kept from the first batch would not fit
    return [{"input": (rng.standard_t(3, size=(n, 4, 8, 8)) * (1 + k)).astype(np.float32)}
            for k, n in enumerate(sizes)]


def _saved(model, tmp_path):
    import onnx

    path = tmp_path / "float.onnx"
    onnx.save(model, str(path))
    return path


def onnxruntime_only(monkeypatch):
    """onnxruntime's own percentile calibrator (every batch's tensors held at once)."""
    monkeypatch.setattr(static, "histogram_ranges", lambda *args, **kwargs: False)


@pytest.mark.parametrize("quant_format", ["qdq", "qoperator"])
def test_batchwise_percentile_ranges_are_onnxruntimes(quant_format, monkeypatch, tmp_path):
    model, data = conv_chain(), feeds()
    ours = ort_quantize_static(model, data, method="percentile", percentile=99.9,
                               quant_format=quant_format, calibration_cache=tmp_path / "ours.json")
    onnxruntime_only(monkeypatch)
    theirs = ort_quantize_static(model, data, method="percentile", percentile=99.9,
                                 quant_format=quant_format,
                                 calibration_cache=tmp_path / "theirs.json")
    ranges = {p: json.loads((tmp_path / f"{p}.json").read_text()) for p in ("ours", "theirs")}
    assert ranges["ours"] == ranges["theirs"]
    assert ranges["ours"]["calibration_method"]["value"].endswith("Percentile")
    assert len(ranges["ours"]["data"]) >= 5  # input, conv outputs, activations
    assert ours.SerializeToString() == theirs.SerializeToString()


@pytest.mark.parametrize("quant_format", ["qdq", "qoperator"])
def test_entropy_quantization_uses_the_batchwise_ranges(quant_format, tmp_path):
    model = ort_quantize_static(conv_chain(), feeds(), method="entropy",
                                quant_format=quant_format, calibration_cache=tmp_path / "r.json")
    cache = json.loads((tmp_path / "r.json").read_text())
    assert cache["calibration_method"]["value"].endswith("Entropy")
    assert len(cache["data"]["c1"]["hist"]["data"]) == static.ENTROPY_BINS
    assert any(n.op_type in ("QuantizeLinear", "QLinearConv") for n in model.graph.node)


def test_entropy_ranges_do_not_depend_on_how_the_data_is_batched(tmp_path):
    data = feeds()
    whole = [{"input": np.concatenate([f["input"] for f in data])}]
    for name, batches in (("batches", data), ("whole", whole)):
        ort_quantize_static(conv_chain(), batches, method="entropy",
                            calibration_cache=tmp_path / f"{name}.json")
    batched, at_once = (json.loads((tmp_path / f"{n}.json").read_text())["data"]
                        for n in ("batches", "whole"))
    assert batched == at_once


def _entropy_range_of(values, bins=None):
    m = np.abs(values).max()
    hist, edges = np.histogram(np.abs(values), bins=bins or static.ENTROPY_BINS, range=(0, m))
    return static.entropy_range(hist, edges.astype(np.float32), values.min(), values.max())


def _with_outliers(one_sided, seed=0, n=200_000):
    """A Gaussian bulk and one value in 10,000 twenty to fifty standard deviations out."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(n)
    far = rng.random(n) < 1e-4
    values[far] = rng.choice([-1, 1], far.sum()) * rng.uniform(20, 50, far.sum())
    return (np.maximum(values, 0) if one_sided else values).astype(np.float32)


def _heavy_tailed(one_sided, seed=0, n=200_000):
    values = np.random.default_rng(seed).standard_t(3, size=n).astype(np.float32)
    return np.maximum(values, 0) if one_sided else values


@pytest.mark.parametrize(("make", "one_sided"), [(_with_outliers, False),
                                                 (_heavy_tailed, False), (_heavy_tailed, True)])
def test_entropy_range_clips_tails(make, one_sided):
    values = make(one_sided)
    low, high = _entropy_range_of(values)
    assert 2.0 < float(high) < 0.5 * float(np.abs(values).max())
    assert float(low) == (0.0 if one_sided else -float(high))


def test_entropy_range_is_not_decided_by_the_zeros_of_a_relu():
    """Half the values of a ReLU are exactly 0; the range still covers the bulk (~4 sigma)."""
    values = np.maximum(np.random.default_rng(0).standard_normal(200_000), 0).astype(np.float32)
    low, high = _entropy_range_of(values)
    assert float(low) == 0.0
    assert 3.5 < float(high) <= float(values.max())


def _kl_by_definition(hist, i, levels):
    """The divergence for threshold bin i, written out loop by loop."""
    counts = [float(c) for c in hist]
    counts[0] = counts[1]
    p = counts[:i]
    p[-1] += sum(counts[i:])
    q = [0.0] * i
    for g in range(levels):
        group = [k for k in range(i) if k * levels // i == g]
        filled = [k for k in group if counts[k] > 0]
        for k in filled:
            q[k] = sum(counts[j] for j in group) / len(filled)
    if any(p[k] > 0 and q[k] == 0 for k in range(i)):
        return math.inf
    sp, sq = sum(p), sum(q)
    return sum(p[k] / sp * math.log((p[k] / sp) / (q[k] / sq)) for k in range(i) if p[k] > 0)


@pytest.mark.parametrize("one_sided", [False, True])
def test_entropy_range_is_the_threshold_of_least_divergence(one_sided):
    values = _with_outliers(one_sided, seed=2, n=20_000)
    bins, levels = 400, 256 if one_sided else 128
    m = np.abs(values).max()
    hist, edges = np.histogram(np.abs(values), bins=bins, range=(0, m))
    divergences = {i: _kl_by_definition(hist, i, levels) for i in range(levels, bins + 1)}
    least = min(divergences.values())
    best = max(i for i, d in divergences.items() if d == least)
    _, high = static.entropy_range(hist, edges.astype(np.float32), values.min(), values.max())
    assert float(high) == pytest.approx(float(edges[best]))
    assert float(high) < float(m)


def test_entropy_range_keeps_a_distribution_without_tails_whole():
    values = np.random.default_rng(1).uniform(-3, 5, size=200_000).astype(np.float32)
    low, high = _entropy_range_of(values)
    assert float(low) == values.min()
    assert float(high) >= 0.97 * values.max()


def test_entropy_calibration_of_constant_tensors(tmp_path):
    """All zeros, or all one positive value: a range that holds the values, never reversed."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["input", "zero"], ["zeros"]),
         helper.make_node("Add", ["zeros", "two"], ["twos"]),
         helper.make_node("Relu", ["twos"], ["output"])],
        "constants",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
         helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = [{"input": np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)}]
    ort_quantize_static(model, data, method="entropy", calibration_cache=tmp_path / "r.json")
    ranges = json.loads((tmp_path / "r.json").read_text())["data"]
    assert (ranges["zeros"]["lowest"], ranges["zeros"]["highest"]) == (0.0, 0.0)
    assert ranges["twos"]["lowest"] <= 2.0 <= ranges["twos"]["highest"]


def test_entropy_range_of_an_all_zero_tensor_is_zero():
    zeros = np.zeros(100, dtype=np.float32)
    hist, edges = np.histogram(zeros, bins=static.ENTROPY_BINS)
    assert static.entropy_range(hist, edges.astype(np.float32), zeros.min(), zeros.max()) \
        == (0.0, 0.0)


def _number(cached):
    """A range end as the calibration cache stores it: a number or a numpy array's record."""
    return float(np.ravel(cached["data"])[0]) if isinstance(cached, dict) else float(cached)


def test_entropy_ranges_differ_from_minmax(tmp_path):
    """The entropy search clips heavy tails: its ranges are not just the extremes."""
    model, data = conv_chain(), feeds()
    ort_quantize_static(model, data, method="entropy", calibration_cache=tmp_path / "e.json")
    ort_quantize_static(model, data, method="minmax", calibration_cache=tmp_path / "m.json")
    entropy = json.loads((tmp_path / "e.json").read_text())["data"]
    minmax = json.loads((tmp_path / "m.json").read_text())["data"]
    assert entropy.keys() == minmax.keys()
    clipped = [name for name in entropy
               if _number(entropy[name]["highest"]) < _number(minmax[name]["highest"]) - 1e-3]
    assert clipped


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_ranges_reads_one_batch_at_a_time(method, tmp_path):
    """The augmented session runs twice per batch (range, then histogram) and nothing is kept
    between batches but per-tensor ranges and counts."""
    import onnx

    src = tmp_path / "model.onnx"
    onnx.save(conv_chain(), str(src))
    seen = []

    class Feeds(list):
        def __iter__(self):
            for feed in super().__iter__():
                seen.append(len(feed["input"]))
                yield feed

    assert static.histogram_ranges(src, Feeds(feeds((8, 8, 8))), method, 99.9,
                                   tmp_path / "r.json")
    assert seen == [8, 8, 8, 8, 8, 8]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["calibration_method"] and data["data"]


def test_non_finite_activations_leave_percentile_calibration_to_onnxruntime(tmp_path):
    import onnx

    src = tmp_path / "model.onnx"
    onnx.save(conv_chain(), str(src))
    bad = feeds((8, 8))
    bad[1]["input"][0, 0, 0, 0] = np.inf
    assert not static.histogram_ranges(src, bad, "percentile", 99.9, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("bad_value", [np.inf, np.nan])
def test_entropy_calibration_refuses_non_finite_activations(bad_value, tmp_path):
    bad = feeds((8, 8))
    bad[1]["input"][0, 0, 0, 0] = bad_value
    with pytest.raises(ConfigError, match=r"the tensor '\w+' holds NaN or infinity") as err:
        ort_quantize_static(conv_chain(), bad, method="entropy",
                            calibration_cache=tmp_path / "r.json")
    assert "minmax" in str(err.value)
    assert not (tmp_path / "r.json").exists()


def test_an_unknown_histogram_method_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="minmax") as err:
        static.histogram_ranges(tmp_path / "model.onnx", feeds(), "minmax", 99.9,
                                tmp_path / "r.json")
    assert "entropy" in str(err.value)


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_feeds_given_as_a_generator_are_read_for_every_pass(method):
    data = feeds()
    from_list = ort_quantize_static(conv_chain(), data, method=method, percentile=99.9)
    from_generator = ort_quantize_static(conv_chain(), (f for f in data), method=method,
                                         percentile=99.9)
    assert from_generator.SerializeToString() == from_list.SerializeToString()
