"""One way to open an onnxruntime CPU session for measuring and checking (no torch, no onnx).

Pinned intra-op threads, one inter-op thread, warnings silenced. The edge runtime
(``edgeslim.edge.runtime.Runner``) makes its own serving sessions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["ort_session"]


def ort_session(model: Any, *, threads: int = 2, optimize: bool = True,
                spin: bool = True, spin_between_runs: bool = True) -> Any:
    """An onnxruntime CPU session for ``model``: bytes, a path, or an ``onnx.ModelProto``.

    ``optimize=False`` disables graph optimisations (to observe the graph as written).
    ``spin=False`` lets the session's idle threads sleep at once instead of spin-waiting for
    the next op. ``spin_between_runs=False`` keeps the spinning within a run but stops it when
    the run returns (onnxruntime's ``session.force_spinning_stop``): what a benchmark that
    times several sessions in turn needs, or one session's threads spin on after its runs and
    take the cores from the next (measured: onnxruntime fp32 efficientnet-lite0 at 10.3 ms
    beside a spinning session of onnxruntime's dynamic int8, 6.4 ms without it, 6.0 ms with
    the spinning stopped after each run).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif not spin_between_runs:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(model, Path):
        model = str(model)
    elif not isinstance(model, (str, bytes)):
        model = model.SerializeToString()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
