"""Offloading across the fleet's trust boundary, with the real broker, real nodes and a fake
peer (a plain HTTP server that records what it gets): what a status message may point a
node at, and what a peer learns of the client's request."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
import types
from urllib.parse import unquote, urlsplit

import httpx
import pytest

from edgeslim.fleet.demo import wait_until
from edgeslim.fleet.node import Node
from edgeslim.fleet.protocol import ModelRef, ProtocolError, Status, encode, topic
from tests.fleet.conftest import needs_broker, node_config, sha_of
from tests.fleet.helpers import NAME, infer_body

pytestmark = [needs_broker]

FORGED = {"model_name": NAME, "model_version": "1",
          "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 10],
                       "data": [666.0] * 10}]}  # fmt: skip


@contextlib.contextmanager
def fake_peer():
    """A V2-looking server that records (path, headers, body) and answers a forged result."""
    seen: list[tuple[str, dict[str, str], bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            out = json.dumps(FORGED).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def mqtt_as(broker, user: str, client_id: str):
    """A paho client logged in as ``user`` with ``client_id`` (what an attacker holding that
    user's password can do)."""
    import paho.mqtt.client as mqtt

    parts = urlsplit(broker.url(user))
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv5)  # fmt: skip
    c.username_pw_set(unquote(parts.username), unquote(parts.password))
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        yield c
    finally:
        c.loop_stop()
        c.disconnect()


def advertise(client, peer_id: str, model: ModelRef, http: str) -> None:
    """Publish a retained, idle, serving status for ``peer_id`` claiming ``model``."""
    st = Status(id=peer_id, state="serving", health="ok", model=model, http=http, queue=0,
                ts=time.time(), heartbeat_s=3600)  # fmt: skip
    client.publish(topic("status", peer_id), encode(st), qos=1, retain=True).wait_for_publish(5)


def start_node(broker, tmp_path, keys, bundle, node_id: str, **kw) -> Node:
    """A node (no controller: its URL leads nowhere) serving ``bundle``, status published."""
    nowhere = types.SimpleNamespace(url="http://127.0.0.1:9")
    node = Node(node_config(broker, nowhere, tmp_path, keys, node_id, **kw)).start()
    node.serving.swap(bundle, sha_of(bundle))
    node.publish_status()
    return node


@contextlib.contextmanager
def one_request_held(url: str, middleware, headers: dict[str, str] | None = None):
    """One infer request in flight at ``url`` (its body held back), so that with
    ``offload_threshold=1`` the next request is offloaded."""
    release = threading.Event()

    def slow_body():
        yield b'{"inputs": '
        release.wait(30)
        yield json.dumps(infer_body(1)["inputs"]).encode() + b"}"

    held = threading.Thread(target=lambda: httpx.post(
        f"{url}/v2/models/{NAME}/infer", content=slow_body(), headers=headers, timeout=30))
    held.start()
    try:
        wait_until(lambda: middleware.inflight == 1, 10, 0.02, "a request in flight")
        yield
    finally:
        release.set()
        held.join(30)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8000/steal?x=", "http://127.0.0.1:8000/prefix", "http://u:p@host:80",
    "http://host:80/#frag", "http://host:80?q", "http://host:99999", "ftp://host:21",
    "http://host:80/\n", "http://host :80",
])
def test_a_status_http_that_is_not_a_base_url_is_refused(url):
    with pytest.raises(ProtocolError, match="base URL"):
        Status.from_dict({"id": "n1", "state": "serving", "http": url})


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8000", "https://edge-7.example:443/", "http://[::1]:8000", "http://host",
])
def test_a_status_http_base_url_is_kept(url):
    assert Status.from_dict({"id": "n1", "state": "serving", "http": url}).http == url


def test_a_peer_gets_neither_the_clients_credentials_nor_a_path_of_its_choosing(
    broker, tmp_path, keys, bundles
):
    """Holding the node MQTT login, an attacker advertised a peer with the victim's model at
    ``http://HOST:PORT/steal?x=``; the victim offloaded there (the V2 path landed in the
    query) with the client's Authorization and Cookie. Now such a status is refused, and a
    peer at a base URL gets the V2 path and the request, never the client's credentials."""
    node = start_node(broker, tmp_path, keys, bundles["v1"], "victim", offload_threshold=1)
    try:
        with (
            fake_peer() as (peer_url, seen),
            mqtt_as(broker, "node", "evil") as evil,
            mqtt_as(broker, "node", "evil2") as evil2,
        ):
            advertise(evil, "evil", node.model, f"{peer_url}/steal?x=")
            advertise(evil2, "evil2", node.model, peer_url)  # reaches the victim after it
            wait_until(lambda: {p.id for p in node.peers.all()} >= {"evil2"}, 10,
                       what="the victim to learn of evil2")  # fmt: skip
            assert "evil" not in {p.id for p in node.peers.all()}

            with one_request_held(node.url, node.middleware):
                r = httpx.post(f"{node.url}/v2/models/{NAME}/infer", json=infer_body(1),
                               headers={"Authorization": "Bearer client-secret",
                                        "Cookie": "session=abc", "X-Api-Key": "k",
                                        "X-Request-Id": "req-1"})  # fmt: skip
            assert r.headers.get("x-edgeslim-served-by") == "evil2", r.text
            assert len(seen) == 1
            path, headers, body = seen[0]
            assert path == f"/v2/models/{NAME}/infer"
            assert json.loads(body) == infer_body(1)
            for secret in ("authorization", "cookie", "x-api-key"):
                assert secret not in headers, headers
            assert headers["x-request-id"] == "req-1"
            assert headers["x-edgeslim-offloaded"] == "victim"
            for peer, client in (("evil", evil), ("evil2", evil2)):  # clear what is retained
                client.publish(topic("status", peer), b"", qos=1,
                               retain=True).wait_for_publish(5)  # fmt: skip
    finally:
        node.stop()
