"""Export trained torch models to ONNX, checked against onnxruntime.

``export_onnx`` is the generic path; ``zoo_io_spec``/``export_zoo_model`` know the canonical
input/output names, dtypes and symbolic shapes of each zoo model.
"""

from __future__ import annotations

from edgeslim.export.onnx import (
    MAX_OPSET,
    MIN_OPSET,
    ExportResult,
    compare_with_onnxruntime,
    export_onnx,
    onnx_param_bytes,
)

__all__ = [
    "MAX_OPSET",
    "MIN_OPSET",
    "ExportResult",
    "compare_with_onnxruntime",
    "export_onnx",
    "onnx_param_bytes",
]
