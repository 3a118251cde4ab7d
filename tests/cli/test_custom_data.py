"""Data of a user's own from the command line: a recipe's 'data:' and optimize's --data take
'package.module:callable' returning a Workload, as MODEL does a model (helpers in
tests/cli/_custom_data.py)."""

from __future__ import annotations

import json
import zipfile

import pytest

from edgeslim.cli import main
from edgeslim.errors import ConfigError
from tests._errors import one_line_error

HERE = "tests.cli._custom_data"
ALLOWED = "'package.module:callable' returning a Workload"


def _manifest(path) -> dict:
    return json.loads(zipfile.ZipFile(path).read("manifest.json"))


def _recipe(tmp_path, data: str, steps: str = "steps: []\n"):
    path = tmp_path / "r.yaml"
    path.write_text(f"data: {data}\n{steps}")
    return path


@pytest.fixture
def no_step_runs(monkeypatch):
    """Fail the test if any step of a recipe starts."""
    import edgeslim.recipe.run

    def untouched(*a, **k):
        raise AssertionError("a step ran before the data was checked")

    monkeypatch.setattr(edgeslim.recipe.run, "run_recipe", untouched)


def test_a_recipe_trains_and_measures_on_a_callables_workload(tmp_path):
    """The bundle's metrics are the callable's (top-2 accuracy on its evaluation batches),
    and the fine-tuning ran on its training data."""
    from edgeslim.edge.runtime import load
    from tests.cli._custom_data import digits_split, top2

    out = tmp_path / "mine.eslim"
    recipe = _recipe(tmp_path, f"{HERE}:digits_top2", "steps:\n  - finetune: {epochs: 1}\n")
    assert main(["compress", f"{HERE}:mlp", "--recipe", str(recipe), "-o", str(out),
                 "-q"]) == 0
    manifest = _manifest(out)
    metrics = manifest["metrics"]
    assert "accuracy" not in metrics
    # measured on the callable's evaluation batches: the bundle scores the same on them
    _, x_test, _, y_test = digits_split()
    assert metrics["top2_accuracy"] == pytest.approx(
        top2(load(out).run({"input": x_test})["logits"], y_test), abs=1e-6)
    # its training data taught the untrained model something
    assert metrics["top2_accuracy"] > metrics["original_top2_accuracy"] + 0.1
    assert manifest["provenance"]["recipe"]["data"] == f"{HERE}:digits_top2"


def test_a_callable_with_one_parameter_gets_the_original_model(tmp_path):
    """agreement(model) labels its inputs with the model it is given: the export agrees with
    them all only if that was the model being compressed."""
    out = tmp_path / "mine.eslim"
    recipe = _recipe(tmp_path, f"{HERE}:agreement")
    assert main(["compress", f"{HERE}:mlp", "--recipe", str(recipe), "-o", str(out),
                 "-q"]) == 0
    assert _manifest(out)["metrics"]["agreement"] == pytest.approx(1.0)


@pytest.mark.parametrize(("data", "words"), [
    ("tests.cli._no_such_module:fn",
     ["Cannot import module 'tests.cli._no_such_module' from 'tests.cli._no_such_module:fn': "
      "ModuleNotFoundError"]),
    (f"{HERE}:nope", [f"'{HERE}' has no callable 'nope' (from '{HERE}:nope')"]),
    (f"{HERE}:NOT_CALLABLE", [f"'{HERE}' has no callable 'NOT_CALLABLE'"]),
    (f"{HERE}:raises",
     [f"'{HERE}:raises' raised RuntimeError: the data folder /nowhere is empty"]),
    (f"{HERE}:not_a_workload",
     [f"'{HERE}:not_a_workload' returned dict, not a Workload"]),
    (f"{HERE}:two_parameters",
     [f"'{HERE}:two_parameters' requires the parameter(s) split; a data callable takes none, "
      "or one: the original model"]),
])
def test_a_bad_callable_is_one_line_naming_it_and_what_is_allowed(tmp_path, capsys,
                                                                   no_step_runs, data, words):
    out = tmp_path / "x.eslim"
    recipe = _recipe(tmp_path, data, "steps:\n  - finetune: {epochs: 1}\n")
    assert main(["compress", f"{HERE}:mlp", "--recipe", str(recipe), "-o", str(out),
                 "-q"]) == 2
    one_line_error(capsys, *words, ALLOWED)
    assert not out.exists()


def test_a_module_that_fails_as_it_imports_is_one_line(tmp_path, capsys, monkeypatch,
                                                       no_step_runs):
    (tmp_path / "eslim_broken_data.py").write_text(
        "raise RuntimeError('set MY_DATA first')\n\ndef data():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = _recipe(tmp_path, "eslim_broken_data:data")
    assert main(["compress", f"{HERE}:mlp", "--recipe", str(recipe), "-o",
                 str(tmp_path / "x.eslim"), "-q"]) == 2
    one_line_error(capsys, "Cannot import module 'eslim_broken_data' from "
                           "'eslim_broken_data:data': RuntimeError: set MY_DATA first", ALLOWED)


def test_a_workload_without_evaluation_batches_is_refused(tmp_path, capsys, no_step_runs):
    recipe = _recipe(tmp_path, f"{HERE}:no_eval_batches")
    assert main(["compress", f"{HERE}:mlp", "--recipe", str(recipe), "-o",
                 str(tmp_path / "x.eslim"), "-q"]) == 2
    one_line_error(capsys, f"The Workload of '{HERE}:no_eval_batches' has no evaluation batches")


@pytest.mark.parametrize("data", ["mydata.py", "my-pkg.data:load", "pkg.data:load:more",
                                  "pkg.data:", ":load", "imagenet"])
def test_a_data_spec_of_the_wrong_form_fails_as_the_recipe_is_read(tmp_path, capsys,
                                                                   monkeypatch, data):
    """Before the model is loaded, not only before the steps."""
    import edgeslim.zoo

    def untouched(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(edgeslim.zoo, "load_model", untouched)
    recipe = _recipe(tmp_path, f"'{data}'")
    assert main(["compress", f"{HERE}:mlp", "--recipe", str(recipe), "-o",
                 str(tmp_path / "x.eslim"), "-q"]) == 2
    one_line_error(capsys, "The 'data' parameter of the recipe must be one of 'digits', "
                           f"'photos', 'sentences', or {ALLOWED}. Got {data!r} instead.")


def test_a_callables_workload_must_fit_the_torch_model(tmp_path, capsys, no_step_runs):
    recipe = _recipe(tmp_path, f"{HERE}:images")
    assert main(["compress", f"{HERE}:mlp", "--recipe", str(recipe), "-o",
                 str(tmp_path / "x.eslim"), "-q"]) == 2
    one_line_error(capsys, "The model does not run on the inputs of the workload 'my-images' "
                           "(input [1, 1, 8, 8])")


def test_a_callables_workload_must_fit_the_onnx_model(tmp_path, capsys):
    from tests.cli.test_compress import _matmul_mlp

    model = _matmul_mlp(tmp_path / "mine.onnx")
    recipe = _recipe(tmp_path, f"{HERE}:images", "steps:\n  - ptq\n")
    assert main(["compress", str(model), "--recipe", str(recipe), "-o",
                 str(tmp_path / "x.eslim"), "-q"]) == 2
    one_line_error(capsys, f"The ONNX model '{model}' takes input 'input' as float32 of shape "
                           "[batch, 64], but the workload 'my-images' feeds float32 of shape "
                           "[450, 1, 8, 8]")


def test_a_training_step_needs_the_callables_training_data(tmp_path, capsys, no_step_runs):
    recipe = _recipe(tmp_path, f"{HERE}:unlabelled", "steps:\n  - finetune: {epochs: 1}\n")
    assert main(["compress", f"{HERE}:mlp", "--recipe", str(recipe), "-o",
                 str(tmp_path / "x.eslim"), "-q"]) == 2
    one_line_error(capsys, "Step 1 ('finetune') trains, but the workload 'my-unlabelled' has no "
                           "training data")


def test_a_zoo_model_refuses_a_callables_data_before_calling_it(tmp_path, capsys,
                                                                monkeypatch):
    """A zoo model is judged on its own data only; the callable is not even called (raises()
    would say so)."""
    import edgeslim.zoo

    def untouched(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(edgeslim.zoo, "load_model", untouched)
    recipe = _recipe(tmp_path, f"{HERE}:raises")
    assert main(["compress", "digits-mlp", "--recipe", str(recipe), "-o",
                 str(tmp_path / "x.eslim"), "-q"]) == 2
    one_line_error(capsys, "The zoo model 'digits-mlp' takes its own data ('digits'); the "
                           f"recipe's data: '{HERE}:raises' does not fit it")
    assert main(["optimize", "digits-mlp", "--data", f"{HERE}:raises", "--max-drop", "0.01",
                 "-o", str(tmp_path / "y.eslim"), "-q"]) == 2
    one_line_error(capsys, "The zoo model 'digits-mlp' takes its own data ('digits'); --data "
                           f"(data=) '{HERE}:raises' does not fit it")
    assert not (tmp_path / "y.report").exists()


@pytest.mark.parametrize(("data", "error", "words"), [
    ("mydata.py", ConfigError, "The 'data' parameter of optimize must be one of 'digits', "
                               f"'photos', 'sentences', or {ALLOWED}. Got 'mydata.py'"),
    (f"{HERE}:raises", ConfigError, f"'{HERE}:raises' raised RuntimeError"),
    (f"{HERE}:images", ConfigError, "does not run on the inputs of the workload 'my-images'"),
])
def test_optimize_checks_a_callables_data_before_the_search(tmp_path, data, error, words):
    from edgeslim.optimize import optimize

    run = tmp_path / "never" / "run"
    with pytest.raises(error) as info:
        optimize(f"{HERE}:mlp", data=data, max_drop=0.01, out=tmp_path / "x.eslim",
                 report_dir=run)
    assert words in str(info.value)
    assert not run.exists() and not (tmp_path / "x.eslim").exists()


def test_optimize_searches_on_a_callables_data(tmp_path):
    """--data takes the callable too; the chosen bundle is measured on its metric."""
    out = tmp_path / "best.eslim"
    rc = main(["optimize", f"{HERE}:mlp", "--data", f"{HERE}:digits_top2", "--max-drop", "0.05",
               "--time-budget", "10s", "-o", str(out), "-q"])
    assert rc in (0, 3)
    metrics = _manifest(out)["metrics"]
    assert "top2_accuracy" in metrics and "accuracy" not in metrics


def test_bench_against_original_rebuilds_a_callables_data(tmp_path):
    """bench --against original reads the data from the bundle's recipe, callable included."""
    from edgeslim.benchmark import bench_bundle

    out = tmp_path / "mine.eslim"
    recipe = _recipe(tmp_path, f"{HERE}:agreement")
    assert main(["compress", f"{HERE}:mlp", "--recipe", str(recipe), "-o", str(out),
                 "-q"]) == 0
    rows = bench_bundle(out, threads=1, batch=8, repeats=5, against_original=True)
    assert [r.variant.split(" (")[0] for r in rows][1:] == [
        "original PyTorch eager", "original onnxruntime fp32"]


def test_the_docs_example_runs_as_written(tmp_path, monkeypatch):
    """docs/recipes.md, "Data of your own": its module and recipe, run by the command it
    gives, reach the accuracy it says."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "recipes.md").read_text()
    section = text.split("## Data of your own", 1)[1].split("\n## ", 1)[0]
    module = re.search(r"```python\n# mydata.py\n(.*?)```", section, re.S).group(1)
    recipe = re.search(r"```yaml\n# mine.yaml\n(.*?)```", section, re.S).group(1)
    command = re.search(r"PYTHONPATH=\. edgeslim (compress .*)\n", section).group(1)
    (tmp_path / "mydata.py").write_text(module)
    (tmp_path / "mine.yaml").write_text(recipe)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main([*command.split(), "-q"]) == 0
    metrics = _manifest(tmp_path / "mine.eslim")["metrics"]
    assert metrics["accuracy"] >= 0.94 and metrics["original_accuracy"] < 0.2
