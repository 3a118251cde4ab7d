"""Fold small constant subgraphs of an ONNX model into initializers.

PyTorch's TorchScript exporter leaves some computations on constants in the graph (for
example the pads of an asymmetric ``F.pad`` go through ConstantOfShape/Concat/Reshape/Slice/
Transpose/Cast, because its constant folder refuses a Slice with step -1), and scalars as
``Constant`` nodes. onnxruntime folds them when a session starts, but tools that read the
graph (quantizers, the bundle inspector) see a cleaner model when they are initializers.

Each node whose inputs are all initializers (or already folded), in the default domain and
without subgraphs, is evaluated once with ``onnx.reference`` and replaced by an initializer
holding its output. Only small tensors are folded (``max_elements``), so weights are never
duplicated. Written for the project; it does what ``onnxsim``'s constant folding does for
these cases without another dependency.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["fold_constants"]

_NONDETERMINISTIC = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}


def fold_constants(model: Any, *, max_elements: int = 65_536) -> int:
    """Fold constant nodes of ``model`` (an ``onnx.ModelProto``) in place.

    Returns the number of nodes removed. Inputs and outputs of the graph never change.
    """
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    graph_inputs = {i.name for i in graph.input}
    initializers = {t.name: t for t in graph.initializer if t.name not in graph_inputs}
    opsets = {o.domain or "": o.version for o in model.opset_import}
    values: dict[str, np.ndarray] = {}

    def small(name: str) -> bool:
        if name in values:
            return values[name].size <= max_elements
        dims = initializers[name].dims
        return int(np.prod(dims)) <= max_elements if dims else True

    def value(name: str) -> np.ndarray:
        if name not in values:
            values[name] = numpy_helper.to_array(initializers[name])
        return values[name]

    folded: list[Any] = []
    for node in graph.node:
        inputs = [n for n in node.input if n]
        if (
            node.domain not in ("", "ai.onnx")
            or node.op_type in _NONDETERMINISTIC
            or any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for a in node.attribute
            )
            or not all((n in values or n in initializers) and small(n) for n in inputs)
        ):
            continue
        try:
            evaluator = ReferenceEvaluator(node, opsets=opsets)
            outputs = evaluator.run(None, {n: value(n) for n in inputs})
        except Exception:  # an op the reference runtime lacks: leave it to onnxruntime
            continue
        if any(np.asarray(o).size > max_elements for o in outputs):
            continue
        for name, out in zip(node.output, outputs, strict=True):
            values[name] = np.asarray(out)
        folded.append(node)

    if not folded:
        return 0
    folded_ids = {id(n) for n in folded}
    kept = [n for n in graph.node if id(n) not in folded_ids]
    used = _names_used(kept) | {o.name for o in graph.output}
    new_inits = [
        numpy_helper.from_array(values[out], name=out)
        for node in folded
        for out in node.output
        if out in used
    ]
    keep_inits = [t for t in graph.initializer if t.name in used or t.name in graph_inputs]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(keep_inits + new_inits)
    folded_names = {out for node in folded for out in node.output}
    stale = [v for v in graph.value_info if v.name in folded_names]
    for v in stale:
        graph.value_info.remove(v)
    return len(folded)


def _names_used(nodes: Any) -> set[str]:
    """Every tensor name read by ``nodes``, including from inside their subgraphs."""
    names: set[str] = set()
    for node in nodes:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs] if attr.HasField("g") else attr.graphs:
                names |= _names_used(sub.node)
    return names
