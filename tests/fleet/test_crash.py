"""A node killed -9 in the middle of an install serves its previous model at once on restart,
then resumes the download where it stopped (HTTP Range) and finishes the install."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from edgeslim.fleet.broker import free_port
from edgeslim.fleet.demo import spawn_node, stop_process, wait_until
from edgeslim.fleet.rollout import RolloutParams
from tests.fleet.conftest import needs_broker
from tests.fleet.helpers import NAME, infer_body, make_bundle

pytestmark = [needs_broker, pytest.mark.slow]

RATE = 200_000  # bytes/s: a 600 kB bundle takes 3 s to download


def _upload(controller, path):
    r = httpx.post(f"{controller.url}/bundles", content=path.read_bytes())
    assert r.status_code == 201, r.text
    return r.json()["sha256"]


def _first_answer(url: str, timeout: float) -> tuple[float, int, str]:
    """Poll until the port accepts; return (seconds, ready status, model version) of the
    very first exchange after it does."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            ready = httpx.get(f"{url}/v2/health/ready", timeout=5)
        except httpx.TransportError:
            time.sleep(0.02)
            continue
        r = httpx.post(f"{url}/v2/models/{NAME}/infer", json=infer_body(1), timeout=5)
        version = r.json().get("model_version") if r.status_code == 200 else f"HTTP {r.status_code}"
        return time.monotonic() - t0, ready.status_code, str(version)
    raise TimeoutError(f"{url} never answered")


def test_kill_9_mid_install_serves_the_previous_model_then_resumes(
    broker, controller, tmp_path, keys, bundles
):
    big = make_bundle(tmp_path / "v2-big.eslim", keys[0], seed=2, version="2", pad_bytes=600_000)
    s1, s2 = _upload(controller, bundles["v1"]), _upload(controller, big)
    port = free_port()
    data = tmp_path / "edge-1"

    def spawn():
        return spawn_node(
            "edge-1", broker=broker.url("node"), controller=controller.url, data=data,
            public_key=keys[1], port=port, log=tmp_path / "node.log",
            extra=["--max-download-rate", str(RATE), "--heartbeat", "0.5", "--telemetry", "0.5",
                   "--no-measure"],
        )  # fmt: skip

    proc = spawn()
    try:
        wait_until(lambda: controller.online_nodes(), 60, what="the node to join")
        dep = controller.deploy(s1, params=RolloutParams(canary=0.0, soak_s=0))
        assert controller.wait_deployment(dep, 60) == "succeeded"
        assert (data / "current").exists()

        dep2 = controller.deploy(s2, params=RolloutParams(canary=0.0, soak_s=0,
                                                          install_timeout_s=120))  # fmt: skip
        part = data / "downloads" / f"{s2}.part"
        wait_until(lambda: part.exists() and part.stat().st_size > 100_000, 30, 0.02,
                   "the download to be under way")  # fmt: skip
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        cut = part.stat().st_size
        assert 0 < cut < big.stat().st_size

        proc = spawn()
        seconds, ready, version = _first_answer(f"http://127.0.0.1:{port}", 60)
        assert ready == 200 and version == "1"  # the last good model, from the first answer on
        assert controller.wait_deployment(dep2, 60) == "succeeded"
        ranges = [r for sha, r in controller.downloads if sha == s2]
        assert ranges[0] is None and ranges[-1] is not None  # first from 0, then resumed
        resumed_at = int(ranges[-1].removeprefix("bytes=").rstrip("-"))
        assert resumed_at >= cut * 0.9  # not restarted from zero
        r = httpx.post(f"http://127.0.0.1:{port}/v2/models/{NAME}/infer", json=infer_body(1))
        assert r.json()["model_version"] == "2"
        print(
            f"restart to first answer: {seconds:.2f} s; cut at {cut} B, resumed at {resumed_at} B"
        )
    finally:
        stop_process(proc)
