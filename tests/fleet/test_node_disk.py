"""A node whose disk cannot hold a bundle: the real node process, broker, controller and HTTP.

A small filesystem needs root to mount; a file-size limit (RLIMIT_FSIZE) on the node's
process refuses a write past it as a full disk does (EFBIG; Python ignores SIGXFSZ), so it
stands in for one here.
"""

from __future__ import annotations

import resource
import subprocess
import sys

import httpx

from edgeslim.fleet.broker import free_port
from edgeslim.fleet.demo import stop_process, wait_until
from edgeslim.fleet.rollout import RolloutParams
from tests.fleet.conftest import needs_broker
from tests.fleet.helpers import NAME, infer_body, make_bundle

pytestmark = needs_broker

LIMIT = 1_000_000  # the largest file the node may write: its outbox stays far below it


def _upload(controller, path) -> str:
    return controller.add_bundle(path.read_bytes())["sha256"]


def _spawn_limited(broker, controller, data, keys, port, log) -> subprocess.Popen[bytes]:
    """``edgeslim fleet node`` whose files cannot grow past ``LIMIT`` bytes."""

    def limit() -> None:  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))

    cmd = [
        sys.executable, "-m", "edgeslim.cli", "fleet", "node", "--broker", broker.url("node"),
        "--id", "edge-d", "--port", str(port), "--data", str(data), "--public-key", str(keys[1]),
        "--controller", controller.url, "--heartbeat", "0.5", "--telemetry", "0.5",
        "--no-measure",
    ]  # fmt: skip
    with open(log, "ab") as out:  # a pipe would not be bound by the limit, but could fill up
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=limit,
                                start_new_session=True)  # fmt: skip


def test_a_bundle_that_fills_the_disk_fails_at_once_and_frees_the_disk(
    broker, controller, tmp_path, keys, bundles
):
    big = make_bundle(tmp_path / "big.eslim", keys[0], seed=11, version="11",
                      pad_bytes=3 * LIMIT)  # fmt: skip
    s1, sbig, s2 = (_upload(controller, p) for p in (bundles["v1"], big, bundles["v2"]))
    data, port = tmp_path / "edge-d", free_port()
    params = RolloutParams(canary=0.0, soak_s=0, install_timeout_s=60)
    proc = _spawn_limited(broker, controller, data, keys, port, tmp_path / "node.log")
    try:
        wait_until(lambda: controller.online_nodes(), 60, what="the node to join")
        assert controller.wait_deployment(controller.deploy(s1, params=params), 60) == "succeeded"

        dep = controller.deploy(sbig, params=params)
        assert controller.wait_deployment(dep, 60) == "rolled_back"
        reports = [r["body"] for r in controller.registry.records(kind="report")
                   if r["body"]["deployment"] == dep and not r["body"]["rollback"]]  # fmt: skip
        assert [r["outcome"] for r in reports] == ["failed"]
        # one attempt, not download_attempts of them, and the reason says what to do
        assert "disk filled up" in reports[0]["reason"], reports[0]["reason"]
        assert "failed 5 times" not in reports[0]["reason"]
        assert list((data / "downloads").iterdir()) == []  # the partial file is gone
        r = httpx.post(f"http://127.0.0.1:{port}/v2/models/{NAME}/infer", json=infer_body())
        assert r.status_code == 200 and r.json()["model_version"] == "1"  # still serving

        # the node goes on: the next bundle that fits installs
        assert controller.wait_deployment(controller.deploy(s2, params=params), 60) == "succeeded"
        r = httpx.post(f"http://127.0.0.1:{port}/v2/models/{NAME}/infer", json=infer_body())
        assert r.json()["model_version"] == "2"
    finally:
        stop_process(proc)
