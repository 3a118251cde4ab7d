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
