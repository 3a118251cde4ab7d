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
from edgeslim.export.specs import (
    ZOO_SPEC_NAMES,
    IOSpec,
    TensorSpec,
    export_zoo_model,
    zoo_io_spec,
)

__all__ = [
    "MAX_OPSET",
    "MIN_OPSET",
    "ZOO_SPEC_NAMES",
    "ExportResult",
    "IOSpec",
    "TensorSpec",
    "compare_with_onnxruntime",
    "export_onnx",
    "export_zoo_model",
    "onnx_param_bytes",
    "zoo_io_spec",
]
