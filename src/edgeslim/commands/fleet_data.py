"""``edgeslim fleet upload | bundles | deployments | records | health``: what the controller
stores, from the command line; each verb is one ``FleetClient`` call (``fleet/client.py``).

They take ``--controller``, ``--token`` (or ``EDGESLIM_FLEET_TOKEN``; not ``health``, whose
``GET /healthz`` needs none) and ``--json``, print tables as plain text (nothing the
controller or a node sent is read as markup) and exit as the other operator verbs: 0
success, 1 a deployment waited for that did not succeed (``health``: a controller whose
broker link is not up), 2 bad input or a refusal, 3 still running when ``--timeout`` ran
out, 5 no answer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from edgeslim.commands.fleet import (
    _CLIENT_TOKEN_HELP,
    _cell,
    _client,
    _number,
    _token_option,
    finish_deployment,
    fleet_app,
    wide_console,
)

_CONTROLLER_HELP = "Controller HTTP URL."


def _when(ts: Any) -> str:
    """Unix seconds as local time (``-`` for none)."""
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _table(title: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> Any:
    from rich.table import Table

    t = Table(title=_cell(title))
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*(_cell(v) for v in row))
    return t


def _show(doc: Any, as_json: bool, table: Any) -> None:
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        wide_console().print(table())


def bundles_table(rows: list[dict[str, Any]], title: str = "bundles") -> Any:
    """A table of ``GET /bundles`` rows (or one upload's answer)."""
    return _table(title, ("sha256", "name", "version", "size", "verified", "added"), [
        (b["sha256"], b.get("name", "-"), b.get("version", "-"), b.get("size", "-"),
         "yes" if b.get("verified") else "no", _when(b.get("added")))
        for b in rows
    ])  # fmt: skip


def deployments_table(rows: list[dict[str, Any]]) -> Any:
    """A table of ``GET /deployments`` rows, one line each."""
    def line(d: dict[str, Any]) -> tuple[Any, ...]:
        done = sum(t.get("state") == "installed" for t in d["targets"])
        return (d["id"], d["state"], str(d.get("bundle_sha") or "-")[:12],
                f"{done}/{len(d['targets'])}", _when(d.get("created")),
                _when(d.get("finished")), str(d["reason"])[:80])  # fmt: skip

    return _table("deployments", ("id", "state", "bundle", "installed", "created", "finished",
                                  "reason"), [line(d) for d in rows])  # fmt: skip


def records_table(rows: list[dict[str, Any]]) -> Any:
    """A table of ``GET /records`` rows; each body as compact JSON, cut at 120 characters."""
    return _table("records", ("received", "node", "kind", "body"), [
        (_when(r.get("received")), r["node"], r["kind"],
         json.dumps(r["body"], separators=(",", ":"))[:120])
        for r in rows
    ])  # fmt: skip


@fleet_app.command("upload")
def upload_cmd(
    bundle: Path = typer.Argument(..., help="The .eslim file to store."),
    controller: str = typer.Option(..., "--controller", help=_CONTROLLER_HELP),
    force: bool = typer.Option(False, help="Store a bundle the controller cannot verify."),
    as_json: bool = typer.Option(False, "--json", help="Print the answer as JSON."),
    token: str | None = _token_option(_CLIENT_TOKEN_HELP),
) -> None:
    """Store BUNDLE on the controller (by its sha256) without deploying it."""
    with _client(controller, token) as client:
        row = client.upload(bundle, force=force)
    _show(row, as_json, lambda: bundles_table([row], title="uploaded"))


@fleet_app.command("bundles")
def bundles_cmd(
    controller: str = typer.Option(..., "--controller", help=_CONTROLLER_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    token: str | None = _token_option(_CLIENT_TOKEN_HELP),
) -> None:
    """List the bundles the controller stores: sha256, model name, version, size."""
    with _client(controller, token) as client:
        rows = client.bundles()
    _show(rows, as_json, lambda: bundles_table(rows))


@fleet_app.command("deployments")
def deployments_cmd(
    deployment: str | None = typer.Argument(
        None, help="A deployment id or 'latest': show that one with its targets."),
    controller: str = typer.Option(..., "--controller", help=_CONTROLLER_HELP),
    wait: bool = typer.Option(False, help="Wait until DEPLOYMENT ends (exit 1 unless it "
                                          "succeeded)."),
    timeout: float = typer.Option(600.0, help="Seconds --wait waits (> 0)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    token: str | None = _token_option(_CLIENT_TOKEN_HELP),
) -> None:
    """List every deployment, or show one (--wait: until it ends, as deploy does)."""
    from edgeslim.errors import ConfigError
    from edgeslim.fleet.client import deployment_ref

    if deployment is None:
        if wait:
            raise ConfigError("--wait needs a DEPLOYMENT (an id or 'latest') to wait for.")
        with _client(controller, token) as client:
            rows = client.deployments()
        _show(rows, as_json, lambda: deployments_table(rows))
        return
    deployment_ref(deployment, "DEPLOYMENT")
    _number(timeout, "--timeout", "a positive number of seconds")
    with _client(controller, token) as client:
        row = client.wait(deployment, timeout=timeout) if wait else client.deployment(deployment)
    finish_deployment(row, as_json, wait)


@fleet_app.command("records")
def records_cmd(
    controller: str = typer.Option(..., "--controller", help=_CONTROLLER_HELP),
    node: str | None = typer.Option(None, "--node", help="Only this node's records."),
    kind: str | None = typer.Option(
        None, "--kind", help="Only this kind: telemetry, report, result or event."),
    since: float = typer.Option(
        0.0, "--since", help="Only records received at or after this time (Unix seconds)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    token: str | None = _token_option(_CLIENT_TOKEN_HELP),
) -> None:
    """List the records nodes sent (telemetry, install reports, results, events)."""
    from edgeslim.errors import ConfigError
    from edgeslim.fleet.protocol import RECORD_KINDS

    if kind is not None and kind not in RECORD_KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(RECORD_KINDS)}. Got {kind!r} "
                          "instead.")  # fmt: skip
    if node is not None and not node:
        raise ConfigError("--node must be a node id. Got '' instead.")
    _number(since, "--since", "a time in Unix seconds (>= 0)", allow_lo=True)
    with _client(controller, token) as client:
        rows = client.records(node=node, kind=kind, since=since)
    _show(rows, as_json, lambda: records_table(rows))


@fleet_app.command("health")
def health_cmd(
    controller: str = typer.Option(..., "--controller", help=_CONTROLLER_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the answer as JSON."),
) -> None:
    """Whether the controller answers and its broker link is up (exit 1 when it is not).

    Takes no token: ``GET /healthz`` needs none, so a token that is unset, empty or bad
    (``EDGESLIM_FLEET_TOKEN``) cannot make a probe fail."""
    from edgeslim._text import visible
    from edgeslim.fleet.backoff import LinkState
    from edgeslim.fleet.client import FleetClient, check_url

    check_url(controller, "--controller")
    with FleetClient(controller) as client:  # no _client: it would read EDGESLIM_FLEET_TOKEN
        doc = client.health()
    up = doc["broker"] == LinkState.CONNECTED.value
    if as_json:
        print(json.dumps(doc, indent=2))
    elif up:
        print(f"controller {client.url}: ok, broker {doc['broker']}")
    else:
        print(f"controller {client.url}: answers, but its broker link is "
              f"{visible(str(doc['broker']))}")  # fmt: skip
    if not up:
        raise typer.Exit(1)
