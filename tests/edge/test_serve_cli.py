"""``edgeslim serve`` refuses bad bundles and bad signatures before listening."""

from __future__ import annotations

import pytest

from edgeslim.bundle import generate_keypair
from edgeslim.cli import main
from edgeslim.edge.server import EdgeServer
from edgeslim.errors import ConfigError


def test_serve_refuses_unsigned_bundle_under_public_key(edge_bundles, tmp_path, capsys):
    _, pub = generate_keypair(tmp_path / "keys")
    rc = main(["serve", str(edge_bundles["linear"]), "--port", "0", "--public-key", str(pub)])
    assert rc == 4
    assert "not signed" in capsys.readouterr().err


def test_serve_refuses_missing_bundle_and_bad_options(edge_bundles, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope.eslim"), "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", str(edge_bundles["linear"]), "--max-batch", "0"]) == 2
    assert "Invalid value for '--max-batch'" in capsys.readouterr().err  # the flag, not Python
    assert main(["serve", str(edge_bundles["linear"]), "--port", "70000"]) == 2
    assert "Invalid value for '--port'" in capsys.readouterr().err


def test_serve_refuses_two_bundles_of_one_model_name(edge_bundles, tmp_path, capsys):
    import shutil

    twin = shutil.copy(edge_bundles["linear"], tmp_path / "twin.eslim")
    assert main(["serve", str(edge_bundles["linear"]), str(twin), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "two bundles hold the model 'linear'" in err and "twin.eslim" in err


def test_server_passes_spin_to_every_model(edge_bundles):
    key = "session.intra_op.allow_spinning"
    server = EdgeServer([edge_bundles["linear"]], threads=2, spin=False)
    try:
        (model,) = [server.store.get(n) for n in server.store.names()]
        assert model.runner.session.get_session_options().get_session_config_entry(key) == "0"
    finally:
        server.stop()
    with pytest.raises(ConfigError, match="'spin'"):
        EdgeServer([edge_bundles["linear"]], spin=1)


def test_a_busy_port_is_refused_before_anything_is_announced(edge_bundles, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(edge_bundles["linear"]), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "Cannot listen on 127.0.0.1" in err and "serving" not in err


def _serve(args: list[str], env: dict[str, str] | None = None):
    """``edgeslim serve ARGS`` in a subprocess, which must exit by itself within a minute
    (a server that starts instead would run until the timeout)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import edgeslim

    src = str(Path(edgeslim.__file__).resolve().parents[1])
    full_env = {k: v for k, v in os.environ.items() if k != "EDGESLIM_TOKEN"}
    full_env.update({"PYTHONPATH": src, "OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "edgeslim.cli", "serve", *args], env=full_env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "env"), [(["--token", ""], None),
                                           (["--token", "  "], None),
                                           ([], {"EDGESLIM_TOKEN": ""})])
def test_an_empty_token_is_refused_not_read_as_no_auth(edge_bundles, args, env):
    proc = _serve([str(edge_bundles["linear"]), "--port", "0", *args], env)
    assert proc.returncode == 2, proc.stderr
    assert "error: --token (or EDGESLIM_TOKEN) is empty; give a token" in proc.stderr
    assert "listening" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_body_limit_under_1_kb_is_refused(edge_bundles):
    proc = _serve([str(edge_bundles["linear"]), "--port", "0", "--max-body-mb", "1e-9"])
    assert proc.returncode == 2, proc.stderr
    assert "Invalid value for '--max-body-mb'" in proc.stderr and "0.001" in proc.stderr
    with pytest.raises(ConfigError, match=r"'max_body_mb' parameter of EdgeServer must be at "
                                          r"least 0\.001 .* Got 1e-09 instead"):
        EdgeServer([edge_bundles["linear"]], max_body_mb=1e-9)
    server = EdgeServer([edge_bundles["linear"]], max_body_mb=0.001)
    assert server.max_body_bytes == 1048
    server.stop()
