"""Twenty node processes on this machine take a staged rollout under client load: every node
ends on the new bundle and not one inference request fails."""

from __future__ import annotations

import time

import httpx
import pytest

from edgeslim.fleet.broker import free_port
from edgeslim.fleet.demo import TrafficClient, spawn_node, stop_process, wait_until
from edgeslim.fleet.rollout import RolloutParams
from tests.fleet.conftest import needs_broker
from tests.fleet.helpers import NAME, infer_body

pytestmark = [needs_broker, pytest.mark.slow]

N = 20


def test_staged_rollout_to_20_node_processes_under_load(
    broker, controller, tmp_path, keys, bundles
):
    ports = [free_port() for _ in range(N)]
    t0 = time.monotonic()
    procs = [
        spawn_node(
            f"edge-{i:02d}", broker=broker.url("node"), controller=controller.url,
            data=tmp_path / f"edge-{i:02d}", public_key=keys[1], port=port,
            labels=f"rack={'a' if i < 10 else 'b'}", log=tmp_path / f"edge-{i:02d}.log",
            extra=["--heartbeat", "1", "--telemetry", "1"],
        )
        for i, port in enumerate(ports)
    ]  # fmt: skip
    traffic: list[TrafficClient] = []
    try:
        wait_until(lambda: len(controller.online_nodes()) == N, 120, 0.2, "20 nodes online")
        joined = time.monotonic() - t0
        with httpx.Client(base_url=controller.url) as c:
            s1, s2 = (c.post("/bundles", content=bundles[v].read_bytes()).json()["sha256"]
                      for v in ("v1", "v2"))  # fmt: skip
        params = RolloutParams(canary=0.1, soak_s=2.0, install_timeout_s=60.0)
        dep1 = controller.deploy(s1, params=params)
        assert controller.wait_deployment(dep1, 90) == "succeeded"

        urls = [f"http://127.0.0.1:{p}" for p in ports]
        traffic = [TrafficClient(urls[k::2], NAME, infer_body(1)) for k in range(2)]
        for t in traffic:
            t.start()
        time.sleep(1.0)
        t1 = time.monotonic()
        dep2 = controller.deploy(s2, params=params)
        assert controller.wait_deployment(dep2, 90) == "succeeded", controller.registry.deployment(
            dep2
        ).reason
        rollout_s = time.monotonic() - t1
        time.sleep(1.0)
        for t in traffic:
            t.stop()

        row = controller.registry.deployment(dep2)
        assert sum(t.phase == "canary" for t in row.targets) == 2
        assert {t.state for t in row.targets} == {"installed"}
        for url in urls:  # every node answers with v2, by its own V2 metadata
            meta = httpx.get(f"{url}/v2/models/{NAME}").json()
            assert meta["versions"] == ["2"]
        wait_until(lambda: {n.bundle_sha for n in controller.registry.nodes()} == {s2}, 10)
        failures = [f for t in traffic for f in t.failures]
        answered = sum(t.ok for t in traffic)
        by_version: dict[str, int] = {}
        for t in traffic:
            for v, n in t.versions.items():
                by_version[v] = by_version.get(v, 0) + n
        assert failures == [] and answered > 200
        assert by_version.get("1", 0) > 0 and by_version.get("2", 0) > 0
        print(
            f"{N} nodes joined in {joined:.1f} s; rollout (2 canaries, 2 s soak, 18 more) "
            f"{rollout_s:.1f} s; {answered} requests answered during it, 0 failed "
            f"({by_version})"
        )
    finally:
        for t in traffic:
            t.stop()
        for p in procs:
            stop_process(p)
