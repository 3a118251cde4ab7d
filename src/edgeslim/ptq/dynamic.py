"""Dynamic int8 quantization: onnxruntime's, and edgeslim's row-wise variant for transformers.

``quantize_dynamic_ort`` calls onnxruntime's ``quantize_dynamic`` (per-tensor activation range
computed at run time, ``DynamicQuantizeMatMul``). In BERT-like encoders one token (``[CLS]``)
carries activations ten times larger than the others, so a single range per tensor wastes most
of the 8 bits on the other tokens. ``rowwise_dynamic`` (edgeslim's own rewrite) quantizes each
row (token) of a MatMul input with its own scale, symmetric around the fixed zero point 128, and
multiplies by per-output-channel int8 weights with onnxruntime's ``MatMulIntegerToFloat``
kernel (u8 x s8, fast on x86 with or without VNNI):

    s_r = max_j |x_rj| / 127;  q = round(x / s_r) + 128  (uint8);  y = (q - 128) @ Wq * s_r * s_w

Word-embedding tables (``Gather`` on a 2-D constant with many rows) are stored as int8 with one
scale per row, gathered and rescaled at run time: ``Gather(Wq, ids) * Gather(s, ids)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from onnx import TensorProto, helper

from edgeslim.ptq._graph import Graph, opset_of, unique_node_names

__all__ = ["quantize_dynamic_ort", "quantize_embeddings", "rowwise_dynamic"]


def quantize_dynamic_ort(
    model: Any,
    *,
    per_channel: bool = False,
    reduce_range: bool = False,
    exclude: Sequence[str] = (),
) -> Any:
    """onnxruntime's ``quantize_dynamic`` (int8 weights, uint8 activations) on a ModelProto."""
    import tempfile
    from pathlib import Path

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="edgeslim-ptq-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(src))
        quantize_dynamic(
            str(src),
            str(dst),
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude),
            extra_options={"DefaultTensorType": TensorProto.FLOAT},
        )
        return onnx.load(str(dst))


def _reduce_max(graph: Graph, x: str, out: str, opset: int) -> Any:
    if opset >= 18:
        axes = graph.fresh_name("edgeslim_rq_axes")
        graph.set_array(axes, np.array([-1], np.int64))
        return helper.make_node("ReduceMax", [x, axes], [out], keepdims=1)
    return helper.make_node("ReduceMax", [x], [out], keepdims=1, axes=[-1])


def rowwise_dynamic(
    model: Any,
    *,
    exclude: Sequence[str] = (),
    reduce_range: bool = False,
    include: Sequence[str] | None = None,
) -> tuple[Any, list[str]]:
    """Rewrite every MatMul with a 2-D constant weight into row-wise dynamic int8 (in place).

    ``exclude``/``include`` select MatMul node names. Returns the model and the quantized node
    names. Weights are symmetric per output channel (7-bit with ``reduce_range``).
    """
    unique_node_names(model)
    graph = Graph(model)
    opset = opset_of(model)
    qmax = 63 if reduce_range else 127
    selected = [
        n
        for n in graph.weighted_nodes(("MatMul",))
        if graph.array(n.input[1]).ndim == 2
        and n.name not in set(exclude)
        and (include is None or n.name in set(include))
    ]
    groups: dict[str, list[Any]] = {}
    for n in selected:
        groups.setdefault(n.input[0], []).append(n)
    inv127 = graph.fresh_name("edgeslim_rq_inv127")
    graph.set_array(inv127, np.array(1.0 / 127.0, np.float32))
    eps = graph.fresh_name("edgeslim_rq_eps")
    graph.set_array(eps, np.array(1e-12, np.float32))
    one = graph.fresh_name("edgeslim_rq_one")
    graph.set_array(one, np.array(1.0, np.float32))
    zp = graph.fresh_name("edgeslim_rq_zp")
    graph.set_array(zp, np.array(128, np.uint8))
    replace: dict[str, list[Any]] = {}
    for x, nodes in groups.items():
        p = graph.fresh_name(x + "_rq")
        pre = [
            helper.make_node("Abs", [x], [p + "_abs"], name=p + "_abs"),
            _reduce_max(graph, p + "_abs", p + "_amax", opset),
            helper.make_node("Max", [p + "_amax", eps], [p + "_amax_e"], name=p + "_max"),
            helper.make_node("Mul", [p + "_amax_e", inv127], [p + "_scale"], name=p + "_scale"),
            helper.make_node("Div", [x, p + "_scale"], [p + "_div"], name=p + "_div"),
            # round half to even, + 128, saturate, cast: one QuantizeLinear with scale 1
            helper.make_node("QuantizeLinear", [p + "_div", one, zp], [p + "_q"], name=p + "_q"),
        ]
        for i, n in enumerate(nodes):
            w = graph.array(n.input[1]).astype(np.float64)
            ws = np.maximum(np.abs(w).max(0), 1e-12) / qmax
            wq = np.clip(np.round(w / ws), -qmax, qmax).astype(np.int8)
            wq_name = graph.fresh_name(n.input[1] + "_int8")
            graph.set_array(wq_name, wq)
            ws_name = graph.fresh_name(n.input[1] + "_scale")
            graph.set_array(ws_name, ws.astype(np.float32))
            o = n.output[0]
            body = [
                # (q - 128) @ Wq * 1.0 * s_w in one fused onnxruntime kernel, then * s_row
                helper.make_node(
                    "MatMulIntegerToFloat",
                    [p + "_q", wq_name, one, ws_name, zp],
                    [o + "_w"],
                    name=n.name,
                    domain="com.microsoft",
                ),
                helper.make_node("Mul", [o + "_w", p + "_scale"], [o], name=n.name + "_xscale"),
            ]
            replace[n.name] = (pre if i == 0 else []) + body
    out = []
    for node in model.graph.node:
        out.extend(replace.get(node.name, [node]))
    del model.graph.node[:]
    model.graph.node.extend(out)
    _drop_unused_initializers(model)
    if selected and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model, [n.name for n in selected]


def quantize_embeddings(
    model: Any, *, min_rows: int = 1024, exclude: Sequence[str] = ()
) -> list[str]:
    """Store large embedding tables (Gather on a 2-D float constant, axis 0) as int8 per row.

    Tables with fewer than ``min_rows`` rows stay float (position tables are small and
    sensitive). Returns the rewritten Gather node names; edits ``model`` in place.
    """
    unique_node_names(model)
    graph = Graph(model)
    done = []
    out = []
    for node in model.graph.node:
        table = graph.array(node.input[0]) if node.op_type == "Gather" else None
        if (
            table is None
            or table.ndim != 2
            or table.dtype != np.float32
            or table.shape[0] < min_rows
            or int(graph.attr(node, "axis", 0)) != 0
            or node.name in set(exclude)
        ):
            out.append(node)
            continue
        scale = np.maximum(np.abs(table).max(1, keepdims=True), 1e-12) / 127.0
        q = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
        qn = graph.fresh_name(node.input[0] + "_int8")
        sn = graph.fresh_name(node.input[0] + "_rowscale")
        graph.set_array(qn, q)
        graph.set_array(sn, scale.astype(np.float32))
        o = node.output[0]
        out += [
            helper.make_node("Gather", [qn, node.input[1]], [o + "_q"], name=node.name, axis=0),
            helper.make_node(
                "Gather", [sn, node.input[1]], [o + "_s"], name=node.name + "_scale", axis=0
            ),
            helper.make_node(
                "Cast", [o + "_q"], [o + "_f"], name=node.name + "_cast", to=TensorProto.FLOAT
            ),
            helper.make_node("Mul", [o + "_f", o + "_s"], [o], name=node.name + "_mul"),
        ]
        done.append(node.name)
    del model.graph.node[:]
    model.graph.node.extend(out)
    _drop_unused_initializers(model)
    return done


def _drop_unused_initializers(model: Any) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    original = {t.name for t in model.graph.initializer}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    graph_inputs = [i for i in model.graph.input if i.name in used or i.name not in original]
    del model.graph.input[:]
    model.graph.input.extend(graph_inputs)
