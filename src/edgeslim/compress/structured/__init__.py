"""Structured pruning: neurons, channels and attention heads removed for real.

Layered like torch-pruning: ``graph`` (DepGraph tracing, output protection), ``importance``
(which channels matter), ``attention`` (heads), ``pruner`` (``prune_structured``), ``report``.
"""

from __future__ import annotations

from edgeslim.compress.structured.importance import IMPORTANCES, ActivationImportance
from edgeslim.compress.structured.pruner import check_structured, prune_structured
from edgeslim.compress.structured.report import LayerWidth, StructuredReport, StructuredResult

__all__ = [
    "IMPORTANCES",
    "ActivationImportance",
    "LayerWidth",
    "StructuredReport",
    "StructuredResult",
    "check_structured",
    "prune_structured",
]
