"""Integer kernels that give the same integers on every x86 CPU: u8 x u8, not u8 x s8.

onnxruntime multiplies uint8 activations by int8 weights (u8s8) with ``VPMADDUBSW`` on CPUs
with AVX2 but no VNNI: it adds two u8 x s8 products into a signed 16-bit lane and saturates
there. Two activations near 255 times two weights near +-127 (2 x 255 x 127 = 64,770) do not
fit 32,767, so the sum is clipped before it reaches the int32 accumulator. onnxruntime's own
documentation names the problem and the cures ("reduce_range or the U8U8 format"). Measured on
this project's AVX2 machine: a 64x256 by 256x256 ``MatMulInteger`` with random u8s8 operands
got 98.7% of its outputs wrong (off by up to 89,824), the same product in u8u8 none, 16% slower;
the row-wise scheme, whose activations sit around the zero point 128, lost several points of
accuracy. With VNNI (``VPDPBUSD``) there is no 16-bit step and u8s8 is exact.

A bundle is built on one machine and runs on others, so edgeslim writes its integer kernels in
the form that is exact everywhere: every int8 weight ``w`` (zero point 0) that meets uint8
activations becomes the uint8 ``w + 128`` with zero point 128. The integers the kernel computes,
``(x - zx)(w_u8 - 128) = (x - zx) w``, are the same numbers; only the encoding changes, so
everything upstream (rounding, bias correction, tuning, the simulator) keeps working on int8.

Three kinds of int8 weights stay int8: their u8 x s8 kernels are exact already, and
faster than u8 x u8 without VNNI.

- Depthwise ``QLinearConv`` (one input and one output channel per group): onnxruntime's
  depthwise kernel widens both operands to 16 bits, subtracts the zero points there and
  multiplies into 32-bit sums (``VPMADDWD``), so there is no 8-bit pair product to saturate.
  Checked on this machine with weights at -128/127 and activations at 0/255 across
  efficientnet-lite0's depthwise shapes; on its 300 evaluation crops the model is
  bit-identical and about 6% faster than with its depthwise weights in u8 x u8.
- Weights within +-64 (7-bit weights, ``reduce_range``): two products sum to at most
  2 x 255 x 64 = 32,640, so no pairing of them saturates. efficientnet-lite0 ran 6.65 ms with
  7-bit weights in u8 x s8 against 8.75 ms with 8-bit weights in u8 x u8 (bench/RESULTS.md,
  int8 section), which is what ``reduce_range`` buys for its lost bit.

- 1x1 ``QLinearConv`` weights whose input channels can be paired (``pair_channels``). The
  kernels without VNNI add the products of input channels ``2m`` and ``2m + 1`` in one 16-bit
  lane (probed on this project's AVX2 machine, weights at +-127 in every pair of positions):
  the lane cannot saturate when, in every row, the positive weights of a pair sum to at most
  128 and the negative ones to at least -128 (255 x 128 = 32,640). When an order of the input
  channels exists in which every neighbouring pair qualifies, and the channels can be reordered
  upstream without changing anything else (the producing convolution's output rows, through
  depthwise convolutions, clips and per-tensor quantizers), edgeslim reorders them and keeps
  the weights int8. Same integers, same outputs to the bit; efficientnet-lite0's projection
  convolutions (13 of its 16 qualify) ran about 18% faster on the AVX2 machine than in u8 x u8
  (onnxruntime's profiler, 24 runs), the whole model 4% (bench/RESULTS.md, int8 section).
  Expansions do not qualify: with six times as many rows as input channels, every pair of
  channels clashes in some row.

``unsaturated`` rewrites a model in place; ``make_session`` applies it to the copy it runs, and
``quantize`` to the model it returns.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import numpy as np
from onnx import TensorProto, numpy_helper

from edgeslim.ptq._graph import Graph

__all__ = ["PAIR_MAX_CHANNELS", "SAFE_INT8", "narrow_unpaired", "pair_channels", "unsaturated"]

# the largest int8 weight magnitude with which 255 * (|w0| + |w1|) fits a signed 16-bit lane
SAFE_INT8 = 64

# op type -> (activation input, weight input, weight zero-point input) indices
_KERNELS: dict[str, tuple[int, int, int]] = {
    "MatMulInteger": (0, 1, 3),
    "MatMulIntegerToFloat": (0, 1, 5),
    "DynamicQuantizeMatMul": (-1, 1, 3),  # its activation is quantized to uint8 inside
    "ConvInteger": (0, 1, 3),
    "QLinearConv": (0, 3, 5),
    "QLinearMatMul": (0, 3, 5),
    "QGemm": (0, 3, 5),
    "QAttention": (0, 1, 7),
}
# op type -> its activation zero-point input
_ACTIVATION_ZP = {"QLinearConv": 2, "QLinearMatMul": 2, "QGemm": 2,
                  "MatMulInteger": 2, "ConvInteger": 2, "MatMulIntegerToFloat": 4,
                  "QAttention": 6}


def unsaturated(model: Any) -> Any:
    """``model`` (in place, and returned) with every int8 weight of a u8 x s8 integer kernel
    stored as uint8 + 128 with zero point 128 (module docstring), except those of depthwise
    convolutions, weights within +-``SAFE_INT8`` and 1x1 convolutions whose input channels
    could be paired (reordered upstream to match), which cannot saturate; anything else
    untouched.

    Weights read through ``DequantizeLinear`` (QDQ format), which onnxruntime fuses into the
    same kernels, are rewritten the same way when the activation beside them is uint8.
    """
    g = Graph(model)
    inits, producers = g.initializers, g.producer
    elem = {name: t.data_type for name, t in inits.items()}
    weight_users: dict[str, Any] = {}  # tensor -> the first Conv/MatMul/Gemm reading it as B
    for n in model.graph.node:
        if n.op_type in ("Conv", "MatMul", "Gemm") and len(n.input) > 1:
            weight_users.setdefault(n.input[1], n)

    def activation_is_u8(node: Any, index: int) -> bool:
        if index < 0:
            return True
        name = node.input[index]
        if name in elem:
            return elem[name] == TensorProto.UINT8
        prod = producers.get(name)
        if prod is not None and prod.op_type in ("QuantizeLinear", "DynamicQuantizeLinear"):
            zp = prod.input[2] if len(prod.input) > 2 else ""
            return prod.op_type == "DynamicQuantizeLinear" or (
                zp in elem and elem[zp] == TensorProto.UINT8)
        # a QLinear* output keeps its input's type: uint8 in edgeslim's and onnxruntime's
        # QOperator models (activation_type uint8); the zero point of the kernel says so
        k = _ACTIVATION_ZP.get(node.op_type)
        if k is not None and len(node.input) > k and node.input[k] in elem:
            return elem[node.input[k]] == TensorProto.UINT8
        return False

    done: set[str] = set()

    def rewrite(weight: str, zero: str | None, owner: Any, zp_slot: int) -> None:
        w = inits.get(weight)
        if (w is None or w.data_type != TensorProto.INT8 or _readers(g, weight) != 1
                or weight in paired):
            return
        zp = inits.get(zero) if zero else None
        if zp is not None and (zp.data_type != TensorProto.INT8 or _readers(g, zero) != 1
                               or np.any(numpy_helper.to_array(zp) != 0)):
            return  # an asymmetric or shared int8 zero point: leave the kernel as it is
        values = numpy_helper.to_array(w).astype(np.int16)
        if values.size and np.abs(values).max() <= SAFE_INT8:
            return  # no two u8 x s8 products reach 32,768: exact and fastest as it is
        values += 128
        w.CopyFrom(numpy_helper.from_array(values.astype(np.uint8), weight))
        if zp is not None:
            shifted = numpy_helper.to_array(zp).astype(np.int16) + 128
            zp.CopyFrom(numpy_helper.from_array(shifted.astype(np.uint8), zero))
        else:  # no zero point given (0 by default): add 128
            name = f"{weight}_zero128"
            model.graph.initializer.append(
                numpy_helper.from_array(np.array(128, np.uint8), name))
            while len(owner.input) <= zp_slot:
                owner.input.append("")
            owner.input[zp_slot] = name
        done.add(weight)

    paired: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "QLinearConv" and activation_is_u8(node, 0):
            _pair_pointwise(node, g, paired)

    for node in model.graph.node:
        slots = _KERNELS.get(node.op_type)
        if slots is not None:
            act, wi, zi = slots
            if len(node.input) > wi and activation_is_u8(node, act) and not _depthwise(node, g):
                zero = node.input[zi] if len(node.input) > zi and node.input[zi] else None
                rewrite(node.input[wi], zero, node, zi)
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            # QDQ weight: rewrite when it feeds a Conv/MatMul/Gemm whose other operand comes
            # from a uint8 DequantizeLinear (what onnxruntime fuses into u8 x s8 kernels)
            zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if _qdq_beside_u8(weight_users.get(node.output[0]), producers, elem):
                rewrite(node.input[0], zero, node, 2)
    return model


def _qdq_beside_u8(user: Any, producers: dict[str, Any], elem: dict[str, int]) -> bool:
    """Whether the Conv/MatMul/Gemm ``user`` of a dequantized weight reads a uint8
    ``DequantizeLinear`` output as its other operand."""
    if user is None:
        return False
    prod = producers.get(user.input[0])
    if prod is None or prod.op_type != "DequantizeLinear":
        return False
    zp = prod.input[2] if len(prod.input) > 2 else ""
    return zp in elem and elem[zp] == TensorProto.UINT8


# ------------------------------------------------------------------ pairing input channels

_PAIR_LIMIT = 128  # 255 x 128 = 32,640 fits a signed 16-bit lane; 255 x 129 does not
#: Wider weights are not paired (the pair table alone would take over 16 MB): u8 x u8.
PAIR_MAX_CHANNELS = 4096
_pairings: dict[bytes, np.ndarray | None] = {}  # weight digest -> column order (a cache)
_PAIRINGS_KEPT = 256
_pairings_lock = threading.Lock()


def pair_channels(weight: np.ndarray) -> np.ndarray | None:
    """An order of the columns (input channels) of the int8 matrix ``weight`` (rows = output
    channels) in which columns ``2m`` and ``2m + 1`` never saturate a u8 x s8 lane, or None.

    Columns ``i`` and ``j`` may share a lane when in every row the positive parts of their
    weights sum to at most 128 and the negative parts to at least -128: the largest sum of two
    products with uint8 activations is then 255 x 128 = 32,640. Finding the order is finding a
    perfect matching in the graph of such column pairs; this takes the greedy way (the column
    with the fewest partners first, matched to its partner with the fewest), which can miss an
    order that exists: the weight then simply goes to u8 x u8, exact as well. An odd last
    column meets the zero padding of the kernel, which cannot saturate. Matrices of more than
    ``PAIR_MAX_CHANNELS`` columns are not tried (None). Results are cached by the matrix's
    digest, since every session the quantization search opens rewrites the same weights.
    """
    w = np.asarray(weight)
    if w.ndim != 2 or w.dtype != np.int8:
        raise ValueError(f"pair_channels expects a 2-D int8 matrix, got {w.dtype} {w.shape}")
    if w.shape[1] > PAIR_MAX_CHANNELS:
        return None
    key = hashlib.sha1(w.tobytes() + str(w.shape).encode()).digest()
    with _pairings_lock:
        if key in _pairings:
            return _pairings[key]
    order = _greedy_pairing(_compatible(w))
    with _pairings_lock:
        while len(_pairings) >= _PAIRINGS_KEPT:
            _pairings.pop(next(iter(_pairings)))
        _pairings[key] = order
    return order


def _compatible(w: np.ndarray) -> np.ndarray:
    """ok[i, j]: columns i and j of ``w`` may share a 16-bit lane (``pair_channels``)."""
    pos = np.maximum(w, 0).astype(np.int16)
    neg = np.minimum(w, 0).astype(np.int16)
    cols = w.shape[1]
    ok = np.ones((cols, cols), dtype=bool)
    step = max(1, (1 << 22) // max(1, cols * cols))  # rows per chunk: ~8 MB of int16
    for r in range(0, w.shape[0], step):
        p, n = pos[r:r + step], neg[r:r + step]
        ok &= ((p[:, :, None] + p[:, None, :]).max(axis=0) <= _PAIR_LIMIT)
        ok &= ((n[:, :, None] + n[:, None, :]).min(axis=0) >= -_PAIR_LIMIT)
    np.fill_diagonal(ok, False)
    return ok


def _greedy_pairing(ok: np.ndarray) -> np.ndarray | None:
    free = np.ones(len(ok), dtype=bool)
    degree = ok.sum(axis=1, dtype=np.int64)  # partners among the free columns
    order: list[int] = []
    while np.count_nonzero(free) >= 2:
        cand = np.flatnonzero(free)
        k = int(cand[np.argmin(degree[cand])])
        if degree[k] == 0:
            return None
        partners = np.flatnonzero(ok[k] & free)
        j = int(partners[np.argmin(degree[partners])])
        order += [k, j]
        free[k] = free[j] = False
        degree -= ok[:, k]
        degree -= ok[:, j]
    order += np.flatnonzero(free).tolist()
    return np.asarray(order, dtype=np.int64)


def _readers(g: Graph, tensor: str) -> int:
    """How many node inputs read ``tensor``."""
    return len(g.consumers.get(tensor, ()))


def _group(g: Graph, node: Any) -> int:
    return int(g.attr(node, "group", 1))


def _depthwise(node: Any, g: Graph) -> bool:
    """A QLinearConv with one input and one output channel per group."""
    w = g.initializers.get(node.input[3]) if len(node.input) > 3 else None
    group = _group(g, node)
    return (node.op_type == "QLinearConv" and w is not None and len(w.dims) >= 2
            and group > 1 and w.dims[0] == group and w.dims[1] == 1)


def _pointwise_pairing(node: Any, g: Graph) -> tuple[np.ndarray, list[str]] | None:
    """For the 1x1 ``QLinearConv`` ``node`` with full-range int8 weights read by it alone:
    the order of its input channels that pairs them and the initializers upstream to reorder
    with it (``_reorderable``); None when there is no such order or it cannot be applied."""
    w = g.initializers.get(node.input[3])
    if (w is None or w.data_type != TensorProto.INT8 or len(w.dims) != 4
            or any(d != 1 for d in w.dims[2:]) or _group(g, node) != 1
            or _readers(g, node.input[3]) != 1):
        return None
    zp = g.initializers.get(node.input[5]) if len(node.input) > 5 and node.input[5] else None
    if zp is not None and (zp.data_type != TensorProto.INT8
                           or np.any(numpy_helper.to_array(zp) != 0)):
        return None
    values = numpy_helper.to_array(w)
    if values.size == 0 or np.abs(values.astype(np.int16)).max() <= SAFE_INT8:
        return None  # exact in any order: nothing to pair
    order = pair_channels(values[:, :, 0, 0])
    if order is None:
        return None
    edits = _reorderable(node.input[0], len(order), g)
    return None if edits is None else (order, edits)


def _pair_pointwise(node: Any, g: Graph, paired: set[str]) -> None:
    """Keep the int8 weights of the 1x1 ``QLinearConv`` ``node`` (adding them to ``paired``)
    when its input channels can be paired and reordered upstream; else change nothing."""
    found = _pointwise_pairing(node, g)
    if found is None:
        return
    order, edits = found
    for name in [*edits, node.input[3]]:
        t = g.initializers[name]
        axis = 1 if name == node.input[3] else 0
        t.CopyFrom(numpy_helper.from_array(
            np.take(numpy_helper.to_array(t), order, axis=axis), name))
    paired.add(node.input[3])


def _reorderable(tensor: str, channels: int, g: Graph) -> list[str] | None:
    """The initializers to reorder along axis 0 so that ``tensor``'s channels come out in a
    new order, walking up through channel-wise nodes to the convolution that makes them; None
    when that is not possible without changing another reader of the same values."""
    inits = g.initializers
    edits: list[str] = []

    def per_channel(names: list[str]) -> bool:
        for name in names:
            if not name:
                continue
            t = inits.get(name)
            if t is None:
                return False
            if int(np.prod(t.dims)) == 1:
                continue  # per tensor: the same for every channel
            if t.dims[0] != channels or _readers(g, name) != 1:
                return False
            edits.append(name)
        return True

    while True:
        node = g.producer.get(tensor)
        if node is None or tensor in g.graph_outputs or _readers(g, tensor) != 1:
            return None
        op = node.op_type
        if op in ("QLinearConv", "Conv"):
            wi = 3 if op == "QLinearConv" else 1
            w = inits.get(node.input[wi]) if len(node.input) > wi else None
            if w is None or not w.dims or w.dims[0] != channels:
                return None
            slots = (3, 4, 5, 8) if op == "QLinearConv" else (1, 2)
            if not per_channel([node.input[i] for i in slots if i < len(node.input)]):
                return None
            group = _group(g, node)
            if group == 1:
                return edits
            if group != channels or w.dims[1] != 1:
                return None
            tensor = node.input[0]
        elif op in ("Clip", "Relu", "QuantizeLinear", "DequantizeLinear"):
            for name in node.input[1:]:
                t = inits.get(name) if name else None
                if name and (t is None or int(np.prod(t.dims)) != 1):
                    return None
            tensor = node.input[0]
        else:
            return None


# ------------------------------------------------------------------ 7 bits where 8 cannot pair

# op type -> (weight, weight scale, bias) input indices of the QOperator kernels narrowed
_NARROWED = {"QLinearConv": (3, 4, 8), "QGemm": (3, 4, 6)}


def narrow_unpaired(model: Any) -> list[str]:
    """Put on 7 bits (+-``SAFE_INT8``) the int8 weights of the u8 x s8 kernels of the QOperator
    ``model`` (in place) that ``unsaturated`` would have to store as u8 x u8: every one except
    depthwise convolutions, weights already within +-64 and 1x1 convolutions whose input
    channels pair. Each such weight ``q`` becomes ``round(q / 2)`` with twice the scale, and
    its int32 bias ``round(b / 2)`` (the bias scale is the input's times the weight's).
    Returns the names of the nodes narrowed.

    What it is for: the model then runs the fast u8 x s8 kernels everywhere, exact on every CPU,
    while the layers that pair keep their 8 bits. On efficientnet-lite0 the 13 projection
    convolutions that pair are the most sensitive to 7 bits: 7-bit weights everywhere else and
    8 bits there kept 96.0% top-1 agreement after tuning, against 95.0% for 7 bits everywhere
    and 96.3% for 8 bits (u8 x u8 where they do not pair), at the speed of 7 bits everywhere
    (bench/RESULTS.md, int8 section).
    """
    g = Graph(model)
    inits = g.initializers
    narrowed: list[str] = []
    for node in model.graph.node:
        slots = _NARROWED.get(node.op_type)
        if slots is None:
            continue
        wi, si, bi = slots
        w = inits.get(node.input[wi]) if len(node.input) > wi else None
        scale = inits.get(node.input[si]) if len(node.input) > si else None
        if (w is None or scale is None or w.data_type != TensorProto.INT8
                or _readers(g, w.name) != 1 or _readers(g, scale.name) != 1):
            continue
        zero = node.input[wi + 2] if len(node.input) > wi + 2 else ""
        zp = inits.get(zero) if zero else None
        if zp is not None and np.any(numpy_helper.to_array(zp) != 0):
            continue
        values = numpy_helper.to_array(w).astype(np.int16)
        if values.size == 0 or np.abs(values).max() <= SAFE_INT8:
            continue
        if _depthwise(node, g) or (node.op_type == "QLinearConv"
                                   and _pointwise_pairing(node, g) is not None):
            continue  # exact at 8 bits
        bias_name = node.input[bi] if len(node.input) > bi and node.input[bi] else ""
        bias = inits.get(bias_name) if bias_name else None
        if bias is not None and _readers(g, bias_name) != 1:
            continue
        w.CopyFrom(numpy_helper.from_array(
            np.clip(np.round(values / 2), -SAFE_INT8, SAFE_INT8).astype(np.int8), w.name))
        scale.CopyFrom(numpy_helper.from_array(
            (numpy_helper.to_array(scale) * 2).astype(np.float32), scale.name))
        if bias is not None:
            b = numpy_helper.to_array(bias).astype(np.float64)
            bias.CopyFrom(numpy_helper.from_array(np.round(b / 2).astype(np.int32), bias_name))
        narrowed.append(node.name)
    return narrowed

