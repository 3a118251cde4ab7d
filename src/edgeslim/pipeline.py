"""``compress``: model in, signed ``.eslim`` bundle out, measured at every step.

torch steps of the recipe (prune, distill, QAT...) -> ONNX export (BatchNorm folded, checked
against onnxruntime) -> ONNX steps (post-training int8, packing) -> evaluation on onnxruntime
(metric, size, latency) -> bundle (manifest with I/O, preprocessing, metrics, every step
applied, a probe for health checks, provenance) -> optional Ed25519 signature.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim._ort import ort_session
from edgeslim._validate import check_path
from edgeslim.errors import ConfigError, ModelError
from edgeslim.recipe.core import Recipe
from edgeslim.recipe.measure import StepMetrics
from edgeslim.recipe.steps import check_training_data, ptq_overrides
from edgeslim.recipe.workload import (
    DATA_ACCEPTED,
    Workload,
    check_torch_fit,
    check_zoo_data,
    workload_for,
)

__all__ = ["CompressResult", "compress", "onnx_latency_ms"]

# Probes ride inline in manifest.json, which must stay small (1 MiB cap); an image model's
# 150k-float input does not fit, and such bundles carry no probe.
_PROBE_MAX_ELEMENTS = 16_384


@dataclass
class CompressResult:
    """Where the bundle went and what was measured on the way."""

    bundle: Path
    manifest: dict[str, Any]
    rows: list[StepMetrics] = field(default_factory=list)
    onnx_metrics: dict[str, float] = field(default_factory=dict)


def onnx_latency_ms(session: Any, feeds: dict[str, np.ndarray], repeats: int = 50) -> float:
    """Median latency of ``session.run`` on ``feeds`` in milliseconds, after warm-up."""
    for _ in range(5):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compress(
    model: Any,
    *,
    out: str | Path,
    recipe: Recipe | None = None,
    preset: str | None = None,
    workload: Workload | None = None,
    name: str | None = None,
    version: str | None = None,
    sign_key: str | Path | None = None,
    progress: bool = True,
) -> CompressResult:
    """Compress ``model`` (zoo name, ``.onnx`` path, ``module:callable`` or ``nn.Module``).

    Give a ``recipe`` or a ``preset`` (default ``int8``), not both. The bundle is written
    atomically to ``out``; with ``sign_key`` it is signed. ``name`` and ``version`` are the
    model's name and version in the manifest (what a node serves and reports; version "1"
    by default).
    """
    from edgeslim.bundle.manifest import NAME_RE, NAME_RULE, VERSION_RE, model_name_for
    from edgeslim.presets import DEFAULT_PRESET, preset_recipe

    if recipe is not None and preset is not None:
        raise ConfigError("Give either a recipe or a preset, not both.")
    if recipe is not None and not isinstance(recipe, Recipe):
        raise ConfigError(f"The 'recipe' of compress must be a Recipe (from load_recipe or "
                          f"Recipe.from_dict). Got {type(recipe).__name__} instead.")
    check_path(out, "out", "compress")
    if name is not None and (not isinstance(name, str) or not NAME_RE.fullmatch(name)):
        raise ConfigError(f"The model name must be {NAME_RULE}. Got {name!r} instead.")
    if version is not None and (not isinstance(version, str) or not VERSION_RE.fullmatch(version)):
        raise ConfigError(f"The model version must be 1-64 of A-Z a-z 0-9 _ . + -. "
                          f"Got {version!r} instead.")
    from_preset = recipe is None
    if recipe is None:
        recipe = preset_recipe(preset or DEFAULT_PRESET)
    recipe.validate()
    model_name = model if isinstance(model, str) else None
    bundle_name = name or recipe.name or model_name_for(model_name)
    _check_out(out, model)
    if sign_key is not None:  # a bad key fails now, not after the compression
        from edgeslim.bundle.signing import load_private_key

        load_private_key(sign_key)

    check_zoo_data(model_name, recipe.data, "the recipe's data:")

    from edgeslim.zoo import ZOO, load_model

    resolved = load_model(model)
    if isinstance(resolved, Path):
        proto = _load_onnx(resolved)
        if workload is None and recipe.data is None:
            how = ("a preset cannot say which; give a recipe (--recipe) with only ONNX steps "
                   "(ptq, pack) and" if from_preset else "give the recipe")
            raise ConfigError(
                f"The ONNX file {str(resolved)!r} comes with no data to calibrate and evaluate "
                f"it on: {how} a 'data:' key ({DATA_ACCEPTED}).")
    # an ONNX model is judged against its own fp32 outputs, not the zoo model's
    wl = workload or workload_for(model_name, recipe.data, reference=resolved)
    # a workload that does not fit the model fails now, not after the steps
    if isinstance(resolved, Path):
        wl = _fit_onnx(proto, wl, resolved)
    elif model_name not in ZOO:
        check_torch_fit(resolved, wl)
    if not isinstance(resolved, Path):  # a step that trains fails now, not after the others
        check_training_data(recipe.torch_steps, wl)
    report = Path(out).with_name(Path(out).stem + ".ptq-report.json")
    for step in recipe.onnx_steps:  # what depends on the workload fails before any work too
        if step.name == "ptq":
            ptq_overrides(wl, scheme=step.params.get("scheme"),
                          calibration=step.params.get("calibration"))
            _check_report_path(report)
    rows: list[StepMetrics] = []
    log: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgeslim-") as tmp:
        if isinstance(resolved, Path):
            if recipe.torch_steps:
                names = ", ".join(s.name for s in recipe.torch_steps)
                raise ConfigError(
                    f"The model {str(resolved)!r} is an ONNX file; the recipe's torch steps "
                    f"({names}) need a torch model. Use ONNX steps only (ptq, pack)."
                )
            # the model as one file: its weights may sit beside it (external data)
            original_bytes = proto.ByteSize()
        else:
            from edgeslim.export import export_onnx
            from edgeslim.recipe.run import run_recipe

            result = run_recipe(recipe, resolved, wl, progress=progress)
            rows, log = result.rows, result.log
            io = {"input_names": wl.input_names, "output_names": wl.output_names,
                  "dynamic_axes": wl.dynamic_axes or None}
            path = Path(tmp) / "model.onnx"
            _say(progress, "exporting to ONNX and checking it against PyTorch ...")
            export_onnx(result.model, wl.example_inputs, path, **io)
            proto = _load_onnx(path)
            original_bytes = path.stat().st_size
            if recipe.torch_steps:  # the size to compare with is the untouched model's
                orig_path = Path(tmp) / "original.onnx"
                export_onnx(result.original, wl.example_inputs, orig_path, check=False, **io)
                original_bytes = orig_path.stat().st_size
        # The sensitivity report goes beside the bundle only once the bundle is written.
        scratch = Path(tmp) / "ptq-report.json"
        onnx_log, proto, compression = _run_onnx_steps(recipe, proto, wl, progress, scratch,
                                                       report)
        report_bytes = scratch.read_bytes() if scratch.is_file() else None
        log += onnx_log
        model_bytes = proto.SerializeToString()

    _say(progress, f"measuring the bundle on onnxruntime ({wl.metric}, latency) ...")
    session = ort_session(model_bytes)
    feeds = {n: a[:1] for n, a in zip(wl.input_names, wl.eval_batches[0][0], strict=True)}
    metric = wl.evaluate_onnx(session)
    latency = onnx_latency_ms(session, feeds)
    probe_out = session.run(None, feeds)
    metrics = {
        wl.metric: metric,
        "latency_ms_p50_batch1": latency,
        "onnx_bytes": len(model_bytes),
        "fp32_onnx_bytes": original_bytes,
    }
    if rows:
        metrics[f"original_{wl.metric}"] = rows[0].metric
    manifest: dict[str, Any] = {
        "name": bundle_name,
        "version": version or "1",
        "task": wl.task,
        "inputs": _specs(session.get_inputs(), wl),
        "outputs": _specs(session.get_outputs(), wl),
        "preprocessing": wl.preprocessing,
        "postprocessing": wl.postprocessing,
        "metrics": metrics,
        "compression": log,
        "provenance": {"source": str(model) if model_name else type(resolved).__name__,
                       "created_by": "edgeslim compress", "recipe": recipe.to_dict()},
    }
    if sum(v.size for v in feeds.values()) <= _PROBE_MAX_ELEMENTS:
        # a small input with its expected output: nodes health-check a fresh install on it
        manifest["probe"] = {
            "inputs": {k: v.tolist() for k, v in feeds.items()},
            "outputs": {o.name: v.tolist()
                        for o, v in zip(session.get_outputs(), probe_out, strict=True)},
            "atol": 1e-3,
        }
    if wl.labels:
        manifest["labels"] = wl.labels
    from edgeslim.bundle import write_bundle

    bundle = write_bundle(out, model_onnx=model_bytes, manifest=manifest,
                          extra_files=wl.extra_files, sign_key=sign_key,
                          compression=compression)
    if report_bytes is not None:
        from edgeslim._atomic import write_atomically

        write_atomically(report, lambda f: f.write(report_bytes))
    metrics["bundle_bytes"] = bundle.stat().st_size
    return CompressResult(bundle, manifest, rows, metrics)


def _say(progress: bool, text: str) -> None:
    """One progress line on stderr (also when it is not a terminal, unlike progress bars)."""
    if progress:
        from rich.console import Console

        Console(stderr=True).print(text, highlight=False)


def _check_report_path(report: Path) -> None:
    """The ptq step's report goes to ``report`` (beside the bundle): refuse, before any work,
    a folder or a link there (a link would send the report out of the bundle's folder)."""
    if report.is_symlink() or report.is_dir():
        what = "a symbolic link" if report.is_symlink() else "a folder"
        raise ConfigError(f"The ptq step writes its report to {str(report)!r}, which is {what}; "
                          f"remove it or give another -o path.")


def _check_out(out: str | Path, model: Any) -> None:
    """Refuse an output path that cannot take the bundle, before any work is done."""
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"The output {str(path)!r} is a folder; give a file path such as "
                          f"{str(path / 'model.eslim')!r}.")
    if isinstance(model, (str, Path)) and Path(model).exists() and \
            Path(model).resolve() == path.resolve():
        raise ConfigError(f"The output {str(path)!r} is the input model; writing the bundle "
                          f"there would destroy it. Give another -o path.")
    from edgeslim._atomic import output_problem

    problem = output_problem(path)  # a file among the parents, a folder we cannot write
    if problem:
        raise ConfigError(f"Cannot write {str(path)!r}: {problem}.")


def _fit_onnx(proto: Any, wl: Workload, path: Path) -> Workload:
    """``wl`` fitted to the ONNX model's inputs (a single input is fed by position, under the
    model's own name), or a ``ConfigError`` naming both sides."""
    import dataclasses

    from edgeslim.recipe.workload import fit_onnx_inputs

    samples = [inputs for inputs, _ in wl.eval_batches] + list(wl.calibration)
    feed = fit_onnx_inputs(proto, wl.input_names, samples, wl.name,
                           f"The ONNX model {str(path)!r}")
    if feed == tuple(wl.input_names):
        return wl
    axes = {feed[0] if k == wl.input_names[0] else k: v for k, v in wl.dynamic_axes.items()}
    return dataclasses.replace(wl, input_names=feed, dynamic_axes=axes)


def _load_onnx(path: Path) -> Any:
    """The ONNX model at ``path``, or a ``ModelError`` saying why it is not one."""
    import onnx

    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and kin: not an ONNX file
        missing = _missing_external_data(path)
        if missing:
            raise ModelError(
                f"{str(path)!r} keeps its weights in external data files that are not beside "
                f"it: {', '.join(repr(m) for m in missing)}. Copy them into "
                f"{str(path.parent)!r} (ONNX looks for them next to the model)."
            ) from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{str(path)!r} is not an ONNX model: {reason[:200]}") from None
    if proto.ir_version <= 0 or not proto.graph.node:  # e.g. an empty file parses as nothing
        raise ModelError(f"{str(path)!r} is not an ONNX model: it holds no graph.")
    # onnx.load leaves data_location set (to DEFAULT) on the weights it read from beside the
    # model; cleared, the proto is byte for byte the model saved as one file
    for t in proto.graph.initializer:
        if t.HasField("data_location") and t.data_location == onnx.TensorProto.DEFAULT:
            t.ClearField("data_location")
    return proto


def _missing_external_data(path: Path) -> list[str]:
    """The external data files the ONNX model at ``path`` names that are not beside it (what
    torch.onnx.export's default exporter writes as ``MODEL.onnx.data``); [] when it names
    none or is not an ONNX model at all."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return []
    places = {
        entry.value
        for t in proto.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data
        if entry.key == "location"
    }
    return sorted(p for p in places if not (path.parent / p).is_file())


def _run_onnx_steps(
    recipe: Recipe, proto: Any, wl: Workload, progress: bool, report_path: Path,
    final_report: Path,
) -> tuple[list[dict[str, Any]], Any, str]:
    """Run the recipe's ONNX steps; ptq writes its report to ``report_path`` (a scratch file
    that becomes ``final_report`` once the bundle is written)."""
    from edgeslim.recipe.steps import OnnxContext, run_step

    octx = OnnxContext(model=proto, workload=wl, progress=progress, report_path=report_path)
    log = []
    first = len(recipe.torch_steps)
    for i, step in enumerate(recipe.onnx_steps, start=first + 1):
        _say(progress, f"[bold cyan]step {i}/{len(recipe.steps)}[/] {step.name} {step.params} "
                       "(on the exported ONNX model)")
        report = run_step(octx, step.name, step.params)
        score = wl.evaluate_onnx(ort_session(octx.model))
        _say(progress, f"  {step.name}: {wl.metric} {score:.4f} on onnxruntime")
        # warnings: said also under -q (which hides progress, not what went short)
        if step.name == "pack" and isinstance(report, dict) and not report.get("packed_tensors"):
            _say(True, "  [yellow]pack: no float weight tensor to share[/] (after ptq only the "
                       "layers it keeps in float are left); the bundle is lzma-coded")
        if isinstance(report, dict) and report.get("goal_met") is False:
            from rich.markup import escape

            _say(True, f"  [yellow]{step.name}: goal missed[/]: {_fidelity(report)} "
                       f"(max_drop {report.get('max_drop')}); the best model found is kept; "
                       f"its report will be {escape(str(final_report))}")
        log.append({"step": step.name, "params": step.params, "report": report,
                    "metrics": {wl.metric: score}})
    return log, octx.model, octx.compression


def _fidelity(report: dict[str, Any]) -> str:
    """The ptq report's score against the float model and, when it broke its cap, its size,
    in words."""
    metrics = report.get("metrics") or {}
    said = f"a drop of {report.get('drop', 0):.4f}"
    for key in ("top1_agreement", "mean_cosine", "score"):
        if isinstance(metrics.get(key), (int, float)):
            said = f"{key} {metrics[key]:.4f}, {said}"
            break
    cap, ratio = (report.get("config") or {}).get("max_size_ratio"), metrics.get("size_ratio")
    if isinstance(cap, (int, float)) and isinstance(ratio, (int, float)) and ratio > cap:
        said += f"; size_ratio {ratio:.3f} over max_size_ratio {cap}"
    return said


def _specs(values: Any, wl: Workload) -> list[dict[str, Any]]:
    dtypes = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(int32)": "int32",
              "tensor(float16)": "float16", "tensor(uint8)": "uint8", "tensor(int8)": "int8",
              "tensor(double)": "float64", "tensor(bool)": "bool"}
    out = []
    for v in values:
        shape = [d if isinstance(d, int) else str(d) for d in v.shape]
        out.append({"name": v.name, "dtype": dtypes.get(v.type, v.type), "shape": shape})
    return out
