"""Hostile and broken bundles, through read_bundle, edgeslim.load and `edgeslim inspect`.

Each case must give a typed error whose one-line message says what is wrong; the CLI must exit
2 (malformed) or 4 (signature) and print no traceback.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeslim.bundle import Limits, read_bundle
from edgeslim.cli import main
from edgeslim.edge.runtime import load
from edgeslim.errors import BundleError, SignatureError
from tests.bundle.helpers import craft_zip, full_manifest, manifest_bytes, mlp_onnx

MODEL = mlp_onnx()
GOOD = full_manifest(MODEL)


def _zip(tmp, entries, **kw):
    return craft_zip(tmp / "bad.eslim", entries, **kw)


def _with(manifest_change=None, model=MODEL, extra=(), drop=()):
    m = json.loads(json.dumps(GOOD))
    (manifest_change or (lambda m: None))(m)
    entries = [("manifest.json", manifest_bytes(m)), ("model.onnx", model), *extra]
    return [e for e in entries if e[0] not in drop]


def _raw_manifest(placeholder: bytes, raw: bytes) -> list[tuple[str, bytes]]:
    """The good entries with a metric whose JSON text is ``raw`` (what json.dumps would not
    write: NaN, an integer of thousands of digits)."""
    m = json.loads(json.dumps(GOOD))
    m.setdefault("metrics", {})["odd"] = placeholder.decode().strip('"')
    data = manifest_bytes(m).replace(placeholder, raw)
    return [("manifest.json", data), ("model.onnx", MODEL)]


def patch_sizes(data: bytes, name: str, size: int) -> bytes:
    """Rewrite the uncompressed size of entry ``name`` in its local and central headers."""
    out = bytearray(data)
    raw = name.encode()
    # (signature, offset of the size, of the name length, of the name): PKWARE APPNOTE 4.3.7/12
    for sig, size_at, len_at, name_at in ((b"PK\x03\x04", 22, 26, 30),
                                          (b"PK\x01\x02", 24, 28, 46)):
        pos = out.find(sig)
        while pos != -1:
            (n,) = struct.unpack_from("<H", out, pos + len_at)
            if out[pos + name_at: pos + name_at + n] == raw:
                struct.pack_into("<I", out, pos + size_at, size)
            pos = out.find(sig, pos + 4)
    return bytes(out)


def _bomb(tmp, method, *, lie: bool, size=4 << 20):
    """model.onnx = ``size`` zero bytes; with ``lie`` its headers and manifest claim 100 bytes."""
    zeros = bytes(size)
    m = full_manifest(zeros)
    if lie:
        m["model"]["size"] = 100
    path = craft_zip(tmp / "bomb.eslim", [("manifest.json", manifest_bytes(m)),
                                          ("model.onnx", zeros, method)])
    if lie:
        path.write_bytes(patch_sizes(path.read_bytes(), "model.onnx", 100))
    return path


def _truncate(tmp, keep):
    path = craft_zip(tmp / "bad.eslim", _with())
    data = path.read_bytes()
    path.write_bytes(data[: keep(len(data))])
    return path


def _header_mismatch(tmp):
    """The central directory says model.onnx, the local header says model.onnX."""
    path = craft_zip(tmp / "bad.eslim", _with())
    data = bytearray(path.read_bytes())
    pos = data.find(b"PK\x03\x04")
    while data[pos + 30: pos + 40] != b"model.onnx":
        pos = data.find(b"PK\x03\x04", pos + 4)
    data[pos + 30: pos + 40] = b"model.onnX"
    path.write_bytes(bytes(data))
    return path


def _corrupt_stored(tmp):
    path = craft_zip(tmp / "bad.eslim", _with(), method=zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    at = data.find(MODEL[:32]) + 40
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _set(path, value):
    def change(m):
        keys = path.split(".")
        for k in keys[:-1]:
            m = m[int(k)] if isinstance(m, list) else m[k]
        m[keys[-1]] = value
    return change


def _delete(key):
    return lambda m: m.pop(key)


# name -> (builder(tmp) -> path, expected error class, message fragment, needs the public key)
CASES = {
    "empty-file": (lambda t: (t / "bad.eslim", (t / "bad.eslim").write_bytes(b""))[0],
                   BundleError, "not a readable .eslim bundle", False),
    "not-a-zip": (lambda t: (t / "bad.eslim", (t / "bad.eslim").write_text("hi " * 99))[0],
                  BundleError, "not a readable .eslim bundle", False),
    "truncated-half": (lambda t: _truncate(t, lambda n: n // 2), BundleError,
                       "not a readable .eslim bundle", False),
    "truncated-tail": (lambda t: _truncate(t, lambda n: n - 10), BundleError,
                       "not a readable .eslim bundle", False),
    "no-manifest": (lambda t: _zip(t, _with(drop=["manifest.json"])), BundleError,
                    "no manifest.json", False),
    "no-model": (lambda t: _zip(t, _with(drop=["model.onnx"])), BundleError,
                 "no model.onnx", False),
    "manifest-not-json": (lambda t: _zip(t, [("manifest.json", b"{not json"),
                                             ("model.onnx", MODEL)]),
                          BundleError, "not valid JSON", False),
    "manifest-not-utf8": (lambda t: _zip(t, [("manifest.json", b"\xff\xfe{}"),
                                             ("model.onnx", MODEL)]),
                          BundleError, "not UTF-8", False),
    "manifest-not-object": (lambda t: _zip(t, [("manifest.json", b"[1, 2]"),
                                               ("model.onnx", MODEL)]),
                            BundleError, "must be a JSON object", False),
    "manifest-deep": (lambda t: _zip(t, [("manifest.json", b"[" * 200_000),
                                         ("model.onnx", MODEL)]),
                      BundleError, "nests too deeply", False),
    "manifest-dup-key": (lambda t: _zip(t, [("manifest.json", b'{"name": "a", "name": "b"}'),
                                            ("model.onnx", MODEL)]),
                         BundleError, "repeats the key 'name'", False),
    "manifest-missing-field": (lambda t: _zip(t, _with(_delete("outputs"))), BundleError,
                               "lacks the required field 'outputs'", False),
    "manifest-bad-type": (lambda t: _zip(t, _with(_set("inputs.0.shape", "batch"))),
                          BundleError, "'inputs[0].shape' must be a list", False),
    "manifest-bad-dtype": (lambda t: _zip(t, _with(_set("inputs.0.dtype", "complex64"))),
                           BundleError, "'inputs[0].dtype' must be one of", False),
    "manifest-bad-sha": (lambda t: _zip(t, _with(_set("model.sha256", "xyz"))),
                         BundleError, "'model.sha256'", False),
    "manifest-future-format": (lambda t: _zip(t, _with(_set("format", "edgeslim.bundle/9"))),
                               BundleError, "'edgeslim.bundle/9'", False),
    "model-sha-mismatch": (lambda t: _zip(t, _with(model=MODEL[:-1] + b"\x00")),
                           BundleError, "model.onnx does not match the sha256", False),
    "file-sha-mismatch": (
        lambda t: _zip(t, _with(_set("files", {"tok.json": {"sha256": "0" * 64, "size": 2}}),
                                extra=[("tok.json", b"{}")])),
        BundleError, "tok.json does not match the sha256", False),
    "size-mismatch": (lambda t: _zip(t, _with(_set("model.size", len(MODEL) + 1))),
                      BundleError, "manifest says", False),
    # a fixed dim where the model has a free one: a node would allocate it for its warm-up
    "huge-fixed-dim": (lambda t: _zip(t, _with(_set("inputs.0.shape", [2**40, 8]))),
                       BundleError, "at most 67,108,864 values", False),
    "nan-in-manifest": (lambda t: _zip(t, _raw_manifest(b'"NAN"', b"NaN")), BundleError,
                        "holds NaN, which JSON does not have", False),
    "huge-int-in-manifest": (lambda t: _zip(t, _raw_manifest(b'"NAN"', b"9" * 5000)),
                             BundleError, "holds a value that cannot be read", False),
    "dotdot-path": (lambda t: _zip(t, _with(extra=[("../evil.sh", b"rm -rf")])), BundleError,
                    "unsafe path '../evil.sh'", False),
    "nested-dotdot": (lambda t: _zip(t, _with(extra=[("a/../../evil", b"x")])), BundleError,
                      "unsafe path", False),
    "absolute-path": (lambda t: _zip(t, _with(extra=[("/etc/cron.d/evil", b"x")])),
                      BundleError, "unsafe path '/etc/cron.d/evil'", False),
    "backslash-path": (lambda t: _zip(t, _with(extra=[("..\\evil", b"x")])), BundleError,
                       "unsafe path", False),
    "unexpected-entry": (lambda t: _zip(t, _with(extra=[("payload.bin", b"x")])), BundleError,
                         "does not list: ['payload.bin']", False),
    "listed-file-missing": (
        lambda t: _zip(t, _with(_set("files", {"tok.json": {"sha256": "0" * 64, "size": 2}}))),
        BundleError, "lacks: ['tok.json']", False),
    "duplicate-entry": (lambda t: _zip(t, _with(extra=[("model.onnx", MODEL)])), BundleError,
                        "'model.onnx' twice", False),
    "header-name-mismatch": (_header_mismatch, BundleError, "named differently", False),
    "crc-mismatch": (_corrupt_stored, BundleError, "CRC-32", False),
    "bzip2-entry": (lambda t: _zip(t, _with(), method=zipfile.ZIP_BZIP2), BundleError,
                    "compression method 12", False),
    "bomb-ratio-deflate": (lambda t: _bomb(t, zipfile.ZIP_DEFLATED, lie=False), BundleError,
                           "likely decompression bomb", False),
    "bomb-ratio-lzma": (lambda t: _bomb(t, zipfile.ZIP_LZMA, lie=False), BundleError,
                        "likely decompression bomb", False),
    "bomb-lying-deflate": (lambda t: _bomb(t, zipfile.ZIP_DEFLATED, lie=True), BundleError,
                           "expands beyond its declared 100 bytes", False),
    "bomb-lying-lzma": (lambda t: _bomb(t, zipfile.ZIP_LZMA, lie=True), BundleError,
                        "expands beyond its declared 100 bytes", False),
    "unsigned-under-key": (lambda t: _zip(t, _with()), SignatureError, "not signed", True),
    "bad-signature": (lambda t: _zip(t, [*_with(), ("signature", b"\x01" * 64)]),
                      SignatureError, "does not verify", True),
    "short-signature": (lambda t: _zip(t, [*_with(), ("signature", b"\x01" * 10)]),
                        SignatureError, "10 bytes", True),
}


@pytest.fixture(params=sorted(CASES))
def case(request, tmp_path, keypair):
    build, exc, needle, keyed = CASES[request.param]
    return build(tmp_path), exc, needle, (keypair[1] if keyed else None)


def test_read_bundle_refuses(case):
    path, exc, needle, pub = case
    with pytest.raises(exc) as info:
        read_bundle(path, public_key=pub)
    assert type(info.value) is exc
    assert needle in str(info.value)
    assert str(path) in str(info.value)  # the message says which file
    assert "\n" not in str(info.value)


def test_load_refuses(case):
    path, exc, needle, pub = case
    with pytest.raises(exc, match=None) as info:
        load(path, public_key=pub)
    assert type(info.value) is exc and needle in str(info.value)


def test_inspect_refuses(case, capsys):
    path, exc, needle, pub = case
    argv = ["inspect", str(path)] + (["--public-key", str(pub)] if pub else [])
    code = main(argv)
    out = capsys.readouterr()
    assert code == (4 if exc is SignatureError else 2)
    assert needle in out.err
    assert out.err.startswith("error:") and out.err.count("\n") == 1
    assert "Traceback" not in out.err + out.out


def test_inspect_subprocess_exit_codes(tmp_path, keypair):
    exe = Path(sys.executable).with_name("edgeslim")
    bomb = _bomb(tmp_path, zipfile.ZIP_DEFLATED, lie=True)
    r = subprocess.run([exe, "inspect", bomb], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "decompression bomb" in r.stderr
    unsigned = craft_zip(tmp_path / "u.eslim", _with())
    r = subprocess.run([exe, "inspect", unsigned, "--public-key", keypair[1]],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 4 and "not signed" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    r = subprocess.run([exe, "inspect", tmp_path / "nothing.eslim"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_lying_bomb_memory_stays_bounded(tmp_path):
    path = _bomb(tmp_path, zipfile.ZIP_DEFLATED, lie=True, size=64 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match="expands beyond"):
            read_bundle(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 << 20, f"peak {peak >> 20} MiB while refusing a 64 MiB bomb"


def _many_entries(path: Path, n: int, zip64: bool) -> Path:
    """A zip whose central directory lists ``n`` empty entries (Zip64 end records with
    ``zip64``): a few bytes on disk each, one Python object each once zipfile parses them."""
    local = b"PK\x03\x04" + struct.pack("<HHHHHIIIHH", 20, 0, 0, 0, 0, 0, 0, 0, 1, 0) + b"a"
    records = []
    for i in range(n):
        name = b"%x" % i
        records.append(b"PK\x01\x02" + struct.pack("<HHHHHHIIIHHHHHII", 20, 20, 0, 0, 0, 0,
                                                     0, 0, 0, len(name), 0, 0, 0, 0, 0, 0) + name)
    cd = b"".join(records)
    if zip64:
        end = (b"PK\x06\x06" + struct.pack("<QHHIIQQQQ", 44, 45, 45, 0, 0, n, n, len(cd),
                                            len(local))
               + b"PK\x06\x07" + struct.pack("<IQI", 0, len(local) + len(cd), 1)
               + b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 0xFFFF, 0xFFFF, len(cd),
                                               len(local), 0))
    else:
        end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, n, n, len(cd), len(local), 0)
    path.write_bytes(local + cd + end)
    return path


@pytest.mark.parametrize(("n", "zip64"), [(60_000, False), (300_000, True)])
def test_a_huge_central_directory_is_refused_before_it_is_parsed(tmp_path, n, zip64):
    """Counting the entries after zipfile parsed them all cost ~8x the file in memory."""
    path = _many_entries(tmp_path / "many.eslim", n, zip64)
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match=f"has {n} entries; the limit is 256"):
            read_bundle(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"peak {peak >> 20} MiB while refusing {n} entries"


def test_limits_checked_before_decompressing(tmp_path):
    path = craft_zip(tmp_path / "ok.eslim", _with())
    assert read_bundle(path).model_bytes == MODEL
    with pytest.raises(BundleError, match="over the limit of 100 bytes"):
        read_bundle(path, limits=Limits(max_model_bytes=100))
    with pytest.raises(BundleError, match="over the limit of 10 bytes"):
        read_bundle(path, limits=Limits(max_manifest_bytes=10))
    with pytest.raises(BundleError, match="entries; the limit is 1"):
        read_bundle(path, limits=Limits(max_entries=1))


def test_not_a_file(tmp_path):
    with pytest.raises(BundleError, match="is a directory"):
        read_bundle(tmp_path)
    with pytest.raises(BundleError, match="does not exist"):
        read_bundle(tmp_path / "missing.eslim")


@pytest.fixture(scope="module")
def valid_bytes(tmp_path_factory):
    from edgeslim.bundle import write_bundle

    out = {}
    for c in ("stored", "deflate", "lzma"):
        path = write_bundle(tmp_path_factory.mktemp("fz") / "b.eslim", model_onnx=MODEL,
                            manifest={k: v for k, v in GOOD.items()
                                      if k not in ("model", "files", "format")},
                            extra_files={"tok.json": b'{"a": 1}' * 40}, compression=c)
        out[c] = path.read_bytes()
    return out


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_bundles_fail_only_with_bundle_error(valid_bytes, data):
    """Random byte flips and cuts: either the bundle still reads intact, or BundleError."""
    c = data.draw(st.sampled_from(sorted(valid_bytes)))
    blob = bytearray(valid_bytes[c])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    try:
        b = read_bundle(bytes(blob))
    except BundleError as exc:
        assert "\n" not in str(exc)
    else:  # whatever was changed, what comes out is what the hashes vouch for
        assert b.model_bytes == MODEL and b.files == {"tok.json": b'{"a": 1}' * 40}


def test_a_device_or_fifo_is_refused_without_reading_it(tmp_path):
    """/dev/zero would be read without end; a FIFO would block open() until a writer came."""
    import os

    fifo = tmp_path / "pipe.eslim"
    os.mkfifo(fifo)
    for path in ("/dev/zero", fifo):
        with pytest.raises(BundleError, match="is not a regular file"):
            read_bundle(path)
