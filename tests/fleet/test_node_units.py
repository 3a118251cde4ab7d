"""Fleet parts in isolation, without a broker: a node's convergence (the real worker, store
and outbox), its outbox, and the controller's ingest of a batch of messages."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import socket
import sqlite3
import threading
import time

import pytest

from edgeslim.bundle import generate_keypair
from edgeslim.fleet.demo import wait_until
from edgeslim.fleet.node import Node, NodeConfig, NodeState
from edgeslim.fleet.outbox import Outbox
from edgeslim.fleet.protocol import Ack, Batch, Desired, ModelRef, Record, encode, topic


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


def _serve_bytes(data: bytes) -> tuple[http.server.ThreadingHTTPServer, int]:
    """A real HTTP server answering every GET with ``data`` (the controller's bundle route)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            with contextlib.suppress(OSError):  # the node hung up
                self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def _worker_node(tmp_path, port: int, **kw) -> Node:
    """A real Node whose worker runs (real store and outbox), without a broker."""
    _, pub = generate_keypair(tmp_path / "keys")
    cfg = NodeConfig(node_id="n1", broker="mqtt://u:p@127.0.0.1:1", data_dir=tmp_path / "node",
                     controller=f"http://127.0.0.1:{port}", public_key=pub,
                     backoff_initial=0.2, backoff_cap=0.2, measure_reference=False, **kw)
    node = Node(cfg)
    node.outbox = Outbox(tmp_path / "outbox.db")
    node.serving = _Serving()
    threading.Thread(target=node._worker, daemon=True).start()
    return node


def test_a_download_rolled_back_midway_is_abandoned_and_never_installed(tmp_path):
    """A canary on a slow link is still downloading when its deployment is rolled back (its
    desired state cleared): it must give the download up at once, not finish it and serve
    the rejected bundle."""
    data = os.urandom(1_000_000)
    sha = hashlib.sha256(data).hexdigest()
    server, port = _serve_bytes(data)
    node = _worker_node(tmp_path, port, max_download_rate=200_000.0)  # 5 s for the whole
    try:
        node._on_message(topic("desired", "n1"),
                         encode(Desired(deployment=1, sha256=sha, name="m", size=len(data))))
        wait_until(lambda: node.store.resume_offset(sha) > 0, 5, 0.02, "the download")
        node._on_message(topic("desired", "n1"), b"")  # the rollback of a first deployment
        wait_until(lambda: node.state is NodeState.EMPTY, 3, 0.02, "the download given up")
        assert node.model is None and node.installs == 0 and not node.store.has(sha)
        # no longer wanted: its partial file goes, not to hold the disk for nothing
        wait_until(lambda: node.store.resume_offset(sha) == 0, 3, 0.02, "the partial deleted")
        assert [r for r in node.outbox.pending(100) if r.kind == "report"] == []
    finally:
        node._stop.set()
        node._work.set()
        server.shutdown()


def test_only_the_partial_download_of_the_wanted_bundle_is_kept(tmp_path):
    """After a restart the node keeps its partial downloads until it hears its desired state
    (one may be resumed); then the partials of other bundles go, and the wanted one resumes."""
    data = os.urandom(300_000)
    sha = hashlib.sha256(data).hexdigest()
    stale = hashlib.sha256(b"rolled back while the node was away").hexdigest()
    server, port = _serve_bytes(data)
    node = _worker_node(tmp_path, port)
    (node.store.downloads / f"{stale}.part").write_bytes(os.urandom(100_000))
    (node.store.downloads / f"{sha}.part").write_bytes(data[:100_000])
    try:
        node._work.set()
        time.sleep(0.3)  # the worker looked: no desired state heard yet, nothing deleted
        assert node.store.describe()["partial"] == sorted([stale, sha])
        node._on_message(topic("desired", "n1"),
                         encode(Desired(deployment=1, sha256=sha, name="m", size=len(data))))
        wait_until(lambda: node.model is not None, 5, 0.02, "the install")
        assert node.model.bundle == sha and node.store.path(sha).read_bytes() == data
        assert node.store.describe()["partial"] == []
    finally:
        node._stop.set()
        node._work.set()
        server.shutdown()


def test_a_desired_state_that_moves_on_as_the_download_ends_is_not_installed(tmp_path):
    """The rollback may land between the last chunk and the swap: the node looks at its
    desired state again before it serves the bundle."""
    from edgeslim.fleet.store import BundleStore

    data = b"bundle-bytes" * 100
    sha = hashlib.sha256(data).hexdigest()
    server, port = _serve_bytes(data)
    node = _worker_node(tmp_path, port)

    class RolledBackAsItEnds(BundleStore):
        def download(self, *args, **kw):
            path = super().download(*args, **kw)
            node._on_message(topic("desired", "n1"), b"")  # arrives just after the last byte
            return path

    node.store = RolledBackAsItEnds(node.data)
    try:
        node._on_message(topic("desired", "n1"),
                         encode(Desired(deployment=1, sha256=sha, name="m", size=len(data))))
        wait_until(lambda: node.store.has(sha), 5, 0.02, "the download")
        wait_until(lambda: node.state is NodeState.EMPTY, 3, 0.02, "the worker to settle")
        assert node.model is None and node.installs == 0
        assert [r for r in node.outbox.pending(100) if r.kind == "report"] == []
    finally:
        node._stop.set()
        node._work.set()
        server.shutdown()


class _FullDisk(Outbox):
    """The real outbox, whose writes fail with SQLite's disk-full error while ``full`` is set
    (a full disk cannot be produced here)."""

    def __init__(self, path):
        super().__init__(path)
        self.full = threading.Event()
        self.refused = 0

    def put_many(self, items, **kw):
        if self.full.is_set():
            self.refused += 1
            raise sqlite3.OperationalError("database or disk is full")
        return super().put_many(items, **kw)


def _serve_two_bundles() -> tuple[http.server.ThreadingHTTPServer, dict[int, str]]:
    """A real HTTP server with two bundles (1 and 2) at /bundles/SHA; and their shas."""
    data = {v: f"bundle-{v}".encode() * 100 for v in (1, 2)}
    shas = {v: hashlib.sha256(b).hexdigest() for v, b in data.items()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = next(b for v, b in data.items() if shas[v] in self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, shas


def test_a_full_disk_does_not_stop_the_worker_for_good(tmp_path):
    """The install report cannot be stored while the disk is full: the worker retries it
    instead of dying, reports once the disk is back, and installs the next bundle too."""
    server, shas = _serve_two_bundles()
    node = _worker_node(tmp_path, server.server_address[1])
    node.outbox = box = _FullDisk(tmp_path / "full.db")

    def reports():
        return [(r.body["deployment"], r.body["outcome"]) for r in box.pending(100)
                if r.kind == "report"]  # fmt: skip

    try:
        box.full.set()
        node._on_message(topic("desired", "n1"), encode(Desired(deployment=1, sha256=shas[1])))
        wait_until(lambda: node.model is not None, 5, 0.02, "the first install")
        wait_until(lambda: box.refused >= 2, 5, 0.02, "the report refused, then retried")
        box.full.clear()
        wait_until(lambda: reports() == [(1, "installed")], 5, 0.05, "the report, late")
        node._on_message(topic("desired", "n1"), encode(Desired(deployment=2, sha256=shas[2])))
        wait_until(lambda: reports() == [(1, "installed"), (2, "installed")], 5, 0.05,
                   "the second install")
        assert node.model.bundle == shas[2] and node.installs == 2
    finally:
        node._stop.set()
        node._work.set()
        server.shutdown()


def test_a_report_the_outbox_cannot_take_does_not_hold_up_the_next_desired_state(tmp_path):
    """While the disk stays full, the controller moves on (a rollback, a newer deployment):
    the worker must follow it, not retry the old report and nothing else; the reports are
    stored, in order, once the disk has room again."""
    server, shas = _serve_two_bundles()
    node = _worker_node(tmp_path, server.server_address[1])
    node.outbox = box = _FullDisk(tmp_path / "full.db")

    def reports():
        return [(r.body["deployment"], r.body["outcome"]) for r in box.pending(100)
                if r.kind == "report"]  # fmt: skip

    try:
        box.full.set()
        node._on_message(topic("desired", "n1"), encode(Desired(deployment=1, sha256=shas[1])))
        wait_until(lambda: box.refused >= 2, 5, 0.02, "the first report refused, then retried")
        node._on_message(topic("desired", "n1"), encode(Desired(deployment=2, sha256=shas[2])))
        # the model switches before the install is counted and the state set: wait for all
        wait_until(lambda: node.model is not None and node.model.bundle == shas[2]
                   and node.installs == 2 and node.state is NodeState.SERVING, 5, 0.02,
                   "the second install, the disk still full")  # fmt: skip
        assert node.installs == 2 and node.state is NodeState.SERVING and reports() == []
        box.full.clear()
        wait_until(lambda: reports() == [(1, "installed"), (2, "installed")], 5, 0.05,
                   "both reports, in order")  # fmt: skip
    finally:
        node._stop.set()
        node._work.set()
        server.shutdown()


def test_a_full_disk_does_not_stop_sharing_results_and_the_queue_stays_bounded(tmp_path):
    """Results that cannot be stored are kept and stored once the disk is back; answers that
    pile up meanwhile are bounded (the overflow is counted), not held without limit."""
    _, pub = generate_keypair(tmp_path / "keys")
    node = Node(NodeConfig(node_id="n1", broker="mqtt://u:p@127.0.0.1:1", public_key=pub,
                           data_dir=tmp_path / "node", controller="http://127.0.0.1:1",
                           backoff_initial=0.1, backoff_cap=0.2, measure_reference=False,
                           share_results=True))  # fmt: skip
    node.outbox = box = _FullDisk(tmp_path / "full.db")
    box.full.set()
    loop = threading.Thread(target=node._results_loop, daemon=True)
    loop.start()
    try:
        answer = json.dumps({"id": "q", "outputs": [{"name": "logits", "data": [1.0]}]}).encode()
        node._on_result("c" * 64, answer)
        wait_until(lambda: node._results.empty(), 5, 0.02, "the first result taken")
        for _ in range(Node.RESULTS_QUEUE + 100):
            node._on_result("c" * 64, answer)
        assert node._results.qsize() <= Node.RESULTS_QUEUE and node.results_dropped >= 100
        box.full.clear()
        wait_until(lambda: box.count() == 1 + Node.RESULTS_QUEUE, 20, 0.1, "the results stored")
        assert loop.is_alive()
    finally:
        node._stop.set()
        node._drained.set()  # what stop() says once the server has stopped: the loop ends
        loop.join(5)
    assert not loop.is_alive()


def test_a_failed_ack_leaves_no_transaction_open_for_the_next_record(tmp_path):
    """A DELETE that fails (disk full, I/O error) must not leave the outbox inside a
    transaction: the node's next record (an install report, say) would fail with it."""
    box = Outbox(tmp_path / "outbox.db")
    first = box.put("event", {"a": 1})
    box._db.execute("CREATE TRIGGER t BEFORE DELETE ON outbox "
                    "BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
    with pytest.raises(sqlite3.Error, match="disk I/O error"):
        box.ack([first.id])
    assert not box._db.in_transaction
    box.put("report", {"deployment": 1, "outcome": "installed"})
    assert box.count() == 2


def test_outbox_batches_stay_under_max_bytes_when_the_broker_names_none(tmp_path):
    """Without a Maximum Packet Size in the CONNACK, a batch is capped at ``max_bytes`` (for
    AWS IoT's 128 KiB, say) whatever its record count; every record still goes, in order."""
    from edgeslim.fleet.outbox import Forwarder

    box = Outbox(tmp_path / "outbox.db")
    ids = [box.put("event", {"pad": "x" * 300, "i": i}).id for i in range(60)]
    sent: list[bytes] = []
    fw = Forwarder(box, "n1", topic("telemetry", "n1"),
                   lambda t, p: sent.append(p) or True, max_bytes=4096)  # fmt: skip
    for _ in range(100):  # send a batch, get its ack, and again
        fw._step()
        if not box.count():
            break
        fw.on_ack([r["id"] for r in json.loads(sent[-1])["records"]])
    assert all(len(p) <= 4096 - len(topic("telemetry", "n1")) - 64 for p in sent)
    assert len(sent) > 5
    assert [r["id"] for p in sent for r in json.loads(p)["records"]] == ids


def test_a_large_record_goes_when_no_limit_is_set(tmp_path):
    """A shared result of 16 x 1000 classes is ~190 kB: by default (MQTT's own limit, no
    broker limit) it is sent, not set aside as it was under a default cap of 128 KiB."""
    from edgeslim.fleet.outbox import MAX_MESSAGE_BYTES, Forwarder

    assert MAX_MESSAGE_BYTES == 268_435_455  # MQTT's largest packet
    box = Outbox(tmp_path / "outbox.db")
    big = box.put("result", {"outputs": [[0.123456789] * 1000] * 16}).id
    sent: list[bytes] = []
    fw = Forwarder(box, "n1", topic("telemetry", "n1"), lambda t, p: sent.append(p) or True)
    fw._step()
    assert len(sent) == 1 and len(sent[0]) > 150_000  # over 128 KiB
    assert [r["id"] for r in json.loads(sent[0])["records"]] == [big]
    assert fw.set_aside_records == 0 and box.count_set_aside() == 0


def test_a_record_sqlite_cannot_store_is_acked_and_dropped_alone(tmp_path):
    """A report whose deployment is an integer beyond 64 bits raised OverflowError in SQLite
    and undid the whole ingest batch, other nodes' statuses with it; the record is now dropped
    alone and acked (or the node would resend it forever)."""
    from edgeslim.fleet.controller import Controller

    c = Controller("mqtt://controller:pw@127.0.0.1:1", tmp_path / "ctl")
    acks: list[tuple[str, bytes]] = []
    c.link.publish = lambda t, p, qos=1, retain=False: acks.append((t, p)) or True
    good = {"v": 1, "id": "n1", "state": "serving", "ts": 1.0}
    huge = Record(id="r-huge", seq=1, kind="report", ts=1.0,
                  body={"deployment": 10**20, "outcome": "installed"})
    fine = Record(id="r-fine", seq=2, kind="event", ts=1.0, body={"a": 1})
    c._apply([(topic("telemetry", "n2"), encode(Batch(node="n2", records=[huge, fine]))),
              (topic("status", "n1"), json.dumps(good).encode())])
    assert "n1" in [n.id for n in c.registry.nodes()]  # the status in the same batch
    assert [r["id"] for r in c.registry.records(node="n2")] == ["r-fine"]
    assert acks == [(topic("ack", "n2"), encode(Ack(ids=["r-huge", "r-fine"])))]


def test_one_malformed_status_does_not_drop_the_rest_of_an_ingest_batch(tmp_path):
    """The controller commits a batch of messages in one transaction: a status with a field of
    the wrong type is dropped alone; the other node's status and records are stored and acked."""
    from edgeslim.fleet.controller import Controller

    c = Controller("mqtt://controller:pw@127.0.0.1:1", tmp_path / "ctl")
    acks: list[str] = []
    c.link.publish = lambda t, p, qos=1, retain=False: acks.append(t) or True
    good = {"v": 1, "id": "n1", "state": "serving", "ts": 1.0}
    report = Record(id="r1", seq=1, kind="report", ts=1.0,
                    body={"deployment": 1, "outcome": "installed"})
    for bad in ({"queue": "x"}, {"ts": [1]}, {"queue": float("inf")}):
        c._apply([(topic("status", "n1"), json.dumps(good).encode()),
                  (topic("status", "n2"), json.dumps({"v": 1, "id": "n2", "state": "serving",
                                                      **bad}).encode()),
                  (topic("telemetry", "n1"), encode(Batch(node="n1", records=[report])))])
    assert [n.id for n in c.registry.nodes()] == ["n1"]
    assert [r["id"] for r in c.registry.records()] == ["r1"]
    assert acks == [topic("ack", "n1")] * 3


def test_a_bad_result_message_does_not_drop_the_rest_of_an_ingest_batch(tmp_path):
    """Any node may publish on its own edgeslim/results/SHA/NODE: a payload nested too deep to
    parse, an integer too long to convert, or a result that does not match its topic (another
    model, another node, no node at all) is dropped alone; the statuses and records of the
    same batch are stored and acked."""
    from edgeslim.fleet.controller import Controller
    from edgeslim.fleet.protocol import Result

    c = Controller("mqtt://controller:pw@127.0.0.1:1", tmp_path / "ctl")
    acks: list[str] = []
    c.link.publish = lambda t, p, qos=1, retain=False: acks.append(t) or True
    sha = "c" * 64
    good = Result(node="n1", model_sha=sha, request_id="q1", outputs=[1.0], ts=1.0)
    wrong_topic = Result(node="n1", model_sha="d" * 64, request_id="q2", outputs=[], ts=1.0)
    other_node = Result(node="n2", model_sha=sha, request_id="q3", outputs=[], ts=1.0)
    bad = [b"[" * 100_000, b'{"n": ' + b"1" * 5000 + b"}", b"[1]", encode(wrong_topic),
           encode(other_node),
           b'{"node": "n1", "model_sha": "' + sha.encode() + b'", "request_id": 7, "ts": 1}']
    for i, payload in enumerate(bad):
        report = Record(id=f"r{i}", seq=i + 1, kind="report", ts=1.0,
                        body={"deployment": 1, "outcome": "installed"})
        c._apply([(topic("status", "n1"),
                   json.dumps({"v": 1, "id": "n1", "state": "serving", "ts": 1.0}).encode()),
                  (topic("results", sha, "n1"), payload),
                  (topic("telemetry", "n1"), encode(Batch(node="n1", records=[report])))])
    c._apply([(f"edgeslim/results/{sha}", encode(good))])  # the topic names no sender
    c._apply([(topic("results", sha, "n1"), encode(good))])
    assert [n.id for n in c.registry.nodes()] == ["n1"]
    assert sorted(r["id"] for r in c.registry.records()) == [f"r{i}" for i in range(len(bad))]
    assert acks == [topic("ack", "n1")] * len(bad)
    assert list(c.results) == [good.to_dict()]


def test_a_rollback_asked_for_with_the_last_report_is_not_lost():
    """An operator's rollback that arrives while the last phase waits for its final report
    must roll the deployment back, not end it 'succeeded' after the API said it would."""
    from edgeslim.fleet.registry import Registry
    from edgeslim.fleet.rollout import Rollout, RolloutParams

    sha = "b" * 64
    reverted: list[str] = []

    class Controller:  # the parts of the controller a rollout uses
        def __init__(self):
            self.registry = Registry(":memory:")
            self.registry.add_bundle(sha, "m", "2", 10, True, {})
            self.rollout_lock = threading.Lock()
            self.desired_lock = threading.RLock()
            self.changed = threading.Condition()

        def wait_change(self, timeout):
            with self.changed:
                self.changed.wait(timeout)

        def notify(self):
            with self.changed:
                self.changed.notify_all()

        def publish_desired(self, node, dep, bundle_sha, bundle, rollback):
            def report():  # the node installs; the operator asks for a rollback just then
                time.sleep(0.1)
                self.registry.set_targets(dep, [node], "installed")
                rollout.abort("operator: rollback")

            threading.Thread(target=report).start()

        def revert_node(self, node, dep, previous_sha):
            reverted.append(node)

        def rollout_finished(self, dep):
            pass

    c = Controller()
    dep = c.registry.create_deployment(sha, {}, 0.0, {}, [("n1", "rest", "a" * 64)])
    rollout = Rollout(c, dep, RolloutParams(canary=0.0, install_timeout_s=1.0))
    rollout.run()
    row = c.registry.deployment(dep)
    assert row.state == "rolled_back" and not rollout.succeeded
    assert reverted == ["n1"]


@pytest.mark.parametrize("skew", [0.0, -30.0, 30.0])
def test_the_soak_judges_a_canary_whose_clock_is_off(skew):
    """A canary answering nothing but errors is rolled back whatever its clock says: its
    telemetry windows are placed on the controller's clock, not on the node's."""
    from edgeslim.fleet.registry import Registry
    from edgeslim.fleet.rollout import Rollout, RolloutParams

    sha = "b" * 64

    class Controller:
        def __init__(self):
            self.registry = Registry(":memory:")

        def wait_change(self, timeout):
            time.sleep(timeout)

        def notify(self):
            pass

    c = Controller()
    dep = c.registry.create_deployment(sha, {}, 1.0, {}, [("n1", "canary", "a" * 64)])

    def telemetry():  # a window that began after the soak did, stamped by a skewed clock
        time.sleep(0.3)
        body = {"requests": 500, "errors": 500, "p99_ms": 1.0, "window_s": 0.2, "bundle": sha}
        record = Record(id="t1", seq=1, kind="telemetry", ts=time.time() + skew, body=body)
        with c.registry.tx() as db:
            Registry.insert_records(db, "n1", [record], time.time())

    threading.Thread(target=telemetry).start()
    verdict = Rollout(c, dep, RolloutParams(soak_s=1.0))._soak(["n1"], [])
    assert verdict is not None and "canary error rate 100.000%" in verdict


def test_only_the_latest_deployment_can_be_rolled_back(tmp_path):
    """Rolling back deployment 1 after deployment 2 would send its nodes to what they served
    before 1, while every republish still says 2: refused, naming the one to roll back."""
    from edgeslim.fleet.controller import Conflict, Controller

    c = Controller("mqtt://controller:pw@127.0.0.1:1", tmp_path / "ctl")
    c.registry.add_bundle("1" * 64, "m", "1", 10, True, {})
    c.registry.add_bundle("2" * 64, "m", "2", 10, True, {})
    d1 = c.registry.create_deployment("1" * 64, {}, 0.0, {}, [("n1", "rest", None)])
    c.registry.set_deployment_state(d1, "succeeded")
    d2 = c.registry.create_deployment("2" * 64, {}, 0.0, {}, [("n1", "rest", "1" * 64)])
    c.registry.set_deployment_state(d2, "succeeded")
    with pytest.raises(Conflict, match=f"Deployment {d1} is not the latest \\({d2} is\\)"):
        c.rollback(d1)
    assert c.registry.deployment(d1).state == "succeeded"


def test_a_rollback_that_cannot_complete_still_ends_the_deployment():
    """An error inside the rollback (the registry, the broker client) ends the deployment
    'failed' instead of leaving it 'rolling_back', where every later rollback is refused."""
    from edgeslim.fleet.registry import Registry
    from edgeslim.fleet.rollout import Rollout, RolloutParams

    class Controller:
        def __init__(self):
            self.registry = Registry(":memory:")
            self.desired_lock = threading.RLock()

        def revert_node(self, node, dep, previous_sha):
            raise OSError("the broker client is gone")

        def rollout_finished(self, dep):
            pass

    c = Controller()
    dep = c.registry.create_deployment("b" * 64, {}, 0.0, {}, [("n1", "rest", "a" * 64)])
    c.registry.set_targets(dep, ["n1"], "installed")
    Rollout(c, dep, RolloutParams(), rollback_reason="operator").run()
    row = c.registry.deployment(dep)
    assert row.state == "failed" and "rollback did not complete" in row.reason


def _fake_broker(reasons: list[int]) -> tuple[socket.socket, list[int]]:
    """A TCP server answering the n-th CONNECT with an MQTT 5 CONNACK of ``reasons[n]`` (the
    last one from then on): what Mosquitto cannot be made to answer. It keeps an accepted
    connection open; a refused one is closed."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    seen: list[int] = []

    def drain(conn):  # an accepted client: read until it hangs up
        with contextlib.suppress(OSError):
            while conn.recv(4096):
                pass
        conn.close()

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.recv(4096)
            code = reasons[min(len(seen), len(reasons) - 1)]
            seen.append(code)
            conn.sendall(bytes([0x20, 0x03, 0x00, code, 0x00]))
            if code:
                conn.close()
            else:
                threading.Thread(target=drain, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, seen


def test_a_busy_broker_on_the_first_connect_is_retried_not_called_a_bad_password():
    """CONNACK 0x89 'Server busy' (a broker under a connection storm) was reported as wrong
    credentials and the node exited; it is retried. Credential refusals still raise."""
    from edgeslim.errors import ConfigError
    from edgeslim.fleet.backoff import Backoff, LinkState
    from edgeslim.fleet.link import MqttLink
    from edgeslim.fleet.protocol import BrokerURL

    srv, seen = _fake_broker([0x89, 0x89, 0x00])
    url = BrokerURL.parse(f"mqtt://node:pw@127.0.0.1:{srv.getsockname()[1]}")
    link = MqttLink(url, "n1", backoff=Backoff(initial=0.1, cap=0.2))
    try:
        link.start(wait=10)
        assert link.state is LinkState.CONNECTED and seen == [0x89, 0x89, 0x00]
    finally:
        link.stop()
        srv.close()

    for code in (0x86, 0x87, 0x85, 0x8C):
        srv, seen = _fake_broker([code])
        url = BrokerURL.parse(f"mqtt://node:pw@127.0.0.1:{srv.getsockname()[1]}")
        link = MqttLink(url, "n1", backoff=Backoff(initial=0.1, cap=0.2))
        try:
            with pytest.raises(ConfigError, match="Check the user and password"):
                link.start(wait=10)
        finally:
            link.stop()
            srv.close()
