"""The recipe step registry: each step's keys, cheap checks, and how it runs.

The keys here are the recipe file's contract. Each ``run`` calls the one public verb of its
technique (``edgeslim.compress.*``, ``edgeslim.packing``, ``edgeslim.ptq``); each ``check``
validates values before any step runs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgeslim._validate import (
    check_choice,
    check_fraction,
    check_int_range,
    check_positive,
)
from edgeslim.errors import ConfigError

__all__ = ["STEPS", "RecipeContext", "StepSpec"]


@dataclass
class RecipeContext:
    """State threaded through the steps: the model being compressed and what it is judged on."""

    model: Any
    teacher: Any
    workload: Any
    bits: int = 32
    progress: bool = True
    log: list[dict[str, Any]] = field(default_factory=list)

    def need_train(self, step: str) -> Any:
        if self.workload.train is None:
            raise ConfigError(
                f"The step {step!r} trains, but the workload {self.workload.name!r} has no "
                "training data. Use data-free steps or give data with labels."
            )
        return self.workload.train


@dataclass
class OnnxContext:
    """State of the ONNX stage: the exported model (``onnx.ModelProto``) and its workload."""

    model: Any
    workload: Any
    compression: str = "deflate"
    progress: bool = True
    #: where steps write reports that outlive the run (the ptq sensitivity JSON)
    report_path: Any = None


@dataclass(frozen=True)
class StepSpec:
    """A step: how it runs, its keys with defaults, a cheap check, and its stage.

    ``stage`` is ``"torch"`` (runs on the ``nn.Module``) or ``"onnx"`` (runs after export on
    the ONNX graph); a recipe lists every torch step before the first onnx step.
    """

    run: Callable[..., dict[str, Any] | None]
    defaults: dict[str, Any]
    check: Callable[..., None] | None = None
    summary: str = ""
    stage: str = "torch"

    def keys(self) -> set[str]:
        return set(self.defaults)


def _epochs(v: Any, step: str) -> None:
    check_int_range(v, "epochs", step, 0, 10_000)


def _layer_names(v: Any, step: str) -> None:
    """``ignored_layers``: absent, or a list of module names (strings)."""
    if v is not None and not (isinstance(v, list) and all(isinstance(n, str) for n in v)):
        raise ConfigError(f"The 'ignored_layers' parameter of {step} must be a list of layer "
                          f"names such as ['fc2']. Got {v!r} instead.")


# -- prune (unstructured magnitude, the seed's weight clipping) --------------------------------

_PRUNE = {"sparsity": None, "threshold": None, "scope": "global", "schedule": "oneshot",
          "epochs": 0, "lr": 1e-3, "steps": 4, "ignored_layers": None}


def _check_prune(**p: Any) -> None:
    if (p.get("sparsity") is None) == (p.get("threshold") is None):
        raise ConfigError("prune takes exactly one of 'sparsity' or 'threshold'.")
    if p.get("sparsity") is not None:
        check_fraction(p["sparsity"], "sparsity", "prune")
    if p.get("threshold") is not None:
        check_positive(p["threshold"], "threshold", "prune", allow_zero=True)
    check_choice(p.get("scope", "global"), "scope", "prune", {"global", "layer"})
    check_choice(p.get("schedule", "oneshot"), "schedule", "prune", {"oneshot", "gradual"})
    _epochs(p.get("epochs", 0), "prune")
    check_positive(p.get("lr", 1e-3), "lr", "prune")
    check_int_range(p.get("steps", 4), "steps", "prune", 1, 1000)
    _layer_names(p.get("ignored_layers"), "prune")


def _run_prune(ctx: RecipeContext, **p: Any) -> dict[str, Any]:
    from edgeslim.compress.prune import prune

    train = ctx.need_train("prune") if step_trains("prune", p) else None
    result = prune(
        ctx.model,
        sparsity=p["sparsity"],
        threshold=p["threshold"],
        scope=p["scope"],
        schedule=p["schedule"],
        train_data=train,
        epochs=p["epochs"],
        lr=p["lr"],
        steps=p["steps"],
        ignored_layers=p["ignored_layers"],
        progress=ctx.progress,
    )
    ctx.model = result.model
    return {"objective_L": result.objective, "sparsity": result.sparsity}


# -- prune_structured --------------------------------------------------------------------------

_STRUCT = {"ratio": 0.5, "importance": "l2", "scope": "layer", "head_ratio": 0.0,
           "round_to": None, "ignored_layers": None}


def _check_struct(**p: Any) -> None:
    check_fraction(p.get("ratio", 0.5), "ratio", "prune_structured")
    check_choice(p.get("importance", "l2"), "importance", "prune_structured",
                 {"l1", "l2", "taylor", "activation"})
    check_choice(p.get("scope", "layer"), "scope", "prune_structured", {"global", "layer"})
    check_fraction(p.get("head_ratio", 0.0), "head_ratio", "prune_structured")
    if p.get("round_to") is not None:
        check_int_range(p["round_to"], "round_to", "prune_structured", 1, 4096)
    _layer_names(p.get("ignored_layers"), "prune_structured")


def _run_struct(ctx: RecipeContext, **p: Any) -> dict[str, Any]:
    from edgeslim.compress.structured import prune_structured

    data = ctx.workload.train if step_trains("prune_structured", p) else None
    result = prune_structured(
        ctx.model,
        ctx.workload.example_inputs,
        ratio=p["ratio"],
        importance=p["importance"],
        scope=p["scope"],
        head_ratio=p["head_ratio"],
        round_to=p["round_to"],
        ignored_layers=p["ignored_layers"],
        data=data,
        progress=ctx.progress,
    )
    ctx.model = result.model
    return result.report.to_dict()["metrics"]


# -- distill -----------------------------------------------------------------------------------

_DISTILL = {"epochs": 10, "lr": 1e-3, "temperature": 4.0, "alpha": 0.9, "loss": "kl",
            "features": None}


def _check_distill(**p: Any) -> None:
    check_int_range(p.get("epochs", 10), "epochs", "distill", 1, 10_000)  # 0 would not distill
    check_positive(p.get("temperature", 4.0), "temperature", "distill")
    check_fraction(p.get("alpha", 0.9), "alpha", "distill", closed_right=True)
    terms = str(p.get("loss", "kl")).split("+")
    for term in terms:
        check_choice(term, "loss", "distill", {"kl", "mse", "feature"})
    check_positive(p.get("lr", 1e-3), "lr", "distill")
    features = p.get("features")
    if "feature" in terms and not features:
        raise ConfigError("The 'feature' loss of distill needs 'features': a list of "
                          "[student_layer, teacher_layer] pairs, e.g. [[fc1, fc1]].")
    if features and "feature" not in terms:
        raise ConfigError(f"distill was given 'features' but its loss {p.get('loss', 'kl')!r} "
                          f"has no 'feature' term; use loss: "
                          f"{'+'.join([*terms, 'feature'])}.")
    pairs = features if isinstance(features, (list, tuple)) else None
    if features is not None and (pairs is None or not all(
            isinstance(f, (list, tuple)) and len(f) == 2
            and all(isinstance(n, str) and n for n in f) for f in pairs)):
        raise ConfigError(f"The 'features' key of distill must be a list of "
                          f"[student_layer, teacher_layer] name pairs, e.g. [[fc1, fc1]]. "
                          f"Got {features!r} instead.")


def _run_distill(ctx: RecipeContext, **p: Any) -> None:
    from edgeslim.compress.distill import distill

    ctx.bits = 32  # trained weights are off any grid a quantize step left them on
    ctx.model = distill(
        ctx.model,
        ctx.teacher,
        ctx.need_train("distill"),
        loss=p["loss"],
        temperature=p["temperature"],
        alpha=p["alpha"],
        epochs=p["epochs"],
        lr=p["lr"],
        features=p["features"],
        progress=ctx.progress,
    )


# -- quantize (QAT in torch) -------------------------------------------------------------------

_QUANT = {"bits": 8, "act_bits": None, "epochs": 2, "lr": 1e-4}


def _check_quant(**p: Any) -> None:
    check_int_range(p.get("bits", 8), "bits", "quantize", 2, 8)
    if p.get("act_bits") is not None:
        check_int_range(p["act_bits"], "act_bits", "quantize", 2, 8)
    _epochs(p.get("epochs", 2), "quantize")
    check_positive(p.get("lr", 1e-4), "lr", "quantize")


def _run_quant(ctx: RecipeContext, **p: Any) -> None:
    from edgeslim.compress.qat import quantize_qat, strip_qat

    qat = quantize_qat(
        ctx.model,
        ctx.need_train("quantize"),
        bits=p["bits"],
        act_bits=p["act_bits"],
        epochs=p["epochs"],
        lr=p["lr"],
        progress=ctx.progress,
    )
    ctx.model = strip_qat(qat)
    ctx.bits = p["bits"]


# -- finetune ----------------------------------------------------------------------------------

_FINETUNE = {"epochs": 3, "lr": 1e-3}


def _check_finetune(**p: Any) -> None:
    _epochs(p.get("epochs", 3), "finetune")
    check_positive(p.get("lr", 1e-3), "lr", "finetune")


def _run_finetune(ctx: RecipeContext, **p: Any) -> None:
    from edgeslim.compress.train import fit, zero_keeper

    fit(ctx.model, ctx.need_train("finetune"), epochs=p["epochs"], lr=p["lr"],
        after_step=zero_keeper(ctx.model), progress=ctx.progress)
    ctx.bits = 32  # trained weights are off any grid a quantize step left them on


# -- pack (ONNX: Deep-Compression weight sharing + entropy-coded zip) --------------------------

_PACK = {"bits": 5, "min_size": 256}


def _check_pack(**p: Any) -> None:
    check_int_range(p.get("bits", 5), "bits", "pack", 2, 8)
    check_int_range(p.get("min_size", 256), "min_size", "pack", 1, 2**31)


def _run_pack(octx: OnnxContext, **p: Any) -> dict[str, Any]:
    from edgeslim.packing import share_weights

    octx.model, report = share_weights(octx.model, bits=p["bits"], min_size=p["min_size"])
    octx.compression = "lzma"
    return {"packed_tensors": len(report.packed), "float_bytes": report.float_bytes,
            "code_bytes": report.code_bytes}


# -- ptq (ONNX: accuracy-aware post-training int8) ---------------------------------------------

_PTQ = {"max_drop": None, "time_budget_s": 900.0, "scheme": None, "calibration": None,
        "bits": 8}
_PTQ_TASKS = {"image-classification": "classification", "sentence-embedding": "embedding"}


def _check_ptq(**p: Any) -> None:
    if p.get("max_drop") is not None:
        check_fraction(p["max_drop"], "max_drop", "ptq", closed_right=True)
    check_positive(p.get("time_budget_s", 900.0), "time_budget_s", "ptq")
    if p.get("scheme") is not None:
        from edgeslim.ptq.search import SCHEMES

        check_choice(p["scheme"], "scheme", "ptq", SCHEMES)
    if p.get("calibration") is not None:
        from edgeslim.ptq.calibrate import CALIBRATION_METHODS

        check_choice(p["calibration"], "calibration", "ptq", CALIBRATION_METHODS)
        if p.get("scheme") not in (None, "static"):
            raise ConfigError(
                f"The 'calibration' parameter of ptq sets the activation ranges of the static "
                f"scheme; the scheme {p['scheme']!r} calibrates none. Drop one of the two."
            )
    bits = p.get("bits", 8)
    if isinstance(bits, bool) or bits not in (4, 7, 8):
        raise ConfigError(f"The 'bits' parameter of ptq must be 8, 7 or 4 (7: weights within "
                          f"+-64, the fast exact kernels of CPUs without VNNI; 4: int4 weights, "
                          f"with scheme: weight_only). Got {bits!r} instead.")
    if bits == 4 and p.get("scheme") != "weight_only":
        raise ConfigError("The 'bits' parameter of ptq is 4 only with scheme: weight_only (int4 "
                          "weights in MatMulNBits); the other schemes are int8. Add "
                          "scheme: weight_only, or drop bits.")
    if bits == 7 and p.get("scheme") == "weight_only":
        raise ConfigError("The 'bits' parameter of ptq is 7 only with the static or dynamic "
                          "scheme (int8 kernels with 7-bit weights); scheme: weight_only takes "
                          "8 or 4.")


def ptq_overrides(wl: Any, scheme: str | None = None, calibration: str | None = None,
                  bits: int = 8) -> dict[str, Any]:
    """The preset settings a ``ptq`` step changes for workload ``wl``; a ConfigError for a
    calibration method given to a scheme that calibrates nothing (checked before any work)."""
    from edgeslim.ptq.presets import PRESET_SETTINGS

    overrides: dict[str, Any] = {"scheme": scheme} if scheme else {}
    task = _PTQ_TASKS.get(wl.task, "classification")
    resolved = scheme or PRESET_SETTINGS[task]["scheme"]
    if bits == 7:
        # int8 kernels exact and fast without VNNI (ptq/exact.py): weights on onnxruntime's
        # reduced range, except (static QOperator) those whose input channels pair at 8 bits
        qoperator = PRESET_SETTINGS[task].get("quant_format") == "qoperator"
        overrides["reduce_range"] = "unpaired" if resolved == "static" and qoperator else True
    elif bits != 8:
        overrides["bits"] = bits
    if resolved == "static" and "method" not in PRESET_SETTINGS[task]:
        # the documented default of the static scheme, whichever preset the task has
        overrides["method"] = "percentile"
    if calibration:
        if resolved != "static":
            raise ConfigError(
                f"The 'calibration' parameter of ptq sets the activation ranges of the static "
                f"scheme, but the {wl.task} workload of {wl.name!r} is quantized with the "
                f"{resolved!r} scheme, which calibrates none. Drop 'calibration', or add "
                f"scheme: static."
            )
        overrides["method"] = calibration
    return overrides


def _run_ptq(octx: OnnxContext, **p: Any) -> dict[str, Any]:
    from edgeslim.ptq import quantize_int8_preset

    wl = octx.workload
    task = _PTQ_TASKS.get(wl.task, "classification")
    if not wl.calibration:
        raise ConfigError(
            f"The step 'ptq' calibrates on data, but the workload {wl.name!r} has none."
        )
    overrides = ptq_overrides(wl, scheme=p["scheme"], calibration=p["calibration"],
                              bits=p["bits"])
    result = quantize_int8_preset(
        octx.model,
        wl.calibration,
        [inputs for inputs, _ in wl.eval_batches],
        task=task,
        max_drop=p["max_drop"],
        time_budget_s=p["time_budget_s"],
        report_path=octx.report_path,
        progress=octx.progress,
        **overrides,
    )
    octx.model = result.model
    summary = result.summary()
    summary.pop("history", None)
    if result.report is not None and hasattr(result.report, "to_dict"):
        summary["sensitivity"] = result.report.to_dict()
    return summary


STEPS: dict[str, StepSpec] = {
    "prune": StepSpec(_run_prune, _PRUNE, _check_prune,
                      "unstructured magnitude pruning (weight clipping)"),
    "prune_structured": StepSpec(_run_struct, _STRUCT, _check_struct,
                                 "remove neurons/channels/heads (DepGraph)"),
    "distill": StepSpec(_run_distill, _DISTILL, _check_distill,
                        "knowledge distillation from the original model"),
    "quantize": StepSpec(_run_quant, _QUANT, _check_quant,
                         "quantization-aware training, weights snapped to the grid"),
    "finetune": StepSpec(_run_finetune, _FINETUNE, _check_finetune, "train on labels"),
    "ptq": StepSpec(_run_ptq, _PTQ, _check_ptq,
                    "accuracy-aware post-training int8 with fp32 fallback", stage="onnx"),
    "pack": StepSpec(_run_pack, _PACK, _check_pack,
                     "weight sharing (k-means codebooks) + lzma entropy coding", stage="onnx"),
}


#: what a recipe can do on a workload without training data, for messages
DATA_FREE = ("prune (no epochs, schedule oneshot), prune_structured (importance l1 or l2), "
             "ptq, pack")


def step_trains(name: str, params: dict[str, Any]) -> bool:
    """Whether step ``name`` with ``params`` runs the workload's training data (checked before
    any work: a workload without it is refused up front, not when the step comes)."""
    p = {**STEPS[name].defaults, **params}
    if name in ("distill", "quantize", "finetune"):
        return True
    if name == "prune":
        return bool(p["epochs"]) or p["schedule"] == "gradual"
    if name == "prune_structured":
        return p["importance"] in ("taylor", "activation")
    return False


def check_training_data(steps: list[Any], workload: Any) -> None:
    """Refuse the first of ``steps`` that trains when ``workload`` has no training data."""
    if workload.train is not None:
        return
    for i, step in enumerate(steps):
        if step_trains(step.name, step.params):
            raise ConfigError(
                f"Step {i + 1} ({step.name!r}) trains, but the workload {workload.name!r} has no "
                f"training data. Without it a recipe can use: {DATA_FREE}; or give a workload "
                "with labelled training data (data: digits, or a package.module:callable "
                "whose Workload has train).")


def run_step(ctx: Any, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run one validated step with its defaults filled in; returns what it reports."""
    spec = STEPS[name]
    full = {**copy.deepcopy(spec.defaults), **params}
    return spec.run(ctx, **full) or {}
