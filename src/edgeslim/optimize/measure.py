"""Measure a bundle the way a node runs it: onnxruntime on the CPU, threads pinned.

- batch-1 latency: a warm-up, then runs until ``min_runs`` and ``max_seconds`` are both met
  (capped at ``max_runs``); at most 200 evenly spaced samples are kept (ms) so the report
  can plot the spread;
- batch-``B`` throughput (samples/s): the evaluation inputs tiled to ``B`` rows, median of
  runs until ``min_runs`` and ``max_seconds`` are both met;
- per-layer weights: every weight initializer of two or more dimensions, its shape and the
  fraction of exact zeros (what structured pruning removed shows as smaller shapes,
  unstructured pruning as zeros).

``onnx_latency_ms`` of ``edgeslim.pipeline`` is the one-number version of the latency loop.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from edgeslim._ort import ort_session as _ort_session

__all__ = ["batch_feeds", "layer_table", "measure_model", "ort_session"]


def ort_session(model_bytes: bytes, threads: int) -> Any:
    """An onnxruntime CPU session with ``threads`` intra-op threads and one inter-op thread."""
    return _ort_session(model_bytes, threads=threads)


def batch_feeds(workload: Any, batch: int) -> dict[str, np.ndarray]:
    """The workload's first evaluation inputs, rows tiled (or cut) to ``batch`` rows."""
    first = workload.eval_batches[0][0]
    try:  # all evaluation rows when the batches share their trailing shapes
        pool = tuple(np.concatenate([b[0][i] for b in workload.eval_batches])
                     for i in range(len(first)))
    except ValueError:  # e.g. text batches padded to different lengths
        pool = tuple(first)
    rows = np.arange(batch) % pool[0].shape[0]
    return {n: np.ascontiguousarray(a[rows])
            for n, a in zip(workload.input_names, pool, strict=True)}


def _timed_runs(session: Any, feeds: dict[str, np.ndarray], *, warmup: int, min_runs: int,
                max_runs: int, max_seconds: float) -> list[float]:
    for _ in range(warmup):
        session.run(None, feeds)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs:
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= min_runs and time.perf_counter() - start >= max_seconds:
            break
    return times


def measure_model(model_bytes: bytes, workload: Any, *, threads: int, batch: int = 256,
                  max_seconds: float = 1.0) -> dict[str, Any]:
    """Latency (ms, batch 1), throughput (samples/s, batch ``batch``) and weight table.

    Returns ``{"latency_ms", "latency_samples", "throughput", "batch_ms", "batch", "threads",
    "layers"}``.
    """
    session = ort_session(model_bytes, threads)
    one = batch_feeds(workload, 1)
    lat = _timed_runs(session, one, warmup=10, min_runs=30, max_runs=2000,
                      max_seconds=max_seconds)
    big = batch_feeds(workload, batch)
    runs = _timed_runs(session, big, warmup=2, min_runs=5, max_runs=200,
                       max_seconds=max_seconds)
    batch_ms = statistics.median(runs)
    # keep at most 200 evenly spaced samples: enough for a distribution plot
    step = max(1, -(-len(lat) // 200))
    return {
        "latency_ms": statistics.median(lat),
        "latency_samples": [round(v, 5) for v in lat[::step]],
        "throughput": batch / (batch_ms / 1e3),
        "batch_ms": batch_ms,
        "batch": batch,
        "threads": threads,
        "layers": layer_table(model_bytes),
    }


def layer_table(model_bytes: bytes) -> list[dict[str, Any]]:
    """``[{"name", "shape", "params", "zeros"}]`` for weight initializers of rank >= 2."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(model_bytes)
    out = []
    for init in proto.graph.initializer:
        if len(init.dims) < 2 or int(np.prod(init.dims)) < 16:
            continue
        arr = numpy_helper.to_array(init)
        out.append({"name": init.name, "shape": list(arr.shape), "params": int(arr.size),
                    "zeros": float((arr == 0).mean())})
    return out
