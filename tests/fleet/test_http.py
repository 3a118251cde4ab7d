"""The fleet's HTTP server thread (controller API, node fallbacks): ``stop`` is bounded even
when a client stalls mid-request, and the port is free afterwards.

The stalled client is a raw socket that sends the headers of a POST with a 1000-byte body and
part of that body, then nothing: the app waits for the rest, and the client never hangs up.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from edgeslim.fleet._http import ServerThread
from tests.fleet.conftest import needs_broker

HEAD = "POST {path} HTTP/1.1\r\nHost: fleet\r\nContent-Length: 1000\r\n\r\n"


def _stall(port: int, path: str = "/echo") -> socket.socket:
    """A connection that has sent the headers and 10 bytes of a 1000-byte body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(HEAD.format(path=path).encode() + b"x" * 10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _echo_app():
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def echo(request):
        return Response(await request.body())

    return Starlette(routes=[Route("/echo", echo, methods=["POST"])])


def _refused(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
    return False


def test_stop_hangs_up_on_a_stalled_client_and_frees_the_port():
    server = ServerThread(_echo_app(), name="test-http").start()
    thread = server._thread
    port = server.port
    stalled = _stall(port)
    late = _stall(port)  # sends the rest of its body during the drain
    try:
        time.sleep(0.3)  # both requests are in the app, waiting for their bodies
        done = threading.Event()
        t0 = time.monotonic()
        stopper = threading.Thread(target=lambda: (server.stop(timeout=1.5), done.set()))
        stopper.start()
        time.sleep(0.3)
        late.sendall(b"y" * 990)
        answer = _read_all(late)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
        assert answer.endswith(b"x" * 10 + b"y" * 990)
        assert done.wait(10), "ServerThread.stop() did not return"
        took = time.monotonic() - t0
        assert not thread.is_alive(), "the server thread still runs after stop()"
        assert 1.0 < took < 5, took  # waited for the drain, then no longer
        assert _read_all(stalled) == b""  # hung up on, without an answer
        assert _refused(port)
        again = ServerThread(_echo_app(), port=port, name="test-http-again").start()
        again.stop()
    finally:
        stalled.close()
        late.close()


@needs_broker
def test_controller_stop_is_not_held_by_a_stalled_upload(broker, tmp_path):
    """A client that stops mid-upload no longer keeps the controller's API thread (and its
    port) alive past ``Controller.stop``; a controller restarted on the port serves."""
    import httpx

    from edgeslim.fleet.broker import free_port
    from edgeslim.fleet.controller import Controller

    port = free_port()
    c = Controller(broker.url("controller"), tmp_path / "ctl", http_port=port).start()
    http = c.http._thread
    stalled = _stall(port, "/bundles")
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        c.stop()
        took = time.monotonic() - t0
        assert not http.is_alive(), "the controller's HTTP thread still runs after stop()"
        assert took < 9, took
        stalled.settimeout(5)
        assert _read_all(stalled) == b""
        assert _refused(port)
    finally:
        stalled.close()
    c = Controller(broker.url("controller"), tmp_path / "ctl", http_port=port).start()
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    finally:
        c.stop()


@pytest.mark.parametrize("timeout", [0.0, 0.5])
def test_stop_without_clients_returns_at_once(timeout):
    server = ServerThread(_echo_app(), name="test-http").start()
    t0 = time.monotonic()
    server.stop(timeout=timeout)
    assert time.monotonic() - t0 < 1.0
    assert not server._thread.is_alive()
