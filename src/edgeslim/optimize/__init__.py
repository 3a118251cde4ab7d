"""From a budget to the best model: compression search, device profiles, reports.

``optimize(model, max_drop=0.01, time_budget="10m", out=..., report_dir=...)`` searches
structured pruning, unstructured sparsity, distillation and number formats for the Pareto
front of metric against latency and size on onnxruntime, keeps every result in a SQLite store
(so a second call resumes), and writes the best bundle meeting the budget, or the closest one
with the failed constraints named in its manifest. See ``docs/optimize.md``.

Layout: ``space`` (candidates and their recipes), ``store`` (SQLite, WAL), ``measure``
(onnxruntime latency/throughput), ``sensitivity`` (per-layer), ``search`` (the plan),
``select`` (budget, Pareto front, the pick), ``profile`` (device profiles), ``report`` and
``plots`` (HTML + PNG), ``api`` (``optimize``).
"""

from __future__ import annotations

from edgeslim.optimize.api import OptimizeResult, optimize, parse_duration
from edgeslim.optimize.profile import DeviceProfile, load_profile, profile_from_labels
from edgeslim.optimize.report import write_report
from edgeslim.optimize.select import Budget
from edgeslim.optimize.space import Candidate
from edgeslim.optimize.store import ResultStore

__all__ = [
    "Budget",
    "Candidate",
    "DeviceProfile",
    "OptimizeResult",
    "ResultStore",
    "load_profile",
    "optimize",
    "parse_duration",
    "profile_from_labels",
    "write_report",
]
