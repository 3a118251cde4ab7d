"""The offload path keeps the edge server's limits: a busy node reads a request body only when
it has somewhere to send it, and then no more than its body limit."""

from __future__ import annotations

import asyncio
import socket

import httpx

from edgeslim.fleet.demo import wait_until
from edgeslim.fleet.offload import FleetMiddleware, Peers
from edgeslim.fleet.protocol import topic
from tests.fleet.conftest import needs_broker
from tests.fleet.helpers import NAME, infer_body
from tests.fleet.test_offload_trust import (
    advertise,
    fake_peer,
    mqtt_as,
    one_request_held,
    start_node,
)

MiB = 1 << 20


@needs_broker
def test_a_busy_node_refuses_a_body_over_its_limit_before_offloading_it(
    broker, tmp_path, keys, bundles
):
    """With a peer to offload to, a busy node read the whole body, however large, before the
    edge server's --max-body-mb check (a 400 MiB chunked body took the node from 131 to 921
    MiB). Now it stops reading at the limit and answers 413; the peer gets nothing. Paths
    that only look like the infer path (a trailing newline) are not offloaded at all."""
    node = start_node(broker, tmp_path, keys, bundles["v1"], "node-l", offload_threshold=1)
    limit = 16 * MiB  # the default --max-body-mb

    def big():  # 40 MiB, chunked (no Content-Length)
        for _ in range(40):
            yield b" " * MiB

    try:
        with fake_peer() as (peer_url, seen), mqtt_as(broker, "node", "peer") as peer:
            advertise(peer, "peer", node.model, peer_url)
            wait_until(lambda: node.peers.pick(node.model.sha256) is not None, 10,
                       what="the node to learn of the peer")  # fmt: skip
            with one_request_held(node.url, node.middleware):
                url = f"{node.url}/v2/models/{NAME}/infer"
                r = httpx.post(url, content=big(), timeout=60)
                assert r.status_code == 413, r.text
                assert str(limit) in r.json()["error"]
                # a declared length over the limit: refused before a byte of the body is read
                head = (f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\n"
                        f"Content-Length: {64 * MiB}\r\n\r\n").encode()  # fmt: skip
                with socket.create_connection(("127.0.0.1", node.serving.port), 10) as sock:
                    sock.sendall(head)
                    assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
                r = httpx.post(url + "%0A", json=infer_body(1))
                assert "x-edgeslim-served-by" not in r.headers  # (starlette's route took it)
                assert not seen
                r = httpx.post(url, json=infer_body(1))  # within the limit: offloaded
                assert r.headers.get("x-edgeslim-served-by") == "peer", r.text
            peer.publish(topic("status", "peer"), b"", qos=1, retain=True).wait_for_publish(5)
    finally:
        node.stop()


def test_a_busy_node_with_nowhere_to_offload_leaves_the_body_to_the_app():
    """Over the threshold with no peer and no cloud tier, the middleware read (and held) the
    whole body before handing it to the app, which then refused it by size; now the app alone
    reads it, as on a node that is not busy."""
    received: list[int] = []

    async def app(scope, receive, send):  # answers after the first chunk, as a 413 would
        await receive()
        await send({"type": "http.response.start", "status": 413, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = FleetMiddleware(app, node_id="n", model_sha=lambda: "a" * 64, peers=Peers("n"),
                         threshold=1)  # fmt: skip
    mw.inflight = 1  # one request already in flight: the next is over the threshold

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": b" " * MiB, "more_body": len(received) < 100}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": f"/v2/models/{NAME}/infer",
             "headers": [], "query_string": b""}  # fmt: skip
    asyncio.run(mw(scope, receive, send))
    assert len(received) == 1
    assert sent[0]["status"] == 413


@needs_broker
def test_the_nodes_body_limit_holds_for_the_server_and_the_offload_path(
    broker, tmp_path, keys, bundles
):
    node = start_node(broker, tmp_path, keys, bundles["v1"], "node-m", offload_threshold=1,
                      max_body_mb=1.0)  # fmt: skip
    try:
        assert node.serving.server.max_body_bytes == node.middleware.max_body == MiB
        r = httpx.post(f"{node.url}/v2/models/{NAME}/infer", content=b" " * (MiB + 1))
        assert r.status_code == 413
    finally:
        node.stop()


def test_requests_without_the_token_are_not_counted_in_the_telemetry_or_the_load():
    """The canary judge sums the window's errors: 401s for requests without the node token
    were counted there (and as in-flight load), so anyone reaching a canary could force a
    rollback. They now go straight to the edge app, which refuses them, and count nowhere."""
    from concurrent.futures import ThreadPoolExecutor

    from edgeslim.edge.metrics import Metrics
    from edgeslim.edge.model_store import ModelStore
    from edgeslim.edge.server import EdgeApp

    app = EdgeApp(ModelStore(ThreadPoolExecutor(1)), Metrics(), token="s3cret")
    inflight: list[int] = []

    async def spy(scope, receive, send):  # what the middleware counts while the app runs
        inflight.append(mw.inflight)
        await app(scope, receive, send)

    mw = FleetMiddleware(spy, node_id="n", model_sha=lambda: None, token="s3cret")

    async def main():
        transport = httpx.ASGITransport(app=mw)
        async with httpx.AsyncClient(transport=transport, base_url="http://n") as c:
            for headers in ({}, {"Authorization": "Bearer wrong"}) * 5:
                r = await c.post(f"/v2/models/{NAME}/infer", json=infer_body(1),
                                 headers=headers)  # fmt: skip
                assert r.status_code == 401, r.text
            r = await c.post(f"/v2/models/{NAME}/infer", json=infer_body(1),
                             headers={"Authorization": "Bearer s3cret"})  # fmt: skip
            assert r.status_code == 404, r.text  # authorised: no model loaded here

    asyncio.run(main())
    assert inflight == [0] * 10 + [1]
    window = mw.window.snapshot()
    assert window["requests"] == 1 and window["errors"] == 1, window
    app.preprocess.shutdown()


class _CountedHeaders(list):
    """An ASGI header list that counts how often it is read through."""

    reads = 0

    def __iter__(self):
        type(self).reads += 1
        return super().__iter__()


def test_a_request_that_is_not_offloaded_has_its_headers_decoded_once():
    """The middleware decoded every infer request's headers into a dict, then the edge app
    did it again; now the middleware does it only for a request it may offload."""
    from concurrent.futures import ThreadPoolExecutor

    from edgeslim.edge.metrics import Metrics
    from edgeslim.edge.model_store import ModelStore
    from edgeslim.edge.server import EdgeApp

    app = EdgeApp(ModelStore(ThreadPoolExecutor(1)), Metrics())
    mw = FleetMiddleware(app, node_id="n", model_sha=lambda: None, threshold=4)
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    headers = _CountedHeaders([(b"content-type", b"application/json")])
    scope = {"type": "http", "method": "POST", "path": f"/v2/models/{NAME}/infer",
             "headers": headers, "query_string": b""}  # fmt: skip
    asyncio.run(mw(scope, receive, send))
    assert sent[0]["status"] == 404  # no model here: the app answered
    assert _CountedHeaders.reads == 1
    app.preprocess.shutdown()
