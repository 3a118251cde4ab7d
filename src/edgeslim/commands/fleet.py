"""``edgeslim fleet``: controller, node, deploy, status, rollback, demo (and, in
``fleet_data.py``, upload, bundles, deployments, records, health).

The long-running verbs (``controller``, ``node``) log to standard error and stop cleanly on
SIGINT or SIGTERM. The operator verbs talk to the controller's HTTP API through
``edgeslim.fleet.client.FleetClient``, which Python users call directly.
Exit codes: 0 success, 1 a deployment that was rolled back (or failed to), 2 bad input, 3 a
deployment still running when --timeout ran out (it goes on), 5 the controller did not answer.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from edgeslim.commands._token import read_token, token_option
from edgeslim.commands.serve import TOKEN_ENV as SERVE_TOKEN_ENV
from edgeslim.errors import ConfigError
from edgeslim.fleet.api import TOKEN_ENV

if TYPE_CHECKING:
    from edgeslim.fleet.client import FleetClient

fleet_app = typer.Typer(
    name="fleet",
    help="Run a fleet: a controller and edge nodes over MQTT; staged rollouts with rollback.",
    no_args_is_help=True,
)

_BROKER_HELP = "MQTT broker URL: mqtt://USER:PASS@HOST:PORT"


def register(app: typer.Typer) -> None:
    import edgeslim.commands.fleet_data  # noqa: F401 - its verbs join fleet_app

    app.add_typer(fleet_app, name="fleet")


LOG_LEVELS = ("debug", "info", "warning", "error")


def _logging(level: str) -> None:
    import logging

    if str(level).lower() not in LOG_LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}. "
                          f"Got {level!r} instead.")
    level = str(level).lower()
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    for chatty in ("httpx", "httpcore"):  # one line per HTTP call, even at debug
        logging.getLogger(chatty).setLevel(logging.WARNING)


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    import signal
    import threading

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.5):
        pass


def _number(
    value: float, flag: str, what: str, *, lo: float = 0.0, allow_lo: bool = False,
    hi: float | None = None,
) -> float:
    """A finite float above ``lo`` (or equal with ``allow_lo``) and at most ``hi``; else a
    ``ConfigError`` naming the flag: "--soak must be WHAT. Got nan instead."."""
    ok = (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        and (value >= lo if allow_lo else value > lo) and (hi is None or value <= hi)
    )
    if not ok:
        raise ConfigError(f"{flag} must be {what}. Got {value!r} instead.")
    return float(value)


def _folder(path: Path | None, flag: str) -> None:
    """Refuse a folder option that names a file (or lies under one) before anything is made."""
    from edgeslim._atomic import output_problem

    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a file, not a folder. Give a folder (it is "
                          "created if missing).")
    problem = output_problem(path, folder=True)  # a file above it, a folder we cannot write
    if problem:
        raise ConfigError(f"{flag} {str(path)!r} cannot be used: {problem}.")


def _token(token: str | None) -> str | None:
    """``--token`` (or ``EDGESLIM_FLEET_TOKEN``) checked (``read_token``)."""
    return read_token(token, TOKEN_ENV, "for a controller without auth")


def _token_option(text: str) -> Any:
    return token_option(TOKEN_ENV, text)


_CLIENT_TOKEN_HELP = "The controller's bearer token, when it was started with one."


def _client(controller: str, token: str | None) -> FleetClient:
    """A ``FleetClient`` of ``--controller`` (a bad URL is refused naming the flag)."""
    from edgeslim.fleet.client import FleetClient, check_url

    check_url(controller, "--controller")
    return FleetClient(controller, token=_token(token))


# ---------------------------------------------------------------------- long-running verbs
@fleet_app.command("controller")
def controller_cmd(
    broker: str = typer.Option(..., "--broker", help=_BROKER_HELP),
    http_port: int = typer.Option(8700, "--http-port", min=0, max=65535,
                                  help="HTTP API port (0: any free port)."),
    http_host: str = typer.Option("127.0.0.1", "--http-host", help="HTTP API address."),
    data: Path = typer.Option(..., "--data", help="Directory for the registry and bundles."),
    public_key: Path | None = typer.Option(
        None, "--public-key", help="Ed25519 public key (PEM) that uploaded bundles must verify."
    ),
    offline_after: float = typer.Option(30.0, help="Seconds of silence before a node is stale."),
    retention_days: float = typer.Option(
        7.0, help="Days stored records are kept (> 0, at most 36500; records older are deleted "
                  "once a minute, so 0 would keep none)."
    ),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
    token: str | None = _token_option(
        "Require 'Authorization: Bearer TOKEN' on the HTTP API (health and bundle downloads "
        "stay open: nodes fetch signed bundles without it)."),
) -> None:
    """Run the fleet controller until SIGINT/SIGTERM."""
    from edgeslim.fleet.controller import Controller

    token = _token(token)
    _number(offline_after, "--offline-after", "a positive number of seconds")
    _number(retention_days, "--retention-days", "a number of days in (0, 36500]", hi=36500.0)
    _folder(data, "--data")
    _logging(log_level)
    c = Controller(
        broker,
        data,
        public_key=public_key,
        http_host=http_host,
        http_port=http_port,
        offline_after=offline_after,
        retention_s=retention_days * 86400.0,
        token=token,
    )
    c.start()
    auth = "bearer token required" if token else "no auth"
    print(f"controller: HTTP {c.url} ({auth}), broker {c.broker}", file=sys.stderr, flush=True)
    try:
        _wait_for_signal()
    finally:
        c.stop()


@fleet_app.command("node")
def node_cmd(
    broker: str = typer.Option(..., "--broker", help=_BROKER_HELP),
    node_id: str = typer.Option(..., "--id", help="Node id: [A-Za-z0-9_.-]{1,64}."),
    port: int = typer.Option(8000, "--port", min=0, max=65535,
                             help="KServe V2 HTTP port (0: any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="KServe V2 HTTP address."),
    data: Path = typer.Option(..., "--data", help="Directory for bundles and the outbox."),
    public_key: Path = typer.Option(..., "--public-key", help="Pinned Ed25519 public key."),
    controller: str = typer.Option(..., "--controller", help="Controller HTTP URL."),
    labels: str = typer.Option("", "--labels", help="Extra labels: k=v,k2=v2."),
    heartbeat: float = typer.Option(5.0, help="Seconds between status heartbeats (at most "
                                    "86400)."),
    telemetry: float = typer.Option(5.0, help="Seconds between telemetry records (at most "
                                    "86400)."),
    threads: int = typer.Option(1, min=1, max=256, help="onnxruntime intra-op threads."),
    max_download_rate: float | None = typer.Option(
        None, help="Download cap, bytes/s (at least 1)."
    ),
    offload_threshold: int = typer.Option(
        0, min=0, max=10**6, help="In-flight requests before offloading to a peer (0: never)."
    ),
    cloud: str | None = typer.Option(
        None, help="Cloud-tier V2 base URL for offloading: http(s)://HOST:PORT."
    ),
    share_results: bool = typer.Option(False, help="Publish outputs on edgeslim/results/SHA/NODE."),
    max_message_bytes: int = typer.Option(
        268_435_455, min=4096, max=268_435_455,
        help="Largest MQTT packet the node sends (default: MQTT's own limit; 131072 for AWS "
             "IoT Core); a smaller limit the broker names wins.",
    ),
    measure: bool = typer.Option(True, help="Measure the reference model for the labels."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
    token: str | None = token_option(
        SERVE_TOKEN_ENV,  # as edgeslim serve
        "Require 'Authorization: Bearer TOKEN' on the V2 API (health checks stay open); "
        "the fleet's nodes share it and send it to the peers they offload to."),
    max_body_mb: float = typer.Option(
        16.0, "--max-body-mb", min=0.001,
        help="Largest request body (MB, at least 0.001), offloaded or not."),
) -> None:
    """Run a node agent until SIGINT/SIGTERM: serve V2, follow the controller."""
    from edgeslim.fleet.client import check_url
    from edgeslim.fleet.node import Node, NodeConfig
    from edgeslim.fleet.protocol import parse_labels

    token = read_token(token, SERVE_TOKEN_ENV, "to serve without auth")
    _number(heartbeat, "--heartbeat", "a number of seconds in (0, 86400]", hi=86400.0)
    _number(telemetry, "--telemetry", "a number of seconds in (0, 86400]", hi=86400.0)
    if max_download_rate is not None:
        _number(max_download_rate, "--max-download-rate", "a number of bytes/s >= 1", lo=1.0,
                allow_lo=True)
    check_url(controller, "--controller")
    if cloud is not None:
        check_url(cloud, "--cloud")
    _folder(data, "--data")
    _logging(log_level)
    cfg = NodeConfig(
        node_id=node_id,
        broker=broker,
        controller=controller,
        data_dir=data,
        public_key=public_key,
        host=host,
        port=port,
        labels=parse_labels(labels),
        heartbeat_s=heartbeat,
        telemetry_s=telemetry,
        threads=threads,
        max_download_rate=max_download_rate,
        offload_threshold=offload_threshold,
        cloud_url=cloud,
        share_results=share_results,
        max_message_bytes=max_message_bytes,
        measure_reference=measure,
        token=token,
        max_body_mb=max_body_mb,
    )
    node = Node(cfg).start()
    model = node.model
    print(
        f"node {node.id}: V2 on {node.url}, serving "
        f"{model.name + ' ' + model.bundle[:12] if model else 'nothing yet'}",
        file=sys.stderr,
        flush=True,
    )
    try:
        _wait_for_signal()
    finally:
        node.stop()


# ---------------------------------------------------------------------- operator verbs
# RolloutParams field -> the ``fleet deploy`` flag that sets it
_DEPLOY_FLAGS = {
    "canary": "--canary",
    "soak_s": "--soak",
    "max_error_rate": "--max-error-rate",
    "max_p99_ratio": "--max-p99-ratio",
    "install_timeout_s": "--install-timeout",
    "parallel": "--parallel",
}


def _rollout_params(params: dict[str, Any]) -> dict[str, Any]:
    """Check ``params`` as the controller will (``RolloutParams``), naming the flag at fault."""
    from edgeslim.fleet.rollout import RolloutParams

    try:
        RolloutParams.from_dict(params)
    except ConfigError as exc:
        m = re.match(r"The '(\w+)' parameter of deploy must be (.*)", str(exc), re.S)
        if m is None or m.group(1) not in _DEPLOY_FLAGS:
            raise
        raise ConfigError(f"{_DEPLOY_FLAGS[m.group(1)]} must be {m.group(2)}") from None
    return params


def _cell(value: Any, style: str = "") -> Any:
    """A table cell showing ``value`` as plain text: what nodes and the controller send is
    never read as rich markup (``[/]``, ``[link=...]``), and its control characters show
    escaped instead of reaching the terminal."""
    from rich.text import Text

    from edgeslim._text import visible

    return Text(visible(str(value)), style=style)


def deployment_table(row: dict[str, Any]) -> Any:
    """A rich table of a deployment row (``GET /deployments/ID``) and its targets."""
    from rich.table import Table

    t = Table(title=_cell(f"deployment {row['id']}: {row['state']}  {row['reason']}".strip()))
    for col in ("node", "phase", "state", "previous", "detail"):
        t.add_column(col)
    for tg in row["targets"]:
        prev = (tg["previous_sha"] or "-")[:12]
        t.add_row(*(_cell(v) for v in (tg["node"], tg["phase"], tg["state"], prev,
                                       str(tg["detail"])[:80])))  # fmt: skip
    return t


def _print_deployment(row: dict[str, Any]) -> None:
    wide_console().print(deployment_table(row))


@fleet_app.command("deploy")
def deploy_cmd(
    bundle: str = typer.Argument(..., help="A .eslim file (uploaded first) or a stored sha256."),
    controller: str = typer.Option(..., "--controller", help="Controller HTTP URL."),
    selector: str = typer.Option("", "--selector", help="Target labels: k=v,k2=v2."),
    canary: float = typer.Option(0.1, "--canary", help="Fraction of targets installed first."),
    soak: float = typer.Option(10.0, "--soak", help="Seconds the canaries serve before the rest."),
    max_error_rate: float = typer.Option(0.01, help="Allowed rise of the canary error rate."),
    max_p99_ratio: float = typer.Option(3.0, help="Allowed canary/baseline p99 ratio."),
    install_timeout: float = typer.Option(120.0, help="Seconds a node has to report."),
    parallel: int = typer.Option(100, min=1, max=10**6, help="Nodes installing at once."),
    force: bool = typer.Option(False, help="Deploy a bundle the controller cannot verify."),
    allow_downgrade: bool = typer.Option(
        False, help="Deploy even if the bundle's version is lower than what a target serves "
                    "(a rollback to an older version on purpose)."),
    allow_model_change: bool = typer.Option(
        False, help="Deploy even if the bundle holds another model (by name) than a target "
                    "serves: clients that call the old model's name stop being answered."),
    wait: bool = typer.Option(True, help="Wait for the deployment to finish."),
    timeout: float = typer.Option(600.0, help="Seconds to wait (> 0)."),
    as_json: bool = typer.Option(False, "--json", help="Print the deployment as JSON."),
    token: str | None = _token_option(_CLIENT_TOKEN_HELP),
) -> None:
    """Roll BUNDLE out: canaries first, then the rest; automatic rollback on failure."""
    from edgeslim.fleet.protocol import parse_labels

    # Every parameter is checked here, before the bundle is uploaded.
    params = _rollout_params({
        "canary": canary,
        "soak_s": soak,
        "max_error_rate": max_error_rate,
        "max_p99_ratio": max_p99_ratio,
        "install_timeout_s": install_timeout,
        "parallel": parallel,
        "force": force,
        "allow_downgrade": allow_downgrade,
        "allow_model_change": allow_model_change,
    })  # fmt: skip
    _number(timeout, "--timeout", "a positive number of seconds")
    labels = parse_labels(selector)
    with _client(controller, token) as client:
        row = client.deploy(bundle, labels, **params)
        if wait:
            row = client.wait(int(row["id"]), timeout=timeout)
    finish_deployment(row, as_json, wait)


def finish_deployment(row: dict[str, Any], as_json: bool, waited: bool) -> None:
    """Print a deployment row (JSON or a table); exit 1 when it was waited for and did not
    succeed."""
    if as_json:
        print(json.dumps(row, indent=2))
    else:
        _print_deployment(row)
    if waited and row["state"] != "succeeded":
        raise typer.Exit(1)


def wide_console() -> Any:
    """A rich console at least 150 columns wide when output is not a terminal (logs, CI)."""
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=150)


def status_table(nodes: list[dict[str, Any]], title: str = "fleet") -> Any:
    """A rich table of ``GET /nodes`` rows; every value shows as plain text (``_cell``)."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("node", "labels", "model", "version", "model sha256", "bundle", "health", "state",
                "last seen"):  # fmt: skip
        t.add_column(col, overflow="fold")
    for n in nodes:
        labels = ",".join(
            f"{k}={v}" for k, v in sorted(n["labels"].items()) if k != "ref_latency_us"
        )
        health = n["health"] if n.get("online", True) else "offline"
        style = {"ok": "green", "degraded": "yellow"}.get(health, "red")
        t.add_row(
            _cell(n["id"]),
            _cell(labels),
            _cell(n.get("model_name") or "-"),
            _cell(n.get("model_version") or "-"),
            _cell(str(n.get("model_sha") or "-")[:12]),
            _cell(str(n.get("bundle_sha") or "-")[:12]),
            _cell(health, style),
            _cell(n["state"]),
            _cell(f"{n.get('age_s', 0):.1f} s ago"),
        )
    return t


@fleet_app.command("status")
def status_cmd(
    controller: str = typer.Option(..., "--controller", help="Controller HTTP URL."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    token: str | None = _token_option(_CLIENT_TOKEN_HELP),
) -> None:
    """List every node: id, labels, model name and sha256, health, last seen."""
    with _client(controller, token) as client:
        nodes = client.nodes()
    if as_json:
        print(json.dumps(nodes, indent=2))
        return
    wide_console().print(status_table(nodes))


@fleet_app.command("rollback")
def rollback_cmd(
    controller: str = typer.Option(..., "--controller", help="Controller HTTP URL."),
    deployment: str = typer.Option("latest", "--deployment", help="Deployment id or 'latest'."),
    wait: bool = typer.Option(True, help="Wait until the rollback is done."),
    timeout: float = typer.Option(120.0, help="Seconds to wait (> 0)."),
    as_json: bool = typer.Option(False, "--json", help="Print the deployment as JSON."),
    token: str | None = _token_option(_CLIENT_TOKEN_HELP),
) -> None:
    """Roll a deployment back: every node it touched returns to its previous bundle."""
    from edgeslim.fleet.client import deployment_ref

    deployment_ref(deployment, "--deployment")
    _number(timeout, "--timeout", "a positive number of seconds")
    with _client(controller, token) as client:
        row = client.rollback(deployment)
        if wait:
            row = client.wait(int(row["id"]), timeout=timeout)
    if as_json:
        print(json.dumps(row, indent=2))
    elif wait:
        _print_deployment(row)
    else:  # the row still shows the state before the rollback: do not print it as news
        from edgeslim._text import visible

        dep = visible(str(row["id"]))  # what the controller answered: shown, never obeyed
        print(f"rollback requested for deployment {dep}; follow it with 'edgeslim fleet "
              f"status --controller {controller}' or GET /deployments/{dep}")


DEMO_MAX_NODES = 32  # also enforced by run_demo


@fleet_app.command("demo")
def demo_cmd(
    nodes: int = typer.Option(
        3, "--nodes", min=1, max=DEMO_MAX_NODES,
        help=f"Node processes to start, 1 to {DEMO_MAX_NODES}: each is its own Python process "
             "with an inference runtime and an HTTP server, all on this machine; more is a "
             "load test, not a demo.",
    ),
    bundle: list[Path] = typer.Option(
        [], "--bundle", help="Two signed bundles (v1, v2) instead of compressing digits-mlp."
    ),
    key: Path | None = typer.Option(None, "--key-dir", help="Key dir for --bundle (signing.pub)."),
    workdir: Path | None = typer.Option(None, "--workdir", help="Keep everything here."),
) -> None:
    """Broker + controller + NODES nodes on this machine; roll out v1 then v2 under traffic."""
    from edgeslim.fleet.demo import run_demo

    _folder(workdir, "--workdir")
    run_demo(nodes=nodes, bundles=bundle, key_dir=key, workdir=workdir)
