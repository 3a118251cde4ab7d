"""One way to open an onnxruntime CPU session for measuring and checking (no torch, no onnx).

Pinned intra-op threads, one inter-op thread, warnings silenced. The edge runtime
(``edgeslim.edge.runtime.Runner``) makes its own serving sessions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["ort_session"]


def ort_session(model: Any, *, threads: int = 2, optimize: bool = True,
                spin: bool = True) -> Any:
    """An onnxruntime CPU session for ``model``: bytes, a path, or an ``onnx.ModelProto``.

    ``optimize=False`` disables graph optimisations (to observe the graph as written).
    ``spin=False`` lets the session's idle threads sleep at once instead of spinning after
    each run: what a benchmark that alternates several sessions needs, or one session's
    spinning threads take the cores from the next (measured: onnxruntime fp32 minilm-l6 at
    12-15 ms interleaved with two other spinning sessions, 5 ms without spinning).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(model, Path):
        model = str(model)
    elif not isinstance(model, (str, bytes)):
        model = model.SerializeToString()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
