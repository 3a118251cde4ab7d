"""Small helpers over ONNX graphs shared by the post-training quantization modules.

Everything here works on ``onnx.ModelProto`` objects in memory; sessions are plain
onnxruntime CPU sessions with pinned threads. Nothing imports torch.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim._ort import ort_session
from edgeslim.errors import ModelError

__all__ = [
    "Graph",
    "add_outputs",
    "as_model",
    "at_least_opset",
    "make_session",
    "model_bytes",
    "opset_of",
    "run_batches",
]


def as_model(model: Any, *, copy_model: bool = True) -> Any:
    """Return ``model`` (a path or an ``onnx.ModelProto``) as a ModelProto (copied by default)."""
    import onnx

    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise ModelError(f"The ONNX file {str(path)!r} does not exist.")
        try:
            return onnx.load(str(path))
        except Exception as exc:  # onnx raises DecodeError and friends
            raise ModelError(f"{str(path)!r} is not a readable ONNX model: {exc}") from exc
    if isinstance(model, onnx.ModelProto):
        return copy.deepcopy(model) if copy_model else model
    raise ModelError(
        f"Expected an ONNX model: a path to a .onnx file or an onnx.ModelProto. "
        f"Got {type(model).__name__} instead."
    )


def model_bytes(model: Any) -> bytes:
    """The serialized bytes of a ModelProto (what ``model.onnx`` would hold)."""
    return model.SerializeToString()


def opset_of(model: Any) -> int:
    """The default-domain opset version of ``model``."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def at_least_opset(model: Any, minimum: int, why: str) -> Any:
    """``model`` converted to opset ``minimum`` when it is older (onnx's version converter),
    or a ModelError naming the opset when the conversion fails."""
    import onnx
    from onnx import version_converter

    opset = opset_of(model)
    if opset >= minimum:
        return model
    try:
        converted = version_converter.convert_version(model, minimum)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises bare RuntimeErrors
        raise ModelError(
            f"The model uses ONNX opset {opset}; {why} needs opset {minimum} or later, and "
            f"converting it failed: {str(exc).strip().splitlines()[0][:300]}. Export the model "
            f"at opset {minimum} or later.") from None
    return converted


def make_session(model: Any, *, threads: int = 2, optimize: bool = True) -> Any:
    """An onnxruntime CPU session for ``model`` (ModelProto, bytes or path), run with its
    integer kernels in the form exact on every CPU (``exact.unsaturated``, on a copy)."""
    import onnx

    from edgeslim.ptq.exact import unsaturated

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model))
    elif isinstance(model, bytes):
        model = onnx.load_from_string(model)
    else:
        model = copy.deepcopy(model)
    return ort_session(unsaturated(model), threads=threads, optimize=optimize)


def add_outputs(model: Any, names: Sequence[str]) -> Any:
    """A copy of ``model`` that also returns the intermediate tensors ``names``."""
    import onnx

    out = copy.deepcopy(model)
    existing = {o.name for o in out.graph.output}
    for name in names:
        if name not in existing:
            out.graph.output.append(onnx.ValueInfoProto(name=name))
            existing.add(name)
    return out


def run_batches(
    session: Any, feeds: Iterable[Mapping[str, np.ndarray]], names: Sequence[str]
) -> Iterator[list[np.ndarray]]:
    """Run ``session`` on each feed dict, yielding the arrays of ``names``."""
    inputs = {i.name for i in session.get_inputs()}
    for feed in feeds:
        yield session.run(list(names), {k: v for k, v in feed.items() if k in inputs})


class Graph:
    """Index of one ModelProto: initializers, producers and consumers by tensor name.

    The index is built once; after editing the graph build a new one.
    """

    def __init__(self, model: Any):
        from onnx import numpy_helper

        self.model = model
        self._nh = numpy_helper
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        self.nodes = {n.name: n for n in model.graph.node}
        for node in model.graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
        self.graph_outputs = {o.name for o in model.graph.output}

    def array(self, name: str) -> np.ndarray | None:
        """The value of initializer ``name`` (None when it is not a constant)."""
        tensor = self.initializers.get(name)
        return None if tensor is None else self._nh.to_array(tensor)

    def set_array(self, name: str, value: np.ndarray) -> None:
        """Replace (or add) initializer ``name``."""
        tensor = self._nh.from_array(np.require(value, requirements="C"), name)  # keeps 0-d
        if name in self.initializers:
            self.initializers[name].CopyFrom(tensor)
        else:
            self.model.graph.initializer.append(tensor)
            self.initializers[name] = self.model.graph.initializer[-1]

    def fresh_name(self, base: str) -> str:
        """A tensor name not used anywhere in the graph."""
        taken = set(self.initializers) | set(self.producer) | set(self.consumers)
        taken |= {i.name for i in self.model.graph.input}
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        return name

    def attr(self, node: Any, name: str, default: Any = None) -> Any:
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def set_attr(self, node: Any, name: str, value: Any) -> None:
        from onnx import helper

        for i, a in enumerate(node.attribute):
            if a.name == name:
                del node.attribute[i]
                break
        node.attribute.append(helper.make_attribute(name, value))

    def weighted_nodes(self, op_types: Iterable[str] = ("Conv", "Gemm", "MatMul")) -> list[Any]:
        """Nodes of ``op_types`` whose weight (input 1) is a constant initializer."""
        ops = set(op_types)
        return [
            n
            for n in self.model.graph.node
            if n.op_type in ops and len(n.input) > 1 and n.input[1] in self.initializers
        ]

    def matmul_groups(
        self, exclude: Iterable[str] = (), include: Iterable[str] | None = None
    ) -> dict[str, list[Any]]:
        """MatMuls with a 2-D constant weight (linear layers), grouped by the tensor they read
        (Q/K/V share one), in graph order; ``exclude``/``include`` select node names."""
        skip = set(exclude)
        keep = None if include is None else set(include)
        groups: dict[str, list[Any]] = {}
        for n in self.weighted_nodes(("MatMul",)):
            if (self.array(n.input[1]).ndim == 2 and n.name not in skip
                    and (keep is None or n.name in keep)):
                groups.setdefault(n.input[0], []).append(n)
        return groups

    def is_depthwise(self, node: Any) -> bool:
        """A Conv whose every group has one input channel (and more than one group)."""
        if node.op_type != "Conv":
            return False
        group = int(self.attr(node, "group", 1))
        weight = self.initializers.get(node.input[1])
        return group > 1 and weight is not None and weight.dims[1] == 1


def unique_node_names(model: Any) -> Any:
    """Give every unnamed (or duplicate-named) node a unique name, in place; returns model."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
            while node.name in seen:
                node.name += "_"
        seen.add(node.name)
    return model
