"""Collaboration: an overloaded node offloads to a peer serving the same model sha256 (learnt
from retained status messages), else to the cloud tier; results are shared without inputs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from edgeslim.fleet.demo import wait_until
from edgeslim.fleet.node import Node
from edgeslim.fleet.rollout import RolloutParams
from tests.fleet.conftest import needs_broker, node_config
from tests.fleet.helpers import NAME, forward, infer_body, weights

pytestmark = [needs_broker, pytest.mark.slow]


def _burst(url: str, n: int) -> list[httpx.Response]:
    def one(i: int) -> httpx.Response:
        return httpx.post(f"{url}/v2/models/{NAME}/infer", json=infer_body(1, seed=i), timeout=30)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def _check_answers(responses: list[httpx.Response]) -> None:
    w = weights(7, hidden=1024)
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        x = np.asarray(infer_body(1, seed=i)["inputs"][0]["data"], np.float32).reshape(1, 64)
        got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(1, 10)
        np.testing.assert_allclose(got, forward(w, x, repeats=64), atol=1e-3)


def test_overloaded_node_offloads_to_a_peer_then_to_the_cloud(
    broker, controller, tmp_path, keys, bundles
):
    from edgeslim.edge.server import EdgeServer

    cloud = EdgeServer([str(bundles["slow"])], threads=1).start()
    a = Node(node_config(broker, controller, tmp_path, keys, "node-a", offload_threshold=1,
                         cloud_url=cloud.url, share_results=True)).start()  # fmt: skip
    b = Node(node_config(broker, controller, tmp_path, keys, "node-b")).start()
    try:
        wait_until(lambda: len(controller.online_nodes()) == 2, 20, what="2 nodes online")
        sha = httpx.post(f"{controller.url}/bundles", content=bundles["slow"].read_bytes())
        dep = controller.deploy(sha.json()["sha256"], params=RolloutParams(canary=0, soak_s=0))
        assert controller.wait_deployment(dep, 60) == "succeeded"
        model_sha = a.model.sha256
        wait_until(lambda: a.peers.pick(model_sha) is not None, 10, what="a to learn of b")

        responses = _burst(a.url, 8)
        _check_answers(responses)
        served_by = [r.headers.get("x-edgeslim-served-by") for r in responses]
        assert "node-b" in served_by and None in served_by  # some here, some at the peer
        assert a.middleware.offloaded_total == served_by.count("node-b")
        assert b.middleware.window.total_requests >= served_by.count("node-b")

        # Results were shared live and, durably, through the outbox: outputs, never inputs.
        wait_until(lambda: len(controller.registry.records(node="node-a", kind="result")) >= 1,
                   10, what="result records")  # fmt: skip
        live = [r for r in controller.results if r.get("node") == "node-a"]
        assert live and all(r["model_sha"] == model_sha for r in live)
        for body in [r["body"] for r in controller.registry.records(kind="result")] + live:
            assert "outputs" in body and "inputs" not in str(body.keys())

        b.stop()  # the peer goes away (its goodbye status says offline): the cloud tier is next
        wait_until(lambda: a.peers.pick(model_sha) is None, 10, what="a to forget b")
        responses = _burst(a.url, 8)
        _check_answers(responses)
        assert "cloud" in [r.headers.get("x-edgeslim-served-by") for r in responses]
    finally:
        a.stop()
        if b.state.value != "stopped":
            b.stop()
        cloud.stop()
