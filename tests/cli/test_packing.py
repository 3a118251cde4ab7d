"""Deep-Compression packing on ONNX: zeros stay zero, onnxruntime decodes what k-means chose."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeslim.errors import ConfigError
from edgeslim.packing import kmeans_codebook, share_weights


def _gemm_model(w: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", w.shape[1]])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _decoded(model: onnx.ModelProto, n_in: int) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.eye(n_in, dtype=np.float32)})[0]


def test_kmeans_keeps_zeros_and_uses_at_most_2_pow_bits_values():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(40, 30)).astype(np.float32)
    w[rng.random(w.shape) < 0.7] = 0
    codebook, codes = kmeans_codebook(w, 3)
    assert codebook[0] == 0 and len(codebook) <= 8
    np.testing.assert_array_equal(codebook[codes] == 0, w == 0)


@pytest.mark.parametrize("per_channel", [False, True])
def test_packed_graph_decodes_to_the_codebook_weights(per_channel):
    rng = np.random.default_rng(1)
    # columns (output channels) of very different scales, as BatchNorm folding produces
    w = (rng.normal(size=(64, 32)) * np.logspace(-2, 1, 32)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0
    packed, report = share_weights(_gemm_model(w), bits=4, per_channel=per_channel)
    assert list(report.packed) == ["w"]
    got = _decoded(packed, 64)
    np.testing.assert_array_equal(got == 0, w == 0)
    err = np.abs(got - w) / np.abs(w).max(axis=0)
    if per_channel:  # every channel keeps its own resolution
        assert err.max() < 0.1
    else:  # one codebook for all: the small channels are flattened to few levels
        assert err.max() > 0.1


def test_bad_bits_is_a_config_error():
    with pytest.raises(ConfigError, match="'bits' parameter of share_weights"):
        share_weights(_gemm_model(np.ones((300, 2), np.float32)), bits=9)


def test_initializers_listed_as_graph_inputs_are_packed_too():
    """Older exporters list every initializer among the graph inputs; packing one makes it a
    decoder's output, so it must leave the inputs (it raised a raw onnx ValidationError)."""
    w = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [64, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    packed, report = share_weights(model, bits=8, min_size=1)
    assert "w" in report.packed and [i.name for i in packed.graph.input] == ["x"]
    onnx.checker.check_model(packed)
    x = np.ones((2, 64), np.float32)
    out = ort.InferenceSession(packed.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, x @ w, atol=0.05 * np.abs(x @ w).max())


def test_one_bit_packing_is_refused():
    """One bit leaves zero and a single value per tensor: every sign lost (digits-cnn fell
    to 10% accuracy). Two bits is the least."""
    from edgeslim.recipe import Recipe

    with pytest.raises(ConfigError, match=r"'bits' parameter of share_weights .* \[2, 8\]"):
        share_weights(onnx_model_stub(), bits=1)
    with pytest.raises(ConfigError, match=r"'bits' parameter of pack .* \[2, 8\]. Got 1"):
        Recipe.from_dict({"steps": [{"pack": {"bits": 1}}]})


def onnx_model_stub():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_kmeans_is_exact_when_the_values_fit_and_uses_every_code():
    """Three distinct values at two bits (three codes) come back exactly; 50 distinct values
    at eight bits use 50 codes (the linear start had left 23 of them empty)."""
    w = np.array([0.1, 0.2, 1.0, 0.0, 0.2])
    codebook, codes = kmeans_codebook(w, 2)
    np.testing.assert_allclose(codebook[codes], w, atol=1e-7)
    w = np.random.default_rng(0).normal(size=50)
    codebook, codes = kmeans_codebook(w, 8)
    assert len(np.unique(codes)) == 50
    np.testing.assert_allclose(codebook[codes], w, atol=1e-6)
    w = np.random.default_rng(1).normal(size=1000)
    codebook, codes = kmeans_codebook(w, 8)
    assert len(np.unique(codes)) == 255 and np.abs(codebook[codes] - w).max() < 0.02
