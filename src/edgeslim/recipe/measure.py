"""Per-step measurements for the recipe table: parameters, non-zeros, size, metric, latency."""

from __future__ import annotations

import statistics
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["StepMetrics", "count_params", "measure", "weights_size_bytes"]


@dataclass
class StepMetrics:
    """One row of the recipe table.

    ``size_bytes`` is the deflated size of the weights as stored (float32, or the integer
    grid width when the step quantized them), so pruning's zeros and quantization's fewer
    levels both show. ``latency_ms`` is PyTorch eager p50 at batch 1 (50 runs after 5 warm-up
    runs) with torch's thread count as the process has it (every core unless set).
    """

    step: str
    params: int
    nonzero: int
    size_bytes: int
    metric: float
    latency_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(parameters, non-zero parameters)``."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero


def weights_size_bytes(model: nn.Module, bits: int = 32) -> int:
    """Deflated bytes of all parameters; below 32 bits each tensor is stored on its grid."""
    chunks = []
    for p in model.parameters():
        w = p.detach().cpu().numpy().astype(np.float32).ravel()
        if bits < 32 and w.size:
            uniq, codes = np.unique(w, return_inverse=True)
            dtype = np.uint8 if len(uniq) <= 256 else np.uint16
            chunks.append(uniq.astype(np.float32).tobytes() + codes.astype(dtype).tobytes())
        else:
            chunks.append(w.tobytes())
    return len(zlib.compress(b"".join(chunks), 9))


@torch.no_grad()
def _latency_ms(model: nn.Module, example: Any, repeats: int = 50) -> float:
    args = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    model.eval()
    for _ in range(5):
        model(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(*args)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(step: str, model: nn.Module, workload: Any, *, bits: int = 32) -> StepMetrics:
    """Measure ``model`` after ``step`` on ``workload``."""
    params, nonzero = count_params(model)
    return StepMetrics(
        step=step,
        params=params,
        nonzero=nonzero,
        size_bytes=weights_size_bytes(model, bits),
        metric=float(workload.evaluate(model)),
        latency_ms=_latency_ms(model, workload.example_inputs),
    )
