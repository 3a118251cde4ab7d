"""Self-attention blocks of an int8 encoder fused into onnxruntime's ``QAttention`` kernel.

After ``rowwise_dynamic`` a BERT-like encoder layer runs its attention as about twenty nodes:
three ``MatMulIntegerToFloat`` (Q, K and V read the same uint8 input), a ``Reshape`` and a
``Transpose`` for each, the scores ``MatMul``, its scaling, the additive mask, ``Softmax``, the
context ``MatMul``, a ``Transpose`` and a ``Reshape`` back, plus the ``Shape``/``Gather``/
``Unsqueeze``/``Concat`` chains that compute the reshapes' targets at run time.
onnxruntime's contrib op ``QAttention`` (com.microsoft, what its own quantizer emits for a
fused ``Attention``) does all of it in one kernel, with one integer GEMM over the three
projections side by side: the same integers (the weights concatenated column by column, each
column keeping its scale), the same float math after it.

``fuse_attention`` matches that pattern on the quantized graph by structure, not by names, and
rewrites each match. It only applies where the rewrite means the same function:

- Q, K and V read one input quantized with one fixed scale and zero point (a calibrated
  range; an input quantized row by row at run time has no single scale);
- each projection's output is reshaped to (batch, sequence, heads, head size) with constant
  heads and head size, and the scores are scaled by 1/sqrt(head size): after the scores
  ``MatMul`` (eager attention), or split between Q and K before it (what
  ``scaled_dot_product_attention`` exports to, each scaled by head size ** -0.25);
- the additive mask is computed from one integer graph input of rank 2 (the attention mask,
  1 where a token is attended); ``QAttention`` reads that input itself. The guard that
  ``scaled_dot_product_attention`` exports after the ``Softmax`` (``IsNaN`` -> ``Where``: a row
  whose every key is masked gives zeros instead of NaN) is removed with the rest: no row is
  all masked while a sequence attends to at least one of its own tokens.

Given ``feeds``, each fused block is checked against the unfused graph on some of them, on
one whose attention mask hides half of its tokens (as padding does) and on a batch of that
one and its unmasked self (two rows, two masks): fed the int8 input and
the mask that the unfused graph gives that attention, the kernel must compute what the graph
computes there. When a block differs, nothing is fused (a mask computed another way than the
kernel assumes, say). Block by block, because through the whole model a float difference in
the last bits can flip the rounding of the next layer's int8 input and grow: the dynamo
exporter's graph of minilm-l6 fused this way agrees to 4e-7 per block, yet 2% at the output
on one sentence in eight.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
from onnx import TensorProto, helper

from edgeslim.ptq._graph import Graph, add_outputs, make_session

__all__ = ["fuse_attention"]

_INT_TYPES = {TensorProto.INT64, TensorProto.INT32}


def _scalar(graph: Graph, name: str) -> float | None:
    c = _constant(graph, name)
    if c is None or np.asarray(c).size != 1:
        return None
    return float(np.asarray(c).reshape(-1)[0])


def _prescaled(graph: Graph, tensor: str) -> tuple[str, float, list[Any]]:
    """``tensor`` or, when its one reader is a ``Mul`` by a scalar constant, that product:
    (what the scores read, the factor, the ``Mul`` nodes passed)."""
    mul = _only_consumer(graph, tensor, "Mul")
    if mul is not None:
        other = mul.input[1] if mul.input[0] == tensor else mul.input[0]
        c = _scalar(graph, other)
        if c is not None:
            return mul.output[0], c, [mul]
    return tensor, 1.0, []


def _nan_guard(graph: Graph, softmax: Any) -> tuple[str, list[Any]] | None:
    """What the context ``MatMul`` reads after ``softmax``: its output, or the output of the
    ``Where(IsNaN(p), 0, p)`` that follows it (``scaled_dot_product_attention``'s guard for
    rows with every key masked), with the guard's nodes; None for anything else."""
    p = softmax.output[0]
    users = _readers(graph, p)
    if len(users) == 1:
        return p, []
    if len(users) != 2 or p in graph.graph_outputs:
        return None
    isnan = next((u for u in users if u.op_type == "IsNaN"), None)
    where = next((u for u in users if u.op_type == "Where"), None)
    if isnan is None or where is None:
        return None
    if _only_consumer(graph, isnan.output[0], "Where") is not where:
        return None
    if list(where.input) != [isnan.output[0], where.input[1], p] or _scalar(
            graph, where.input[1]) != 0.0:
        return None
    return where.output[0], [isnan, where]


def _readers(graph: Graph, tensor: str) -> list[Any]:
    """The nodes that read ``tensor``'s values: a ``Shape`` reads only its shape, which the
    exporters use to compute reshape targets (``_fuse`` checks that none is left reading a
    tensor it removed)."""
    return [u for u in graph.consumers.get(tensor, []) if u.op_type != "Shape"]


def _only_consumer(graph: Graph, tensor: str, op_type: str) -> Any | None:
    users = _readers(graph, tensor)
    if len(users) != 1 or users[0].op_type != op_type or tensor in graph.graph_outputs:
        return None
    return users[0]


def _perm(graph: Graph, node: Any) -> list[int]:
    return list(graph.attr(node, "perm", []) or [])


def _constant(graph: Graph, name: str) -> np.ndarray | None:
    value = graph.array(name)
    if value is not None:
        return value
    prod = graph.producer.get(name)
    if prod is not None and prod.op_type == "Constant" and prod.attribute:
        from onnx import numpy_helper

        attr = prod.attribute[0]
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
    return None


_RUN_TIME = -2  # a target dim computed at run time (one value, unsqueezed from a scalar)

# One entry of a shape computed in the graph: a constant, _RUN_TIME, or ("dim", tensor, i),
# dim i of a tensor's shape as read by a Shape node.
_Dim = int | tuple[str, str, int]


def _rank(graph: Graph, tensor: str) -> int | None:
    """``tensor``'s rank where the graph says it plainly (an input, a Transpose, a Reshape)."""
    for i in graph.model.graph.input:
        if i.name == tensor:
            return len(i.type.tensor_type.shape.dim) if i.type.tensor_type.HasField(
                "shape") else None
    prod = graph.producer.get(tensor)
    if prod is None:
        return None
    if prod.op_type == "Transpose":
        return len(_perm(graph, prod)) or None
    if prod.op_type == "Reshape":
        dims = _shape_expr(graph, prod.input[1])
        return None if dims is None else len(dims)
    return None


def _shape_expr(graph: Graph, tensor: str) -> list[_Dim] | None:
    """The 1-D int64 ``tensor`` (a reshape target) as the list of what each entry is: a
    constant, a dim of another tensor read through ``Shape`` (sliced by constants), or a
    run-time scalar unsqueezed; concatenations of those. None for anything else."""
    value = _constant(graph, tensor)
    if value is not None:
        return [int(v) for v in np.asarray(value).reshape(-1)]
    prod = graph.producer.get(tensor)
    if prod is None:
        return None
    op = prod.op_type
    if op == "Concat":
        dims: list[_Dim] = []
        for part in prod.input:
            sub = _shape_expr(graph, part)
            if sub is None:
                return None
            dims += sub
        return dims
    if op == "Unsqueeze":
        return [_RUN_TIME]
    if op == "Shape":
        rank = _rank(graph, prod.input[0])
        start, end = graph.attr(prod, "start", 0), graph.attr(prod, "end", None)
        if rank is None:
            if start < 0 or end is None or end < 0:
                return None
            return [("dim", prod.input[0], i) for i in range(start, end)]
        return [("dim", prod.input[0], i) for i in range(rank)][start:end]
    if op == "Slice" and len(prod.input) >= 3:
        data = _shape_expr(graph, prod.input[0])
        bounds = [_constant(graph, n) if n else None for n in prod.input[1:5]]
        given = [bool(n) for n in prod.input[1:5]]
        if data is None or any(g and (b is None or b.size != 1)
                               for g, b in zip(given, bounds, strict=True)):
            return None  # a bound computed at run time, or more than one axis
        for extra, ok in zip(bounds[2:], (0, 1), strict=False):  # axes 0, steps 1 only
            if extra is not None and int(extra.reshape(-1)[0]) != ok:
                return None
        lo, hi = (int(b.reshape(-1)[0]) for b in bounds[:2])
        return data[lo:hi]
    return None


def _target_dims(graph: Graph, reshape: Any) -> list[int] | None:
    """``reshape``'s target shape: constants as they are, each run-time dim as ``_RUN_TIME``;
    None when it is not a shape ``_shape_expr`` can read."""
    dims = _shape_expr(graph, reshape.input[1])
    if dims is None:
        return None
    return [d if isinstance(d, int) else _RUN_TIME for d in dims]


def _last_two_swapped(graph: Graph, tensor: str) -> tuple[str, list[Any]] | None:
    """The rank-4 ``tensor`` with its last two dims swapped, as the dynamo exporter writes a
    key's transpose: Reshape to (-1, d2, d3), Transpose (0, 2, 1), Reshape to (d0, d1, d3, d2),
    each d read from ``tensor``'s own shape. The last Reshape's output and the three nodes,
    or None when ``tensor`` is not read that way."""
    first = _only_consumer(graph, tensor, "Reshape")
    if first is None or first.input[0] != tensor:
        return None
    d = [("dim", tensor, i) for i in range(4)]
    if _shape_expr(graph, first.input[1]) != [-1, d[2], d[3]]:
        return None
    swap = _only_consumer(graph, first.output[0], "Transpose")
    if swap is None or _perm(graph, swap) != [0, 2, 1]:
        return None
    back = _only_consumer(graph, swap.output[0], "Reshape")
    if back is None or _shape_expr(graph, back.input[1]) != [d[0], d[1], d[3], d[2]]:
        return None
    return back.output[0], [first, swap, back]


def _head_shape(graph: Graph, reshape: Any) -> tuple[int, int] | None:
    """(heads, head size) when ``reshape``'s target has rank 4 and ends in two constants
    (heads may be -1: inferred from the hidden size)."""
    dims = _target_dims(graph, reshape)
    if dims is None or len(dims) != 4 or dims[3] <= 0 or (dims[2] <= 0 and dims[2] != -1):
        return None
    return dims[2], dims[3]


def _merged_width(graph: Graph, reshape: Any) -> int | None:
    """The last dim of ``reshape``'s target when it has rank 3 (None otherwise)."""
    dims = _target_dims(graph, reshape)
    return dims[2] if dims is not None and len(dims) == 3 else None


def _mask_input(graph: Graph, tensor: str) -> str | None:
    """The one rank-2 integer graph input whose values ``tensor`` is computed from (constants
    and tensors read only for their shape aside)."""
    inputs = {i.name: i for i in graph.model.graph.input}
    found: set[str] = set()
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        name = stack.pop()
        if name in seen or name in graph.initializers:
            continue
        seen.add(name)
        if name in inputs:
            found.add(name)
            continue
        prod = graph.producer.get(name)
        if prod is None:
            return None
        if prod.op_type != "Shape":  # a Shape reads no values
            stack.extend(i for i in prod.input if i)
    if len(found) != 1:
        return None
    name = found.pop()
    t = inputs[name].type.tensor_type
    if t.elem_type not in _INT_TYPES or len(t.shape.dim) != 2:
        return None
    return name


def _match(graph: Graph, q_in: str, kernels: list[Any]) -> dict[str, Any] | None:
    """The attention block whose Q/K/V projections are ``kernels`` (read ``q_in``), or None."""
    if len(kernels) != 3:
        return None
    first = kernels[0]
    for k in kernels:
        if (
            len(k.input) < 7
            or not k.input[6]
            or k.input[2] != first.input[2]
            or k.input[4] != first.input[4]
            or graph.array(k.input[1]) is None
            or graph.array(k.input[3]) is None
            or graph.array(k.input[6]) is None
        ):
            return None
        if len(k.input) > 5 and k.input[5] and graph.array(k.input[5]) is None:
            return None
    zero = graph.array(first.input[4])
    if graph.array(first.input[2]) is None or zero is None or zero.dtype != np.uint8:
        return None  # QAttention reads uint8 activations only
    arms = {}
    for k in kernels:
        reshape = _only_consumer(graph, k.output[0], "Reshape")
        if reshape is None:
            return None
        transpose = _only_consumer(graph, reshape.output[0], "Transpose")
        if transpose is None:
            return None
        arms[k.name] = (reshape, transpose)
    # each arm as the scores or the context read it: (tensor, perm from the projection's
    # (batch, sequence, heads, size) view, the nodes after the Transpose on the way)
    views: dict[str, tuple[str, list[int], list[Any]]] = {}
    for name, (_, t) in arms.items():
        views[name] = (t.output[0], _perm(graph, t), [])
        swapped = _last_two_swapped(graph, t.output[0]) if views[name][1] == [0, 2, 1, 3] else None
        if swapped is not None:  # the dynamo exporter's K^T
            views[name] = (swapped[0], [0, 2, 3, 1], swapped[1])
    # the scores MatMul reads Q (perm 0,2,1,3) and K (perm 0,2,3,1), each maybe pre-scaled
    scaled = {name: _prescaled(graph, views[name][0]) for name in arms}
    scores = None
    for name in arms:
        if views[name][1] != [0, 2, 1, 3]:
            continue
        q_out = scaled[name][0]
        users = _readers(graph, q_out)
        if len(users) == 1 and users[0].op_type == "MatMul" and users[0].input[0] == q_out:
            scores = users[0]
            q_name = name
    if scores is None:
        return None
    k_name = next((n for n in arms if scaled[n][0] == scores.input[1]), None)
    if k_name is None or views[k_name][1] != [0, 2, 3, 1]:
        return None
    v_name = next(n for n in arms if n not in (q_name, k_name))
    if views[v_name][1] != [0, 2, 1, 3] or scaled[v_name][2] or views[v_name][2]:
        return None
    for name in (q_name, k_name, v_name):  # nothing else reads what the kernel replaces
        passed = [arms[name][1], *views[name][2], *scaled[name][2]]
        for tensor in (n.output[0] for n in passed):
            if len(_readers(graph, tensor)) != 1 or tensor in graph.graph_outputs:
                return None
    shapes = {_head_shape(graph, arms[n][0]) for n in arms}
    if len(shapes) != 1 or None in shapes:
        return None
    heads, size = shapes.pop()
    hidden = graph.array(first.input[1]).shape
    if len({graph.array(k.input[1]).dtype for k in kernels}) != 1:
        return None
    if heads == -1 and hidden[1] % size == 0:
        heads = hidden[1] // size
    if any(graph.array(k.input[1]).shape != hidden for k in kernels) or hidden[1] != heads * size:
        return None
    # the scale: on the scores (eager), or split between Q and K before them (SDPA)
    factor = scaled[q_name][1] * scaled[k_name][1]
    scaled_scores = scores.output[0]
    scale_nodes = scaled[q_name][2] + scaled[k_name][2]
    post = _only_consumer(graph, scaled_scores, "Mul") or _only_consumer(
        graph, scaled_scores, "Div")
    if post is not None and post.input[0] == scaled_scores:
        c = _scalar(graph, post.input[1])
        if c is None or c == 0.0:
            return None
        factor *= c if post.op_type == "Mul" else 1.0 / c
        scaled_scores = post.output[0]
        scale_nodes.append(post)
    if abs(factor * np.sqrt(size) - 1.0) > 1e-4:
        return None
    add = _only_consumer(graph, scaled_scores, "Add")
    if add is None:
        return None
    mask = add.input[1] if add.input[0] == scaled_scores else add.input[0]
    softmax = _only_consumer(graph, add.output[0], "Softmax")
    if softmax is None or graph.attr(softmax, "axis", -1) not in (-1, 3):
        return None
    guarded = _nan_guard(graph, softmax)
    if guarded is None:
        return None
    probs, guard = guarded
    context = _only_consumer(graph, probs, "MatMul")
    if (
        context is None
        or context.input[0] != probs
        or context.input[1] != views[v_name][0]
    ):
        return None
    # SDPA exports a reshape of the context to its own shape, (batch, -1, sequence, size)
    between: list[Any] = []
    same = _only_consumer(graph, context.output[0], "Reshape")
    if same is not None:
        dims = _target_dims(graph, same)
        if (dims is None or len(dims) != 4 or dims[0] != _RUN_TIME or dims[1] not in (-1, heads)
                or dims[2] != _RUN_TIME or dims[3] not in (_RUN_TIME, size)):
            return None
        between.append(same)
    back = _only_consumer(graph, (between or [context])[-1].output[0], "Transpose")
    if back is None or _perm(graph, back) != [0, 2, 1, 3]:
        return None
    out = _only_consumer(graph, back.output[0], "Reshape")
    if out is None or _merged_width(graph, out) not in (-1, hidden[1]):
        return None
    mask_input = _mask_input(graph, mask)
    if mask_input is None:
        return None
    order = {n: k for n, k in ((k.name, k) for k in kernels)}
    return {
        "kernels": [order[q_name], order[k_name], order[v_name]],
        "heads": heads,
        "mask_input": mask_input,
        "output": out.output[0],
        "input": q_in,
        "removed": [scores, *scale_nodes, add, softmax, *guard, context, *between, back, out]
        + [x for n in arms for x in (*arms[n], *views[n][2])]
        + list(kernels),
    }


def _fuse(model: Any) -> dict[str, str]:
    """Fuse every match in place: the ``QAttention`` nodes made, by name, each with the mask
    input it reads (through a Cast to int32)."""
    graph = Graph(model)
    groups: dict[str, list[Any]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMulIntegerToFloat":
            groups.setdefault(node.input[0], []).append(node)
    matches = [m for x, ks in groups.items() if (m := _match(graph, x, ks)) is not None]
    if not matches:
        return {}
    made: dict[str, str] = {}
    removed: set[str] = set()
    new_nodes: dict[str, list[Any]] = {}
    casts: dict[str, str] = {}
    for m in matches:
        q, k, v = m["kernels"]
        base = q.name + "_qattention"
        weights = [graph.array(n.input[1]) for n in (q, k, v)]
        columns = weights[0].shape[1:]
        w_scales = [np.broadcast_to(graph.array(n.input[3]), columns) for n in (q, k, v)]
        zps = []
        for n, w in zip((q, k, v), weights, strict=True):
            has_zp = len(n.input) > 5 and n.input[5]
            zp = graph.array(n.input[5]) if has_zp else np.zeros((), w.dtype)
            zps.append(np.broadcast_to(zp, columns).astype(w.dtype))
        weight = graph.fresh_name(base + "_weight")
        graph.set_array(weight, np.concatenate(weights, axis=1))
        scale = graph.fresh_name(base + "_weight_scale")
        graph.set_array(scale, np.concatenate(w_scales).astype(np.float32))
        bias = graph.fresh_name(base + "_bias")
        graph.set_array(bias, np.concatenate([graph.array(n.input[6]) for n in (q, k, v)]))
        zp_all = np.concatenate(zps)
        zero = graph.fresh_name(base + "_weight_zero")
        graph.set_array(zero, zp_all[:1].reshape(()) if np.all(zp_all == zp_all[0]) else zp_all)
        mask = casts.get(m["mask_input"])
        if mask is None:
            mask = graph.fresh_name(m["mask_input"] + "_int32")
            casts[m["mask_input"]] = mask
            new_nodes.setdefault(q.name, []).append(
                helper.make_node("Cast", [m["mask_input"]], [mask], name=mask + "_cast",
                                 to=TensorProto.INT32))
        new_nodes.setdefault(q.name, []).append(
            helper.make_node(
                "QAttention",
                [m["input"], weight, bias, q.input[2], scale, mask, q.input[4], zero],
                [m["output"]],
                name=base,
                domain="com.microsoft",
                num_heads=int(m["heads"]),
            )
        )
        made[base] = m["mask_input"]
        removed |= {n.name for n in m["removed"]}
    nodes = []
    for node in model.graph.node:
        nodes.extend(new_nodes.get(node.name, []))
        if node.name not in removed:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _prune(model)
    return made


def _prune(model: Any) -> None:
    """Drop nodes and initializers nothing reads any more (the reshapes' shape chains)."""
    from edgeslim.ptq.dynamic import _drop_unused_initializers

    outputs = {o.name for o in model.graph.output}
    while True:
        used = {i for n in model.graph.node for i in n.input} | outputs
        keep = [n for n in model.graph.node if any(o in used for o in n.output)]
        if len(keep) == len(model.graph.node):
            break
        del model.graph.node[:]
        model.graph.node.extend(keep)
    _drop_unused_initializers(model)


def _closed(model: Any) -> bool:
    """Whether every tensor a node reads is still made by something (no reader of a removed
    tensor is left: a ``Shape`` whose result fed a node that stays, say)."""
    made = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    made |= {o for n in model.graph.node for o in n.output}
    return all(i in made for n in model.graph.node for i in n.input if i)


def _masked(feeds: Sequence[dict], mask_input: str) -> list[dict]:
    """Two checks of how the mask is read: a feed whose first row attends only to the first
    half of its tokens (mask 0 on the rest, as padding is), and, when every input of that
    feed has a batch axis, a batch of it and the feed as it was (rows with different masks in
    one batch, as the edge node's dynamic batching runs them). [] when no feed has a mask of
    two tokens or more."""
    for feed in feeds:
        mask = np.asarray(feed.get(mask_input, np.zeros((0, 0))))
        if mask.ndim == 2 and mask.shape[1] >= 2:
            half = mask.copy()
            half[0, (mask.shape[1] + 1) // 2 :] = 0
            out = [{**feed, mask_input: half}]
            rows = mask.shape[0]
            if all(np.ndim(v) >= 1 and np.shape(v)[0] == rows for v in feed.values()):
                out.append({k: np.concatenate([half, mask]) if k == mask_input
                            else np.concatenate([v, v]) for k, v in feed.items()})
            return out
    return []


def _alone(graph: Graph, kernel: Any, mask_input: str) -> Any:
    """A model of the ``QAttention`` node ``kernel`` of ``graph``'s model alone: its quantized
    input and the graph's mask input in, the block's output out."""
    model, inits = graph.model, graph.initializers
    mask_info = next(i for i in model.graph.input if i.name == mask_input)
    cast = helper.make_node("Cast", [mask_input], [kernel.input[5]], to=TensorProto.INT32)
    graph = helper.make_graph(
        [cast, copy.deepcopy(kernel)], "qattention_alone",
        [helper.make_tensor_value_info(kernel.input[0], TensorProto.UINT8, None), mask_info],
        [helper.make_tensor_value_info(kernel.output[0], TensorProto.FLOAT, None)],
        [inits[n] for n in kernel.input if n in inits],
    )
    return helper.make_model(graph, opset_imports=list(model.opset_import),
                             ir_version=model.ir_version)


def _blocks_agree(model: Any, before: Any, made: dict[str, str], checks: list[dict],
                  threads: int, rtol: float) -> bool:
    """Whether every fused block, given the input and mask the unfused graph gives its
    attention on each of ``checks``, computes what the unfused graph computes there (within
    ``rtol`` of the largest value). Block by block, so that the rounding of the next layer's
    int8 input cannot turn a float difference in the last bits into a large one."""
    kernels = [n for n in model.graph.node if n.name in made]
    watch = sorted({k.input[0] for k in kernels} | {k.output[0] for k in kernels})
    plain = make_session(add_outputs(before, watch), threads=threads)
    names = [i.name for i in plain.get_inputs()]
    index = Graph(model)  # one index of the fused model for every block's own model
    alone = [(k, made[k.name], make_session(_alone(index, k, made[k.name]), threads=threads))
             for k in kernels]
    for feed in checks:
        got = dict(zip(watch, plain.run(watch, {k: feed[k] for k in names}), strict=True))
        for k, mask, session in alone:
            ref = got[k.output[0]]
            out = session.run(None, {k.input[0]: got[k.input[0]], mask: feed[mask]})[0]
            scale = max(float(np.abs(ref).max()), 1e-6)
            if out.shape != ref.shape or float(np.abs(out - ref).max()) > rtol * scale:
                return False
    return True


def fuse_attention(
    model: Any, feeds: Sequence[dict] | None = None, *, threads: int = 2, rtol: float = 1e-3
) -> tuple[Any, int]:
    """``model`` with its int8 attention blocks fused into ``QAttention`` (module docstring)
    and how many were fused. In place, unless a node outside the fused blocks would be left
    reading a tensor they removed, or the check on ``feeds`` fails: then the model is
    returned unchanged with 0. Without ``feeds`` the outputs are not checked: the structure
    alone decides (the quantizer always passes its calibration feeds)."""
    before = copy.deepcopy(model)
    made = _fuse(model)
    if made and not _closed(model):
        model.CopyFrom(before)
        return model, 0
    if not made or not feeds:
        return model, len(made)
    checks = list(feeds[:8])
    for name in sorted(set(made.values())):  # the kernel must read the mask as the graph
        masked = _masked(feeds, name)  # did: padding included, row by row
        if not masked:
            model.CopyFrom(before)
            return model, 0
        checks += masked
    if not _blocks_agree(model, before, made, checks, threads, rtol):
        model.CopyFrom(before)
        return model, 0
    return model, len(made)
