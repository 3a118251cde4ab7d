"""Hot swap under concurrent load: zero failed requests, failed loads keep the old model."""

from __future__ import annotations

import threading
import time
import weakref

import numpy as np
import pytest

from edgeslim.bundle import generate_keypair, read_bundle
from tests.edge._bundles import linear_bundle

TOKEN = "swap-token"
X = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    d = tmp_path_factory.mktemp("swap")
    key, pub = generate_keypair(d / "keys")
    paths = {
        "v1": linear_bundle(d / "v1.eslim", seed=0, version="1", sign_key=key),
        "v2": linear_bundle(d / "v2.eslim", seed=1, version="2", sign_key=key),
        "unsigned": linear_bundle(d / "unsigned.eslim", seed=2, version="3"),
        "other": linear_bundle(d / "other.eslim", name="other", sign_key=key),
    }
    corrupt = d / "corrupt.eslim"
    corrupt.write_bytes(paths["v2"].read_bytes()[:-300])
    paths["corrupt"] = corrupt
    paths["missing"] = d / "missing.eslim"
    return paths, pub


def _expected(path):
    import onnxruntime as ort

    sess = ort.InferenceSession(read_bundle(path).model_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": X})[0]


def test_zero_failed_requests_during_repeated_swaps(signed):
    import httpx

    from edgeslim.edge.server import EdgeServer

    paths, pub = signed
    expected = {"1": _expected(paths["v1"]), "2": _expected(paths["v2"])}
    assert not np.allclose(expected["1"], expected["2"])
    server = EdgeServer([paths["v1"]], token=TOKEN, public_key=pub, threads=1).start()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                        "data": X.ravel().tolist()}]}
    stop = threading.Event()
    failures: list[str] = []
    seen: dict[str, int] = {"1": 0, "2": 0}
    lock = threading.Lock()

    def client_loop():
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as c:
            for _ in range(3000):  # bounded; normally ended by `stop`
                if stop.is_set():
                    return
                r = c.post("/v2/models/linear/infer", json=body)
                with lock:
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                        continue
                    doc = r.json()
                    version = doc["model_version"]
                    got = np.array(doc["outputs"][0]["data"], np.float32).reshape(1, 10)
                    if not np.allclose(got, expected[version], rtol=1e-5, atol=1e-6):
                        failures.append(f"version {version} answered with the wrong model")
                    seen[version] += 1

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as admin:
            bad = {"unsigned": 403, "corrupt": 422, "missing": 422, "other": 400}
            for i in range(10):
                target = "v2" if i % 2 == 0 else "v1"
                if i % 3 == 0:  # the Python method the node agent calls
                    info = server.swap(paths[target], name="linear")
                else:
                    r = admin.post("/v2/repository/models/linear/load",
                                   json={"parameters": {"bundle": str(paths[target])}})
                    assert r.status_code == 200, r.text
                    info = r.json()["loaded"]
                assert info["version"] == target[1:]
                with lock:
                    before = seen[target[1:]]
                deadline = time.monotonic() + 10
                while seen[target[1:]] < before + 5 and time.monotonic() < deadline:
                    time.sleep(0.01)  # let the new version answer a few requests
                kind = list(bad)[i % len(bad)]
                r = admin.post("/v2/repository/models/linear/load",
                               json={"parameters": {"bundle": str(paths[kind])}})
                assert r.status_code == bad[kind], (kind, r.text)
                assert admin.get("/v2/models/linear").json()["versions"] == [target[1:]]
            time.sleep(0.15)
            metrics = admin.get("/metrics").text
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        server.stop()
    assert failures == []
    assert seen["1"] >= 25 and seen["2"] >= 25, seen  # each of the 10 swaps was answered
    assert 'edgeslim_model_loads_total{model="linear",result="ok"} 11.0' in metrics
    assert 'edgeslim_model_info{model="linear"' in metrics and 'version="1"}' in metrics
    assert 'version="2"}' not in metrics  # the old version's info series is gone


def test_failed_swap_from_python_raises_and_keeps_serving(signed):
    from edgeslim.edge.server import EdgeServer
    from edgeslim.errors import BundleError, SignatureError

    paths, pub = signed
    with EdgeServer([paths["v1"]], public_key=pub, threads=1) as server:
        import httpx

        r = httpx.post(server.url + "/v2/repository/models/linear/load",
                       json={"parameters": {"bundle": str(paths["v2"])}})
        assert r.status_code == 403 and "start the server with a token" in r.json()["error"]
        with pytest.raises(SignatureError):
            server.swap(paths["unsigned"])
        with pytest.raises(BundleError):
            server.swap(paths["corrupt"])
        assert [m["version"] for m in server.models()] == ["1"]
        assert server.swap(paths["other"])["name"] == "other"  # a second model beside it
        assert sorted(m["name"] for m in server.models()) == ["linear", "other"]
        assert server.unload("other") and not server.unload("other")
        old = weakref.ref(server.store.get("linear"))
        assert server.swap(paths["v2"])["version"] == "2"
        assert old() is None  # the old session is freed at once, not at the next GC cycle


def test_admin_false_keeps_load_and_unload_off_with_a_token(signed):
    import httpx

    from edgeslim.edge.server import EdgeServer
    from edgeslim.errors import ConfigError

    paths, pub = signed
    with pytest.raises(ConfigError, match="'admin' parameter of EdgeServer"):
        EdgeServer(admin="yes")
    auth = {"Authorization": "Bearer s3cret"}
    with EdgeServer([paths["v1"]], public_key=pub, threads=1, token="s3cret",
                    admin=False) as server:  # fmt: skip
        with httpx.Client(base_url=server.url, headers=auth) as c:
            r = c.post("/v2/repository/models/linear/load",
                       json={"parameters": {"bundle": str(paths["v2"])}})
            assert r.status_code == 403 and "off on this server" in r.json()["error"]
            assert c.post("/v2/repository/models/linear/unload").status_code == 403
            assert c.get("/v2/models/linear").json()["versions"] == ["1"]
        assert server.swap(paths["v2"])["version"] == "2"  # the owner's Python call still works


def _slow_bundle(path, n=2048, matmuls=4):
    """A model whose warm-up takes about a second: ``x @ x @ x ...`` on an (n, n) input."""
    from onnx import TensorProto, helper

    from edgeslim.bundle import write_bundle
    from tests.edge._bundles import _model

    nodes = [helper.make_node("MatMul", ["x", "x"], ["y0"])]
    nodes += [helper.make_node("MatMul", [f"y{i - 1}", "x"], [f"y{i}"])
              for i in range(1, matmuls)]
    nodes.append(helper.make_node("ReduceSum", [f"y{matmuls - 1}"], ["out"], keepdims=0))
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                   [helper.make_tensor_value_info("out", TensorProto.FLOAT, [])], [])
    return write_bundle(path, model_onnx=model, manifest={
        "name": "slow", "version": "1",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [n, n]}],
        "outputs": [{"name": "out", "dtype": "float32", "shape": []}]})


def test_an_unload_during_a_load_answers_at_once_and_the_server_keeps_serving(signed,
                                                                              tmp_path):
    import httpx

    from edgeslim.edge.server import EdgeServer

    paths, _ = signed
    slow = _slow_bundle(tmp_path / "slow.eslim")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with EdgeServer([paths["v1"], paths["other"]], token=TOKEN, threads=1) as server:
        loaded: dict[str, int] = {}

        def load():
            r = httpx.post(server.url + "/v2/repository/models/slow/load", headers=headers,
                           json={"parameters": {"bundle": str(slow)}}, timeout=120)
            loaded["status"] = r.status_code

        loader = threading.Thread(target=load)
        loader.start()
        deadline = time.monotonic() + 30
        while not server.store._load_lock.locked():  # the load (read, warm-up) is under way
            assert time.monotonic() < deadline and loader.is_alive()
            time.sleep(0.001)
        with httpx.Client(base_url=server.url, headers=headers, timeout=120) as c:
            r = c.post("/v2/repository/models/other/unload")
            assert r.status_code == 200 and r.json() == {"unloaded": "other"}
            assert c.get("/v2/health/live").status_code == 200
            assert c.get("/v2/models/linear/ready").status_code == 200
            # all of that was answered while the load was still running
            assert "slow" not in server.store.names()
            loader.join(120)
            assert loaded == {"status": 200}
            assert server.store.names() == ["linear", "slow"]
            assert c.get("/v2/models/other/ready").status_code == 404

            # an unload of the very model being loaded wins over that load: it used to be
            # served again once the load ended
            loaded.clear()
            loader = threading.Thread(target=load)
            loader.start()
            while not server.store._load_lock.locked():
                assert time.monotonic() < deadline + 60 and loader.is_alive()
                time.sleep(0.001)
            assert c.post("/v2/repository/models/slow/unload").status_code == 200
            loader.join(120)
            assert loaded["status"] == 400
            assert server.store.names() == ["linear"]
            assert c.get("/v2/models/slow/ready").status_code == 404


def test_the_store_remembers_unloads_only_while_a_load_is_pending(signed):
    """Every unload left a counter behind for good (names never loaded included)."""
    from concurrent.futures import ThreadPoolExecutor

    from edgeslim.edge.model_store import ModelStore

    paths, _ = signed
    with ThreadPoolExecutor(1) as pool:
        store = ModelStore(pool, threads=1)
        store.load(paths["v1"])
        for i in range(100):
            store.unload(f"never-loaded-{i}")
        assert store._unloaded == []
        store.unload("linear")
        store.load(paths["v1"])  # unloaded before this load began: it loads
        assert store.names() == ["linear"] and store._unloaded == []
