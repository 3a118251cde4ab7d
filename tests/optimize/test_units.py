"""Fast checks of the search's parts: durations, budgets, keys, recipes, store, selection."""

from __future__ import annotations

import re
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeslim.errors import ConfigError
from edgeslim.optimize import Budget, Candidate, ResultStore, parse_duration
from edgeslim.optimize.select import judge, pareto_front, pick
from edgeslim.optimize.space import candidate_key


@pytest.mark.parametrize("text, seconds", [("10m", 600), ("90s", 90), ("90", 90),
                                           ("1h30m", 5400), ("1m30s", 90), ("0.5m", 30),
                                           (45, 45)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "10x", "-5", "0s", "m"])
def test_parse_duration_rejects(text):
    with pytest.raises(ConfigError, match="time budget"):
        parse_duration(text)


@pytest.mark.parametrize("kwargs, word", [({"max_drop": 1.5}, "max_drop"),
                                          ({"max_drop": -0.1}, "max_drop"),
                                          ({"max_drop": 0.01, "size_mb": 0}, "size_mb"),
                                          ({"max_drop": 0.01, "latency_ms": -1}, "latency_ms"),
                                          ({"max_drop": 0.01, "size_mb": float("inf")},
                                           "size_mb"),
                                          ({"max_drop": 0.01, "latency_ms": float("nan")},
                                           "latency_ms")])
def test_budget_rejects(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        Budget(**kwargs)


@pytest.mark.parametrize("model, kwargs, word", [
    ("nosuch-model", {}, "optimize takes a zoo name"),
    ("digits-mlp", {"objective": "speed"}, "objective"),
    ("digits-mlp", {"time_budget": "ten minutes"}, "time budget"),
    ("no_such_pkg.models:build", {}, "No data is known for model 'build': give --data "
                                     "(Python: data=), one of 'digits', 'photos', 'sentences', "
                                     "or 'package.module:callable' returning a Workload"),
    ("digits-mlp", {"data": "imagenet"}, "The 'data' parameter of optimize must be one of "
                                         "'digits', 'photos', 'sentences', or "
                                         "'package.module:callable' returning a Workload. Got "
                                         "'imagenet'"),
    ("digits-mlp", {"data": "photos"}, "'digits-mlp' takes its own data ('digits'); --data"),
])
def test_refused_input_leaves_no_report_folder(tmp_path, model, kwargs, word):
    from edgeslim.errors import EdgeslimError
    from edgeslim.optimize import optimize

    run = tmp_path / "never" / "run"
    with pytest.raises(EdgeslimError, match=re.escape(word)):
        optimize(model, max_drop=0.01, out=tmp_path / "x.eslim", report_dir=run, **kwargs)
    assert not run.exists() and not (tmp_path / "never").exists()


def test_data_that_does_not_fit_the_model_is_refused_before_the_search(tmp_path):
    """A workload whose inputs the model does not take failed inside the search, after the
    report folder was made; it is refused first, as compress refuses it."""
    import dataclasses

    from torch import nn

    from edgeslim.optimize import optimize
    from edgeslim.recipe.workload import workload_for

    wl = workload_for("digits-mlp")
    (x,), y = wl.eval_batches[0]
    images = dataclasses.replace(wl, name="images", eval_batches=[((x.reshape(-1, 1, 8, 8),), y)])
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    run = tmp_path / "never" / "run"
    with pytest.raises(ConfigError, match=re.escape(
            "The model does not run on the inputs of the workload 'images' (input [1, 1, 8, 8])")):
        optimize(model, workload=images, max_drop=0.01, out=tmp_path / "x.eslim",
                 report_dir=run)
    assert not run.exists() and not (tmp_path / "x.eslim").exists()


def test_candidate_recipe_and_key():
    c = Candidate(ratio=0.5, distill=True, epochs=4, sparsity=0.7, sparse_epochs=2,
                  format="pack", bits=4)
    names = [s.name for s in c.recipe().steps]
    assert names == ["prune_structured", "distill", "prune", "pack"]
    assert c.label() == "struct0.5+kd4 | sparse0.7 | pack4"
    assert Candidate().label() == "fp32" and Candidate().recipe().steps == []
    # fields that do not matter (epochs without a ratio) do not change the key
    k = candidate_key("m", "digits", Candidate())
    assert k == candidate_key("m", "digits", Candidate(epochs=7, distill=True))
    keys = {candidate_key("m", "digits", x)
            for x in (Candidate(), c, c.with_(bits=5), c.with_(round_to=8))}
    keys.add(candidate_key("other-model", "digits", c))
    assert len(keys) == 5
    assert c.with_(round_to=8).recipe().steps[0].params["round_to"] == 8
    with pytest.raises(ConfigError, match="format"):
        Candidate(format="int3")


def test_store_counts_evaluations_and_survives_reopen(tmp_path):
    path = tmp_path / "s.sqlite"
    with ResultStore(path) as st:
        st.start("k1", "m", {"ratio": 0.5})
        st.finish("k1", {"metric": 0.9}, bundle="b.eslim", seconds=1.0)
        st.start("k2", "m", {"ratio": 0.6})  # interrupted: stays running
        st.set_meta("m", "sensitivity", [{"layer": "fc", "drop@0.5": 0.01}])
    with ResultStore(path) as st:
        assert st.get("k1").status == "done" and st.get("k1").result == {"metric": 0.9}
        assert st.get("k2").status == "running"
        st.start("k2", "m", {"ratio": 0.6})
        st.fail("k2", "boom", seconds=0.1)
        assert st.get("k2").evaluations == 2 and st.get("k2").error == "boom"
        assert [r.key for r in st.candidates("m")] == ["k1", "k2"]
        assert st.get_meta("m", "sensitivity")[0]["layer"] == "fc"
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_store_refuses_garbage(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ConfigError, match="not a usable SQLite"):
        ResultStore(bad)
    with pytest.raises(ConfigError, match="directory"):
        ResultStore(tmp_path)


def _result(metric, lat, thr, size):
    return {"metric": metric, "latency_ms": lat, "throughput": thr, "bundle_bytes": size}


def test_judge_names_failed_constraints_and_scales_by_factor():
    b = Budget(max_drop=0.01, latency_ms=1.0, size_mb=0.1)
    j = judge("k", "c", {}, _result(0.95, 0.6, 1000.0, 200_000), base_metric=0.98, budget=b,
              factor=2.0)
    assert j.latency_ms == pytest.approx(1.2) and j.throughput == pytest.approx(500.0)
    assert j.failed == ["max_drop", "latency_ms", "size_mb"] and not j.meets
    ok = judge("k", "c", {}, _result(0.98, 0.4, 1000.0, 50_000), base_metric=0.98, budget=b,
               factor=2.0)
    assert ok.meets and ok.drop == 0


def test_pick_prefers_feasible_then_closest():
    b = Budget(max_drop=0.01, size_mb=0.1)
    items = [judge(str(i), str(i), {}, r, base_metric=0.98, budget=b, factor=1.0)
             for i, r in enumerate([_result(0.98, 1.0, 100.0, 500_000),    # too big
                                    _result(0.975, 0.5, 900.0, 90_000),    # feasible, fast
                                    _result(0.978, 0.6, 500.0, 80_000),    # feasible
                                    _result(0.90, 0.1, 5000.0, 10_000)])]  # drop too large
    assert pick(items).key == "1"
    assert pick(items, "size").key == "2"
    impossible = Budget(max_drop=0.0, size_mb=0.001)
    again = [judge(j.key, j.label, {}, j.result, base_metric=0.98, budget=impossible,
                   factor=1.0) for j in items]
    closest = pick(again)
    # fewest constraints failed first: only the ones without any drop fail size alone
    assert closest.failed == ["size_mb"] and closest.drop == 0
    assert closest.excess == min(j.excess for j in again if j.failed == ["size_mb"])
    assert min(j.excess for j in again) < closest.excess  # a faster, lossy one is not closer


def test_pick_treats_timing_noise_as_a_tie():
    b = Budget(max_drop=0.01)
    items = [judge(k, k, {}, r, base_metric=0.98, budget=b, factor=1.0)
             for k, r in (("fast-big", _result(0.98, 0.1, 1000.0, 90_000)),
                          ("fast-small", _result(0.975, 0.1, 850.0, 20_000)),
                          ("slow-tiny", _result(0.98, 0.1, 500.0, 5_000)))]
    assert pick(items).key == "fast-small"  # 15% slower is noise; 50% is not
    assert pick(items, tolerance=0.0).key == "fast-big"
    assert pick(items, "size").key == "slow-tiny"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 5), st.integers(1, 5)),
                min_size=1, max_size=12))
def test_pareto_front_matches_brute_force(points):
    b = Budget(max_drop=0.5)
    items = [judge(str(i), str(i), {}, _result(m / 10, lat, 1.0, s * 1e5), base_metric=1.0,
                   budget=b, factor=1.0) for i, (m, lat, s) in enumerate(points)]
    front = {j.key for j in pareto_front(items)}

    def dominates(p, q):
        return p[0] >= q[0] and p[1] <= q[1] and p[2] <= q[2] and p != q

    expected = {str(i) for i, p in enumerate(points)
                if not any(dominates(q, p) for q in points)}
    assert front == expected
    assert all(j.pareto == (j.key in front) for j in items)


def test_auto_batch_keeps_a_timed_run_short():
    from edgeslim.optimize.search import auto_batch

    assert auto_batch(0.04) == 256  # digits-cnn
    assert auto_batch(13.0) == 8  # efficientnet-lite0
    assert auto_batch(3.0) == 64
    assert all(8 <= auto_batch(ms) <= 256 for ms in (1e-3, 0.5, 7.0, 1e4))


def test_sensitivity_plot_prefers_ptq_report(tmp_path):
    from edgeslim.optimize.plots import _ptq_sensitivity, plot_sensitivity

    b = Budget(max_drop=0.01)
    result = {**_result(0.98, 0.1, 100.0, 1000), "steps": [
        {"step": "ptq", "report": {"sensitivity": {"nodes": [
            {"node": "Conv_3", "op_type": "Conv", "score": 0.97, "gain": 0.02},
            {"node": "Gemm_9", "op_type": "Gemm", "score": 0.96, "gain": 0.01}]}}}]}
    data = {"judged": [judge("k", "c", {}, result, base_metric=0.98, budget=b, factor=1.0)],
            "sensitivity": [], "settings": {"metric_name": "accuracy"}}
    assert _ptq_sensitivity(data) == [("Conv_3", 0.02), ("Gemm_9", 0.01)]
    assert plot_sensitivity(data, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data["judged"][0].result["steps"] = []
    assert not plot_sensitivity(data, tmp_path / "none.png")  # nothing measured: no image


def test_a_runs_report_holds_only_the_candidates_finished_by_its_end(tmp_path, monkeypatch):
    """A later run adds candidates to the shared store; the first run's report (rebuilt after)
    must not list them."""
    import time as _time

    from edgeslim.optimize.report import load_run
    from edgeslim.optimize.space import Candidate

    settings = {"metric_name": "accuracy", "threads": 2, "throughput_batch": 64,
                "budget": {"max_drop": 0.01}, "factor": 1.0, "objective": "throughput"}
    clock = iter(range(1000, 2000, 10))
    monkeypatch.setattr(_time, "time", lambda: float(next(clock)))
    bundle = tmp_path / "b.eslim"
    bundle.write_bytes(b"x")

    def finish(st, config, metric):
        key = candidate_key("m", "digits", Candidate(**config))
        st.start(key, "m", Candidate(**config).config())
        st.finish(key, {"metric": metric, "metric_name": "accuracy", "threads": 2, "batch": 64,
                        "latency_ms": 1.0, "throughput": 100.0, "bundle_bytes": 1000},
                  bundle=str(bundle), seconds=1.0)

    path = tmp_path / "s.sqlite"
    with ResultStore(path) as st:
        run1 = st.begin_run("m", "m", settings)
        finish(st, {}, 0.98)
        finish(st, {"ratio": 0.5}, 0.975)
        st.end_run(run1, {"best": "x", "bundle": str(bundle)})
        run2 = st.begin_run("m", "m", settings)
        finish(st, {"ratio": 0.8}, 0.97)
        st.end_run(run2, {"best": "y", "bundle": str(bundle)})
    first = {j.label for j in load_run(path, run1)["judged"]}
    latest = {j.label for j in load_run(path, run2)["judged"]}
    assert first == {"fp32", Candidate(ratio=0.5).label()}
    assert latest == first | {Candidate(ratio=0.8).label()}


def test_the_plan_builds_no_structured_candidate_the_pruner_refuses(tmp_path, monkeypatch,
                                                                     digits_cnn):
    """At ratio 0.8 digits-cnn's conv1 keeps 6 of its 32 channels, fewer than round_to=8:
    the plan built that candidate anyway, and the report listed it as failed."""
    import torch

    from edgeslim.compress.structured import prune_structured
    from edgeslim.optimize.search import Evaluated, Search
    from edgeslim.recipe.workload import workload_for

    built = []

    def compute(self, c, key, est):  # every candidate keeps the baseline's accuracy
        built.append(c)
        ev = Evaluated(c, key, {"metric": 0.98}, str(tmp_path / "none.eslim"))
        self.evaluated.append(ev)
        self.base = self.base or ev
        return ev

    monkeypatch.setattr(Search, "_compute", compute)
    with ResultStore(tmp_path / "s.sqlite") as st:
        st.set_meta("m", "sensitivity", [])  # (no sensitivity pass)
        search = Search(digits_cnn, workload_for("digits-cnn"),
                        Budget(max_drop=0.01, time_s=3600), st, tmp_path, "m", "digits-cnn")
        search.run()
    planned = {(c.ratio, c.round_to) for c in built if c.ratio}
    assert (0.9, None) in planned and (0.7, 8) in planned  # the climb and rounding ran
    for ratio, round_to in planned:  # the pruner accepts every one built
        prune_structured(digits_cnn, torch.zeros(1, 64), ratio=ratio, round_to=round_to,
                         progress=False)
    refused = {(c.ratio, c.round_to): why for c, why in search.skipped}
    assert set(refused) == {(0.8, 8), (0.9, 8)}
    assert refused[0.8, 8] == (
        "not built, prune_structured refuses it: ratio=0.8 would leave no channel in conv1 "
        "(32): round_to=8 is more than they keep; use a smaller round_to or ratio, or add them "
        "to ignored_layers.")
