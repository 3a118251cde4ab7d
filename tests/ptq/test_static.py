"""Histogram calibration (percentile, entropy) a batch at a time gives onnxruntime's ranges and
model, bit for bit."""

from __future__ import annotations

import json

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


def onnxruntime_entropy_ranges(src, data, bins, levels):
    """onnxruntime's entropy calibrator with these bins and levels, every batch held at once."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    from edgeslim.ptq.calibrate import FeedReader

    calibrator = create_calibrator(
        src, list(set(QLinearOpsRegistry) | set(QDQRegistry)),
        augmented_model_path=str(src.parent / "augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": bins, "num_quantized_bins": levels},
    )
    calibrator.collect_data(FeedReader(list(data)))
    return calibrator.compute_data()


def test_batchwise_entropy_ranges_are_onnxruntimes_with_the_same_bins(monkeypatch, tmp_path):
    import onnx
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    src = tmp_path / "model.onnx"
    onnx.save(load_model_with_shape_infer(_saved(conv_chain(), tmp_path)), str(src))
    # onnxruntime's search loops over bins in Python: fewer bins keep this test quick
    monkeypatch.setattr(static, "ENTROPY_BINS", 255)
    monkeypatch.setattr(static, "ENTROPY_LEVELS", 31)
    data = feeds()
    assert static.histogram_ranges(src, data, "entropy", 99.9, tmp_path / "ours.json")
    ours = json.loads((tmp_path / "ours.json").read_text())
    assert ours["calibration_method"]["value"].endswith("Entropy")
    theirs = onnxruntime_entropy_ranges(src, data, 255, 31)
    assert set(ours["data"]) == set(theirs.data) and len(theirs.data) >= 5
    for name, expected in theirs.data.items():
        got = ours["data"][name]
        assert (got["lowest"], got["highest"]) == (float(expected.lowest),
                                                    float(expected.highest)), name
        assert got["hist"]["data"] == expected.hist.tolist(), name


@pytest.mark.parametrize("quant_format", ["qdq", "qoperator"])
def test_entropy_quantization_uses_the_batchwise_ranges(quant_format, tmp_path):
    model = ort_quantize_static(conv_chain(), feeds(), method="entropy",
                                quant_format=quant_format, calibration_cache=tmp_path / "r.json")
    cache = json.loads((tmp_path / "r.json").read_text())
    assert cache["calibration_method"]["value"].endswith("Entropy")
    assert len(cache["data"]["c1"]["hist"]["data"]) == static.ENTROPY_BINS
    assert any(n.op_type in ("QuantizeLinear", "QLinearConv") for n in model.graph.node)


@pytest.mark.parametrize("seed", range(4))
def test_entropy_threshold_is_onnxruntimes_choice(seed):
    from onnxruntime.quantization.calibrate import HistogramCollector

    rng = np.random.default_rng(seed)
    bins, levels = [(255, 31), (256, 32), (511, 63), (2047, 255)][seed]
    values = rng.standard_t(2 + seed, size=20_000).astype(np.float32) * (1 + seed)
    if seed % 2:
        values = np.maximum(values, 0)  # one-sided, as after a ReLU
    m = np.array(np.abs(values).max(), dtype=np.float32)
    hist, edges = np.histogram(values, bins, range=(-m, m))
    collector = HistogramCollector("entropy", False, bins, levels, 99.99, "same")
    expected = collector.get_entropy_threshold(
        (hist, edges, values.min(), values.max(), m), levels)
    got = static.entropy_threshold(hist, edges, values.min(), values.max(), levels)
    assert (float(got[0]), float(got[1])) == (float(expected[0]), float(expected[1]))
    assert float(got[1]) < float(m)  # heavy tails: the search clips


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


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_non_finite_activations_leave_calibration_to_onnxruntime(method, tmp_path):
    import onnx

    src = tmp_path / "model.onnx"
    onnx.save(conv_chain(), str(src))
    bad = feeds((8, 8))
    bad[1]["input"][0, 0, 0, 0] = np.inf
    assert not static.histogram_ranges(src, bad, method, 99.9, tmp_path / "r.json")
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
