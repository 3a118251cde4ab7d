"""The node's outbox and bundle store, the controller's registry: SQLite and files on disk."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import httpx
import pytest

from edgeslim.errors import BundleError, ConfigError
from edgeslim.fleet.outbox import Outbox
from edgeslim.fleet.protocol import ModelRef, Record, Status
from edgeslim.fleet.registry import Registry
from edgeslim.fleet.store import BundleStore, NoSpace

SHA = "c" * 64


# ---------------------------------------------------------------------- outbox
def test_outbox_keeps_order_and_ids_across_reopen_and_never_reuses_seq(tmp_path):
    box = Outbox(tmp_path / "o.db")
    recs = [box.put("event", {"i": i}) for i in range(5)]
    assert [r.seq for r in recs] == sorted(r.seq for r in recs)
    assert len({r.id for r in recs}) == 5
    assert box.ack([recs[0].id, recs[1].id, "not-there"]) == 2
    box.close()
    box = Outbox(tmp_path / "o.db")
    pending = box.pending(10)
    assert [r.body["i"] for r in pending] == [2, 3, 4]
    assert box.pending(10, after_seq=pending[0].seq)[0].body["i"] == 3
    box.ack([r.id for r in pending])
    later = box.put("event", {"i": 5})
    assert later.seq > recs[-1].seq  # AUTOINCREMENT: a deleted seq is never handed out again
    with pytest.raises(ConfigError, match="'kind'"):
        box.put("gossip", {})
    box.close()


def test_a_record_put_before_kill_9_is_on_disk(tmp_path):
    """put() returns only after the commit: a child killed right after it loses nothing."""
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        from edgeslim.fleet.outbox import Outbox
        box = Outbox({str(tmp_path / "o.db")!r})
        ids = [box.put("telemetry", {{"i": i}}).id for i in range(50)]
        print(" ".join(ids), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    printed = proc.stdout.split()
    assert len(printed) == 50
    box = Outbox(tmp_path / "o.db")
    assert [r.id for r in box.pending(100)] == printed
    box.close()


def _fill_up(db) -> None:
    """Let the database grow by two pages at most: SQLite's real "database or disk is full"
    (SQLITE_FULL), which it rolls back by itself, as on a full disk."""
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count={pages + 2}")


def test_a_full_disk_is_reported_as_such_by_the_outbox(tmp_path):
    """SQLite rolls a transaction back by itself when the disk is full: the caller must see
    "database or disk is full", not a failed ROLLBACK's "no transaction is active"."""
    box = Outbox(tmp_path / "o.db")
    box.put("event", {"i": 0})
    _fill_up(box._db)
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        box.put("event", {"blob": "x" * 200_000})
    assert not box._db.in_transaction
    box.put("report", {"deployment": 1, "outcome": "installed"})  # a small record still fits
    assert [r.kind for r in box.pending(10)] == ["event", "report"]
    box.close()


# ---------------------------------------------------------------------- registry
def _status(node: str, bundle: str | None = SHA, state: str = "serving") -> Status:
    model = ModelRef("m", "1", "d" * 64, bundle) if bundle else None
    return Status(id=node, state=state, health="ok", labels={"site": "a"}, model=model,
                  http="http://127.0.0.1:1", ts=1.0)  # fmt: skip


def test_registry_nodes_offline_and_deduplicated_records(tmp_path):
    reg = Registry(tmp_path / "r.db")
    with reg.tx() as db:
        Registry.upsert_status(db, _status("n1"), now=10.0)
        Registry.upsert_status(db, _status("n2", bundle=None), now=11.0)
    with reg.tx() as db:
        Registry.mark_offline(db, "n1")
    n1 = reg.node("n1")
    assert n1 is not None and n1.state == "offline" and n1.bundle_sha == SHA  # keeps what it had
    assert [n.id for n in reg.nodes({"site": "a"})] == ["n1", "n2"]
    assert reg.nodes({"site": "b"}) == []
    recs = [Record(id=f"r{i}", seq=i, kind="event", ts=1.0, body={"i": i}) for i in range(3)]
    with reg.tx() as db:
        assert Registry.insert_records(db, "n1", recs, now=12.0) == 3
        assert Registry.insert_records(db, "n1", recs[1:], now=13.0) == 0
        assert Registry.insert_records(db, "n2", recs[:1], now=13.0) == 1  # per node
    assert [r["seq"] for r in reg.records(node="n1")] == [0, 1, 2]
    assert reg.counter("duplicate_records") == 2
    assert reg.prune_records(before=12.5) == 3 and len(reg.records()) == 1  # retention
    # Another connection (an operator's sqlite3) can read while the registry is open: WAL.
    import sqlite3

    other = sqlite3.connect(tmp_path / "r.db")
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert other.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 1
    other.close()
    reg.close()


def test_registry_desired_state_follows_deployments_and_rollbacks(tmp_path):
    reg = Registry(tmp_path / "r.db")
    reg.add_bundle("1" * 64, "m", "1", 10, True, {})
    reg.add_bundle("2" * 64, "m", "2", 10, True, {})
    d1 = reg.create_deployment("1" * 64, {}, 0.0, {}, [("a", "rest", None), ("b", "rest", None)])
    reg.set_targets(d1, ["a", "b"], "installed")
    d2 = reg.create_deployment("2" * 64, {}, 0.5, {}, [("a", "canary", "1" * 64),
                                                       ("b", "rest", "1" * 64)])  # fmt: skip
    reg.set_targets(d2, ["a"], "sent")
    assert reg.latest_desired() == {"a": (d2, "2" * 64, False), "b": (d1, "1" * 64, False)}
    reg.set_targets(d2, ["a"], "rolled_back")
    assert reg.latest_desired()["a"] == (d2, "1" * 64, True)
    d3 = reg.create_deployment("2" * 64, {}, 0.0, {}, [("c", "rest", None)])
    reg.set_targets(d3, ["c"], "rolled_back")  # it served nothing before: nothing to serve
    assert reg.latest_desired()["c"] == (d3, None, True)
    with reg.tx() as db:  # a late install report does not undo the rollback
        Registry.report_target(db, d2, "a", "installed", "", 1.0)
    assert {t.node: t.state for t in reg.deployment(d2).targets} == {"a": "rolled_back",
                                                                      "b": "pending"}  # fmt: skip
    reg.close()


def test_a_full_disk_is_reported_as_such_by_the_registry(tmp_path):
    reg = Registry(tmp_path / "r.db")
    _fill_up(reg._db)
    big = [Record(id=f"r{i}", seq=i, kind="event", ts=1.0, body={"blob": "x" * 50_000})
           for i in range(4)]  # fmt: skip
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"), reg.tx() as db:
        Registry.insert_records(db, "n1", big, now=1.0)
    assert not reg._db.in_transaction and reg.records() == []
    with reg.tx() as db:  # the registry goes on
        Registry.upsert_status(db, _status("n1"), now=2.0)
    assert reg.node("n1") is not None
    reg.close()


# ---------------------------------------------------------------------- bundle store
def test_pointer_is_atomic_keeps_history_and_gc_keeps_only_what_it_names(tmp_path):
    store = BundleStore(tmp_path, keep=2)
    shas = []
    for i in range(4):
        data = f"bundle {i}".encode()
        sha = hashlib.sha256(data).hexdigest()
        store.path(sha).write_bytes(data)
        store.set_current(sha, f"m{i}")
        shas.append(sha)
    ptr = store.current()
    assert ptr.sha256 == shas[3] and ptr.history == [shas[2], shas[1]]
    assert store.candidates() == [shas[3], shas[2], shas[1]]
    assert not store.has(shas[0])  # collected
    with pytest.raises(BundleError, match="not installed"):
        store.set_current("e" * 64, "x")
    # Crash leftovers are removed; the pointer file is intact JSON.
    (tmp_path / ".current.123.tmp").write_text("{half")
    (tmp_path / "bundles" / f".{shas[3]}.1.tmp").write_bytes(b"x")
    assert len(store.recover()) == 2
    assert json.loads((tmp_path / "current").read_text())["sha256"] == shas[3]
    store.reject(shas[2], "bad signature")
    assert store.rejected(shas[2]) == "bad signature" and store.rejected(shas[3]) is None


def test_partial_downloads_that_will_never_resume_are_deleted(tmp_path):
    """A partial download holds disk space: it stays only while it may still be resumed."""
    store = BundleStore(tmp_path)
    installed, refused, wanted, other = (hashlib.sha256(bytes([i])).hexdigest()
                                         for i in range(4))  # fmt: skip
    store.path(installed).write_bytes(b"whole")
    store.reject(refused, "bad signature")
    for sha in (installed, refused, wanted, other):
        (store.downloads / f"{sha}.part").write_bytes(b"half")
    removed = store.recover()  # at start: the desired state is not known yet
    assert {p.name for p in removed} == {f"{installed}.part", f"{refused}.part"}
    assert store.describe()["partial"] == sorted([wanted, other])
    assert [p.stem for p in store.drop_partials(keep=wanted)] == [other]
    assert store.describe()["partial"] == [wanted] and store.resume_offset(wanted) == 4
    assert [p.stem for p in store.drop_partials()] == [wanted]  # none wanted: none kept
    assert store.describe()["partial"] == []


@pytest.fixture
def file_server(tmp_path):
    """The controller's bundle route alone: starlette FileResponse behind uvicorn."""
    from starlette.applications import Starlette
    from starlette.responses import FileResponse, PlainTextResponse
    from starlette.routing import Route

    from edgeslim.fleet._http import ServerThread

    seen: list[str | None] = []
    root = tmp_path / "served"
    root.mkdir()

    async def get(request):
        seen.append(request.headers.get("range"))
        path = root / request.path_params["name"]
        return FileResponse(path) if path.exists() else PlainTextResponse("", status_code=404)

    srv = ServerThread(Starlette(routes=[Route("/b/{name}", get)])).start()
    yield srv.url, root, seen
    srv.stop()


def _served(root, tmp_path, size: int) -> tuple[bytes, str, BundleStore]:
    """Random bytes served as /b/x, their sha256, and an empty node store to fetch them into."""
    data = os.urandom(size)
    (root / "x").write_bytes(data)
    return data, hashlib.sha256(data).hexdigest(), BundleStore(tmp_path / "node")


def test_download_resumes_a_broken_transfer_with_range(tmp_path, file_server):
    url, root, seen = file_server
    data, sha, store = _served(root, tmp_path, 300_000)
    (store.downloads / f"{sha}.part").write_bytes(data[:123_456])  # a transfer cut short
    with httpx.Client() as client:
        path = store.download(f"{url}/b/x", sha, client=client)
    assert path.read_bytes() == data
    assert seen == ["bytes=123456-"]
    assert not (store.downloads / f"{sha}.part").exists()


def test_download_refuses_bytes_that_do_not_hash_to_the_address(tmp_path, file_server):
    url, root, _ = file_server
    (root / "x").write_bytes(b"tampered bundle")
    store = BundleStore(tmp_path / "node")
    with httpx.Client() as client, pytest.raises(BundleError, match="hashes to"):
        store.download(f"{url}/b/x", SHA, client=client)
    assert not store.has(SHA) and store.resume_offset(SHA) == 0
    with httpx.Client() as client, pytest.raises(BundleError, match="no bundle"):
        store.download(f"{url}/b/missing", SHA, client=client)


def test_a_capped_download_grows_in_small_steps_and_never_beats_the_cap(tmp_path, file_server):
    import time

    url, root, _ = file_server
    data, sha, store = _served(root, tmp_path, 60_000)
    seen: list[tuple[int, float]] = []
    t0 = time.monotonic()
    with httpx.Client() as client:
        store.download(f"{url}/b/x", sha, client=client, max_rate=100_000,
                       on_progress=lambda n, total: seen.append((n, time.monotonic() - t0)))
    steps = [b - a for (a, _), (b, _) in zip([(0, 0.0), *seen[:-1]], seen, strict=True)]
    assert sum(steps) == len(data) and max(steps) <= 10_000  # a tenth of a second's worth
    for n, t in seen[1:]:  # bytes got before this chunk stayed within the cap
        assert n - 10_000 <= 100_000 * t + 1
    assert store.path(sha).read_bytes() == data


def test_a_bundle_larger_than_the_free_space_is_refused_before_a_byte_is_written(
    tmp_path, file_server
):
    """The controller announces the size (Content-Length): one that does not fit, with room
    kept for the node's records, fails at once with the reason, instead of filling the disk
    (a full disk stops the outbox: reports, telemetry and results)."""
    import shutil

    url, root, _ = file_server
    store = BundleStore(tmp_path / "node")
    size = shutil.disk_usage(store.downloads).free + (1 << 30)
    with open(root / "x", "wb") as f:  # sparse: as large as announced, using no disk
        f.truncate(size)

    def guard(n: int, total: int | None) -> None:  # should the check be missing: no full disk
        raise AssertionError(f"{n} bytes written of a bundle that cannot fit")

    with httpx.Client() as client, pytest.raises(NoSpace, match="Not enough disk space") as exc:
        # the desired state announces that size too (else the bundle size limit, 3 GiB, would
        # refuse it first on a disk with more free space than that)
        store.download(f"{url}/b/x", SHA, client=client, on_progress=guard, max_bytes=size)
    assert str(size) in str(exc.value)
    assert store.resume_offset(SHA) == 0 and not store.has(SHA)


def test_a_disk_that_fills_up_mid_download_frees_the_partial_file(tmp_path, file_server):
    """A write refused for want of space mid-download (here: a file-size limit, which
    refuses a write past it as a full disk does; unprivileged, unlike a small filesystem)
    deletes the partial file: kept, it would hold the disk full - and the node's outbox with
    it - for resumes that can only fail the same way."""
    url, root, _ = file_server
    data, sha, store = _served(root, tmp_path, 600_000)
    code = textwrap.dedent(
        f"""
        import resource, httpx
        from edgeslim.fleet.store import BundleStore
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # Python ignores SIGXFSZ
        store = BundleStore({str(store.root)!r})
        try:
            with httpx.Client() as client:
                store.download({url + "/b/x"!r}, {sha!r}, client=client)
        except Exception as exc:
            print(type(exc).__name__, exc)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.stdout.startswith("NoSpace The disk filled up"), proc.stdout + proc.stderr
    assert store.resume_offset(sha) == 0 and not store.has(sha)
    with httpx.Client() as client:  # with the room back, the bundle downloads whole
        assert store.download(f"{url}/b/x", sha, client=client).read_bytes() == data
