"""Static int8 quantization (activation ranges calibrated on the user's data), on onnxruntime.

onnxruntime's ``quantize_static`` does the graph rewriting (QDQ or QOperator) and supplies the
kernels. edgeslim adds, before it: cross-layer equalization (``equalize.py``), error-compensating
weight rounding and bias correction (``rounding.py``), all computed on calibration data, and
passes the rounded weights through onnxruntime's quantizer unchanged (they already lie on its
grid). Calibration ranges can be cached in a file so a search re-quantizes without recalibrating.

Percentile and entropy ranges are computed here, a batch at a time (``histogram_ranges``),
and handed to ``quantize_static`` as its calibration cache. onnxruntime's own histogram
calibrators keep every intermediate tensor of every calibration sample until they build their
histograms: 11.8 GB for efficientnet-lite0 on 160 crops. Two passes over the batches (first
the range of each tensor, then its histogram over exactly the edges onnxruntime would draw)
give the same histograms, and so the same ranges, with one batch's tensors in memory.
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

__all__ = [
    "FORMATS",
    "HISTOGRAM_METHODS",
    "WEIGHT_ROUNDING",
    "histogram_ranges",
    "ort_quantize_static",
    "preprocess",
]

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


HISTOGRAM_METHODS = ("percentile", "entropy")
# Entropy calibration's histogram: bins over [-m, m] (m the largest magnitude; odd, so that one
# bin is centred on zero) and the levels each candidate range is quantized to in the search.
# onnxruntime's quantize_static keeps its calibrator's defaults, 128 and 128, with which the
# search has a single candidate, the whole range: entropy then gives minmax's ranges
# (onnxruntime#9597). 255 levels are int8's; the bins give the range to 1/1023 of m.
ENTROPY_BINS = 2047
ENTROPY_LEVELS = 255


def entropy_threshold(hist: Any, edges: Any, lowest: Any, highest: Any,
                      levels: int) -> tuple[Any, Any]:
    """The range ``[-t, t]`` (clipped to ``[lowest, highest]``) whose quantization to ``levels``
    levels loses the least information (KL divergence) about the histogram, as onnxruntime's
    ``HistogramCollector.get_entropy_threshold`` chooses it, with its loops over bins done by
    numpy: the same candidates, distributions and divergences, so the same choice, in a small
    fraction of the time (tests compare the two).

    ``hist``: counts of a signed histogram whose bins are centred on zero (``edges`` from
    ``-m`` to ``m``); ``levels``: the number of quantized bins.
    """
    import numpy as np
    from onnxruntime.quantization.calibrate import entropy
    from onnxruntime.quantization.quant_utils import smooth_distribution

    hist = np.asarray(hist)
    n = hist.size
    zero = n // 2
    half = levels // 2
    dtype = edges.dtype
    before = np.concatenate(([0], np.cumsum(hist)))  # before[k] = hist[:k].sum()
    total = before[-1]
    divergences = np.zeros(zero - half + 1)
    bounds = []
    for i in range(half, zero + 1):
        start, end = zero - i, min(zero + i + 1, n)
        bounds.append((start, end))
        window = hist[start:end]
        # the reference: the window with the outliers on either side folded into its ends
        p = window.copy()
        p[0] += before[start]
        p[-1] += total - before[end]
        merged = window.size // levels
        whole = levels * merged
        # the candidate: the window merged into `levels` bins, each spread evenly over the
        # bins of its group where the reference is non-zero (onnxruntime's integer counts)
        quantized = window[:whole].reshape(levels, merged).sum(axis=1)
        quantized[-1] += window[whole:].sum()
        nonzero = (p[:whole] != 0).reshape(levels, merged).sum(axis=1)
        spread = np.where(nonzero != 0, quantized / np.maximum(nonzero, 1), 0.0)
        q = np.zeros(p.size, dtype=np.int64)
        q[:whole] = np.repeat(spread, merged)
        p, q = smooth_distribution(p), smooth_distribution(q)
        divergences[i - half] = (np.inf if p is None or q is None
                                 else np.array(entropy(p, q), dtype=dtype))
    start, end = bounds[int(np.argmin(divergences))]
    low, high = edges[start], edges[end]
    return (lowest if low < lowest else low), (highest if high > highest else high)


def histogram_ranges(model_path: Path, feeds: Sequence[dict], method: str, percentile: float,
                     cache: Path) -> bool:
    """Write to ``cache`` the ranges ``quantize_static`` would compute (see module doc).

    ``method``: ``"percentile"`` (histograms of magnitudes, onnxruntime's symmetric percentile
    calibrator) or ``"entropy"`` (histograms of signed values over the largest magnitude,
    onnxruntime's entropy calibrator); ``model_path``: the float model as ``quantize_static``
    gets it. Returns False, writing nothing, when a calibrated tensor holds NaN or infinity or
    no value at all, or when onnxruntime's calibrator is not the one this reproduces
    (onnxruntime's own calibrator then runs as before).
    """
    import numpy as np
    import onnx
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        HistogramCollector,
        TensorsData,
        create_calibrator,
        save_tensors_data,
    )
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    check_choice(method, "method", "histogram_ranges", HISTOGRAM_METHODS)
    with tempfile.TemporaryDirectory(prefix="edgeslim-calib-") as tmp:
        # what quantize_static calibrates: the shape-inferred model, every quantizable op type,
        # the calibrator quantize_static creates for these options
        inferred = Path(tmp) / "model.onnx"
        onnx.save_model(load_model_with_shape_infer(Path(model_path)), str(inferred),
                        save_as_external_data=True)
        calibrator = create_calibrator(
            inferred,
            list(set(QLinearOpsRegistry) | set(QDQRegistry)),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=(CalibrationMethod.Percentile if method == "percentile"
                              else CalibrationMethod.Entropy),
            extra_options=({"percentile": percentile} if method == "percentile"
                           else {"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_LEVELS}),
        )
        # onnxruntime histograms magnitudes for the symmetric percentile calibrator and signed
        # values for entropy; anything else is not what is reproduced here
        magnitudes = method == "percentile"
        if calibrator.method != method or (magnitudes and not calibrator.symmetric):
            return False
        session = calibrator.infer_session
        names = [o.name for o in session.get_outputs()]
        wanted = [(i, n) for i, n in enumerate(names) if n in calibrator.tensors_to_calibrate]
        # pass 1: the signed range (and for magnitudes the smallest magnitude) of every tensor
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
                if magnitudes:
                    abs_lo[name] = min(abs_lo.get(name, math.inf), np.absolute(values).min())
        if len(lo) != len(wanted):
            return False  # a tensor without values: onnxruntime's own rules apply
        # pass 2: histograms over the edges numpy draws for all the values at once. Magnitudes:
        # from the smallest to the largest magnitude (that of the signed range's ends). Signed
        # values: onnxruntime's fixed range, plus and minus the largest magnitude in the
        # tensor's own dtype.
        thresholds = {name: np.array(max(abs(lo[name]), abs(hi[name])), dtype=lo[name].dtype)
                      for name in lo}
        if magnitudes:
            edges = {
                name: np.histogram_bin_edges(np.array([abs_lo[name], thresholds[name]]),
                                             bins=calibrator.num_bins)
                for name in lo
            }
        else:
            edges = {
                name: np.histogram_bin_edges(np.empty(0, dtype=lo[name].dtype),
                                             bins=calibrator.num_bins,
                                             range=(-thresholds[name], thresholds[name]))
                for name in lo
            }
        counts = {name: np.zeros(len(e) - 1, dtype=np.int64) for name, e in edges.items()}
        for feed in feeds:
            outputs = session.run(None, feed)
            for i, name in wanted:
                if outputs[i].size:
                    values = np.absolute(outputs[i]) if magnitudes else outputs[i]
                    counts[name] += np.histogram(values, bins=edges[name])[0]
        if magnitudes:
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
            ranges = calibrator.compute_data()
        else:
            ranges = TensorsData(CalibrationMethod.Entropy, {
                name: (*entropy_threshold(counts[name], edges[name], lo[name], hi[name],
                                          calibrator.num_quantized_bins),
                       counts[name], edges[name])
                for name in counts
            })
        save_tensors_data(ranges, cache)
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
            and method in HISTOGRAM_METHODS
            and not cache.is_file()
            and histogram_ranges(src, feeds, method, percentile, cache)
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
