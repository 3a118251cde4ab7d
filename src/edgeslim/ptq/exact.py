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

Two kinds of int8 weights stay as they are: their u8 x s8 kernels are exact already, and
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

``unsaturated`` rewrites a model in place; ``make_session`` applies it to the copy it runs, and
``quantize`` to the model it returns.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto, numpy_helper

__all__ = ["SAFE_INT8", "unsaturated"]

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
    convolutions and weights within +-``SAFE_INT8``, which cannot saturate; anything else
    untouched.

    Weights read through ``DequantizeLinear`` (QDQ format), which onnxruntime fuses into the
    same kernels, are rewritten the same way when the activation beside them is uint8.
    """
    inits = {t.name: t for t in model.graph.initializer}
    elem = {name: t.data_type for name, t in inits.items()}
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, int] = {}
    weight_users: dict[str, Any] = {}  # tensor -> the first Conv/MatMul/Gemm reading it as B
    for n in model.graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
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

    def depthwise(node: Any) -> bool:
        """A QLinearConv with one input and one output channel per group."""
        w = inits.get(node.input[3]) if len(node.input) > 3 else None
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        return (node.op_type == "QLinearConv" and w is not None and len(w.dims) >= 2
                and group > 1 and w.dims[0] == group and w.dims[1] == 1)

    def rewrite(weight: str, zero: str | None, owner: Any, zp_slot: int) -> None:
        w = inits.get(weight)
        if w is None or w.data_type != TensorProto.INT8 or consumers.get(weight, 0) != 1:
            return
        zp = inits.get(zero) if zero else None
        if zp is not None and (zp.data_type != TensorProto.INT8 or consumers.get(zero, 0) != 1
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

    for node in model.graph.node:
        slots = _KERNELS.get(node.op_type)
        if slots is not None:
            act, wi, zi = slots
            if len(node.input) > wi and activation_is_u8(node, act) and not depthwise(node):
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
