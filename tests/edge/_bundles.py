"""Small bundles built with onnx.helper (no torch), for the edge tests and benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeslim.bundle import write_bundle

OPSET = 17


def _model(nodes, inputs, outputs, inits) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def linear_onnx(seed: int = 0, *, batch: Any = "batch", n_in: int = 64, n_out: int = 10,
                hidden: int = 32) -> bytes:
    """``logits = relu(x @ W1 + b1) @ W2 + b2`` on ``input`` float32 (batch, n_in)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(n_in, hidden)).astype(np.float32) / 8
    b1 = rng.normal(size=(hidden,)).astype(np.float32)
    w2 = rng.normal(size=(hidden, n_out)).astype(np.float32) / 4
    b2 = rng.normal(size=(n_out,)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["logits"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, n_out])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"),
                                                    (b2, "b2"))],
    )


def linear_bundle(path: Path, *, seed: int = 0, version: str = "1", name: str = "linear",
                  batch: Any = "batch", sign_key: Any = None, probe: bool = True,
                  **manifest: Any) -> Path:
    """A bundle of ``linear_onnx`` with a probe computed by onnxruntime."""
    import onnxruntime as ort

    model = linear_onnx(seed, batch=batch)
    m: dict[str, Any] = {
        "name": name, "version": version, "task": "classification",
        "inputs": [{"name": "input", "dtype": "float32", "shape": [batch, 64]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [batch, 10]}],
        "labels": [f"class{i}" for i in range(10)],
    }
    if probe:
        x = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 64)
        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        m["probe"] = {"inputs": {"input": x}, "outputs": {"logits": sess.run(None,
                                                                               {"input": x})[0]},
                      "atol": 1e-4}
    m.update(manifest)
    return write_bundle(path, model_onnx=model, manifest=m, sign_key=sign_key)


def embed_onnx(vocab: int = 16, dim: int = 4, seed: int = 0, *, mask: bool = True) -> bytes:
    """``token_embeddings = E[input_ids] * attention_mask`` (batch, seq, dim); with
    ``mask=False`` only ``E[input_ids]``, on the one input ``input_ids``."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(vocab, dim)).astype(np.float32)
    if not mask:
        return _model(
            [helper.make_node("Gather", ["emb", "input_ids"], ["token_embeddings"])],
            [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
            [helper.make_tensor_value_info("token_embeddings", TensorProto.FLOAT,
                                           ["batch", "seq", dim])],
            [numpy_helper.from_array(emb, "emb")],
        )
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
        helper.make_node("Mul", ["e", "m3"], ["token_embeddings"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("token_embeddings", TensorProto.FLOAT,
                                       ["batch", "seq", dim])],
        [numpy_helper.from_array(emb, "emb"),
         numpy_helper.from_array(np.array([2], np.int64), "axes")],
    )


def embedding_table(vocab: int = 16, dim: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(vocab, dim)).astype(np.float32)


def image_onnx() -> bytes:
    """``logits = mean over H, W of pixels (batch, 3, H, W)`` @ W (3, 4)."""
    w = np.array([[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1]], np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["pixels"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["logits"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w, "w")],
    )
