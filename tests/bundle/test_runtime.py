"""The torch-free runner: same answers as onnxruntime, checked inputs, clear load failures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest

from edgeslim.bundle import read_bundle, write_bundle
from edgeslim.cli import main
from edgeslim.edge.runtime import Runner, default_threads, load
from edgeslim.errors import BundleError, ConfigError, InferenceError, SignatureError
from tests.bundle.helpers import (
    craft_zip,
    full_manifest,
    manifest_bytes,
    mlp_manifest,
    mlp_reference,
    two_input_onnx,
    unknown_op_onnx,
)

TWO_IN = {
    "name": "adder",
    "inputs": [{"name": n, "dtype": "int64", "shape": ["batch", 3]} for n in "ab"],
    "outputs": [{"name": "sum", "dtype": "int64", "shape": ["batch", 3]},
                {"name": "first", "dtype": "float32", "shape": ["batch"]}],
}


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory, mlp_bytes, keypair):
    return write_bundle(tmp_path_factory.mktemp("rt") / "mlp.eslim", model_onnx=mlp_bytes,
                        manifest=mlp_manifest(), sign_key=keypair[0])


@pytest.fixture(scope="module")
def mlp_runner(mlp_path):
    return load(mlp_path, intra_op_num_threads=1)


@pytest.fixture(scope="module")
def adder(tmp_path_factory):
    path = write_bundle(tmp_path_factory.mktemp("rt") / "add.eslim",
                        model_onnx=two_input_onnx(), manifest=TWO_IN)
    return load(path, intra_op_num_threads=1)


def test_runner_matches_onnxruntime_and_numpy(mlp_runner, mlp_bytes):
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    got = mlp_runner.run(x)
    assert list(got) == ["logits"]
    ref = ort.InferenceSession(mlp_bytes, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(got["logits"], ref.run(None, {"input": x})[0])
    np.testing.assert_allclose(got["logits"], mlp_reference(x), rtol=1e-5, atol=1e-5)
    assert mlp_runner.run({"input": x})["logits"].shape == (5, 4)


def test_runner_attributes(mlp_runner, mlp_path):
    assert mlp_runner.name == "tiny-mlp" and mlp_runner.version == "3"
    assert [(s.name, s.dtype, s.shape) for s in mlp_runner.inputs] == [
        ("input", "float32", ("batch", 8))]
    assert mlp_runner.outputs[0].name == "logits"
    assert mlp_runner.manifest == read_bundle(mlp_path).manifest
    opts = mlp_runner.session.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert 1 <= default_threads() <= 4
    with pytest.raises(ConfigError, match="intra_op_num_threads"):
        load(mlp_path, intra_op_num_threads=0)


def test_idle_threads_spin_unless_told_not_to(mlp_runner, mlp_path):
    key = "session.intra_op.allow_spinning"
    assert mlp_runner.session.get_session_options().get_session_config_entry(key) == "1"
    quiet = load(mlp_path, intra_op_num_threads=2, spin=False)
    assert quiet.session.get_session_options().get_session_config_entry(key) == "0"
    x = np.ones((3, 8), np.float32)
    np.testing.assert_array_equal(quiet.run(x)["logits"], mlp_runner.run(x)["logits"])
    with pytest.raises(ConfigError, match=r"'spin'.*'no'"):
        load(mlp_path, spin="no")


def test_dtype_is_never_cast_silently(mlp_runner):
    x64 = np.random.default_rng(2).standard_normal((2, 8))
    with pytest.raises(InferenceError, match=r"must be float32; got float64.*cast=True"):
        mlp_runner.run(x64)
    got = mlp_runner.run(x64, cast=True)["logits"]
    np.testing.assert_array_equal(got, mlp_runner.run(x64.astype(np.float32))["logits"])
    with pytest.raises(InferenceError, match="must be float32; got float64"):
        mlp_runner.run(x64.tolist())  # Python floats are float64
    with pytest.raises(InferenceError, match="numeric float32"):
        mlp_runner.run(np.array([["a"] * 8]))


def test_input_checks(mlp_runner, adder):
    x = np.zeros((2, 8), np.float32)
    cases = [
        (lambda: mlp_runner.run({"x": x}), r"takes inputs \['input'\]; got \['x'\].*unknown"),
        (lambda: mlp_runner.run(np.zeros((2, 9), np.float32)), r"dim 1 is 9, expected 8"),
        (lambda: mlp_runner.run(np.zeros(8, np.float32)), r"rank 2 .*got shape \[8\]"),
        (lambda: adder.run(np.zeros((1, 3), np.int64)), "takes 2 inputs"),
        (lambda: adder.run({"a": np.zeros((1, 3), np.int64)}), r"missing \['b'\]"),
        (lambda: adder.run({"a": np.zeros((2, 3), np.int64), "b": np.zeros((3, 3), np.int64)}),
         "Dim 'batch' is 2 in input 'a' but 3 in input 'b'"),
        (lambda: adder.run({"a": np.zeros((1, 3), np.float32), "b": np.zeros((1, 3), np.int64)},
                           cast=True), "does not cast"),
        (lambda: adder.run({"a": np.zeros((1, 3), np.float32), "b": np.zeros((1, 3), np.int64)}),
         "must be int64; got float32"),
    ]
    for call, pattern in cases:
        with pytest.raises(InferenceError, match=pattern):
            call()


def test_multi_input_outputs_in_order(adder):
    a = np.arange(6, dtype=np.int64).reshape(2, 3)
    b = np.ones((2, 3), np.int32)
    out = adder.run({"a": a, "b": b}, cast=True)  # int32 -> int64 is a safe cast
    assert list(out) == ["sum", "first"]
    np.testing.assert_array_equal(out["sum"], a + 1)
    np.testing.assert_array_equal(out["first"], (a + 1).max(axis=1).astype(np.float32))
    # a non-contiguous view is accepted
    out2 = adder.run({"a": np.asfortranarray(a), "b": b.astype(np.int64)})
    np.testing.assert_array_equal(out2["sum"], a + 1)


def test_unknown_op_is_a_bundle_error(tmp_path, capsys):
    model = unknown_op_onnx()
    m = {"name": "weird",
         "inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 8]}],
         "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 8]}]}
    path = write_bundle(tmp_path / "w.eslim", model_onnx=model, manifest=m)
    read_bundle(path)  # a well-formed bundle...
    with pytest.raises(BundleError, match=r"cannot load the model of bundle 'weird'.*Frobnicate"):
        load(path)  # ...whose model onnxruntime cannot run
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Frobnicate" in err and "Traceback" not in err and err.count("\n") == 1


def test_manifest_disagreeing_with_graph(tmp_path, mlp_bytes):
    m = full_manifest(mlp_bytes)
    m["inputs"][0]["name"] = "pixels"  # hashes fine, but the graph's input is 'input'
    path = craft_zip(tmp_path / "x.eslim", [("manifest.json", manifest_bytes(m)),
                                            ("model.onnx", mlp_bytes)])
    read_bundle(path)
    with pytest.raises(BundleError, match=r"declares inputs \['pixels'\] but the model has"):
        load(path)


def test_warmup_failure(tmp_path):
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor("s", TensorProto.INT64, [2], [2, 2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = write_bundle(tmp_path / "r.eslim", model_onnx=model.SerializeToString(), manifest={
        "name": "r", "inputs": [{"name": "x", "dtype": "float32", "shape": ["n"]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [2, 2]}]})
    with pytest.raises(BundleError, match="warm-up run on zeros of shapes"):
        load(path)
    runner = load(path, warmup=False)  # the caller may skip it...
    np.testing.assert_array_equal(runner.run(np.arange(4, dtype=np.float32))["y"],
                                  np.arange(4, dtype=np.float32).reshape(2, 2))
    with pytest.raises(InferenceError, match="failed on the inputs given"):
        runner.run(np.zeros(3, np.float32))  # ...and a bad size is onnxruntime's to refuse


def test_probe(tmp_path, mlp_bytes):
    x = np.random.default_rng(3).standard_normal((1, 8)).astype(np.float32)
    good = {"inputs": {"input": x}, "outputs": {"logits": mlp_reference(x)}, "atol": 1e-4}
    path = write_bundle(tmp_path / "p.eslim", model_onnx=mlp_bytes,
                        manifest=mlp_manifest(probe=good))
    assert load(path).probe() <= 1e-4
    bad = dict(good, outputs={"logits": mlp_reference(x) + 0.1})
    path = write_bundle(tmp_path / "q.eslim", model_onnx=mlp_bytes,
                        manifest=mlp_manifest(probe=bad))
    with pytest.raises(BundleError, match=r"off by 0\.1"):
        load(path).probe()


def test_signature_through_load(mlp_path, keypair, other_keypair):
    runner = load(mlp_path, keypair[1])
    assert runner.bundle.verified
    with pytest.raises(SignatureError):
        load(mlp_path, other_keypair[1])
    bundle = read_bundle(mlp_path)  # a Bundle read without a key is verified by the Runner
    assert Runner(bundle, public_key=keypair[1]).bundle.verified
    with pytest.raises(SignatureError):
        Runner(bundle, public_key=other_keypair[1])
    checked = read_bundle(mlp_path, public_key=keypair[1])  # verified, but with another key
    with pytest.raises(SignatureError, match="does not verify"):
        load(checked, other_keypair[1])


def test_a_server_checks_a_bundle_read_elsewhere_with_its_own_key(mlp_path, keypair,
                                                                   other_keypair):
    from edgeslim.edge.server import EdgeServer

    checked = read_bundle(mlp_path, public_key=keypair[1])
    server = EdgeServer(public_key=other_keypair[1])
    try:
        with pytest.raises(SignatureError, match="does not verify"):
            server.swap(checked)
        assert server.models() == []
    finally:
        server.stop()


def test_inspect_ok(mlp_path, keypair, capsys):
    assert main(["inspect", str(mlp_path), "--public-key", str(keypair[1])]) == 0
    out = capsys.readouterr().out
    for text in ("tiny-mlp", "signed, verified", "[batch, 8]", "reshape", "accuracy",
                 "prune", read_bundle(mlp_path).manifest["model"]["sha256"][:40],
                 "warm-up run passed"):
        assert text in out, text
    assert main(["inspect", str(mlp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["signature"] == {"present": True, "verified": False}
    assert report["manifest"]["name"] == "tiny-mlp"
    assert report["entries"]["model.onnx"]["compression"] == "deflate"


def test_keygen_and_sign_cli(tmp_path, mlp_bytes, capsys):
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 0
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["keygen", "--out", str(tmp_path / "k"), "--force"]) == 0
    path = write_bundle(tmp_path / "u.eslim", model_onnx=mlp_bytes, manifest=mlp_manifest())
    pub = str(tmp_path / "k" / "signing.pub")
    assert main(["inspect", str(path), "--public-key", pub, "--no-run"]) == 4
    assert main(["sign", str(path), "--key", str(tmp_path / "k" / "signing.key")]) == 0
    assert main(["inspect", str(path), "--public-key", pub, "--no-run"]) == 0
    assert main(["sign", str(path), "--key", pub]) == 4  # a public key cannot sign
    assert "not a PEM private key" in capsys.readouterr().err


def test_edge_imports_without_torch(mlp_path):
    code = textwrap.dedent(f"""
        import sys, importlib.abc

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked on this edge node")

        sys.meta_path.insert(0, Block())
        import numpy as np
        import edgeslim.bundle, edgeslim.edge, edgeslim.edge.runtime
        from edgeslim.edge import load
        r = load({str(mlp_path)!r}, intra_op_num_threads=1)
        print(r.run(np.ones((1, 8), np.float32))["logits"].shape)
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(1, 4)"


def test_paths_and_options_of_the_wrong_kind_are_config_errors(tmp_path, mlp_path):
    import torch

    from edgeslim.bundle import generate_keypair, sign_bundle
    from edgeslim.edge.server import EdgeServer

    for call, phrase in (
        (lambda: load(None), "must be a path or a Bundle"),
        (lambda: load(5), "Got int instead"),
        (lambda: read_bundle(None), "'path' parameter of read_bundle must be a path"),
        (lambda: generate_keypair(None), "'out_dir' parameter of generate_keypair"),
        (lambda: write_bundle(None, model_onnx=b"", manifest={}), "'path' parameter of write"),
        (lambda: sign_bundle(None, "k"), "'path' parameter of sign_bundle"),
        (lambda: EdgeServer(str(mlp_path)), "must be a list of bundle paths"),
        (lambda: EdgeServer(None), "Got NoneType instead"),
        (lambda: EdgeServer([], host=5), "'host' parameter of EdgeServer"),
    ):
        with pytest.raises(ConfigError, match=re.escape(phrase)):
            call()
    runner = load(mlp_path)
    x = torch.rand(2, 8, requires_grad=True)  # a tensor straight out of training code
    np.testing.assert_array_equal(runner.run({"input": x})["logits"],
                                  runner.run({"input": x.detach().numpy()})["logits"])
    with pytest.raises(ConfigError, match="'cast' parameter of run"):
        runner.run({"input": x.detach().numpy()}, cast="no")
