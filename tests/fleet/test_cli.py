"""The fleet verbs end to end: a controller process, deploy/status/rollback, the demo."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from edgeslim.cli import main
from edgeslim.fleet.broker import free_port
from edgeslim.fleet.demo import wait_until
from edgeslim.fleet.node import Node
from tests.fleet.conftest import needs_broker, node_config

pytestmark = needs_broker


@pytest.fixture
def controller_proc(broker, tmp_path, keys):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeslim.cli", "fleet", "controller", "--broker",
         broker.url("controller"), "--http-port", str(port), "--data", str(tmp_path / "ctl"),
         "--public-key", str(keys[1]), "--offline-after", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(f"{url}/healthz").json()["broker"] == "connected"
        except httpx.HTTPError:
            return False

    wait_until(up, 30, what="the controller process")
    yield url, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.slow
def test_deploy_status_rollback_through_the_cli(broker, controller_proc, tmp_path, keys, bundles,
                                                capsys):  # fmt: skip
    url, proc = controller_proc

    class Ctl:  # node_config wants an object with .url
        pass

    ctl = Ctl()
    ctl.url = url
    node = Node(node_config(broker, ctl, tmp_path, keys, "edge-1", labels={"site": "lab"})).start()
    try:
        wait_until(lambda: httpx.get(f"{url}/nodes").json(), 20, what="the node to register")
        fast = ["--controller", url, "--canary", "0.5", "--soak", "0.5"]
        rc, out, _ = _run(capsys, "fleet", "deploy", str(bundles["v1"]), *fast, "--json")
        assert rc == 0 and json.loads(out)["state"] == "succeeded"
        rc, out, _ = _run(capsys, "fleet", "status", "--controller", url, "--json")
        (row,) = json.loads(out)
        assert row["id"] == "edge-1" and row["model_name"] == "digits-linear"
        assert row["model_version"] == "1" and row["health"] == "ok" and row["online"]
        assert row["labels"]["site"] == "lab" and {"cores", "memory_mb"} <= set(row["labels"])
        assert len(row["model_sha"]) == 64 and len(row["bundle_sha"]) == 64
        rc, out, _ = _run(capsys, "fleet", "status", "--controller", url)
        assert rc == 0 and "edge-1" in out and "digits-linear" in out and "ok" in out

        rc, _, err = _run(capsys, "fleet", "deploy", str(bundles["foreign"]), *fast)
        assert rc == 2 and "422" in err
        rc, out, _ = _run(capsys, "fleet", "deploy", str(bundles["probe"]), *fast)
        assert rc == 1 and "rolled_back" in out
        slow = ["--controller", url, "--canary", "0.5", "--soak", "2", "--timeout", "0.3"]
        rc, _, err = _run(capsys, "fleet", "deploy", str(bundles["v2"]), *slow)
        assert rc == 3 and "still" in err and "it goes on" in err  # not a bad input (2)
        wait_until(lambda: httpx.get(f"{url}/deployments/latest").json()["state"] == "succeeded",
                   30, what="the deployment to go on and succeed")
        assert node.model.version == "2"
        rc, out, _ = _run(capsys, "fleet", "rollback", "--controller", url)
        assert rc == 0 and "rolled_back" in out
        wait_until(lambda: node.model.version == "1", 10, what="the node back on v1")

        rc, _, err = _run(capsys, "fleet", "deploy", str(tmp_path / "nope.eslim"), *fast)
        assert rc == 2 and "nope.eslim" in err
        rc, _, err = _run(capsys, "fleet", "status", "--controller", "127.0.0.1:1")
        assert rc == 2 and "http(s) URL" in err
    finally:
        node.stop()
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert proc.wait(15) == 0 and time.monotonic() - t0 < 15


def test_operator_verbs_exit_5_when_the_controller_does_not_answer(capsys):
    for verb in (["status"], ["rollback"]):
        rc, _, err = _run(capsys, "fleet", *verb, "--controller", "http://127.0.0.1:9")
        assert rc == 5 and "Cannot reach the controller" in err


def test_node_verb_refuses_bad_options(tmp_path, keys, capsys):
    base = ["fleet", "node", "--id", "n1", "--data", str(tmp_path), "--controller",
            "http://127.0.0.1:1", "--public-key", str(keys[1])]  # fmt: skip
    rc, _, err = _run(capsys, *base, "--broker", "http://127.0.0.1:1883")
    assert rc == 2 and "mqtt://USER:PASS@HOST:PORT" in err
    rc, _, err = _run(capsys, *base[:2], "--id", "bad/id", *base[4:], "--broker", "mqtt://h")
    assert rc == 2 and "'id'" in err
    rc, _, err = _run(capsys, *base, "--broker", "mqtt://h", "--labels", "oops")
    assert rc == 2 and "key=value" in err
    rc, _, err = _run(capsys, *base, "--broker", "mqtt://h", "--log-level", "verbose")
    assert rc == 2 and "--log-level must be one of debug, info" in err and "'verbose'" in err


@pytest.mark.slow
def test_demo_runs_a_fleet_and_cleans_up(keys, bundles, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "edgeslim.cli", "fleet", "demo", "--bundle", str(bundles["v1"]),
         "--bundle", str(bundles["v2"]), "--key-dir", str(keys[1].parent)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "3 nodes joined" in out and "deploy v2" in out and "succeeded" in out
    assert ", 0 failed" in out
    assert out.count("digits-linear") >= 3 and "everything stopped" in out


def test_demo_without_mosquitto_says_how_to_install_it(monkeypatch, capsys):
    import edgeslim.fleet.broker as broker_mod

    monkeypatch.setattr(broker_mod.shutil, "which", lambda name: None)
    monkeypatch.setattr(broker_mod.os, "access", lambda path, mode: False)
    rc, _, err = _run(capsys, "fleet", "demo")
    assert rc != 0 and "apt-get install mosquitto" in err
