"""compress end to end: presets, recipes, the CLI, the demo, and the errors users hit."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgeslim.cli import main
from edgeslim.edge.runtime import load
from edgeslim.errors import ConfigError, ModelError
from edgeslim.pipeline import compress
from edgeslim.recipe import Recipe
from edgeslim.zoo.digits import load_digits_split
from tests._signals import as_from_a_terminal, signal_state


def _accuracy(bundle) -> float:
    split = load_digits_split()
    logits = load(bundle).run({"input": split.x_test})["logits"]
    return float((logits.argmax(1) == split.y_test).mean())


@pytest.mark.slow
def test_deep_compression_preset_is_40x_smaller_within_half_a_point(tmp_path):
    fp32 = compress("digits-cnn", preset="fp32", out=tmp_path / "fp32.eslim", progress=False)
    deep = compress("digits-cnn", preset="deep-compression", out=tmp_path / "dc.eslim",
                    progress=False)
    fp32_onnx = zipfile.ZipFile(fp32.bundle).getinfo("model.onnx").file_size
    ratio = fp32_onnx / deep.bundle.stat().st_size
    acc_fp32, acc_deep = _accuracy(fp32.bundle), _accuracy(deep.bundle)
    print(f"deep-compression: {ratio:.1f}x smaller than fp32 model.onnx, "
          f"accuracy {acc_deep:.4f} vs fp32 {acc_fp32:.4f}")
    assert ratio >= 40
    assert acc_deep >= acc_fp32 - 0.005
    # what the manifest claims is what the bundle does
    assert deep.manifest["metrics"]["accuracy"] == pytest.approx(acc_deep)
    assert [s["step"] for s in deep.manifest["compression"]] == ["prune", "pack"]


def test_fp32_cli_roundtrip_signed(tmp_path, digits_mlp):
    assert main(["keygen", "--out", str(tmp_path / "keys")]) == 0
    out = tmp_path / "mlp.eslim"
    rc = main(["compress", "digits-mlp", "--preset", "fp32", "-o", str(out), "-q",
               "--sign-key", str(tmp_path / "keys" / "signing.key"), "--model-version", "2.1"])
    assert rc == 0
    manifest = json.loads(zipfile.ZipFile(out).read("manifest.json"))
    assert manifest["name"] == "digits-mlp" and manifest["version"] == "2.1"
    assert manifest["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 64]}]
    assert manifest["outputs"][0]["shape"] == ["batch", 10]
    assert "probe" in manifest and manifest["metrics"]["accuracy"] > 0.95
    assert main(["inspect", str(out), "--public-key", str(tmp_path / "keys" / "signing.pub")]) == 0
    # and the bundle answers like the torch model it came from
    import torch

    x = load_digits_split().x_test[:8]
    with torch.no_grad():
        ref = digits_mlp(torch.from_numpy(x)).numpy()
    got = load(out).run({"input": x})["logits"]
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_a_bad_model_version_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "x.eslim"
    rc = main(["compress", "digits-mlp", "--preset", "fp32", "-o", str(out), "-q",
               "--model-version", "v 2"])
    assert rc == 2 and "'v 2'" in capsys.readouterr().err and not out.exists()


def test_default_names_of_callables_and_files_are_valid_model_names(tmp_path, monkeypatch):
    """'package.module:callable' and a file name with spaces give the bundle a valid name (the
    bundle writer refused "mymodels:mlp" after all the work)."""
    (tmp_path / "eslim_names_models.py").write_text(
        "from torch import nn\n\n\ndef mlp():\n"
        "    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: digits\nsteps: []\n")
    out = tmp_path / "a.eslim"
    assert main(["compress", "eslim_names_models:mlp", "--recipe", str(recipe), "-o", str(out),
                 "-q"]) == 0
    assert json.loads(zipfile.ZipFile(out).read("manifest.json"))["name"] == "mlp"
    spaced = _matmul_mlp(tmp_path / "my model (1).onnx")
    assert main(["compress", str(spaced), "--recipe", str(recipe), "-o", str(out), "-q"]) == 0
    assert json.loads(zipfile.ZipFile(out).read("manifest.json"))["name"] == "my-model--1-"


@pytest.mark.parametrize(("source", "words"), [
    ("raise RuntimeError('set MY_WEIGHTS first')\n\ndef build():\n    pass\n",
     ["Cannot import module 'eslim_bad_models' from 'eslim_bad_models:build': RuntimeError: "
      "set MY_WEIGHTS first"]),
    ("def build():\n    raise FileNotFoundError('weights.pt')\n",
     ["'eslim_bad_models:build' raised FileNotFoundError: weights.pt"]),
    ("build = 3\n", ["'eslim_bad_models' has no callable 'build'"]),
])
def test_a_model_callable_that_fails_is_one_line(tmp_path, monkeypatch, capsys, source, words):
    """MODEL's 'package.module:callable': a module that fails as it imports, or a callable
    that raises, was a traceback; now one line naming the spec and what MODEL may be."""
    import sys

    (tmp_path / "eslim_bad_models.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "eslim_bad_models", raising=False)  # each case anew
    out = tmp_path / "x.eslim"
    assert main(["compress", "eslim_bad_models:build", "--preset", "fp32", "-o", str(out),
                 "-q"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in [*words, "'package.module:callable' returning a torch.nn.Module"]:
        assert word in err, (word, err)
    assert not out.exists()


def test_a_bad_recipe_name_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import edgeslim.zoo

    def untouched(*a, **k):
        raise AssertionError("work started before the recipe name was checked")

    monkeypatch.setattr(edgeslim.zoo, "load_model", untouched)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: digits slim\nsteps:\n  - finetune: {epochs: 5}\n")
    out = tmp_path / "x.eslim"
    assert main(["compress", "digits-mlp", "--recipe", str(recipe), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "Got 'digits slim' instead" in err and "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("step", [{"finetune": {"epochs": 1}}, {"distill": {"epochs": 1}},
                                  {"quantize": {"epochs": 1}}, {"prune": {"sparsity": 0.5,
                                                                          "epochs": 1}},
                                  {"prune": {"sparsity": 0.5, "schedule": "gradual"}},
                                  {"prune_structured": {"importance": "taylor"}}])
def test_a_step_that_trains_is_refused_before_any_work_without_training_data(tmp_path,
                                                                            monkeypatch, step):
    """A workload without training data (photos, sentences, or one from Python) is refused
    for a recipe whose steps train before the first step runs, not when that step comes."""
    import dataclasses

    import edgeslim.recipe.run
    from edgeslim.recipe.workload import workload_for

    def untouched(*a, **k):
        raise AssertionError("a step ran before the training data was checked")

    monkeypatch.setattr(edgeslim.recipe.run, "run_recipe", untouched)
    wl = dataclasses.replace(workload_for("digits-mlp"), name="no-labels", train=None)
    recipe = Recipe.from_dict({"steps": [{"prune": {"sparsity": 0.3}}, step]})
    name = next(iter(step))
    with pytest.raises(ConfigError, match=rf"Step 2 \('{name}'\) trains, but the workload "
                                          r"'no-labels' has no training data"):
        compress("digits-mlp", recipe=recipe, workload=wl, out=tmp_path / "x.eslim",
                 progress=False)
    assert not (tmp_path / "x.eslim").exists()
    # what needs no training data still runs on it
    monkeypatch.undo()
    res = compress("digits-mlp", recipe=Recipe.from_dict({"steps": [
        {"prune": {"sparsity": 0.3}}, {"prune_structured": {"ratio": 0.25}}]}), workload=wl,
        out=tmp_path / "y.eslim", progress=False)
    assert [s["step"] for s in res.manifest["compression"]] == ["prune", "prune_structured"]


def test_a_single_input_onnx_model_is_fed_by_position(tmp_path):
    """A one-input model whose input is not named like the workload's ('x', not 'input') is
    fed by position, and its bundle keeps its own input name."""
    import onnx
    import onnxruntime as ort

    from tests.edge._bundles import linear_onnx

    proto = onnx.load_from_string(linear_onnx())
    proto.graph.input[0].name = "x"
    for node in proto.graph.node:
        node.input[:] = ["x" if n == "input" else n for n in node.input]
    model = tmp_path / "x.onnx"
    onnx.save(proto, str(model))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: digits\nsteps: []\n")
    out = tmp_path / "x.eslim"
    assert main(["compress", str(model), "--recipe", str(recipe), "-o", str(out), "-q"]) == 0
    manifest = json.loads(zipfile.ZipFile(out).read("manifest.json"))
    assert [i["name"] for i in manifest["inputs"]] == ["x"]
    split = load_digits_split()
    logits = ort.InferenceSession(str(model)).run(None, {"x": split.x_test})[0]
    acc = float((logits.argmax(1) == split.y_test).mean())
    assert manifest["metrics"]["accuracy"] == pytest.approx(acc)


def test_a_workload_that_does_not_fit_the_model_is_refused_before_any_work(tmp_path,
                                                                          monkeypatch, capsys):
    """A fixed batch of 1, a torch model of another input width, data that is not a zoo
    model's own: one line naming both sides, before any step (not an onnxruntime or torch
    traceback after the steps)."""
    from tests.edge._bundles import linear_onnx

    fixed = tmp_path / "fixed.onnx"
    fixed.write_bytes(linear_onnx(batch=1))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: digits\nsteps: [pack]\n")
    out = tmp_path / "x.eslim"
    assert main(["compress", str(fixed), "--recipe", str(recipe), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert ("takes input 'input' as float32 of shape [1, 64], but the workload 'digits' feeds "
            "float32 of shape [450, 64]") in err and "Traceback" not in err
    (tmp_path / "eslim_fit_models.py").write_text(
        "from torch import nn\n\n\ndef wide():\n    return nn.Linear(100, 10)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe.write_text("data: digits\nsteps:\n  - prune: {sparsity: 0.5}\n")
    assert main(["compress", "eslim_fit_models:wide", "--recipe", str(recipe), "-o", str(out),
                 "-q"]) == 2
    err = capsys.readouterr().err
    assert "does not run on the inputs of the workload 'digits' (input [1, 64])" in err
    import edgeslim.zoo

    def untouched(*a, **k):
        raise AssertionError("the model was loaded before its data was checked")

    monkeypatch.setattr(edgeslim.zoo, "load_model", untouched)
    recipe.write_text("data: digits\nsteps: []\n")
    assert main(["compress", "efficientnet-lite0", "--recipe", str(recipe), "-o", str(out),
                 "-q"]) == 2
    err = capsys.readouterr().err
    assert "'efficientnet-lite0' takes its own data ('photos'); the recipe's data: 'digits'" \
        in err
    assert not out.exists()


def test_recipe_file_through_cli(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: tiny\nsteps:\n  - prune: {sparsity: 0.5}\n  - pack: {bits: 6}\n")
    out = tmp_path / "tiny.eslim"
    assert main(["compress", "digits-mlp", "--recipe", str(recipe), "-o", str(out), "-q"]) == 0
    manifest = json.loads(zipfile.ZipFile(out).read("manifest.json"))
    assert manifest["name"] == "tiny"
    assert manifest["compression"][0]["report"]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_a_recipe_picks_the_calibration_of_its_ptq_step(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - ptq: {calibration: entropy, time_budget_s: 30}\n")
    out = tmp_path / "entropy.eslim"
    assert main(["compress", "digits-cnn", "--recipe", str(recipe), "-o", str(out), "-q"]) == 0
    step = json.loads(zipfile.ZipFile(out).read("manifest.json"))["compression"][0]
    assert step["step"] == "ptq" and step["params"]["calibration"] == "entropy"
    assert step["report"]["config"]["method"] == "entropy"
    assert step["report"]["goal_met"] and step["report"]["metrics"]["top1_agreement"] >= 0.99


def test_calibration_is_refused_for_a_workload_that_quantizes_dynamically(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - ptq: {calibration: minmax}\n")
    out = tmp_path / "x.eslim"
    assert main(["compress", "minilm-l6", "--recipe", str(recipe), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "'dynamic' scheme, which calibrates none" in err and "Traceback" not in err
    assert not out.exists()


def _matmul_mlp(path):
    """An ONNX MLP of two MatMuls on the 64 digit pixels (what weight-only quantization takes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)
               for name, shape in (("w1", (64, 64)), ("w2", (64, 10)))]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w1"], ["h"], name="mm1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["logits"], name="mm2")],
        "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _bag_of_words_encoder(path):
    """An ONNX sentence encoder of one's own: the sum of 16-wide word vectors over the tokens
    the attention mask keeps (input_ids, attention_mask -> embedding)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    consts = [numpy_helper.from_array(rng.normal(size=(30522, 16)).astype(np.float32), "emb"),
              numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
              numpy_helper.from_array(np.array([-1], dtype=np.int64), "last")]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
         helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["m", "last"], ["m3"]),
         helper.make_node("Mul", ["e", "m3"], ["kept"]),
         helper.make_node("ReduceSum", ["kept", "axes"], ["embedding"], keepdims=0)],
        "encoder",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
         for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 16])], consts)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_an_onnx_model_on_sentences_is_judged_against_its_own_fp32_outputs(tmp_path):
    """data: sentences for a user's ONNX encoder: the fp32 bundle agrees with the model it is
    (mean cosine 1), not judged against MiniLM's embeddings."""
    model = _bag_of_words_encoder(tmp_path / "encoder.onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: sentences\nsteps: []\n")
    out = tmp_path / "enc.eslim"
    assert main(["compress", str(model), "--recipe", str(recipe), "-o", str(out), "-q"]) == 0
    metrics = json.loads(zipfile.ZipFile(out).read("manifest.json"))["metrics"]
    assert metrics["mean_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_the_dynamic_scheme_shrinks_a_model_whose_only_weights_are_an_embedding_table(tmp_path):
    """No MatMul, but a 30522-row embedding table: the sentence preset stores it as int8 per
    row (the refusal of MatMul-less models once took this model too)."""
    model = _bag_of_words_encoder(tmp_path / "encoder.onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: sentences\nsteps:\n  - ptq: {}\n")
    out = tmp_path / "enc.eslim"
    assert main(["compress", str(model), "--recipe", str(recipe), "-o", str(out), "-q"]) == 0
    manifest = json.loads(zipfile.ZipFile(out).read("manifest.json"))
    assert manifest["metrics"]["onnx_bytes"] < 0.35 * model.stat().st_size
    assert manifest["metrics"]["mean_cosine"] > 0.999


@pytest.mark.slow
def test_an_onnx_model_on_photos_is_judged_against_its_own_fp32_outputs(tmp_path):
    """data: photos for a user's ONNX classifier: the unchanged model agrees with itself (top-1
    agreement 1; it read 0.0, judged against EfficientNet-Lite0's classes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(3, 1000)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["p"]),
         helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("MatMul", ["f", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                               ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        [numpy_helper.from_array(w, "w")])
    model = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: photos\nsteps: []\n")
    out = tmp_path / "tiny.eslim"
    assert main(["compress", str(model), "--recipe", str(recipe), "-o", str(out), "-q"]) == 0
    metrics = json.loads(zipfile.ZipFile(out).read("manifest.json"))["metrics"]
    assert metrics["top1_agreement"] == 1.0


def test_a_recipe_quantizes_weights_to_int4(tmp_path):
    import onnx

    model = _matmul_mlp(tmp_path / "mlp.onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: digits\nsteps:\n"
                      "  - ptq: {scheme: weight_only, bits: 4, time_budget_s: 30}\n")
    out = tmp_path / "int4.eslim"
    assert main(["compress", str(model), "--recipe", str(recipe), "-o", str(out), "-q"]) == 0
    bundle = zipfile.ZipFile(out)
    report = json.loads(bundle.read("manifest.json"))["compression"][0]["report"]
    assert report["config"]["bits"] == 4 and report["config"]["scheme"] == "weight_only"
    graph = onnx.load_from_string(bundle.read("model.onnx")).graph
    packed = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(packed) == 2
    assert all(a.i == 4 for n in packed for a in n.attribute if a.name == "bits")


def test_a_model_with_its_weights_beside_it_is_compressed_and_sized_whole(tmp_path, capsys):
    """torch.onnx.export's default exporter writes the weights to MODEL.onnx.data beside the
    graph. The bundle's 'original fp32' size is the whole model's, not the graph file's; with
    the data file gone, the error names it."""
    import onnx

    (tmp_path / "src").mkdir()
    model = _matmul_mlp(tmp_path / "src" / "mlp.onnx")
    whole = model.stat().st_size
    onnx.save(onnx.load(str(model)), str(model), save_as_external_data=True,
              all_tensors_to_one_file=True, location="mlp.onnx.data", size_threshold=0)
    assert model.stat().st_size < 1000 < (tmp_path / "src" / "mlp.onnx.data").stat().st_size
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: digits\nsteps: []\n")
    out = tmp_path / "mlp.eslim"
    assert main(["compress", str(model), "--recipe", str(recipe), "-o", str(out), "-q"]) == 0
    bundle = zipfile.ZipFile(out)
    metrics = json.loads(bundle.read("manifest.json"))["metrics"]
    assert metrics["fp32_onnx_bytes"] == whole
    inside = {t.name: onnx.numpy_helper.to_array(t)
              for t in onnx.load_from_string(bundle.read("model.onnx")).graph.initializer}
    for t in onnx.load(str(model)).graph.initializer:  # the weights travel in the bundle
        np.testing.assert_array_equal(inside[t.name], onnx.numpy_helper.to_array(t))

    (tmp_path / "src" / "mlp.onnx.data").rename(tmp_path / "elsewhere.data")
    capsys.readouterr()
    assert main(["compress", str(model), "--recipe", str(recipe), "-o",
                 str(tmp_path / "again.eslim"), "-q"]) != 0
    err = " ".join(capsys.readouterr().err.split())
    assert "external data files that are not beside it: 'mlp.onnx.data'" in err
    assert not (tmp_path / "again.eslim").exists()


def test_pack_after_ptq_shares_what_ptq_left_in_float_and_says_when_nothing(tmp_path, capsys):
    """After weight-only int4 a conv's weights are still float for pack to share; with none
    left (an MLP of MatMuls only), pack runs and says so instead of being listed silently."""
    import onnx
    from onnx import helper, numpy_helper

    model = _matmul_mlp(tmp_path / "mlp.onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: digits\nsteps:\n  - ptq: {scheme: weight_only, bits: 4}\n"
                      "  - pack: {bits: 4, min_size: 16}\n")
    out = tmp_path / "mlp.eslim"
    assert main(["compress", str(model), "--recipe", str(recipe), "-o", str(out), "-q"]) == 0
    steps = json.loads(zipfile.ZipFile(out).read("manifest.json"))["compression"]
    assert steps[-1]["step"] == "pack" and steps[-1]["report"]["packed_tensors"] == 0
    assert "pack:nofloatweighttensortoshare" in "".join(capsys.readouterr().err.split())

    # a 1x1 conv in front: weight-only leaves it float, and pack shares it
    proto = onnx.load(str(model))
    w = np.random.default_rng(1).normal(0, 0.3, (64, 64, 1, 1)).astype(np.float32)
    proto.graph.initializer.append(numpy_helper.from_array(w, "wc"))
    proto.graph.node.insert(0, helper.make_node("Unsqueeze", ["input", "ax"], ["x4"], name="u"))
    proto.graph.node.insert(1, helper.make_node("Conv", ["x4", "wc"], ["c4"], name="conv"))
    proto.graph.node.insert(2, helper.make_node("Squeeze", ["c4", "ax"], ["c"], name="s"))
    proto.graph.initializer.append(numpy_helper.from_array(np.array([2, 3], np.int64), "ax"))
    proto.graph.node[3].input[0] = "c"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(model))
    assert main(["compress", str(model), "--recipe", str(recipe), "-o", str(out), "-q"]) == 0
    steps = json.loads(zipfile.ZipFile(out).read("manifest.json"))["compression"]
    assert steps[-1]["report"]["packed_tensors"] == 1


def test_weight_only_is_refused_for_a_model_without_matmuls(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - ptq: {scheme: weight_only, bits: 4, time_budget_s: 30}\n")
    out = tmp_path / "x.eslim"
    assert main(["compress", "digits-mlp", "--recipe", str(recipe), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "has none to quantize; its linear layers are Gemm" in err and "Traceback" not in err
    assert not out.exists()


def test_cli_errors_are_one_line_with_exit_code(tmp_path, capsys):
    assert main(["compress", "no-such-model", "--preset", "fp32", "-o",
                 str(tmp_path / "x.eslim")]) == 2
    err = capsys.readouterr().err
    assert "Unknown model 'no-such-model'" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - prune: {sparsty: 0.5}\n")
    assert main(["compress", "digits-mlp", "--recipe", str(bad), "-o",
                 str(tmp_path / "x.eslim")]) == 2
    assert "Did you mean 'sparsity'" in capsys.readouterr().err
    assert main(["compress", "digits-mlp", "--preset", "int9", "-o",
                 str(tmp_path / "x.eslim")]) == 2
    assert "Allowed presets" in capsys.readouterr().err
    assert not (tmp_path / "x.eslim").exists()


def test_python_api_errors(tmp_path):
    with pytest.raises(ModelError, match="Got list instead"):
        compress([1, 2], preset="fp32", out=tmp_path / "x.eslim")
    with pytest.raises(ConfigError, match="either a recipe or a preset"):
        compress("digits-mlp", preset="fp32", recipe=Recipe([]), out=tmp_path / "x.eslim")
    onnx_path = tmp_path / "m.onnx"
    from tests.edge._bundles import linear_onnx

    onnx_path.write_bytes(linear_onnx())
    with pytest.raises(ConfigError, match="need a torch model"):
        compress(str(onnx_path), recipe=Recipe.from_dict({"data": "digits", "steps": [
            {"prune": {"sparsity": 0.5}}]}), out=tmp_path / "x.eslim")


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    # a key pair already in --out-dir/keys (keygen --out keys, then demo --out-dir .) was
    # replaced without a word; the demo now signs with it
    assert main(["keygen", "--out", str(tmp_path / "keys")]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "keys").iterdir()}
    assert main(["demo", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "verified signature" in out and "test accuracy" in out
    assert _accuracy(tmp_path / "digits-cnn.eslim") > 0.97
    assert {p.name: p.read_bytes() for p in (tmp_path / "keys").iterdir()} == before
    assert main(["inspect", str(tmp_path / "digits-cnn.eslim"), "--public-key",
                 str(tmp_path / "keys" / "signing.pub")]) == 0


def test_bad_outputs_keys_and_onnx_files_are_refused_before_any_work(tmp_path, monkeypatch,
                                                                      capsys):
    import edgeslim.zoo

    assert main(["keygen", "--out", str(tmp_path / "keys")]) == 0
    same = tmp_path / "same.onnx"
    same.write_bytes(b"precious")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: digits\nsteps: [pack]\n")

    def untouched(*a, **k):
        raise AssertionError("work started before the inputs were checked")

    monkeypatch.setattr(edgeslim.zoo, "load_model", untouched)
    cases = [
        (["compress", str(same), "--recipe", str(recipe), "-o", str(same)], 2,
         "is the input model"),
        (["compress", "digits-mlp", "--preset", "fp32", "-o", str(tmp_path)], 2,
         "is a folder"),
        (["compress", "digits-mlp", "--preset", "fp32", "-o", str(same / "x.eslim")], 2,
         "is a file, not a folder"),
        (["compress", "digits-mlp", "--preset", "fp32", "-o", str(tmp_path / "k.eslim"),
          "--sign-key", str(tmp_path / "keys" / "signing.pub")], 4, "not a PEM private key"),
    ]
    for argv, code, phrase in cases:
        assert main([*argv, "-q"]) == code, argv
        assert phrase in capsys.readouterr().err, argv
    assert same.read_bytes() == b"precious" and not (tmp_path / "k.eslim").exists()


def test_files_that_are_not_onnx_get_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: digits\nsteps: [pack]\n")
    fake, empty = tmp_path / "fake.onnx", tmp_path / "empty.onnx"
    fake.write_text("this is not a protobuf\n" * 3)
    empty.write_bytes(b"")
    for path, phrase in ((fake, "is not an ONNX model"), (empty, "it holds no graph")):
        assert main(["compress", str(path), "--recipe", str(recipe), "-o",
                     str(tmp_path / "x.eslim"), "-q"]) == 2
        err = capsys.readouterr().err
        assert phrase in err and "Traceback" not in err
    from tests.bundle.helpers import mlp_onnx

    real = tmp_path / "real.onnx"
    real.write_bytes(mlp_onnx())
    assert main(["compress", str(real), "--preset", "fp32", "-o", str(tmp_path / "x.eslim"),
                 "-q"]) == 2
    assert "a preset cannot say which" in capsys.readouterr().err
    assert not (tmp_path / "x.eslim").exists()


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_compress_leaves_nothing_behind(tmp_path, sig):
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = tmp_path / "x.eslim"
    # deep-compression with 100x its epochs: long enough that the signal always lands in the
    # middle of the work, however busy the machine (the preset itself once finished first)
    recipe = tmp_path / "long.yaml"
    recipe.write_text("steps:\n  - prune: {sparsity: 0.96, scope: global, schedule: gradual, "
                      "steps: 5, epochs: 2000}\n  - pack: {bits: 5}\n")
    # the installed command, as users run it (under 'python -m', CPython itself sometimes
    # re-raises a handled Ctrl-C at exit)
    exe = Path(sys.executable).with_name("edgeslim")
    proc = subprocess.Popen([exe, "compress", "digits-mlp", "--recipe", str(recipe),
                             "-o", str(out), "-q"], env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_from_a_terminal)  # tests/_signals.py
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("edgeslim-*")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    assert list(tmp_path.glob("edgeslim-*")), "the compression never started"
    assert proc.poll() is None, "the compression ended before the signal"
    state = signal_state(proc.pid, getattr(signal, sig))
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, f"{sig}: {state}", err)
    assert "interrupted: nothing was written" in err and "Traceback" not in err
    assert not list(tmp_path.glob("edgeslim-*")) and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_ctrl_c_that_python_wrapped_is_still_an_interrupt():
    """A Ctrl-C landing while a class body runs __set_name__ (a dataclass imported lazily
    mid-compress, seen in a test run) reaches compress as a RuntimeError caused by it."""
    from edgeslim.commands.compress import interrupted

    class Field:
        def __set_name__(self, owner, name):
            raise KeyboardInterrupt

    with pytest.raises(RuntimeError) as wrapped:
        type("Result", (), {"config": Field()})
    assert interrupted(wrapped.value) and interrupted(KeyboardInterrupt())
    assert not interrupted(RuntimeError("a real error"))
    assert not interrupted(ValueError("bad")) and not interrupted(SystemExit(2))


def test_a_ptq_step_that_misses_its_goal_says_so(tmp_path, capsys):
    """One loud channel squashes the 8-bit range of the others; with no time to fall back,
    the search keeps what it has and the run says the goal was missed (also under -q, which
    hides progress only)."""
    import onnx

    model = _matmul_mlp(tmp_path / "loud.onnx")
    proto = onnx.load(str(model))
    w1 = onnx.numpy_helper.to_array(proto.graph.initializer[0]).copy()
    w1[:, 0] = 2000.0  # h[:, 0] is in the tens of thousands; Relu keeps it
    proto.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w1, "w1"))
    onnx.save(proto, str(model))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: digits\nsteps:\n  - ptq: {scheme: static, max_drop: 0.0, "
                      "time_budget_s: 0.01}\n")
    out = tmp_path / "loud.eslim"
    assert main(["compress", str(model), "--recipe", str(recipe), "-o", str(out), "-q"]) == 0
    report = json.loads((tmp_path / "loud.ptq-report.json").read_text())
    assert report["goal_met"] is False
    err = "".join(capsys.readouterr().err.split())  # rich wraps lines anywhere
    assert "ptq:goalmissed:top1_agreement" in err and "loud.ptq-report.json" in err
