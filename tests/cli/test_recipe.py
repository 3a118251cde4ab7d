"""Recipes: validation before any work, YAML loading, ordering of torch and ONNX steps."""

from __future__ import annotations

import pytest

from edgeslim.errors import ConfigError
from edgeslim.presets import PRESETS, preset_recipe
from edgeslim.recipe import Recipe, Step, load_recipe


def test_recipe_from_python_objects_and_dict_agree():
    a = Recipe([Step("prune", {"sparsity": 0.5}), Step("pack", {"bits": 4})])
    b = Recipe.from_dict({"steps": [{"prune": {"sparsity": 0.5}}, {"pack": {"bits": 4}}]})
    assert a.to_dict() == b.to_dict()
    assert [s.name for s in a.torch_steps] == ["prune"]
    assert [s.name for s in a.onnx_steps] == ["pack"]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"steps": [{"prnue": {"sparsity": 0.5}}]}, "Did you mean 'prune'"),
        ({"steps": [{"prune": {"sparsty": 0.5}}]}, "Unknown key 'sparsty'"),
        ({"steps": [{"prune": {"sparsity": 1.3}}]}, "Got 1.3 instead"),
        ({"steps": [{"prune": {"sparsity": 0.5, "threshold": 0.1}}]}, "exactly one"),
        ({"steps": [{"quantize": {"bits": 9}}]}, "range [2, 8]. Got 9"),
        ({"steps": [{"distill": {"temperature": 0}}]}, "'temperature'"),
        ({"steps": [{"distill": {"temperature": -1.0}}]}, "Got -1.0"),
        ({"steps": [{"distill": {"epochs": 0}}]}, "'epochs' parameter of distill must be an int "
                                                   "in the range [1, 10000]. Got 0"),
        ({"steps": [{"distill": {"loss": "kl+feature"}}]}, "needs 'features'"),
        ({"steps": [{"distill": {"features": [["fc1", "fc1"]]}}]},
         "has no 'feature' term; use loss: kl+feature"),
        ({"steps": [{"distill": {"loss": "feature", "features": ["fc1"]}}]},
         "name pairs, e.g. [[fc1, fc1]]. Got ['fc1']"),
        ({"steps": [{"prune_structured": {"ratio": 1.0}}]}, "[0.0, 1.0). Got 1.0"),
        ({"stpes": []}, "Did you mean 'steps'"),
        ({"steps": "prune"}, "must be a list"),
        ({"steps": [42]}, "Step 1 must be"),
        ({"steps": [{"pack": {}}, {"prune": {"sparsity": 0.5}}]}, "List every torch step"),
        ({"steps": ["ptq", "ptq"]}, "Step 2 ('ptq') repeats step 1 ('ptq')"),
        (["prune"], "must be a mapping"),
        ({"steps": [{"prune": {"sparsity": 0.5, "ignored_layers": 7}}]},
         "In step 1 ('prune'): The 'ignored_layers' parameter of prune must be a list of layer "
         "names"),
        ({"steps": [{"prune": {"sparsity": 0.5, "steps": -3}}]}, "In step 1 ('prune')"),
        ({"steps": [{"prune_structured": {"round_to": -4}}]}, "'round_to'"),
        ({"steps": [{"ptq": {"scheme": "bogus"}}]},
         "In step 1 ('ptq'): The 'scheme' parameter of ptq"),
        ({"steps": [{"ptq": {"calibration": "kl"}}]},
         "The 'calibration' parameter of ptq must be one of 'entropy', 'minmax', 'percentile'. "
         "Got 'kl'"),
        ({"steps": [{"ptq": {"calibration": "entropy", "scheme": "dynamic"}}]},
         "the scheme 'dynamic' calibrates none"),
        ({"steps": [{"ptq": {"bits": 5}}]}, "must be 8, 7 or 4 (7: weights within +-64"),
        ({"steps": [{"ptq": {"bits": 7, "scheme": "weight_only"}}]},
         "is 7 only with the static or dynamic scheme"),
        ({"steps": [{"ptq": {"bits": 4}}]}, "is 4 only with scheme: weight_only"),
        ({"steps": [{"ptq": {"bits": 4, "scheme": "dynamic"}}]}, "Add scheme: weight_only"),
        ({"export": {"opset": 99}, "steps": ["pack"]}, "Unknown top-level key 'export'"),
        ({"name": "my model!", "steps": []},
         "The recipe's 'name' (the model name in the manifest) must be 1-64 of A-Z a-z 0-9 _ . - "
         "(a V2 model name). Got 'my model!' instead."),
        ({"name": 123, "steps": []}, "Got 123 instead"),
        ({"data": ["digits"], "steps": []},
         "The 'data' parameter of the recipe must be one of 'digits', 'photos', 'sentences', "
         "or 'package.module:callable' returning a Workload. Got ['digits'] instead."),
        ({"steps": [{"prune": {"sparsity": 0.5, "scope": ["layer"]}}]},
         "The 'scope' parameter of prune must be one of 'global', 'layer'. Got ['layer']"),
        ({"steps": [{"prune_structured": {"importance": {"taylor": 1}}}]},
         "The 'importance' parameter of prune_structured must be one of 'activation', 'l1', "
         "'l2', 'taylor'. Got {'taylor': 1}"),
    ],
)
def test_bad_recipes_fail_fast_naming_the_value(raw, needle):
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict(raw)
    assert needle in str(info.value)


def test_load_recipe_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: slim\nsteps:\n  - prune: {sparsity: 0.8, epochs: 1}\n  - pack\n")
    recipe = load_recipe(path)
    assert recipe.name == "slim"
    assert recipe.steps[0].params == {"sparsity": 0.8, "epochs": 1}
    assert recipe.steps[1].name == "pack"


def test_a_bare_step_takes_its_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps:\n  - pack\n  - ptq:\n")
    recipe = load_recipe(path)
    assert [(s.name, s.params) for s in recipe.steps] == [("pack", {}), ("ptq", {})]


@pytest.mark.parametrize(("text", "where"), [
    ("name: slim\nsteps:\n  - prune: {sparsity: 0.8, epochs: 2}\n  - distill: {epochs: 5}\n"
     "description: pruned then int8\nsteps:\n  - ptq\n", "line 6, column 1: the key 'steps'"),
    ("steps:\n  - prune: {sparsity: 0.8, epochs: 2, sparsity: 0.3}\n",
     "line 2, column 39: the key 'sparsity'"),
])
def test_a_key_given_twice_is_refused_not_overridden(tmp_path, text, where):
    """PyYAML keeps the last of two equal keys: a second 'steps:' dropped the first one's
    steps without a word."""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert f"is not valid YAML: {where} is given twice" in str(info.value)
    assert "\n" not in str(info.value)


def test_load_recipe_reports_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [prune: {sparsity: 0.8\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"not valid YAML: line 2, column 1: "):
        load_recipe(bad)
    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(ConfigError, match="is not text"):
        load_recipe(png)
    with pytest.raises(ConfigError, match="is a folder"):
        load_recipe(tmp_path)


def test_every_preset_is_a_valid_recipe():
    for name in PRESETS:
        assert isinstance(preset_recipe(name), Recipe)
    with pytest.raises(ConfigError, match="Allowed presets: deep-compression, fp32, int8"):
        preset_recipe("int4-magic")


def _doc_tables():
    """docs/recipes.md: each step section's table rows, key -> default cell."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "recipes.md").read_text()
    tables: dict[str, dict[str, str]] = {}
    for section in re.split(r"^### ", text, flags=re.M)[1:]:
        name = re.match(r"`(\w+)`", section).group(1)
        tables[name] = {m.group(1): m.group(2).strip()
                        for m in re.finditer(r"^\| `(\w+)` \| ([^|]*) \|", section, re.M)}
    return text, tables


def test_the_recipe_reference_documents_every_step_key_and_default():
    from edgeslim.recipe.core import _TOP_KEYS
    from edgeslim.recipe.steps import STEPS

    text, tables = _doc_tables()
    assert set(tables) == set(STEPS)
    for top in _TOP_KEYS:
        assert f"| `{top}` |" in text
    for name, spec in STEPS.items():
        assert set(tables[name]) == spec.keys(), name
        for key, default in spec.defaults.items():
            cell = tables[name][key]
            if default is None:
                continue  # described in words (none, or what decides it)
            if isinstance(default, str):
                assert cell.startswith(f"`{default}`"), (name, key, cell)
            else:
                assert float(cell.split()[0]) == default, (name, key, cell)


def test_the_recipe_reference_examples_are_valid_recipes():
    import re

    import yaml

    text, _ = _doc_tables()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    for block in blocks:
        assert Recipe.from_dict(yaml.safe_load(block)).steps


def test_a_recipe_run_twice_on_one_workload_gives_the_same_model():
    """run_recipe reseeds the training data's shuffling too: a second run on the same
    Workload object trained on other shuffles and gave other weights."""
    import torch

    from edgeslim.recipe.run import run_recipe
    from edgeslim.recipe.workload import workload_for
    from edgeslim.zoo import load_model

    model = load_model("digits-mlp")
    recipe = Recipe.from_dict({"steps": [{"finetune": {"epochs": 1}}]})
    wl = workload_for("digits-mlp")
    first = run_recipe(recipe, model, wl, progress=False).model.state_dict()
    second = run_recipe(recipe, model, wl, progress=False).model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_training_step_after_quantize_is_measured_as_float_weights():
    """After `quantize` the summary counts weights at the grid's width; a later `finetune`
    moves them off the grid, so its row counts them as float again (it read 149 kB, more than
    the pruned float model's 142 kB, from 8-bit codes counted for float weights)."""
    from edgeslim.recipe.measure import weights_size_bytes
    from edgeslim.recipe.run import run_recipe
    from edgeslim.recipe.workload import workload_for
    from edgeslim.zoo import load_model

    model = load_model("digits-cnn")
    recipe = Recipe.from_dict({"steps": [{"quantize": {"bits": 4, "epochs": 1}},
                                         {"finetune": {"epochs": 1}}]})
    result = run_recipe(recipe, model, workload_for("digits-cnn", None, reference=model),
                        progress=False)
    quantized, tuned = result.rows[1], result.rows[2]
    assert quantized.size_bytes < tuned.size_bytes
    assert tuned.size_bytes == weights_size_bytes(result.model, 32) and result.bits == 32
