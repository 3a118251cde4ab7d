"""The controller's HTTP API: content-addressed bundles with Range, verification, errors."""

from __future__ import annotations

import httpx
import pytest

from edgeslim.fleet.rollout import RolloutParams
from tests.fleet.conftest import needs_broker, sha_of

pytestmark = needs_broker


@pytest.fixture
def api(controller):
    with httpx.Client(base_url=controller.url, timeout=10) as client:
        yield client


def test_upload_is_content_addressed_and_ranges_resume(api, bundles):
    data = bundles["v1"].read_bytes()
    r = api.post("/bundles", content=data)
    assert r.status_code == 201
    info = r.json()
    assert info["sha256"] == sha_of(bundles["v1"]) and info["verified"] is True
    assert info["name"] == "digits-linear" and info["size"] == len(data)
    whole = api.get(f"/bundles/{info['sha256']}")
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["etag"] == f'"{info["sha256"]}"'
    assert whole.headers["accept-ranges"] == "bytes"
    part = api.get(f"/bundles/{info['sha256']}", headers={"Range": "bytes=100-"})
    assert part.status_code == 206 and part.content == data[100:]
    assert part.headers["content-range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
    past = api.get(f"/bundles/{info['sha256']}", headers={"Range": f"bytes={len(data) + 5}-"})
    assert past.status_code == 416
    assert [b["sha256"] for b in api.get("/bundles").json()] == [info["sha256"]]


def test_bundles_that_do_not_verify_are_refused_unless_forced(api, controller, bundles):
    for role in ("foreign", "unsigned"):
        r = api.post("/bundles", content=bundles[role].read_bytes())
        assert r.status_code == 422, r.text
        assert "signature" in r.json()["error"].lower() or "signed" in r.json()["error"]
        assert ".tmp" not in r.json()["error"]  # the upload is named, not a scratch file
    assert not [p.name for p in controller.bundles_dir.iterdir() if p.name.startswith(".")]
    r = api.post("/bundles", params={"force": "1"}, content=bundles["foreign"].read_bytes())
    assert r.status_code == 201 and r.json()["verified"] is False
    corrupt = api.post("/bundles", content=b"PK\x03\x04 not a zip")
    assert corrupt.status_code == 400


def test_api_errors_name_the_problem(api, controller, bundles):
    assert api.get("/bundles/" + "0" * 64).status_code == 404
    assert api.get("/bundles/not-a-sha").status_code == 400
    r = api.post("/deployments", json={"bundle": "0" * 64})
    assert r.status_code == 404 and "upload it first" in r.json()["error"]
    r = api.post("/deployments", json={"bundle": "0" * 64, "params": {"canary": 2}})
    assert r.status_code == 400 and "'canary'" in r.json()["error"]
    r = api.post("/deployments", json={"bundle": "0" * 64, "params": {"colour": 1}})
    assert r.status_code == 400 and "Unknown rollout parameters ['colour']" in r.json()["error"]
    r = api.post("/deployments", content=b"{not json")
    assert r.status_code == 400
    sha = api.post("/bundles", content=bundles["v1"].read_bytes()).json()["sha256"]
    r = api.post("/deployments", json={"bundle": sha, "selector": {"site": "mars"}})
    assert r.status_code == 404 and "No online node" in r.json()["error"]
    forced = api.post("/bundles", params={"force": "1"}, content=bundles["foreign"].read_bytes())
    with pytest.raises(Exception, match="did not verify"):
        controller.deploy(forced.json()["sha256"], params=RolloutParams())
    assert api.get("/deployments/99").status_code == 404
    assert api.post("/deployments/latest/rollback").status_code == 404
    assert api.post("/deployments/x1/rollback").status_code == 400
    assert api.get("/healthz").json()["broker"] == "connected"


def _chunks(total: int, size: int = 1 << 16):
    """``total`` bytes sent chunked (no Content-Length), from one reused buffer."""
    block = b"\0" * size
    for start in range(0, total, size):
        yield block[: min(size, total - start)]


def test_a_chunked_upload_over_the_limit_is_refused_as_it_streams(api, controller, bundles,
                                                                 monkeypatch):  # fmt: skip
    """The limit holds without a Content-Length: the upload stops at the limit (413) and its
    temporary file is gone; uploads within the limit still work, chunked or not."""
    import edgeslim.fleet.api as api_module

    data = bundles["v1"].read_bytes()
    monkeypatch.setattr(api_module, "MAX_UPLOAD", len(data) + 1000)
    r = api.post("/bundles", content=_chunks(8 * len(data)))
    assert r.status_code == 413, r.text
    assert f"over the limit of {len(data) + 1000}" in r.json()["error"]
    assert not list(controller.bundles_dir.iterdir())  # neither a temporary file nor a bundle
    r = api.post("/bundles", content=b"\0" * (len(data) + 1001))  # declared: refused unread
    assert r.status_code == 413
    r = api.post("/bundles", content=(data[i:i + 4096] for i in range(0, len(data), 4096)))
    assert r.status_code == 201 and r.json()["sha256"] == sha_of(bundles["v1"])
    assert [p.name for p in controller.bundles_dir.iterdir()] == [f"{sha_of(bundles['v1'])}.eslim"]


def test_an_upload_is_not_held_in_memory(api, controller):
    """A large allowed upload streams to disk: the controller's peak allocation stays a
    fraction of it (the body used to be buffered whole, then copied)."""
    import tracemalloc

    total = 48 << 20
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        r = api.post("/bundles", content=_chunks(total, 1 << 20))
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert r.status_code == 400, r.text  # not a bundle: read from disk, then removed
    assert peak < total // 4, f"peak {peak >> 20} MiB for a {total >> 20} MiB upload"
    assert not list(controller.bundles_dir.iterdir())


def _small_files(limit: int) -> None:
    """In the child: no file may grow past ``limit`` bytes (a write past it fails with EFBIG,
    as on a full disk; SIGXFSZ, which would kill the process instead, is ignored)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_an_upload_the_disk_cannot_take_is_a_507_and_leaves_nothing(broker, tmp_path, keys):
    """A full disk made the upload a 500 with a uvicorn traceback."""
    import functools
    import os
    import subprocess
    import sys

    from edgeslim.errors import ConfigError
    from edgeslim.fleet.broker import free_port
    from edgeslim.fleet.client import FleetClient
    from edgeslim.fleet.demo import stop_process, wait_until

    port = free_port()
    data = tmp_path / "ctl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeslim.cli", "fleet", "controller", "--broker",
         broker.url("controller"), "--http-port", str(port), "--data", str(data),
         "--public-key", str(keys[1])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=functools.partial(_small_files, 256 << 10),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return httpx.get(f"{url}/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 30, what="the controller process")
        r = httpx.post(f"{url}/bundles", content=os.urandom(600_000), timeout=30)
        assert r.status_code == 507, r.text
        assert "cannot store the bundle" in r.json()["error"]
        with FleetClient(url) as fleet, pytest.raises(ConfigError, match="507"):
            fleet.upload(os.urandom(600_000))
        assert [p.name for p in (data / "bundles").iterdir()] == []
        assert httpx.get(f"{url}/bundles").json() == []
    finally:
        stop_process(proc)
    log = proc.stdout.read().decode() if proc.stdout else ""
    assert "Traceback" not in log, log
