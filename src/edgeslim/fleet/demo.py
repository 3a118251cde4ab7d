"""``edgeslim fleet demo``: a whole fleet on one machine, rolled forward under traffic.

Starts Mosquitto, a controller and N node processes, compresses digits-mlp into two signed
bundles (fp32 as v1, int8 as v2) unless given bundles, rolls v1 out, then v2 with a canary
while a client sends inference requests to every node, prints the status table, and shuts
everything down. Also home of helpers the tests and the scale bench share (``spawn_node``,
``infer_request``, ``TrafficClient``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from edgeslim.errors import ConfigError

__all__ = ["TrafficClient", "infer_request", "run_demo", "spawn_node", "wait_until"]


def wait_until(predicate: Any, timeout: float, interval: float = 0.1, what: str = "") -> Any:
    """Poll ``predicate()`` until truthy (returned) or raise ``TimeoutError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


#: environment variables a demo node does not inherit: `fleet node` would take the operator's
#: EDGESLIM_TOKEN (set for `edgeslim serve`) as its own, refusing the demo's traffic, which
#: sends none (an empty one stops the node); the controller's token is no concern of a node.
DEMO_DROPPED_ENV = ("EDGESLIM_TOKEN", "EDGESLIM_FLEET_TOKEN")


def spawn_node(
    node_id: str,
    *,
    broker: str,
    controller: str,
    data: Path,
    public_key: Path,
    port: int,
    labels: str = "",
    extra: list[str] | None = None,
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``edgeslim fleet node`` as a child process (its own process group)."""
    cmd = [
        sys.executable, "-m", "edgeslim.cli", "fleet", "node",
        "--broker", broker, "--id", node_id, "--port", str(port), "--data", str(data),
        "--public-key", str(public_key), "--controller", controller,
    ]  # fmt: skip
    if labels:
        cmd += ["--labels", labels]
    cmd += extra or []
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in DEMO_DROPPED_ENV:  # the operator's tokens are not the demo's: it runs open
        env.pop(name, None)
    try:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )  # fmt: skip
    finally:
        if log:
            out.close()  # type: ignore[union-attr]


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def infer_request(manifest: dict[str, Any], rows: int = 1) -> dict[str, Any]:
    """A V2 infer body built from the manifest's probe inputs (first ``rows`` rows)."""
    import numpy as np

    from edgeslim.edge.v2 import NUMPY_TO_V2

    probe = manifest.get("probe")
    if not probe:
        raise ConfigError(f"Bundle '{manifest.get('name')}' has no probe to build a request from.")
    inputs = []
    for spec in manifest["inputs"]:
        arr = np.asarray(probe["inputs"][spec["name"]], dtype=spec["dtype"])[:rows]
        inputs.append({
            "name": spec["name"], "datatype": NUMPY_TO_V2[arr.dtype.name],
            "shape": list(arr.shape), "data": arr.ravel().tolist(),
        })  # fmt: skip
    return {"inputs": inputs}


class TrafficClient(threading.Thread):
    """Sends V2 infer requests round-robin to ``urls`` until stopped; counts every outcome.

    ``failures`` lists (url, status or exception text) of every request that did not get 200.
    """

    def __init__(self, urls: list[str], model: str, body: dict[str, Any], pause: float = 0.0):
        super().__init__(name="traffic", daemon=True)
        self.urls = list(urls)
        self.model = model
        self.body = body
        self.pause = pause
        self.ok = 0
        self.failures: list[tuple[str, str]] = []
        self.versions: dict[str, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(timeout=10.0) as client:
            i = 0
            while not self._halt.is_set():
                url = self.urls[i % len(self.urls)]
                i += 1
                try:
                    r = client.post(f"{url}/v2/models/{self.model}/infer", json=self.body)
                    if r.status_code == 200:
                        self.ok += 1
                        v = str(r.json().get("model_version"))
                        self.versions[v] = self.versions.get(v, 0) + 1
                    else:
                        self.failures.append((url, f"HTTP {r.status_code}: {r.text[:200]}"))
                except httpx.HTTPError as exc:
                    self.failures.append((url, repr(exc)))
                if self.pause:
                    self._halt.wait(self.pause)

    def stop(self) -> None:
        self._halt.set()
        self.join(15.0)


def _plain(text: str) -> Any:
    """``text`` as a rich ``Text``: never read as markup (``[/]``, ``[link=...]``), its control
    characters shown escaped (what the controller and the nodes sent is shown, not obeyed)."""
    from rich.text import Text

    from edgeslim._text import visible

    return Text(visible(text))


def deploy_line(version: str, sha: str, row: dict[str, Any], seconds: float) -> Any:
    """The demo's line for a deployment that ended (``row``: the controller's row)."""
    return _plain(f"deploy {version} ({sha[:12]}): {row['state']} in {seconds:.1f} s "
                  f"{row['reason'] or ''}")  # fmt: skip


def traffic_line(traffic: TrafficClient) -> Any:
    """The demo's traffic summary (the versions are what the nodes answered)."""
    return _plain(f"traffic: {traffic.ok} answered, {len(traffic.failures)} failed, by model "
                  f"version {traffic.versions}")  # fmt: skip


def _make_bundles(work: Path, key: Path, console: Any) -> tuple[Path, Path]:
    from edgeslim.errors import MissingDependencyError, require

    try:
        require("torch", "compress", "Building the demo bundles")
    except MissingDependencyError as exc:
        raise MissingDependencyError(
            f"{exc} Or pass two bundles: --bundle v1.eslim --bundle v2.eslim"
        ) from None
    from edgeslim.errors import EdgeslimError
    from edgeslim.pipeline import compress

    console.print("compressing digits-mlp with preset fp32 -> v1.eslim ...")
    v1 = Path(compress("digits-mlp", out=work / "v1.eslim", preset="fp32", sign_key=key,
                       name="digits-mlp", progress=False).bundle)  # fmt: skip
    console.print("compressing digits-mlp with preset int8 -> v2.eslim ...")
    try:
        v2 = Path(compress("digits-mlp", out=work / "v2.eslim", preset="int8", sign_key=key,
                           name="digits-mlp", version="2", progress=False).bundle)  # fmt: skip
    except EdgeslimError as exc:  # keep the demo about the fleet: re-version v1 instead
        console.print(f"[yellow]int8 compression failed ({exc}); v2 = v1's model as version 2")
        v2 = _reversion(v1, work / "v2.eslim", key, "2")
    return v1, v2


def _reversion(src: Path, out: Path, key: Path, version: str) -> Path:
    """The bundle ``src`` with a new version string (so a new sha256), signed with ``key``."""
    from edgeslim.bundle import read_bundle, write_bundle

    b = read_bundle(src)
    m = {k: v for k, v in b.manifest.items() if k not in ("model", "files", "format", "created")}
    m["version"] = version
    return write_bundle(
        out, model_onnx=b.model_bytes, manifest=m, extra_files=b.files, sign_key=key
    )


def _check_succession(m1: dict[str, Any], m2: dict[str, Any], paths: list[Path]) -> None:
    """Refuse, before anything starts, two bundles the demo cannot roll from one to the
    other: it shows one model moving from v1 to v2 under traffic sent to that model's name,
    so the controller's succession rule (same model, no lower version) must hold; the demo
    does not override it, as a mistaken pair of files is likelier than a wish to swap models.
    """
    from edgeslim._text import visible
    from edgeslim.fleet.controller import version_is_lower

    n1, n2 = str(m1.get("name")), str(m2.get("name"))
    v1, v2 = str(m1.get("version")), str(m2.get("version"))
    b1, b2 = (visible(str(p)) for p in paths)
    if n1 != n2:
        raise ConfigError(f"--bundle {b1!r} holds model {visible(n1)!r} but --bundle {b2!r} "
                          f"holds {visible(n2)!r}: the demo rolls one model from v1 to v2, so "
                          "give two versions of the same model.")  # fmt: skip
    if version_is_lower(v2, v1):
        raise ConfigError(f"--bundle {b2!r} (version {visible(v2)}) is older than --bundle "
                          f"{b1!r} (version {visible(v1)}): give the older bundle first, the "
                          "newer second.")  # fmt: skip


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt_once(signum: int, frame: Any) -> None:
    """The first Ctrl-C or SIGTERM stops the demo; any after it is ignored (set here, before
    the clean-up begins), so that none can cut the clean-up short."""
    for s in _STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def run_demo(
    *,
    nodes: int = 3,
    bundles: list[Path] | None = None,
    key_dir: Path | None = None,
    workdir: Path | None = None,
) -> None:
    """See the module docstring. Raises ``MissingDependencyError`` without Mosquitto.

    ``nodes`` is 1 to ``DEMO_MAX_NODES`` (32): every node is its own process on this machine.
    """
    from edgeslim.bundle import generate_keypair, read_bundle
    from edgeslim.bundle.signing import PUBLIC_KEY_FILE
    from edgeslim.commands.fleet import DEMO_MAX_NODES, _folder, status_table, wide_console
    from edgeslim.errors import StillRunningError
    from edgeslim.fleet.broker import Broker, free_port, mosquitto_path
    from edgeslim.fleet.client import FleetClient
    from edgeslim.fleet.controller import Controller

    # every argument is checked before anything is made or started
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= DEMO_MAX_NODES:
        raise ConfigError(f"--nodes must be an integer from 1 to {DEMO_MAX_NODES} (each node is "
                          f"a process on this machine). Got {nodes!r} instead.")
    if bundles and len(bundles) != 2:
        raise ConfigError(f"--bundle must be given twice (v1 and v2). Got {len(bundles)}.")
    if bundles and key_dir is None:
        raise ConfigError("--bundle needs --key-dir holding the signing.pub they verify with.")
    for b in bundles or []:
        if not Path(b).is_file():
            raise ConfigError(f"--bundle {str(b)!r} is not a file.")
    checked = []
    if bundles and key_dir is not None:
        # the controller refuses a bundle its key does not verify: say so now, not mid-demo
        pub_key = Path(key_dir) / PUBLIC_KEY_FILE
        if not pub_key.is_file():
            raise ConfigError(f"--key-dir {str(key_dir)!r} holds no {PUBLIC_KEY_FILE}.")
        # SignatureError / BundleError: one line
        checked = [read_bundle(b, public_key=pub_key) for b in bundles]
        _check_succession(*(c.manifest for c in checked), bundles)
    _folder(Path(workdir) if workdir is not None else None, "--workdir")
    console = wide_console()
    mosquitto_path()  # a clear message on how to install it, before any work
    own = workdir is None
    procs: list[subprocess.Popen[bytes]] = []
    broker = controller = traffic = None
    # The nodes run in their own sessions (a Ctrl-C in the terminal does not reach them), so
    # the clean-up below must run on SIGTERM too, or a killed demo leaves them behind; and it
    # must run to its end: a second Ctrl-C or SIGTERM, while it stops the nodes, is ignored.
    on_main = threading.current_thread() is threading.main_thread()
    old_handlers = {s: signal.signal(s, _interrupt_once) for s in _STOP_SIGNALS} if on_main else {}
    work = Path(workdir) if workdir is not None else None
    try:
        if work is None:
            work = Path(tempfile.mkdtemp(prefix="edgeslim-fleet-demo-"))
        work.mkdir(parents=True, exist_ok=True)
        if checked:  # (bundles without key_dir: refused above)
            pub = pub_key
            v1, v2 = bundles
            manifest = checked[0].manifest
        else:
            key, pub = generate_keypair(work / "keys")
            v1, v2 = _make_bundles(work, Path(key), console)
            manifest = read_bundle(v1).manifest
        # one user per node, named by its id: a node's login fixes who it is (docs/fleet.md)
        node_ids = [f"edge-{i + 1}" for i in range(nodes)]
        broker = Broker.for_fleet(node_ids, workdir=work / "broker").start()
        console.print(f"broker: mosquitto on 127.0.0.1:{broker.port}")
        controller = Controller(broker.url("controller"), work / "controller", public_key=pub,
                                offline_after=15.0).start()  # fmt: skip
        console.print(f"controller: {controller.url}")
        ports = [free_port() for _ in range(nodes)]
        for i, port in enumerate(ports):
            procs.append(spawn_node(
                node_ids[i], broker=broker.url(node_ids[i]), controller=controller.url,
                data=work / f"node-{i + 1}", public_key=Path(pub), port=port,
                labels=f"site=demo,tier={'a' if i % 2 == 0 else 'b'}",
                extra=["--heartbeat", "1", "--telemetry", "1"], log=work / f"node-{i + 1}.log",
            ))  # fmt: skip
        wait_until(lambda: len(controller.online_nodes()) == nodes, 90, 0.2, "the nodes to join")
        console.print(f"{nodes} nodes joined")
        params = {"canary": 1 / nodes, "soak_s": 3.0, "install_timeout_s": 60.0}
        # the controller's HTTP API, as an operator drives it (fleet deploy / status)
        with FleetClient(controller.url) as fleet:
            shas = [fleet.upload(b)["sha256"] for b in (v1, v2)]
            for version, sha in zip(("v1", "v2"), shas, strict=True):
                if version == "v2":
                    urls = [f"http://127.0.0.1:{p}" for p in ports]
                    traffic = TrafficClient(urls, manifest["name"], infer_request(manifest))
                    traffic.start()
                    console.print("traffic: a client sends requests to every node from now on")
                t0 = time.monotonic()
                row = fleet.deploy(sha, **params)
                try:
                    row = fleet.wait(row["id"], timeout=180)
                except StillRunningError:  # shown as it stands; the demo goes on
                    row = fleet.deployment(row["id"])
                console.print(deploy_line(version, sha, row, time.monotonic() - t0))
            if traffic is not None:
                time.sleep(1.0)
                traffic.stop()
                console.print(traffic_line(traffic))
            console.print(status_table(fleet.nodes(), title="edgeslim fleet status"))
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            console.print("interrupted: stopping the nodes, the controller and the broker ...")
        raise
    finally:
        for s in old_handlers:  # (when the demo ended without a signal)
            signal.signal(s, signal.SIG_IGN)
        if traffic is not None and traffic.is_alive():
            traffic.stop()
        for p in procs:  # all at once, then wait: not 10 s per node in turn
            with contextlib.suppress(OSError):
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
        for p in procs:
            stop_process(p)
        if controller is not None:
            controller.stop()
        if broker is not None:
            broker.stop()
        if own and work is not None:
            shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(Exception):
            console.print("demo: everything stopped")
        for s, handler in old_handlers.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
