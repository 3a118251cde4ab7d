"""A result a node sends through its outbox is attributed to the node whose telemetry topic
carried it (which the broker's ACL ties to the sender's client id), never to the node its
body names. Real broker, real controller, a raw MQTT client as the sender."""

from __future__ import annotations

import time

import pytest

from edgeslim.fleet.demo import wait_until
from edgeslim.fleet.protocol import Batch, BrokerURL, Record, Result, encode, topic
from tests.fleet.conftest import needs_broker

pytestmark = needs_broker


def _client(broker, client_id: str):
    import paho.mqtt.client as mqtt

    url = BrokerURL.parse(broker.url("node"))
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv5)  # fmt: skip
    c.username_pw_set(url.username, url.password)
    c.connect(url.host, url.port)
    c.loop_start()
    return c


@pytest.mark.parametrize("claimed", ["edge-1", "edge-2"])
def test_a_result_record_names_the_node_that_sent_it(broker, controller, claimed):
    sha = "ab" * 32
    result = Result(node=claimed, model_sha=sha, request_id="r1", outputs=[666], ts=time.time())
    rec = Record(id=f"rec-{claimed}", seq=1, kind="result", ts=time.time(), body=result.to_dict())
    sender = _client(broker, "edge-2")
    try:
        info = sender.publish(topic("telemetry", "edge-2"),
                              encode(Batch(node="edge-2", records=[rec])), qos=1)  # fmt: skip
        info.wait_for_publish(5)
        wait_until(lambda: controller.registry.records(kind="result"), 10,
                   what="the result record")  # fmt: skip
    finally:
        sender.disconnect()
        sender.loop_stop()
    (stored,) = controller.registry.records(kind="result")
    assert stored["node"] == "edge-2"
    assert stored["body"]["node"] == "edge-2"  # the sender, whatever the body claimed
    assert stored["body"]["outputs"] == [666] and stored["body"]["request_id"] == "r1"
    assert controller.registry.records(node="edge-1") == []


def test_a_live_result_is_kept_only_on_its_senders_own_topic(broker, controller):
    """Live results go to edgeslim/results/SHA/NODE. The broker's ACL lets a client publish
    only under its own client id, and the controller keeps a result only when the node its
    body names is the topic's: so a kept live result names its sender."""
    sha = "cd" * 32

    def result(node: str, request_id: str) -> bytes:
        return encode(Result(node=node, model_sha=sha, request_id=request_id, outputs=[1],
                             ts=time.time()))  # fmt: skip

    sender = _client(broker, "edge-2")
    try:
        for where, payload in (
            (topic("results", sha, "edge-1"), result("edge-1", "someone else's topic")),
            (topic("results", sha, "edge-2"), result("edge-1", "a body naming another node")),
            (f"edgeslim/results/{sha}", result("edge-2", "the topic without a sender")),
            (topic("results", sha, "edge-2"), result("edge-2", "its own")),
        ):
            sender.publish(where, payload, qos=1).wait_for_publish(5)
        wait_until(lambda: any(r["request_id"] == "its own" for r in controller.results), 10,
                   what="the sender's own result")  # fmt: skip
        time.sleep(0.3)
    finally:
        sender.disconnect()
        sender.loop_stop()
    assert [(r["node"], r["request_id"]) for r in controller.results] == [("edge-2", "its own")]
