"""With one broker user per node and ``use_username_as_clientid`` (``Broker.for_fleet``), a
node's login fixes its identity: it can neither speak as another node nor take the
controller's client id. (With a shared node user and client-chosen ids it could do both.)"""

from __future__ import annotations

import time
import types

import pytest

from edgeslim.fleet.demo import wait_until
from edgeslim.fleet.node import Node
from edgeslim.fleet.protocol import Status, encode, topic
from tests.fleet.conftest import HAVE_MOSQUITTO, needs_broker, node_config
from tests.fleet.test_offload_trust import mqtt_as

pytestmark = [needs_broker]


@pytest.fixture
def fleet_broker(tmp_path):
    if not HAVE_MOSQUITTO:
        pytest.skip("mosquitto")
    from edgeslim.fleet.broker import Broker

    b = Broker.for_fleet(["edge-1", "edge-2"], workdir=tmp_path / "mq").start()
    yield b
    b.close()


def test_a_node_login_cannot_speak_for_another_node_or_knock_off_the_controller(
    fleet_broker, tmp_path, keys
):
    from edgeslim.fleet.backoff import Backoff
    from edgeslim.fleet.controller import Controller

    assert "use_username_as_clientid true" in (fleet_broker.dir / "mosquitto.conf").read_text()
    ctl = Controller(fleet_broker.url("controller"), tmp_path / "ctl",
                     backoff=Backoff(initial=0.2, cap=1.0)).start()  # fmt: skip
    own_login = types.SimpleNamespace(url=lambda _user: fleet_broker.url("edge-1"))
    node = Node(node_config(own_login, ctl, tmp_path, keys, "edge-1")).start()
    try:
        wait_until(lambda: "edge-1" in {n.id for n in ctl.online_nodes()}, 20,
                   what="edge-1 to join under its own user")  # fmt: skip
        losses = ctl.link.losses
        # edge-2's login, asking for the controller's client id: the broker makes it "edge-2"
        for _ in range(3):
            with mqtt_as(fleet_broker, "edge-2", "edgeslim-controller"):
                time.sleep(0.3)
        # edge-2's login, asking for edge-1's id, publishing edge-1's status: refused by the
        # ACL, since its client id is "edge-2" whatever it asked for
        forged = Status(id="edge-1", state="serving", health="ok", http="http://10.9.9.9:1",
                        ts=time.time(), heartbeat_s=3600)  # fmt: skip
        with mqtt_as(fleet_broker, "edge-2", "edge-1") as evil:
            evil.publish(topic("status", "edge-1"), encode(forged), qos=1,
                         retain=True).wait_for_publish(5)  # fmt: skip
            time.sleep(0.5)
        assert ctl.link.losses == losses and ctl.link.state.value == "connected"
        assert node.link.state.value == "connected"  # edge-1 was not knocked off either
        time.sleep(1.0)  # edge-1 heartbeats every 0.5 s: its own status is what counts
        (row,) = [n for n in ctl.online_nodes() if n.id == "edge-1"]
        assert row.http == node.url
    finally:
        node.stop()
        ctl.stop()


def test_for_fleet_refuses_ids_that_clash_or_are_not_node_ids(tmp_path):
    from edgeslim.errors import ConfigError
    from edgeslim.fleet.broker import Broker

    for ids in (["edge-1", "edge-1"], ["controller"], ["bad/id"]):
        with pytest.raises(ConfigError):
            Broker.for_fleet(ids, workdir=tmp_path / "mq")
