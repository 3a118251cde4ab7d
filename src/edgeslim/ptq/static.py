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
the range of each tensor, then its histogram) need one batch's tensors in memory. Percentile
histograms use exactly the edges onnxruntime would draw, so the ranges are onnxruntime's;
entropy ranges come from TensorRT's KL-divergence search (``entropy_range``), since
onnxruntime's, as ``quantize_static`` configures it, returns minmax's ranges.
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
from edgeslim.errors import ConfigError
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

    # onnxruntime's symbolic shape inference saves the graph it could not finish into the
    # working directory (sym_shape_infer_temp.onnx, with its .data) before it raises
    litter = [Path(n) for n in ("sym_shape_infer_temp.onnx", "sym_shape_infer_temp.onnx.data")]
    litter = [p for p in litter if not p.exists()]
    with tempfile.TemporaryDirectory(prefix="edgeslim-ptq-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(src))
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        except Exception:  # symbolic shape inference is brittle on exotic graphs
            for p in litter:
                p.unlink(missing_ok=True)
            try:
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
            except Exception:
                return model
        return onnx.load(str(dst))


HISTOGRAM_METHODS = ("percentile", "entropy")
# Entropy calibration histograms magnitudes over [0, m], m the largest, in this many bins: the
# range is chosen to 1/2048 of m.
ENTROPY_BINS = 2048


def entropy_range(hist: Any, edges: Any, lowest: Any, highest: Any) -> tuple[Any, Any]:
    """The activation range whose quantization loses the least information about ``hist``.

    The KL-divergence calibration of TensorRT (Migacz, "8-bit Inference with TensorRT", 2017,
    as NVIDIA's pytorch-quantization runs it): ``hist`` counts the magnitudes of a tensor's
    values in bins of ``edges`` from 0 to the largest magnitude. The first bin's count is
    replaced by the second's, so that the exact zeros of a ReLU do not dominate the search.
    For each candidate threshold (a bin edge, from ``levels`` bins up) the reference is the
    histogram up to it with the clipped values added to its last bin, and the candidate is the
    same bins merged into ``levels`` equal groups, each group's count spread evenly over its
    non-empty bins; the largest threshold of least KL divergence from reference to candidate
    wins. A threshold whose last bin is empty while values beyond it are clipped has infinite
    divergence. ``levels`` is what 8 bits give the side of zero the range covers: 256 for a
    tensor that is never negative (``[0, t]`` in uint8), 128 for one of both signs. Returns
    ``(max(-t, lowest), min(t, highest))``.

    (onnxruntime's own entropy calibrator is not used: its ``quantize_static`` fixes 128 bins
    and 128 levels, with which the search has one candidate, the whole range, so that it
    returns minmax's ranges (onnxruntime#9597); given more bins, its search lets a ReLU's zeros
    decide, and on efficientnet-lite0 it clipped ReLU6 outputs to an eighth of their range.)
    """
    import numpy as np

    counts = np.asarray(hist, dtype=np.float64).copy()
    size = counts.size
    levels = 256 if lowest >= 0 else 128
    if size < 2 or size <= levels or not counts.sum() or not edges[-1] > 0:
        return lowest, highest
    counts[0] = counts[1]
    beyond = np.concatenate((np.cumsum(counts[::-1])[::-1][1:], [0.0]))  # beyond[k]: counts[k+1:]
    best, best_i = np.inf, size
    for i in range(levels, size + 1):
        window = counts[:i]
        group = (np.arange(i) * levels) // i  # the level each bin falls in
        filled = window > 0
        sums = np.bincount(group, weights=window, minlength=levels)
        members = np.bincount(group, weights=filled, minlength=levels)
        q = np.where(filled, sums[group] / np.maximum(members[group], 1), 0.0)
        p = window.copy()
        p[-1] += beyond[i - 1]
        present = p > 0
        if (q[present] == 0).any():
            continue  # clipped values where the candidate has nothing: infinite divergence
        pn, qn = p[present] / p.sum(), q[present] / q.sum()
        divergence = float(np.sum(pn * np.log(pn / qn)))
        if divergence <= best:  # ties go to the larger threshold
            best, best_i = divergence, i
    t = edges[best_i]
    low, high = max(-t, lowest), min(t, highest)
    return (low, high) if low <= high else (lowest, highest)


def histogram_ranges(model_path: Path, feeds: Sequence[dict], method: str, percentile: float,
                     cache: Path) -> bool:
    """Write to ``cache`` the activation ranges of ``method``, reading ``feeds`` a batch at a time.

    ``method``: ``"percentile"`` (the ranges onnxruntime's symmetric percentile calibrator
    computes, see the module doc) or ``"entropy"`` (``entropy_range`` on a histogram of
    magnitudes); ``model_path``: the float model as ``quantize_static`` gets it. Both read the
    batches twice: once for each tensor's range, then for its histogram. For percentile,
    returns False, writing nothing, when a calibrated tensor holds NaN or infinity or no value
    at all, or when onnxruntime's percentile calibrator is not the symmetric one reproduced here
    (onnxruntime's own calibrator then runs). Entropy refuses NaN and infinity with a
    ConfigError naming the tensor, and gives a tensor without values the range [0, 0].
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
    percentiles = method == "percentile"
    with tempfile.TemporaryDirectory(prefix="edgeslim-calib-") as tmp:
        # what quantize_static calibrates: the shape-inferred model, every quantizable op type;
        # the percentile calibrator is the one quantize_static creates for these options
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
        if percentiles and not calibrator.symmetric:
            return False  # onnxruntime histograms signed values then, not what is done here
        session = calibrator.infer_session
        names = [o.name for o in session.get_outputs()]
        wanted = [(i, n) for i, n in enumerate(names) if n in calibrator.tensors_to_calibrate]
        # pass 1: the signed range (and, for percentile, the smallest magnitude) of every
        # tensor
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
                    if percentiles:
                        return False
                    raise ConfigError(
                        f"Entropy calibration needs finite values, but the tensor {name!r} "
                        "holds NaN or infinity on the calibration data. Check the data, or "
                        "calibrate with 'minmax' or 'percentile'."
                    )
                lo[name] = min(lo.get(name, math.inf), values.min())
                hi[name] = max(hi.get(name, -math.inf), values.max())
                if percentiles:  # entropy's histogram starts at zero
                    abs_lo[name] = min(abs_lo.get(name, math.inf), np.absolute(values).min())
        if len(lo) != len(wanted):
            if percentiles:
                return False  # a tensor without values: onnxruntime's own rules apply
            for _, name in wanted:  # as onnxruntime does, the range of no values is [0, 0]
                lo.setdefault(name, np.float32(0))
                hi.setdefault(name, np.float32(0))
        # pass 2: histograms of magnitudes up to the largest (that of the signed range's ends).
        # Percentile: from the smallest magnitude, over the edges numpy draws for all the values
        # at once, as onnxruntime does; entropy: from zero, in ENTROPY_BINS bins.
        largest = {name: max(abs(lo[name]), abs(hi[name])) for name in lo}
        edges = {
            name: (np.histogram_bin_edges(np.array([abs_lo[name], largest[name]]),
                                          bins=calibrator.num_bins) if percentiles
                   else np.linspace(0, largest[name] if largest[name] > 0 else 1,
                                    ENTROPY_BINS + 1, dtype=lo[name].dtype))
            for name in lo
        }
        counts = {name: np.zeros(len(e) - 1, dtype=np.int64) for name, e in edges.items()}
        for feed in feeds:
            outputs = session.run(None, feed)
            for i, name in wanted:
                if outputs[i].size:
                    counts[name] += np.histogram(np.absolute(outputs[i]), bins=edges[name])[0]
        if percentiles:
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
                name: (*entropy_range(counts[name], edges[name], lo[name], hi[name]),
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
