"""optimize, report, device-profile and demo outputs: a bad place to write is refused with one
line and exit 2, before the work where that is cheap, and nothing there is lost.

A folder cannot be made unwritable for root with chmod, so an unwritable place is a regular
file where a folder should be, or ``tempfile.mkstemp`` raising ``PermissionError`` for the
target folder only.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from edgeslim.cli import main
from edgeslim.errors import ConfigError
from tests._errors import one_line_error


@pytest.fixture()
def no_measuring(monkeypatch):
    """Fail the test if the reference model is measured: refusals must come before that."""
    import edgeslim.optimize.profile as profile

    def measure(*args, **kwargs):
        raise AssertionError("measured the reference before checking the output path")

    monkeypatch.setattr(profile, "measure_reference", measure)


@pytest.fixture()
def blocker(tmp_path):
    path = tmp_path / "afile"
    path.write_text("keep me")
    return path


# --------------------------------------------------------------------------- device-profile


def test_device_profile_under_a_file(blocker, no_measuring, capsys):
    assert main(["device-profile", "--reference", "fleet-reference",
                 "-o", str(blocker / "p.json")]) == 2
    one_line_error(capsys, "Cannot write the device profile",
                    f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "keep me"


def test_device_profile_onto_a_folder(tmp_path, no_measuring, capsys):
    folder = tmp_path / "profiles"
    folder.mkdir()
    assert main(["device-profile", "--reference", "fleet-reference", "-o", str(folder)]) == 2
    one_line_error(capsys, f"{folder} is a folder, not a file")
    assert os.listdir(folder) == []


def test_device_profile_keeps_an_existing_file_unless_force(tmp_path, capsys, monkeypatch):
    from edgeslim.optimize import load_profile

    target = tmp_path / "model.eslim"
    target.write_bytes(b"PK\x03\x04 a bundle, not a profile")
    with monkeypatch.context() as m:
        m.setattr("edgeslim.optimize.profile.measure_reference",
                  lambda *a, **k: pytest.fail("measured before refusing the existing file"))
        assert main(["device-profile", "--reference", "fleet-reference",
                     "-o", str(target)]) == 2
    one_line_error(capsys, str(target), "--force")
    assert target.read_bytes() == b"PK\x03\x04 a bundle, not a profile"
    assert sorted(os.listdir(tmp_path)) == ["model.eslim"]
    assert "--force" in _help(capsys, "device-profile")

    assert main(["device-profile", "--reference", "fleet-reference", "--name", "here",
                 "-o", str(target), "--force"]) == 0
    assert load_profile(target).name == "here"
    assert json.loads(target.read_text())["reference"]["model"] == "fleet-reference"
    assert sorted(os.listdir(tmp_path)) == ["model.eslim"]


def _help(capsys, verb: str) -> str:
    capsys.readouterr()
    assert main([verb, "--help"]) == 0
    return capsys.readouterr().out


def test_device_profile_write_failure_keeps_the_old_file(tmp_path, monkeypatch, capsys):
    target = tmp_path / "p.json"
    target.write_text("old profile")
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir") or "").resolve() == tmp_path.resolve():
            raise PermissionError(13, "Permission denied", str(tmp_path))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    assert main(["device-profile", "--reference", "fleet-reference",
                 "-o", str(target), "--force"]) == 2
    one_line_error(capsys, f"Cannot write the device profile {target}", "Permission denied")
    assert target.read_text() == "old profile"
    assert os.listdir(tmp_path) == ["p.json"]


def test_a_folder_given_as_device_profile(tmp_path, capsys):
    from edgeslim.optimize import load_profile

    with pytest.raises(ConfigError, match="is a folder, not a file"):
        load_profile(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "nope.json")


# --------------------------------------------------------------------------- optimize


@pytest.fixture()
def no_model_loading(monkeypatch):
    import edgeslim.zoo

    def load_model(*args, **kwargs):
        raise AssertionError("loaded the model before checking the output paths")

    monkeypatch.setattr(edgeslim.zoo, "load_model", load_model)


def test_optimize_report_is_a_file(tmp_path, blocker, no_model_loading, capsys):
    out = tmp_path / "o.eslim"
    assert main(["optimize", "digits-cnn", "--max-drop", "0.01", "--report", str(blocker),
                 "-o", str(out), "-q"]) == 2
    one_line_error(capsys, f"--report {blocker} is a file, not a folder")
    assert blocker.read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_optimize_outputs_under_a_file(tmp_path, blocker, no_model_loading, capsys):
    assert main(["optimize", "digits-cnn", "--max-drop", "0.01", "--report",
                 str(blocker / "run"), "-o", str(tmp_path / "o.eslim"), "-q"]) == 2
    one_line_error(capsys, f"--report {blocker / 'run'}", f"{blocker} is a file, not a folder")
    assert main(["optimize", "digits-cnn", "--max-drop", "0.01",
                 "-o", str(blocker / "o.eslim"), "-q"]) == 2
    one_line_error(capsys, f"-o {blocker / 'o.eslim'}", f"{blocker} is a file, not a folder")
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_optimize_api_refuses_a_file_as_report_dir(tmp_path, blocker, no_model_loading):
    from edgeslim.optimize import optimize

    with pytest.raises(ConfigError, match="is a file, not a folder"):
        optimize("digits-cnn", max_drop=0.01, out=tmp_path / "o.eslim", report_dir=blocker)
    assert blocker.read_text() == "keep me"


# --------------------------------------------------------------------------- report and demo


def _small_store(run: Path) -> None:
    """A real store holding one finished run with one candidate (the fp32 baseline)."""
    from edgeslim.optimize.space import Candidate
    from edgeslim.optimize.store import ResultStore

    run.mkdir(parents=True)
    bundle = run / "c.eslim"
    bundle.write_bytes(b"stands in for a bundle")
    settings = {"model": "digits-cnn", "label": "digits-cnn",
                "budget": {"max_drop": 0.01, "latency_ms": None, "size_mb": None,
                           "time_s": 60.0},
                "objective": "throughput", "threads": 2, "throughput_batch": 256,
                "workload": "digits", "metric_name": "accuracy", "factor": 1.0,
                "profile": None, "reference_here_ms": None, "out": "x.eslim"}
    with ResultStore(run / "search.sqlite") as st:
        run_id = st.begin_run("digits-cnn", "h", settings)
        st.start("k", "h", Candidate().config())
        st.finish("k", {"metric": 0.98, "latency_ms": 0.1, "throughput": 1000.0,
                        "bundle_bytes": 1000, "metric_name": "accuracy", "threads": 2,
                        "batch": 256}, bundle=str(bundle), seconds=1.0)
        st.end_run(run_id, {"best": "k", "budget_met": True, "failed": [],
                            "bundle": str(bundle), "throughput_batch": 256})


def test_report_of_a_file(blocker, capsys):
    assert main(["report", str(blocker)]) == 2
    one_line_error(capsys, f"{blocker} is a file, not a report folder")
    assert blocker.read_text() == "keep me"


def test_report_that_cannot_be_written(tmp_path, capsys):
    run = tmp_path / "run"
    _small_store(run)
    (run / "pareto.png").mkdir()  # the first plot cannot be written
    assert main(["report", str(run)]) == 2
    one_line_error(capsys, f"Cannot write the report in {run}", "pareto.png is a folder")
    assert sorted(os.listdir(run)) == ["c.eslim", "pareto.png", "search.sqlite"]
    (run / "pareto.png").rmdir()
    assert main(["report", str(run)]) == 0
    assert (run / "index.html").is_file() and (run / "pareto.png").is_file()


def test_demo_out_dir_is_a_file(blocker, capsys):
    assert main(["demo", "--out-dir", str(blocker)]) == 2
    one_line_error(capsys, f"--out-dir {blocker} is a file, not a folder")
    assert main(["demo", "--out-dir", str(blocker / "sub")]) == 2
    one_line_error(capsys, f"--out-dir {blocker / 'sub'}", f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "keep me"


def test_a_store_made_with_relative_paths_answers_from_another_directory(tmp_path, monkeypatch,
                                                                         capsys):
    """A run made with relative paths, reported (and resumed) from another working directory:
    its candidates' bundles are found, not lost (the report read 'No candidate finished.')."""
    from edgeslim.optimize.space import Candidate
    from edgeslim.optimize.store import ResultStore

    first, other = tmp_path / "first", tmp_path / "other"
    first.mkdir()
    other.mkdir()
    monkeypatch.chdir(first)
    _small_store(Path("run"))  # the bundle path given to the store: run/c.eslim
    monkeypatch.chdir(other)
    with ResultStore(Path("../first/run/search.sqlite")) as st:
        row = st.get("k")  # what a resumed run reads back instead of rebuilding
        assert Path(row.bundle).is_file() and Candidate(**row.config) == Candidate()
    assert main(["report", "../first/run"]) == 0
    html = (first / "run" / "index.html").read_text()
    assert "No candidate finished" not in html and "fp32" in capsys.readouterr().out


def test_a_store_written_with_cwd_relative_paths_still_answers_there(tmp_path, monkeypatch):
    """Stores written before bundle paths were kept absolute hold paths relative to the run's
    working directory; they resolve from there, and from elsewhere by the store's folder."""
    import sqlite3

    from edgeslim.optimize.store import ResultStore

    monkeypatch.chdir(tmp_path)
    _small_store(Path("run"))
    (tmp_path / "run" / "candidates").mkdir()
    Path("run/c.eslim").rename("run/candidates/c.eslim")  # where optimize puts candidates
    with sqlite3.connect("run/search.sqlite") as db:
        db.execute("UPDATE candidates SET bundle='run/candidates/c.eslim'")
    with ResultStore(Path("run/search.sqlite")) as st:
        assert st.get("k").bundle == "run/candidates/c.eslim"
        assert Path(st.get("k").bundle).is_file()
    # and from another directory, by the store's own candidates folder (it once resolved to
    # run/run/candidates/c.eslim, which does not exist)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with ResultStore(Path("../run/search.sqlite")) as st:
        assert Path(st.get("k").bundle).resolve() == tmp_path / "run" / "candidates" / "c.eslim"


def test_optimize_api_checks_the_bundle_path_and_key_before_the_search(tmp_path, blocker,
                                                                       no_model_loading):
    """out= and sign_key= are checked before the model is loaded (a folder as out=, or a
    missing key, failed only after the whole search)."""
    from edgeslim.errors import EdgeslimError
    from edgeslim.optimize import optimize

    run = tmp_path / "run"
    for kwargs, words in (({"out": tmp_path}, f"{tmp_path} is a folder, not a file"),
                          ({"out": blocker / "x.eslim"}, f"{blocker} is a file, not a folder"),
                          ({"out": tmp_path / "o.eslim", "sign_key": tmp_path / "no.key"},
                           "no.key")):
        with pytest.raises(EdgeslimError, match=words):
            optimize("digits-mlp", max_drop=0.01, report_dir=run, **kwargs)
    assert not run.exists()


@pytest.mark.slow
def test_a_run_that_fails_after_the_search_says_so_in_the_store(tmp_path):
    """When writing the bundle fails after the search (here: a folder appears where the
    bundle goes), the run's row records the error instead of no outcome at all."""
    from edgeslim.optimize import optimize
    from edgeslim.optimize.store import ResultStore

    out = tmp_path / "best.eslim"

    def on_event(kind, **info):
        if kind == "phase" and info["name"] == "writing the bundle":
            out.mkdir()

    from edgeslim.errors import BundleError

    with pytest.raises(BundleError, match="is a folder, not a file"):
        optimize("digits-mlp", max_drop=0.01, time_budget="3s", out=out,
                 report_dir=tmp_path / "run", on_event=on_event)
    with ResultStore(tmp_path / "run" / "search.sqlite") as st:
        outcome = st.runs()[-1]["outcome"]
    assert outcome and "best.eslim is a folder, not a file" in outcome["error"]
    assert main(["report", str(tmp_path / "run")]) == 0
    html = (tmp_path / "run" / "index.html").read_text()
    assert "This run failed after the search: no bundle was written" in html


@pytest.mark.slow
def test_a_candidate_that_failed_is_tried_again_by_the_next_run(tmp_path):
    """A file where the candidates' folder goes makes every candidate fail; once it is gone,
    the next run builds them (a failed row was skipped on every later run, for ever)."""
    import sqlite3

    from edgeslim.optimize import optimize

    run = tmp_path / "run"
    run.mkdir()
    (run / "candidates").write_text("in the way")
    kwargs = {"max_drop": 0.01, "time_budget": "3s", "out": tmp_path / "best.eslim",
              "report_dir": run, "report": False}
    with pytest.raises(ConfigError, match="No candidate could be built"):
        optimize("digits-mlp", **kwargs)
    with sqlite3.connect(run / "search.sqlite") as db:
        failed = db.execute("SELECT key, error FROM candidates WHERE status='failed'").fetchall()
    assert failed and all("candidates" in error for _, error in failed)
    (run / "candidates").unlink()
    result = optimize("digits-mlp", **kwargs)
    assert result.bundle.is_file()
    with sqlite3.connect(run / "search.sqlite") as db:
        rows = dict(db.execute("SELECT key, status FROM candidates").fetchall())
    assert rows[failed[0][0]] == "done"
