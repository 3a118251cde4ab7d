"""Writing and reading bundles: round trips, determinism, defaults, refusals, atomicity."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeslim.bundle import (
    Bundle,
    dump_manifest,
    extract_bundle,
    read_bundle,
    write_bundle,
)
from edgeslim.bundle._onnxproto import read_onnx_header
from edgeslim.errors import BundleError, ConfigError
from tests.bundle.helpers import mlp_manifest, two_input_onnx


@pytest.mark.parametrize("compression", ["stored", "deflate", "lzma"])
def test_round_trip(tmp_path, mlp_bytes, compression):
    extras = {"tokenizer.json": b'{"vocab": [1, 2, 3]}' * 50, "sub/notes.txt": b"hello"}
    path = write_bundle(tmp_path / "m.eslim", model_onnx=mlp_bytes, manifest=mlp_manifest(),
                        extra_files=extras, compression=compression)
    b = read_bundle(path)
    assert isinstance(b, Bundle)
    assert b.model_bytes == mlp_bytes
    assert b.files == extras
    assert not b.signed and not b.verified
    assert b.manifest["name"] == "tiny-mlp" and b.version == "3"
    assert b.manifest["labels"] == ["a", "b", "c", "d"]
    assert b.manifest["compression"][0]["params"] == {"ratio": 0.5}
    assert [s.shape for s in b.inputs] == [("batch", 8)]
    assert b.entries["model.onnx"].compression == compression
    assert b.entries["manifest.json"].compression == (
        "stored" if compression == "stored" else "deflate")
    with zipfile.ZipFile(path) as zf:  # the stock zip reader agrees
        assert zf.read("model.onnx") == mlp_bytes
        assert zf.read("manifest.json") == b.manifest_bytes
        assert zf.testzip() is None


def test_filled_fields(tmp_path, mlp_bytes):
    given = mlp_manifest()
    for key in ("version", "task", "created", "metrics", "compression", "preprocessing"):
        given.pop(key)
    b = read_bundle(write_bundle(tmp_path / "m.eslim", model_onnx=mlp_bytes, manifest=given))
    m = b.manifest
    assert m["format"] == "edgeslim.bundle/1"
    assert m["version"] == "1" and m["task"] == "generic"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", m["created"])
    assert m["preprocessing"] == [] and m["postprocessing"] == [] and m["metrics"] == {}
    assert m["model"] == {"path": "model.onnx", "size": len(mlp_bytes), "opset": 17,
                          "sha256": hashlib.sha256(mlp_bytes).hexdigest()}
    assert m["files"] == {}
    assert m["provenance"]["python"].count(".") == 2
    assert "onnxruntime" in m["provenance"]
    # the caller's provenance keys win over the defaults
    b2 = read_bundle(write_bundle(tmp_path / "p.eslim", model_onnx=mlp_bytes,
                                  manifest=mlp_manifest(provenance={"python": "x", "torch": "y"})))
    assert b2.manifest["provenance"]["python"] == "x"
    assert b2.manifest["provenance"]["torch"] == "y"


def test_numpy_values_become_json(tmp_path, mlp_bytes):
    x = np.ones((1, 8), np.float32)
    probe = {"inputs": {"input": x}, "outputs": {"logits": np.zeros((1, 4))}, "atol": 0.5}
    m = mlp_manifest(metrics={"accuracy": np.float32(0.5), "n": np.int64(3)}, probe=probe)
    b = read_bundle(write_bundle(tmp_path / "m.eslim", model_onnx=mlp_bytes, manifest=m))
    assert b.manifest["metrics"] == {"accuracy": 0.5, "n": 3}
    assert b.manifest["probe"]["inputs"]["input"] == [[1.0] * 8]


def test_deterministic_bytes_and_manifest(tmp_path, mlp_bytes, keypair):
    paths = [write_bundle(tmp_path / f"{i}.eslim", model_onnx=mlp_bytes,
                          manifest=mlp_manifest(), extra_files={"a.txt": b"a"},
                          sign_key=keypair[0], compression=c)
             for i, c in enumerate(["lzma", "lzma", "deflate"])]
    assert paths[0].read_bytes() == paths[1].read_bytes()
    b0, b2 = read_bundle(paths[0]), read_bundle(paths[2])
    assert b0.manifest_bytes == b2.manifest_bytes  # compression does not change the manifest
    assert b0.signature == b2.signature
    # canonical form: sorted keys, so key order in the caller's dict does not matter
    shuffled = dict(reversed(list(mlp_manifest().items())))
    p3 = write_bundle(tmp_path / "3.eslim", model_onnx=mlp_bytes, manifest=shuffled,
                      extra_files={"a.txt": b"a"}, sign_key=keypair[0], compression="lzma")
    assert p3.read_bytes() == paths[0].read_bytes()
    assert b0.manifest_bytes == dump_manifest(b0.manifest)


def test_sources_from_paths(tmp_path, mlp_bytes):
    (tmp_path / "m.onnx").write_bytes(mlp_bytes)
    (tmp_path / "tok.json").write_bytes(b"{}")
    b = read_bundle(write_bundle(tmp_path / "out" / "m.eslim", model_onnx=tmp_path / "m.onnx",
                                 manifest=mlp_manifest(),
                                 extra_files={"tok.json": str(tmp_path / "tok.json")}))
    assert b.model_bytes == mlp_bytes and b.files == {"tok.json": b"{}"}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"name": "bad name!"}, "'name'"),
        ({"name": ".."}, "'name'"),
        ({"version": 3}, "'version'"),
        ({"inputs": []}, "'inputs'"),
        ({"inputs": [{"name": "input", "dtype": "float", "shape": ["batch", 8]}]},
         "'inputs[0].dtype'"),
        ({"inputs": [{"name": "input", "dtype": "float32", "shape": [None, 8]}]},
         "'inputs[0].shape[0]'"),
        ({"inputs": [{"name": "input", "dtype": "float32"}]}, "'shape'"),
        ({"outputs": "logits"}, "'outputs'"),
        ({"created": "yesterday"}, "'created'"),
        ({"format": "edgeslim.bundle/2"}, "edgeslim.bundle/1"),
        ({"preprocessing": [{"op": "image.sharpen"}]}, "image.sharpen"),
        ({"preprocessing": [{"op": "reshape", "shape": "x"}]}, "shape"),
        ({"postprocessing": [{"op": "softmax", "bogus": 1}]}, "bogus"),
        ({"compression": [{"params": {}}]}, "'compression[0].step'"),
        ({"labels": [1, 2]}, "'labels'"),
        ({"metrics": {"accuracy": float("nan")}}, "finite"),
        ({"model": {"sha256": "0" * 64}}, "computes"),
        ({"probe": {"inputs": {"x": [1]}, "outputs": {"logits": [[0] * 4]}}}, "probe.inputs"),
        ({"probe": {"inputs": {"input": [[1] * 7]}, "outputs": {"logits": [[0] * 4]}}},
         "probe.inputs.input"),
        # declared signature disagrees with the graph
        ({"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 8]}]}, "'x'"),
        ({"inputs": [{"name": "input", "dtype": "float16", "shape": ["batch", 8]}]}, "float16"),
        ({"inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 9]}]},
         "fixes it to 8"),
        ({"inputs": [{"name": "input", "dtype": "float32", "shape": ["batch"]}]}, "rank"),
    ],
)
def test_writer_refuses_bad_manifest(tmp_path, mlp_bytes, change, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        write_bundle(tmp_path / "m.eslim", model_onnx=mlp_bytes, manifest=mlp_manifest(**change))
    assert os.listdir(tmp_path) == []


def test_writer_refuses_bad_arguments(tmp_path, mlp_bytes):
    target = tmp_path / "m.eslim"
    with pytest.raises(ConfigError, match="not an ONNX model"):
        write_bundle(target, model_onnx=b"hello, not a model", manifest=mlp_manifest())
    with pytest.raises(ConfigError, match="'compression' parameter of write_bundle"):
        write_bundle(target, model_onnx=mlp_bytes, manifest=mlp_manifest(), compression="zip")
    for bad in ("../evil", "/abs", "a\\b", "model.onnx", "signature", "", "a//b"):
        with pytest.raises(ConfigError, match="extra_files key"):
            write_bundle(target, model_onnx=mlp_bytes, manifest=mlp_manifest(),
                         extra_files={bad: b"x"})
    with pytest.raises(ConfigError, match="is not a file"):
        write_bundle(target, model_onnx=tmp_path / "missing.onnx", manifest=mlp_manifest())
    with pytest.raises(ConfigError, match=r"text\.tokenize"):  # a step naming a file not carried
        write_bundle(target, model_onnx=mlp_bytes, manifest=mlp_manifest(
            preprocessing=[{"op": "text.tokenize", "tokenizer": "tok.json"}]))
    assert os.listdir(tmp_path) == []


def test_external_data_refused(tmp_path):
    model = onnx.load_from_string(two_input_onnx())
    t = helper.make_tensor("c", TensorProto.INT64, [3], np.arange(3).tobytes(), raw=True)
    model.graph.initializer.append(t)
    onnx.external_data_helper.convert_model_to_external_data(
        model, size_threshold=0, location="w.bin")
    with pytest.raises(ConfigError, match="external data"):
        write_bundle(tmp_path / "m.eslim", model_onnx=model.SerializeToString(), manifest={
            "name": "x",
            "inputs": [{"name": n, "dtype": "int64", "shape": ["batch", 3]} for n in "ab"],
            "outputs": [{"name": "sum", "dtype": "int64", "shape": ["batch", 3]},
                        {"name": "first", "dtype": "float32", "shape": ["batch"]}]})


def test_onnx_header_matches_onnx(mlp_bytes):
    h = read_onnx_header(mlp_bytes)
    ref = onnx.load_from_string(mlp_bytes)
    assert h.ir_version == ref.ir_version and h.opset == 17
    assert [(t.name, t.dtype, t.shape) for t in h.inputs] == [("input", "float32", ("batch", 8))]
    assert [t.name for t in h.outputs] == [o.name for o in ref.graph.output]
    # IR 3 lists initializers among inputs; they are not fed, so they are left out
    old = onnx.load_from_string(mlp_bytes)
    for init in old.graph.initializer:
        old.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type,
                                                             list(init.dims)))
    assert [t.name for t in read_onnx_header(old.SerializeToString()).inputs] == ["input"]
    for junk in (b"", b"\xff" * 10, mlp_bytes[:50]):
        with pytest.raises(ValueError):
            read_onnx_header(junk)


def test_atomic_write_failure_keeps_old_bundle(tmp_path, mlp_bytes, monkeypatch):
    target = write_bundle(tmp_path / "m.eslim", model_onnx=mlp_bytes, manifest=mlp_manifest())
    before = target.read_bytes()
    real = zipfile.ZipFile.writestr

    def disk_full(self, info, data, *args, **kwargs):  # the disk fills during model.onnx
        if getattr(info, "filename", info) == "model.onnx":
            raise OSError(28, "No space left on device")
        return real(self, info, data, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", disk_full)
    with pytest.raises(BundleError, match="No space left on device"):
        write_bundle(target, model_onnx=mlp_bytes, manifest=mlp_manifest(version="4"))
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.eslim"]


def test_atomic_write_onto_directory(tmp_path, mlp_bytes):
    (tmp_path / "m.eslim").mkdir()
    with pytest.raises(BundleError, match="Cannot write the bundle"):
        write_bundle(tmp_path / "m.eslim", model_onnx=mlp_bytes, manifest=mlp_manifest())
    assert os.listdir(tmp_path) == ["m.eslim"] and os.listdir(tmp_path / "m.eslim") == []


def test_read_from_bytes(tmp_path, mlp_bytes):
    path = write_bundle(tmp_path / "m.eslim", model_onnx=mlp_bytes, manifest=mlp_manifest())
    b = read_bundle(path.read_bytes())
    assert b.path is None and b.model_bytes == mlp_bytes


def test_extract_bundle(tmp_path, mlp_bytes, keypair):
    path = write_bundle(tmp_path / "m.eslim", model_onnx=mlp_bytes, manifest=mlp_manifest(),
                        extra_files={"vocab/v.txt": b"v"}, sign_key=keypair[0])
    dest = extract_bundle(path, tmp_path / "install" / "v3", public_key=keypair[1])
    assert (dest / "model.onnx").read_bytes() == mlp_bytes
    assert (dest / "vocab" / "v.txt").read_bytes() == b"v"
    assert len((dest / "signature").read_bytes()) == 64
    assert read_bundle(path).manifest_bytes == (dest / "manifest.json").read_bytes()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert os.listdir(dest.parent) == ["v3"]  # no temporary directory left
    with pytest.raises(ConfigError, match="exists"):
        extract_bundle(path, dest)


def _zero_weight_model() -> bytes:
    """x [batch, 1024] @ W (4 MiB of zeros): what a heavily pruned layer looks like."""
    w = onnx.numpy_helper.from_array(np.zeros((1024, 1024), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1024])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize("compression", ["deflate", "lzma"])
def test_writer_refuses_what_readers_would_take_for_a_bomb(tmp_path, compression):
    """A model that compresses over the readers' 200x would be written and then refused by
    every reader (inspect, load, serve): the writer says so instead, and writes nothing."""
    manifest = {"name": "zeros",
                "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 1024]}],
                "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 1024]}]}
    out = tmp_path / "z.eslim"
    with pytest.raises(ConfigError, match=r"'model.onnx' compresses \d+x .* compression='stored'"):
        write_bundle(out, model_onnx=_zero_weight_model(), manifest=manifest,
                     compression=compression)
    assert os.listdir(tmp_path) == []
    write_bundle(out, model_onnx=_zero_weight_model(), manifest=manifest, compression="stored")
    assert read_bundle(out).manifest["name"] == "zeros"


def test_extract_under_a_file_is_a_bundle_error(tmp_path, mlp_bytes):
    path = write_bundle(tmp_path / "m.eslim", model_onnx=mlp_bytes, manifest=mlp_manifest())
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(BundleError, match="afile is a file, not a folder"):
        extract_bundle(path, tmp_path / "afile" / "sub" / "dest")
    assert (tmp_path / "afile").read_text() == "keep me"
