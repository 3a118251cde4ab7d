"""The edge server's HTTP tuning: coalesced writes, bodies read without pausing, malloc."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import numpy as np
import onnxruntime as ort
import pytest

from edgeslim.bundle import read_bundle
from edgeslim.edge._http import _CoalescingTransport, tune_malloc
from edgeslim.errors import ConfigError


def test_writes_of_one_loop_turn_leave_together_in_order_and_close_flushes():
    async def main():
        loop = asyncio.get_running_loop()
        ours, peer = socket.socketpair()
        peer.setblocking(False)
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        t = _CoalescingTransport(transport, loop)
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(memoryview(b"body-1"))
        with pytest.raises(BlockingIOError):  # nothing is sent before the turn ends
            peer.recv(100)
        assert t.get_write_buffer_size() == 25
        await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        first = peer.recv(100)
        t.write(b"second")
        t.close()  # sends what is pending, then closes
        await asyncio.sleep(0.01)
        rest = peer.recv(100)
        eof = peer.recv(100)
        peer.close()
        return first, rest, eof, t.is_closing()

    first, rest, eof, closing = asyncio.run(main())
    assert first == b"HTTP/1.1 200 OK\r\n\r\nbody-1"
    assert rest == b"second" and eof == b"" and closing


def _raw_post(port: int, path: str, head: bytes, tail: bytes, token: str, chunk: int,
              chunked: bool = False) -> tuple:
    """POST over a raw socket, the body in ``chunk``-byte pieces with pauses (a slow client),
    sent from a thread while this one reads the answer (which may come before the body ends).
    ``chunked``: Transfer-Encoding chunked instead of a Content-Length."""
    import threading

    body = head + tail
    length = ("Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}")
    request = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
               f"{length}\r\nInference-Header-Content-Length: {len(head)}\r\n"
               f"Content-Type: application/octet-stream\r\n\r\n").encode()

    def send(s: socket.socket) -> None:
        try:
            s.sendall(request)
            for i in range(0, len(body), chunk):
                piece = body[i:i + chunk]
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                if (i // chunk) % 16 == 0:
                    time.sleep(0.002)
            if chunked:
                s.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered early and closed
            pass

    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        sender = threading.Thread(target=send, args=(s,))
        sender.start()
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head_end = data.index(b"\r\n\r\n") + 4
        fields = dict(line.split(b": ", 1) for line in data[:head_end - 4].split(b"\r\n")[1:])
        n = int(fields[b"content-length"])
        while len(data) - head_end < n:
            data += s.recv(65536)
        s.shutdown(socket.SHUT_RDWR)
        sender.join(30)
        return int(data.split(b" ", 2)[1]), fields, data[head_end:]


def test_a_large_body_sent_slowly_in_small_pieces_gives_the_onnxruntime_answer(
        server, edge_bundles):
    from tests.edge.conftest import TOKEN

    rows = 3000  # 768 kB of float32, under the fixture's 1 MiB limit, over uvicorn's 64 kB
    x = np.random.default_rng(3).normal(size=(rows, 64)).astype(np.float32)
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 64],
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    status, fields, body = _raw_post(server.port, "/v2/models/linear/infer", head, x.tobytes(),
                                     TOKEN, chunk=4096)
    assert status == 200, body[:300]
    hl = int(fields[b"inference-header-content-length"])
    got = np.frombuffer(body[hl:], np.float32).reshape(rows, 10)
    bundle = read_bundle(edge_bundles["linear"])
    sess = ort.InferenceSession(bundle.model_bytes, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(got, sess.run(None, {"input": x})[0])


def test_a_body_over_the_limit_is_refused_even_when_read_without_pausing(server):
    from tests.edge.conftest import TOKEN

    rows = 5000  # 1.28 MB > 1 MiB
    x = np.zeros((rows, 64), np.float32)
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 64],
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    status, _, body = _raw_post(server.port, "/v2/models/linear/infer", head, x.tobytes(),
                                TOKEN, chunk=65536, chunked=True)  # no declared length
    assert status == 413 and "1048576 bytes" in json.loads(body)["error"]


def test_tune_malloc_is_idempotent():
    first = tune_malloc()
    assert tune_malloc() is first
    import platform
    import sys

    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert first is True


def test_inline_ms_is_validated():
    from edgeslim.edge.server import EdgeServer

    with pytest.raises(ConfigError, match="inline_ms"):
        EdgeServer([], inline_ms=-1)


def test_the_server_counts_its_open_connections(server):
    import httpx

    with httpx.Client(base_url=server.url) as one:
        assert one.get("/v2/health/live").status_code == 200
        assert server.connections.open >= 1
        base = server.connections.open
        with socket.create_connection(("127.0.0.1", server.port)) as two:
            two.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert two.recv(100).startswith(b"HTTP/1.1 200")
            assert server.connections.open == base + 1
        deadline = time.monotonic() + 5
        while server.connections.open != base and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.connections.open == base


def _batch_sizes(url: str) -> tuple[float, float]:
    """(model runs, rows run) of model ``linear`` from the server's /metrics."""
    import httpx

    text = httpx.get(url + "/metrics").text
    values = {}
    for line in text.splitlines():
        for key in ("edgeslim_batch_size_count", "edgeslim_batch_size_sum"):
            if line.startswith(key + '{model="linear"}'):
                values[key] = float(line.rsplit(" ", 1)[1])
    return values.get("edgeslim_batch_size_count", 0.0), values.get("edgeslim_batch_size_sum",
                                                                       0.0)


def _read_answer(s: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head_end = data.index(b"\r\n\r\n") + 4
    fields = dict(line.split(b": ", 1) for line in data[:head_end - 4].split(b"\r\n")[1:])
    while len(data) - head_end < int(fields[b"content-length"]):
        data += s.recv(65536)
    return int(data.split(b" ", 2)[1]), data[head_end:]


def test_a_batch_waits_for_a_request_whose_body_is_still_arriving(edge_bundles):
    """The window counts a request from its headers on, not from its last body byte: a whole
    request arriving while another's body is on its way waits for it (up to the window), and
    both run as one batch."""
    import threading

    import httpx

    from edgeslim.edge.server import EdgeServer

    rng = np.random.default_rng(5)
    xa, xb = (rng.normal(size=(1, 64)).astype(np.float32) for _ in range(2))
    sess = ort.InferenceSession(read_bundle(edge_bundles["linear"]).model_bytes,
                                providers=["CPUExecutionProvider"])

    def body(x: np.ndarray) -> bytes:
        return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                       "data": x.ravel().tolist()}]}).encode()

    srv = EdgeServer([edge_bundles["linear"]], threads=1, batch_window_ms=5000).start()
    try:
        batcher = srv.store.get("linear").batcher
        before = _batch_sizes(srv.url)
        b = body(xb)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as slow:
            slow.sendall(b"POST /v2/models/linear/infer HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(b), b[:len(b) // 2]))
            deadline = time.monotonic() + 10
            while batcher._expected == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert batcher._expected == 1  # admitted while its body is still coming
            answers: list[httpx.Response] = []
            whole = threading.Thread(target=lambda: answers.append(
                httpx.post(srv.url + "/v2/models/linear/infer", content=body(xa), timeout=30)))
            whole.start()
            time.sleep(0.3)
            assert whole.is_alive()  # the whole request waits for its company
            assert _batch_sizes(srv.url) == before  # and nothing has run yet
            slow.sendall(b[len(b) // 2:])
            whole.join(30)
            status, raw = _read_answer(slow)
        after = _batch_sizes(srv.url)
    finally:
        srv.stop()
    assert status == 200 and answers[0].status_code == 200
    assert (after[0] - before[0], after[1] - before[1]) == (1, 2)  # one run of both rows
    np.testing.assert_allclose(answers[0].json()["outputs"][0]["data"],
                               sess.run(None, {"input": xa})[0].ravel(), rtol=1e-6)
    np.testing.assert_allclose(json.loads(raw)["outputs"][0]["data"],
                               sess.run(None, {"input": xb})[0].ravel(), rtol=1e-6)
