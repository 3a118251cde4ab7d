"""Per-layer sensitivity: how much each quantized node costs the model's fidelity.

The analysis quantizes the whole model except one node at a time ("all but one") and measures
the task metric on a slice of the evaluation data; the gain over the fully quantized model is
that node's sensitivity. The report lists nodes from most to least sensitive and is written as
JSON. The analysis stops early when its time budget runs out, and says so in the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeslim.progress import progress_bar

__all__ = ["NodeSensitivity", "SensitivityReport", "sensitivity_analysis"]


@dataclass
class NodeSensitivity:
    """One node: its op type, the score with it kept in float, and the gain over none kept."""

    node: str
    op_type: str
    score: float
    gain: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class SensitivityReport:
    """Nodes sorted by ``gain`` (most sensitive first), with the fully quantized ``base``."""

    base_score: float
    base_metrics: dict[str, float]
    nodes: list[NodeSensitivity]
    complete: bool
    seconds: float
    mode: str = "all_but_one"

    def ranked(self) -> list[str]:
        """Node names, most sensitive first."""
        return [n.node for n in self.nodes]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: str | Path) -> Path:
        """Write the report as JSON (parent folders created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def _rank_key(ns: NodeSensitivity) -> tuple[float, float]:
    # A continuous error, when the metric has one, ranks first: top-1 agreement moves in steps
    # of 1/N and is mostly noise for a single node; the score gain breaks ties.
    err = ns.metrics.get("relative_error")
    if err is not None:
        return (err, -ns.gain)
    return (-ns.gain, 0.0)


def sensitivity_analysis(
    build: Callable[[Sequence[str]], Any],
    evaluate: Callable[[Any], dict[str, float]],
    candidates: Sequence[tuple[str, str]],
    *,
    base_metrics: dict[str, float] | None = None,
    time_budget_s: float | None = None,
    progress: bool = True,
) -> SensitivityReport:
    """Rank ``candidates`` (``(node_name, op_type)`` pairs) by sensitivity.

    ``build(exclude)`` returns the model quantized with the nodes ``exclude`` kept in float;
    ``evaluate(model)`` returns metrics with a ``"score"`` (higher is better).
    """
    start = time.perf_counter()
    if base_metrics is None:
        base_metrics = evaluate(build(()))
    base = float(base_metrics["score"])
    nodes: list[NodeSensitivity] = []
    complete = True
    with progress_bar("sensitivity", total=len(candidates), enabled=progress) as advance:
        for name, op_type in candidates:
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                complete = False
                break
            metrics = evaluate(build([name]))
            score = float(metrics["score"])
            nodes.append(NodeSensitivity(name, op_type, score, score - base, dict(metrics)))
            advance(1, best=max(n.gain for n in nodes))
    nodes.sort(key=_rank_key)
    return SensitivityReport(base, dict(base_metrics), nodes, complete, time.perf_counter() - start)
