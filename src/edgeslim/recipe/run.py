"""Run a recipe: each step in order, measured after each, ending in one table."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from edgeslim.recipe.core import Recipe
from edgeslim.recipe.measure import StepMetrics, measure
from edgeslim.recipe.steps import RecipeContext, check_training_data, run_step
from edgeslim.recipe.workload import Workload

__all__ = ["RecipeResult", "render_table", "run_recipe"]


@dataclass
class RecipeResult:
    """The compressed model, one ``StepMetrics`` row per step (the original first), the log."""

    model: Any
    original: Any
    rows: list[StepMetrics]
    log: list[dict[str, Any]] = field(default_factory=list)
    bits: int = 32

    def table(self) -> Any:
        return render_table(self.rows)


def run_recipe(
    recipe: Recipe, model: Any, workload: Workload, *, progress: bool = True, seed: int = 0
) -> RecipeResult:
    """Apply ``recipe`` to a copy of ``model``; the original serves as the teacher.

    Training steps draw their randomness from ``seed``, so the same recipe on the same model
    gives the same bundle.
    """
    import torch
    from rich.console import Console

    recipe.validate()
    check_training_data(recipe.torch_steps, workload)
    torch.manual_seed(seed)
    gen = getattr(workload.train, "generator", None)  # a DataLoader's own shuffling stream
    if gen is not None:
        gen.manual_seed(seed)  # same shuffles whatever ran on this workload before
    console = Console(stderr=True)
    original = copy.deepcopy(model).eval()
    for p in original.parameters():
        p.requires_grad_(False)
    ctx = RecipeContext(model=copy.deepcopy(model), teacher=original, workload=workload,
                        progress=progress)
    rows = [measure("original", original, workload)]
    steps = recipe.torch_steps
    for i, step in enumerate(steps):
        if progress:  # numbered among all the recipe's steps; the ONNX ones come after
            n = len(recipe.steps)
            console.print(f"[bold cyan]step {i + 1}/{n}[/] {step.name} {step.params}")
        report = run_step(ctx, step.name, step.params)
        ctx.model.eval()
        row = measure(step.name, ctx.model, workload, bits=ctx.bits)
        rows.append(row)
        ctx.log.append({"step": step.name, "params": step.params, "report": _plain(report),
                        "metrics": row.to_dict()})
    return RecipeResult(ctx.model, original, rows, ctx.log, ctx.bits)


def _plain(value: Any) -> Any:
    """JSON-friendly copy of a step report (tensors and numpy scalars to floats)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def render_table(rows: list[StepMetrics], metric: str = "accuracy") -> Any:
    from rich.table import Table

    table = Table(title="compression summary")
    for col in ("step", "params", "non-zero", "size (KB)", metric, "Δ", "latency (ms)"):
        table.add_column(col, justify="left" if col == "step" else "right")
    base = rows[0].metric
    for r in rows:
        delta = (r.metric - base) * 100
        table.add_row(
            r.step, f"{r.params:,}", f"{r.nonzero:,}", f"{r.size_bytes / 1024:.1f}",
            f"{r.metric * 100:.2f}%", f"{delta:+.2f} pt", f"{r.latency_ms:.3f}",
        )
    return table
