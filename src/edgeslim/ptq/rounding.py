"""Error-compensating weight rounding (GPTQ/OBQ) and empirical bias correction.

This is edgeslim's own contribution on top of onnxruntime's quantizer. onnxruntime rounds each
weight to the nearest step of its per-channel (or per-tensor) grid. Here each output row of a
Conv/Gemm/MatMul weight is rounded column by column on the *same* grid, and the rounding error
of a column is pushed onto the columns not yet rounded, weighted by the inverse Hessian
``H = E[x x^T]`` of the layer's input patches on calibration data (Frantar et al., 2022,
"GPTQ"; Hassibi & Stork's Optimal Brain Surgeon). The remaining mean error ``(W - Q) E[x]`` is
then removed from the bias (Nagel et al., 2019, "Data-Free Quantization", empirical bias
correction).

The result is a float model whose weights already lie on onnxruntime's grid: each row keeps its
largest magnitude, so onnxruntime recomputes the same scale and reproduces these integers
exactly when it quantizes the model. The float model with rounded weights is also a faithful
"weights-only" simulation for sensitivity analysis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeslim.ptq._graph import Graph, add_outputs, make_session

__all__ = ["LayerStats", "collect_layer_stats", "round_weights", "weight_grid"]


@dataclass
class LayerStats:
    """Input statistics of one weighted node, per group ``g`` of its weight rows.

    ``hessian``: (G, K, K) sum of x x^T over input patches; ``mean``: (G, K) mean patch;
    ``count``: number of patches summed. K = in-channels-per-group * kernel area.
    """

    hessian: np.ndarray
    mean_sum: np.ndarray
    count: int

    @property
    def mean(self) -> np.ndarray:
        return self.mean_sum / max(self.count, 1)


def weight_grid(reduce_range: bool = False) -> tuple[int, int]:
    """onnxruntime's symmetric int8 weight range ``(qmin, qmax)`` (7-bit with reduce_range)."""
    from onnxruntime.quantization.quant_utils import QuantType, get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(
        QuantType.QInt8.tensor_type, reduce_range=reduce_range, symmetric=True
    )
    return int(qmin), int(qmax)


def _rows(graph: Graph, node: Any) -> tuple[np.ndarray, int]:
    """The weight of ``node`` as (O, K) rows and the number of groups G (rows split evenly)."""
    w = graph.array(node.input[1])
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1), int(graph.attr(node, "group", 1))
    if node.op_type == "Gemm":
        return (w if graph.attr(node, "transB", 0) else w.T), 1
    return w.T, 1  # MatMul: (K, N) -> rows are output features


def _store_rows(graph: Graph, node: Any, rows: np.ndarray) -> None:
    w = graph.array(node.input[1])
    if node.op_type == "Conv":
        new = rows.reshape(w.shape)
    elif node.op_type == "Gemm":
        new = rows if graph.attr(node, "transB", 0) else rows.T
    else:
        new = rows.T
    graph.set_array(node.input[1], new.astype(w.dtype))


def _roundable(graph: Graph, node: Any) -> bool:
    """Whether the error-compensating rounding knows the node's input patches: 1-D and 2-D
    convolutions, and Gemm/MatMul with a 2-D weight. Others keep onnxruntime's own rounding."""
    ndim = graph.array(node.input[1]).ndim
    return ndim in (3, 4) if node.op_type == "Conv" else ndim == 2


def _conv_pads(graph: Graph, node: Any, size: Sequence[int], kernel: Sequence[int],
               strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    """The node's pads as ONNX lists them (all begins, then all ends), ``auto_pad`` resolved
    for an input of spatial ``size``."""
    auto = graph.attr(node, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for n, k, st, d in zip(size, kernel, strides, dilations, strict=True):
            total = max((-(-n // st) - 1) * st + (k - 1) * d + 1 - n, 0)
            small = total // 2
            begins.append(small if auto == "SAME_UPPER" else total - small)
            ends.append(total - begins[-1])
        return begins + ends
    if auto == "VALID":
        return [0] * (2 * len(size))
    return list(graph.attr(node, "pads", [0] * (2 * len(size))))


def _patches(
    x: np.ndarray, graph: Graph, node: Any, groups: int, limit: int, rng: np.random.Generator
) -> np.ndarray:
    """Up to ``limit`` input patches of ``node`` as (N, G, K): what each weight row meets."""
    if node.op_type != "Conv":
        x2 = x.T if node.op_type == "Gemm" and graph.attr(node, "transA", 0) else x
        x2 = x2.reshape(-1, x2.shape[-1])
        if len(x2) > limit:
            x2 = x2[rng.choice(len(x2), limit, replace=False)]
        return x2[:, None, :]
    kernel = graph.array(node.input[1]).shape[2:]
    spatial = len(kernel)
    strides = graph.attr(node, "strides", [1] * spatial)
    dilations = graph.attr(node, "dilations", [1] * spatial)
    pads = _conv_pads(graph, node, x.shape[2:], kernel, strides, dilations)
    if spatial == 1:  # a 1-D convolution is a 2-D one of height 1
        x, kernel = x[:, :, None, :], (1, *kernel)
        strides, dilations, pads = [1, *strides], [1, *dilations], [0, pads[0], 0, pads[1]]
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    if any(pads):
        x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    b, c, hh, ww = x.shape
    oh = (hh - ((kh - 1) * dh + 1)) // sh + 1
    ow = (ww - ((kw - 1) * dw + 1)) // sw + 1
    total = b * oh * ow
    pick = rng.choice(total, limit, replace=False) if total > limit else np.arange(total)
    bi, rest = np.divmod(pick, oh * ow)
    yi, xi = np.divmod(rest, ow)
    ky, kx = np.meshgrid(np.arange(kh) * dh, np.arange(kw) * dw, indexing="ij")
    rows = (yi * sh)[:, None] + ky.reshape(1, -1)  # (N, kh*kw)
    cols = (xi * sw)[:, None] + kx.reshape(1, -1)
    p = x[bi[:, None, None], np.arange(c)[None, :, None], rows[:, None, :], cols[:, None, :]]
    return p.reshape(len(pick), groups, (c // groups) * kh * kw)  # (N, C, kh*kw) -> (N, G, K)


def collect_layer_stats(
    model: Any,
    feeds: Sequence[dict],
    nodes: Sequence[Any],
    *,
    max_patches: int = 512,
    threads: int = 2,
    seed: int = 0,
) -> dict[str, LayerStats]:
    """Hessian and mean of the input patches of each of ``nodes`` over ``feeds`` (fp32 model).

    At most ``max_patches`` patch positions are sampled per feed and node, which bounds memory
    on large feature maps.
    """
    graph = Graph(model)
    names = sorted({n.input[0] for n in nodes})
    session = make_session(add_outputs(model, names), threads=threads)
    inputs = {i.name for i in session.get_inputs()}
    rng = np.random.default_rng(seed)
    stats: dict[str, LayerStats] = {}
    for feed in feeds:
        values = dict(
            zip(
                names,
                session.run(names, {k: v for k, v in feed.items() if k in inputs}),
                strict=False,
            )
        )
        for node in nodes:
            _, groups = _rows(graph, node)
            p = _patches(values[node.input[0]], graph, node, groups, max_patches, rng)
            pg = np.ascontiguousarray(p.transpose(1, 0, 2), dtype=np.float32)  # (G, N, K)
            h = np.matmul(pg.transpose(0, 2, 1), pg).astype(np.float64)
            st = stats.get(node.name)
            if st is None:
                stats[node.name] = LayerStats(h, p.sum(0, dtype=np.float64), len(p))
            else:
                st.hessian += h
                st.mean_sum += p.sum(0, dtype=np.float64)
                st.count += len(p)
    return stats


def _gptq(
    w: np.ndarray, h: np.ndarray, scale: np.ndarray, qmin: int, qmax: int, damp: float
) -> np.ndarray:
    """GPTQ over groups at once: rows ``w`` (G, R, K) with Hessians ``h`` (G, K, K), grids
    ``scale`` (G, R). Returns the rounded rows (values on the grids)."""
    w = w.astype(np.float64).copy()
    _g, _, k = w.shape
    h = h.astype(np.float64).copy()
    idx = np.arange(k)
    dead = np.diagonal(h, axis1=1, axis2=2) <= 0  # (G, K) inputs that never fire
    h[:, idx, idx] += dead
    w[np.broadcast_to(dead[:, None, :], w.shape)] = 0.0
    mean_diag = np.maximum(np.diagonal(h, axis1=1, axis2=2).mean(1), 1e-12)
    h[:, idx, idx] += damp * mean_diag[:, None]
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)  # upper, (G, K, K)
    except np.linalg.LinAlgError:
        return np.clip(np.round(w / scale[..., None]), qmin, qmax) * scale[..., None]
    q = np.empty_like(w)
    for i in range(k):
        col = w[:, :, i]
        qc = np.clip(np.round(col / scale), qmin, qmax) * scale
        q[:, :, i] = qc
        err = (col - qc) / hinv[:, i, i][:, None]  # (G, R)
        w[:, :, i + 1 :] -= err[:, :, None] * hinv[:, None, i, i + 1 :]
    return q


def round_weights(
    model: Any,
    feeds: Sequence[dict],
    *,
    nodes: Sequence[str] | None = None,
    method: str = "gptq",
    bias_correction: bool = True,
    per_channel: bool = True,
    reduce_range: bool = False,
    damp: float = 0.01,
    stats: dict[str, LayerStats] | None = None,
    threads: int = 2,
) -> tuple[Any, dict[str, LayerStats]]:
    """Put the Conv/Gemm/MatMul weights of ``model`` (in place) on onnxruntime's int8 grid.

    ``method``: ``"gptq"`` (error-compensating) or ``"nearest"`` (onnxruntime's own rounding,
    useful with ``bias_correction`` alone). ``nodes`` limits the work to those node names.
    Returns the model and the layer statistics (pass them back in to skip recollection).
    Rows keep their largest magnitude exactly, so the grid (scale) is unchanged.
    """
    graph = Graph(model)
    targets = [n for n in graph.weighted_nodes() if nodes is None or n.name in set(nodes)]
    targets = [n for n in targets if _roundable(graph, n)]
    if stats is None:
        stats = collect_layer_stats(model, feeds, targets, threads=threads)
    qmin, qmax = weight_grid(reduce_range)
    for node in targets:
        if node.name not in stats:
            continue
        rows, groups = _rows(graph, node)
        rows = rows.astype(np.float64)
        amax = np.abs(rows).max(axis=1) if per_channel else np.full(len(rows), np.abs(rows).max())
        scale = np.maximum(amax, 1e-12) / qmax
        st = stats[node.name]
        per = len(rows) // groups
        if method == "gptq":
            out = _gptq(
                rows.reshape(groups, per, -1),
                st.hessian,
                scale.reshape(groups, per),
                qmin,
                qmax,
                damp,
            ).reshape(rows.shape)
        else:
            out = np.clip(np.round(rows / scale[:, None]), qmin, qmax) * scale[:, None]
        # keep each row's extreme exactly so onnxruntime derives the same scale
        idx = np.argmax(np.abs(rows), axis=1) if per_channel else None
        if per_channel:
            r = np.arange(len(rows))
            out[r, idx] = np.sign(rows[r, idx]) * scale * qmax
        else:
            flat = np.unravel_index(np.argmax(np.abs(rows)), rows.shape)
            out[flat] = np.sign(rows[flat]) * scale[0] * qmax
        if bias_correction:
            err = rows - out  # (O, K)
            mean = st.mean  # (G, K)
            shift = np.einsum("ok,ok->o", err, np.repeat(mean, per, axis=0))
            _add_bias(graph, node, shift)
        _store_rows(graph, node, out)
    return model, stats


def _add_bias(graph: Graph, node: Any, shift: np.ndarray) -> None:
    """Add ``shift`` (O,) to the node's bias, creating one when the node has none."""
    if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
        name = node.input[2]
        bias = graph.array(name)
        if bias is not None and bias.size == shift.size:
            if graph.attr(node, "beta", 1.0) not in (1.0, None) and node.op_type == "Gemm":
                shift = shift / graph.attr(node, "beta", 1.0)
            graph.set_array(name, (bias + shift.reshape(bias.shape)).astype(bias.dtype))
            return
        # a broadcast bias of another shape, or a C computed by the graph (a residual
        # branch that onnxruntime's MatMul+Add fusion put there): left untouched
        return
    if node.op_type in ("Conv", "Gemm"):
        name = graph.fresh_name(node.name + "_bias")
        graph.set_array(name, shift.astype(np.float32))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
    # MatMul: no bias input; the correction is skipped (its Add is a separate node)
