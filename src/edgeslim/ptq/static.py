"""Static int8 quantization (activation ranges calibrated on the user's data), on onnxruntime.

onnxruntime's ``quantize_static`` does the graph rewriting (QDQ or QOperator) and supplies the
kernels. edgeslim adds, before it: cross-layer equalization (``equalize.py``), error-compensating
weight rounding and bias correction (``rounding.py``), all computed on calibration data, and
passes the rounded weights through onnxruntime's quantizer unchanged (they already lie on its
grid). Calibration ranges can be cached in a file so a search re-quantizes without recalibrating.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeslim._validate import check_choice
from edgeslim.ptq.calibrate import CALIBRATION_METHODS, FeedReader

__all__ = ["FORMATS", "WEIGHT_ROUNDING", "ort_quantize_static", "preprocess"]

FORMATS = ("qdq", "qoperator")
WEIGHT_ROUNDING = ("nearest", "gptq")


def preprocess(model: Any) -> Any:
    """onnxruntime's recommended pre-processing (shape inference, constant folding, BN fusion).

    Returns the model unchanged when pre-processing fails (for instance on contrib ops).
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="edgeslim-ptq-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(src))
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        except Exception:  # symbolic shape inference is brittle on exotic graphs
            try:
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
            except Exception:
                return model
        return onnx.load(str(dst))


def ort_quantize_static(
    model: Any,
    feeds: Sequence[dict],
    *,
    method: str = "minmax",
    per_channel: bool = True,
    reduce_range: bool = False,
    activation_type: str = "uint8",
    quant_format: str = "qdq",
    exclude: Sequence[str] = (),
    percentile: float = 99.999,
    calibration_cache: str | Path | None = None,
    defaults: bool = False,
) -> Any:
    """onnxruntime's ``quantize_static`` on a ModelProto; returns the quantized ModelProto.

    ``method``: one of ``CALIBRATION_METHODS``; ``activation_type``: ``"uint8"`` (fast u8s8
    kernels on x86) or ``"int8"``; ``quant_format``: ``"qdq"`` or ``"qoperator"``.
    ``calibration_cache``: a JSON file of tensor ranges, written on first use and read after.
    ``defaults=True`` ignores everything else and uses onnxruntime's out-of-the-box settings.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    func = "ort_quantize_static"
    check_choice(method, "method", func, CALIBRATION_METHODS)
    check_choice(activation_type, "activation_type", func, ("uint8", "int8"))
    check_choice(quant_format, "quant_format", func, FORMATS)
    calib = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[method]
    extra: dict[str, Any] = {}
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    # onnxruntime's histogram calibrators print their progress to stdout; edgeslim shows its
    # own, and stdout may carry a command's JSON
    with tempfile.TemporaryDirectory(prefix="edgeslim-ptq-") as tmp, \
            contextlib.redirect_stdout(io.StringIO()):
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(src))
        if defaults:
            quantize_static(str(src), str(dst), FeedReader(list(feeds)))
        else:
            quantize_static(
                str(src),
                str(dst),
                FeedReader(list(feeds)),
                quant_format=QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8 if activation_type == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(exclude),
                calibrate_method=calib,
                extra_options=extra,
                calibration_cache_path=str(calibration_cache) if calibration_cache else None,
            )
        return onnx.load(str(dst))
