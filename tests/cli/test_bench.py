"""edgeslim bench: rows for the bundle and, with --against original, its fp32 original."""

from __future__ import annotations

import json

import pytest

from edgeslim.benchmark import bench_bundle
from edgeslim.cli import main
from edgeslim.errors import ConfigError
from edgeslim.pipeline import compress


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "mlp.eslim"
    return compress("digits-mlp", preset="fp32", out=out, progress=False).bundle


def test_bench_against_original_measures_three_variants(mlp_bundle):
    rows = bench_bundle(mlp_bundle, threads=1, batch=16, repeats=10, against_original=True)
    assert [r.variant.split(" (")[0] for r in rows] == [
        "bundle digits-mlp", "original PyTorch eager", "original onnxruntime fp32"]
    for r in rows:
        assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms
        assert r.throughput > 0 and r.batch == 16


def test_bench_cli_json_and_errors(mlp_bundle, capsys):
    assert main(["bench", str(mlp_bundle), "--repeats", "5", "--batch", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["batch"] == 4
    assert main(["bench", str(mlp_bundle), "--against", "yesterday"]) == 2
    assert "--against takes 'original'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'threads' parameter of bench"):
        bench_bundle(mlp_bundle, threads=0)


def test_bench_sessions_do_not_spin_into_each_other(mlp_bundle, monkeypatch):
    """Variants alternate run by run: an onnxruntime pool that spins after its run would take
    the cores from the next variant, so every session bench creates sleeps when idle."""
    import edgeslim.benchmark as benchmark

    created = []

    def recording(*args, **kwargs):
        created.append(real(*args, **kwargs))
        return created[-1]

    real = benchmark.ort_session
    monkeypatch.setattr(benchmark, "ort_session", recording)
    bench_bundle(mlp_bundle, threads=2, batch=4, repeats=5, against_original=True)
    key = "session.intra_op.allow_spinning"
    assert len(created) == 2  # the bundle and the original's fp32 export
    assert [s.get_session_options().get_session_config_entry(key) for s in created] == ["0", "0"]


def test_ort_session_spins_by_default_and_not_when_told():
    import numpy as np
    from onnx import TensorProto, helper

    from edgeslim._ort import ort_session

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    key = "session.intra_op.allow_spinning"
    spinning, quiet = ort_session(model), ort_session(model, spin=False)
    # unset means onnxruntime's default, which spins
    with pytest.raises(RuntimeError, match="does not have configuration"):
        spinning.get_session_options().get_session_config_entry(key)
    assert quiet.get_session_options().get_session_config_entry(key) == "0"
    x = np.array([-1.0, 2.0], np.float32)
    assert quiet.run(None, {"x": x})[0].tolist() == [0.0, 2.0]
