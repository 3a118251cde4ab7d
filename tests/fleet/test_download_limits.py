"""A node's bundle download is bounded: by the announced size (else the bundle size limit)
and by a deadline. The server here is a hostile mirror: a real HTTP server that sends more
than the bundle has, or drips."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading
import time

import httpx
import pytest

from edgeslim.errors import BundleError
from edgeslim.fleet.demo import wait_until
from edgeslim.fleet.protocol import Desired, ProtocolError, encode, topic
from edgeslim.fleet.store import BundleStore
from tests.fleet.test_node_units import _worker_node

DATA = b"bundle-bytes" * 400  # 4,800 bytes, about the size of the report's bundle
SHA = hashlib.sha256(DATA).hexdigest()
MiB = 1 << 20


@contextlib.contextmanager
def mirror(*, endless: bool = False, length: int | None = None, drip: float = 0.0,
           cut: int | None = None):
    """GET answers: ``endless`` chunked zeros (up to 256 MiB) or ``DATA`` (with
    ``Content-Length: length`` when given), one byte every ``drip`` seconds when set, only
    its first ``cut`` bytes (then the connection closes) when set; Range is ignored.
    Yields (url, stats) where stats["sent"] is what the mirror managed to send."""
    stats = {"sent": 0, "gets": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            stats["gets"] += 1
            self.send_response(200)
            if endless:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = b"\0" * MiB
                with contextlib.suppress(OSError):
                    for _ in range(256):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        stats["sent"] += len(chunk)
                    self.wfile.write(b"0\r\n\r\n")
                return
            self.send_header("Content-Length", str(length if length is not None else len(DATA)))
            self.end_headers()
            with contextlib.suppress(OSError):
                if drip:
                    for i in range(len(DATA)):
                        self.wfile.write(DATA[i:i + 1])
                        self.wfile.flush()
                        stats["sent"] += 1
                        time.sleep(drip)
                else:
                    self.wfile.write(DATA[:cut])
                    stats["sent"] += len(DATA[:cut])
                    self.close_connection = cut is not None

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", stats
    finally:
        server.shutdown()
        server.server_close()


def _watch(path) -> tuple[list[int], threading.Event]:
    """The largest size ``path`` reached, sampled every few ms until the event is set."""
    peak = [0]
    done = threading.Event()

    def run() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):
                peak[0] = max(peak[0], path.stat().st_size)
            done.wait(0.005)

    threading.Thread(target=run, daemon=True).start()
    return peak, done


def test_a_mirror_that_sends_more_than_the_announced_size_is_cut_off(tmp_path):
    """A hostile mirror grew the .part file to 200 MiB for a 4,788-byte bundle before the
    sha256 check at the end; now the download stops as soon as it passes the size."""
    from edgeslim.fleet.store import TooLarge

    store = BundleStore(tmp_path / "node")
    part = store.downloads / f"{SHA}.part"
    peak, done = _watch(part)
    with (
        mirror(endless=True) as (url, _),
        httpx.Client(timeout=10) as client,
        pytest.raises(TooLarge, match=f"at most {len(DATA)}"),
    ):
        store.download(f"{url}/bundles/{SHA}", SHA, client=client, max_bytes=len(DATA))
    done.set()
    assert not part.exists() and not store.has(SHA)
    assert peak[0] <= len(DATA)


def test_an_announced_length_over_the_size_is_refused_before_writing(tmp_path):
    from edgeslim.fleet.store import TooLarge

    store = BundleStore(tmp_path / "node")
    with (
        mirror(length=200 * MiB) as (url, _),
        httpx.Client(timeout=10) as client,
        pytest.raises(TooLarge, match="announced"),
    ):
        store.download(f"{url}/bundles/{SHA}", SHA, client=client, max_bytes=len(DATA))
    assert not (store.downloads / f"{SHA}.part").exists()


def test_an_announced_length_over_the_size_and_the_free_space_is_too_large_not_no_space(
    tmp_path,
):
    """A server announcing a petabyte was reported as a full disk (the space check ran
    first), pointing the operator at the node's disk rather than at what serves the bundle."""
    from edgeslim.fleet.store import TooLarge

    def handler(request):
        return httpx.Response(200, headers={"content-length": str(1 << 50)}, content=b"")

    store = BundleStore(tmp_path / "node")
    with (
        httpx.Client(transport=httpx.MockTransport(handler)) as client,
        pytest.raises(TooLarge, match="announced 1125899906842624 bytes"),
    ):
        store.download(f"http://c/bundles/{SHA}", SHA, client=client, max_bytes=len(DATA))
    assert not (store.downloads / f"{SHA}.part").exists()


def test_without_an_announced_size_the_bundle_limit_bounds_the_download(tmp_path):
    from edgeslim.fleet.store import MAX_BUNDLE_BYTES, TooLarge

    store = BundleStore(tmp_path / "node")
    with (
        mirror(length=MAX_BUNDLE_BYTES + 1) as (url, _),
        httpx.Client(timeout=10) as client,
        pytest.raises(TooLarge, match="bundle size limit"),
    ):
        store.download(f"{url}/bundles/{SHA}", SHA, client=client)
    # the right size still downloads and installs
    with mirror() as (url, _), httpx.Client(timeout=10) as client:
        assert store.download(f"{url}/b", SHA, client=client, max_bytes=len(DATA)).exists()


def test_a_dripping_mirror_runs_into_the_deadline_and_the_partial_is_kept(tmp_path):
    store = BundleStore(tmp_path / "node")
    with mirror(drip=0.05) as (url, _), httpx.Client(timeout=10) as client:
        t0 = time.monotonic()
        with pytest.raises(BundleError, match=r"took over 0\.5 s"):
            store.download(f"{url}/b", SHA, client=client, max_bytes=len(DATA), deadline_s=0.5)
        assert time.monotonic() - t0 < 5
    assert 0 < store.resume_offset(SHA) < len(DATA)  # for a resume


def test_a_desired_size_that_is_not_a_byte_count_is_refused():
    for size in (-1, "12", 1.5, True):
        with pytest.raises(ProtocolError, match="'size'"):
            Desired.from_dict({"deployment": 1, "sha256": SHA, "size": size})


def test_a_node_fails_an_oversize_download_at_once_and_frees_the_disk(tmp_path):
    """Through the node: the deployment fails with the reason, after one attempt (the same
    mirror would send too much again), and no partial file is left."""
    with mirror(endless=True) as (url, stats):
        port = int(url.rsplit(":", 1)[1])
        node = _worker_node(tmp_path, port, download_attempts=5)
        try:
            node._on_message(topic("desired", "n1"),
                             encode(Desired(deployment=1, sha256=SHA, name="m", size=len(DATA))))

            def reports():
                return [r.body for r in node.outbox.pending(100) if r.kind == "report"]

            wait_until(reports, 15, 0.05, "the node's report")
            (report,) = reports()
            assert report["outcome"] == "failed" and "at most 4800" in report["reason"]
            assert stats["gets"] == 1
            assert node.store.resume_offset(SHA) == 0 and not node.store.has(SHA)
        finally:
            node._stop.set()
            node._work.set()


@contextlib.contextmanager
def slow_resuming_mirror(data: bytes, bytes_per_s: float):
    """GET answers ``data`` from the ``Range: bytes=N-`` offset (206), 100 bytes at a time at
    about ``bytes_per_s``; yields (url, offsets asked for)."""
    import re

    offsets: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            start = int(m[1]) if m else 0
            offsets.append(start)
            self.send_response(206 if m else 200)
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            with contextlib.suppress(OSError):
                for i in range(start, len(data), 100):
                    self.wfile.write(data[i:i + 100])
                    self.wfile.flush()
                    time.sleep(100 / bytes_per_s)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", offsets
    finally:
        server.shutdown()
        server.server_close()


def test_a_slow_link_that_progresses_on_every_attempt_is_not_given_up(tmp_path):
    """Each attempt was cut by the deadline and counted against the retries even when it
    resumed further, so a bundle larger than about deadline x link rate could never install
    (the partial was deleted after the last attempt). Only attempts that get no further
    count: here each gets a fifth of the way, with 2 attempts allowed."""
    with slow_resuming_mirror(DATA, bytes_per_s=4000) as (url, offsets):
        node = _worker_node(tmp_path, int(url.rsplit(":", 1)[1]), download_attempts=2,
                            download_deadline_s=0.25)  # fmt: skip
        try:
            d = Desired(deployment=1, sha256=SHA, name="m", size=len(DATA))
            node._desired = d
            assert node._download(d) == node.store.path(SHA)
        finally:
            node._stop.set()
            node._work.set()
    assert len(offsets) > 2 and offsets == sorted(set(offsets)), offsets
    assert node.store.has(SHA)


def test_attempts_that_get_no_further_still_give_the_download_up(tmp_path):
    """A server that ignores Range and breaks off at the same byte starts over each time:
    after the first attempt that is no progress, and the attempts run out (the partial file
    is deleted)."""
    with mirror(cut=1000) as (url, stats):
        node = _worker_node(tmp_path, int(url.rsplit(":", 1)[1]), download_attempts=3)
        try:
            d = Desired(deployment=1, sha256=SHA, name="m", size=len(DATA))
            node._desired = d
            with pytest.raises(BundleError, match="3 times in a row without progress"):
                node._download(d)
        finally:
            node._stop.set()
            node._work.set()
    assert stats["gets"] == 4, stats  # the first got somewhere, the next 3 no further
    assert node.store.resume_offset(SHA) == 0
