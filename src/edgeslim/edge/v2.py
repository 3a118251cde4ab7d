"""The Open Inference Protocol (KServe V2) over REST: types and the request/response codec.

Covers JSON tensors and the binary tensor data extension as stock clients
(``tritonclient.http``) speak them:

- a request body is a JSON header, optionally followed by raw tensor bytes; the header's length
  is then in the ``Inference-Header-Content-Length`` HTTP header, and each input carried in
  binary gives its byte count in ``parameters.binary_data_size`` (inputs in order, row-major,
  little-endian);
- an output is sent in binary when its request entry has ``parameters.binary_data: true`` or,
  for outputs not listed, when the request has ``parameters.binary_data_output: true``; the
  response then carries ``Inference-Header-Content-Length`` and each binary output's
  ``parameters.binary_data_size``.

Every malformed request raises ``V2Error`` (an HTTP status and a message naming the problem),
which the server turns into ``{"error": "..."}``. Numeric tensors only (BOOL, UINT*, INT*, FP16,
FP32, FP64); BYTES and BF16 are refused with a message.

Clients send the same JSON header again and again (same names, shapes and options, only the
binary bytes differ), so a request whose inputs are all binary is decoded once per distinct
header: the checked layout is kept (``PlanCache``, a few hundred headers) and later requests
with that header only slice their bytes. Likewise the JSON header of a binary response is
built once per layout. A request whose bytes do not fit a kept layout goes through the full
decoding, which names the problem. On a 64-pixel digits request the two save ~10 us of the
~20 us the codec took.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeslim._validate import json_kind

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_RANK = 16

#: V2 datatype name -> numpy dtype (little-endian on the wire).
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
NUMPY_TO_V2: dict[str, str] = {dt.name: name for name, dt in V2_TO_NUMPY.items()}
_DTYPE_TO_V2: dict[np.dtype, str] = {dt: name for name, dt in V2_TO_NUMPY.items()}
_UNSUPPORTED = {"BYTES": "string tensors", "BF16": "bfloat16"}


class V2Error(Exception):
    """A request the protocol layer refuses: ``status`` (4xx) and a message for the client."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def v2_datatype(dtype: Any) -> str:
    """The V2 name of a numpy dtype (``float32`` -> ``FP32``)."""
    try:
        return _DTYPE_TO_V2[dtype]
    except (KeyError, TypeError):
        pass
    name = dtype.name if isinstance(dtype, np.dtype) else np.dtype(dtype).name
    if name not in NUMPY_TO_V2:
        raise V2Error(f"dtype {name} has no V2 datatype", 500)
    return NUMPY_TO_V2[name]


def v2_shape(shape: Sequence[Any]) -> list[int]:
    """Manifest/ORT shape to V2: symbolic or unknown dims become -1."""
    return [d if isinstance(d, int) and not isinstance(d, bool) and d >= 0 else -1 for d in shape]


@dataclass
class InputTensor:
    """One decoded request input: ``array`` has ``shape`` and the datatype's numpy dtype."""

    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray


@dataclass(frozen=True)
class OutputRequest:
    name: str
    binary: bool | None = None  # None: follow the request-level binary_data_output


@dataclass
class InferRequest:
    id: str | None
    inputs: list[InputTensor]
    outputs: list[OutputRequest] = field(default_factory=list)
    binary_output: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise V2Error(f"{where} must be a JSON object; got {json_kind(value)}")
    return value


def _params(d: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    p = d.get("parameters", {})
    if p is None:
        return {}
    return _obj(p, f"{where}: 'parameters'")


def _shape(value: Any, where: str, max_elements: int) -> list[int]:
    if (
        not isinstance(value, list)
        or len(value) > MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)
    ):
        raise V2Error(
            f"{where}: 'shape' must be a list of at most {MAX_RANK} ints >= 0; got {value!r}"[:300]
        )
    count = math.prod(value)
    if count > max_elements:
        raise V2Error(f"{where}: 'shape' {value} has {count} elements; at most {max_elements}", 413)
    return list(value)


def _datatype(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise V2Error(f"{where}: 'datatype' must be a string, one of "
                      f"{', '.join(V2_TO_NUMPY)}; got {json_kind(value)}"[:300])
    if value in _UNSUPPORTED:
        raise V2Error(f"{where}: 'datatype' {value} ({_UNSUPPORTED[value]}) is not supported; "
                      f"send numeric tensors ({', '.join(V2_TO_NUMPY)})")
    if value not in V2_TO_NUMPY:
        raise V2Error(
            f"{where}: 'datatype' must be one of {', '.join(V2_TO_NUMPY)}; got {value!r}"[:300]
        )
    return str(value)


def _flatten(data: Any, out: list[Any], where: str, depth: int = 0) -> None:
    if depth > MAX_RANK:
        raise V2Error(f"{where}: 'data' nests deeper than {MAX_RANK} levels")
    for item in data:
        if isinstance(item, list):
            _flatten(item, out, where, depth + 1)
        else:
            out.append(item)


def _json_array(data: Any, datatype: str, shape: list[int], where: str) -> np.ndarray:
    """JSON ``data`` (flat or nested, row-major) to an array, checking count and value types."""
    if not isinstance(data, list):
        data = [data]
    flat: list[Any] = []
    _flatten(data, flat, where)
    count = math.prod(shape)
    if len(flat) != count:
        raise V2Error(
            f"{where} has {len(flat)} values in 'data' but its shape {shape} needs {count}"
        )
    dt = V2_TO_NUMPY[datatype]
    for v in flat:
        if not _fits(v, datatype, dt):
            what = {"BOOL": "true/false"}.get(datatype, "integers" if dt.kind in "iu" else
                                              "numbers")
            shown = json.dumps(v) if isinstance(v, (str, int, float, bool, type(None))) else (
                json_kind(v))
            raise V2Error(f"{where} is {datatype} but 'data' holds {shown}; send {what}"[:300])
    try:
        if dt.kind in "iu":
            info = np.iinfo(dt)
            if flat and (min(flat) < info.min or max(flat) > info.max):
                raise OverflowError
        with np.errstate(over="ignore"):
            arr = np.array(flat, dtype=dt)
        if dt.kind == "f" and not np.isfinite(arr).all():  # JSON has no inf: it overflowed
            raise OverflowError
    except (OverflowError, ValueError):
        raise V2Error(f"{where} holds a value out of the range of {datatype}") from None
    return arr.reshape(shape)


def _no_constant(name: str) -> Any:
    """``json.loads`` hook: Python reads NaN and Infinity, which JSON does not have."""
    raise V2Error(f"the request JSON holds {name}, which is not JSON; send numbers (NaN and "
                  f"infinities only as binary tensor data)")


def check_json_safe(name: str, arr: np.ndarray) -> None:
    """Refuse an output that JSON cannot carry (NaN or an infinity) with a 422 naming it."""
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        raise V2Error(f"output {name!r} holds NaN or infinity, which JSON cannot carry; ask for "
                      f"it as binary tensor data (parameters.binary_data_output: true) to get "
                      f"the values as they are", 422)


def _fits(v: Any, datatype: str, dt: np.dtype) -> bool:
    if datatype == "BOOL":
        return isinstance(v, bool)
    if dt.kind in "iu":
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_header_length(value: str | None, body_size: int) -> int | None:
    """The ``Inference-Header-Content-Length`` value, checked against the body size."""
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise V2Error(f"{HEADER_LENGTH} must be an integer; got {value!r}"[:200]) from None
    if not 0 < n <= body_size:
        raise V2Error(f"{HEADER_LENGTH} is {n} but the body has {body_size} bytes")
    return n


@dataclass(frozen=True)
class _Plan:
    """The checked layout of an all-binary request: what ``parse_infer_request`` needs to
    bind a body with the same JSON header (inputs as name, datatype, shape, dtype, offset,
    size)."""

    id: str | None
    inputs: tuple[tuple[str, str, tuple[int, ...], np.dtype, int, int], ...]
    blob_size: int
    outputs: tuple[OutputRequest, ...]
    binary_output: bool
    parameters: Mapping[str, Any]

    def bind(self, blob: memoryview) -> InferRequest | None:
        """The request for ``blob``, or None when its size does not fit this layout."""
        if len(blob) != self.blob_size:
            return None
        inputs = [InputTensor(name, datatype, list(shape),
                              np.frombuffer(blob[start:start + size], dtype=dt).reshape(shape))
                  for name, datatype, shape, dt, start, size in self.inputs]
        return InferRequest(self.id, inputs, list(self.outputs), self.binary_output,
                            dict(self.parameters))


class _Bounded:
    """A dict of at most ``size`` entries, the oldest dropped first; safe to share between
    threads (lookups are single dict reads)."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._items: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        return self._items.get(key)

    def put(self, key: Any, value: Any) -> None:
        if self.size <= 0:
            return
        with self._lock:
            while len(self._items) >= self.size:
                del self._items[next(iter(self._items))]
            self._items[key] = value


class PlanCache:
    """Layouts of recently seen all-binary request headers, at most ``size`` of them (the
    oldest goes first), by header and element limit. Safe to share between threads."""

    #: Headers longer than this are decoded every time (a header of names and shapes is short).
    MAX_HEADER = 4096

    def __init__(self, size: int = 256) -> None:
        self._plans = _Bounded(size)
        self.hits = 0

    def get(self, head: bytes, max_elements: int) -> _Plan | None:
        if len(head) > self.MAX_HEADER:
            return None
        plan = self._plans.get((head, max_elements))
        if plan is not None:
            self.hits += 1
        return plan

    def put(self, head: bytes, max_elements: int, plan: _Plan) -> None:
        if len(head) <= self.MAX_HEADER:
            self._plans.put((head, max_elements), plan)


#: The process-wide cache ``parse_infer_request`` uses.
PLANS = PlanCache()


def parse_infer_request(
    body: bytes, header_length: int | None, *, max_elements: int = 1 << 26
) -> InferRequest:
    """Decode a V2 infer request body (JSON, or JSON header + binary tensor data).

    Binary arrays are read-only views of ``body``.
    """
    if header_length is not None:
        head = bytes(body[:header_length])
        blob = memoryview(body)[header_length:]
        plan = PLANS.get(head, max_elements)
        if plan is not None:
            req = plan.bind(blob)
            if req is not None:
                return req
        req, binary_inputs = _decode(head, blob, max_elements)
        if binary_inputs:
            PLANS.put(head, max_elements, _plan_of(req, len(blob)))
        return req
    return _decode(body, memoryview(b""), max_elements)[0]


def _plan_of(req: InferRequest, blob_size: int) -> _Plan:
    inputs = []
    start = 0
    for t in req.inputs:
        size = t.array.nbytes
        inputs.append((t.name, t.datatype, tuple(t.shape), t.array.dtype, start, size))
        start += size
    return _Plan(req.id, tuple(inputs), blob_size, tuple(req.outputs), req.binary_output,
                 dict(req.parameters))


def _decode(head: bytes, blob: memoryview, max_elements: int) -> tuple[InferRequest, bool]:
    """The request, and whether every input came in binary (so its layout may be kept)."""
    all_binary = True
    try:
        doc = json.loads(head, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise V2Error(f"the request body is not valid JSON: {exc}"[:300]) from None
    except RecursionError:
        raise V2Error("the request JSON nests too deeply") from None
    doc = _obj(doc, "the request")
    params = _params(doc, "the request")
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise V2Error(f"'id' must be a string; got {json_kind(rid)}")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise V2Error("the request needs 'inputs': a non-empty list of tensors")
    inputs: list[InputTensor] = []
    offset = 0
    for i, item in enumerate(raw_inputs):
        where = f"inputs[{i}]"
        item = _obj(item, where)
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise V2Error(f"{where}: 'name' must be a non-empty string")
        where = f"input '{name}'"[:200]
        datatype = _datatype(item.get("datatype"), where)
        shape = _shape(item.get("shape"), where, max_elements)
        ip = _params(item, where)
        size = ip.get("binary_data_size")
        if size is not None:
            if "data" in item:
                raise V2Error(f"{where} has both 'data' and binary_data_size; send one")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise V2Error(f"{where} binary_data_size must be an int >= 0; got {size!r}")
            if offset + size > len(blob):
                raise V2Error(
                    f"{where} declares {size} binary bytes but only {len(blob) - offset} remain "
                    f"after the JSON header (check {HEADER_LENGTH})"
                )
            dt = V2_TO_NUMPY[datatype]
            need = math.prod(shape) * dt.itemsize
            if size != need:
                raise V2Error(
                    f"{where} is {datatype} of shape {shape}, which takes {need} bytes; "
                    f"binary_data_size is {size}"
                )
            arr = np.frombuffer(blob[offset : offset + size], dtype=dt).reshape(shape)
            offset += size
        else:
            if "data" not in item:
                raise V2Error(f"{where} has neither 'data' nor binary_data_size")
            arr = _json_array(item["data"], datatype, shape, where)
            all_binary = False
        inputs.append(InputTensor(name, datatype, shape, arr))
    if offset != len(blob):
        raise V2Error(
            f"the body carries {len(blob) - offset} binary bytes that no input claims "
            f"(binary_data_size values add up to {offset})"
        )
    names = [t.name for t in inputs]
    if len(set(names)) != len(names):
        raise V2Error(f"inputs repeat a name: {names}"[:300])
    outputs: list[OutputRequest] = []
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise V2Error("'outputs' must be a list of {name, parameters}")
        for j, out in enumerate(raw_outputs):
            out = _obj(out, f"outputs[{j}]")
            oname = out.get("name")
            if not isinstance(oname, str) or not oname:
                raise V2Error(f"outputs[{j}].name must be a non-empty string")
            op = _params(out, f"outputs[{j}]")
            binary = op.get("binary_data")
            if binary is not None and not isinstance(binary, bool):
                raise V2Error(f"output '{oname}' binary_data must be true or false"[:200])
            if op.get("classification"):
                raise V2Error("the classification extension is not supported; use the "
                              "raw endpoint with a topk postprocessing step")
            outputs.append(OutputRequest(oname, binary))
    binary_output = params.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise V2Error("parameters.binary_data_output must be true or false")
    return InferRequest(rid, inputs, outputs, binary_output, dict(params)), all_binary


def encode_infer_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    outputs: Mapping[str, np.ndarray],
) -> tuple[bytes, dict[str, str]]:
    """The response body and extra headers for ``outputs`` (already filtered and ordered)."""
    wanted = {o.name: o for o in request.outputs} if request.outputs else {}
    layout = []
    arrays = []
    for name, arr in outputs.items():
        arr = np.asarray(arr)
        req = wanted.get(name)
        binary = req.binary if req is not None and req.binary is not None else (
            request.binary_output)
        layout.append((name, arr.dtype, arr.shape, binary))
        arrays.append(arr)
    key = (model_name, model_version, request.id, tuple(layout))
    cached = _HEADS.get(key) if request.id is None else None
    if cached is None:
        cached = _response_head(model_name, model_version, request.id, layout)
        if request.id is None and cached[2]:
            _HEADS.put(key, cached)
    head, headers, all_binary = cached
    if all_binary:
        chunks = [np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
                  for arr in arrays]
        return b"".join([head, *chunks]), dict(headers)
    return _encode_mixed(model_name, model_version, request.id, layout, arrays)


def _response_head(model_name: str, model_version: str, rid: str | None,
                   layout: list[tuple[str, np.dtype, tuple[int, ...], bool]]
                   ) -> tuple[bytes, dict[str, str], bool]:
    """(JSON header, HTTP headers, True) of an all-binary response; (b"", {}, False) when an
    output goes as JSON data."""
    if not all(binary for *_, binary in layout):
        return b"", {}, False
    entries = [{"name": name, "datatype": v2_datatype(dt), "shape": list(shape),
                "parameters": {"binary_data_size": math.prod(shape) * dt.itemsize}}
               for name, dt, shape, _ in layout]
    head = _response_json(model_name, model_version, rid, entries)
    return head, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}, True


def _response_json(model_name: str, model_version: str, rid: str | None,
                   entries: list[dict[str, Any]]) -> bytes:
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version,
                           "outputs": entries}
    if rid is not None:
        doc["id"] = rid
    return json.dumps(doc, separators=(",", ":")).encode()


def _encode_mixed(model_name: str, model_version: str, rid: str | None,
                  layout: list[tuple[str, np.dtype, tuple[int, ...], bool]],
                  arrays: list[np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """A response with at least one output as JSON ``data`` (built every time)."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for (name, dt, shape, binary), arr in zip(layout, arrays, strict=True):
        entry: dict[str, Any] = {"name": name, "datatype": v2_datatype(dt),
                                 "shape": list(shape)}
        if binary:
            data = np.ascontiguousarray(arr, dtype=dt.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            check_json_safe(name, arr)
            entry["data"] = arr.ravel().tolist()
        entries.append(entry)
    head = _response_json(model_name, model_version, rid, entries)
    if not chunks:
        return head, {"content-type": "application/json"}
    return b"".join([head, *chunks]), {
        "content-type": "application/octet-stream",
        HEADER_LENGTH: str(len(head)),
    }


#: JSON headers of all-binary responses by layout (model, version, outputs' names, dtypes,
#: shapes).
_HEADS = _Bounded()


def error_body(message: str) -> dict[str, str]:
    """The V2 error object."""
    return {"error": message}
