"""Staged rollouts against in-process nodes: success, manual rollback, automatic rollbacks."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from edgeslim.fleet.demo import TrafficClient, wait_until
from edgeslim.fleet.node import Node
from edgeslim.fleet.rollout import RolloutParams, WindowStats, judge, pick_canaries, window_stats
from tests.fleet.conftest import needs_broker, node_config
from tests.fleet.helpers import NAME, forward, infer_body, weights

FAST = dict(soak_s=0.5, install_timeout_s=30.0)


# ---------------------------------------------------------------------- pure functions
def test_canaries_are_a_stable_spread_fraction():
    nodes = [f"n{i}" for i in range(20)]
    c = pick_canaries(nodes, 0.1, "sha-a")
    assert len(c) == 2 and set(c) <= set(nodes)
    assert pick_canaries(list(reversed(nodes)), 0.1, "sha-a") == c  # order does not matter
    assert pick_canaries(nodes, 0.01, "x") and len(pick_canaries(nodes, 0.01, "x")) == 1
    assert pick_canaries(nodes, 0.0, "x") == [] and len(pick_canaries(nodes, 1.0, "x")) == 20
    spread = {tuple(pick_canaries(nodes, 0.1, f"sha-{i}")) for i in range(20)}
    assert len(spread) > 5  # different bundles pick different canaries


def test_judge_flags_error_rate_and_latency_regressions():
    p = RolloutParams(max_error_rate=0.01, max_p99_ratio=3.0, p99_slack_ms=5.0, min_requests=20)
    base = WindowStats(requests=1000, errors=1, p99_ms=2.0)
    assert judge(WindowStats(500, 1, 2.5), base, p) is None
    assert "error rate" in judge(WindowStats(500, 50, 2.0), base, p)
    assert "p99" in judge(WindowStats(500, 0, 7.5), base, p)  # > max(6, 7)
    assert judge(WindowStats(500, 0, 6.9), base, p) is None
    assert judge(WindowStats(10, 10, 99.0), base, p) is None  # too few requests to judge
    assert "error rate" in judge(WindowStats(100, 5, 1.0), None, p)  # no baseline: absolute
    agg = window_stats([{"requests": 10, "errors": 1, "p99_ms": 1.0},
                        {"requests": 30, "errors": 0, "p99_ms": 3.0}])  # fmt: skip
    assert agg == WindowStats(40, 1, 2.5)


# ---------------------------------------------------------------------- with a broker
@pytest.fixture
def fleet(broker, controller, tmp_path, keys):
    nodes = [Node(node_config(broker, controller, tmp_path, keys, f"node-{i}")).start()
             for i in range(3)]  # fmt: skip
    wait_until(lambda: len(controller.online_nodes()) == 3, 20, what="3 nodes online")
    yield nodes
    for n in nodes:
        n.stop()


def _upload(controller, path, force=False):
    with httpx.Client(base_url=controller.url) as c:
        r = c.post("/bundles", content=path.read_bytes(), params={"force": int(force)})
        assert r.status_code == 201, r.text
        return r.json()["sha256"]


def _deploy(controller, sha, **kw):
    dep = controller.deploy(sha, params=RolloutParams(**{**FAST, "canary": 0.34, **kw}))
    state = controller.wait_deployment(dep, 60)
    return dep, state, controller.registry.deployment(dep)


def _answer(node: Node) -> np.ndarray:
    r = httpx.post(f"{node.url}/v2/models/{NAME}/infer", json=infer_body(3, seed=9))
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(3, 10)


def _reference(seed: int) -> np.ndarray:
    x = np.asarray(infer_body(3, seed=9)["inputs"][0]["data"], np.float32).reshape(3, 64)
    return forward(weights(seed), x)


@needs_broker
def test_rollout_then_manual_rollback(controller, fleet, bundles):
    s1, s2 = _upload(controller, bundles["v1"]), _upload(controller, bundles["v2"])
    _dep1, state, row = _deploy(controller, s1)
    assert state == "succeeded", row.reason
    assert sorted(t.phase for t in row.targets) == ["canary", "canary", "rest"]
    for n in fleet:
        assert n.model.bundle == s1
        np.testing.assert_allclose(_answer(n), _reference(1), atol=1e-5)
    dep2, state, _ = _deploy(controller, s2)
    assert state == "succeeded"
    assert {n.model.bundle for n in fleet} == {s2}
    controller.rollback(dep2, "operator")
    assert controller.wait_deployment(dep2, 30) == "rolled_back"
    row = controller.registry.deployment(dep2)
    assert {t.state for t in row.targets} == {"reverted"}
    wait_until(lambda: {n.model.bundle for n in fleet} == {s1}, 10, what="everyone on v1")
    for n in fleet:
        np.testing.assert_allclose(_answer(n), _reference(1), atol=1e-5)
    # The registry shows what each node serves (from its status heartbeats).
    wait_until(lambda: {r.bundle_sha for r in controller.registry.nodes()} == {s1}, 10)


@needs_broker
@pytest.mark.parametrize("role", ["foreign", "probe", "corrupt"])
def test_a_bad_bundle_never_gets_past_the_canaries(controller, fleet, bundles, role):
    s1 = _upload(controller, bundles["v1"])
    assert _deploy(controller, s1)[1] == "succeeded"
    if role == "corrupt":  # stored fine, then damaged on the controller's disk
        bad = _upload(controller, bundles["v2"])
        path = controller.bundle_path(bad)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        bad = _upload(controller, bundles[role], force=True)
    _dep, state, row = _deploy(controller, bad, force=True)
    assert state == "rolled_back", row.reason
    expected = {"foreign": "Signature", "probe": "Probe output", "corrupt": "hashes to"}[role]
    assert expected in row.reason
    canaries = {t.node for t in row.targets if t.phase == "canary"}
    rest = [t for t in row.targets if t.phase == "rest"]  # never sent: ended, not pending
    assert {t.state for t in rest} == {"skipped"}
    assert all(t.detail.startswith("never sent: ") for t in rest)
    assert {t.state for t in row.targets if t.phase == "canary"} <= {"rolled_back", "reverted"}
    if role != "corrupt":  # the canary that refused it marked it, so it never tries it again
        assert any(n.store.rejected(bad) is not None for n in fleet if n.id in canaries)
    for n in fleet:
        assert n.model.bundle == s1  # nobody stopped serving v1
        np.testing.assert_allclose(_answer(n), _reference(1), atol=1e-5)
        if n.id not in canaries:  # the rest never even downloaded it
            assert not n.store.has(bad) and n.store.resume_offset(bad) == 0
            assert n.store.rejected(bad) is None
        elif n.store.rejected(bad) is not None:  # refused: the file is gone too
            assert not n.store.has(bad)
        # (a second canary still fetching when the first refused is reverted before it
        # installs anything, so it has no reason to mark the bundle)


@needs_broker
@pytest.mark.slow
@pytest.mark.parametrize("role", ["slow", "fixed"])
def test_canary_regressions_under_traffic_roll_back(controller, fleet, bundles, role):
    """A canary whose p99 latency (slow) or error rate (fixed batch) regresses is reverted."""
    s1 = _upload(controller, bundles["v1"])
    assert _deploy(controller, s1)[1] == "succeeded"
    bad = _upload(controller, bundles["slower" if role == "slow" else role])
    traffic = TrafficClient([n.url for n in fleet], NAME, infer_body(1))
    traffic.start()
    try:
        _dep, state, row = _deploy(
            controller, bad, canary=0.34, soak_s=2.5, max_p99_ratio=3.0, p99_slack_ms=3.0
        )
    finally:
        traffic.stop()
    assert state == "rolled_back", row.reason
    assert ("p99 latency" if role == "slow" else "error rate") in row.reason
    rest = [t for t in row.targets if t.phase == "rest"]  # never sent: ended, not pending
    assert {t.state for t in rest} == {"skipped"}
    assert all(t.detail.startswith("never sent: ") for t in rest)
    wait_until(lambda: {n.model.bundle for n in fleet} == {s1}, 10, what="canaries reverted")
    if role == "slow":
        assert not traffic.failures


@needs_broker
def test_a_restart_rollback_is_what_the_broker_keeps_for_every_node(broker, tmp_path):
    """A controller restarted in the middle of a deployment rolls it back while it republishes
    every node's desired state (the broker may have lost them): the republish must never land
    the bundle the rollback undid. 1,000 canaries, each must end retained on its old bundle."""
    import json
    import threading
    import time

    from edgeslim.fleet.controller import Controller
    from edgeslim.fleet.link import MqttLink
    from edgeslim.fleet.protocol import BrokerURL
    from edgeslim.fleet.registry import Registry

    old, new = "a" * 64, "b" * 64
    reg = Registry(tmp_path / "ctl" / "registry.db")
    reg.add_bundle(old, "m", "1", 10, True, {})
    reg.add_bundle(new, "m", "2", 10, True, {})
    nodes = [f"n{i:04d}" for i in range(1000)]
    dep = reg.create_deployment(new, {}, 1.0, RolloutParams(install_timeout_s=1.0).to_dict(),
                                [(n, "canary", old) for n in nodes])
    reg.set_targets(dep, nodes, "installed")
    reg.set_deployment_state(dep, "soak")  # as a controller killed during the soak left it
    reg.close()
    c = Controller(broker.url("controller"), tmp_path / "ctl").start()
    try:
        assert c.wait_deployment(dep, 60) == "rolled_back"
        retained: dict[str, bytes] = {}
        lock = threading.Lock()

        def keep(name, payload):
            with lock:
                retained[name] = payload

        checker = MqttLink(BrokerURL.parse(broker.url("controller")), "checker",
                           subscriptions=[("edgeslim/nodes/+/desired", 1)],
                           on_message=keep).start(wait=5)
        try:
            wait_until(lambda: len(retained) == len(nodes), 30, 0.1, "every retained state")
            time.sleep(0.5)  # a late republish would arrive now
            with lock:
                wanted = {name: json.loads(payload)["sha256"] for name, payload in
                          retained.items()}
        finally:
            checker.stop()
        assert sorted(set(wanted.values())) == [old]
    finally:
        c.stop()
