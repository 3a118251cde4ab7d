"""Small generated ONNX models and the exported digits-cnn, shared by the ptq tests."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def conv_chain(seed: int = 0, clip: bool = True) -> onnx.ModelProto:
    """input (N,4,8,8) -> Conv 3x3 (8) -> Relu6|Relu -> depthwise 3x3 -> Relu -> Conv 1x1 (6).

    Channel ranges of the first conv are deliberately unbalanced (x0.05 .. x20).
    """
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(8, 4, 3, 3)).astype(np.float32)
    w1 *= np.geomspace(0.05, 20, 8).astype(np.float32)[:, None, None, None]
    b1 = rng.normal(size=8).astype(np.float32)
    w2 = rng.normal(size=(8, 1, 3, 3)).astype(np.float32) * 0.3
    b2 = rng.normal(size=8).astype(np.float32) * 0.1
    w3 = rng.normal(size=(6, 8, 1, 1)).astype(np.float32)
    b3 = np.zeros(6, np.float32)
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (w3, "w3"), (b3, "b3")]
    ]
    inits += [
        numpy_helper.from_array(np.array(0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6, np.float32), "hi"),
    ]
    act1 = (
        helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="act1")
        if clip
        else helper.make_node("Relu", ["c1"], ["a1"], name="act1")
    )
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        act1,
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["a2"], name="act2"),
        helper.make_node("Conv", ["a2", "w3", "b3"], ["output"], name="conv3"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 6, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mlp(seed: int = 0, outlier_layer: str | None = None) -> onnx.ModelProto:
    """input (N,16) -> MatMul 16x32 (+b) -> Relu -> MatMul 32x32 -> Relu -> MatMul 32x10."""
    rng = np.random.default_rng(seed)
    shapes = {"fc1": (16, 32), "fc2": (32, 32), "fc3": (32, 10)}
    inits, nodes, x = [], [], "input"
    for i, (name, shape) in enumerate(shapes.items()):
        w = (rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32)
        if name == outlier_layer:
            w[0, :] *= 400.0  # one huge row: a terrible per-tensor grid
        inits.append(numpy_helper.from_array(w, f"{name}_w"))
        nodes.append(helper.make_node("MatMul", [x, f"{name}_w"], [f"{name}_y"], name=name))
        x = f"{name}_y"
        if i < 2:
            nodes.append(helper.make_node("Relu", [x], [f"{name}_r"], name=f"{name}_relu"))
            x = f"{name}_r"
    nodes[-1].output[0] = "logits"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="session")
def digits_cnn_onnx(tmp_path_factory, digits_cnn):
    """The trained digits-cnn exported to ONNX (path)."""
    import copy

    from edgeslim.export.specs import export_zoo_model

    path = tmp_path_factory.mktemp("ptq") / "digits-cnn.onnx"
    export_zoo_model("digits-cnn", path, model=copy.deepcopy(digits_cnn))
    return path
