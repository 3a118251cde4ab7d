"""Per-layer pruning sensitivity: how much the metric drops when one layer alone is pruned.

For each ``nn.Linear`` / convolution weight (largest first, at most ``max_layers``), the
``ratios`` smallest-magnitude fractions of that layer's weights are zeroed (the seed's
weight clipping, no fine-tuning), the model is scored on the workload, and the weights are
put back. A layer whose drop is large at a modest ratio is where accuracy lives; the report
plots this next to the sparsity the chosen candidate ended with. When ``ptq`` ran, its own
per-layer int8 sensitivity is shown instead (see ``edgeslim.optimize.report``).
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["layer_sensitivity"]


def layer_sensitivity(model: Any, workload: Any, *, ratios: tuple[float, ...] = (0.5, 0.8),
                      max_layers: int = 24, deadline: float | None = None) \
        -> list[dict[str, Any]]:
    """``[{"layer", "params", "drop@R": metric drop at ratio R, ...}]`` (largest layer first).

    Stops early (returning what it has) when ``time.monotonic()`` passes ``deadline``.
    """
    import torch

    from edgeslim.compress.prune import prunable_layers

    model.eval()
    base = float(workload.evaluate(model))
    layers = sorted(prunable_layers(model).items(), key=lambda kv: -kv[1].weight.numel())
    out: list[dict[str, Any]] = []
    for name, module in layers[:max_layers]:
        if deadline is not None and time.monotonic() > deadline:
            break
        weight = module.weight
        saved = weight.detach().clone()
        row: dict[str, Any] = {"layer": name, "params": int(weight.numel())}
        flat = saved.abs().flatten()
        for r in ratios:
            k = round(r * flat.numel())
            if k <= 0:
                row[f"drop@{r:g}"] = 0.0
                continue
            threshold = flat.kthvalue(k).values
            with torch.no_grad():
                weight.copy_(torch.where(saved.abs() <= threshold, torch.zeros_like(saved),
                                         saved))
            row[f"drop@{r:g}"] = base - float(workload.evaluate(model))
            with torch.no_grad():
                weight.copy_(saved)
        out.append(row)
    return out
