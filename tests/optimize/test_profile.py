"""Device profiles: files, fleet node labels, scaling, bad input."""

from __future__ import annotations

import json
import re

import pytest

from edgeslim.errors import ConfigError
from edgeslim.optimize import DeviceProfile, load_profile, profile_from_labels
from edgeslim.optimize.profile import dump_profile, measure_reference


def test_yaml_profile_and_ratio_scaling(tmp_path):
    p = tmp_path / "rpi.yaml"
    p.write_text("name: rpi4\ncores: 4\nmemory_mb: 3838\n"
                 "reference: {model: digits-cnn, latency_ms: 0.5, threads: 4}\n")
    prof = load_profile(p)
    assert (prof.name, prof.cores, prof.memory_mb, prof.reference_latency_ms) == \
        ("rpi4", 4, 3838, 0.5)
    # measured here: the reference at 0.05 ms, so the device is 10x slower
    assert prof.factor(0.05, 2) == pytest.approx(10.0)
    assert "ratio" in prof.method


def test_json_round_trip(tmp_path):
    prof = DeviceProfile("edge-a", cores=2, threads=2, reference_latency_ms=0.07,
                         reference_threads=2)
    p = tmp_path / "a.json"
    p.write_text(dump_profile(prof))
    assert load_profile(p) == prof


def test_fleet_node_labels_make_a_profile(tmp_path):
    labels = {"device_class": "aarch64", "cores": "4", "memory_mb": "3838",
              "ref_latency_us": "41.5", "site": "lab"}
    prof = profile_from_labels(labels)
    assert prof.reference_model == "fleet-reference" and prof.reference_threads == 1
    assert prof.reference_latency_ms == pytest.approx(0.0415) and prof.cores == 4
    # the controller's GET /nodes entry works as a file too
    p = tmp_path / "node.json"
    p.write_text(json.dumps({"id": "edge-7", "labels": labels}))
    assert load_profile(p).name == "edge-7"
    entry = profile_from_labels({"id": "edge-7", "labels": labels})  # and from Python
    assert entry.name == "edge-7" and entry.reference_latency_ms == prof.reference_latency_ms


def test_per_core_scaling_without_reference():
    prof = DeviceProfile("big", cores=8)
    assert prof.factor(None, 2) == pytest.approx(0.25)
    assert "per-core" in prof.method


@pytest.mark.parametrize("text, word", [
    ("name: x\ncores: 2\nreference: {model: resnet, latency_ms: 1}\n", "resnet"),
    ("name: x\ncores: 0\n", "cores"),
    ("name: x\ncores: 2\nreference: {latency_ms: -3}\n", "latency_ms"),
    ("name: x\ncores: 2\ncolour: red\n", "colour"),
    ("name: x\nreference: {model: digits-cnn}\n", "neither"),
    ("name: x\ncores: 2\nreference: {latency_ms: 1, batch: 8}\n", "batch 1"),
    ("- just\n- a list\n", "mapping"),
    ("name: x\ncores: [2\n", "not JSON or YAML: line 3, column 1: "),
    ("name: x\ncores: 2\ncores: 8\n", "line 3, column 1: the key 'cores' is given twice"),
])
def test_bad_profiles(tmp_path, text, word):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(word)) as info:
        load_profile(p)
    assert "\n" not in str(info.value)  # one line, without the parser's excerpt


def test_bad_labels_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="ref_latency_us"):
        profile_from_labels({"cores": "2", "ref_latency_us": "fast"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "nope.yaml")


def test_reference_is_measured_on_onnxruntime():
    one = measure_reference("fleet-reference", 1, repeats=50)
    assert 0 < one < 50  # milliseconds: a 64-64-10 MLP
