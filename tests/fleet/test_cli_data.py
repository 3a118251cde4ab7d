"""``fleet upload | bundles | deployments | records | health`` against a real controller: the
FleetClient calls that had no CLI verb (after ``deploy --no-wait`` nothing could follow it)."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from edgeslim.cli import main
from edgeslim.fleet.demo import wait_until
from edgeslim.fleet.node import Node
from tests.fleet.conftest import needs_broker, node_config, sha_of

pytestmark = needs_broker


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_what_the_controller_stores_is_listed_and_followed_from_the_cli(
    broker, controller, tmp_path, keys, bundles, capsys
):
    url = controller.url
    ctl = ["--controller", url]
    node = Node(node_config(broker, controller, tmp_path, keys, "edge-1")).start()
    try:
        wait_until(lambda: controller.online_nodes(), 20, what="the node to register")
        rc, out, _ = _run(capsys, "fleet", "health", *ctl)
        assert rc == 0 and "broker connected" in out
        rc, out, _ = _run(capsys, "fleet", "bundles", *ctl, "--json")
        assert rc == 0 and json.loads(out) == []

        rc, out, _ = _run(capsys, "fleet", "upload", str(bundles["v1"]), *ctl, "--json")
        assert rc == 0 and json.loads(out)["sha256"] == sha_of(bundles["v1"])
        rc, out, _ = _run(capsys, "fleet", "upload", str(bundles["v2"]), *ctl)
        assert rc == 0 and sha_of(bundles["v2"]) in out and "digits-linear" in out
        rc, _, err = _run(capsys, "fleet", "upload", str(bundles["foreign"]), *ctl)
        assert rc == 2 and "422" in err
        rc, out, _ = _run(capsys, "fleet", "bundles", *ctl, "--json")
        assert [b["version"] for b in json.loads(out)] == ["1", "2"]
        rc, out, _ = _run(capsys, "fleet", "bundles", *ctl)
        assert rc == 0 and sha_of(bundles["v1"]) in out and "yes" in out

        rc, out, _ = _run(capsys, "fleet", "deploy", sha_of(bundles["v1"]), *ctl, "--soak",
                          "0.2", "--no-wait", "--json")  # fmt: skip
        dep = json.loads(out)["id"]
        # what deploy --no-wait leaves to follow: wait for it, then show it
        rc, out, _ = _run(capsys, "fleet", "deployments", "latest", *ctl, "--wait", "--timeout",
                          "60", "--json")  # fmt: skip
        assert rc == 0 and json.loads(out)["id"] == dep
        assert json.loads(out)["state"] == "succeeded"
        rc, out, _ = _run(capsys, "fleet", "deployments", str(dep), *ctl)
        assert rc == 0 and f"deployment {dep}: succeeded" in out and "edge-1" in out
        rc, out, _ = _run(capsys, "fleet", "deployments", *ctl, "--json")
        assert [d["id"] for d in json.loads(out)] == [dep]
        rc, out, _ = _run(capsys, "fleet", "deployments", *ctl)
        assert rc == 0 and "succeeded" in out and "1/1" in out

        wait_until(lambda: controller.registry.records(kind="report"), 20, what="the report")
        rc, out, _ = _run(capsys, "fleet", "records", *ctl, "--node", "edge-1", "--kind",
                          "report", "--json")  # fmt: skip
        rows = json.loads(out)
        assert rc == 0 and rows and {r["kind"] for r in rows} == {"report"}
        assert {r["node"] for r in rows} == {"edge-1"}
        rc, out, _ = _run(capsys, "fleet", "records", *ctl, "--kind", "report")
        assert rc == 0 and "edge-1" in out and "report" in out and "outcome" in out, out
        rc, out, _ = _run(capsys, "fleet", "records", *ctl, "--since", "1e12", "--json")
        assert rc == 0 and json.loads(out) == []
    finally:
        node.stop()


def test_the_new_verbs_check_their_input_before_calling(controller, capsys):
    ctl = ["--controller", controller.url]
    for argv, said in (
        (["records", *ctl, "--kind", "bogus"], "--kind must be one of"),
        (["records", *ctl, "--since", "nan"], "--since"),
        (["deployments", *ctl, "--wait"], "--wait needs a DEPLOYMENT"),
        (["deployments", "0", *ctl], "DEPLOYMENT must be a deployment id"),
        (["deployments", "7", *ctl, "--wait", "--timeout", "-1"], "--timeout"),
        (["deployments", "7", *ctl], "404"),
        (["upload", "nope.eslim", *ctl], "nope.eslim"),
        (["bundles", "--controller", "http://h:99999"], "--controller"),
    ):  # fmt: skip
        rc, _, err = _run(capsys, "fleet", *argv)
        assert rc == 2 and said in err and "Traceback" not in err, (argv, err)
    rc, _, err = _run(capsys, "fleet", "bundles", "--controller", "http://127.0.0.1:9")
    assert rc == 5 and "Cannot reach the controller" in err


@pytest.fixture
def guarded(broker, tmp_path, keys):
    from edgeslim.fleet.controller import Controller

    c = Controller(broker.url("controller"), tmp_path / "g", public_key=keys[1],
                   token="tok-1").start()  # fmt: skip
    yield c
    c.stop()


def test_the_new_verbs_take_the_token(guarded, bundles, capsys, monkeypatch):
    ctl = ["--controller", guarded.url]
    monkeypatch.delenv("EDGESLIM_FLEET_TOKEN", raising=False)
    for verb in (["bundles"], ["deployments"], ["records"], ["upload", str(bundles["v1"])]):
        rc, _, err = _run(capsys, "fleet", *verb, *ctl)
        assert rc == 2 and "401" in err, (verb, err)
    assert _run(capsys, "fleet", "health", *ctl)[0] == 0  # open, as GET /healthz
    assert _run(capsys, "fleet", "upload", str(bundles["v1"]), *ctl, "--token", "tok-1")[0] == 0
    monkeypatch.setenv("EDGESLIM_FLEET_TOKEN", "tok-1")
    rc, out, _ = _run(capsys, "fleet", "bundles", *ctl, "--json")
    assert rc == 0 and len(json.loads(out)) == 1


@pytest.fixture
def healthz():
    """A stub of ``GET /healthz`` whose broker state the test sets (``state[0]``)."""
    state = ["connected"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"ok": True, "broker": state[0], "time": 0}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def test_health_exits_1_when_the_broker_link_is_not_up_and_reads_no_token(
    healthz, capsys, monkeypatch
):
    url, state = healthz
    monkeypatch.delenv("EDGESLIM_FLEET_TOKEN", raising=False)
    rc, out, _ = _run(capsys, "fleet", "health", "--controller", url)
    assert rc == 0 and "ok, broker connected" in out
    state[0] = "backoff"
    rc, out, _ = _run(capsys, "fleet", "health", "--controller", url)
    assert rc == 1 and "answers, but its broker link is backoff" in out and ": ok" not in out
    rc, out, _ = _run(capsys, "fleet", "health", "--controller", url, "--json")
    assert rc == 1 and json.loads(out)["broker"] == "backoff"
    state[0] = "connected"
    for bad in ("", " tok "):  # GET /healthz needs no token: none is read, so none can fail
        monkeypatch.setenv("EDGESLIM_FLEET_TOKEN", bad)
        assert _run(capsys, "fleet", "health", "--controller", url)[0] == 0, repr(bad)
