"""FleetClient: what the operator verbs do, from Python, against a real controller and broker."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest

from edgeslim.errors import ConfigError, StillRunningError, UnreachableError
from edgeslim.fleet.client import FleetClient
from edgeslim.fleet.demo import wait_until
from edgeslim.fleet.node import Node
from edgeslim.fleet.rollout import RolloutParams
from tests.fleet.conftest import needs_broker, node_config, sha_of

DEAD = "http://127.0.0.1:9"  # nothing listens there: a request would be UnreachableError


@needs_broker
def test_deploy_wait_status_and_rollback_through_the_client(broker, controller, tmp_path, keys,
                                                            bundles):  # fmt: skip
    node = Node(node_config(broker, controller, tmp_path, keys, "edge-1",
                            labels={"site": "lab"})).start()  # fmt: skip
    try:
        with FleetClient(controller.url, timeout=10) as fleet:
            assert fleet.health()["broker"] == "connected"
            wait_until(lambda: fleet.nodes(), 20, what="the node to register")
            fast = {"canary": 0.5, "soak_s": 0.5}
            row = fleet.deploy(bundles["v1"], {"site": "lab"}, **fast)
            done = fleet.wait(row["id"], timeout=60)
            assert done["id"] == row["id"] and done["state"] == "succeeded", done
            assert [t["node"] for t in done["targets"]] == ["edge-1"]
            assert node.model is not None and node.model.version == "1"
            (status,) = fleet.nodes()
            assert status["id"] == "edge-1" and status["model_version"] == "1"
            assert status["labels"]["site"] == "lab" and status["health"] == "ok"

            # by sha256 of a bundle uploaded (as bytes) first
            info = fleet.upload(bundles["v2"].read_bytes())
            assert info["sha256"] == sha_of(bundles["v2"]) and info["verified"] is True
            assert {b["sha256"] for b in fleet.bundles()} == {sha_of(bundles["v1"]),
                                                             info["sha256"]}  # fmt: skip
            dep = fleet.deploy(info["sha256"], "site=lab", **fast)["id"]
            assert fleet.wait(dep, timeout=60)["state"] == "succeeded"
            assert fleet.deployment()["id"] == dep == fleet.deployments()[0]["id"]  # newest first
            assert node.model.version == "2"
            reports = fleet.records(node="edge-1", kind="report")
            assert reports and {r["kind"] for r in reports} == {"report"}

            asked = fleet.rollback()
            assert asked["id"] == dep
            assert fleet.wait(dep, timeout=30)["state"] == "rolled_back"
            wait_until(lambda: node.model.version == "1", 10, what="the node back on v1")
    finally:
        node.stop()


@needs_broker
def test_the_python_example_of_docs_fleet_md_runs(broker, controller, tmp_path, keys, bundles,
                                                  capsys):  # fmt: skip
    text = (Path(__file__).resolve().parents[2] / "docs" / "fleet.md").read_text()
    code = text.split("### Python\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "http://127.0.0.1:8700" in code and '"model.eslim"' in code
    code = code.replace("http://127.0.0.1:8700", controller.url)
    code = code.replace('"model.eslim"', repr(str(bundles["v1"])))
    node = Node(node_config(broker, controller, tmp_path, keys, "edge-1",
                            labels={"site": "lab", "tier": "a"})).start()  # fmt: skip
    try:
        wait_until(controller.online_nodes, 20, what="the node to register")
        exec(compile(code, "docs/fleet.md", "exec"), {})
    finally:
        node.stop()
    assert capsys.readouterr().out == "succeeded [('edge-1', '1')]\n"
    (dep,) = controller.registry.deployments()
    assert dep.state == "rolled_back"


def _soaking(controller) -> int:
    """A deployment that stays in its soak until something rolls it back."""
    dep = controller.registry.create_deployment("0" * 64, {}, 0.1, RolloutParams().to_dict(), [])
    controller.registry.set_deployment_state(dep, "soak", "watching canaries for 10 s")
    return dep


@needs_broker
def test_wait_runs_out_on_a_running_deployment_and_rollback_ends_it(controller):
    dep = _soaking(controller)
    with FleetClient(controller.url) as fleet:
        with pytest.raises(StillRunningError, match=f"Deployment {dep} is still soak after 0.2 s; "
                                                    "it goes on"):  # fmt: skip
            fleet.wait(dep, timeout=0.2)
        assert fleet.deployment(dep)["state"] == "soak"  # the wait changed nothing
        assert fleet.rollback(dep)["id"] == dep
        assert fleet.wait(dep, timeout=20)["state"] == "rolled_back"
        with pytest.raises(ConfigError, match="The controller answered 404: No deployment 99"):
            fleet.deployment(99)


@needs_broker
def test_bad_rollout_params_are_refused_before_anything_is_uploaded(controller, bundles):
    bad = [
        ({"canary": 1.5}, "'canary' parameter of deploy"),
        ({"soak_s": float("nan")}, "'soak_s'"),
        ({"max_p99_ratio": 0}, "'max_p99_ratio'"),
        ({"parallel": 0}, "'parallel'"),
        ({"colour": "red"}, r"Unknown rollout parameters \['colour'\]"),
        ({"force": "yes"}, "'force'"),
    ]
    with FleetClient(controller.url) as fleet:
        for params, match in bad:
            with pytest.raises(ConfigError, match=match):
                fleet.deploy(bundles["v1"], **params)
        with pytest.raises(ConfigError, match="'selector' parameter of deploy"):
            fleet.deploy(bundles["v1"], selector=["site", "lab"])
        with pytest.raises(ConfigError, match="key=value"):
            fleet.deploy(bundles["v1"], selector="oops")
        assert fleet.bundles() == []
    assert controller.registry.bundles() == [] and controller.registry.deployments() == []
    assert not list(controller.bundles_dir.iterdir())


@needs_broker
def test_requests_the_controller_refuses_are_config_errors_quoting_it(controller, bundles):
    with FleetClient(controller.url) as fleet:
        with pytest.raises(ConfigError, match="answered 422"):
            fleet.upload(bundles["foreign"])
        assert fleet.upload(bundles["foreign"], force=True)["verified"] is False
        with pytest.raises(ConfigError, match=r"answered 404.*upload it first"):
            fleet.deploy("0" * 64)


def test_an_unreachable_controller_raises_unreachable_error(bundles):
    with FleetClient(DEAD, timeout=5) as fleet:
        calls = [fleet.health, fleet.nodes, fleet.bundles, fleet.deployments, fleet.deployment,
                 fleet.records, fleet.rollback, fleet.wait,
                 lambda: fleet.deploy(bundles["v1"]), lambda: fleet.upload(b"PK")]  # fmt: skip
        for call in calls:
            with pytest.raises(UnreachableError, match=f"Cannot reach the controller at {DEAD}"):
                call()


def test_a_malformed_url_is_refused_naming_it():
    for url in ("http://127.0.0.1:abc", "http://[::1", "http://127.0.0.1:99999", "http://",
                "http://xn--", "http://h:1/?q=1"):  # fmt: skip
        with pytest.raises(ConfigError) as err:
            FleetClient(url)
        msg = str(err.value)
        assert msg.startswith(f"url {url!r} is not a valid URL"), msg
        assert "--controller" not in msg
    for url in ("127.0.0.1:8700", "ftp://h", None):
        with pytest.raises(ConfigError, match=r"url must be an http\(s\) URL"):
            FleetClient(url)
    with pytest.raises(ConfigError, match="'timeout' parameter of FleetClient"):
        FleetClient(DEAD, timeout=float("nan"))


def test_bad_arguments_are_refused_before_any_request(tmp_path):
    """The controller does not answer: a request would be UnreachableError, not ConfigError."""
    with FleetClient(DEAD) as fleet:
        for ref in (0, -3, True, "0", "../nodes", "1; drop", 1.5):
            for call in (fleet.rollback, fleet.deployment, fleet.wait):
                with pytest.raises(ConfigError, match="deployment must be a deployment id"):
                    call(ref)
        for timeout in (0, -1, float("nan"), float("inf")):
            with pytest.raises(ConfigError, match="'timeout' parameter of wait"):
                fleet.wait(1, timeout=timeout)
        with pytest.raises(ConfigError, match=r"nope\.eslim' instead, which is not a file"):
            fleet.deploy(tmp_path / "nope.eslim")
        with pytest.raises(ConfigError, match="'bundle' parameter of upload"):
            fleet.upload("f" * 64)  # a sha256 is no upload
        with pytest.raises(ConfigError, match="'bundle' parameter of deploy"):
            fleet.deploy(42)
        with pytest.raises(ConfigError, match="'since' parameter of records"):
            fleet.records(since=float("nan"))
        with pytest.raises(ConfigError, match="'kind' parameter of records"):
            fleet.records(kind="telemetree")


@pytest.fixture
def impostor():
    """A plain HTTP server, not a controller: ``answers`` maps a path to (body, content type);
    other paths answer a JSON list of numbers."""
    answers: dict[str, tuple[bytes, str]] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            body, ctype = answers.get(self.path.split("?")[0], (b"[1, 2]", "application/json"))
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._answer()

        do_GET = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", answers
    server.shutdown()
    server.server_close()


def test_a_server_that_is_not_a_controller_gives_config_error(impostor, bundles):
    url, answers = impostor
    answers["/nodes"] = (b"<html>hello</html>", "text/html")
    answers["/healthz"] = (json.dumps({"status": "up"}).encode(), "application/json")
    answers["/bundles"] = (json.dumps({"sha256": "0" * 64}).encode(), "application/json")
    with FleetClient(url) as fleet:
        with pytest.raises(ConfigError, match=f"{url} is not an edgeslim controller: GET /nodes "
                                              "answered something that is not JSON"):  # fmt: skip
            fleet.nodes()
        with pytest.raises(ConfigError, match="GET /healthz answered JSON of another shape"):
            fleet.health()
        with pytest.raises(ConfigError, match="GET /deployments/latest answered JSON of another"):
            fleet.deployment()
        # the upload "succeeds"; the deployment's answer ([1, 2]) gives the impostor away
        with pytest.raises(ConfigError, match="POST /deployments answered JSON of another shape"):
            fleet.deploy(bundles["v1"])
        with pytest.raises(ConfigError, match="POST /deployments/latest/rollback answered"):
            fleet.rollback()


def test_wait_latest_follows_the_deployment_latest_named_first(monkeypatch):
    """Deployment 7 is the latest when ``wait`` starts; 8 starts (and ends) before the next
    poll: ``wait('latest')`` follows 7 to its end, not 8."""
    import edgeslim.fleet.client as client_mod

    monkeypatch.setattr(client_mod, "POLL_S", 0.01)
    polls: list[str] = []

    def row(i: int, state: str) -> dict:
        return {"id": i, "state": state, "reason": "", "targets": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            polls.append(self.path)
            if self.path == "/deployments/latest":
                doc = row(7, "canary") if len(polls) == 1 else row(8, "succeeded")
            else:
                doc = row(7, "canary") if len(polls) < 4 else row(7, "rolled_back")
            body = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with FleetClient(f"http://127.0.0.1:{server.server_address[1]}") as fleet:
            done = fleet.wait("latest", timeout=10)
    finally:
        server.shutdown()
        server.server_close()
    assert done["id"] == 7 and done["state"] == "rolled_back", done
    assert polls == ["/deployments/latest"] + ["/deployments/7"] * 3


def test_the_token_is_sent_as_the_servers_compare_it():
    """``FleetClient(token=...)`` sends the header value ``BearerAuth`` expects (``bearer``)."""
    from edgeslim.edge.auth import authorized, bearer

    with FleetClient(DEAD, token="tok-1") as fleet:
        request = fleet._http.build_request("GET", "/nodes")
    headers = [(k.lower(), v) for k, v in request.headers.raw]
    assert authorized(headers, bearer("tok-1")) and not authorized(headers, bearer("tok-2"))
