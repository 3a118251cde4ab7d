"""A node's convergence and outbox in isolation: no broker, the real worker, store and outbox."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading

from edgeslim.bundle import generate_keypair
from edgeslim.fleet.demo import wait_until
from edgeslim.fleet.node import Node, NodeConfig, NodeState
from edgeslim.fleet.outbox import Outbox
from edgeslim.fleet.protocol import Desired, ModelRef, encode, topic


class _Serving:
    """Stands in for the node's V2 server: ``swap`` switches to whatever bundle it is given."""

    model = None

    def swap(self, path, bundle_sha):
        self.model = ModelRef(name="m", version="1", sha256="0" * 64, bundle=bundle_sha)
        return self.model


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_a_redelivered_desired_state_during_a_download_retry_is_still_installed(tmp_path):
    """After every reconnect the broker redelivers the retained desired state: a new object
    equal to the one being downloaded. The retry must go on and install it, not give up."""
    _, pub = generate_keypair(tmp_path / "keys")
    port = _free_port()
    data = b"bundle-bytes" * 100
    sha = hashlib.sha256(data).hexdigest()
    cfg = NodeConfig(node_id="n1", broker="mqtt://u:p@127.0.0.1:1", data_dir=tmp_path / "node",
                     controller=f"http://127.0.0.1:{port}", public_key=pub,
                     backoff_initial=0.5, backoff_cap=0.5, download_attempts=8,
                     measure_reference=False)
    node = Node(cfg)
    node.outbox = Outbox(tmp_path / "outbox.db")
    node.serving = _Serving()
    threading.Thread(target=node._worker, daemon=True).start()
    payload = encode(Desired(deployment=1, sha256=sha, name="m", size=len(data)))
    server = None
    try:
        node._on_message(topic("desired", "n1"), payload)
        wait_until(lambda: node.state is NodeState.DOWNLOADING, 5, 0.02, "the download")
        # the first attempt finds nothing listening; the link reconnects meanwhile
        node._on_message(topic("desired", "n1"), payload)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()

        def reports():
            return [r.body for r in node.outbox.pending(100) if r.kind == "report"]

        wait_until(reports, 15, 0.1, "the node's report")
        assert [r["outcome"] for r in reports()] == ["installed"]
        assert node.model is not None and node.model.bundle == sha
        assert node.state is NodeState.SERVING and node.store.has(sha)
    finally:
        node._stop.set()
        node._work.set()
        if server is not None:
            server.shutdown()
