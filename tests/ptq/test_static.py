"""Percentile calibration a batch at a time gives onnxruntime's ranges and model, bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeslim.ptq import static
from edgeslim.ptq.static import ort_quantize_static

from .conftest import conv_chain


def feeds(sizes=(8, 8, 8, 8), seed=0):
    rng = np.random.default_rng(seed)
    # heavy tails, so that the 99.9th percentile cuts well inside the range
    return [{"input": (rng.standard_t(3, size=(n, 4, 8, 8))).astype(np.float32)} for n in sizes]


def onnxruntime_only(monkeypatch):
    """onnxruntime's own percentile calibrator (every batch's tensors held at once)."""
    monkeypatch.setattr(static, "percentile_ranges", lambda *args, **kwargs: False)


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
    assert len(ranges["ours"]["data"]) >= 5  # input, conv outputs, activations
    assert ours.SerializeToString() == theirs.SerializeToString()


def test_percentile_ranges_reads_one_batch_at_a_time(tmp_path):
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

    assert static.percentile_ranges(src, Feeds(feeds((8, 8, 8))), 99.9, tmp_path / "r.json")
    assert seen == [8, 8, 8, 8, 8, 8]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["calibration_method"] and data["data"]


def test_non_finite_activations_leave_calibration_to_onnxruntime(tmp_path):
    import onnx

    src = tmp_path / "model.onnx"
    onnx.save(conv_chain(), str(src))
    bad = feeds((8, 8))
    bad[1]["input"][0, 0, 0, 0] = np.inf
    assert not static.percentile_ranges(src, bad, 99.9, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def test_feeds_given_as_a_generator_are_read_for_every_pass(tmp_path):
    data = feeds()
    from_list = ort_quantize_static(conv_chain(), data, method="percentile", percentile=99.9)
    from_generator = ort_quantize_static(conv_chain(), (f for f in data), method="percentile",
                                         percentile=99.9)
    assert from_generator.SerializeToString() == from_list.SerializeToString()
