"""``optimize``: from a budget to the best bundle (or the closest one, clearly marked)."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeslim._validate import check_int_range
from edgeslim.errors import ConfigError, ModelError
from edgeslim.optimize.profile import DeviceProfile, load_profile, measure_reference
from edgeslim.optimize.select import OBJECTIVES, Budget, Judged, judge, pareto_front, pick
from edgeslim.optimize.store import ResultStore

__all__ = ["OptimizeResult", "judge_run", "optimize", "parse_duration"]

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``"10m"``, ``"90s"``, ``"1h30m"``, ``"1m30s"`` or a plain number of seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = _DURATION.match(str(text).strip().lower())
        if not m or not any(m.groups()):
            raise ConfigError(f"The time budget must look like '10m', '90s', '1h30m' or a "
                              f"number of seconds. Got {text!r} instead.")
        h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        seconds = 3600 * h + 60 * mi + s
    if not seconds > 0:
        raise ConfigError(f"The time budget must be more than 0 seconds. Got {text!r} instead.")
    return seconds


@dataclass
class OptimizeResult:
    """What ``optimize`` chose and why. ``exit_code`` is 0 when the budget was met, else 3."""

    best: Judged
    baseline: Judged
    budget: Budget
    budget_met: bool
    failed: list[str]
    bundle: Path
    report: Path | None
    candidates: list[Judged]
    pareto: list[Judged]
    run_dir: Path
    store: Path
    factor: float = 1.0
    profile: DeviceProfile | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.budget_met else 3


def _label(model: Any, name: str | None) -> str:
    """The model's name in the bundles (with "-opt" added: 60 characters at most)."""
    from edgeslim.bundle.manifest import model_name_for, safe_model_name

    return safe_model_name(name, 60) if name else model_name_for(model, 60)


def _check_report_dir(run_dir: Path) -> None:
    """Refuse a report folder that cannot be made, before the search (not after it)."""
    from edgeslim._atomic import output_problem

    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"The report folder {run_dir} (report_dir; CLI: --report) is a file, "
                          "not a folder.")
    problem = output_problem(run_dir, folder=True)
    if problem:
        raise ConfigError(f"Cannot make the report folder {run_dir} (report_dir; CLI: "
                          f"--report): {problem}.")


def _check_out(out: Any) -> None:
    """Refuse a bundle path that cannot be written, before the search (not after it)."""
    from edgeslim._atomic import output_problem
    from edgeslim._validate import check_path

    problem = output_problem(check_path(out, "out", "optimize"))
    if problem:
        raise ConfigError(f"Cannot write the bundle {out!s} (out; CLI: -o): {problem}.")


def optimize(
    model: Any,
    *,
    max_drop: float,
    out: str | os.PathLike[str],
    report_dir: str | os.PathLike[str],
    latency_ms: float | None = None,
    size_mb: float | None = None,
    time_budget: str | float = "10m",
    device_profile: str | os.PathLike[str] | DeviceProfile | None = None,
    store: str | os.PathLike[str] | None = None,
    threads: int = 2,
    objective: str = "throughput",
    workload: Any = None,
    data: str | None = None,
    name: str | None = None,
    sign_key: str | os.PathLike[str] | None = None,
    throughput_batch: int | None = None,
    seed: int = 0,
    report: bool = True,
    on_event: Any = None,
    clock_start: float | None = None,
) -> OptimizeResult:
    """Search the compression space of ``model`` for the best bundle within a budget.

    ``model``: zoo name, ``module:callable`` or ``nn.Module`` (not an ``.onnx`` file: the search
    prunes and fine-tunes in torch). ``data`` (``digits``, ``photos``, ``sentences``, or
    ``'package.module:callable'`` returning a ``Workload``, see ``workload_for``) is the
    workload a ``module:callable`` or ``nn.Module`` is judged on (a zoo model brings its own);
    or pass a ``Workload`` as ``workload``. ``max_drop``: largest allowed metric drop from the
    fp32 export (0.01 = one point). ``latency_ms`` (batch 1) and ``size_mb`` (the .eslim file
    as written, 10^6 bytes) are optional ceilings, judged on the device of ``device_profile``
    (this machine when None). ``time_budget``: ``"10m"``, ``"90s"``... for the whole search.
    ``throughput_batch`` (default: 256 for small models, down to 8 for large ones, from the fp32
    latency) is the batch throughput is timed at.
    Results are kept in ``store`` (default
    ``report_dir/search.sqlite``) so a second call resumes. Writes the chosen bundle to
    ``out`` and, with ``report``, ``report_dir/index.html``. The time budget counts from
    ``clock_start`` (a ``time.monotonic()`` value; default: the call).
    """
    started = time.monotonic() if clock_start is None else clock_start
    import torch

    from edgeslim.optimize.search import Search
    from edgeslim.optimize.space import model_hash
    from edgeslim.recipe.workload import (
        DATA_ACCEPTED,
        check_data,
        check_torch_fit,
        check_zoo_data,
        workload_for,
    )
    from edgeslim.zoo import ZOO, load_model

    budget = Budget(max_drop=max_drop, latency_ms=latency_ms, size_mb=size_mb,
                    time_s=parse_duration(time_budget))
    if objective not in OBJECTIVES:
        raise ConfigError(f"Unknown objective {objective!r}. Allowed: {', '.join(OBJECTIVES)}.")
    threads = check_int_range(threads, "threads", "optimize", 1, 256)
    if throughput_batch is not None:
        throughput_batch = check_int_range(throughput_batch, "throughput_batch", "optimize",
                                           1, 65536)
    profile = (device_profile if isinstance(device_profile, DeviceProfile) or device_profile
               is None else load_profile(device_profile))
    run_dir = Path(report_dir)
    _check_report_dir(run_dir)
    _check_out(out)
    if sign_key is not None:  # a bad key fails now, not after the search
        from edgeslim.bundle.signing import load_private_key

        load_private_key(sign_key)
    store_path = Path(store) if store is not None else run_dir / "search.sqlite"
    torch.set_num_threads(threads)

    if data is not None:
        check_data(data, "data", "optimize")
    if isinstance(model, str) and not model.endswith(".onnx") and ":" not in model \
            and model not in ZOO:
        raise ModelError(f"Unknown model {model!r}. optimize takes a zoo name "
                         f"({', '.join(ZOO)}), 'package.module:callable' returning an "
                         "nn.Module, or an nn.Module (it prunes and fine-tunes, so no .onnx).")
    check_zoo_data(model if isinstance(model, str) else None, data, "--data (data=)")
    if workload is None and data is None and not (isinstance(model, str) and model in ZOO) \
            and not (isinstance(model, str) and model.endswith(".onnx")):
        raise ConfigError(f"No data is known for model {_label(model, None)!r}: give --data "
                          f"(Python: data=), {DATA_ACCEPTED}; or pass a Workload as "
                          f"workload=.")
    resolved = load_model(model)
    if isinstance(resolved, Path):
        raise ConfigError(f"optimize needs a torch model to prune and fine-tune; "
                          f"{str(resolved)!r} is an ONNX file. Give a zoo name, "
                          "'module:callable' or an nn.Module.")
    label = _label(model, name)
    wl = workload or workload_for(model if isinstance(model, str) else None, data,
                                  reference=resolved)
    if not (isinstance(model, str) and model in ZOO):  # data that does not fit fails now
        check_torch_fit(resolved, wl)
    mhash = model_hash(resolved)
    reference_here = None
    factor = 1.0
    if profile is not None:
        if profile.reference_latency_ms is not None:
            reference_here = measure_reference(profile.reference_model, threads)
        factor = profile.factor(reference_here, threads)
    events = on_event or (lambda *a, **k: None)
    settings = {"model": str(model) if isinstance(model, (str, Path)) else label,
                "label": label, "budget": budget.to_dict(), "objective": objective,
                "threads": threads, "throughput_batch": throughput_batch,
                "workload": wl.name, "metric_name": wl.metric, "factor": factor,
                "profile": profile.to_dict() if profile else None,
                "reference_here_ms": reference_here, "out": str(Path(out))}
    run_dir.mkdir(parents=True, exist_ok=True)  # only now that every input was accepted
    with ResultStore(store_path) as st:
        run_id = st.begin_run(settings["model"], mhash, settings)
        search = Search(resolved, wl, budget, st, run_dir, mhash, label, threads=threads,
                        throughput_batch=throughput_batch, seed=seed, started=started,
                        on_event=events)
        try:
            search.run()
        except KeyboardInterrupt:
            st.end_run(run_id, {"interrupted": True})
            raise
        events("phase", name="writing the bundle")
        overhead = 0.0
        try:
            for _ in range(3):
                judged, base = judge_run(st, mhash, settings, batch=search.throughput_batch,
                                         size_overhead_mb=overhead)
                best = pick(judged, objective)
                if best is None or base is None:  # pragma: no cover - the baseline exists
                    raise ConfigError("No candidate could be built; see the store for errors.")
                bundle = write_best(best, base, budget, settings, Path(out), sign_key=sign_key)
                # The written file carries the verdict and maybe a signature, so it is a
                # little larger than the candidate judged: when that crosses the size
                # ceiling, judge every candidate again with that much more, so the verdict
                # holds for the file.
                written = Path(bundle).stat().st_size / 1e6
                if budget.size_mb is None or "size_mb" in best.failed \
                        or written <= budget.size_mb:
                    break
                # (+64 bytes: another candidate's verdict may take a few more digits)
                overhead = max(overhead, written - (best.size_mb - overhead) + 64e-6)
        except KeyboardInterrupt:
            st.end_run(run_id, {"interrupted": True})
            raise
        except Exception as exc:  # the run's row says why no bundle was written
            st.end_run(run_id, {"error": f"{type(exc).__name__}: {exc}",
                                "elapsed_s": time.monotonic() - started,
                                "throughput_batch": search.throughput_batch})
            raise
        skipped = [f"{c.label()}: {why}" for c, why in search.skipped]
        outcome = {"best": best.key, "budget_met": best.meets, "failed": best.failed,
                   "size_overhead_mb": overhead,
                   "bundle": str(Path(bundle).resolve()), "skipped": skipped,
                   "failed_candidates": [f"{c.label()}: {e}" for c, e in search.failed],
                   "elapsed_s": time.monotonic() - started,
                   "throughput_batch": search.throughput_batch}
        st.end_run(run_id, outcome)
    page = None
    if report:
        from edgeslim.optimize.report import write_report

        page = write_report(run_dir, store=store_path)
    return OptimizeResult(best=best, baseline=base, budget=budget, budget_met=best.meets,
                          failed=list(best.failed), bundle=bundle, report=page,
                          candidates=judged, pareto=[j for j in judged if j.pareto],
                          run_dir=run_dir, store=store_path, factor=factor, profile=profile,
                          skipped=skipped)


def judge_run(st: ResultStore, mhash: str, settings: dict[str, Any], *,
              batch: int | None = None, until: float | None = None,
              size_overhead_mb: float = 0.0) -> tuple[list[Judged], Judged | None]:
    """Every finished candidate of this model in the store measured as this run measures
    (same threads, same throughput ``batch``), judged under ``settings``; with ``until`` (a
    run's end, ``time.time()``), only those finished by then (not a later run's).
    ``size_overhead_mb``: see ``select.judge``."""
    from edgeslim.optimize.space import Candidate

    rows = [r for r in st.candidates(mhash, status="done")
            if (until is None or r.finished is None or r.finished <= until)
            and r.result and r.result.get("metric_name") == settings["metric_name"]
            and r.result.get("threads") == settings["threads"]
            and (batch is None or r.result.get("batch") == batch)
            and r.bundle and Path(r.bundle).is_file()]
    base_row = next((r for r in rows if r.config == Candidate().config()), None)
    if base_row is None or base_row.result is None:
        return [], None
    budget = Budget(**settings["budget"])
    base_metric = float(base_row.result["metric"])
    judged = []
    for r in rows:
        assert r.result is not None
        try:
            label = Candidate(**r.config).label()
        except (TypeError, ConfigError):
            label = str(r.config)
        judged.append(judge(r.key, label, r.config, r.result, base_metric=base_metric,
                            budget=budget, factor=float(settings["factor"]), bundle=r.bundle,
                            size_overhead_mb=size_overhead_mb))
    pareto_front(judged)
    base = next(j for j in judged if j.key == base_row.key)
    return judged, base


def write_best(best: Judged, base: Judged, budget: Budget, settings: dict[str, Any],
               out: Path, *, sign_key: Any = None) -> Path:
    """Copy the chosen candidate's bundle to ``out`` with the budget verdict in its manifest."""
    from edgeslim.bundle import read_bundle, write_bundle

    src = read_bundle(Path(best.bundle or ""))
    manifest = {k: v for k, v in src.manifest.items()
                if k not in ("model", "files", "format", "created")}
    metric_name = settings["metric_name"]
    metrics = dict(manifest.get("metrics", {}))
    metrics.update({
        "budget_met": best.meets,
        "budget_failed": list(best.failed),
        f"baseline_{metric_name}": base.metric,
        "metric_drop": best.drop,
        "max_drop": budget.max_drop,
        "latency_ms_device": best.latency_ms,
        "throughput_device": best.throughput,
        "size_mb": best.size_mb,
    })
    if budget.latency_ms is not None:
        metrics["latency_ms_limit"] = budget.latency_ms
    if budget.size_mb is not None:
        metrics["size_mb_limit"] = budget.size_mb
    manifest["metrics"] = metrics
    provenance = dict(manifest.get("provenance", {}))
    provenance.update({
        "created_by": "edgeslim optimize",
        "source": settings["model"],
        "optimize": {"candidate": best.config, "label": best.label,
                     "objective": settings["objective"], "budget": budget.to_dict(),
                     "device": (settings.get("profile") or {}).get("name", "this machine"),
                     "latency_factor": settings["factor"]},
    })
    manifest["provenance"] = provenance
    compression = src.entries.get("model.onnx")
    method = compression.compression if compression else "deflate"
    return write_bundle(out, model_onnx=src.model_bytes, manifest=manifest,
                        extra_files=src.files, sign_key=sign_key,
                        compression=method if method in ("deflate", "lzma", "stored")
                        else "deflate")
