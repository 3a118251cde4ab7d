"""The V2 codec against the stock client's own encoder and decoder (tritonclient.http)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeslim.edge.v2 import (
    PLANS,
    PlanCache,
    V2Error,
    _plan_of,
    encode_infer_response,
    parse_header_length,
    parse_infer_request,
    v2_shape,
)

th = pytest.importorskip("tritonclient.http")
from tritonclient.http._utils import _get_inference_request  # noqa: E402

DTYPES = ["FP32", "FP64", "FP16", "INT64", "INT32", "INT8", "UINT8", "UINT16", "BOOL"]


def _client_body(arrays, binary: bool, outputs=None):
    inputs = []
    for name, (dt, arr) in arrays.items():
        inp = th.InferInput(name, list(arr.shape), dt)
        inp.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(inp)
    return _get_inference_request(inputs, "req-7", outputs, 0, False, False, 0, None, None)


def _sample(dt: str, shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    np_dt = th.triton_to_np_dtype(dt)
    if dt == "BOOL":
        return rng.random(shape) > 0.5
    if np.dtype(np_dt).kind in "iu":
        return rng.integers(0, 100, size=shape).astype(np_dt)
    return rng.normal(size=shape).astype(np_dt)


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("dt", DTYPES)
def test_parse_matches_tritonclient_encoding(dt, binary):
    a = _sample(dt, (2, 3, 4))
    b = _sample("FP32", (5,), seed=1)
    body, json_size = _client_body({"a": (dt, a), "b": ("FP32", b)}, binary)
    req = parse_infer_request(body, json_size)
    assert req.id == "req-7" and [t.name for t in req.inputs] == ["a", "b"]
    got = req.inputs[0].array
    assert got.dtype == a.dtype and got.shape == a.shape
    np.testing.assert_array_equal(got, a)
    np.testing.assert_array_equal(req.inputs[1].array, b)
    assert req.binary_output is True  # tritonclient asks for binary outputs by default


@pytest.mark.parametrize("binary", [False, True])
def test_encoded_response_decodes_bit_identically_in_tritonclient(binary):
    out = np.random.default_rng(3).normal(size=(3, 10)).astype(np.float32)
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    req_outputs = [th.InferRequestedOutput("logits", binary_data=binary),
                   th.InferRequestedOutput("ids", binary_data=not binary)]
    body, size = _client_body({"x": ("FP32", out)}, True, req_outputs)
    req = parse_infer_request(body, size)
    content, headers = encode_infer_response("m", "3", req, {"logits": out, "ids": ids})
    hl = headers.get("Inference-Header-Content-Length")
    result = th.InferResult.from_response_body(content, header_length=int(hl) if hl else None)
    got = result.as_numpy("logits")
    assert got.tobytes() == out.tobytes()
    np.testing.assert_array_equal(result.as_numpy("ids"), ids)
    resp = result.get_response()
    assert resp["model_name"] == "m" and resp["model_version"] == "3" and resp["id"] == "req-7"


def _json_body(inputs, **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


GOOD = {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}


@pytest.mark.parametrize(
    ("body", "header", "pattern"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[]", None, "must be a JSON object; got an array"),
        (b"null", None, "must be a JSON object; got null"),
        (_json_body([]), None, "non-empty list"),
        (_json_body([{**GOOD, "datatype": "FP31"}]), None, "datatype. must be one of"),
        (_json_body([{**GOOD, "datatype": "BYTES"}]), None, "not supported"),
        (_json_body([{**GOOD, "datatype": [1]}]), None, "datatype. must be a string.*an array"),
        (_json_body([{**GOOD, "datatype": {"a": 1}}]), None, "must be a string.*an object"),
        (_json_body([{**GOOD, "shape": [2, -2]}]), None, "shape. must be a list"),
        (_json_body([{**GOOD, "data": [1, 2, 3]}]), None, "has 3 values .* needs 4"),
        (_json_body([{**GOOD, "data": [1, 2, "a", 4]}]), None, 'holds "a"; send numbers'),
        (_json_body([{**GOOD, "data": [1, 2, None, 4]}]), None, "holds null"),
        (_json_body([{**GOOD, "datatype": "INT8", "data": [1, 2, 3, 400]}]), None,
         "out of the range of INT8"),
        (_json_body([{**GOOD, "datatype": "INT64", "data": [1, 2, 3.5, 4]}]), None,
         "send integers"),
        (_json_body([GOOD, GOOD]), None, "repeat a name"),
        (_json_body([{k: v for k, v in GOOD.items() if k != "data"}]), None,
         "neither 'data' nor binary_data_size"),
        (_json_body([{**GOOD, "shape": [1 << 20, 1 << 20]}]), None, "elements; at most"),
    ],
)
def test_malformed_requests_raise_v2_error_naming_the_problem(body, header, pattern):
    with pytest.raises(V2Error, match=pattern) as info:
        parse_infer_request(body, header, max_elements=1 << 24)
    assert 400 <= info.value.status < 500


def test_binary_size_mismatches_are_refused():
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2],
                                   "parameters": {"binary_data_size": 8}}]}).encode()
    ok = parse_infer_request(head + np.float32([1, 2]).tobytes(), len(head))
    np.testing.assert_array_equal(ok.inputs[0].array, [1, 2])
    with pytest.raises(V2Error, match="only 4 remain"):
        parse_infer_request(head + b"\0" * 4, len(head))
    with pytest.raises(V2Error, match="no input claims"):
        parse_infer_request(head + b"\0" * 12, len(head))
    bad = head.replace(b'"binary_data_size": 8', b'"binary_data_size": 4')
    with pytest.raises(V2Error, match="takes 8 bytes"):
        parse_infer_request(bad + b"\0" * 4, len(bad))
    with pytest.raises(V2Error, match="is 999 but the body has"):
        parse_header_length("999", 10)
    with pytest.raises(V2Error, match="must be an integer"):
        parse_header_length("ten", 10)


def test_v2_shape_marks_symbolic_dims():
    assert v2_shape(["batch", 3, None, 224]) == [-1, 3, -1, 224]


def _binary_head(shape, **params) -> bytes:
    n = int(np.prod(shape)) * 4
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(shape),
                                   "parameters": {"binary_data_size": n}}],
                       "parameters": params}).encode()


def test_a_repeated_header_reuses_its_layout_and_reads_each_body():
    head = _binary_head([2, 3], binary_data_output=True, tag="t")
    a, b = np.arange(6, dtype=np.float32), -np.arange(6, dtype=np.float32)
    first = parse_infer_request(head + a.tobytes(), len(head))
    hits = PLANS.hits
    second = parse_infer_request(bytearray(head + b.tobytes()), len(head))
    assert PLANS.hits == hits + 1  # the second request took the kept layout
    np.testing.assert_array_equal(first.inputs[0].array, a.reshape(2, 3))
    np.testing.assert_array_equal(second.inputs[0].array, b.reshape(2, 3))
    assert second.inputs[0].shape == [2, 3] and second.binary_output is True
    # each request gets its own containers: changing one does not reach the next
    second.parameters["tag"] = "changed"
    second.inputs[0].shape.append(9)
    third = parse_infer_request(head + a.tobytes(), len(head))
    assert third.parameters == {"binary_data_output": True, "tag": "t"}
    assert third.inputs[0].shape == [2, 3]


def test_a_kept_layout_never_skips_a_check():
    head = _binary_head([4, 4])
    body = head + np.zeros(16, np.float32).tobytes()
    parse_infer_request(body, len(head), max_elements=1 << 20)  # kept for this limit
    with pytest.raises(V2Error, match="elements; at most 8") as info:
        parse_infer_request(body, len(head), max_elements=8)
    assert info.value.status == 413
    with pytest.raises(V2Error, match="only 60 remain"):
        parse_infer_request(body[:-4], len(head), max_elements=1 << 20)


def test_the_layout_cache_keeps_at_most_its_size():
    cache = PlanCache(size=2)
    heads = [_binary_head([k]) for k in (1, 2, 3)]
    for k, head in enumerate(heads, 1):
        req = parse_infer_request(head + np.zeros(k, np.float32).tobytes(), len(head))
        cache.put(head, 1, _plan_of(req, 4 * k))
    assert cache.get(heads[0], 1) is None  # the oldest went first
    assert cache.get(heads[2], 1) is not None and cache.get(heads[2], 2) is None
    assert cache.get(b"x" * (PlanCache.MAX_HEADER + 1), 1) is None


def test_responses_of_one_layout_carry_their_own_values_and_id():
    head = _binary_head([1, 3], binary_data_output=True)
    req = parse_infer_request(head + np.zeros(3, np.float32).tobytes(), len(head))
    contents = []
    for k in range(2):
        out = np.full((1, 3), k + 0.5, np.float32)
        content, headers = encode_infer_response("m", "1", req, {"y": out})
        result = th.InferResult.from_response_body(
            content, header_length=int(headers["Inference-Header-Content-Length"]))
        np.testing.assert_array_equal(result.as_numpy("y"), out)
        headers["content-type"] = "changed"  # the caller may change its copy
        contents.append(content)
    assert contents[0] != contents[1]
    _, headers = encode_infer_response("m", "1", req, {"y": np.zeros((1, 3), np.float32)})
    assert headers["content-type"] == "application/octet-stream"
    wide, _ = encode_infer_response("m", "1", req, {"y": np.zeros((2, 3), np.float32)})
    assert b'"shape":[2,3]' in wide and b'"binary_data_size":24' in wide
    req.id = "abc"
    content, headers = encode_infer_response("m", "1", req, {"y": np.zeros((1, 3), np.float32)})
    assert json.loads(content[:int(headers["Inference-Header-Content-Length"])])["id"] == "abc"


_layout_inputs = st.lists(
    st.tuples(st.sampled_from(DTYPES[:-1]), st.lists(st.integers(0, 4), max_size=3)),
    min_size=1, max_size=3)


@settings(max_examples=60, deadline=None)
@given(inputs=_layout_inputs, seed=st.integers(0, 2**16), cut=st.integers(-3, 3),
       out_binary=st.sampled_from([None, True, False]))
def test_a_kept_layout_decodes_like_a_fresh_request(inputs, seed, cut, out_binary):
    """Any all-binary layout: the second body with a header (taken from the kept layout) reads
    the same as decoding it from scratch, and a body of another size fails the same way."""
    from edgeslim.edge.v2 import _decode

    rng = np.random.default_rng(seed)
    tensors, blobs = [], []
    for k, (dt, shape) in enumerate(inputs):
        np_dt = np.dtype(th.triton_to_np_dtype(dt))
        arr = (rng.random(shape) > 0.5 if dt == "BOOL" else
               rng.integers(0, 100, size=shape).astype(np_dt))
        tensors.append({"name": f"t{k}", "datatype": dt, "shape": shape,
                        "parameters": {"binary_data_size": arr.nbytes}})
        blobs.append(arr.astype(np_dt).tobytes())
    doc = {"inputs": tensors, "parameters": {"binary_data_output": True}}
    if out_binary is not None:
        doc["outputs"] = [{"name": "y", "parameters": {"binary_data": out_binary}}]
    head = json.dumps(doc).encode()
    first = b"".join(blobs)
    second = bytes(rng.integers(0, 2, size=len(first), dtype=np.uint8)) if first else b""
    parse_infer_request(head + first, len(head))  # keeps the layout
    for blob in (second, second[: max(0, len(second) + cut)] + b"\0" * max(0, cut)):
        try:
            fresh = _decode(head, memoryview(blob), 1 << 26)[0]
        except V2Error as exc:
            with pytest.raises(V2Error) as info:
                parse_infer_request(head + blob, len(head))
            assert (info.value.status, info.value.message) == (exc.status, exc.message)
            continue
        got = parse_infer_request(head + blob, len(head))
        assert (got.id, got.binary_output, got.parameters, got.outputs) == (
            fresh.id, fresh.binary_output, fresh.parameters, fresh.outputs)
        assert [(t.name, t.datatype, t.shape) for t in got.inputs] == [
            (t.name, t.datatype, t.shape) for t in fresh.inputs]
        for a, b in zip(got.inputs, fresh.inputs, strict=True):
            assert a.array.dtype == b.array.dtype
            assert a.array.tobytes() == b.array.tobytes()
