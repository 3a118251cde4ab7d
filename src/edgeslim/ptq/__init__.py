"""Post-training quantization of ONNX models, on onnxruntime's quantizer and kernels.

One verb, ``quantize``: calibrate on the user's data, quantize (static int8, row-wise dynamic
int8, or weight-only int4/int8), measure against the float model, fall back the most sensitive
nodes to float until ``max_drop`` holds, keep the best. ``quantize_int8_preset`` picks the
settings from the task. The building blocks are public too: ``equalize`` (cross-layer
equalization), ``round_weights`` (GPTQ rounding + bias correction), ``smooth_matmuls``
(SmoothQuant), ``rowwise_dynamic`` and ``static_inputs``, ``quantize_weight_only``,
``sensitivity_analysis``.
"""

from __future__ import annotations

from edgeslim.ptq.calibrate import CALIBRATION_METHODS, FeedReader, to_feeds
from edgeslim.ptq.dynamic import (
    input_statistics,
    quantize_dynamic_ort,
    quantize_embeddings,
    rowwise_dynamic,
    static_inputs,
)
from edgeslim.ptq.equalize import equalize, find_pairs
from edgeslim.ptq.metrics import classification_metrics, embedding_metrics
from edgeslim.ptq.presets import DEFAULT_MAX_DROP, quantize_int8_preset
from edgeslim.ptq.rounding import round_weights
from edgeslim.ptq.search import SCHEMES, QuantizationResult, quantize
from edgeslim.ptq.sensitivity import SensitivityReport, sensitivity_analysis
from edgeslim.ptq.smooth import smooth_matmuls
from edgeslim.ptq.static import ort_quantize_static, preprocess
from edgeslim.ptq.weight_only import quantize_weight_only

__all__ = [
    "CALIBRATION_METHODS",
    "DEFAULT_MAX_DROP",
    "SCHEMES",
    "FeedReader",
    "QuantizationResult",
    "SensitivityReport",
    "classification_metrics",
    "embedding_metrics",
    "equalize",
    "find_pairs",
    "input_statistics",
    "ort_quantize_static",
    "preprocess",
    "quantize",
    "quantize_dynamic_ort",
    "quantize_embeddings",
    "quantize_int8_preset",
    "quantize_weight_only",
    "round_weights",
    "rowwise_dynamic",
    "sensitivity_analysis",
    "smooth_matmuls",
    "static_inputs",
    "to_feeds",
]
