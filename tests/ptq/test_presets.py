"""The int8 presets on the real minilm-l6 (slow) and the digits CNN."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeslim.errors import ConfigError
from edgeslim.ptq import quantize_int8_preset


def test_classification_preset_on_digits(digits_cnn_onnx, digits_split, tmp_path):
    out = tmp_path / "digits.int8.onnx"
    res = quantize_int8_preset(
        digits_cnn_onnx,
        digits_split.x_train[:160],
        digits_split.x_test,
        task="classification",
        time_budget_s=120,
        out_path=out,
        progress=False,
    )
    assert res.goal_met and out.is_file()
    assert any(n.op_type == "QLinearConv" for n in res.model.graph.node)
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["config"]["weight_rounding"] == "gptq"


def test_unknown_task_is_a_config_error(digits_cnn_onnx):
    with pytest.raises(ConfigError, match="'classification', 'embedding'"):
        quantize_int8_preset(digits_cnn_onnx, np.zeros((4, 64)), np.zeros((4, 64)), task="ocr")


@pytest.mark.slow
def test_embedding_preset_on_minilm(tmp_path):
    from edgeslim.datasets import english_sentences
    from edgeslim.export.onnx import onnx_param_bytes
    from edgeslim.export.specs import export_zoo_model
    from edgeslim.zoo.minilm import sentence_feeds as feeds

    path = tmp_path / "minilm.onnx"
    export_zoo_model("minilm-l6", path, check=False)
    res = quantize_int8_preset(
        path,
        feeds(english_sentences(48, split="calibration")),
        feeds(english_sentences(64, split="evaluation")),
        task="embedding",
        time_budget_s=60,
        progress=False,
    )
    assert res.metrics["mean_cosine"] >= 0.995
    assert res.metrics["min_cosine"] >= 0.98
    assert res.size_bytes <= 0.30 * onnx_param_bytes(path)
    assert any(n.op_type == "MatMulIntegerToFloat" for n in res.model.graph.node)
    # the GELU outputs of the early layers (one token far louder) stay row-wise, the
    # LayerNorm outputs that feed Q/K/V get one calibrated range
    modes = {m: a["mode"] for a in res.activations.values() for m in a["matmuls"]}
    assert modes["/encoder/encoder/layer.0/output/dense/MatMul"] == "row-wise"
    assert modes["/encoder/encoder/layer.0/attention/self/query/MatMul"] == "static"
    # each sentence's embedding is its own whatever is batched with it
    from edgeslim.ptq._graph import make_session
    from edgeslim.zoo.minilm import encode

    ids, mask = encode(english_sentences(4, split="evaluation"))
    sess = make_session(res.model)
    together = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    for i in range(4):
        n = int(mask[i].sum())
        alone = sess.run(None, {"input_ids": ids[i : i + 1, :n].numpy(),
                                "attention_mask": mask[i : i + 1, :n].numpy()})[0]
        np.testing.assert_allclose(alone[0], together[i], atol=1e-5)
