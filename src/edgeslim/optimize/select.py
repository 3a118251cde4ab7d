"""Judging candidates against a budget: drop, device latency, size, the Pareto front, the pick.

Everything here is computed from stored measurements, never stored itself, so the same store
can be judged under another budget or device profile without redoing any candidate.

- ``drop`` = baseline metric - candidate metric (both on onnxruntime; 0.01 = one point of
  accuracy). The baseline is the fp32 export of the same model.
- ``latency_ms`` / ``throughput`` are scaled to the device by the profile's factor.
- ``size_mb`` is the ``.eslim`` file in MB (10^6 bytes): what ships to a node.
- A candidate meets the budget when every given constraint holds. The best one maximises the
  objective (``throughput`` by default; or lowest ``latency``, or smallest ``size``); when
  none meets it, the closest is the one failing the fewest constraints, then with the smallest
  sum of relative excesses, and the manifest says which constraints failed. Objective values
  within timing noise of the best (25% for throughput and latency, 10% for size) count as
  tied; the smaller bundle wins the tie (for ``size``: the faster one), then the higher
  metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from edgeslim.errors import ConfigError

__all__ = ["OBJECTIVES", "Budget", "Judged", "judge", "pareto_front", "pick"]

OBJECTIVES = ("throughput", "latency", "size")


@dataclass(frozen=True)
class Budget:
    """The user's goal. ``max_drop`` in metric units; ``latency_ms`` at batch 1 on the device;
    ``size_mb`` of the bundle; ``time_s`` for the whole search."""

    max_drop: float
    latency_ms: float | None = None
    size_mb: float | None = None
    time_s: float = 600.0

    def __post_init__(self) -> None:
        if isinstance(self.max_drop, bool) or not isinstance(self.max_drop, (int, float)) \
                or not 0 <= self.max_drop <= 1:
            raise ConfigError(f"The 'max_drop' parameter of optimize must be a number in "
                              f"[0, 1] (0.01 = one point). Got {self.max_drop!r} instead.")
        for name in ("latency_ms", "size_mb", "time_s"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not 0 < v < math.inf):
                raise ConfigError(f"The '{name}' parameter of optimize must be a finite number "
                                  f"> 0 (leave it out for no limit). Got {v!r} instead.")

    def to_dict(self) -> dict[str, Any]:
        return {"max_drop": self.max_drop, "latency_ms": self.latency_ms,
                "size_mb": self.size_mb, "time_s": self.time_s}


@dataclass
class Judged:
    """One candidate's stored result seen under a budget and a device factor."""

    key: str
    label: str
    config: dict[str, Any]
    result: dict[str, Any]
    metric: float
    drop: float
    latency_ms: float
    throughput: float
    size_mb: float
    failed: list[str] = field(default_factory=list)
    excess: float = 0.0
    pareto: bool = False
    bundle: str | None = None

    @property
    def meets(self) -> bool:
        return not self.failed

    def row(self) -> dict[str, Any]:
        """Plain figures for tables and JSON."""
        return {"key": self.key[:12], "candidate": self.label, "metric": self.metric,
                "drop": self.drop, "latency_ms": self.latency_ms,
                "throughput": self.throughput, "size_mb": self.size_mb,
                "meets": self.meets, "failed": list(self.failed), "pareto": self.pareto,
                "seconds": self.result.get("seconds")}


def judge(key: str, label: str, config: dict[str, Any], result: dict[str, Any], *,
          base_metric: float, budget: Budget, factor: float,
          bundle: str | None = None, size_overhead_mb: float = 0.0) -> Judged:
    """Derive the budget-relative figures of one stored result.

    ``size_overhead_mb``: what the written bundle adds to the candidate's (its verdict in
    the manifest, a signature), so that the size judged is the size that ships.
    """
    metric = float(result["metric"])
    drop = base_metric - metric
    lat = float(result["latency_ms"]) * factor
    thr = float(result["throughput"]) / factor
    size = float(result["bundle_bytes"]) / 1e6 + size_overhead_mb
    failed, excess = [], 0.0
    # a hair of slack so that "no drop at all" passes max_drop=0 despite float noise
    if drop > budget.max_drop + 1e-9:
        failed.append("max_drop")
        excess += (drop - budget.max_drop) / max(budget.max_drop, 0.01)
    if budget.latency_ms is not None and lat > budget.latency_ms:
        failed.append("latency_ms")
        excess += lat / budget.latency_ms - 1
    if budget.size_mb is not None and size > budget.size_mb:
        failed.append("size_mb")
        excess += size / budget.size_mb - 1
    return Judged(key, label, config, result, metric, drop, lat, thr, size, failed, excess,
                  bundle=bundle)


def pareto_front(items: list[Judged]) -> list[Judged]:
    """Candidates no other beats on metric, latency and size at once; marks ``pareto``."""
    front = []
    for a in items:
        dominated = any(
            b is not a and b.metric >= a.metric and b.latency_ms <= a.latency_ms
            and b.size_mb <= a.size_mb
            and (b.metric > a.metric or b.latency_ms < a.latency_ms or b.size_mb < a.size_mb)
            for b in items)
        a.pareto = not dominated
        if a.pareto:
            front.append(a)
    return sorted(front, key=lambda j: j.latency_ms)


def _objective_key(j: Judged, objective: str) -> tuple[float, ...]:
    if objective == "throughput":
        return (-j.throughput, j.size_mb, -j.metric)
    if objective == "latency":
        return (j.latency_ms, j.size_mb, -j.metric)
    return (j.size_mb, -j.throughput, -j.metric)


def pick(items: list[Judged], objective: str = "throughput",
         tolerance: float | None = None) -> Judged | None:
    """The best candidate meeting the budget, else the closest one (fewest constraints
    failed, then the smallest sum of relative excesses).

    Timings on a busy machine move by tens of percent from one measurement to the next, so
    candidates within ``tolerance`` of the best objective value (25% for throughput and
    latency, 10% for size) count as tied; among those the smallest bundle wins, then the
    highest metric (for ``size``: the fastest, then the highest metric).
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"Unknown objective {objective!r}. Allowed: {', '.join(OBJECTIVES)}.")
    if not items:
        return None
    pool = [j for j in items if j.meets]
    if not pool:  # the closest: fewest constraints failed, then the smallest excess
        fewest = min(len(j.failed) for j in items)
        pool = [j for j in items if len(j.failed) == fewest]
        least = min(j.excess for j in pool)
        pool = [j for j in pool if j.excess <= least + 1e-12]
    top = min(pool, key=lambda j: _objective_key(j, objective))
    tol = tolerance if tolerance is not None else (0.1 if objective == "size" else 0.25)
    if objective == "throughput":
        near = [j for j in pool if j.throughput >= (1 - tol) * top.throughput]
    elif objective == "latency":
        near = [j for j in pool if j.latency_ms <= (1 + tol) * top.latency_ms]
    else:
        near = [j for j in pool if j.size_mb <= (1 + tol) * top.size_mb]
        return min(near, key=lambda j: (-j.throughput, -j.metric))
    return min(near, key=lambda j: (j.size_mb, -j.metric))
