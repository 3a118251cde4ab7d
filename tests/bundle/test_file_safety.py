"""Outputs that cannot be written: one line, exit 2, no temporary file, nothing lost.

A folder cannot be made unwritable for root with chmod, so an unwritable folder is simulated
by a regular file where a parent folder should be, or by ``tempfile.mkstemp`` / ``os.replace``
raising ``PermissionError`` for the target folder only. A full disk (which needs root to
mount) is simulated by a file size limit (``RLIMIT_FSIZE``) on a subprocess: its writes past
the limit fail with EFBIG, as they would with ENOSPC, in whatever code does the writing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from edgeslim.bundle import generate_keypair, write_bundle
from edgeslim.cli import main
from edgeslim.errors import BundleError
from tests._errors import one_line_error
from tests.bundle.helpers import mlp_manifest


def _main_with_file_limit(args: list[str], limit: int) -> subprocess.CompletedProcess:
    """``edgeslim ARGS`` in a subprocess that cannot make a file longer than ``limit`` bytes
    (SIGXFSZ ignored, so a longer write fails with EFBIG instead of killing the process)."""
    import edgeslim

    code = ("import resource, signal, sys\n"
            "from edgeslim.cli import main\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
            f"sys.exit(main({args!r}))\n")
    src = str(Path(edgeslim.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)


def _one_line(err: str, *words: str) -> None:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)


def _deny_mkstemp_in(monkeypatch, folder: Path) -> None:
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir") or "").resolve() == folder.resolve():
            raise PermissionError(13, "Permission denied", str(folder))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.fixture()
def bundle(tmp_path, mlp_bytes):
    return write_bundle(tmp_path / "m.eslim", model_onnx=mlp_bytes, manifest=mlp_manifest())


def test_write_bundle_into_a_folder_it_cannot_write(tmp_path, mlp_bytes, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    _deny_mkstemp_in(monkeypatch, out)
    with pytest.raises(BundleError, match=r"Cannot write the bundle to .*x\.eslim: "
                                          r"Permission denied"):
        write_bundle(out / "x.eslim", model_onnx=mlp_bytes, manifest=mlp_manifest())
    assert os.listdir(out) == []


def test_compress_into_a_folder_it_cannot_write(tmp_path, monkeypatch, capsys):
    # the check before the work passes (the folder exists); the write itself is refused
    out = tmp_path / "ro"
    out.mkdir()
    _deny_mkstemp_in(monkeypatch, out)
    rc = main(["compress", "digits-mlp", "--preset", "fp32", "-q", "-o", str(out / "x.eslim")])
    assert rc == 2
    one_line_error(capsys, "Cannot write the bundle to", "x.eslim", "Permission denied")
    assert os.listdir(out) == []


def test_sign_to_a_path_under_a_file(tmp_path, bundle, keypair, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    assert main(["sign", str(bundle), "--key", str(keypair[0]),
                 "-o", str(blocker / "x.eslim")]) == 2
    one_line_error(capsys, "Cannot write the bundle", f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "keep me"


def test_sign_in_place_in_a_folder_it_cannot_write(tmp_path, bundle, keypair, monkeypatch,
                                                   capsys):
    before = bundle.read_bytes()
    _deny_mkstemp_in(monkeypatch, bundle.parent)
    assert main(["sign", str(bundle), "--key", str(keypair[0])]) == 2
    one_line_error(capsys, "Cannot write the bundle", "Permission denied")
    assert bundle.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.eslim"]


def test_keygen_out_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    assert main(["keygen", "--out", str(blocker / "keys")]) == 2
    one_line_error(capsys, str(blocker / "keys"), f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "keep me"


def test_keygen_into_a_folder_it_cannot_write(tmp_path, monkeypatch, capsys):
    out = tmp_path / "keys"
    out.mkdir()
    _deny_mkstemp_in(monkeypatch, out)
    assert main(["keygen", "--out", str(out)]) == 2
    one_line_error(capsys, "Cannot write the key file", "Permission denied")
    assert os.listdir(out) == []


def test_keygen_force_with_a_folder_as_public_key_keeps_the_old_key(tmp_path, capsys):
    out = tmp_path / "keys"
    old_key, _ = generate_keypair(out)
    (out / "signing.pub").unlink()
    (out / "signing.pub").mkdir()
    before = old_key.read_bytes()
    assert main(["keygen", "--out", str(out), "--force"]) == 2
    one_line_error(capsys, str(out / "signing.pub"), "is a folder")
    assert old_key.read_bytes() == before
    assert sorted(os.listdir(out)) == ["signing.key", "signing.pub"]
    assert os.listdir(out / "signing.pub") == []


def test_keygen_force_replaces_both_files_or_neither(tmp_path, monkeypatch, capsys):
    out = tmp_path / "keys"
    key, pub = generate_keypair(out)
    old = (key.read_bytes(), pub.read_bytes())
    real = os.replace

    def replace(src, dst, *args, **kwargs):  # the public key's rename fails, after the key's
        if Path(dst) == pub:
            raise PermissionError(13, "Permission denied", str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    assert main(["keygen", "--out", str(out), "--force"]) == 2
    one_line_error(capsys, "Cannot write the key file", "signing.pub", "Permission denied")
    assert (key.read_bytes(), pub.read_bytes()) == old
    assert sorted(os.listdir(out)) == ["signing.key", "signing.pub"]
    monkeypatch.undo()
    assert main(["keygen", "--out", str(out), "--force"]) == 0
    assert key.read_bytes() != old[0] and pub.read_bytes() != old[1]
    assert sorted(os.listdir(out)) == ["signing.key", "signing.pub"]


def test_sign_in_place_through_a_link_signs_the_target_and_keeps_its_mode(tmp_path, bundle,
                                                                         keypair):
    """Signing ``link.eslim`` (a symbolic link) signs the bundle it points at, which keeps
    its permissions; the link stays a link."""
    from edgeslim.bundle import read_bundle

    os.chmod(bundle, 0o600)
    link = tmp_path / "link.eslim"
    link.symlink_to(bundle.name)
    assert main(["sign", str(link), "--key", str(keypair[0])]) == 0
    assert link.is_symlink() and os.readlink(link) == bundle.name
    assert read_bundle(bundle, public_key=keypair[1]).signed
    assert os.stat(bundle).st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == ["link.eslim", "m.eslim"]


@pytest.mark.parametrize("blocker", ["folder", "link"])
def test_compress_refuses_a_folder_or_link_where_its_ptq_report_goes(tmp_path, capsys, blocker):
    """The int8 preset's sensitivity report goes beside the bundle: a folder there would end
    the run in a traceback after all the work, and a link would send the report out of the
    bundle's folder. Both are refused before any work; nothing is written."""
    report = tmp_path / "out.ptq-report.json"
    victim = tmp_path.parent / f"{tmp_path.name}-victim.txt"
    victim.write_text("keep me")
    if blocker == "folder":
        report.mkdir()
    else:
        report.symlink_to(victim)
    assert main(["compress", "digits-cnn", "-o", str(tmp_path / "out.eslim"), "-q"]) == 2
    one_line_error(capsys, "The ptq step writes its report to", "remove it or give another -o")
    assert sorted(os.listdir(tmp_path)) == ["out.ptq-report.json"]
    assert victim.read_text() == "keep me"


def test_compress_writes_its_ptq_report_beside_the_bundle(tmp_path):
    import json

    assert main(["compress", "digits-cnn", "-o", str(tmp_path / "out.eslim"), "-q"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["out.eslim", "out.ptq-report.json"]
    report = json.loads((tmp_path / "out.ptq-report.json").read_text())
    assert "sensitivity" in report


def test_run_outputs_on_a_full_disk(tmp_path, bundle):
    import numpy as np

    np.save(tmp_path / "x.npy", np.ones((2, 8), np.float32))
    out = tmp_path / "new" / "deeper" / "y.npz"
    proc = _main_with_file_limit(["run", str(bundle), str(tmp_path / "x.npy"), "-o", str(out)],
                                 limit=64)
    assert proc.returncode == 2, proc.stderr
    _one_line(proc.stderr, f"error: Cannot write {str(out)!r}", "File too large")
    assert sorted(os.listdir(tmp_path)) == ["m.eslim", "x.npy"]  # the folders it made: gone
    proc = _main_with_file_limit(["run", str(bundle), str(tmp_path / "x.npy"), "-o", str(out)],
                                 limit=1 << 20)
    assert proc.returncode == 0, proc.stderr
    assert sorted(np.load(out).files) == ["logits"]


def test_keygen_on_a_full_disk_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "keys" / "edge"
    proc = _main_with_file_limit(["keygen", "--out", str(out)], limit=64)
    assert proc.returncode == 2, proc.stderr
    _one_line(proc.stderr, "Cannot write the key file", "File too large", "No key file")
    assert os.listdir(tmp_path) == []
    (tmp_path / "keys").mkdir()  # a folder it did not make stays
    proc = _main_with_file_limit(["keygen", "--out", str(out)], limit=64)
    assert proc.returncode == 2, proc.stderr
    assert os.listdir(tmp_path) == ["keys"] and os.listdir(tmp_path / "keys") == []
    proc = _main_with_file_limit(["keygen", "--out", str(out)], limit=1 << 20)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["signing.key", "signing.pub"]


def test_a_failed_write_removes_the_folders_it_made_and_only_those(tmp_path):
    import errno

    from edgeslim._atomic import write_atomically

    def fill(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "kept").mkdir()
    with pytest.raises(OSError, match="No space left"):
        write_atomically(tmp_path / "kept" / "a" / "b" / "x.bin", fill)
    assert os.listdir(tmp_path) == ["kept"] and os.listdir(tmp_path / "kept") == []
