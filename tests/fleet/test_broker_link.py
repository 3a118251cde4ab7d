"""The Mosquitto fixture, the ACL and the MQTT link's states, reconnects and last will."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from edgeslim.errors import ConfigError
from edgeslim.fleet.backoff import Backoff, LinkState
from edgeslim.fleet.demo import wait_until
from edgeslim.fleet.link import MqttLink
from edgeslim.fleet.protocol import BrokerURL, Status, encode, topic
from tests.fleet.conftest import needs_broker

pytestmark = needs_broker


def _link(url: str, client_id: str, **kw) -> MqttLink:
    kw.setdefault("backoff", Backoff(initial=0.1, cap=0.5))
    return MqttLink(BrokerURL.parse(url), client_id, name=client_id, **kw)


def test_wrong_password_on_first_connect_is_a_config_error(broker):
    url = broker.url("node").replace("@", "x@", 1)  # password + "x"
    link = _link(url, "n1")
    with pytest.raises(ConfigError, match=r"refused .*Check the user and password"):
        link.start(wait=5)
    assert link.state is LinkState.CLOSED


def test_unreachable_broker_is_not_an_error_and_the_link_keeps_trying(broker):
    broker.stop()
    link = _link(broker.url("node"), "n1")
    link.start(wait=0.5)  # returns: an edge node must come up without its broker
    assert link.state in (LinkState.BACKOFF, LinkState.CONNECTING)
    assert link.publish("edgeslim/nodes/n1/status", b"{}") is False
    broker.start()
    assert link.wait_connected(10)
    link.stop()
    assert link.state is LinkState.CLOSED


def test_acl_keeps_a_node_to_its_own_topics(broker):
    seen: list[str] = []
    ctl = _link(broker.url("controller"), "ctl", subscriptions=[("edgeslim/#", 1)],
                on_message=lambda t, p: seen.append(t)).start(wait=5)  # fmt: skip
    node = _link(broker.url("node"), "n1").start(wait=5)
    node.publish(topic("status", "n2"), b'{"forged": true}')  # someone else's topic: dropped
    node.publish(topic("desired", "n1"), b"{}")  # only the controller may set desired states
    node.publish(topic("status", "n1"), b'{"own": true}')
    wait_until(lambda: topic("status", "n1") in seen, 5, what="the node's own status")
    time.sleep(0.3)
    assert topic("status", "n2") not in seen and topic("desired", "n1") not in seen
    node.stop()
    ctl.stop()


def test_link_reconnects_after_a_broker_crash_and_resets_backoff_on_connack(broker):
    connected = []
    lost = threading.Event()
    link = _link(broker.url("node"), "n1", on_connected=lambda: connected.append(time.time()),
                 on_lost=lost.set)  # fmt: skip
    link.start(wait=5)
    assert link.state is LinkState.CONNECTED and link.connects == 1
    broker.kill()
    assert lost.wait(5)
    wait_until(lambda: link.backoff.attempts >= 2, 10, what="failed reconnect attempts")
    assert link.state in (LinkState.BACKOFF, LinkState.CONNECTING)
    broker.start()
    assert link.wait_connected(10)
    assert link.connects == 2 and link.losses == 1 and len(connected) == 2
    assert link.backoff.attempts == 0  # reset by the CONNACK, not by the TCP connect
    link.stop()


def test_last_will_marks_a_killed_node_offline(broker):
    statuses: list[dict] = []
    ctl = _link(broker.url("controller"), "ctl", subscriptions=[("edgeslim/nodes/+/status", 1)],
                on_message=lambda t, p: statuses.append(json.loads(p))).start(wait=5)  # fmt: skip
    will = encode(Status(id="n9", state="offline"))
    code = textwrap.dedent(
        f"""
        import os, signal, time, json
        from edgeslim.fleet.link import MqttLink
        from edgeslim.fleet.protocol import BrokerURL
        link = MqttLink(BrokerURL.parse({broker.url("node")!r}), "n9",
                        will=("edgeslim/nodes/n9/status", {will!r}, 1, True)).start(wait=5)
        up = json.dumps({{"id": "n9", "state": "serving"}}).encode()
        link.publish("edgeslim/nodes/n9/status", up, retain=True)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    wait_until(lambda: [s["state"] for s in statuses][-1:] == ["offline"], 10, what="the will")
    assert [s["state"] for s in statuses] == ["serving", "offline"]
    ctl.stop()


def test_outbox_batches_fit_the_packet_size_the_broker_names(tmp_path):
    """A broker drops a client that sends a packet over its Maximum Packet Size: a backlog
    of 200-record batches over the limit was resent after every reconnect, forever. Batches
    now fit the limit the CONNACK names; a record that cannot fit alone is set aside."""
    from edgeslim.fleet.broker import Broker
    from edgeslim.fleet.controller import Controller
    from edgeslim.fleet.outbox import Forwarder, Outbox

    b = Broker({"controller": "c", "node": "n"}, workdir=tmp_path / "mq",
               options=["max_packet_size 65536"]).start()  # fmt: skip
    c = Controller(b.url("controller"), tmp_path / "ctl", backoff=Backoff(initial=0.1, cap=0.5))
    box = Outbox(tmp_path / "outbox.db")
    result = {"outputs": [{"name": "logits", "shape": [1, 10], "data": [0.123456789] * 10}]}
    for i in range(400):  # ~300 bytes each: 200 of them make a 60+ kB batch
        box.put("result", {**result, "i": i})
    box.put("event", {"blob": "x" * 100_000})  # over the broker's limit even alone
    box.put("event", {"last": True})
    fw: Forwarder | None = None
    link = _link(b.url("node"), "n1", subscriptions=[(topic("ack", "n1"), 1)],
                 on_message=lambda t, p: fw.on_ack(json.loads(p)["ids"]),
                 on_connected=lambda: fw.on_connected())  # fmt: skip
    fw = Forwarder(box, "n1", topic("telemetry", "n1"), link.publish,
                   broker_limit=lambda: link.max_packet_size)  # fmt: skip
    try:
        c.start()
        fw.start()
        link.start(wait=5)
        assert link.max_packet_size == 65536
        wait_until(lambda: box.count() == 0, 20, 0.1, "the outbox to drain")
        assert len(c.registry.records(node="n1", kind="result")) == 400
        assert [r["body"] for r in c.registry.records(node="n1", kind="event")] == [{"last": True}]
        assert fw.set_aside_records == 1 and box.count_set_aside() == 1
        assert link.losses == 0 and link.connects == 1
    finally:
        fw.stop()
        link.stop()
        c.stop()
        b.close()


def test_a_live_result_over_the_packet_size_is_left_to_the_outbox(tmp_path):
    """Shared results go out twice: live on edgeslim/results/SHA/NODE and through the outbox. A live
    copy over the broker's Maximum Packet Size made the broker drop the node's link, once per
    large answer; it is now skipped, and the outbox (which fits its batches) sends it."""
    from edgeslim.bundle.signing import generate_keypair
    from edgeslim.fleet.broker import Broker
    from edgeslim.fleet.node import Node, NodeConfig
    from edgeslim.fleet.outbox import Forwarder, Outbox

    b = Broker({"controller": "c", "node": "n"}, workdir=tmp_path / "mq",
               options=["max_packet_size 65536"]).start()  # fmt: skip
    _, pub = generate_keypair(tmp_path / "keys")
    node = Node(NodeConfig(node_id="n1", broker=b.url("node"), public_key=pub,
                           data_dir=tmp_path / "node", controller="http://127.0.0.1:1",
                           measure_reference=False, share_results=True))  # fmt: skip
    node.outbox = Outbox(tmp_path / "outbox.db")
    live: list[bytes] = []
    node.link = link = _link(b.url("node"), "n1",
                             subscriptions=[(topic("results", "c" * 64, "n1"), 0)],
                             on_message=lambda t, p: live.append(p))  # fmt: skip
    node.forwarder = Forwarder(node.outbox, "n1", topic("telemetry", "n1"), link.publish,
                               broker_limit=lambda: link.max_packet_size)  # fmt: skip
    loop = threading.Thread(target=node._results_loop, daemon=True)
    try:
        link.start(wait=5)
        loop.start()
        small = json.dumps({"id": "s", "outputs": [{"name": "y", "data": [1.0]}]}).encode()
        big = json.dumps({"id": "b", "outputs": [{"name": "y", "data": [0.5] * 20_000}]})
        node._on_result("c" * 64, big.encode())
        node._on_result("c" * 64, small)
        wait_until(lambda: node.outbox.count() == 2, 10, 0.05, "both results stored")
        wait_until(lambda: len(live) == 1, 10, 0.05, "the small result live")
        assert json.loads(live[0])["request_id"] == "s"
        assert link.losses == 0 and link.connects == 1
    finally:
        node._stop.set()
        node._drained.set()  # what stop() says once the server has stopped: the loop ends
        loop.join(5)
        link.stop()
        b.close()


class _SlowUplink:
    """A TCP proxy to the broker whose client -> broker direction carries ``rate`` bytes/s
    (a constrained uplink); the other direction is not slowed."""

    def __init__(self, host: str, port: int, rate: float) -> None:
        import asyncio

        self.rate = rate
        self.loop = asyncio.new_event_loop()
        self.up_bytes = 0

        async def pipe(reader, writer, slow):
            try:
                while data := await reader.read(1024 if slow else 65536):
                    if slow:
                        self.up_bytes += len(data)
                        await asyncio.sleep(len(data) / self.rate)
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()

        async def handle(client_r, client_w):
            broker_r, broker_w = await asyncio.open_connection(host, port)
            await asyncio.gather(pipe(client_r, broker_w, True), pipe(broker_r, client_w, False))

        self.server = self.loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        import asyncio

        async def shutdown():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def test_a_batch_still_going_out_on_a_slow_uplink_is_not_sent_again(broker, controller,
                                                                      tmp_path):
    """The ack timeout ran from the hand-over to paho: a batch that takes longer than that to
    upload was queued again and again behind itself, and the uplink carried duplicates. It
    now runs from the broker's PUBACK."""
    from edgeslim.fleet.outbox import Forwarder, Outbox

    proxy = _SlowUplink(broker.host, broker.port, rate=15_000)
    box = Outbox(tmp_path / "outbox.db")
    box.put_many([("event", {"pad": "x" * 400, "i": i}) for i in range(180)])  # ~80 kB
    fw: Forwarder | None = None
    url = broker.url("node").replace(f":{broker.port}", f":{proxy.port}")
    link = _link(url, "n1", subscriptions=[(topic("ack", "n1"), 1)],
                 on_message=lambda t, p: fw.on_ack(json.loads(p)["ids"]),
                 on_connected=lambda: fw.on_connected())  # fmt: skip
    fw = Forwarder(box, "n1", topic("telemetry", "n1"), link.publish_tracked, ack_timeout=1.5)
    try:
        link.start(wait=5)
        fw.start()
        wait_until(lambda: box.count() == 0, 30, 0.1, "the outbox to drain")
        assert len(controller.registry.records(node="n1")) == 180
        assert fw.sent_batches == 1 and fw.resent_batches == 0
        assert controller.registry.counter("duplicate_records") == 0
        assert proxy.up_bytes < 1.5 * 80_000  # one copy went up, not several
    finally:
        fw.stop()
        link.stop()
        proxy.close()


def test_a_link_is_connected_only_once_the_broker_has_its_subscriptions(broker):
    """MQTT delivers a message only to subscriptions that exist when it arrives. The link
    said CONNECTED at the CONNACK, before its SUBSCRIBE had reached the broker: a message
    published right after ``start(wait=...)`` returned could be lost (seen in CI). Here the
    SUBSCRIBE crawls over a slow uplink, so that window is wide."""
    ctl = _link(broker.url("controller"), "ctl").start(wait=5)
    proxy = _SlowUplink(broker.host, broker.port, rate=100)  # a ~30-byte SUBSCRIBE: ~0.3 s
    url = broker.url("node").replace(f":{broker.port}", f":{proxy.port}")
    seen: list[bytes] = []
    link = _link(url, "n1", subscriptions=[(topic("ack", "n1"), 1)],
                 on_message=lambda t, p: seen.append(p))  # fmt: skip
    try:
        link.start(wait=10)
        assert link.state is LinkState.CONNECTED
        assert ctl.publish(topic("ack", "n1"), b'{"ids": [1]}')
        wait_until(lambda: seen, 5, what="the message published once the link was up")
        assert seen == [b'{"ids": [1]}']
    finally:
        link.stop()
        ctl.stop()
        proxy.close()
