"""The edge server over real HTTP: stock tritonclient, raw endpoints, errors, auth, metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeslim.bundle import read_bundle
from tests.edge.conftest import TOKEN, png_bytes

th = pytest.importorskip("tritonclient.http")
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _ort(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(read_bundle(path).model_bytes, opts,
                                providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def triton(server):
    c = th.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_gets_outputs_bit_identical_to_onnxruntime(triton, edge_bundles, binary):
    x = np.random.default_rng(5).normal(size=(3, 64)).astype(np.float32)
    inp = th.InferInput("input", [3, 64], "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = th.InferRequestedOutput("logits", binary_data=binary)
    res = triton.infer("linear", [inp], outputs=[out], headers=AUTH, request_id="r1")
    ref = _ort(edge_bundles["linear"]).run(None, {"input": x})[0]
    got = res.as_numpy("logits")
    assert got.dtype == np.float32 and got.shape == (3, 10)
    assert got.tobytes() == ref.tobytes()
    assert res.get_response()["model_version"] == "1" and res.get_response()["id"] == "r1"
    ids = np.array([[1, 2, 0]], np.int64)
    ti = [th.InferInput("input_ids", [1, 3], "INT64"),
          th.InferInput("attention_mask", [1, 3], "INT64")]
    ti[0].set_data_from_numpy(ids, binary_data=binary)
    ti[1].set_data_from_numpy(np.array([[1, 1, 0]], np.int64), binary_data=binary)
    emb = triton.infer("text", ti, headers=AUTH).as_numpy("token_embeddings")
    ref = _ort(edge_bundles["text"]).run(None, {"input_ids": ids,
                                                "attention_mask": np.array([[1, 1, 0]])})[0]
    assert emb.tobytes() == ref.tobytes()


def test_health_and_metadata_through_tritonclient(triton, server):
    assert triton.is_server_live() and triton.is_server_ready(headers=AUTH)
    assert triton.is_model_ready("linear", headers=AUTH)
    assert not triton.is_model_ready("nope", headers=AUTH)
    meta = triton.get_model_metadata("image", headers=AUTH)
    assert meta == {
        "name": "image", "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 16, 16]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 4]}],
    }
    assert triton.get_server_metadata(headers=AUTH)["name"] == "edgeslim"
    assert server.store.get("linear").batcher.max_batch == 32
    assert server.store.get("linear1").batcher.max_batch == 1  # batch-1-only: no batching


def _infer_body(**change):
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}
    tensor.update(change)
    return {"inputs": [tensor]}


BAD = [
    ("linear", _infer_body(name="inp"), 400, "no input 'inp'"),
    ("linear", _infer_body(shape=[1, 63], data=[0.5] * 63), 400, "expects [-1, 64]"),
    ("linear", _infer_body(datatype="FP64"), 400, "expects FP32"),
    ("linear", _infer_body(data=[0.5] * 10), 400, "has 10 values"),
    ("linear1", _infer_body(shape=[2, 64], data=[0.5] * 128), 400, "expects [1, 64]"),
    ("linear", {"inputs": [_infer_body()["inputs"][0]], "outputs": [{"name": "prob"}]}, 400,
     "no output 'prob'"),
    ("linear", {"inputs": [_infer_body()["inputs"][0]],
                "outputs": [{"name": "logits"}, {"name": "logits"}]}, 400,
     "asks for output 'logits' twice"),
    ("nope", _infer_body(), 404, "unknown model 'nope'"),
    ("text", {"inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [2, 4, 3]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [1, 4], "data": [1, 1, 1, 0]},
    ]}, 400, "dim 'seq' is 3 in input 'input_ids' but 4"),
    ("text", {"inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [99, 1]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [1, 2], "data": [1, 1]},
    ]}, 400, "model 'text' failed on the inputs given"),
    ("text", {"inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [2, 4, 3]}]}, 400,
     "also needs the inputs ['attention_mask']"),
    ("linear", _infer_body(data=[1e40] * 64), 400, "out of the range of FP32"),
    ("linear", json.dumps(_infer_body(data=[float("nan")] * 64)).encode(), 400,
     "holds NaN, which is not JSON"),
    ("linear", b"{\"inputs\": [", 400, "not valid JSON"),
    ("linear", b"\xff\xfe", 400, "not valid JSON"),
]


@pytest.mark.parametrize(("model", "body", "status", "phrase"), BAD)
def test_bad_requests_get_v2_errors_naming_the_problem(client, model, body, status, phrase):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = client.post(f"/v2/models/{model}/infer", **kw)
    assert r.status_code == status, r.text
    assert phrase in r.json()["error"]
    assert client.get("/v2/health/live").status_code == 200


def test_binary_header_problems_and_oversize_bodies(client):
    head = json.dumps(_infer_body()).encode()
    r = client.post("/v2/models/linear/infer", content=head,
                    headers={"Inference-Header-Content-Length": str(len(head) + 5)})
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]
    # a repeated header: the first counts (as starlette reads it), here the right length
    r = client.post("/v2/models/linear/infer", content=head,
                    headers=[("Inference-Header-Content-Length", str(len(head))),
                             ("Inference-Header-Content-Length", str(len(head) + 5))])
    assert r.status_code == 200, r.text
    big = b"[" + b"0," * 600_000 + b"0]"  # 1.2 MB > the 1 MiB limit
    r = client.post("/v2/models/linear/infer", content=big)
    assert r.status_code == 413 and "at most 1048576" in r.json()["error"]
    r = client.post("/v2/models/linear/infer", content=iter([big[:700_000], big[700_000:]]))
    assert r.status_code == 413  # chunked, no Content-Length
    r = client.post("/v2/models/linear/infer", content=b"x", headers={"Content-Encoding": "br"})
    assert r.status_code == 415
    import gzip

    r = client.post("/v2/models/linear/infer", content=gzip.compress(b"\0" * 3_000_000),
                    headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413 and "decompresses" in r.json()["error"]
    r = client.post("/v2/models/linear/infer", content=gzip.compress(head),
                    headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200
    for body, what in ((gzip.compress(head) + b"junk", "followed by 4 more bytes"),
                       (gzip.compress(head) + gzip.compress(b"{}"), "followed by"),
                       (gzip.compress(head)[:-6], "cut short")):
        r = client.post("/v2/models/linear/infer", content=body,
                        headers={"Content-Encoding": "gzip"})
        assert r.status_code == 400 and what in r.json()["error"]



def test_requests_that_fail_before_their_run_leave_no_announcement_behind(server, client):
    """Each request is announced to its batcher when admitted (so batches wait for it); every
    way of failing before the run withdraws it, or later batches would wait the window."""
    import socket
    import time

    client.post("/v2/models/linear/infer", content=b"{\"inputs\": [")
    client.post("/v2/models/linear/infer", content=b"[" + b"0," * 600_000 + b"0]")
    client.post("/v2/models/linear/infer", json=_infer_body(shape=[1, 63], data=[0.5] * 63))
    client.post("/v2/models/sensor/raw", json=[1.0, 2.0])
    client.post("/v2/models/sensor/raw", content=b"not json")
    client.post("/v2/models/image/raw", content=b"not an image")
    with socket.create_connection(("127.0.0.1", server.port)) as s:  # gone mid-body
        s.sendall(b"POST /v2/models/linear/infer HTTP/1.1\r\nHost: x\r\nAuthorization: "
                  b"Bearer " + TOKEN.encode() + b"\r\nContent-Length: 1000\r\n\r\n{")
        time.sleep(0.1)
    deadline = time.monotonic() + 10
    names = ("linear", "sensor", "image")
    while time.monotonic() < deadline and any(
            server.store.get(n).batcher._expected for n in names):
        time.sleep(0.01)
    assert [server.store.get(n).batcher._expected for n in names] == [0, 0, 0]
    assert client.post("/v2/models/linear/infer", json=_infer_body()).status_code == 200


def test_outputs_json_cannot_carry_are_refused_by_name_and_sent_as_binary_on_request(client):
    """A model may answer NaN or infinity on finite inputs; JSON has no such numbers, so a JSON
    answer is refused (422, naming the output) and a binary one carries them as they are."""
    body = _infer_body(data=[3e38] * 64)  # finite FP32, overflows inside the model
    r = client.post("/v2/models/linear/infer", json=body)
    assert r.status_code == 422, r.text
    assert "output 'logits' holds NaN or infinity" in r.json()["error"]
    body["parameters"] = {"binary_data_output": True}
    r = client.post("/v2/models/linear/infer", json=body)
    assert r.status_code == 200
    n = int(r.headers["inference-header-content-length"])
    got = np.frombuffer(r.content[n:], np.float32)
    assert got.shape == (10,) and not np.isfinite(got).all()
    r = client.post("/v2/models/sensor/raw", json=[1e308, -1e308] * 64)  # z-score overflows
    assert r.status_code == 422 and "NaN or infinity" in r.json()["error"], r.text

def test_auth(server):
    import httpx

    with httpx.Client(base_url=server.url) as anon:
        assert anon.get("/v2/health/live").status_code == 200
        assert anon.get("/v2/health/ready").status_code == 200
        r = anon.get("/v2/models/linear")
        assert r.status_code == 401 and "bearer token" in r.json()["error"]
        assert r.headers["www-authenticate"] == "Bearer"
        bad = {"Authorization": "Bearer nope"}
        assert anon.post("/v2/models/linear/infer", json=_infer_body(),
                         headers=bad).status_code == 401
        assert anon.get("/metrics").status_code == 401
        assert anon.post("/v2/repository/models/linear/unload").status_code == 401


def test_requests_refused_for_their_token_are_counted(server, client):
    import httpx

    series = 'edgeslim_requests_total{code="401",endpoint="auth",model=""}'
    errors = 'edgeslim_request_errors_total{code="401",endpoint="auth",model=""}'
    before = client.get("/metrics").text
    with httpx.Client(base_url=server.url) as anon:
        assert anon.post("/v2/models/linear/infer", json=_infer_body()).status_code == 401
        assert anon.get("/metrics", headers={"Authorization": "Bearer nope"}
                        ).status_code == 401
        assert anon.get("/v2/health/live").status_code == 200  # open: not refused
    after = client.get("/metrics").text
    for name in (series, errors):
        was = _sample(before, name) if name + " " in before else 0.0
        assert _sample(after, name) == was + 2


def test_raw_image_applies_manifest_pre_and_postprocessing(client, edge_bundles):
    from edgeslim.edge.preprocess import Pipeline

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    img[..., 2] = 255  # blue dominates
    data = png_bytes(img)
    r = client.post("/v2/models/image/raw", content=data, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    m = read_bundle(edge_bundles["image"]).manifest
    x = Pipeline(m["preprocessing"], inputs=m["inputs"]).apply(data)["pixels"]
    logits = _ort(edge_bundles["image"]).run(None, {"pixels": x})[0]
    doc = r.json()
    np.testing.assert_allclose(doc["outputs"]["logits"], logits, rtol=1e-6)
    best = int(np.argmax(logits[0]))
    assert doc["topk"][0] == [{"index": best, "label": m["labels"][best],
                               "score": pytest.approx(float(logits[0, best]))}]
    r = client.post("/v2/models/image/raw", content=b"GIF89a not really")
    assert r.status_code == 400 and "not a JPEG or PNG image" in r.json()["error"]


def test_raw_text_gives_pooled_normalised_embeddings(client, edge_bundles):
    from tests.edge._bundles import embedding_table

    r = client.post("/v2/models/text/raw", json=["the edge node", "small model runs here now"])
    assert r.status_code == 200, r.text
    emb = np.array(r.json()["outputs"]["token_embeddings"])
    table = embedding_table()
    # [CLS]=2 the=9 edge=4 node=5 [SEP]=3 ; [CLS] small=8 model=6 runs=12 here=13 now=14 [SEP]
    for row, ids in zip(emb, [[2, 9, 4, 5, 3], [2, 8, 6, 12, 13, 14, 3]], strict=True):
        ref = table[ids].mean(axis=0)
        np.testing.assert_allclose(row, ref / np.linalg.norm(ref), rtol=1e-5, atol=1e-6)
    plain = client.post("/v2/models/text/raw", content=b"the edge node",
                        headers={"Content-Type": "text/plain"})
    np.testing.assert_allclose(plain.json()["outputs"]["token_embeddings"][0], emb[0],
                               rtol=1e-6)
    r = client.post("/v2/models/text/raw", json={"text": 1})
    assert r.status_code == 400 and "string" in r.json()["error"]


def test_mean_pool_gets_the_mask_of_a_model_that_takes_only_input_ids(tmp_path):
    import httpx

    from edgeslim.bundle import write_bundle
    from edgeslim.edge.server import EdgeServer
    from tests.edge._bundles import embed_onnx, embedding_table
    from tests.edge.conftest import _tokenizer_json

    path = write_bundle(tmp_path / "ids.eslim", model_onnx=embed_onnx(mask=False), manifest={
        "name": "ids", "task": "sentence-embedding",
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}],
        "outputs": [{"name": "token_embeddings", "dtype": "float32",
                     "shape": ["batch", "seq", 4]}],
        "preprocessing": [{"op": "text.tokenize", "max_length": 8, "padding": "longest"}],
        "postprocessing": [{"op": "mean_pool"}, {"op": "l2_normalize"}],
    }, extra_files={"tokenizer.json": _tokenizer_json()})
    with EdgeServer([path], threads=1) as server:
        r = httpx.post(server.url + "/v2/models/ids/raw", json=["the edge node", "edge"])
    assert r.status_code == 200, r.text
    table = embedding_table()
    # [CLS] the edge node [SEP] ; [CLS] edge [SEP] + two [PAD] that the mean leaves out
    for row, ids in zip(r.json()["outputs"]["token_embeddings"], [[2, 9, 4, 5, 3], [2, 4, 3]],
                        strict=True):
        ref = table[ids].mean(axis=0)
        np.testing.assert_allclose(row, ref / np.linalg.norm(ref), rtol=1e-5, atol=1e-6)


def test_an_axis_out_of_range_for_the_payload_is_a_400(tmp_path):
    import httpx

    from edgeslim.bundle import write_bundle
    from edgeslim.edge.server import EdgeServer
    from tests.edge._bundles import linear_onnx

    path = write_bundle(tmp_path / "axes.eslim", model_onnx=linear_onnx(n_in=4), manifest={
        "name": "axes",
        "inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 4]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}],
        "preprocessing": [{"op": "sensor.window", "size": 2}, {"op": "expand_dims", "axis": 3},
                          {"op": "reshape", "shape": [-1, 4]}],
    })
    with EdgeServer([path], threads=1) as server, httpx.Client(base_url=server.url) as c:
        r = c.post("/v2/models/axes/raw", json=[1.0, 2.0, 3.0, 4.0])  # (T,): windows (2, 2)
        assert r.status_code == 400
        assert r.json()["error"].startswith("expand_dims axis 3 is out of range for shape [2, 2]")
        r = c.post("/v2/models/axes/raw", json=[[1.0, 2.0], [3.0, 4.0]])  # (T, C)
        assert r.status_code == 200, r.text
        assert 'code="500"' not in c.get("/metrics").text


def test_raw_numbers_beyond_the_input_dtype_are_refused_as_on_infer(client):
    row = [0.0] * 63
    r = client.post("/v2/models/linear/infer", json=_infer_body(data=[1e39, *row]))
    assert r.status_code == 400 and "out of the range of FP32" in r.json()["error"]
    for value in (1e39, -1e300):
        r = client.post("/v2/models/linear/raw", content=json.dumps([[value, *row]]))
        assert r.status_code == 400
        assert r.json()["error"] == (f"input 'input' holds a value out of the range of "
                                     f"float32: {value}; send values that fit it")
    r = client.post("/v2/models/linear/raw", content="[[1e400" + ",0" * 63 + "]]")
    assert r.status_code == 400 and "infinite value" in r.json()["error"]
    assert client.post("/v2/models/linear/raw", json=[[3e38, *row]]).status_code == 200


def test_a_scalar_input_stays_a_scalar(tmp_path):
    import httpx
    from onnx import TensorProto, helper, numpy_helper

    import edgeslim
    from edgeslim.bundle import write_bundle
    from edgeslim.edge.server import EdgeServer
    from tests.edge._bundles import _model

    model = _model([helper.make_node("Mul", ["x", "two"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
                   [numpy_helper.from_array(np.array(2, np.float32), "two")])
    path = write_bundle(tmp_path / "scalar.eslim", model_onnx=model, manifest={
        "name": "scalar",
        "inputs": [{"name": "x", "dtype": "float32", "shape": []}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": []}],
        "probe": {"inputs": {"x": 3.0}, "outputs": {"y": 6.0}, "atol": 1e-6}})
    runner = edgeslim.load(path)
    for x in (np.float32(3), np.array(3, np.float32)):
        y = runner.run(x)["y"]
        assert y.shape == () and y == 6.0  # as onnxruntime answers, not (1,)
    assert runner.probe() == 0.0
    with EdgeServer([path], threads=1) as server, httpx.Client(base_url=server.url) as c:
        r = c.post("/v2/models/scalar/raw", content="3")
        assert r.status_code == 200, r.text
        assert r.json()["outputs"] == {"y": 6.0}
        r = c.post("/v2/models/scalar/infer", json={"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [], "data": [3]}]})
        assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == []


def test_raw_sensor_stream(client, edge_bundles):
    from edgeslim.edge.preprocess import Pipeline, PostPipeline

    t = np.arange(160, dtype=float)
    series = np.sin(t / 7).tolist()
    series[10] = None
    r = client.post("/v2/models/sensor/raw", json=series)
    assert r.status_code == 200, r.text
    m = read_bundle(edge_bundles["sensor"]).manifest
    x = Pipeline(m["preprocessing"], inputs=m["inputs"]).apply(series)
    assert x["input"].shape == (4, 64)  # windows at 0, 32, 64, 96
    ref = PostPipeline(m["postprocessing"], labels=m["labels"]).apply(
        {"logits": _ort(edge_bundles["sensor"]).run(None, x)[0]})
    np.testing.assert_allclose(r.json()["outputs"]["logits"], ref["logits"], rtol=1e-5)
    assert r.json()["topk"] == json.loads(json.dumps(ref["topk"]))
    r = client.post("/v2/models/sensor/raw", json=[1.0, 2.0])
    assert r.status_code == 400 and "at least 64 samples" in r.json()["error"]


def test_metrics_expose_requests_latency_batches_and_model_version(client, edge_bundles):
    client.post("/v2/models/linear/infer", json=_infer_body())
    text = client.get("/metrics").text
    sha = read_bundle(edge_bundles["linear"]).manifest["model"]["sha256"]
    assert f'edgeslim_model_info{{model="linear",sha256="{sha}",version="1"}} 1.0' in text
    assert 'edgeslim_requests_total{code="200",endpoint="infer",model="linear"}' in text
    assert 'edgeslim_request_errors_total{code="404",endpoint="infer",model=""}' in text
    assert 'edgeslim_request_latency_seconds_bucket{endpoint="infer",le="0.005",model="linear"}' \
        in text
    assert 'edgeslim_batch_size_count{model="linear"}' in text
    assert "edgeslim_inflight_requests 1.0" in text  # the /metrics request itself
    before = _sample(text, 'edgeslim_requests_total{code="200",endpoint="infer",model="linear"}')
    for _ in range(3):
        client.post("/v2/models/linear/infer", json=_infer_body())
    after = _sample(client.get("/metrics").text,
                    'edgeslim_requests_total{code="200",endpoint="infer",model="linear"}')
    assert after == before + 3


def _sample(text: str, series: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(series + " "))
                 .rsplit(" ", 1)[1])


def test_repository_index_and_unknown_routes(client):
    idx = client.post("/v2/repository/index").json()
    assert {e["name"] for e in idx} == {"linear", "linear1", "image", "text", "sensor"}
    r = client.get("/v2/models/linear/versions/7")
    assert r.status_code == 404 and "no version '7'" in r.json()["error"]
    assert client.get("/v2/models/linear/versions/1").status_code == 200
    r = client.get("/v3/whatever")
    assert r.status_code == 404 and r.json()["error"].startswith("no endpoint")
    assert client.get("/v2/models/linear/infer").status_code == 405
    r = client.post("/v2/repository/models/linear/load", json={"parameters": {}})
    assert r.status_code == 400 and "bundle" in r.json()["error"]
    r = client.post("/v2/repository/models/linear/load",  # a lone surrogate: no file name
                    content=b'{"parameters": {"bundle": "/tmp/\\ud800.eslim"}}')
    assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]
    r = client.post("/v2/repository/models/linear/load",
                    json={"parameters": {"bundle": "/dev/zero"}})
    assert r.status_code == 422 and "not a regular file" in r.json()["error"]
    r = client.post("/v2/models/text/raw", content=b'"bad \\ud800 text"')
    assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]


def test_raw_preprocessing_runs_at_most_one_job_per_cpu_at_once(edge_bundles, monkeypatch):
    """Preprocessing a large image takes hundreds of MB while it runs: the /raw endpoint runs
    at most ``preprocess_workers()`` of them at once, and the others wait their turn."""
    import threading
    import time

    import httpx

    from edgeslim.edge import server as server_mod

    monkeypatch.setattr(server_mod, "preprocess_workers", lambda: 2, raising=False)
    srv = server_mod.EdgeServer([edge_bundles["linear"]], threads=1).start()
    try:
        model = srv.store.get("linear")
        real = model.pipeline.apply_with_context
        lock, release = threading.Lock(), threading.Event()
        state = {"active": 0, "most": 0, "entered": 0}

        def held(payload):
            with lock:
                state["active"] += 1
                state["entered"] += 1
                state["most"] = max(state["most"], state["active"])
            try:
                release.wait(30)
                return real(payload)
            finally:
                with lock:
                    state["active"] -= 1

        monkeypatch.setattr(model.pipeline, "apply_with_context", held)
        width = read_bundle(edge_bundles["linear"]).manifest["inputs"][0]["shape"][-1]
        codes: list[int] = []

        def post():
            r = httpx.post(f"{srv.url}/v2/models/linear/raw", json=[[0.5] * width], timeout=60)
            codes.append(r.status_code)

        clients = [threading.Thread(target=post) for _ in range(6)]
        for t in clients:
            t.start()
        deadline = time.monotonic() + 20
        while state["entered"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # room for any job beyond the bound to start
        entered_while_held = state["entered"]
        release.set()
        for t in clients:
            t.join(60)
        assert entered_while_held == 2
        assert state["most"] == 2 and state["entered"] == 6
        assert codes == [200] * 6
    finally:
        release.set()
        srv.stop()


def test_raw_text_of_a_mebibyte_is_answered_as_its_first_words(client):
    """A body near the size limit is cut before it is encoded (see text.head): the answer is
    that of the text's first words, which are all max_length=8 keeps."""
    words = "small model runs here now "
    body = (words * (((1 << 20) - 100) // len(words))).encode()
    r = client.post("/v2/models/text/raw", content=body, headers={"Content-Type": "text/plain"})
    assert r.status_code == 200, r.text
    short = client.post("/v2/models/text/raw", content=(words * 3).encode(),
                        headers={"Content-Type": "text/plain"})
    assert r.json()["outputs"] == short.json()["outputs"]


def test_raw_text_with_few_tokens_a_character_is_answered_as_the_whole_text(client):
    """Each text of a batch whose first head (8 x 16 characters) holds too few words is
    encoded again with a longer head: the answer is that of its first 6 words, as if the
    whole text had been encoded."""
    padded = ("small" + " " * 100) * 2000  # 210 kB, a word every 105 characters
    r = client.post("/v2/models/text/raw", json=[padded, "small model runs here now"])
    assert r.status_code == 200, r.text
    ref = client.post("/v2/models/text/raw", json=["small " * 6, "small model runs here now"])
    assert r.json()["outputs"] == ref.json()["outputs"]
