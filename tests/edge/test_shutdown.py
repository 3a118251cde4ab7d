"""Shutdown is bounded: requests in flight get the drain to finish, a stalled client does not
keep the process (or ``EdgeServer.stop``) waiting for ever, and a second signal stops at once.

The stalled client is a raw socket that sends the headers of an infer request and part of
its body, then nothing: the server cannot answer it, and it never hangs up.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgeslim.edge.server import EdgeServer
from edgeslim.errors import ConfigError

BODY = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                               "data": [0.25] * 64}]}).encode()
HEAD = ("POST /v2/models/linear/infer HTTP/1.1\r\nHost: edge\r\n"
        "Content-Type: application/json\r\nContent-Length: {n}\r\n\r\n")


def _stall(port: int, *, length: int = len(BODY), sent: int = 10) -> socket.socket:
    """A connection that has sent the headers and ``sent`` bytes of a ``length``-byte body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(HEAD.format(n=length).encode() + BODY[:sent])
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


class _Serve:
    """``edgeslim serve`` in a subprocess; ``port`` once it listens."""

    def __init__(self, bundle: Path, *args: str) -> None:
        import edgeslim

        src = str(Path(edgeslim.__file__).resolve().parents[1])
        env = {k: v for k, v in os.environ.items() if k != "EDGESLIM_TOKEN"}
        env.update({"PYTHONPATH": src, "OMP_NUM_THREADS": "1"})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeslim.cli", "serve", str(bundle), "--port", "0",
             "--threads", "1", *args],
            env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        if port is None:
            self.kill()
            pytest.fail("edgeslim serve did not start:\n" + "".join(self.lines))
        self.port = port
        while time.monotonic() < deadline:  # announced once bound; accepting a moment later
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                break
            except ConnectionRefusedError:
                time.sleep(0.05)
        # the rest of stderr, read as it comes so the pipe never fills
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr),
                                        daemon=True)
        self._reader.start()

    def wait(self, timeout: float) -> tuple[int | None, float]:
        """Exit status (None: still running after ``timeout``) and the seconds it took."""
        t0 = time.monotonic()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        return rc, time.monotonic() - t0

    @property
    def stderr(self) -> str:
        self._reader.join(5)
        return "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def test_sigterm_drains_then_exits_despite_a_stalled_client(edge_bundles):
    serve = _Serve(edge_bundles["linear"], "--drain", "2")
    stalled = late = None
    try:
        stalled = _stall(serve.port)                # never sends the rest
        late = _stall(serve.port)                   # sends the rest during the drain
        time.sleep(0.3)                             # both requests are in the server
        t0 = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        late.sendall(BODY[10:])
        answer = _read_all(late)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
        assert b'"outputs"' in answer
        rc, _ = serve.wait(timeout=15)
        took = time.monotonic() - t0
        assert rc == 0, f"rc={rc} after {took:.1f} s\n{serve.stderr}"
        assert 1.5 < took < 8, took                 # waited for the drain, then no longer
        assert _read_all(stalled) == b""            # hung up on, without an answer
        err = serve.stderr
        assert "Traceback" not in err and "CancelledError" not in err, err
        assert "1 connection still open after the 2 s drain" in err, err
    finally:
        for sock in (stalled, late):
            if sock is not None:
                sock.close()
        serve.kill()


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_stops_the_drain_at_once(edge_bundles, second):
    serve = _Serve(edge_bundles["linear"], "--drain", "60")
    stalled = None
    try:
        stalled = _stall(serve.port)
        time.sleep(0.3)
        serve.proc.send_signal(signal.SIGTERM)
        rc, _ = serve.wait(timeout=1)
        assert rc is None                           # draining: the stalled request may finish
        serve.proc.send_signal(second)
        rc, took = serve.wait(timeout=10)
        assert rc == 0 and took < 5, f"rc={rc} after {took:.1f} s\n{serve.stderr}"
        err = serve.stderr
        assert "Traceback" not in err and "CancelledError" not in err, err
    finally:
        if stalled is not None:
            stalled.close()
        serve.kill()


def test_stop_is_bounded_by_its_timeout_and_hangs_up_on_a_stalled_client(edge_bundles):
    server = EdgeServer([edge_bundles["linear"]], threads=1, drain_s=30).start()
    thread = server._thread
    stalled = _stall(server.port)
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        server.stop(timeout=1)
        took = time.monotonic() - t0
        assert not thread.is_alive(), "the server thread still runs after stop()"
        assert took < 5, took
        stalled.settimeout(5)
        assert _read_all(stalled) == b""
    finally:
        stalled.close()


def test_drain_must_be_a_finite_number_of_seconds(edge_bundles, capsys):
    from edgeslim.cli import main

    with pytest.raises(ConfigError, match=r"'drain_s' parameter of EdgeServer must be a finite "
                                          r"float >= 0\. Got -1 instead"):
        EdgeServer([edge_bundles["linear"]], drain_s=-1)
    assert main(["serve", str(edge_bundles["linear"]), "--drain", "-1"]) == 2
    assert "Invalid value for '--drain'" in capsys.readouterr().err
