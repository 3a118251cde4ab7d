"""A node's life: a start that fails leaves nothing running, a node starts once, and what it
answers up to its stop is stored. Real broker, real HTTP, real SQLite."""

from __future__ import annotations

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
