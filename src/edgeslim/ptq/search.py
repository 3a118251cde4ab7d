"""Accuracy-aware post-training quantization: quantize, measure, fall back, keep the best.

``quantize`` builds the fully quantized model and measures it against the float model on the
evaluation data. If the drop exceeds ``max_drop`` it ranks the quantized nodes by sensitivity
(``sensitivity.py``) and keeps the most sensitive ones in float, a few more each round, until
the goal holds or the time budget is spent. It always returns the best model found, and writes
the JSON report (sensitivity ranking, every configuration tried) even when the goal is missed.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim._validate import check_choice, check_fraction, check_int_range, check_positive
from edgeslim.errors import ConfigError
from edgeslim.progress import progress_bar
from edgeslim.ptq._graph import as_model, at_least_opset, make_session
from edgeslim.ptq.builders import Builder, within_budget
from edgeslim.ptq.builders import float_bytes as _float_bytes
from edgeslim.ptq.calibrate import CALIBRATION_METHODS, to_feeds
from edgeslim.ptq.finetune import LOSSES
from edgeslim.ptq.metrics import TASKS, task_metrics
from edgeslim.ptq.sensitivity import SensitivityReport, sensitivity_analysis
from edgeslim.ptq.static import WEIGHT_ROUNDING

__all__ = ["SCHEMES", "QuantizationResult", "quantize"]

#: static: calibrated int8 activations (CNNs); dynamic: row-wise int8 activations computed at
#: run time (transformers); weight_only: MatMulNBits int4/int8 weights.
SCHEMES = ("static", "dynamic", "weight_only")


@dataclass
class QuantizationResult:
    """What ``quantize`` found: the best model and how it was measured.

    ``metrics``: the returned model's metrics (``score`` and task metrics); ``drop``: the
    score lost against the float model; ``excluded``: nodes kept in float; ``report``: the
    sensitivity ranking when one was computed; ``history``: one entry per configuration tried.
    """

    model: Any
    metrics: dict[str, float]
    drop: float
    max_drop: float
    goal_met: bool
    excluded: list[str]
    report: SensitivityReport | None
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    report_path: Path | None = None
    #: dynamic scheme: each MatMul input's treatment (``"static"`` range or ``"row-wise"``),
    #: its calibration ``spread`` (``dynamic.input_statistics``) and the ``matmuls`` reading it
    activations: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def size_bytes(self) -> int:
        """Bytes of the serialized quantized model (what model.onnx holds)."""
        return len(self.model.SerializeToString())

    def save(self, path: str | Path) -> Path:
        """Write the quantized model to ``path`` (a .onnx file)."""
        import onnx

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(self.model, str(path))
        return path

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary (no model)."""
        return {
            "goal_met": self.goal_met,
            "max_drop": self.max_drop,
            "drop": self.drop,
            "metrics": self.metrics,
            "excluded": self.excluded,
            "size_bytes": self.size_bytes,
            "seconds": self.seconds,
            "config": self.config,
            "activations": self.activations,
            "history": self.history,
        }


def _score(eval_fn: Callable[[Any], Any], model: Any) -> float:
    """The user's metric of ``model`` as a finite float, or a ConfigError saying what came."""
    got = eval_fn(model)
    try:
        value = float(got)
    except (TypeError, ValueError):
        raise ConfigError(f"eval_fn must return a number (higher is better); it returned "
                          f"{got!r}.") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"eval_fn returned {value}; a score must be a finite number.")
    return value


class _Evaluator:
    def __init__(self, float_model: Any, feeds: list[dict], task: str, eval_fn, threads: int):
        self.task, self.eval_fn, self.feeds, self.threads = task, eval_fn, feeds, threads
        if eval_fn is not None:
            self.baseline = _score(eval_fn, float_model)
        else:
            self.reference = self._outputs(float_model, feeds)
            self.baseline = 1.0
            task_metrics(task, self.reference, self.reference)  # outputs the task can judge

    def _outputs(self, model: Any, feeds: list[dict]) -> list[np.ndarray]:
        session = make_session(model, threads=self.threads)
        names = {i.name for i in session.get_inputs()}
        return [session.run(None, {k: v for k, v in f.items() if k in names})[0] for f in feeds]

    def __call__(self, model: Any, limit: int | None = None) -> dict[str, float]:
        if self.eval_fn is not None:
            score = _score(self.eval_fn, model)
            return {"score": score, "drop": self.baseline - score}
        feeds = self.feeds if limit is None else self.feeds[:limit]
        out = self._outputs(model, feeds)
        metrics = task_metrics(self.task, self.reference[: len(feeds)], out)
        metrics["drop"] = self.baseline - metrics["score"]
        return metrics


def _finetune_stage(
    qmodel: Any,
    float_model: Any,
    calibration_data: Any,
    samples: int | None,
    seconds: float,
    threads: int,
    steps: int | None = None,
    loss: str = "mse",
) -> Any | None:
    """The end-to-end tuned ``qmodel``, or None when tuning does not apply or does not lower
    the relative output error on the calibration samples (the only data it sees)."""
    from edgeslim.errors import ModelError
    from edgeslim.ptq.finetune import finetune_qoperator

    if seconds <= 0:
        return None
    feeds = to_feeds(calibration_data, float_model, limit=samples)
    if len(feeds[0]) != 1:
        return None
    name = next(iter(feeds[0]))
    images = np.concatenate([f[name] for f in feeds])
    if images.ndim != 4 or images.dtype != np.float32:
        return None
    reference = make_session(float_model, threads=threads)

    def float_fn(x: np.ndarray) -> np.ndarray:
        return reference.run(None, {name: x})[0]

    check = images[: min(len(images), 128)]

    def error(model: Any) -> float:
        session = make_session(model, threads=threads)
        out = np.concatenate(
            [session.run(None, {name: check[i : i + 16]})[0] for i in range(0, len(check), 16)]
        )
        ref = np.concatenate([float_fn(check[i : i + 16]) for i in range(0, len(check), 16)])
        return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-12))

    try:
        tuned = finetune_qoperator(
            qmodel,
            float_fn,
            images,
            steps=steps,
            time_budget_s=max(seconds - 15.0, 1.0),
            threads=threads,
            loss=loss,
        )
    except ModelError:  # ops the simulator does not replay
        return None
    return tuned if error(tuned) < error(qmodel) else None


def _validate(max_drop, time_budget_s, task, scheme, method, weight_rounding, bits, eval_fn):
    func = "quantize"
    check_fraction(max_drop, "max_drop", func, closed_right=True)
    check_positive(time_budget_s, "time_budget_s", func)
    check_choice(task, "task", func, TASKS)
    check_choice(scheme, "scheme", func, SCHEMES)
    check_choice(method, "method", func, CALIBRATION_METHODS)
    check_choice(weight_rounding, "weight_rounding", func, WEIGHT_ROUNDING)
    check_int_range(bits, "bits", func, 2, 8)
    allowed = (4, 8) if scheme == "weight_only" else (8,)
    if bits not in allowed:
        raise ConfigError(
            f"The 'bits' parameter of quantize must be one of {allowed} for scheme {scheme!r}. "
            f"Got {bits!r} instead."
        )
    if eval_fn is not None and not callable(eval_fn):
        raise ConfigError(
            f"'eval_fn' must be callable(model) -> float. Got {type(eval_fn).__name__}."
        )


def _validate_reduce_range(reduce_range: Any, scheme: str, quant_format: str) -> None:
    if not (isinstance(reduce_range, bool) or reduce_range == "unpaired"):
        raise ConfigError(
            "The 'reduce_range' parameter of quantize must be False, True or 'unpaired'. "
            f"Got {reduce_range!r} instead.")
    if reduce_range == "unpaired" and scheme == "static" and quant_format != "qoperator":
        raise ConfigError(
            "The 'reduce_range' parameter of quantize is 'unpaired' only with "
            "quant_format='qoperator' for the static scheme (it narrows QLinearConv and QGemm "
            f"weights). Got quant_format={quant_format!r}.")


def quantize(
    model: Any,
    calibration_data: Any,
    eval_data: Any = None,
    *,
    task: str = "classification",
    scheme: str = "static",
    eval_fn: Callable[[Any], float] | None = None,
    max_drop: float = 0.01,
    time_budget_s: float = 600.0,
    method: str = "minmax",
    per_channel: bool = True,
    reduce_range: bool | str = False,
    activation_type: str = "uint8",
    quant_format: str = "qdq",
    weight_rounding: str = "gptq",
    bias_correction: bool = True,
    activation_bias_correction: bool = False,
    percentile: float = 99.99,
    equalization: bool = False,
    smooth_alpha: float | None = 0.5,
    static_max_spread: float | None = None,
    quantize_embeddings: bool = True,
    fuse_attention: bool = False,
    bits: int = 8,
    exclude: Sequence[str] = (),
    max_excluded: int | None = None,
    max_size_ratio: float | None = None,
    float_leading_units: int = 0,
    float_logits: bool = False,
    finetune_share: float = 0.0,
    finetune_samples: int | None = 1024,
    finetune_steps: int | None = None,
    finetune_loss: str = "mse",
    calibration_samples: int | None = 256,
    sensitivity_samples: int = 64,
    batch_size: int = 8,
    report_path: str | Path | None = None,
    progress: bool = True,
    threads: int = 2,
) -> QuantizationResult:
    """Quantize ``model`` to int8 (or int4 weights) within ``max_drop`` of the float model.

    ``model``: a .onnx path or ``onnx.ModelProto``. ``calibration_data``/``eval_data``: any
    form ``calibrate.to_feeds`` accepts (use distinct data for the two; ``eval_data=None``
    evaluates on the calibration data). ``task`` sets the fidelity score: top-1 agreement with
    the float model (``"classification"``) or mean cosine of the outputs (``"embedding"``);
    ``eval_fn(model) -> float`` replaces it with the user's own metric (higher is better), the
    drop then being measured from ``eval_fn`` of the float model. ``max_size_ratio`` caps the
    serialized model at that fraction of the float parameter bytes (the goal includes it, and
    fallbacks that would break it are not tried). ``time_budget_s`` bounds the
    search (the first full quantization always runs). ``report_path``: where the JSON report
    goes (always written when given).

    ``method`` calibrates the activation ranges of the static scheme: ``"minmax"`` (the
    extremes seen), ``"percentile"`` (the range that keeps ``percentile`` % of the magnitudes)
    or ``"entropy"`` (TensorRT's: the range whose 8-bit quantization loses the least
    information, by the KL divergence over a 2,048-bin histogram of magnitudes;
    ``static.entropy_range``). The two histogram methods read the calibration data a batch at
    a time, twice (``static.histogram_ranges``). On efficientnet-lite0, entropy clips ReLU6
    outputs below the 6 where their saturated values pile up and loses to percentile, the
    preset's choice (bench/RESULTS.md, "int8 calibration methods").

    Dynamic scheme (transformers): ``smooth_alpha`` migrates activation outliers into the
    weights (SmoothQuant; None: off); MatMul inputs are quantized row by row at run time,
    except those whose largest magnitude on the calibration data is at most
    ``static_max_spread`` times the median row's largest magnitude, which get one calibrated
    range and no run-time reduction (faster; None: every input row-wise).
    ``result.activations`` says which input got which. ``weight_rounding="gptq"`` (the
    default) rounds the MatMul weights error-compensating on the calibration data, as for the
    static scheme. ``fuse_attention`` runs each self-attention block whose Q/K/V input got a
    calibrated range as one onnxruntime ``QAttention`` kernel (``attention.fuse_attention``;
    the same integers, checked against the unfused model on the calibration data).

    ``reduce_range``: True puts every weight on 7 bits (+-64), which no u8 x s8 kernel can
    saturate, so model.onnx keeps the fast form on x86 CPUs without VNNI (``exact.py``);
    ``"unpaired"`` (static QOperator) only those that would otherwise need the slower u8 x u8
    form, keeping 8 bits where a 1x1 convolution's input channels pair (``exact.narrow_unpaired``:
    on efficientnet-lite0 the speed of 7 bits at nearly the agreement of 8); for the dynamic
    scheme it means True.

    Static QOperator only: ``float_leading_units`` keeps the first activation units (a tensor
    with its producer and readers, in graph order) in float; ``float_logits`` lets the final
    QGemm answer in float instead of requantized uint8; ``finetune_share`` reserves that
    fraction of ``time_budget_s`` for tuning the int8 weights, biases and activation scales of
    the best model end to end against the float outputs on up to ``finetune_samples``
    calibration samples (``finetune.py``; label-free, the evaluation data is not used), for
    ``finetune_steps`` optimizer steps or until the budget ends (None: the budget alone),
    minimising ``finetune_loss`` (``"mse"`` on the outputs, or ``"kl"`` on their softmax, for
    logits; see ``finetune.finetune_qoperator``). A
    step count that fits in the budget makes the tuned model the same on every run; a budget
    that ends first makes it depend on the machine's speed. The tuned model is kept when its
    error on the calibration samples is lower.

    >>> res = quantize("model.onnx", calib, evaluation, max_drop=0.01)  # doctest: +SKIP
    >>> res.goal_met, res.excluded, res.metrics["top1_agreement"]  # doctest: +SKIP
    """
    _validate(max_drop, time_budget_s, task, scheme, method, weight_rounding, bits, eval_fn)
    _validate_reduce_range(reduce_range, scheme, quant_format)
    check_int_range(sensitivity_samples, "sensitivity_samples", "quantize", 1, 1_000_000)
    check_int_range(float_leading_units, "float_leading_units", "quantize", 0, 1_000_000)
    check_fraction(finetune_share, "finetune_share", "quantize", closed_right=False)
    if finetune_steps is not None:
        check_int_range(finetune_steps, "finetune_steps", "quantize", 1, 10_000_000)
    check_choice(finetune_loss, "finetune_loss", "quantize", LOSSES)
    if max_size_ratio is not None:
        check_positive(max_size_ratio, "max_size_ratio", "quantize")
    check_int_range(batch_size, "batch_size", "quantize", 1, 1_000_000)
    if calibration_samples is not None:
        check_int_range(calibration_samples, "calibration_samples", "quantize", 1, 10_000_000)
    check_int_range(threads, "threads", "quantize", 1, 256)
    if static_max_spread is not None and not check_positive(
        static_max_spread, "static_max_spread", "quantize"
    ) >= 1.0:
        raise ConfigError(f"The 'static_max_spread' parameter of quantize must be None or a "
                          f"number >= 1 (the loudest row over the median row). Got "
                          f"{static_max_spread!r} instead.")
    if not 50.0 < check_positive(percentile, "percentile", "quantize") <= 100.0:
        raise ConfigError(f"The 'percentile' parameter of quantize must be in (50, 100], the "
                          f"share of values the range keeps. Got {percentile!r} instead.")
    if isinstance(exclude, str) or not all(isinstance(n, str) for n in exclude):
        raise ConfigError(f"The 'exclude' parameter of quantize must be a list of node names. "
                          f"Got {exclude!r} instead.")
    start = time.perf_counter()
    float_model = as_model(model)
    if scheme == "static" and per_channel:  # DequantizeLinear's axis came with opset 13
        float_model = at_least_opset(float_model, 13, "per-channel static int8")
    unknown = sorted(set(exclude) - {n.name for n in float_model.graph.node})
    if unknown:
        names = ", ".join(n.name for n in float_model.graph.node[:12] if n.name)
        raise ConfigError(f"The 'exclude' parameter of quantize names nodes the model does not "
                          f"have: {', '.join(map(repr, unknown))}. Its nodes include: {names}.")
    float_bytes = _float_bytes(float_model)
    cfg = {
        "scheme": scheme,
        "task": task,
        "method": method,
        "per_channel": per_channel,
        "reduce_range": reduce_range,
        "activation_type": activation_type,
        "quant_format": quant_format,
        "weight_rounding": weight_rounding,
        "bias_correction": bias_correction,
        "activation_bias_correction": activation_bias_correction,
        "percentile": percentile,
        "equalization": equalization,
        "smooth_alpha": smooth_alpha,
        "static_max_spread": static_max_spread,
        "quantize_embeddings": quantize_embeddings,
        "fuse_attention": bool(fuse_attention),
        "bits": bits,
        "exclude": list(exclude),
        "max_size_ratio": max_size_ratio,
        "float_leading_units": float_leading_units,
        "float_logits": float_logits,
        "finetune_share": finetune_share,
        "finetune_steps": finetune_steps,
        "finetune_loss": finetune_loss,
        "threads": threads,
    }
    cal_feeds = to_feeds(
        calibration_data, float_model, batch_size=batch_size, limit=calibration_samples
    )
    eval_feeds = (
        cal_feeds if eval_data is None else to_feeds(eval_data, float_model, batch_size=batch_size)
    )
    history: list[dict[str, Any]] = []
    report: SensitivityReport | None = None
    with tempfile.TemporaryDirectory(prefix="edgeslim-ptq-") as tmp:
        builder = Builder(float_model, cal_feeds, cfg, Path(tmp))
        builder_expand = builder.expand
        evaluate = _Evaluator(builder.float_model, eval_feeds, task, eval_fn, threads)

        def trial(excl: Sequence[str], stage: str) -> tuple[Any, dict[str, float]]:
            q = builder.build(excl)
            metrics = evaluate(q)
            metrics["size_bytes"] = float(q.ByteSize())
            metrics["size_ratio"] = metrics["size_bytes"] / max(float_bytes, 1)
            history.append(
                {
                    "stage": stage,
                    "excluded": list(excl),
                    "metrics": metrics,
                    "seconds": round(time.perf_counter() - start, 2),
                }
            )
            return q, metrics

        best_model, best = trial([], "full")
        best_excl: list[str] = []

        def fits(m: dict[str, float]) -> bool:
            return max_size_ratio is None or m["size_ratio"] <= max_size_ratio

        def goal(m: dict[str, float]) -> bool:
            return m["drop"] <= max_drop + 1e-12 and fits(m)

        def better(m: dict[str, float], old: dict[str, float]) -> bool:
            if fits(m) != fits(old):
                return fits(m)
            return m["score"] > old["score"] + 1e-12 or (goal(m) and not goal(old))

        tune = finetune_share > 0 and scheme == "static" and quant_format == "qoperator"
        search_budget = time_budget_s * (1.0 - finetune_share) if tune else time_budget_s
        if not goal(best):
            candidates = builder.candidates()
            if max_size_ratio is not None:  # nodes too big to keep in float are not analysed
                slack = max_size_ratio * float_bytes - best["size_bytes"]
                candidates = [
                    c for c in candidates if within_budget(builder.prepared, [c[0]], slack)
                ]
            remaining = search_budget - (time.perf_counter() - start)
            if candidates and remaining > 0 and max_excluded != 0:
                rows = max(1, len(next(iter(eval_feeds[0].values()))))
                n_sens = -(-sensitivity_samples // rows) if eval_fn is None else None
                report = sensitivity_analysis(
                    builder.build,
                    lambda m: evaluate(m, n_sens),
                    candidates,
                    base_metrics=evaluate(best_model, n_sens) if eval_fn is None else best,
                    time_budget_s=remaining * 0.5,
                    progress=progress,
                )
                base_err = report.base_metrics.get("relative_error", np.inf)
                ranked = [
                    n.node
                    for n in report.nodes
                    if n.gain > 0 or n.metrics.get("relative_error", np.inf) < base_err
                ]
                if max_size_ratio is not None:  # keep only fallbacks the size budget allows
                    slack = max_size_ratio * float_bytes - best["size_bytes"]
                    ranked = within_budget(builder.prepared, ranked, slack)
                limit = len(ranked) if max_excluded is None else min(max_excluded, len(ranked))
                steps = sorted(
                    {k for k in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if k <= limit}
                    | ({limit} if limit else set())
                )
                with progress_bar("fallback", total=len(steps), enabled=progress) as advance:
                    for k in steps:
                        if time.perf_counter() - start > search_budget:
                            break
                        q, m = trial(ranked[:k], f"fallback-{k}")
                        advance(1, score=m["score"])
                        if better(m, best):
                            best_model, best, best_excl = q, m, ranked[:k]
                        if goal(m):
                            break
        if tune and not goal(best):
            tuned = _finetune_stage(
                best_model,
                builder.float_model,
                calibration_data,
                finetune_samples,
                time_budget_s - (time.perf_counter() - start),
                threads,
                finetune_steps,
                finetune_loss,
            )
            if tuned is not None:
                q = tuned
                m = evaluate(q)
                m["size_bytes"] = float(q.ByteSize())
                m["size_ratio"] = m["size_bytes"] / max(float_bytes, 1)
                # The tuning lowers the error on the calibration data; it is kept only when
                # the evaluation agrees: a better score, or the same one at a lower error.
                inf = float("inf")
                kept = better(m, best) or (
                    fits(m) and m["score"] >= best["score"] - 1e-12
                    and m.get("relative_error", inf) < best.get("relative_error", inf))
                history.append(
                    {
                        "stage": "finetune",
                        "excluded": list(best_excl),
                        "metrics": m,
                        "kept": kept,
                        "seconds": round(time.perf_counter() - start, 2),
                    }
                )
                if kept:
                    best_model, best = q, m
    from edgeslim.ptq.exact import unsaturated

    result = QuantizationResult(
        # what model.onnx holds: integer kernels exact on every CPU (ptq/exact.py)
        model=unsaturated(copy.deepcopy(best_model)),
        metrics=best,
        drop=float(best["drop"]),
        max_drop=float(max_drop),
        goal_met=bool(goal(best)),
        excluded=builder_expand(builder.base_exclude + best_excl),
        report=report,
        history=history,
        config={k: v for k, v in cfg.items() if k != "threads"},
        activations={
            name: {
                "mode": "static" if name in builder.static_ranges else "row-wise",
                "spread": round(float(s["spread"]), 3),
                "matmuls": list(s["matmuls"]),
            }
            for name, s in builder.input_stats.items()
        },
        seconds=time.perf_counter() - start,
    )
    if report_path is not None:
        path = Path(report_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = result.summary()
        payload["sensitivity"] = report.to_dict() if report is not None else None
        path.write_text(json.dumps(payload, indent=2, default=float))
        result.report_path = path
    return result
