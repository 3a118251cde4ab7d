"""What the fleet verbs print comes from nodes and the controller: it is shown as text, never
read as rich markup, and control characters never reach the terminal."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from edgeslim.cli import main
from edgeslim.commands.fleet import status_table

HOSTILE = {
    "labels": {"site": "[/]", "zone": "[bold red]x"},
    "model_name": "m\x1b]0;pwned\x07",
    "model_version": "[link=http://evil.example]click[/link]",
    "health": "[/]ok",
    "state": "\x1b]8;;http://evil.example\x1b\\serving\x1b]8;;\x1b\\",
}


def _node(**kw):
    row = {"id": "edge-1", "labels": {"site": "lab"}, "model_name": "m", "model_version": "1",
           "model_sha": "a" * 64, "bundle_sha": "b" * 64, "health": "ok", "state": "serving",
           "online": True, "age_s": 1.0}  # fmt: skip
    row.update(kw)
    return row


def _render(renderable) -> str:
    buf = io.StringIO()
    Console(file=buf, width=250, force_terminal=True, color_system="truecolor").print(renderable)
    return buf.getvalue()


def _assert_inert(out: str) -> None:
    assert "\x1b]" not in out  # no OSC: no hyperlink, no window title
    assert "\x07" not in out and "evil.example\x1b" not in out
    assert "pwned\x07" not in out


@pytest.mark.parametrize("field", sorted(HOSTILE))
def test_status_shows_node_strings_as_text(field):
    out = _render(status_table([_node(**{field: HOSTILE[field]})]))
    _assert_inert(out)
    if field == "labels":
        assert "site=[/]" in out and "zone=[bold red]x" in out
    elif field == "model_version":
        assert "[link=http://evil.example]click[/link]" in out
    elif field == "model_name":
        assert "\\x1b]0;pwned\\x07" in out  # shown escaped, so the tampering is visible


def test_a_deployment_shows_node_strings_as_text():
    from edgeslim.commands.fleet import deployment_table

    row = {"id": 3, "state": "rolled_back", "reason": "canary [/] \x1b]0;t\x07failed",
           "targets": [{"node": "edge-1", "phase": "canary", "state": "rolled_back",
                        "previous_sha": None,
                        "detail": "[link=http://evil.example]x[/link] \x1b[2J"}]}  # fmt: skip
    out = _render(deployment_table(row))
    _assert_inert(out)
    assert "\x1b[2J" not in out
    assert "canary [/]" in out and "[link=http://evil.example]x[/link]" in out


def test_errors_from_the_controller_show_control_characters_escaped(capsys):
    """An error text the controller (or whatever answers at its URL) sends back."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from edgeslim.fleet._http import ServerThread

    async def refuse(request):
        return JSONResponse({"error": "bad [/] \x1b]0;pwned\x07 \x1b[2J"}, status_code=400)

    server = ServerThread(Starlette(routes=[Route("/nodes", refuse)])).start()
    try:
        rc = main(["fleet", "status", "--controller", server.url])
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert rc == 2 and "bad [/] \\x1b]0;pwned\\x07 \\x1b[2J" in err, err
    assert "\x1b" not in err and "\x07" not in err


def test_the_demo_shows_the_deployment_reason_and_the_answered_versions_as_text():
    """The reason comes from the controller (quoting nodes) and the versions from the nodes'
    answers: the demo printed both as rich markup."""
    from edgeslim.fleet.demo import TrafficClient, deploy_line, traffic_line

    row = {"state": "rolled_back", "reason": "canary [/] [link=http://evil.example]x[/link] "
                                             "\x1b]0;pwned\x07"}  # fmt: skip
    out = _render(deploy_line("v2", "a" * 64, row, 1.0))
    _assert_inert(out)
    assert "canary [/] [link=http://evil.example]x[/link]" in out
    traffic = TrafficClient(["http://127.0.0.1:9"], "m", {})
    traffic.ok, traffic.versions = 3, {"[link=http://evil.example]2[/link]": 3}
    out = _render(traffic_line(traffic))
    _assert_inert(out)
    assert "[link=http://evil.example]2[/link]" in out
