"""Per-layer sensitivity: how much each quantized node costs the model's fidelity.

The analysis quantizes the whole model except one node at a time ("all but one") and measures
the task metric on a slice of the evaluation data; the gain over the fully quantized model is
that node's sensitivity. The report lists nodes from most to least sensitive and is written as
JSON. The analysis stops early when its time budget runs out, and says so in the report.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeslim._validate import check_positive
from edgeslim.errors import ConfigError
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


def _score(metrics: Any, node: str | None = None) -> float:
    """``metrics["score"]`` as a finite float, or a ConfigError saying what ``evaluate`` gave."""
    where = f" for node {node!r}" if node else " for the fully quantized model"
    if not isinstance(metrics, Mapping) or "score" not in metrics:
        raise ConfigError(f"evaluate must return a dict with a 'score' (higher is better); it "
                          f"returned {metrics!r:.120}{where}.")
    try:
        value = float(metrics["score"])
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f"evaluate's 'score'{where} is {metrics['score']!r}; it must be a "
                          "finite number.")
    return value


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
    func = "sensitivity_analysis"
    for what, fn in (("build", build), ("evaluate", evaluate)):
        if not callable(fn):
            raise ConfigError(f"The '{what}' parameter of {func} must be callable. Got "
                              f"{type(fn).__name__} instead.")
    if isinstance(candidates, (str, bytes)) or not all(
            isinstance(c, (tuple, list)) and len(c) == 2 and all(isinstance(v, str) for v in c)
            for c in candidates):
        raise ConfigError(f"The 'candidates' parameter of {func} must be a list of "
                          f"(node_name, op_type) pairs. Got {candidates!r:.120} instead.")
    if time_budget_s is not None:
        check_positive(time_budget_s, "time_budget_s", func, allow_zero=True)
    start = time.perf_counter()
    if base_metrics is None:
        base_metrics = evaluate(build(()))
    base = _score(base_metrics)
    nodes: list[NodeSensitivity] = []
    complete = True
    with progress_bar("sensitivity", total=len(candidates), enabled=progress) as advance:
        for name, op_type in candidates:
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                complete = False
                break
            metrics = evaluate(build([name]))
            score = _score(metrics, name)
            nodes.append(NodeSensitivity(name, op_type, score, score - base, dict(metrics)))
            advance(1, best=max(n.gain for n in nodes))
    nodes.sort(key=_rank_key)
    return SensitivityReport(base, dict(base_metrics), nodes, complete, time.perf_counter() - start)
