"""The compression space the search walks: one ``Candidate`` = one recipe.

A candidate combines, in recipe order:

1. ``prune_structured`` at ``ratio`` (channels / neurons removed for real: the only knob that
   makes dense onnxruntime kernels faster; ``round_to`` keeps each width a multiple of it,
   since onnxruntime's convolution speed jumps with the channel count), recovered by
   ``distill`` from the original model (``distill=True``) or by ``finetune`` on labels, for
   ``epochs`` epochs;
2. ``prune`` (unstructured magnitude) at ``sparsity``, fine-tuned ``sparse_epochs`` epochs
   (zeros that deflate well: size, not speed);
3. a number format: ``fp32``; ``qat`` (quantization-aware training at ``bits``, weights
   snapped to the grid); ``pack`` (k-means weight sharing at ``bits`` + lzma);
   ``ptq`` (accuracy-aware int8 post-training quantization on the ONNX graph; with
   ``fallback`` the layers that cost accuracy stay fp32).

Every candidate is keyed by a hash of the model's weights, the workload, the config and the
measurement settings (threads, throughput batch), so results stored by one run are found
again by the next (``edgeslim.optimize.store``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from edgeslim.errors import ConfigError
from edgeslim.recipe.core import Recipe, Step

__all__ = [
    "FORMATS",
    "SEARCH_VERSION",
    "Candidate",
    "available_steps",
    "candidate_key",
    "model_hash",
]

SEARCH_VERSION = 1
FORMATS = ("fp32", "qat", "pack", "ptq")

# the modules behind each recipe step (a step whose module is absent is not searched)
_STEP_MODULES = {
    "prune": "edgeslim.compress.prune",
    "prune_structured": "edgeslim.compress.structured",
    "distill": "edgeslim.compress.distill",
    "quantize": "edgeslim.compress.qat",
    "finetune": "edgeslim.compress.train",
    "pack": "edgeslim.packing",
    "ptq": "edgeslim.ptq",
}


def available_steps() -> set[str]:
    """Recipe steps that are registered and whose implementation can be imported."""
    from edgeslim.recipe.steps import STEPS

    out = set()
    for name in STEPS:
        module = _STEP_MODULES.get(name)
        try:
            found = module is None or importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            out.add(name)
    return out


@dataclass(frozen=True, order=True)
class Candidate:
    """One point of the space (see the module docstring). The default is the fp32 export."""

    ratio: float = 0.0
    distill: bool = False
    epochs: int = 0
    sparsity: float = 0.0
    sparse_epochs: int = 0
    format: str = "fp32"
    bits: int = 32
    fallback: bool = True
    ptq_drop: float = 0.01
    round_to: int | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"Unknown number format {self.format!r}. Allowed: "
                              f"{', '.join(FORMATS)}.")

    def with_(self, **changes: Any) -> Candidate:
        return replace(self, **changes)

    @property
    def trains(self) -> int:
        """Epochs of training this candidate costs (for time estimates)."""
        qat = 1 if self.format == "qat" else 0
        return (self.epochs if self.ratio else 0) + (self.sparse_epochs if self.sparsity else 0) \
            + qat

    def config(self) -> dict[str, Any]:
        """The JSON form stored with the result (only the fields that matter)."""
        c = asdict(self)
        if not self.ratio or self.round_to is None:
            c.pop("round_to")
        if not self.ratio:
            c.pop("distill"), c.pop("epochs")
        if not self.sparsity:
            c.pop("sparse_epochs")
        if self.format != "ptq":
            c.pop("fallback"), c.pop("ptq_drop")
        if self.format == "fp32":
            c.pop("bits")
        return c

    def label(self) -> str:
        """Short human name, e.g. ``struct0.5+kd4 | sparse0.7 | ptq-int8``."""
        parts = []
        if self.ratio:
            width = f"/{self.round_to}" if self.round_to else ""
            parts.append(f"struct{self.ratio:g}{width}+{'kd' if self.distill else 'ft'}"
                         f"{self.epochs}")
        if self.sparsity:
            parts.append(f"sparse{self.sparsity:g}")
        if self.format == "ptq":
            parts.append("ptq-int8" + ("" if self.fallback else "-all"))
        elif self.format != "fp32":
            parts.append(f"{self.format}{self.bits}")
        return " | ".join(parts) or "fp32"

    def step_list(self, *, importance: str = "l2", ignored_layers: list[str] | None = None,
                  ptq_time_s: float | None = None) -> list[tuple[str, dict[str, Any]]]:
        """``[(step name, params)]`` of this candidate's recipe, in order. ``ptq_time_s``
        bounds ptq's own search (not part of the candidate's identity)."""
        steps: list[tuple[str, dict[str, Any]]] = []
        if self.ratio:
            params: dict[str, Any] = {"ratio": self.ratio, "importance": importance}
            if self.round_to:
                params["round_to"] = self.round_to
            if ignored_layers:
                params["ignored_layers"] = list(ignored_layers)
            steps.append(("prune_structured", params))
            if self.epochs:
                steps.append(("distill" if self.distill else "finetune", {"epochs": self.epochs}))
        if self.sparsity:
            steps.append(("prune", {"sparsity": self.sparsity, "scope": "global",
                                    "epochs": self.sparse_epochs}))
        if self.format == "qat":
            steps.append(("quantize", {"bits": self.bits, "epochs": 1}))
        elif self.format == "pack":
            steps.append(("pack", {"bits": self.bits}))
        elif self.format == "ptq":
            steps.append(("ptq", _ptq_params(self, ptq_time_s)))
        return steps

    def recipe(self, **kwargs: Any) -> Recipe:
        """The validated recipe that builds this candidate (``step_list``'s keywords)."""
        return Recipe(steps=[Step(n, p) for n, p in self.step_list(**kwargs)])

    def steps_needed(self) -> set[str]:
        return {name for name, _ in self.step_list()}


def _ptq_params(c: Candidate, time_s: float | None) -> dict[str, Any]:
    """Parameters of the ``ptq`` recipe step for this candidate (only keys the step knows)."""
    from edgeslim.recipe.steps import STEPS

    keys = STEPS["ptq"].keys() if "ptq" in STEPS else set()
    params: dict[str, Any] = {}
    if "max_drop" in keys:
        # with fallback, ptq keeps layers in fp32 until the drop fits; without, int8 throughout
        params["max_drop"] = c.ptq_drop if c.fallback else 1.0
    if time_s is not None and "time_budget_s" in keys:
        params["time_budget_s"] = round(float(time_s), 1)
    return params


def model_hash(model: Any) -> str:
    """sha256 of a torch model's state dict (names, shapes, bytes) or of an ONNX file."""
    h = hashlib.sha256()
    if hasattr(model, "state_dict"):
        for name, tensor in sorted(model.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(str(t.dtype).encode())
            h.update(t.numpy().tobytes())
        h.update(type(model).__name__.encode())
    else:
        from pathlib import Path

        h.update(Path(model).read_bytes())
    return h.hexdigest()


def candidate_key(mhash: str, workload: str, candidate: Candidate, *, seed: int = 0,
                  measure: dict[str, Any] | None = None) -> str:
    """The store key of ``candidate`` for the model with hash ``mhash``; ``measure`` holds
    the measurement settings (threads, throughput batch) the stored figures depend on."""
    blob = json.dumps({"model": mhash, "workload": workload, "candidate": candidate.config(),
                       "seed": seed, "measure": measure or {}, "v": SEARCH_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
