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
            headers: dict[str, str] = {}
            for k, v in self.headers.items():  # a repeated header shows as "first, second"
                headers[k.lower()] = f"{headers[k.lower()]}, {v}" if k.lower() in headers else v
            seen.append((self.path, headers, body))
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


TOKEN = "fleet-node-token"


def test_a_node_with_a_token_answers_only_requests_that_carry_it(broker, tmp_path, keys, bundles):
    node = start_node(broker, tmp_path, keys, bundles["v1"], "node-t", token=TOKEN)
    try:
        infer = f"{node.url}/v2/models/{NAME}/infer"
        for path in ("/v2/health/live", "/v2/health/ready"):  # open, as under edgeslim serve
            assert httpx.get(node.url + path).status_code == 200
        assert httpx.post(infer, json=infer_body(1)).status_code == 401
        assert httpx.post(infer, json=infer_body(1),
                          headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{node.url}/v2/models/{NAME}").status_code == 401
        r = httpx.post(infer, json=infer_body(1), headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200, r.text
    finally:
        node.stop()


def test_token_protected_nodes_offload_to_each_other_with_the_node_token(
    broker, tmp_path, keys, bundles
):
    """Two nodes sharing the fleet's token: the busy one offloads to the other, which accepts
    it (the busy node authenticates with the node token it holds)."""
    a = start_node(broker, tmp_path, keys, bundles["v1"], "node-a", token=TOKEN,
                   offload_threshold=1)  # fmt: skip
    b = start_node(broker, tmp_path, keys, bundles["v1"], "node-b", token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        wait_until(lambda: a.peers.pick(a.model.sha256) is not None, 10, what="a to learn of b")
        with one_request_held(a.url, a.middleware, auth):
            r = httpx.post(f"{a.url}/v2/models/{NAME}/infer", json=infer_body(1),
                           headers={**auth, "Cookie": "session=abc"})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.headers.get("x-edgeslim-served-by") == "node-b"
        assert b.middleware.window.total_requests == 1
    finally:
        a.stop()
        b.stop()


def test_a_busy_node_with_a_token_sends_its_own_and_never_offloads_a_refused_request(
    broker, tmp_path, keys, bundles
):
    """What the peer gets is the node's Authorization (one header, the fleet token) and no
    Cookie; a request without the right token is refused here (401), never offloaded, so a
    client without the token cannot be served by a peer on the node's credential."""
    node = start_node(broker, tmp_path, keys, bundles["v1"], "node-t", token=TOKEN,
                      offload_threshold=1)  # fmt: skip
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with fake_peer() as (peer_url, seen), mqtt_as(broker, "node", "peer") as peer:
            advertise(peer, "peer", node.model, peer_url)
            wait_until(lambda: node.peers.pick(node.model.sha256) is not None, 10,
                       what="the node to learn of the peer")  # fmt: skip
            with one_request_held(node.url, node.middleware, auth):
                url = f"{node.url}/v2/models/{NAME}/infer"
                for bad in ({}, {"Authorization": "Bearer client-guess"}):
                    r = httpx.post(url, json=infer_body(1), headers=bad)
                    assert r.status_code == 401 and not seen, r.text
                r = httpx.post(url, json=infer_body(1), headers={**auth, "Cookie": "s=1"})
            assert r.headers.get("x-edgeslim-served-by") == "peer", r.text
            assert len(seen) == 1
            headers = seen[0][1]
            assert headers["authorization"] == f"Bearer {TOKEN}"
            assert "cookie" not in headers
            peer.publish(topic("status", "peer"), b"", qos=1, retain=True).wait_for_publish(5)
    finally:
        node.stop()


def test_fleet_node_takes_its_token_from_the_flag_or_the_environment(
    broker, tmp_path, keys, monkeypatch, capsys
):
    """``fleet node`` reads ``--token`` / ``EDGESLIM_TOKEN`` as ``edgeslim serve`` does: the
    V2 API then needs it, the health checks stay open, and an empty token is refused."""
    import os
    import signal
    import subprocess
    import sys

    from edgeslim.cli import main
    from edgeslim.fleet.broker import free_port

    args = ["--id", "n-cli", "--controller", "http://127.0.0.1:9", "--public-key",
            str(keys[1]), "--no-measure"]  # fmt: skip
    monkeypatch.setenv("EDGESLIM_TOKEN", "")
    # (a broker URL that is refused too, so that a node that ignored the token never starts)
    assert main(["fleet", "node", "--broker", "http://127.0.0.1:1", *args, "--data",
                 str(tmp_path / "empty")]) == 2  # fmt: skip
    assert "EDGESLIM_TOKEN" in capsys.readouterr().err and not (tmp_path / "empty").exists()
    args = ["fleet", "node", "--broker", broker.url("node"), *args]

    port = free_port()
    env = {**os.environ, "EDGESLIM_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "edgeslim.cli", *args, "--port", str(port),
                             "--data", str(tmp_path / "n")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        def live() -> bool:
            try:
                return httpx.get(f"{url}/v2/health/live").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(live, 60, 0.2, "the node's V2 server")
        assert httpx.get(f"{url}/v2").status_code == 401
        assert httpx.get(f"{url}/v2", headers={"Authorization": f"Bearer {TOKEN}"}).status_code \
            == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_a_node_with_a_token_never_opens_the_repository_endpoints(keys, bundles):
    """The fleet's node token is shared by every client and peer: holding it must not let
    anyone load another bundle from the node's disk (a downgrade behind the controller's
    back) or unload its model; only the controller changes what a node serves."""
    from edgeslim.bundle import load_public_key
    from edgeslim.fleet.serving import Serving

    serving = Serving(host="127.0.0.1", port=0, public_key=load_public_key(keys[1]),
                      token=TOKEN).start()  # fmt: skip
    try:
        serving.swap(bundles["v2"], sha_of(bundles["v2"]))
        with httpx.Client(base_url=serving.url,
                          headers={"Authorization": f"Bearer {TOKEN}"}) as c:  # fmt: skip
            r = c.post(f"/v2/repository/models/{NAME}/load",
                       json={"parameters": {"bundle": str(bundles["v1"])}})
            assert r.status_code == 403 and "controller" in r.json()["error"], r.text
            assert c.post(f"/v2/repository/models/{NAME}/unload").status_code == 403
            assert c.get(f"/v2/models/{NAME}").json()["versions"] == ["2"]
            assert c.post(f"/v2/models/{NAME}/infer", json=infer_body(1)).status_code == 200
    finally:
        serving.stop()
