"""Hypothesis throws malformed bodies, headers and paths at a real server: never a 5xx."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.edge.conftest import TOKEN

DATATYPES = ["FP32", "FP64", "FP16", "INT64", "INT32", "INT8", "UINT8", "BOOL", "BYTES", "BF16",
             "fp32", "", 7, None]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4))
data = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6), max_leaves=40)
shape = st.one_of(st.just([1, 64]), st.just([2, 64]), st.lists(st.integers(-2, 70), max_size=4),
                  st.just([1 << 40, 1 << 40]), scalars)
data = st.one_of(
    st.lists(st.floats(-1e3, 1e3, width=32), min_size=64, max_size=64),
    st.lists(st.integers(-3, 20), min_size=1, max_size=130),
    data,
)
tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["input", "input", "input_ids", "attention_mask", "pixels", "x",
                                 "", 3]),
        "datatype": st.sampled_from(["FP32", "FP32", "INT64", *DATATYPES]),
        "shape": shape,
    },
    optional={
        "data": data,
        "parameters": st.one_of(scalars, st.fixed_dictionaries(
            {}, optional={"binary_data_size": st.one_of(st.integers(-5, 600), scalars),
                          "binary_data": scalars})),
    },
)
document = st.fixed_dictionaries(
    {"inputs": st.one_of(st.lists(tensor, min_size=1, max_size=3), scalars)},
    optional={
        "id": scalars,
        "outputs": st.one_of(st.lists(st.fixed_dictionaries(
            {"name": st.sampled_from(["logits", "nope", "", 1])},
            optional={"parameters": st.fixed_dictionaries(
                {}, optional={"binary_data": scalars, "classification": scalars})}),
            max_size=2), scalars),
        "parameters": st.one_of(scalars, st.fixed_dictionaries(
            {}, optional={"binary_data_output": scalars})),
    },
)


@st.composite
def requests(draw):
    model = draw(st.sampled_from(["linear", "linear", "linear1", "text", "image", "sensor",
                                  "nope", "%00"]))
    endpoint = draw(st.sampled_from(["infer", "infer", "infer", "raw", "raw", "ready",
                                     "versions/1/infer", "versions/x/infer"]))
    method = "GET" if endpoint == "ready" else draw(st.sampled_from(["POST"] * 9 + ["PUT"]))
    head = json.dumps(draw(document)).encode()
    kind = draw(st.sampled_from(["json", "json", "binary", "bytes"]))
    headers = {}
    if kind == "bytes":
        body = draw(st.binary(max_size=300))
    elif kind == "binary":
        tail = draw(st.binary(max_size=600))
        body = head + tail
        headers["Inference-Header-Content-Length"] = draw(st.one_of(
            st.just(str(len(head))), st.integers(-3, len(body) + 5).map(str),
            st.text(max_size=5)))
    else:
        body = head
    if draw(st.booleans()):
        headers["Content-Type"] = draw(st.sampled_from(
            ["application/json", "text/plain", "image/png", "application/octet-stream", ""]))
    if draw(st.integers(0, 19)) == 0:
        headers["Content-Encoding"] = draw(st.sampled_from(["gzip", "deflate", "br", ""]))
    return method, f"/v2/models/{model}/{endpoint}".rstrip("/"), body, headers


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(req=requests())
def test_fuzzed_requests_never_get_a_5xx(client, req):
    method, path, body, headers = req
    # Values an HTTP client cannot send (control characters, surrounding blanks) are dropped.
    headers = {k: v.encode() for k, v in headers.items() if v.isprintable() and v == v.strip()}
    r = client.request(method, path, content=body, headers=headers)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert isinstance(r.json()["error"], str)


def test_server_still_answers_after_the_fuzzing(client):
    assert client.get("/v2/health/live").status_code == 200
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                        "data": [0.0] * 64}]}
    assert client.post("/v2/models/linear/infer", json=body).status_code == 200
    assert "edgeslim_requests_total" in client.get(
        "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
