"""The controller's own life: stop while a rollout runs, a start that fails, a start after a
crash. Real Mosquitto, SQLite, HTTP and nodes."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from edgeslim.fleet.demo import wait_until
from edgeslim.fleet.node import Node
from edgeslim.fleet.registry import Registry
from edgeslim.fleet.rollout import RolloutParams
from tests.fleet.conftest import needs_broker, node_config

pytestmark = needs_broker


def _controller(broker, data, keys=None):
    from edgeslim.fleet.backoff import Backoff
    from edgeslim.fleet.controller import Controller

    return Controller(broker.url("controller"), data, public_key=keys[1] if keys else None,
                      offline_after=10.0, backoff=Backoff(initial=0.2, cap=1.0))  # fmt: skip


def _rollout_threads(dep: int) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"rollout-{dep}" and t.is_alive()]


def _stop_and_check(c, dep: int, caplog) -> None:
    """Stop ``c`` mid-rollout: the rollout ends with it, and nothing goes wrong after."""
    t0 = time.monotonic()
    c.stop()
    took = time.monotonic() - t0
    assert not _rollout_threads(dep), "a rollout outlived Controller.stop()"
    assert took < 10, f"stop took {took:.1f} s"
    time.sleep(1.0)  # a rollout left running would now write to the closed registry
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.slow
def test_stop_during_a_soak_leaves_the_deployment_to_the_next_start(
    broker, tmp_path, keys, bundles, caplog
):
    """The soak outlasts the controller: stop ends the rollout at once, writes nothing more
    (no rollback, no crash on the closed registry), and the next start rolls it back."""
    caplog.set_level(logging.INFO, logger="edgeslim")
    data = tmp_path / "ctl"
    c = _controller(broker, data, keys).start()
    node = None
    try:
        node = Node(node_config(broker, c, tmp_path, keys, "edge-1")).start()
        wait_until(lambda: c.online_nodes(), 20, what="the node to join")
        sha = c.add_bundle(bundles["v1"].read_bytes())["sha256"]
        dep = c.deploy(sha, params=RolloutParams(canary=1.0, soak_s=30.0))
        wait_until(lambda: c.registry.deployment(dep).state == "soak", 30, 0.05, "the soak")
    except BaseException:
        c.stop()
        if node is not None:
            node.stop()
        raise
    try:
        _stop_and_check(c, dep, caplog)
        reg = Registry(data / "registry.db")
        row = reg.deployment(dep)
        reg.close()
        assert row.state == "soak"  # as it stood: neither rolled back nor failed
        assert [t.state for t in row.targets] == ["installed"]

        c2 = _controller(broker, data, keys).start()
        try:  # the next start rolls the interrupted deployment back, as it always did
            assert c2.wait_deployment(dep, 30) == "rolled_back"
            assert "controller restarted" in c2.registry.deployment(dep).reason
        finally:
            c2.stop()
    finally:
        node.stop()


def test_stop_while_a_canary_installs_writes_nothing_more(broker, tmp_path, bundles, caplog):
    """A canary that has not reported yet: stop ends the wait for it, and its target stays
    'sent' (not 'failed' by a timeout, not rolled back) for the next start to roll back."""
    from edgeslim.fleet.link import MqttLink
    from edgeslim.fleet.protocol import BrokerURL, Status, encode, topic

    caplog.set_level(logging.INFO, logger="edgeslim")
    data = tmp_path / "ctl"
    c = _controller(broker, data).start()
    # a node that registers and then never answers its desired state
    silent = MqttLink(BrokerURL.parse(broker.url("node")), "edge-1").start(wait=5)
    try:
        status = Status(id="edge-1", state="empty", ts=time.time(), heartbeat_s=30.0)
        silent.publish(topic("status", "edge-1"), encode(status), qos=1, retain=True)
        wait_until(lambda: c.online_nodes(), 20, what="the node to register")
        sha = c.add_bundle(bundles["v1"].read_bytes())["sha256"]
        dep = c.deploy(sha, params=RolloutParams(canary=1.0, install_timeout_s=60.0))
        wait_until(lambda: [t.state for t in c.registry.deployment(dep).targets] == ["sent"],
                   20, 0.05, "the desired state to go out")  # fmt: skip
        _stop_and_check(c, dep, caplog)
        reg = Registry(data / "registry.db")
        row = reg.deployment(dep)
        reg.close()
        assert row.state == "canary" and [t.state for t in row.targets] == ["sent"]
    finally:
        c.stop()  # (twice is harmless)
        silent.stop()


def _open_files(path) -> list[str]:
    import os

    fds = "/proc/self/fd"
    out = []
    for fd in os.listdir(fds):
        try:
            target = os.readlink(f"{fds}/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            out.append(target)
    return out


def test_a_start_the_broker_refuses_leaves_nothing_running(broker, tmp_path):
    """Wrong broker password: start raises ConfigError, and the HTTP API, ingest and the
    registry it had opened are stopped and closed again (a caller that retries, or a test
    process, would otherwise keep a port and an SQLite file held by a controller it never
    got)."""
    import socket
    from urllib.parse import quote

    from edgeslim.errors import ConfigError
    from edgeslim.fleet.broker import free_port
    from edgeslim.fleet.controller import Controller

    port = free_port()
    wrong = quote("wrong-" + broker.users["controller"])
    url = f"mqtt://controller:{wrong}@127.0.0.1:{broker.port}"
    before = set(threading.enumerate())
    c = Controller(url, tmp_path / "ctl", http_port=port)
    assert _open_files(tmp_path / "ctl")  # the registry is open from here on
    with pytest.raises(ConfigError, match="refused"):
        c.start(wait=10)
    wait_until(lambda: not [t for t in threading.enumerate() if t not in before and t.is_alive()],
               10, 0.05, "the threads the start began to end")  # fmt: skip
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
    assert not _open_files(tmp_path / "ctl"), "the registry is still open"


def test_a_start_removes_the_uploads_a_crash_cut_short(broker, tmp_path, bundles):
    """A controller killed -9 while it wrote an upload leaves ``bundles/.SHA.PID.tmp``
    (up to a bundle's size) that nothing else removes: the next start deletes it. The
    temporary file of a live writer, and any other file, are kept."""
    import hashlib
    import subprocess
    import sys

    from edgeslim.fleet.controller import Controller

    data = bundles["v1"].read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    folder = tmp_path / "ctl" / "bundles"
    folder.mkdir(parents=True)
    # a writer that dies mid-write, as add_bundle writes: .SHA.PID.tmp, then kill -9
    crash = (
        "import os, signal, sys\n"
        "f = open(os.path.join(sys.argv[1], f'.{sys.argv[2]}.{os.getpid()}.tmp'), 'wb')\n"
        "f.write(os.urandom(1 << 20)); f.flush()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    dead = subprocess.run([sys.executable, "-c", crash, str(folder), sha], timeout=60)
    assert dead.returncode == -9
    (stale,) = folder.glob(".*.tmp")
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = folder / f".{'c' * 64}.{busy.pid}.tmp"  # another controller's upload under way
        live.write_bytes(b"partial")
        other = folder / ".keep.tmp"
        other.write_bytes(b"not an upload")
        c = Controller(broker.url("controller"), tmp_path / "ctl").start()
        try:
            assert not stale.exists()
            assert live.exists() and other.exists()
            assert c.add_bundle(data)["sha256"] == sha  # the same bundle uploads again
            assert (folder / f"{sha}.eslim").read_bytes() == data
            assert sorted(p.name for p in folder.glob(".*.tmp")) == sorted([live.name, other.name])
        finally:
            c.stop()
    finally:
        busy.kill()
        busy.wait(10)
