"""Static int8 quantization (activation ranges calibrated on the user's data), on onnxruntime.

onnxruntime's ``quantize_static`` does the graph rewriting (QDQ or QOperator) and supplies the
kernels. edgeslim adds, before it: cross-layer equalization (``equalize.py``), error-compensating
weight rounding and bias correction (``rounding.py``), all computed on calibration data, and
passes the rounded weights through onnxruntime's quantizer unchanged (they already lie on its
grid). Calibration ranges can be cached in a file so a search re-quantizes without recalibrating.

Percentile ranges are computed here, a batch at a time (``percentile_ranges``), and handed to
``quantize_static`` as its calibration cache. onnxruntime's own percentile calibrator keeps
every intermediate tensor of every calibration sample until it builds its histograms: 11.8 GB
for efficientnet-lite0 on 160 crops. Two passes over the batches (first the range of each
tensor, then its histogram over exactly the edges onnxruntime would draw) give the same
histograms, and so the same ranges, with one batch's tensors in memory.
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeslim._validate import check_choice
from edgeslim.ptq.calibrate import CALIBRATION_METHODS, FeedReader

__all__ = ["FORMATS", "WEIGHT_ROUNDING", "ort_quantize_static", "percentile_ranges", "preprocess"]

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


def percentile_ranges(model_path: Path, feeds: Sequence[dict], percentile: float,
                      cache: Path) -> bool:
    """Write to ``cache`` the percentile ranges ``quantize_static`` would compute (see module doc).

    ``model_path``: the float model as ``quantize_static`` gets it. Returns False, writing
    nothing, when a calibrated tensor holds NaN or infinity, or when onnxruntime's percentile
    calibrator is not the symmetric one this reproduces (onnxruntime's own calibrator then
    runs as before).
    """
    import numpy as np
    import onnx
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        HistogramCollector,
        create_calibrator,
        save_tensors_data,
    )
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    with tempfile.TemporaryDirectory(prefix="edgeslim-calib-") as tmp:
        # what quantize_static calibrates: the shape-inferred model, every quantizable op type
        inferred = Path(tmp) / "model.onnx"
        onnx.save_model(load_model_with_shape_infer(Path(model_path)), str(inferred),
                        save_as_external_data=True)
        calibrator = create_calibrator(
            inferred,
            list(set(QLinearOpsRegistry) | set(QDQRegistry)),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"percentile": percentile},
        )
        if calibrator.method != "percentile" or not calibrator.symmetric:
            return False  # onnxruntime histograms signed values then, not what is done here
        session = calibrator.infer_session
        names = [o.name for o in session.get_outputs()]
        wanted = [(i, n) for i, n in enumerate(names) if n in calibrator.tensors_to_calibrate]
        # pass 1: the signed range and the smallest magnitude of every tensor
        lo: dict[str, Any] = {}
        hi: dict[str, Any] = {}
        abs_lo: dict[str, Any] = {}
        for feed in feeds:
            outputs = session.run(None, feed)
            for i, name in wanted:
                values = outputs[i]
                if values.size == 0:
                    continue
                if not np.isfinite(values).all():
                    return False
                lo[name] = min(lo.get(name, math.inf), values.min())
                hi[name] = max(hi.get(name, -math.inf), values.max())
                abs_lo[name] = min(abs_lo.get(name, math.inf), np.absolute(values).min())
        # pass 2: histograms over the edges numpy draws for all the values at once (the
        # largest magnitude is that of the signed range's ends)
        edges = {
            name: np.histogram_bin_edges(
                np.array([abs_lo[name], max(abs(lo[name]), abs(hi[name]))]),
                bins=calibrator.num_bins,
            )
            for name in abs_lo
        }
        counts = {name: np.zeros(len(e) - 1, dtype=np.int64) for name, e in edges.items()}
        for feed in feeds:
            outputs = session.run(None, feed)
            for i, name in wanted:
                if name in counts and outputs[i].size:
                    counts[name] += np.histogram(np.absolute(outputs[i]), bins=edges[name])[0]
        collector = HistogramCollector(
            method=calibrator.method,
            symmetric=calibrator.symmetric,
            num_bins=calibrator.num_bins,
            num_quantized_bins=calibrator.num_quantized_bins,
            percentile=calibrator.percentile,
            scenario=calibrator.scenario,
        )
        collector.histogram_dict = {
            name: (counts[name], edges[name], lo[name], hi[name]) for name in counts
        }
        calibrator.collector = collector
        save_tensors_data(calibrator.compute_data(), cache)
        del calibrator, session
    return True


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
        feeds = list(feeds)  # read more than once below
        cache = Path(calibration_cache) if calibration_cache else Path(tmp) / "ranges.json"
        if (
            not defaults
            and method == "percentile"
            and not cache.is_file()
            and percentile_ranges(src, feeds, percentile, cache)
        ):
            calibration_cache = cache
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
