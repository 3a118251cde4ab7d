"""The fleet verbs end to end: a controller process, deploy/status/rollback, the demo."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
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


def _processes_naming(text: str) -> list[int]:
    """Pids of the processes whose command line names ``text`` (a demo's temp folder)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry))
    return pids


@pytest.mark.slow
def test_demo_interrupted_again_during_its_clean_up_still_stops_everything(keys, bundles,
                                                                          tmp_path):  # fmt: skip
    """Ctrl-C, then Ctrl-C again and again while the demo cleans up: the node process and
    Mosquitto (which a terminal's Ctrl-C does not reach) are stopped all the same, and the
    demo's temporary folder is removed."""
    tmp = tmp_path / "tmp"  # the demo's mkdtemp lands here: its processes name this folder
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeslim.cli", "fleet", "demo", "--nodes", "1",
         "--bundle", str(bundles["v1"]), "--bundle", str(bundles["v2"]),
         "--key-dir", str(keys[1].parent)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("nodes joined" in line for line in lines), 90, 0.05,
                   "the node to join")  # fmt: skip
        assert _processes_naming(str(tmp))  # the node and the broker run
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal(signal.SIGINT)  # the first stops the demo; the rest hit clean-up
            time.sleep(0.1)
        rc = proc.wait(10)
        reader.join(10)
        out = "".join(lines)
        # 130: interrupted; -SIGINT: one more Ctrl-C after the clean-up, as it exited
        assert rc in (130, -signal.SIGINT), out[-3000:]
        time.sleep(0.5)
        assert not _processes_naming(str(tmp)), out[-3000:]  # the node, mosquitto
        assert not list(tmp.glob("edgeslim-fleet-demo-*"))
        assert "everything stopped" in out, out[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for pid in _processes_naming(str(tmp)):  # what the demo left behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)


def test_demo_without_mosquitto_says_how_to_install_it(monkeypatch, capsys):
    import edgeslim.fleet.broker as broker_mod

    monkeypatch.setattr(broker_mod.shutil, "which", lambda name: None)
    monkeypatch.setattr(broker_mod.os, "access", lambda path, mode: False)
    rc, _, err = _run(capsys, "fleet", "demo")
    assert rc != 0 and "apt-get install mosquitto" in err


def test_demo_nodes_do_not_inherit_the_operators_tokens(monkeypatch, tmp_path):
    """`fleet node` reads EDGESLIM_TOKEN: a demo run from a shell that set it for `edgeslim
    serve` started token-protected nodes that refused the demo's traffic (401s, then a
    rollback), and an empty one made every node exit 2."""
    import edgeslim.fleet.demo as demo

    seen: list[dict] = []

    def popen(cmd, **kw):
        seen.append(kw["env"])
        return None

    monkeypatch.setattr(demo.subprocess, "Popen", popen)
    monkeypatch.setenv("EDGESLIM_TOKEN", "operator-serve-token")
    monkeypatch.setenv("EDGESLIM_FLEET_TOKEN", "operator-fleet-token")
    monkeypatch.setenv("EDGESLIM_DEMO_TEST_KEPT", "1")
    demo.spawn_node("edge-1", broker="mqtt://u:p@127.0.0.1:9", controller="http://127.0.0.1:9",
                    data=tmp_path / "n", public_key=tmp_path / "k.pub", port=0)  # fmt: skip
    (env,) = seen
    assert "EDGESLIM_TOKEN" not in env and "EDGESLIM_FLEET_TOKEN" not in env
    assert env["EDGESLIM_DEMO_TEST_KEPT"] == "1" and env["OMP_NUM_THREADS"] == "1"


# ---------------------------------------------------------------------- bad input, refused early
# An invalid --broker (or a Mosquitto said to be missing, or a controller that does not answer)
# stands behind every case below: if a check were missing, the command would still stop at once,
# with another message, and never start anything.
BAD_BROKER = ["--broker", "http://127.0.0.1:1883"]
DEAD = "http://127.0.0.1:9"


def _refused(capsys, argv, *needles):
    rc, out, err = _run(capsys, *argv)
    assert rc == 2, (argv, rc, out, err)
    assert "Traceback" not in err and all(n in err for n in needles), (argv, err)


def test_controller_verb_refuses_bad_ports_numbers_and_folders(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["fleet", "controller", *BAD_BROKER, "--data", str(tmp_path / "ctl")]
    for port in ("70000", "-1"):  # was an OverflowError traceback
        _refused(capsys, [*base, "--http-port", port], "--http-port")
    _refused(capsys, [*base, "--offline-after", "nan"], "--offline-after", "nan", "seconds")
    _refused(capsys, [*base, "--offline-after", "-5"], "--offline-after", "-5")
    for days in ("-1", "0", "inf", "nan"):  # 0 or less would delete every record each minute
        _refused(capsys, [*base, "--retention-days", days], "--retention-days", "(0, 36500]")
    base = ["fleet", "controller", *BAD_BROKER]
    _refused(capsys, [*base, "--data", str(afile)], "--data", "is a file, not a folder")
    _refused(capsys, [*base, "--data", str(afile / "sub")], "--data", "is a file")
    assert not (tmp_path / "ctl").exists()


def test_node_verb_refuses_bad_numbers_urls_and_folders(tmp_path, keys, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["fleet", "node", *BAD_BROKER, "--id", "n1", "--controller", "http://127.0.0.1:1",
            "--public-key", str(keys[1])]  # fmt: skip
    ok = [*base, "--data", str(tmp_path / "n1")]
    _refused(capsys, [*ok, "--cloud", "notaurl"], "--cloud", "http(s) URL", "'notaurl'")
    _refused(capsys, [*ok, "--cloud", "ftp://h"], "--cloud", "'ftp://h'")
    _refused(capsys, [*base, "--data", str(afile)], "--data", "is a file, not a folder")
    for flag in ("--heartbeat", "--telemetry"):
        for bad in ("nan", "inf", "-1", "0", "1e300"):  # 1e300 overflowed the ticker's wait
            _refused(capsys, [*ok, flag, bad], flag, "(0, 86400]")
    for bad in ("nan", "-1", "1e-300"):
        _refused(capsys, [*ok, "--max-download-rate", bad], "--max-download-rate", ">= 1")
    _refused(capsys, [*ok, "--port", "70000"], "--port")
    _refused(capsys, [*ok, "--threads", "0"], "--threads")
    assert not (tmp_path / "n1").exists()


BAD_URLS = ["http://h:99999", "http://h?x=1", "http://:80", "http://h#frag", "http://h h:1"]


def test_node_urls_are_checked_as_the_operator_verbs_check_theirs(tmp_path, keys, capsys):
    """``fleet node --controller/--cloud`` (and NodeConfig) took URLs that the operator verbs'
    --controller (FleetClient's check_url) refuses: one check for all of them now."""
    from edgeslim.errors import ConfigError
    from edgeslim.fleet.client import check_url
    from edgeslim.fleet.node import NodeConfig

    base = ["fleet", "node", *BAD_BROKER, "--id", "n1", "--public-key", str(keys[1]),
            "--data", str(tmp_path / "n1")]  # fmt: skip
    cfg = dict(node_id="n1", broker="mqtt://u:p@127.0.0.1:1", controller="http://h:1",
               data_dir=tmp_path / "n1", public_key=keys[1])  # fmt: skip
    for bad in BAD_URLS:
        with pytest.raises(ConfigError):
            check_url(bad, "--controller")
        _refused(capsys, ["fleet", "status", "--controller", bad], "--controller")
        _refused(capsys, [*base, "--controller", bad], "--controller")
        _refused(capsys, [*base, "--controller", "http://h:1", "--cloud", bad], "--cloud")
        for key in ("controller", "cloud_url"):
            with pytest.raises(ConfigError):
                NodeConfig(**{**cfg, key: bad}).validate()
    assert not (tmp_path / "n1").exists()


def test_controller_and_node_config_refuse_what_the_cli_refuses(tmp_path):
    from edgeslim.errors import ConfigError
    from edgeslim.fleet.controller import Controller
    from edgeslim.fleet.node import NodeConfig

    afile = tmp_path / "afile"
    afile.write_text("x")
    mq = "mqtt://c:p@127.0.0.1:1"
    for kw in ({"offline_after": float("nan")}, {"retention_s": -1.0}, {"http_port": 70000}):
        with pytest.raises(ConfigError, match=next(iter(kw))):
            Controller(mq, tmp_path / "ctl", **kw)
    with pytest.raises(ConfigError, match="is a file"):
        Controller(mq, afile)
    assert not (tmp_path / "ctl").exists()
    cfg = dict(node_id="n1", broker=mq, controller="http://h:1", data_dir=tmp_path / "n1",
               public_key=afile)  # fmt: skip
    for kw in ({"cloud_url": "notaurl"}, {"data_dir": afile}, {"heartbeat_s": 1e300},
               {"max_download_rate": 1e-300}):  # fmt: skip
        with pytest.raises(ConfigError):
            NodeConfig(**{**cfg, **kw}).validate()


def test_demo_refuses_bad_node_counts_and_a_file_workdir(monkeypatch, tmp_path, capsys):
    import edgeslim.fleet.broker as broker_mod
    from edgeslim.errors import ConfigError, MissingDependencyError
    from edgeslim.fleet.demo import run_demo

    def missing() -> str:
        raise MissingDependencyError("mosquitto is missing (test)")

    # Mosquitto "missing": without the checks the demo stops there instead of spawning nodes
    monkeypatch.setattr(broker_mod, "mosquitto_path", missing)
    for n in ("0", "-2", "33", "100000"):  # 0 was a ZeroDivisionError, 100000 spawned nodes
        _refused(capsys, ["fleet", "demo", "--nodes", n], "--nodes")
    for n in (0, -2, 100000):
        with pytest.raises(ConfigError, match="--nodes must be an integer from 1 to 32"):
            run_demo(nodes=n)
    afile = tmp_path / "afile"
    afile.write_text("x")
    _refused(capsys, ["fleet", "demo", "--workdir", str(afile)], "--workdir",
             "is a file, not a folder")  # fmt: skip
    with pytest.raises(ConfigError, match="--workdir"):
        run_demo(workdir=afile)
    _refused(capsys, ["fleet", "demo", "--bundle", str(afile), "--bundle", str(afile)],
             "--key-dir")  # fmt: skip


def test_demo_refuses_bundles_its_key_does_not_verify(monkeypatch, keys, bundles, capsys):
    """An unsigned bundle, or one signed with another key, was uploaded mid-demo and ended in
    a KeyError traceback from the controller's 422; it is now refused before anything starts
    (exit 4, as inspect --public-key)."""
    import edgeslim.fleet.broker as broker_mod
    from edgeslim.errors import MissingDependencyError

    def missing() -> str:
        raise MissingDependencyError("mosquitto is missing (test)")

    monkeypatch.setattr(broker_mod, "mosquitto_path", missing)  # nothing starts if unchecked
    key_dir = str(keys[1].parent)
    for bad in ("unsigned", "foreign"):
        rc, _, err = _run(capsys, "fleet", "demo", "--bundle", str(bundles["v1"]),
                          "--bundle", str(bundles[bad]), "--key-dir", key_dir)  # fmt: skip
        assert rc == 4 and "Traceback" not in err and "mosquitto is missing" not in err, err
        assert "signature" in err.lower() or "signed" in err.lower(), err
    _refused(capsys, ["fleet", "demo", "--bundle", str(bundles["v1"]), "--bundle",
                      str(bundles["v2"]), "--key-dir", str(keys[1].parent.parent)],
             "holds no signing.pub")  # fmt: skip


def test_demo_refuses_bundles_it_cannot_roll_from_one_to_the_other(
    monkeypatch, tmp_path, keys, bundles, capsys
):
    """Two different models, or v2 older than v1, were refused by the controller (409) only
    after the broker, controller and nodes had started; now before anything starts."""
    import edgeslim.fleet.broker as broker_mod
    from edgeslim.errors import ConfigError, MissingDependencyError
    from edgeslim.fleet.demo import run_demo
    from tests.fleet.helpers import make_bundle

    def missing() -> str:
        raise MissingDependencyError("mosquitto is missing (test)")

    monkeypatch.setattr(broker_mod, "mosquitto_path", missing)  # nothing starts if unchecked
    other = make_bundle(tmp_path / "other.eslim", keys[0], seed=11, version="3", name="other")
    key_dir = keys[1].parent
    for pair, what in (((bundles["v1"], other), "holds model"),
                       ((bundles["v2"], bundles["v1"]), "is older than")):  # fmt: skip
        with pytest.raises(ConfigError, match=what):
            run_demo(nodes=1, bundles=list(pair), key_dir=key_dir)
        _refused(capsys, ["fleet", "demo", "--bundle", str(pair[0]), "--bundle", str(pair[1]),
                          "--key-dir", str(key_dir)], what)  # fmt: skip


def test_deploy_checks_every_parameter_before_uploading(tmp_path, capsys):
    bundle = tmp_path / "b.eslim"
    bundle.write_bytes(b"PK not really")
    # The controller does not answer: an upload attempt would exit 5, a refusal exits 2.
    base = ["fleet", "deploy", str(bundle), "--controller", DEAD, "--no-wait"]
    cases = [
        ("--canary", "nan", "[0.0, 1.0]"),  # was a JSON traceback, after the upload
        ("--canary", "1.5", "[0.0, 1.0]"),
        ("--soak", "-1", ">= 0"),
        ("--soak", "inf", ">= 0"),
        ("--max-error-rate", "nan", "[0.0, 1.0]"),
        ("--max-p99-ratio", "inf", "> 0"),
        ("--max-p99-ratio", "0", "> 0"),
        ("--install-timeout", "0", "> 0"),
        ("--install-timeout", "nan", "> 0"),
        ("--parallel", "0", "--parallel"),
        ("--timeout", "0", "positive number of seconds"),
        ("--timeout", "nan", "positive number of seconds"),
        ("--timeout", "-3", "positive number of seconds"),
    ]
    for flag, bad, allowed in cases:
        _refused(capsys, [*base, flag, bad], flag, allowed)
    _refused(capsys, [*base, "--selector", "oops"], "key=value")


def test_rollback_refuses_bad_options_before_calling_the_controller(capsys):
    base = ["fleet", "rollback", "--controller", DEAD]
    _refused(capsys, [*base, "--deployment", "../nodes"], "--deployment", "'latest'")
    _refused(capsys, [*base, "--deployment", "0"], "--deployment")
    _refused(capsys, [*base, "--timeout", "nan"], "--timeout", "nan")
    _refused(capsys, [*base, "--timeout", "0"], "--timeout")


def test_rollback_no_wait_says_it_was_requested_and_json_prints_the_row(controller, capsys):
    from edgeslim.fleet.rollout import RolloutParams

    def soaking() -> int:
        dep = controller.registry.create_deployment("0" * 64, {}, 0.1,
                                                    RolloutParams().to_dict(), [])  # fmt: skip
        controller.registry.set_deployment_state(dep, "soak", "watching canaries for 10 s")
        return dep

    dep = soaking()
    rc, out, _ = _run(capsys, "fleet", "rollback", "--controller", controller.url, "--no-wait")
    assert rc == 0 and f"rollback requested for deployment {dep}" in out
    assert "soak" not in out and "watching" not in out  # the state before is not news
    assert controller.wait_deployment(dep, 20) == "rolled_back"
    dep = soaking()
    rc, out, _ = _run(capsys, "fleet", "rollback", "--controller", controller.url,
                      "--deployment", str(dep), "--json")  # fmt: skip
    row = json.loads(out)
    assert rc == 0 and row["id"] == dep and row["state"] == "rolled_back"


def test_operator_verbs_refuse_a_malformed_controller_url_naming_it(capsys):
    for url in ("http://127.0.0.1:abc", "http://[::1", "http://127.0.0.1:99999", "http://",
                "http://xn--"):  # xn--: an IDNA error traceback when the request was built
        for verb in (["status"], ["rollback"]):
            _refused(capsys, ["fleet", *verb, "--controller", url], "--controller", repr(url),
                     "not a valid URL")


def test_operator_verbs_say_when_the_url_is_not_an_edgeslim_controller(capsys):
    """A web server that is not the controller (an HTML page, JSON of another shape) is named
    in one line, not a traceback."""
    import http.server

    answers = {"/nodes": (b"<html>hello</html>", "text/html"),
               "/deployments/latest/rollback": (b'{"ok": true}', "application/json")}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            body, ctype = answers.get(self.path, (b"[1, 2]", "application/json"))
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        _refused(capsys, ["fleet", "status", "--controller", url],
                 "not an edgeslim controller", "not JSON")
        answers["/nodes"] = (b'{"nodes": []}', "application/json")
        _refused(capsys, ["fleet", "status", "--controller", url],
                 "not an edgeslim controller", "another shape")
        _refused(capsys, ["fleet", "rollback", "--controller", url],
                 "not an edgeslim controller")
    finally:
        server.shutdown()
