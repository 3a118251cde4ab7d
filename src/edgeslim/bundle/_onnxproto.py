"""Read the top level of an ONNX ``ModelProto`` without the ``onnx`` package.

Edge nodes install no ``onnx``; the bundle writer still wants the opset and a cheap check that
the bytes are an ONNX model. Only top-level fields are walked (the graph is one length-delimited
field that is skipped), so this is fast even for a 2 GiB model. Field numbers are from
onnx/onnx.proto: ``ir_version = 1``, ``graph = 7``, ``opset_import = 8``
(``OperatorSetIdProto``: ``domain = 1``, ``version = 2``); in ``GraphProto``
``initializer = 5``, ``input = 11``, ``output = 12``; ``ValueInfoProto``: ``name = 1``,
``type = 2``; ``TypeProto.tensor_type = 1`` with ``elem_type = 1``, ``shape = 2``;
``TensorShapeProto.dim = 1`` with ``dim_value = 1``, ``dim_param = 2``; ``TensorProto``:
``name = 8``, ``data_location = 14`` (1 = external).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ELEM_TYPES", "GraphTensor", "OnnxHeader", "read_onnx_header"]


#: ONNX TensorProto.DataType -> numpy dtype name (None: no numpy equivalent we accept).
ELEM_TYPES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
    8: None, 9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: None,
}


@dataclass(frozen=True)
class GraphTensor:
    """A graph input or output: ``dtype`` None when unknown; dims int, str or None (unknown)."""

    name: str
    dtype: str | None
    shape: tuple[int | str | None, ...] | None  # None: the rank is not recorded


@dataclass(frozen=True)
class OnnxHeader:
    ir_version: int
    opsets: dict[str, int]  # domain ('' is the default ONNX domain) -> version
    inputs: tuple[GraphTensor, ...] = ()
    outputs: tuple[GraphTensor, ...] = ()
    external_data: bool = False  # some initializer lives in a separate file

    @property
    def opset(self) -> int | None:
        """The default-domain opset version, or None when the model does not import it."""
        return self.opsets.get("", self.opsets.get("ai.onnx"))


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview):
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, value
        elif wire == 1:
            pos += 8
            yield number, None
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("field runs past the end")
            yield number, buf[pos : pos + size]
            pos += size
        elif wire == 5:
            pos += 4
            yield number, None
        else:
            raise ValueError(f"wire type {wire} is not valid protobuf")
        if pos > len(buf):
            raise ValueError("field runs past the end")


def _text(value: object) -> str:
    return bytes(value).decode("utf-8", "replace") if isinstance(value, memoryview) else ""


def _value_info(buf: memoryview) -> GraphTensor:
    name, dtype, shape = "", None, None
    for n, v in _fields(buf):
        if n == 1:
            name = _text(v)
        elif n == 2 and isinstance(v, memoryview):
            for tn, tv in _fields(v):
                if tn != 1 or not isinstance(tv, memoryview):
                    continue  # not a tensor type (sequence, map, ...)
                for fn, fv in _fields(tv):
                    if fn == 1 and isinstance(fv, int):
                        dtype = ELEM_TYPES.get(fv)
                    elif fn == 2 and isinstance(fv, memoryview):
                        dims: list[int | str | None] = []
                        for dn, dv in _fields(fv):
                            if dn != 1 or not isinstance(dv, memoryview):
                                continue
                            dim: int | str | None = None
                            for kn, kv in _fields(dv):
                                if kn == 1 and isinstance(kv, int):
                                    dim = kv
                                elif kn == 2:
                                    dim = _text(kv) or None
                            dims.append(dim)
                        shape = tuple(dims)
    return GraphTensor(name, dtype, shape)


def _graph(buf: memoryview) -> tuple[list[GraphTensor], list[GraphTensor], bool]:
    inputs: list[GraphTensor] = []
    outputs: list[GraphTensor] = []
    initializers: set[str] = set()
    external = False
    for n, v in _fields(buf):
        if not isinstance(v, memoryview):
            continue
        if n == 5:
            for tn, tv in _fields(v):
                if tn == 8:
                    initializers.add(_text(tv))
                elif tn == 14 and tv == 1:
                    external = True
        elif n == 11:
            inputs.append(_value_info(v))
        elif n == 12:
            outputs.append(_value_info(v))
    # Before IR version 4 initializers were also listed as inputs; they are not fed.
    return [t for t in inputs if t.name not in initializers], outputs, external


def read_onnx_header(data: bytes) -> OnnxHeader:
    """Parse the model's header and graph signature; ``ValueError`` when it is not a model."""
    buf = memoryview(data)
    ir_version = None
    graph = None
    opsets: dict[str, int] = {}
    for number, value in _fields(buf):
        if number == 1 and isinstance(value, int):
            ir_version = value
        elif number == 7 and isinstance(value, memoryview):
            graph = _graph(value)
        elif number == 8 and isinstance(value, memoryview):
            domain, version = "", 0
            for n, v in _fields(value):
                if n == 1 and isinstance(v, memoryview):
                    domain = bytes(v).decode("utf-8", "replace")
                elif n == 2 and isinstance(v, int):
                    version = v
            opsets[domain] = version
    if ir_version is None or graph is None:
        raise ValueError("no ir_version or no graph: not an ONNX ModelProto")
    inputs, outputs, external = graph
    return OnnxHeader(ir_version, opsets, tuple(inputs), tuple(outputs), external)
