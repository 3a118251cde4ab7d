"""Self-attention fused into QAttention on an int8 BERT encoder (ptq/attention.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeslim.ptq import quantize
from edgeslim.ptq._graph import make_session
from edgeslim.ptq.attention import fuse_attention
from edgeslim.ptq.exact import unsaturated

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LAYERS, HEADS, HIDDEN = 2, 4, 64


@pytest.fixture(scope="module", params=["eager", "sdpa", "dynamo"])
def encoder_onnx(tmp_path_factory, request):
    """A 2-layer BERT sentence embedder (random weights), exported as the zoo's minilm is
    (eager attention), as transformers exports it by default (scaled_dot_product_attention:
    Q and K scaled before the scores, a NaN guard after the Softmax), and as torch.onnx.export
    does by default (the dynamo exporter: K transposed through 3-D reshapes, shapes computed
    by Shape and Slice)."""
    from edgeslim.export.onnx import export_onnx
    from edgeslim.zoo.minilm import SentenceEmbedder

    cfg = transformers.BertConfig(
        vocab_size=200, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=128, max_position_embeddings=64,
        attn_implementation="eager" if request.param == "eager" else "sdpa",
    )
    torch.manual_seed(0)
    model = SentenceEmbedder(transformers.BertModel(cfg, add_pooling_layer=False)).eval()
    ids = torch.randint(1, 200, (2, 12))
    path = tmp_path_factory.mktemp("attention") / f"encoder-{request.param}.onnx"
    if request.param == "dynamo":
        pytest.importorskip("onnxscript")
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2, max=64)
        # (its weights in a file beside the model, as that exporter writes them by default)
        torch.onnx.export(model, (ids, torch.ones_like(ids)), str(path), dynamo=True,
                          input_names=["input_ids", "attention_mask"],
                          output_names=["sentence"],  # "embedding" names a node's output there
                          dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                          "attention_mask": {0: batch, 1: seq}})  # fmt: skip
        return path
    axes = {"input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"}, "embedding": {0: "batch"}}
    export_onnx(model, (ids, torch.ones_like(ids)), path, input_names=["input_ids",
                "attention_mask"], output_names=["embedding"], dynamic_axes=axes)
    return path


def _feeds(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(5, 20))
        ids = rng.integers(1, 200, (1, length)).astype(np.int64)
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return out


def _padded_batch() -> dict:
    rng = np.random.default_rng(7)
    ids = rng.integers(1, 200, (3, 16)).astype(np.int64)
    mask = np.ones_like(ids)
    for row, length in enumerate((16, 9, 4)):
        mask[row, length:] = 0
        ids[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _quantize(path, fuse: bool):
    return quantize(path, _feeds(24, 0), _feeds(16, 1), task="embedding", scheme="dynamic",
                    static_max_spread=1e9, fuse_attention=fuse, max_drop=0.5,
                    time_budget_s=60, progress=False).model


def test_each_layer_runs_as_one_qattention_with_the_same_outputs(encoder_onnx):
    fused, plain = _quantize(encoder_onnx, True), _quantize(encoder_onnx, False)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("QAttention") == LAYERS
    # Q, K and V went into the QAttention kernels; the output and FFN projections remain
    assert ops.count("MatMulIntegerToFloat") == 3 * LAYERS
    assert [n.op_type for n in plain.graph.node].count("MatMulIntegerToFloat") == 6 * LAYERS
    assert "Softmax" not in ops and "Transpose" not in ops and "IsNaN" not in ops
    # the weights are the same integers, stored in the exact u8 form (ptq/exact.py)
    inits = {t.name: t for t in fused.graph.initializer}
    for node in (n for n in fused.graph.node if n.op_type == "QAttention"):
        assert inits[node.input[1]].data_type == TensorProto.UINT8
        assert list(inits[node.input[1]].dims) == [HIDDEN, 3 * HIDDEN]
        assert next(a.i for a in node.attribute if a.name == "num_heads") == HEADS
    a, b = make_session(fused), make_session(plain)
    for feed in [*_feeds(6, 2), _padded_batch()]:
        np.testing.assert_allclose(a.run(None, feed)[0], b.run(None, feed)[0], atol=2e-5)
    # padding stays padding: a sentence alone equals its row in a padded batch
    batch = _padded_batch()
    together = a.run(None, batch)[0]
    for row, length in enumerate((16, 9, 4)):
        alone = a.run(None, {k: v[row : row + 1, :length] for k, v in batch.items()})[0]
        np.testing.assert_allclose(alone[0], together[row], atol=2e-5)


def test_a_row_wise_qkv_input_is_not_fused(encoder_onnx):
    # every input quantized row by row at run time: no single input scale for QAttention
    model = quantize(encoder_onnx, _feeds(24, 0), _feeds(8, 1), task="embedding",
                     scheme="dynamic", static_max_spread=None, fuse_attention=True,
                     max_drop=0.5, time_budget_s=60, progress=False).model
    assert not any(n.op_type == "QAttention" for n in model.graph.node)


def _with_mask(model, make_mask):
    """``model`` with the additive mask of every attention replaced by ``make_mask``'s."""
    model = copy.deepcopy(model)
    adds = [n for n in model.graph.node if n.op_type == "Add"
            and any(c.op_type == "Softmax" and c.input[0] == n.output[0]
                    for c in model.graph.node)]
    assert len(adds) == LAYERS
    nodes = make_mask(model)
    for add in adds:
        add.input[1] = "new_mask"
    index = min(i for i, n in enumerate(model.graph.node) if n in adds)
    for k, node in enumerate(nodes):
        model.graph.node.insert(index + k, node)
    return model


def test_a_mask_the_kernel_would_not_compute_leaves_the_model_unfused(encoder_onnx):
    plain = _quantize(encoder_onnx, False)

    def soft_mask(model):  # -1 on padding instead of a huge negative: padding still counts
        model.graph.initializer.extend([
            numpy_helper.from_array(np.array([1, 2], np.int64), "axes12"),
            numpy_helper.from_array(np.array(1.0, np.float32), "one")])
        return [
            helper.make_node("Cast", ["attention_mask"], ["m_f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["m_f", "axes12"], ["m_u"]),
            helper.make_node("Sub", ["m_u", "one"], ["new_mask"]),
        ]

    changed = _with_mask(plain, soft_mask)
    before = changed.SerializeToString()
    # the pattern matches, but the check with half the tokens masked sees other outputs
    model, count = fuse_attention(changed, _feeds(8, 3))
    assert count == 0
    assert model.SerializeToString() == before
    # without feeds to check on, the same rewrite would have been made
    _, unchecked = fuse_attention(copy.deepcopy(changed))
    assert unchecked == LAYERS


def test_a_mask_taken_from_the_first_row_only_leaves_the_model_unfused(encoder_onnx):
    """A graph that masks every row of a batch with the first row's mask is the same function
    as QAttention on any one sentence; only a batch whose rows are padded differently (what
    the edge node's dynamic batching sends) tells them apart."""
    plain = _quantize(encoder_onnx, False)

    def first_row_mask(model):
        model.graph.initializer.extend([
            numpy_helper.from_array(np.array([0], np.int64), "zero1"),
            numpy_helper.from_array(np.array([1], np.int64), "one1"),
            numpy_helper.from_array(np.array([1, 2], np.int64), "axes12"),
            numpy_helper.from_array(np.array(1.0, np.float32), "onef"),
            numpy_helper.from_array(np.array(-10000.0, np.float32), "big")])
        return [
            helper.make_node("Slice", ["attention_mask", "zero1", "one1", "zero1"], ["m0"]),
            helper.make_node("Cast", ["m0"], ["m0f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["m0f", "axes12"], ["m0u"]),
            helper.make_node("Sub", ["onef", "m0u"], ["m0i"]),
            helper.make_node("Mul", ["m0i", "big"], ["new_mask"]),
        ]

    changed = _with_mask(plain, first_row_mask)
    one = make_session(changed)
    for feed in _feeds(3, 4):  # one sentence at a time it is the usual padding mask
        np.testing.assert_allclose(one.run(None, feed)[0], make_session(plain).run(None, feed)[0],
                                   atol=1e-6)
    before = changed.SerializeToString()
    model, count = fuse_attention(changed, _feeds(8, 3))
    assert count == 0
    assert model.SerializeToString() == before


def test_a_mask_not_read_from_an_integer_input_is_not_matched(encoder_onnx):
    plain = _quantize(encoder_onnx, False)

    def constant_bias(model):  # a fixed additive bias (no attention mask involved)
        model.graph.initializer.append(
            numpy_helper.from_array(np.zeros((1, 1, 1, 1), np.float32), "new_mask"))
        return []

    model, count = fuse_attention(_with_mask(plain, constant_bias), _feeds(4, 3))
    assert count == 0
    assert not any(n.op_type == "QAttention" for n in model.graph.node)


def test_a_shape_read_by_a_node_that_stays_keeps_the_block_unfused(encoder_onnx):
    """A Shape of Q is what the exporters use for reshape targets inside the block, and it
    goes with the block; one whose result the graph still needs keeps the block as it is."""
    plain = _quantize(encoder_onnx, False)
    q = next(n for n in plain.graph.node if n.op_type == "Transpose"
             and list(n.attribute[0].ints) == [0, 2, 1, 3])  # the first Q (or V) transpose
    model = copy.deepcopy(plain)
    model.graph.node.append(helper.make_node("Shape", [q.output[0]], ["q_shape"]))
    model.graph.output.append(helper.make_tensor_value_info("q_shape", TensorProto.INT64, [4]))
    before = model.SerializeToString()
    model, count = fuse_attention(model, None)
    assert count == 0 and model.SerializeToString() == before
    # the same Shape read by nothing is dropped with the block
    dangling = copy.deepcopy(plain)
    dangling.graph.node.append(helper.make_node("Shape", [q.output[0]], ["q_shape"]))
    _, count = fuse_attention(dangling, _feeds(4, 3))
    assert count == LAYERS


def test_unsaturated_stores_qattention_weights_as_uint8(encoder_onnx):
    plain = _quantize(encoder_onnx, False)
    # quantize() returns u8 weights; go back to an int8-weight model to fuse and rewrite
    model, count = fuse_attention(copy.deepcopy(plain), None)
    assert count == LAYERS
    node = next(n for n in model.graph.node if n.op_type == "QAttention")
    inits = {t.name: t for t in model.graph.initializer}
    w = numpy_helper.to_array(inits[node.input[1]])
    signed = (w.astype(np.int16) - 128).astype(np.int8)
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(signed, node.input[1]))
    zero = np.zeros((), np.int8)
    inits[node.input[7]].CopyFrom(numpy_helper.from_array(zero, node.input[7]))
    fixed = unsaturated(copy.deepcopy(model))
    inits = {t.name: t for t in fixed.graph.initializer}
    fnode = next(n for n in fixed.graph.node if n.op_type == "QAttention")
    assert inits[fnode.input[1]].data_type == TensorProto.UINT8
    assert int(numpy_helper.to_array(inits[fnode.input[7]])) == 128
    np.testing.assert_array_equal(numpy_helper.to_array(inits[fnode.input[1]]), w)
