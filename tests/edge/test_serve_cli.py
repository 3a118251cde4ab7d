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
