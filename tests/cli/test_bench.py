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


def test_bench_sessions_spin_within_runs_only(mlp_bundle, monkeypatch):
    """Each variant's threads spin-wait between ops as in edgeslim.load, and stop when its run
    returns, so that no pool spins on into the next variant's turn."""
    import edgeslim.benchmark as benchmark

    created = []

    def recording(*args, **kwargs):
        created.append(real(*args, **kwargs))
        return created[-1]

    real = benchmark.ort_session
    monkeypatch.setattr(benchmark, "ort_session", recording)
    bench_bundle(mlp_bundle, threads=2, batch=4, repeats=5, against_original=True)
    assert len(created) == 2  # the bundle and the original's fp32 export
    for sess in created:
        options = sess.get_session_options()
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
        with pytest.raises(RuntimeError, match="does not have configuration"):
            options.get_session_config_entry("session.intra_op.allow_spinning")  # default: on
        assert options.intra_op_num_threads == 2


def test_timed_rounds_runs_each_variant_warm_and_back_to_back():
    from edgeslim.benchmark import timed_rounds

    calls = []
    variants = {name: (lambda feeds, name=name: calls.append(name)) for name in "ab"}
    times = timed_rounds(variants, {}, repeats=7, rounds=2, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 7, "b": 7}
    # round 1: a warm-up + 4 timed, then b likewise; round 2: 1 + 3 each
    assert "".join(calls) == "a" * 5 + "b" * 5 + "a" * 4 + "b" * 4
    assert all(t >= 0 for v in times.values() for t in v)


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
    paced = ort_session(model, spin_between_runs=False).get_session_options()
    assert paced.get_session_config_entry("session.force_spinning_stop") == "1"
    x = np.array([-1.0, 2.0], np.float32)
    assert quiet.run(None, {"x": x})[0].tolist() == [0.0, 2.0]


@pytest.mark.parametrize(("change", "needle"), [
    (lambda m, model: m["inputs"][0].update(name="zzz"), "declares inputs ['zzz']"),
    (lambda m, model: None, "cannot load the model"),
])
def test_bench_refuses_a_bundle_whose_model_does_not_run_with_one_line(tmp_path, capsys, change,
                                                                      needle):
    """A bundle whose hashes hold but whose model does not match its manifest (or is no ONNX
    at all) gets the one-line error `inspect` and `load` give, not onnxruntime's traceback."""
    from tests.bundle.helpers import craft_zip, full_manifest, manifest_bytes, mlp_onnx

    model = mlp_onnx() if needle != "cannot load the model" else b"not an onnx model"
    manifest = full_manifest(model)
    change(manifest, model)
    path = craft_zip(tmp_path / "bad.eslim", [("manifest.json", manifest_bytes(manifest)),
                                              ("model.onnx", model)])
    assert main(["bench", str(path), "--repeats", "5"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("error:") and "Traceback" not in err


def _bundle_of(tmp_path, nodes, inputs, arrays, out_shape, name="m"):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgeslim.bundle import write_bundle

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, e, s) for n, e, s in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(a, k) for k, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    dtypes = {TensorProto.FLOAT: "float32", TensorProto.INT64: "int64"}
    manifest = {"name": name,
                "inputs": [{"name": n, "dtype": dtypes[e], "shape": s} for n, e, s in inputs],
                "outputs": [{"name": "y", "dtype": "float32", "shape": out_shape}]}
    return write_bundle(tmp_path / f"{name}.eslim", model_onnx=model.SerializeToString(),
                        manifest=manifest)


def test_bench_times_a_fixed_first_axis_at_its_own_size(tmp_path):
    """A model whose input is [1, 64] was timed on one row and its rows/s multiplied by
    --batch (64x too high); the row count reported is the one timed."""
    import numpy as np
    from onnx import TensorProto, helper

    w = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
    bundle = _bundle_of(tmp_path, [helper.make_node("MatMul", ["x", "w"], ["y"])],
                        [("x", TensorProto.FLOAT, [1, 64])], {"w": w}, [1, 10])
    rows = bench_bundle(bundle, threads=1, batch=64, repeats=10)
    assert rows[0].batch == 1


def test_bench_feeds_integer_inputs_values_every_table_takes(tmp_path, capsys):
    """Index inputs were random integers 0-99: a two-row table (token types) crashed bench
    with onnxruntime's traceback on a bundle inspect passes."""
    import numpy as np
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["words", "input_ids"], ["a"]),
             helper.make_node("Gather", ["types", "token_type_ids"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    ints = [("input_ids", TensorProto.INT64, ["batch", "seq"]),
            ("token_type_ids", TensorProto.INT64, ["batch", "seq"])]
    bundle = _bundle_of(tmp_path, nodes, ints, {
        "words": rng.normal(size=(1000, 8)).astype(np.float32),
        "types": rng.normal(size=(2, 8)).astype(np.float32)}, ["batch", "seq", 8])
    assert main(["bench", str(bundle), "--repeats", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["throughput"] > 0


def test_bench_against_original_finds_a_callables_data_in_its_recipe(tmp_path):
    """A package.module:callable bundle names its data in the recipe; --against original
    asked for a 'data:' it already had, and always failed."""
    out = tmp_path / "mine.eslim"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: digits\nsteps: []\n")
    assert main(["compress", "edgeslim.zoo.digits:DigitsMLP", "--recipe", str(recipe),
                 "-o", str(out), "-q"]) == 0
    rows = bench_bundle(out, threads=1, batch=8, repeats=5, against_original=True)
    assert [r.variant.split(" (")[0] for r in rows][1:] == [
        "original PyTorch eager", "original onnxruntime fp32"]


def test_bench_against_original_runs_an_onnx_source_on_onnxruntime(tmp_path, monkeypatch):
    """A bundle compressed from a .onnx file was refused ('neither a zoo model nor
    package.module:callable'); its original runs on onnxruntime fp32."""
    from tests.edge._bundles import linear_onnx

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lin.onnx").write_bytes(linear_onnx())
    (tmp_path / "r.yaml").write_text("data: digits\nsteps:\n  - ptq: {}\n")
    assert main(["compress", "lin.onnx", "--recipe", "r.yaml", "-o", "lin.eslim", "-q"]) == 0
    rows = bench_bundle("lin.eslim", threads=1, batch=8, repeats=5, against_original=True)
    assert [r.variant.split(" (")[0] for r in rows][1:] == ["original onnxruntime fp32"]
    (tmp_path / "lin.onnx").unlink()
    with pytest.raises(ConfigError, match=r"'lin\.onnx', which is not a file here"):
        bench_bundle("lin.eslim", threads=1, batch=8, repeats=5, against_original=True)


def test_plain_bench_of_a_callable_builds_no_workload():
    """Without --against, a callable's bundle is timed on its probe inputs: building its
    recipe's workload (photos: 2,048 crops and the zoo model) took ~35 s to pick one batch."""
    from edgeslim.benchmark import _workload

    manifest = {"provenance": {"source": "mypkg.models:build", "recipe": {"data": "photos"}}}
    assert _workload(manifest) is None
