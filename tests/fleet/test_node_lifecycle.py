"""A node's life: a start that fails leaves nothing running, a node starts once, and what it
answers up to its stop is stored. Real broker, real HTTP, real SQLite."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading

import pytest

from edgeslim.errors import ConfigError
from edgeslim.fleet.broker import free_port
from edgeslim.fleet.demo import wait_until
from edgeslim.fleet.node import Node, NodeConfig, NodeState
from tests.fleet.conftest import needs_broker

pytestmark = needs_broker


def _config(mq, tmp_path, keys, **kw) -> NodeConfig:
    base = dict(
        node_id="life-1",
        broker=mq.url("node"),
        controller="http://127.0.0.1:1",  # no controller: nothing acks, records stay put
        data_dir=tmp_path / "node",
        public_key=keys[1],
        heartbeat_s=0.2,
        telemetry_s=0.2,
        measure_reference=False,
        backoff_initial=0.1,
        backoff_cap=0.2,
        connect_wait=5.0,
    )
    base.update(kw)
    return NodeConfig(**base)


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_failed_start_stops_everything_it_started(broker, tmp_path, keys):
    """A wrong broker password is only found out at the end of start(), after the server,
    the outbox and the threads are up: all of them must be stopped again, or the process
    keeps a port, threads and an open database it has no handle to (``with Node(cfg):``
    never reaches ``__exit__`` when ``__enter__`` raises)."""
    before = set(threading.enumerate())
    port = free_port()
    wrong = broker.url("node").replace("://node:", "://node:wrong", 1)
    node = Node(_config(broker, tmp_path, keys, broker=wrong, port=port))
    with pytest.raises(ConfigError, match="refused"):
        node.start()
    assert not _accepts(port)
    assert node.state is NodeState.STOPPED
    wait_until(lambda: not [t for t in set(threading.enumerate()) - before if t.is_alive()],
               5, 0.05, "the node's threads to end")
    with pytest.raises(sqlite3.ProgrammingError):  # the outbox is closed: no more telemetry
        node.outbox.count()
    # the context manager form cleans up the same way
    with pytest.raises(ConfigError, match="refused"), Node(_config(broker, tmp_path, keys,
                                                                   broker=wrong, port=port)):
        pass  # pragma: no cover
    assert not _accepts(port)


def test_a_node_starts_once(broker, tmp_path, keys):
    """A second start() on a running node would open a second server and a second link
    under the same id; on a stopped one it gave a node with no worker and no ticker (its stop
    flag stays set) that served but never followed the controller. Both are refused."""
    node = Node(_config(broker, tmp_path, keys)).start()
    try:
        url = node.url
        with pytest.raises(ConfigError, match="runs once"):
            node.start()
        assert node.url == url and node.state is NodeState.EMPTY  # the running node goes on
    finally:
        node.stop()
    with pytest.raises(ConfigError, match="runs once"):
        node.start()
    assert node.state is NodeState.STOPPED
    fresh = Node(_config(broker, tmp_path, keys)).start()  # the same config, a new Node: fine
    try:
        assert fresh.state is NodeState.EMPTY
        assert sorted(t.name for t in fresh._threads) == ["life-1-ticker", "life-1-worker"]
    finally:
        fresh.stop()


def test_every_answer_given_up_to_stop_is_stored(broker, tmp_path, keys, bundles):
    """With share_results, each answer goes to the outbox, and docs/fleet.md promises no
    record is lost: the answers still queued at stop(), and those the server gives while it
    drains, must be stored before the outbox closes; so must the last telemetry window."""
    import hashlib

    import httpx

    from edgeslim.fleet.store import BundleStore
    from tests.fleet.helpers import NAME, infer_body

    data = bundles["v1"].read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    store = BundleStore(tmp_path / "node")
    store.path(sha).write_bytes(data)
    store.set_current(sha, NAME)
    node = Node(_config(broker, tmp_path, keys, share_results=True)).start()
    assert node.model is not None and node.model.bundle == sha
    answered: list[str] = []
    halt = threading.Event()

    def traffic(k: int) -> None:
        body = infer_body()
        with httpx.Client(base_url=node.url, timeout=10) as client:
            for i in range(100_000):
                if halt.is_set():
                    return
                body["id"] = f"{k}-{i}"
                try:
                    if client.post(f"/v2/models/{NAME}/infer", json=body).status_code == 200:
                        answered.append(body["id"])
                except httpx.HTTPError:  # the server has stopped
                    return

    clients = [threading.Thread(target=traffic, args=(k,)) for k in range(3)]
    for t in clients:
        t.start()
    wait_until(lambda: len(answered) > 100, 20, 0.02, "some answers")
    window = node.middleware.window
    node.stop()
    halt.set()
    for t in clients:
        t.join(10)
    db = sqlite3.connect(tmp_path / "node" / "outbox.db")
    rows = [(k, json.loads(b)) for k, b in db.execute("SELECT kind, body FROM outbox")]
    db.close()
    stored = [b["request_id"] for k, b in rows if k == "result"]
    assert len(stored) == len(set(stored))
    assert set(stored) == set(answered)
    assert sum(b["requests"] for k, b in rows if k == "telemetry") == window.total_requests
