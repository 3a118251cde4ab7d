"""Tiny signed bundles for the fleet tests: a 64 -> 10 linear model built with onnx.helper.

The probe's expected outputs are computed with numpy (the reference), so a bundle whose model
weights differ from the ones its probe was computed with fails the node's probe.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

NAME = "digits-linear"


def weights(seed: int, hidden: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {}
    d = 64
    if hidden:
        w["H"] = (rng.standard_normal((64, hidden)) / 8).astype(np.float32)
        w["H2"] = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
        d = hidden
    w["W"] = (rng.standard_normal((d, 10)) / 8).astype(np.float32)
    w["b"] = rng.standard_normal(10).astype(np.float32)
    return w


def forward(w: dict[str, np.ndarray], x: np.ndarray, repeats: int = 0) -> np.ndarray:
    """The numpy reference of ``model_bytes``."""
    h = x
    if "H" in w:
        h = x @ w["H"]
        for _ in range(repeats):
            h = np.tanh(h @ w["H2"])
    return h @ w["W"] + w["b"]


def model_bytes(w: dict[str, np.ndarray], repeats: int = 0, batch: int | None = None) -> bytes:
    """ONNX bytes: logits = (input [@ H (@ H2, tanh) x repeats]) @ W + b.

    The batch dim is symbolic unless ``batch`` fixes it.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = []
    cur = "input"
    if "H" in w:
        nodes.append(helper.make_node("MatMul", [cur, "H"], ["h0"]))
        cur = "h0"
        for i in range(repeats):
            nodes.append(helper.make_node("MatMul", [cur, "H2"], [f"m{i}"]))
            nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i}"]))
            cur = f"t{i}"
    nodes.append(helper.make_node("MatMul", [cur, "W"], ["z"]))
    nodes.append(helper.make_node("Add", ["z", "b"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "fleet-test",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch or "batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch or "batch", 10])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_bundle(
    path: str | Path,
    key: str | Path | None,
    *,
    seed: int = 0,
    version: str = "1",
    probe_seed: int | None = None,
    hidden: int = 0,
    repeats: int = 0,
    pad_bytes: int = 0,
    batch: int | None = None,
    name: str = NAME,
) -> Path:
    """A signed bundle; ``probe_seed`` != ``seed`` gives a probe that the model fails.

    ``pad_bytes`` adds an incompressible extra file (to make downloads slow enough to
    interrupt); ``batch=2`` fixes the batch dim, so requests of one row fail (HTTP 400).
    """
    from edgeslim.bundle import write_bundle

    w = weights(seed, hidden)
    pw = weights(seed if probe_seed is None else probe_seed, hidden)
    x = np.linspace(0.0, 1.0, 2 * 64, dtype=np.float32).reshape(2, 64)
    manifest = {
        "name": name,
        "version": version,
        "task": "sensor-classification",
        "inputs": [{"name": "input", "dtype": "float32", "shape": [batch or "batch", 64]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [batch or "batch", 10]}],
        "probe": {
            "inputs": {"input": x.tolist()},
            "outputs": {"logits": forward(pw, x, repeats).tolist()},
            "atol": 1e-4,
        },
    }
    extra = {"padding.bin": np.random.default_rng(seed).bytes(pad_bytes)} if pad_bytes else None
    return write_bundle(
        path,
        model_onnx=model_bytes(w, repeats, batch),
        manifest=manifest,
        sign_key=key,
        extra_files=extra,
    )


def infer_body(rows: int = 1, seed: int = 0) -> dict:
    x = np.random.default_rng(seed).random((rows, 64), dtype=np.float32)
    return {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [rows, 64], "data": x.ravel().tolist()}
        ]
    }
