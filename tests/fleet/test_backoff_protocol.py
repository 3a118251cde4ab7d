"""Backoff envelope and jitter; protocol messages, topics, URLs and labels."""

from __future__ import annotations

import random
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeslim.errors import ConfigError
from edgeslim.fleet.backoff import Backoff, wait_or_stop
from edgeslim.fleet.protocol import (
    Ack,
    Batch,
    BrokerURL,
    Desired,
    ModelRef,
    ProtocolError,
    Record,
    Status,
    decode,
    encode,
    node_from_topic,
    parse_labels,
    result_from_topic,
    topic,
)

SHA_A = "a" * 64
SHA_B = "b" * 64


@settings(max_examples=200, deadline=None)
@given(
    initial=st.floats(0.01, 5.0),
    ratio=st.floats(1.0, 100.0),
    factor=st.floats(1.0, 4.0),
    attempts=st.integers(1, 80),
    seed=st.integers(0, 2**31),
)
def test_backoff_delays_stay_in_the_jittered_envelope(initial, ratio, factor, attempts, seed):
    cap = initial * ratio
    b = Backoff(initial=initial, cap=cap, factor=factor, rng=random.Random(seed))
    for n in range(attempts):
        env = min(cap, initial * factor**n)
        d = b.next_delay()
        assert env / 2 - 1e-9 <= d <= env + 1e-9
        assert d <= cap + 1e-9
    assert b.attempts == attempts
    b.reset()
    assert b.attempts == 0
    assert b.next_delay() <= initial + 1e-9


def test_backoff_without_jitter_doubles_then_caps():
    b = Backoff(initial=0.5, cap=4.0, jitter=False)
    assert [b.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    # A huge attempt count must not overflow.
    b.attempts = 10_000
    assert b.next_delay() == 4.0


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"initial": 0}, "'initial'"),
        ({"cap": -1}, "'cap'"),
        ({"initial": 2.0, "cap": 1.0}, "'cap' parameter of Backoff must be a float >= initial"),
        ({"factor": 0.5}, "'factor'"),
    ],
)
def test_backoff_rejects_bad_parameters(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        Backoff(**kwargs)


def test_wait_or_stop_returns_at_once_on_shutdown():
    stop = threading.Event()
    threading.Timer(0.05, stop.set).start()
    t0 = time.monotonic()
    assert wait_or_stop(stop, 30.0) is True
    assert time.monotonic() - t0 < 5.0
    assert wait_or_stop(threading.Event(), 0.01) is False


def test_messages_round_trip_through_json():
    model = ModelRef(name="m", version="2", sha256=SHA_A, bundle=SHA_B)
    s = Status(id="n-1", state="serving", health="ok", labels={"a": "b"}, model=model,
               http="http://127.0.0.1:1", queue=3, ts=1.5)  # fmt: skip
    assert Status.from_dict(decode(encode(s))) == s
    d = Desired(deployment=7, sha256=SHA_B, name="m", size=10, rollback=True, ts=2.0)
    assert Desired.from_dict(decode(encode(d))) == d
    r = Record(id="x", seq=3, kind="report", ts=1.0, body={"k": 1})
    b = Batch(node="n-1", records=[r])
    assert Batch.from_dict(decode(encode(b))) == b
    assert Ack.from_dict(decode(encode(Ack(ids=["x", "y"])))).ids == ["x", "y"]


@pytest.mark.parametrize(
    "payload, needle",
    [
        (b"\xff\xfe", "UTF-8 JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"id": "n/1", "state": "x"}', "'id'"),
        (b'{"id": "n1"}', "'state'"),
        (b'{"id": "n1", "state": "s", "model": {"name": "m", "sha256": "xyz", "bundle": "b"}}',
         "sha256"),
        (b'{"id": "n1", "state": "s", "labels": [1]}', "labels"),
        (b'{"id": "n1", "state": "s", "queue": -1000000}', r"'queue' must be in \[0, 2\*\*31\]"),
        (b'{"id": "n1", "state": "s", "queue": 100000000000000000000}', "'queue' must be in"),
        (b'{"id": "n1", "state": "s", "http": "ftp://10.0.0.2"}', "'http'"),
        (b'{"id": "n1", "state": "s", "http": "http://"}', "'http'"),
        (b'{"id": "n1", "state": "s", "heartbeat_s": -5}', "'heartbeat_s'"),
    ],
)  # fmt: skip
def test_bad_status_messages_are_refused_with_the_field_named(payload, needle):
    with pytest.raises((ProtocolError, ConfigError), match=needle):
        Status.from_dict(decode(payload))


@pytest.mark.parametrize(
    "payload, needle",
    [(b"[" * 100_000, "nested too deeply"), (b'{"n": ' + b"1" * 5000 + b"}", "cannot carry")],
)
def test_payloads_json_cannot_read_here_are_protocol_errors(payload, needle):
    with pytest.raises(ProtocolError, match=needle):
        decode(payload)


def test_peers_pick_no_liar_and_judge_freshness_by_the_peers_own_heartbeat():
    """A status that advertises a negative queue is refused (it won every pick); a peer that
    heartbeats every 60 s stays fresh between its beats, judged by its own interval."""
    from edgeslim.fleet.offload import Peers

    def status(node, **kw):
        doc = {"id": node, "state": "serving", "http": "http://127.0.0.1:8001",
               "model": {"name": "m", "version": "1", "sha256": SHA_A, "bundle": SHA_B}, **kw}
        return Status.from_dict(decode(encode(doc)))

    with pytest.raises(ProtocolError, match="'queue'"):
        status("liar", queue=-1000000)
    peers = Peers("me", max_age=30.0)
    peers.update("slow", status("slow", heartbeat_s=60.0))
    peers.update("quiet", status("quiet"))  # says nothing: this node's max_age applies
    for p in peers.all():
        p.seen -= 100.0  # a status 100 s old: within three 60 s beats, past 30 s
    assert peers.pick(SHA_A).id == "slow"
    assert peers.pick(SHA_A, exclude={"slow"}) is None


def test_records_need_a_known_kind_and_an_object_body():
    with pytest.raises(ProtocolError, match="Unknown record kind"):
        Record.from_dict({"id": "x", "seq": 1, "kind": "gossip", "ts": 1.0, "body": {}})
    with pytest.raises(ProtocolError, match="body"):
        Record.from_dict({"id": "x", "seq": 1, "kind": "event", "ts": 1.0, "body": [1]})
    with pytest.raises(ProtocolError, match="'seq'"):
        Record.from_dict({"id": "x", "seq": True, "kind": "event", "ts": 1.0, "body": {}})


def test_topics_and_their_parsing():
    assert topic("status", "n1") == "edgeslim/nodes/n1/status"
    assert topic("results", SHA_A, "n1") == f"edgeslim/results/{SHA_A}/n1"
    assert topic("results", SHA_A, "#") == f"edgeslim/results/{SHA_A}/#"
    assert node_from_topic("edgeslim/nodes/n1/telemetry") == ("n1", "telemetry")
    assert node_from_topic(f"edgeslim/results/{SHA_A}/n1") is None
    assert result_from_topic(f"edgeslim/results/{SHA_A}/n1") == (SHA_A, "n1")
    assert result_from_topic(f"edgeslim/results/{SHA_A}") is None  # names no sender
    assert result_from_topic("edgeslim/nodes/n1/status") is None
    with pytest.raises(ConfigError, match="'kind'"):
        topic("gossip", "n1")
    with pytest.raises(ConfigError, match="'node'"):
        topic("results", SHA_A)


def test_broker_url_parsing_decodes_and_redacts_the_password():
    u = BrokerURL.parse("mqtt://node:p%40ss%3Aw@127.0.0.1:1884")
    assert (u.host, u.port, u.username, u.password) == ("127.0.0.1", 1884, "node", "p@ss:w")
    assert "p@ss" not in str(u) and "p@ss" not in repr(u)
    assert BrokerURL.parse("mqtt://h").port == 1883
    with pytest.raises(ConfigError, match=r"mqtt://USER:PASS@HOST:PORT") as exc:
        BrokerURL.parse("http://u:secret@h:1")
    assert "secret" not in str(exc.value)


def test_labels_parse_and_refuse_malformed_pairs():
    assert parse_labels("device=pi4, site=lab,,") == {"device": "pi4", "site": "lab"}
    assert parse_labels("") == {}
    for bad in ("novalue", "a b=c", "k=v=w"):
        with pytest.raises(ConfigError, match="key=value"):
            parse_labels(bad)


def test_ids_shas_and_urls_with_a_trailing_newline_are_refused():
    """``$`` also matches before a final newline: every protocol pattern must match the whole
    value, or "edge-1\\n" becomes a node id (and a topic level holding a newline)."""
    from edgeslim.fleet.protocol import check_node_id, check_sha256

    assert check_node_id("edge-1") == "edge-1"
    assert check_sha256(SHA_A) == SHA_A
    for bad in ("edge-1\n", "edge-1\r\n", "\nedge-1"):
        with pytest.raises(ConfigError, match="'id'"):
            check_node_id(bad)
    with pytest.raises(ConfigError, match="sha256"):
        check_sha256(SHA_A + "\n")
    with pytest.raises(ConfigError, match="'id'"):
        Status.from_dict({"id": "n1\n", "state": "serving"})
    with pytest.raises(ProtocolError, match="'http'"):
        Status.from_dict({"id": "n1", "state": "s", "http": "http://127.0.0.1:8001\n"})
    with pytest.raises(ConfigError, match="sha256"):
        Desired.from_dict({"deployment": 1, "sha256": SHA_A + "\n"})


def test_a_slow_factor_keeps_growing_past_64_attempts_up_to_the_cap():
    b = Backoff(initial=1.0, cap=100.0, factor=1.05, jitter=False)
    delays = [b.next_delay() for _ in range(100)]
    assert delays[80] == pytest.approx(1.05**80)  # not stuck at 1.05**64
    assert delays[-1] == 100.0 or delays[-1] == pytest.approx(1.05**99)
    b.attempts = 10**9
    assert b.next_delay() == 100.0
