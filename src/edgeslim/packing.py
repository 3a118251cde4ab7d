"""Deep-Compression-style packing of an ONNX model: weight sharing plus entropy coding.

After Han et al. 2016 ("Deep Compression"): pruned weights are clustered per layer with
k-means into ``2**bits - 1`` shared values plus an exact zero, stored as ``uint8`` codes with a
small float codebook, and the bundle's zip entry is lzma-compressed, which plays the part of
the paper's Huffman coding (the long runs of the zero code cost almost nothing).

The graph stays plain ONNX that stock onnxruntime runs: each packed weight is rebuilt by
``Gather(codebook, Cast(codes, int32))``, which onnxruntime constant-folds when the session is
created, so inference speed is that of the float model. This module is the project's own
contribution; it needs numpy and onnx only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeslim._validate import check_int_range
from edgeslim.errors import ConfigError

__all__ = ["PackReport", "kmeans_codebook", "share_weights"]

_WEIGHT_INPUT = {"Conv": 1, "Gemm": 1, "MatMul": 1, "ConvTranspose": 1}


@dataclass
class PackReport:
    """Which initializers were packed, with their sizes before/after (bytes, uncompressed)."""

    packed: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def float_bytes(self) -> int:
        return int(sum(v["float_bytes"] for v in self.packed.values()))

    @property
    def code_bytes(self) -> int:
        return int(sum(v["code_bytes"] for v in self.packed.values()))


def _nearest(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted ``centroids`` for each value (ties: the lower)."""
    return np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values, side="left")


def kmeans_codebook(
    w: np.ndarray, bits: int, *, iters: int = 30
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster the non-zeros of ``w`` into ``2**bits - 1`` values; zeros keep code 0.

    Returns ``(codebook, codes)``: ``codebook[0] == 0`` exactly, ``codes`` uint8 with
    ``w``'s shape, and ``codebook[codes]`` approximates ``w`` (zeros reproduced exactly).
    Centroids start evenly spaced between the extremes (the paper's linear initialisation,
    which keeps the rare large weights represented); a centroid left without values moves to
    the value worst represented, and a tensor with no more distinct values than codes is
    reproduced exactly. Assignment is by sorted midpoints (no values x centroids matrix).
    """
    check_int_range(bits, "bits", "kmeans_codebook", 1, 8)
    flat = w.astype(np.float64).ravel()
    nz = flat != 0
    values = flat[nz]
    codes = np.zeros(flat.shape, dtype=np.uint8)
    if values.size == 0:
        return np.zeros(1, dtype=np.float32), codes.reshape(w.shape)
    distinct = np.unique(values)
    k = min(2**bits - 1, len(distinct))
    if len(distinct) <= k:  # every value gets its own code: exact
        centroids = distinct
    else:
        centroids = np.linspace(values.min(), values.max(), k)
        for _ in range(iters):
            assign = _nearest(values, centroids)
            sums = np.bincount(assign, weights=values, minlength=k)
            counts = np.bincount(assign, minlength=k)
            moved = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
            empty = np.flatnonzero(counts == 0)
            if empty.size:  # reseed at the values farthest from their centroid
                error = np.abs(values - moved[assign])
                moved[empty] = values[np.argsort(error)[::-1][: empty.size]]
            moved = np.sort(moved)
            if np.allclose(moved, centroids):
                break
            centroids = moved
    assign = _nearest(values, centroids)
    # a centroid may land on 0.0 exactly; keep it distinct from the zero code anyway
    codebook = np.concatenate([[0.0], centroids]).astype(np.float32)
    codes[nz] = (assign + 1).astype(np.uint8)
    return codebook, codes.reshape(w.shape)


def _channel_axis(node) -> int:  # type: ignore[no-untyped-def]
    """The output-channel axis of the weight input of ``node``."""
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type in ("MatMul", "ConvTranspose"):
        return 1 if node.op_type == "ConvTranspose" else -1
    return 0


def share_weights(  # type: ignore[no-untyped-def]
    model, *, bits: int = 5, min_size: int = 256, per_channel: bool = True
):
    """Return a copy of ONNX ``model`` whose large weights are codebook-coded.

    Only float32 initializers of at least ``min_size`` elements that feed the weight input of a
    Conv/Gemm/MatMul are packed; biases and small tensors stay float. ``bits`` in [2, 8].
    With ``per_channel`` each output channel is first divided by its largest magnitude (kept
    as a small float vector and multiplied back after decoding), so one codebook serves
    channels of very different scales, as BatchNorm folding produces; without it a depthwise
    net such as EfficientNet loses its predictions.
    """
    import onnx
    from onnx import helper, numpy_helper

    check_int_range(bits, "bits", "share_weights", 2, 8)  # 1 bit: zero and one value, no sign
    check_int_range(min_size, "min_size", "share_weights", 1, 2**31)
    if not isinstance(model, onnx.ModelProto):
        raise ConfigError(f"share_weights takes an onnx.ModelProto (onnx.load(path)). Got "
                          f"{type(model).__name__} instead.")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    weight_axes = {
        node.input[_WEIGHT_INPUT[node.op_type]]: _channel_axis(node)
        for node in graph.node
        if node.op_type in _WEIGHT_INPUT and len(node.input) > _WEIGHT_INPUT[node.op_type]
    }
    report = PackReport()
    keep, decoders = [], []
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        if (
            init.name not in weight_axes
            or arr.dtype != np.float32
            or arr.size < min_size
        ):
            keep.append(init)
            continue
        scale = None
        if per_channel and arr.ndim >= 2:
            axis = weight_axes[init.name] % arr.ndim
            shape = [1] * arr.ndim
            shape[axis] = arr.shape[axis]
            reduce = tuple(i for i in range(arr.ndim) if i != axis)
            scale = np.abs(arr).max(axis=reduce).reshape(shape).astype(np.float32)
            scale[scale == 0] = 1.0
        codebook, codes = kmeans_codebook(arr / scale if scale is not None else arr, bits)
        cb_name, code_name, idx_name = (f"{init.name}__codebook", f"{init.name}__codes",
                                        f"{init.name}__idx")
        keep.append(numpy_helper.from_array(codebook, cb_name))
        keep.append(numpy_helper.from_array(codes, code_name))
        int32 = onnx.TensorProto.INT32
        decoders.append(helper.make_node("Cast", [code_name], [idx_name], to=int32))
        if scale is None:
            decoders.append(helper.make_node("Gather", [cb_name, idx_name], [init.name], axis=0))
        else:
            unit, scale_name = f"{init.name}__unit", f"{init.name}__scale"
            keep.append(numpy_helper.from_array(scale, scale_name))
            decoders.append(helper.make_node("Gather", [cb_name, idx_name], [unit], axis=0))
            decoders.append(helper.make_node("Mul", [unit, scale_name], [init.name]))
        report.packed[init.name] = {
            "elements": float(arr.size),
            "float_bytes": float(arr.nbytes),
            "code_bytes": float(codes.nbytes + codebook.nbytes),
            "levels": float(len(codebook)),
            "sparsity": float((arr == 0).mean()),
        }
    del graph.initializer[:]
    graph.initializer.extend(keep)
    # Older exporters also list initializers as graph inputs; a packed one is now the output
    # of its decoder, so it is no input any more.
    inputs = [i for i in graph.input if i.name not in report.packed]
    del graph.input[:]
    graph.input.extend(inputs)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(decoders + nodes)
    onnx.checker.check_model(out)
    return out, report
