"""Dynamic int8 quantization: onnxruntime's, and edgeslim's row-wise variant for transformers.

``quantize_dynamic_ort`` calls onnxruntime's ``quantize_dynamic`` (per-tensor activation range
computed at run time, ``DynamicQuantizeMatMul``). In BERT-like encoders one token (``[CLS]``)
carries activations ten times larger than the others, so a single range per tensor wastes most
of the 8 bits on the other tokens; the range also spans the whole batch, so a sentence's
embedding changes with the sentences batched beside it. ``rowwise_dynamic`` (edgeslim's own
rewrite) quantizes each row (token) of a MatMul input with its own scale, symmetric around the
fixed zero point 128, and multiplies by per-output-channel int8 weights with onnxruntime's
``MatMulIntegerToFloat`` kernel (u8 x u8 in model.onnx, exact on every x86 CPU: see exact.py):

    s_r = max_j |x_rj|;  q = round(127 x / s_r) + 128 (uint8);  y = (q - 128) @ Wq * s_w * s_r / 127

Row scales cost a reduction and three elementwise passes over the input at run time. Inputs
where no token stands out (``static_inputs``: the LayerNorm outputs that feed Q/K/V and the
first FFN linear, the attention context) instead get one range calibrated on data, a single
``QuantizeLinear`` and the bias folded into the kernel; the loud GELU outputs that feed the
second FFN linear stay row-wise. Either way each row's result depends on that row alone, so
batching never changes an answer.

Word-embedding tables (``Gather`` on a 2-D constant with many rows) are stored as int8 with one
scale per row, gathered and rescaled at run time: ``Gather(Wq, ids) * Gather(s, ids)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from onnx import TensorProto, helper

from edgeslim.ptq._graph import Graph, opset_of, unique_node_names

__all__ = [
    "embedding_gathers",
    "input_statistics",
    "quantize_dynamic_ort",
    "quantize_embeddings",
    "rowwise_dynamic",
    "static_inputs",
]


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


def input_statistics(
    model: Any, feeds: Sequence[dict], names: Sequence[str], *, threads: int = 2
) -> dict[str, dict[str, float]]:
    """Calibration statistics of tensors ``names`` over ``feeds``: ``lo``/``hi``, the smallest
    and largest value seen, and ``spread``, the largest magnitude seen over the median row's
    (token's) largest magnitude. A calibrated range costs the median row about
    ``log2(spread)`` bits against a range of its own."""
    from edgeslim.ptq._graph import add_outputs, make_session

    session = make_session(add_outputs(model, names), threads=threads)
    inputs = {i.name for i in session.get_inputs()}
    lo = dict.fromkeys(names, np.inf)
    hi = dict.fromkeys(names, -np.inf)
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        values = session.run(list(names), {k: v for k, v in feed.items() if k in inputs})
        for name, v in zip(names, values, strict=True):
            lo[name] = min(lo[name], float(v.min()))
            hi[name] = max(hi[name], float(v.max()))
            rows[name].append(np.abs(v.reshape(-1, v.shape[-1])).max(1))
    stats = {}
    for name in names:
        finite = np.isfinite(lo[name]) and np.isfinite(hi[name])
        median = float(np.median(np.concatenate(rows[name]))) if rows[name] else 0.0
        peak = max(abs(lo[name]), abs(hi[name])) if finite else np.inf
        spread = peak / median if finite and median > 0 else np.inf
        stats[name] = {"lo": lo[name], "hi": hi[name], "spread": float(spread)}
    return stats


def static_inputs(
    model: Any,
    feeds: Sequence[dict],
    *,
    max_spread: float,
    exclude: Sequence[str] = (),
    threads: int = 2,
) -> tuple[dict[str, tuple[float, float]], dict[str, dict[str, Any]]]:
    """Which MatMul inputs ``rowwise_dynamic`` may quantize with a fixed (calibrated) range.

    An input qualifies when its ``spread`` (``input_statistics``) is at most ``max_spread``:
    no token is much louder than the typical one, so one range for every row costs little
    against one range per row, and it needs no run-time reduction. Returns ``{input: (lo,
    hi)}`` for those and, for every candidate input, its statistics and the ``matmuls`` that
    read it.
    """
    groups = Graph(model).matmul_groups(exclude)
    names = sorted(groups)
    if not names:
        return {}, {}
    stats: dict[str, dict[str, Any]] = input_statistics(model, feeds, names, threads=threads)
    for name in names:
        stats[name]["matmuls"] = [n.name for n in groups[name]]
    ranges = {
        n: (s["lo"], s["hi"]) for n, s in stats.items() if s["spread"] <= max_spread
    }
    return ranges, stats


def _bias_add(graph: Graph, output: str, columns: int) -> tuple[Any, str] | None:
    """The ``Add`` of a 1-D constant bias that is the only reader of ``output``, if any."""
    users = graph.consumers.get(output, [])
    if len(users) != 1 or users[0].op_type != "Add" or output in graph.graph_outputs:
        return None
    add = users[0]
    other = [i for i in add.input if i != output]
    if len(other) != 1:
        return None
    bias = graph.array(other[0])
    if bias is None or bias.shape != (columns,) or bias.dtype != np.float32:
        return None
    return add, other[0]


def rowwise_dynamic(
    model: Any,
    *,
    exclude: Sequence[str] = (),
    reduce_range: bool = False,
    include: Sequence[str] | None = None,
    static_ranges: Mapping[str, tuple[float, float]] | None = None,
) -> tuple[Any, list[str]]:
    """Rewrite every MatMul with a 2-D constant weight into int8 (in place).

    Inputs named in ``static_ranges`` (``{tensor: (lo, hi)}``, from ``static_inputs``) are
    quantized with that fixed range, uint8 with a zero point, and the MatMul's bias ``Add``
    moves into the kernel: one ``QuantizeLinear`` per input, one ``MatMulIntegerToFloat`` per
    MatMul. Every other input is quantized row by row at run time (module docstring).
    ``exclude``/``include`` select MatMul node names. Returns the model and the quantized node
    names. Weights are symmetric per output channel (7-bit with ``reduce_range``).
    """
    unique_node_names(model)
    graph = Graph(model)
    opset = opset_of(model)
    qmax = 63 if reduce_range else 127
    static_ranges = dict(static_ranges or {})
    groups = graph.matmul_groups(exclude, include)
    chosen = {n.name for nodes in groups.values() for n in nodes}
    selected = [n for n in model.graph.node if n.name in chosen]  # graph order

    def constant(base: str, value: np.ndarray) -> str:
        name = graph.fresh_name(base)
        graph.set_array(name, value)
        return name

    inv127 = constant("edgeslim_rq_inv127", np.array(1.0 / 127.0, np.float32))
    eps = constant("edgeslim_rq_eps", np.array(1e-12, np.float32))
    zp = constant("edgeslim_rq_zp", np.array(128, np.uint8))
    replace: dict[str, list[Any]] = {}
    dropped: set[str] = set()
    for x, nodes in groups.items():
        p = graph.fresh_name(x + "_rq")
        if x in static_ranges:
            lo, hi = (float(v) for v in static_ranges[x])
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            scale = np.float32(max(hi - lo, 1e-12) / 255.0)
            zero = np.uint8(np.clip(np.round(-lo / scale), 0, 255))
            a_scale = constant(p + "_scale", np.array(scale, np.float32))
            a_zero = constant(p + "_zp", np.array(zero, np.uint8))
            pre = [helper.make_node("QuantizeLinear", [x, a_scale, a_zero], [p + "_q"],
                                    name=p + "_q")]
            row_scale = None
        else:
            # s_r = max(max_j |x_rj|, eps); q = round(x / s_r * 127) + 128, saturated: the
            # 1/127 rides in QuantizeLinear's scale and the kernel's, so the row scale s_r
            # multiplies the output directly
            a_scale, a_zero, row_scale = inv127, zp, p + "_amax_e"
            pre = [
                helper.make_node("Abs", [x], [p + "_abs"], name=p + "_abs"),
                _reduce_max(graph, p + "_abs", p + "_amax", opset),
                helper.make_node("Max", [p + "_amax", eps], [row_scale], name=p + "_max"),
                helper.make_node("Div", [x, row_scale], [p + "_div"], name=p + "_div"),
                helper.make_node("QuantizeLinear", [p + "_div", inv127, zp], [p + "_q"],
                                 name=p + "_q"),
            ]
        for i, n in enumerate(nodes):
            w = graph.array(n.input[1]).astype(np.float64)
            ws = np.maximum(np.abs(w).max(0), 1e-12) / qmax
            wq = np.clip(np.round(w / ws), -qmax, qmax).astype(np.int8)
            wq_name = constant(n.input[1] + "_int8", wq)
            ws_name = constant(n.input[1] + "_scale", ws.astype(np.float32))
            inputs = [p + "_q", wq_name, a_scale, ws_name, a_zero]
            o = n.output[0]
            bias = _bias_add(graph, o, w.shape[1]) if row_scale is None else None
            if bias is not None:  # y = (q - z) @ Wq * s * s_w + b, in one kernel
                add, b = bias
                inputs += ["", b]
                dropped.add(add.name)
                o = add.output[0]
            body = [
                helper.make_node(
                    "MatMulIntegerToFloat",
                    inputs,
                    [o if row_scale is None else o + "_w"],
                    name=n.name,
                    domain="com.microsoft",
                )
            ]
            if row_scale is not None:
                body.append(
                    helper.make_node("Mul", [o + "_w", row_scale], [o], name=n.name + "_xscale")
                )
            replace[n.name] = (pre if i == 0 else []) + body
    out = []
    for node in model.graph.node:
        if node.name not in dropped:
            out.extend(replace.get(node.name, [node]))
    del model.graph.node[:]
    model.graph.node.extend(out)
    _drop_unused_initializers(model)
    if selected and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model, [n.name for n in selected]


def embedding_gathers(
    model: Any, *, min_rows: int = 1024, exclude: Sequence[str] = ()
) -> list[Any]:
    """The Gather nodes ``quantize_embeddings`` stores as int8: on a 2-D float32 constant of
    at least ``min_rows`` rows, along axis 0, not in ``exclude``."""
    graph = Graph(model)
    skipped = set(exclude)
    found = []
    for node in model.graph.node:
        table = graph.array(node.input[0]) if node.op_type == "Gather" else None
        if (table is not None and table.ndim == 2 and table.dtype == np.float32
                and table.shape[0] >= min_rows and int(graph.attr(node, "axis", 0)) == 0
                and node.name not in skipped):
            found.append(node)
    return found


def quantize_embeddings(
    model: Any, *, min_rows: int = 1024, exclude: Sequence[str] = ()
) -> list[str]:
    """Store large embedding tables (Gather on a 2-D float constant, axis 0) as int8 per row.

    Tables with fewer than ``min_rows`` rows stay float (position tables are small and
    sensitive). Returns the rewritten Gather node names; edits ``model`` in place.
    """
    unique_node_names(model)
    graph = Graph(model)
    tables = {id(n) for n in embedding_gathers(model, min_rows=min_rows, exclude=exclude)}
    done = []
    out = []
    for node in model.graph.node:
        if id(node) not in tables:
            out.append(node)
            continue
        table = graph.array(node.input[0])
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
