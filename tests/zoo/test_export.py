"""ONNX export: torch against onnxruntime on every zoo model, BatchNorm folding, exact zeros."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edgeslim.datasets import photo_crops
from edgeslim.errors import ConfigError, ModelError
from edgeslim.export import (
    export_onnx,
    export_zoo_model,
    onnx_param_bytes,
    zoo_io_spec,
)
from edgeslim.export.fold import fold_constants, fold_pads

ATOL = 1e-4


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _initializers(proto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


@pytest.fixture(scope="module")
def lite0():
    from edgeslim.zoo import load_model

    return load_model("efficientnet-lite0")


@pytest.fixture(scope="module")
def lite0_onnx(lite0, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "efficientnet-lite0.onnx"
    return export_zoo_model("efficientnet-lite0", path, lite0)


@pytest.fixture(scope="module")
def minilm():
    from edgeslim.zoo import load_model

    return load_model("minilm-l6")


@pytest.fixture(scope="module")
def minilm_onnx(minilm, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "minilm-l6.onnx"
    return export_zoo_model("minilm-l6", path, minilm)


@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn"])
def test_digits_models_match_onnxruntime(name, request, digits_split, tmp_path):
    model = request.getfixturevalue(name.replace("-", "_"))
    result = export_zoo_model(name, tmp_path / f"{name}.onnx", model)
    assert result.max_abs_diff is not None and result.max_abs_diff < ATOL
    assert result.checked_batches == (1, 2) and result.batchnorm_nodes == 0
    proto = onnx.load(str(result.path))
    assert _dims(proto.graph.input[0]) == ["batch", 64]
    assert _dims(proto.graph.output[0]) == ["batch", 10]
    x = digits_split.x_test
    got = _session(result.path).run(None, {"input": x})[0]
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))


@pytest.mark.slow
def test_efficientnet_matches_onnxruntime(lite0, lite0_onnx):
    assert lite0_onnx.max_abs_diff < ATOL and lite0_onnx.checked_batches == (1, 2)
    proto = onnx.load(str(lite0_onnx.path))
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops and "Constant" not in ops
    assert _dims(proto.graph.input[0]) == ["batch", 3, 224, 224]
    assert _dims(proto.graph.output[0]) == ["batch", 1000]
    # the asymmetric TF padding of the five stride-2 convs is merged into them
    assert "Pad" not in ops
    pads = [next(list(a.ints) for a in n.attribute if a.name == "pads")
            for n in proto.graph.node if n.op_type == "Conv"]  # fmt: skip
    assert sorted(p for p in pads if p[:2] != p[2:]) == [[0, 0, 1, 1]] * 3 + [[1, 1, 2, 2]] * 2
    session = _session(lite0_onnx.path)
    for batch in (1, 2):
        x = photo_crops(batch, seed=7, split="evaluation")
        got = session.run(None, {"input": x})[0]
        with torch.no_grad():
            ref = lite0(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)
    chelsea = zoo_io_spec("efficientnet-lite0").example_inputs[0].numpy()
    assert int(session.run(None, {"input": chelsea})[0].argmax()) == 285


@pytest.mark.slow
def test_minilm_matches_onnxruntime_at_two_lengths(minilm, minilm_onnx):
    from edgeslim.datasets import english_sentences
    from edgeslim.zoo.minilm import encode

    assert minilm_onnx.max_abs_diff < ATOL
    proto = onnx.load(str(minilm_onnx.path))
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert all(_dims(i) == ["batch", "sequence"] for i in proto.graph.input)
    assert _dims(proto.graph.output[0]) == ["batch", 384]
    session = _session(minilm_onnx.path)
    lengths = set()
    for sentences in (english_sentences(3, split="evaluation"), ["Short.", "Tiny one."]):
        ids, mask = encode(sentences)
        lengths.add(ids.shape[1])
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        with torch.no_grad():
            ref = minilm(ids, mask).numpy()
        np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)
    assert len(lengths) == 2


def test_batchnorm_folding_keeps_pruned_zeros_exact(digits_cnn, tmp_path):
    model = copy.deepcopy(digits_cnn)
    masks = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                w = module.weight
                w[w.abs() <= w.abs().flatten().median()] = 0.0
                masks[name] = (w == 0).numpy()
    result = export_zoo_model("digits-cnn", tmp_path / "pruned.onnx", model)
    assert result.batchnorm_nodes == 0
    proto = onnx.load(str(result.path))
    inits = _initializers(proto)
    weights = [inits[n.input[1]] for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    assert [w.shape for w in weights] == [m.shape for m in masks.values()]
    for w, mask in zip(weights, masks.values(), strict=True):
        np.testing.assert_array_equal(w == 0, mask)  # the same zeros, and only those
    with pytest.raises(AssertionError):  # BN was folded: conv weights are rescaled
        np.testing.assert_array_equal(weights[0], model.state_dict()["conv1.weight"].numpy())


def test_batchnorm_kept_when_not_folding(digits_cnn, tmp_path):
    result = export_zoo_model(
        "digits-cnn", tmp_path / "bn.onnx", copy.deepcopy(digits_cnn), fold_batchnorm=False
    )
    assert result.batchnorm_nodes == 2 and result.max_abs_diff < ATOL


class _Branchy(nn.Module):
    """Data-dependent Python control flow: tracing records one branch only."""

    def forward(self, x):
        return x * 2 if float(x.sum()) > 0 else x * 3


def test_divergence_is_reported_with_max_difference(tmp_path):
    x = torch.ones(1, 4)
    out = tmp_path / "b.onnx"
    out.write_bytes(b"the model exported before")
    with pytest.raises(ModelError, match=r"output 'y' differs by up to 2 "):
        export_onnx(
            _Branchy(),
            x,
            out,
            input_names=["x"],
            output_names=["y"],
            check_inputs=[(-2 * torch.ones(1, 4),)],
        )
    # the file in place is the one before, not the model that failed its check
    assert out.read_bytes() == b"the model exported before"
    assert [p.name for p in tmp_path.iterdir()] == ["b.onnx"]


def test_bad_arguments_are_refused(tmp_path):
    net = nn.Linear(4, 2)
    x = torch.randn(1, 4)
    path = tmp_path / "n.onnx"
    with pytest.raises(ConfigError, match="'input_names'"):
        export_onnx(net, x, path, input_names=["a", "b"], output_names=["y"])
    with pytest.raises(ConfigError, match="'opset'"):
        export_onnx(net, x, path, input_names=["x"], output_names=["y"], opset=12)
    with pytest.raises(ConfigError, match="'z'"):
        export_onnx(
            net, x, path, input_names=["x"], output_names=["y"], dynamic_axes={"z": {0: "batch"}}
        )
    with pytest.raises(ModelError, match=r"nn\.Module"):
        export_onnx(lambda t: t, x, path, input_names=["x"], output_names=["y"])
    with pytest.raises(ModelError, match="example_inputs"):
        export_onnx(net, [1, 2], path, input_names=["x"], output_names=["y"])
    with pytest.raises(ConfigError, match="'name'"):
        zoo_io_spec("resnet50")


def test_param_bytes_counts_float_initializers(digits_mlp, tmp_path):
    result = export_zoo_model("digits-mlp", tmp_path / "mlp.onnx", digits_mlp)
    n_params = sum(p.numel() for p in digits_mlp.parameters())
    assert result.param_bytes == onnx_param_bytes(result.path) == 4 * n_params
    proto = onnx.load(str(result.path))
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros(10, np.int8), "q"))
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros(10, np.float16), "h"))
    assert onnx_param_bytes(proto) == 4 * n_params + 20
    all_bytes = onnx_param_bytes(result.path, float_only=False)  # + int64 shape constants
    assert all_bytes > 4 * n_params
    assert onnx_param_bytes(proto, float_only=False) == all_bytes + 30


def test_fold_constants_evaluates_constant_subgraphs():
    from onnx import TensorProto, helper

    shape = helper.make_node(
        "Constant", [], ["s"], value=numpy_helper.from_array(np.array([2, 3], np.int64))
    )
    ones = helper.make_node(
        "ConstantOfShape", ["s"], ["c"], value=numpy_helper.from_array(np.array([1.5], np.float32))
    )
    add = helper.make_node("Add", ["x", "c"], ["y"])
    graph = helper.make_graph(
        [shape, ones, add],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert fold_constants(proto) == 2
    assert [n.op_type for n in proto.graph.node] == ["Add"]
    np.testing.assert_array_equal(_initializers(proto)["c"], np.full((2, 3), 1.5, np.float32))
    onnx.checker.check_model(proto)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(out, x + 1.5)


def test_export_merges_the_tf_same_pad_into_the_convolution(tmp_path):
    from edgeslim.zoo.efficientnet import Conv2dSame

    torch.manual_seed(0)
    net = nn.Sequential(Conv2dSame(3, 8, 3, stride=2), nn.ReLU(), Conv2dSame(8, 8, 5, stride=2,
                        groups=8), Conv2dSame(8, 4, 3)).eval()  # fmt: skip
    result = export_onnx(net, torch.randn(1, 3, 32, 32), tmp_path / "same.onnx",
                         input_names=["x"], output_names=["y"])
    assert result.max_abs_diff < ATOL  # checked against torch at batch 1 and 2
    proto = onnx.load(str(result.path))
    assert [n.op_type for n in proto.graph.node] == ["Conv", "Relu", "Conv", "Conv"]
    pads = [next(list(a.ints) for a in n.attribute if a.name == "pads")
            for n in proto.graph.node if n.op_type == "Conv"]  # fmt: skip
    assert pads == [[0, 0, 1, 1], [1, 1, 2, 2], [1, 1, 1, 1]]
    assert not any(t.name.endswith("Cast_output_0") for t in proto.graph.initializer)


def _pad_conv(pads, *, value=None, mode="constant", second_reader=False):
    from onnx import TensorProto, helper

    inits = [numpy_helper.from_array(np.array(pads, np.int64), "p"),
             numpy_helper.from_array(np.ones((2, 2, 3, 3), np.float32), "w")]  # fmt: skip
    pad_in = ["x", "p"]
    if value is not None:
        inits.append(numpy_helper.from_array(np.array(value, np.float32), "v"))
        pad_in.append("v")
    nodes = [helper.make_node("Pad", pad_in, ["xp"], mode=mode),
             helper.make_node("Conv", ["xp", "w"], ["y"], pads=[1, 1, 1, 1])]  # fmt: skip
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if second_reader:
        nodes.append(helper.make_node("Relu", ["xp"], ["r"]))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 2, 6, 6])], outputs, inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(proto, x):
    return ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]


def test_fold_pads_keeps_the_numbers_and_leaves_other_pads_alone():
    x = np.random.default_rng(0).normal(size=(1, 2, 6, 6)).astype(np.float32)
    proto = _pad_conv([0, 0, 0, 1, 0, 0, 2, 3], value=0.0)
    before = _run(proto, x)
    assert fold_pads(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["Conv"]
    assert list(proto.graph.node[0].attribute[-1].ints) == [1, 2, 3, 4]
    assert {t.name for t in proto.graph.initializer} == {"w"}
    np.testing.assert_allclose(_run(proto, x), before, rtol=1e-6, atol=1e-6)
    for kept in (_pad_conv([0, 0, 1, 1, 0, 0, 1, 1], value=0.5),  # not zero
                 _pad_conv([0, 0, 1, 1, 0, 0, 1, 1], mode="reflect"),
                 _pad_conv([0, 1, 1, 1, 0, 0, 1, 1]),  # a channel pad
                 _pad_conv([0, 0, -1, 1, 0, 0, 1, 1]),  # a crop
                 _pad_conv([0, 0, 1, 1, 0, 0, 1, 1], second_reader=True)):
        ops = [n.op_type for n in kept.graph.node]
        assert fold_pads(kept) == 0 and [n.op_type for n in kept.graph.node] == ops


def test_zoo_specs_match_the_manifest_contract():
    spec = zoo_io_spec("minilm-l6")
    assert [t.to_manifest() for t in spec.inputs] == [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]},
    ]
    assert spec.dynamic_axes["embedding"] == {0: "batch"}
    ids, mask = spec.example_inputs
    assert ids.dtype == torch.int64 and ids.shape == mask.shape and (mask == 0).any()
    image = zoo_io_spec("efficientnet-lite0")
    assert image.outputs[0].to_manifest()["shape"] == ["batch", 1000]
    assert tuple(image.example_inputs[0].shape) == (1, 3, 224, 224)


def test_an_output_batch_axis_follows_the_input_when_only_inputs_are_named(tmp_path):
    """With dynamic_axes naming only the input, the exporter carries 'batch' through to the
    output; the declared output shape must keep it, not fix it at the example's batch of 1."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    path = tmp_path / "n.onnx"
    export_onnx(net, torch.randn(1, 4), path, input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}})
    out = onnx.load(str(path)).graph.output[0]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 3]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": np.zeros((5, 4), np.float32)})[0].shape == (5, 3)


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        a, _ = self.attn(x, x, x)
        return self.fc(self.enc(x + a).mean(1))


def test_multihead_attention_and_transformer_encoder_export(tmp_path):
    """Under no_grad both take torch's fused fast path ('aten::_transformer_encoder_layer_fwd',
    '_native_multi_head_attention'), which the exporter cannot map to ONNX."""
    torch.manual_seed(0)
    model = _Encoder().eval()
    x = torch.randn(2, 5, 16)
    path = tmp_path / "enc.onnx"
    export_onnx(model, x, path, input_names=["x"], output_names=["y"],
                dynamic_axes={"x": {0: "batch"}}, check_inputs=[(torch.randn(3, 5, 16),)])
    assert torch.backends.mha.get_fastpath_enabled()  # restored
    x3 = torch.randn(3, 5, 16)
    (got,) = _session(path).run(None, {"x": x3.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x3).numpy(), rtol=1e-4, atol=ATOL)
