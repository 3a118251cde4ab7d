"""What an overloaded node does with a peer's or the cloud tier's answer: real V2 servers on
both sides; one request is held in flight so that the next one is offloaded."""

from __future__ import annotations

import contextlib
import json
import threading

import httpx

from edgeslim.fleet.demo import wait_until
from edgeslim.fleet.offload import FleetMiddleware, Peers
from edgeslim.fleet.protocol import ModelRef, Status
from tests.fleet.conftest import sha_of
from tests.fleet.helpers import NAME, infer_body, make_bundle


@contextlib.contextmanager
def _overloaded_node(keys, bundle, *, peer_url=None, peer_version="1", cloud_url=None):
    """A node's V2 server (``Serving`` behind ``FleetMiddleware``, threshold 1) serving
    ``bundle``, knowing one peer at ``peer_url``, with one infer request held in flight."""
    from edgeslim.bundle import load_public_key
    from edgeslim.fleet.serving import Serving

    peers = Peers("node-a")
    holder: dict[str, FleetMiddleware] = {}

    def wrap(app):
        holder["mw"] = FleetMiddleware(app, node_id="node-a", peers=peers, threshold=1,
                                       model_sha=lambda: serving.model.sha256,
                                       cloud_url=cloud_url)  # fmt: skip
        return holder["mw"]

    serving = Serving(host="127.0.0.1", port=0, public_key=load_public_key(keys[1]), wrap=wrap)
    serving.start()
    release = threading.Event()
    try:
        ref = serving.swap(bundle, sha_of(bundle))
        if peer_url:
            model = ModelRef(name=NAME, version=peer_version, sha256=ref.sha256, bundle="e" * 64)
            peers.update("node-b", Status(id="node-b", state="serving", model=model,
                                          http=peer_url))  # fmt: skip

        def slow_body():  # the first request's body arrives only when released
            yield b'{"inputs": '
            release.wait(30)
            yield json.dumps(infer_body(1)["inputs"]).encode() + b"}"

        held = threading.Thread(target=lambda: httpx.post(
            f"{serving.url}/v2/models/{NAME}/infer", content=slow_body(), timeout=30))
        held.start()
        wait_until(lambda: holder["mw"].inflight == 1, 10, 0.02, "a request in flight")
        yield serving.url
        release.set()
        held.join(30)
    finally:
        release.set()
        serving.stop()


def test_a_peer_that_has_not_the_name_or_version_asked_for_is_skipped(keys, bundles, tmp_path):
    """A peer serving the same model sha256 under another version answers 404 to
    /versions/1/infer: that means it cannot serve it, so the node serves the request itself
    (it was relayed to the client as a 404). A 400 (the request is bad) is still relayed."""
    from edgeslim.edge.server import EdgeServer

    other = make_bundle(tmp_path / "v1.1.eslim", keys[0], seed=1, version="1.1")  # same model
    peer = EdgeServer([str(other)], threads=1).start()
    try:
        with _overloaded_node(keys, bundles["v1"], peer_url=peer.url, peer_version="1.1") as url:
            r = httpx.post(f"{url}/v2/models/{NAME}/versions/1/infer", json=infer_body(1))
            assert r.status_code == 200, r.text
            assert "x-edgeslim-served-by" not in r.headers  # served here
            assert len(r.json()["outputs"][0]["data"]) == 10

            bad = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3],
                               "data": [1.0, 2.0, 3.0]}]}  # fmt: skip
            r = httpx.post(f"{url}/v2/models/{NAME}/infer", json=bad)
            assert r.status_code == 400 and r.headers["x-edgeslim-served-by"] == "node-b"
    finally:
        peer.stop()


def test_a_cloud_tier_that_compresses_its_answers_is_relayed_readable(keys, bundles):
    """httpx decodes a gzip answer from the cloud tier; relaying it with the cloud's
    'content-encoding: gzip' made the client fail to decode the plain body it got."""
    from starlette.middleware.gzip import GZipMiddleware

    from edgeslim.edge.server import EdgeServer

    cloud = EdgeServer([str(bundles["v1"])], threads=1)
    cloud.app = GZipMiddleware(cloud.app, minimum_size=50)
    cloud.start()
    try:
        with _overloaded_node(keys, bundles["v1"], cloud_url=cloud.url) as url:
            r = httpx.post(f"{url}/v2/models/{NAME}/infer", json=infer_body(1))
            assert r.status_code == 200 and r.headers["x-edgeslim-served-by"] == "cloud"
            assert len(r.json()["outputs"][0]["data"]) == 10
            assert "content-encoding" not in r.headers
    finally:
        cloud.stop()
