"""Small ONNX models built with onnx.helper (no torch) and zip crafting helpers."""

from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((8, 16)).astype(np.float32)
B1 = RNG.standard_normal(16).astype(np.float32)
W2 = RNG.standard_normal((16, 4)).astype(np.float32)


def _model(nodes, inputs, outputs, inits=(), opsets=(("", 17),), ir_version=8) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets]
    )
    model.ir_version = ir_version
    return model.SerializeToString()


def mlp_onnx() -> bytes:
    """input float32 [batch, 8] -> logits float32 [batch, 4]: relu(x W1 + b1) W2."""
    t = helper.make_tensor
    return _model(
        [
            helper.make_node("MatMul", ["input", "W1"], ["h0"]),
            helper.make_node("Add", ["h0", "B1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h2"]),
            helper.make_node("MatMul", ["h2", "W2"], ["logits"]),
        ],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [
            t("W1", TensorProto.FLOAT, W1.shape, W1.ravel().tolist()),
            t("B1", TensorProto.FLOAT, B1.shape, B1.ravel().tolist()),
            t("W2", TensorProto.FLOAT, W2.shape, W2.ravel().tolist()),
        ],
    )


def mlp_reference(x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ W1 + B1, 0) @ W2


def two_input_onnx() -> bytes:
    """a int64 [batch, 3], b int64 [batch, 3] -> sum int64 [batch, 3], first float32 [batch]."""
    return _model(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Cast", ["sum"], ["sumf"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMax", ["sumf"], ["first"], axes=[1], keepdims=0),
        ],
        [
            helper.make_tensor_value_info("a", TensorProto.INT64, ["batch", 3]),
            helper.make_tensor_value_info("b", TensorProto.INT64, ["batch", 3]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.INT64, ["batch", 3]),
            helper.make_tensor_value_info("first", TensorProto.FLOAT, ["batch"]),
        ],
        opsets=(("", 13),),
    )


def unknown_op_onnx() -> bytes:
    """A graph using com.example:Frobnicate, which onnxruntime does not have."""
    return _model(
        [helper.make_node("Frobnicate", ["input"], ["logits"], domain="com.example")],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 8])],
        opsets=(("", 17), ("com.example", 1)),
    )


def mlp_manifest(**extra) -> dict:
    m = {
        "name": "tiny-mlp",
        "version": "3",
        "task": "sensor-classification",
        "created": "2026-11-29T13:00:00Z",
        "inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 8]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 4]}],
        "preprocessing": [{"op": "reshape", "shape": [1, 8]}],
        "labels": ["a", "b", "c", "d"],
        "metrics": {"accuracy": 0.9, "size_bytes": 1234},
        "compression": [{"step": "prune", "params": {"ratio": 0.5}, "metrics": {"acc": 0.9}}],
    }
    m.update(extra)
    return m


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def craft_zip(path: Path, entries, *, method=zipfile.ZIP_DEFLATED) -> Path:
    """A zip of ``(name, bytes)`` or ``(name, bytes, method)`` entries, duplicates allowed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on duplicate names
        with zipfile.ZipFile(path, "w") as zf:
            for entry in entries:
                name, data = entry[0], entry[1]
                zf.writestr(zipfile.ZipInfo(name), data,
                            compress_type=entry[2] if len(entry) > 2 else method)
    return path


def full_manifest(model: bytes, files: dict[str, bytes] | None = None, **extra) -> dict:
    """A complete manifest (as the writer makes it) describing ``model`` and ``files``."""
    m = mlp_manifest(**extra)
    m.update(
        format="edgeslim.bundle/1",
        model={"path": "model.onnx", "sha256": sha(model), "size": len(model), "opset": 17},
        files={n: {"sha256": sha(d), "size": len(d)} for n, d in (files or {}).items()},
    )
    return m


def manifest_bytes(m: dict) -> bytes:
    return json.dumps(m, sort_keys=True, indent=2).encode()
