"""The controller's bearer token: a real controller and real HTTP (httpx, FleetClient, CLI).

Open without it: ``/healthz`` and the bundle downloads (``GET``/``HEAD /bundles/SHA``, what
nodes fetch; bundles are signed and every node verifies them). Everything else needs it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from edgeslim.cli import main
from edgeslim.errors import ConfigError
from edgeslim.fleet.broker import free_port
from edgeslim.fleet.client import FleetClient
from edgeslim.fleet.demo import wait_until
from tests.fleet.conftest import needs_broker, sha_of

pytestmark = needs_broker

TOKEN = "s3cret-token"
ENV = "EDGESLIM_FLEET_TOKEN"


@pytest.fixture
def guarded(broker, tmp_path, keys):
    """An in-process controller that requires ``TOKEN``."""
    from edgeslim.fleet.backoff import Backoff
    from edgeslim.fleet.controller import Controller

    c = Controller(broker.url("controller"), tmp_path / "controller", public_key=keys[1],
                   offline_after=10.0, backoff=Backoff(initial=0.2, cap=1.0),
                   token=TOKEN).start()  # fmt: skip
    yield c
    c.stop()


PROTECTED = [
    ("POST", "/bundles"), ("GET", "/bundles"), ("GET", "/nodes"), ("POST", "/deployments"),
    ("GET", "/deployments"), ("GET", "/deployments/latest"), ("GET", "/deployments/1"),
    ("POST", "/deployments/latest/rollback"), ("GET", "/records"),
]


def test_every_endpoint_but_health_and_downloads_needs_the_token(guarded, bundles):
    data = bundles["v1"].read_bytes()
    with httpx.Client(base_url=guarded.url, timeout=10) as api:
        for method, path in PROTECTED:
            for headers, said in (({}, "missing bearer token"),
                                  ({"Authorization": "Bearer wrong"}, "invalid bearer token"),
                                  ({"Authorization": TOKEN}, "invalid bearer token")):
                r = api.request(method, path, headers=headers, content=data)
                assert r.status_code == 401, (method, path, r.status_code)
                assert said in r.json()["error"] and "Authorization: Bearer" in r.json()["error"]
                assert r.headers["www-authenticate"] == "Bearer"
        assert not guarded.registry.bundles()  # the refused upload stored nothing
        assert not list(guarded.bundles_dir.iterdir())
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = api.post("/bundles", content=data, headers=auth)
        assert r.status_code == 201, r.text
        sha = r.json()["sha256"]
        assert api.get("/bundles", headers=auth).json()[0]["sha256"] == sha
        for method, path in PROTECTED[2:]:
            assert api.request(method, path, headers=auth).status_code != 401, path
        # open: health, and the downloads nodes make (signed bundles, verified by each node)
        assert api.get("/healthz").json()["ok"] is True
        r = api.get(f"/bundles/{sha}")
        assert r.status_code == 200 and r.content == data
        assert api.head(f"/bundles/{sha}").status_code == 200
        assert api.get(f"/bundles/{sha}", headers={"Range": "bytes=10-"}).content == data[10:]


def test_the_client_sends_the_token_and_says_when_it_is_missing(guarded, bundles):
    with FleetClient(guarded.url, token=TOKEN) as fleet:
        assert fleet.upload(bundles["v1"])["sha256"] == sha_of(bundles["v1"])
        assert fleet.nodes() == [] and len(fleet.bundles()) == 1
    for token in (None, "wrong"):
        with FleetClient(guarded.url, token=token) as fleet:
            assert fleet.health()["ok"] is True  # open
            with pytest.raises(ConfigError, match=f"401.*bearer token.*{ENV}"):
                fleet.nodes()
    for bad in ("", "  ", "two\nlines", 42):
        with pytest.raises(ConfigError, match="'token' parameter of FleetClient"):
            FleetClient(guarded.url, token=bad)


def test_a_controller_refuses_an_empty_token(broker, tmp_path):
    from edgeslim.fleet.controller import Controller

    for bad in ("", "   ", "a\x1bb", 7):
        with pytest.raises(ConfigError, match="'token' parameter of Controller"):
            Controller(broker.url("controller"), tmp_path / "ctl", token=bad)


def test_operator_verbs_take_the_token_from_the_flag_or_the_environment(
    guarded, bundles, capsys, monkeypatch
):
    url = guarded.url
    monkeypatch.delenv(ENV, raising=False)
    assert main(["fleet", "status", "--controller", url]) == 2
    assert "401" in capsys.readouterr().err
    assert main(["fleet", "status", "--controller", url, "--token", TOKEN, "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"
    monkeypatch.setenv(ENV, TOKEN)
    assert main(["fleet", "status", "--controller", url, "--json"]) == 0
    assert main(["fleet", "deploy", str(bundles["v1"]), "--controller", url]) == 2
    assert "No online node" in capsys.readouterr().err  # past the token: no node to target
    assert main(["fleet", "rollback", "--controller", url]) == 2
    assert "no deployment to roll back" in capsys.readouterr().err
    monkeypatch.setenv(ENV, "")  # a secret that did not arrive is refused, not taken as none
    assert main(["fleet", "status", "--controller", url]) == 2
    assert f"--token (or {ENV}) is empty" in capsys.readouterr().err


def test_the_controller_verb_takes_its_token_from_the_environment(broker, tmp_path, capsys):
    port = free_port()
    argv = [sys.executable, "-m", "edgeslim.cli", "fleet", "controller", "--broker",
            broker.url("controller"), "--http-port", str(port), "--data", str(tmp_path / "ctl")]
    env = {**os.environ, ENV: ""}
    rc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert rc.returncode == 2 and f"--token (or {ENV}) is empty" in rc.stderr
    proc = subprocess.Popen(argv, env={**os.environ, ENV: TOKEN},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{url}/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 30, what="the controller process")
        assert httpx.get(f"{url}/nodes").status_code == 401
        ok = httpx.get(f"{url}/nodes", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json() == []
    finally:
        proc.terminate()
        proc.wait(15)


def test_every_server_and_client_takes_the_same_tokens(broker, tmp_path, keys, bundles):
    """The controller, FleetClient, the edge server and a node checked tokens four ways; a
    token with non-ASCII characters passed some (curl could send it, httpx and the node's
    offload relay could not). One check now, and the same middleware on every server."""
    from edgeslim.edge.server import EdgeServer
    from edgeslim.fleet.controller import Controller
    from edgeslim.fleet.node import NodeConfig

    cfg = dict(node_id="n1", broker=broker.url("node"), controller="http://h:1",
               data_dir=tmp_path / "n1", public_key=keys[1])  # fmt: skip
    for bad in ("", " ", "pässword", "a\x1bb", "two\nlines", 7):
        for func, make in (
            ("Controller", lambda t: Controller(broker.url("controller"), tmp_path / "c",
                                                token=t)),
            ("FleetClient", lambda t: FleetClient("http://h:1", token=t)),
            ("EdgeServer", lambda t: EdgeServer([bundles["v1"]], token=t)),
            ("fleet node", lambda t: NodeConfig(**cfg, token=t).validate()),
        ):  # fmt: skip
            with pytest.raises(ConfigError, match=f"'token' parameter of {func} must be a "
                                                  "non-empty string of printable ASCII"):
                make(bad)


def test_a_token_with_a_space_at_either_end_is_refused_where_it_is_given(
    guarded, broker, tmp_path, keys, bundles, capsys, monkeypatch
):
    """'tok ' was taken, but httpx cannot send 'Bearer tok ' (an illegal header value): every
    call failed as if the controller were down (UnreachableError, exit 5)."""
    from edgeslim.edge.server import EdgeServer
    from edgeslim.fleet.controller import Controller
    from edgeslim.fleet.node import NodeConfig

    cfg = dict(node_id="n1", broker=broker.url("node"), controller="http://h:1",
               data_dir=tmp_path / "n1", public_key=keys[1])  # fmt: skip
    monkeypatch.delenv(ENV, raising=False)
    for bad in ("tok ", " tok", "tok\t", "\ttok"):
        for func, make in (
            ("Controller", lambda t: Controller(broker.url("controller"), tmp_path / "c",
                                                token=t)),
            ("FleetClient", lambda t: FleetClient(guarded.url, token=t)),
            ("EdgeServer", lambda t: EdgeServer([bundles["v1"]], token=t)),
            ("fleet node", lambda t: NodeConfig(**cfg, token=t).validate()),
        ):  # fmt: skip
            with pytest.raises(ConfigError, match=f"'token' parameter of {func}.*no space at "
                                                  "either end"):
                make(bad)
        assert main(["fleet", "status", "--controller", guarded.url, "--token", bad]) == 2
        assert f"--token (or {ENV}) must be printable ASCII characters with no space at " \
               "either end" in capsys.readouterr().err
    # a space inside is a legal header value: sent, and refused as the wrong token
    with FleetClient(guarded.url, token="a b") as fleet, pytest.raises(ConfigError,
                                                                       match="401"):
        fleet.nodes()


def test_a_request_httpx_refuses_to_send_is_a_config_error_that_shows_no_secret(guarded):
    """httpx's LocalProtocolError (refused before sending) was reported as an unreachable
    controller, quoting the header, token included."""
    with FleetClient(guarded.url, token=TOKEN) as fleet:
        fleet._http.headers["Authorization"] = f"Bearer {TOKEN}\x00"  # past every check
        with pytest.raises(ConfigError, match="httpx refused the request") as info:
            fleet.nodes()
    assert TOKEN not in str(info.value)
