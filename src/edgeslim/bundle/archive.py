"""Write, read and unpack ``.eslim`` bundles (a zip of manifest.json, model.onnx, ...).

``write_bundle`` validates the manifest, hashes every file, and writes the zip atomically (a
temporary file in the target's directory, then ``os.replace``), so the target name never shows
a half-written bundle. Entries carry a fixed timestamp and the manifest has canonical bytes, so
the same inputs give the same bundle byte for byte, signature included (Ed25519 is
deterministic).

``read_bundle`` treats the file as hostile: it checks entry names, duplicates, declared sizes
and compression ratios before decompressing anything, reads every entry with a hard cap, checks
the signature over the exact manifest bytes, then every sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import os
import platform
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, Union

from edgeslim._atomic import output_problem, write_atomically, write_error_reason
from edgeslim._validate import check_choice, check_path
from edgeslim.bundle._onnxproto import read_onnx_header
from edgeslim.bundle._zipread import DEFAULT_LIMITS, Limits, bomb_ratio, read_entry
from edgeslim.bundle.manifest import (
    FORMAT,
    MANIFEST_ENTRY,
    MODEL_ENTRY,
    SIGNATURE_ENTRY,
    TensorSpec,
    check_against_model,
    check_entry_name,
    dump_manifest,
    to_json_data,
    utc_now,
    validate_manifest,
)
from edgeslim.bundle.signing import (
    SIGNATURE_SIZE,
    PrivateKeyLike,
    PublicKeyLike,
    load_private_key,
    load_public_key,
    sign_manifest,
    verify_signature,
)
from edgeslim.errors import BundleError, ConfigError, EdgeslimError, SignatureError

__all__ = ["Bundle", "EntryInfo", "Limits", "extract_bundle", "read_bundle", "sign_bundle",
           "write_bundle"]

Source = Union[bytes, str, os.PathLike]  # noqa: UP007 - a runtime alias
COMPRESSIONS = {"stored": zipfile.ZIP_STORED, "deflate": zipfile.ZIP_DEFLATED,
                "lzma": zipfile.ZIP_LZMA}
_METHOD_NAMES = {v: k for k, v in COMPRESSIONS.items()}
_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class EntryInfo:
    """One zip entry: uncompressed and compressed sizes in bytes, and its compression."""

    size: int
    compressed_size: int
    compression: str


@dataclass(frozen=True, repr=False)
class Bundle:
    """A bundle read and checked by ``read_bundle``.

    ``manifest`` is the parsed manifest.json (a plain dict, see notes/MANIFEST.md) and
    ``manifest_bytes`` its exact bytes (what the signature covers). ``verified`` is True only
    when a public key was given and the signature verified with it.
    """

    manifest: dict[str, Any]
    manifest_bytes: bytes
    model_bytes: bytes
    files: dict[str, bytes] = field(default_factory=dict)
    signature: bytes | None = None
    verified: bool = False
    path: Path | None = None
    entries: dict[str, EntryInfo] = field(default_factory=dict)

    @property
    def signed(self) -> bool:
        return self.signature is not None

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec.from_dict(d) for d in self.manifest["inputs"])

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec.from_dict(d) for d in self.manifest["outputs"])

    def __repr__(self) -> str:
        return (f"Bundle(name={self.name!r}, version={self.version!r}, "
                f"model={len(self.model_bytes)} bytes, files={sorted(self.files)}, "
                f"signed={self.signed}, verified={self.verified})")


# --------------------------------------------------------------------------- writing


def _load_source(src: Any, what: str, cap: int) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if not p.is_file():
            raise ConfigError(f"The {what} path {p} is not a file.")
        if p.stat().st_size > cap:
            raise ConfigError(f"The {what} file {p} is {p.stat().st_size} bytes; a bundle "
                              f"holds at most {cap}.")
        data = p.read_bytes()
    else:
        raise ConfigError(f"The {what} must be bytes or a file path. Got {type(src).__name__}.")
    if len(data) > cap:
        raise ConfigError(f"The {what} is {len(data)} bytes; a bundle holds at most {cap}.")
    return data


def _run_step_registry(m: Mapping[str, Any], files: list[str]) -> None:
    """The edge package's step registry checks pre- and postprocessing at build time."""
    from edgeslim.edge.preprocess import validate_steps

    for stage, key in (("pre", "preprocessing"), ("post", "postprocessing")):
        if m.get(key):
            validate_steps(list(m[key]), stage=stage, files=files, outputs=m.get("outputs"))


def _provenance(given: Mapping[str, Any]) -> dict[str, Any]:
    prov: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("edgeslim", "onnxruntime"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            prov[dist] = metadata.version(dist)
    prov.update(given)
    return prov


def _zinfo(name: str, method: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.compress_type = method
    info.create_system = 3
    info.external_attr = 0o644 << 16
    return info


def _check_target(target: Path) -> None:
    """Refuse a bundle path that cannot be written, before any work is done (cheap)."""
    problem = output_problem(target)
    if problem:
        raise BundleError(f"Cannot write the bundle to {target}: {problem}.")


def _readable(info: zipfile.ZipInfo, limits: Limits = DEFAULT_LIMITS) -> None:
    """Refuse to write an entry that readers would refuse as a decompression bomb."""
    ratio = bomb_ratio(info, limits)
    if ratio is not None:
        raise ConfigError(
            f"Entry {info.filename!r} compresses {ratio:.0f}x ({info.file_size} -> "
            f"{info.compress_size} bytes), over the {limits.max_ratio:.0f}x that readers accept "
            f"before they take it for a decompression bomb (a model with large all-zero "
            f"tensors?). Write it with compression='stored', or pack the model first.")


def _atomic_zip(target: Path, entries: list[tuple[str, bytes, int]]) -> Path:
    """Write the zip whole or not at all (callers ran ``_check_target`` before their work)."""

    def fill(f: BinaryIO) -> None:
        with zipfile.ZipFile(f, "w") as zf:
            for name, data, method in entries:
                zf.writestr(_zinfo(name, method), data)
                _readable(zf.getinfo(name))

    try:
        write_atomically(target, fill)
    except OSError as exc:
        raise BundleError(f"Cannot write the bundle to {target}: "
                          f"{write_error_reason(target, exc)}.") from None
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return target


def write_bundle(
    path: str | os.PathLike,
    *,
    model_onnx: Source,
    manifest: Mapping[str, Any],
    extra_files: Mapping[str, Source] | None = None,
    sign_key: PrivateKeyLike | None = None,
    compression: str = "deflate",
) -> Path:
    """Write a ``.eslim`` bundle atomically and return its path.

    ``manifest`` holds the fields of notes/MANIFEST.md except ``model`` and ``files``, which
    are computed here (sha256, size, opset); ``format`` and ``created`` (now, UTC) are filled
    in, ``version`` defaults to ``"1"``, ``task`` to ``"generic"``, missing ``preprocessing``,
    ``postprocessing``, ``compression`` and ``metrics`` to empty, and ``provenance`` gets the
    Python, edgeslim and onnxruntime versions (the caller's keys win). Numpy values become
    lists. The declared inputs and outputs must agree with the model graph (names, dtypes,
    ranks, fixed dims). ``extra_files`` maps entry names (``tokenizer.json``) to bytes or
    paths. ``sign_key`` (a PEM path or key object) adds an Ed25519 ``signature``.
    ``compression`` applies to model.onnx and the extra files: ``"deflate"``, ``"lzma"`` or
    ``"stored"``. Parent directories are created. Bad input raises ``ConfigError``.
    """
    check_choice(compression, "compression", "write_bundle", COMPRESSIONS)
    _check_target(check_path(path, "path", "write_bundle"))
    if not isinstance(manifest, Mapping):
        raise ConfigError(f"The 'manifest' parameter of write_bundle must be a dict. Got "
                          f"{type(manifest).__name__} instead.")
    m = validate_manifest(to_json_data(dict(manifest)), stage="write")
    key = load_private_key(sign_key) if sign_key is not None else None
    limits = DEFAULT_LIMITS

    model = _load_source(model_onnx, "model_onnx", limits.max_model_bytes)
    try:
        header = read_onnx_header(model)
    except ValueError as exc:
        raise ConfigError(f"The model_onnx given is not an ONNX model ({exc}).") from None
    if header.external_data:
        raise ConfigError("The model_onnx keeps some weights in external data files; save it "
                          "with all tensors inside the .onnx (save_as_external_data=False).")
    for kind, specs, graph in (("inputs", m["inputs"], header.inputs),
                               ("outputs", m["outputs"], header.outputs)):
        check_against_model([TensorSpec.from_dict(s) for s in specs],
                            [(t.name, t.dtype, t.shape) for t in graph], kind, ConfigError)

    files: dict[str, bytes] = {}
    for name, src in sorted((extra_files or {}).items()):
        check_entry_name(name, f"extra_files key {name!r}")
        files[name] = _load_source(src, f"extra file {name!r}", limits.max_file_bytes)
    if len(files) + 3 > limits.max_entries:
        raise ConfigError(f"A bundle holds at most {limits.max_entries - 3} extra files.")
    _run_step_registry(m, sorted(files))

    m["format"] = FORMAT
    m.setdefault("version", "1")
    m.setdefault("task", "generic")
    m.setdefault("created", utc_now())
    for key_name, empty in (("preprocessing", []), ("postprocessing", []),
                            ("compression", []), ("metrics", {})):
        m.setdefault(key_name, empty)
    m["provenance"] = _provenance(m.get("provenance", {}))
    m["model"] = {"path": MODEL_ENTRY, "sha256": hashlib.sha256(model).hexdigest(),
                  "size": len(model), "opset": header.opset}
    m["files"] = {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                  for n, d in files.items()}
    validate_manifest(m, stage="read")  # the finished manifest is one a reader accepts
    manifest_bytes = dump_manifest(m)
    if len(manifest_bytes) > limits.max_manifest_bytes:
        raise ConfigError(f"The manifest is {len(manifest_bytes)} bytes as JSON; the limit is "
                          f"{limits.max_manifest_bytes} (keep the probe small).")

    method = COMPRESSIONS[compression]
    entries = [(MANIFEST_ENTRY, manifest_bytes,
                zipfile.ZIP_STORED if compression == "stored" else zipfile.ZIP_DEFLATED),
               (MODEL_ENTRY, model, method)]
    entries += [(n, d, method) for n, d in files.items()]
    if key is not None:
        entries.append((SIGNATURE_ENTRY, sign_manifest(manifest_bytes, key), zipfile.ZIP_STORED))
    return _atomic_zip(Path(path), entries)


# --------------------------------------------------------------------------- reading


def _check_name(name: str) -> None:
    bad = (not name or name.startswith(("/", "\\")) or "\\" in name or "\x00" in name
           or (len(name) > 1 and name[1] == ":")
           or any(part in ("", ".", "..") for part in name.rstrip("/").split("/")))
    if bad:
        raise BundleError(f"The bundle holds an entry with an unsafe path {name!r} (absolute, "
                          "'..' or backslash); refusing it.")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise BundleError(f"manifest.json repeats the key {k!r}; refusing an ambiguous "
                              "manifest.")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise BundleError(f"manifest.json holds {name}, which JSON does not have (and the writer "
                      "never writes); refusing it.")


def _parse_manifest(data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                         parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise BundleError(f"manifest.json is not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start}).") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"manifest.json is not valid JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}.") from None
    except RecursionError:
        raise BundleError("manifest.json nests too deeply to be a manifest.") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise BundleError(f"manifest.json holds a value that cannot be read: "
                          f"{str(exc).splitlines()[0][:200]}.") from None
    return validate_manifest(obj, stage="read")


def _central_directory(f: BinaryIO, archive_size: int) -> tuple[int, int] | None:
    """(entries, bytes) of the zip's central directory from its end records (Zip64 too),
    read before zipfile parses every record of it; None when there is no end record."""
    tail_size = min(archive_size, 22 + 0xFFFF)
    f.seek(archive_size - tail_size)
    tail = f.read(tail_size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) < at + 22:
        return None
    entries, size = struct.unpack_from("<xxxxxxxxxxHI", tail, at)
    if entries == 0xFFFF or size == 0xFFFFFFFF:  # Zip64: the counts are in its end record
        loc = tail.rfind(b"PK\x06\x07", 0, at)
        if loc >= 0 and len(tail) >= loc + 20:
            (offset,) = struct.unpack_from("<Q", tail, loc + 8)
            if 0 <= offset <= archive_size - 56:
                f.seek(offset)
                rec = f.read(56)
                if rec[:4] == b"PK\x06\x06":
                    entries, size = struct.unpack_from("<QQ", rec, 32)
    return entries, size


def _read(f: BinaryIO, where: Path | None, pub: Any, limits: Limits) -> Bundle:
    f.seek(0, os.SEEK_END)
    archive_size = f.tell()
    # Refuse an oversized central directory before zipfile builds an object per record of it.
    cd = _central_directory(f, archive_size)
    if cd is not None:
        entries, cd_bytes = cd
        if entries > limits.max_entries:
            raise BundleError(f"The bundle has {entries} entries; the limit is "
                              f"{limits.max_entries}.")
        if cd_bytes > limits.max_entries * 1024:  # a record: 46 bytes, a name, a few extras
            raise BundleError(f"The bundle's central directory is {cd_bytes} bytes, more than "
                              f"{limits.max_entries} entries take.")
    f.seek(0)
    zf = zipfile.ZipFile(f)
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise BundleError(f"The bundle has {len(infos)} entries; the limit is "
                          f"{limits.max_entries}.")
    seen: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        _check_name(info.filename)
        if info.filename in seen:
            raise BundleError(f"The bundle holds the entry {info.filename!r} twice; refusing "
                              "an ambiguous archive.")
        if info.flag_bits & 0x1:
            raise BundleError(f"Entry {info.filename!r} is encrypted; bundles are not.")
        seen[info.filename] = info
    for required in (MANIFEST_ENTRY, MODEL_ENTRY):
        if required not in seen:
            raise BundleError(f"The archive has no {required}; it is not a .eslim bundle.")
    total = sum(i.file_size for i in infos)
    if total > limits.max_total_bytes:
        raise BundleError(f"The bundle's entries declare {total} bytes in all, over the limit "
                          f"of {limits.max_total_bytes}; refusing to decompress them.")

    def read(name: str, cap: int) -> bytes:
        return read_entry(f, seen[name], cap, limits, archive_size)

    manifest_bytes = read(MANIFEST_ENTRY, limits.max_manifest_bytes)
    signature = None
    if SIGNATURE_ENTRY in seen:
        if seen[SIGNATURE_ENTRY].file_size != SIGNATURE_SIZE:
            raise SignatureError(f"The bundle's signature entry is "
                                 f"{seen[SIGNATURE_ENTRY].file_size} bytes; an Ed25519 "
                                 f"signature is {SIGNATURE_SIZE}.")
        signature = read(SIGNATURE_ENTRY, SIGNATURE_SIZE)
    if pub is not None:
        if signature is None:
            raise SignatureError("The bundle is not signed, but a public key was given: "
                                 "refusing an unsigned bundle.")
        verify_signature(manifest_bytes, signature, pub)
    manifest = _parse_manifest(manifest_bytes)

    declared = {MODEL_ENTRY: manifest["model"]}
    declared.update(manifest.get("files", {}))
    unexpected = sorted(set(seen) - set(declared) - {MANIFEST_ENTRY, SIGNATURE_ENTRY})
    if unexpected:
        raise BundleError(f"The bundle holds entries its manifest does not list: {unexpected}.")
    missing = sorted(set(declared) - set(seen))
    if missing:
        raise BundleError(f"The manifest lists files the bundle lacks: {missing}.")
    for name, meta in declared.items():
        if seen[name].file_size != meta["size"]:
            raise BundleError(f"Entry {name!r} holds {seen[name].file_size} bytes but the "
                              f"manifest says {meta['size']}: the bundle is inconsistent.")

    contents: dict[str, bytes] = {}
    for name, meta in declared.items():
        cap = limits.max_model_bytes if name == MODEL_ENTRY else limits.max_file_bytes
        data = read(name, cap)
        digest = hashlib.sha256(data).hexdigest()
        if digest != meta["sha256"]:
            raise BundleError(f"{name} does not match the sha256 in the manifest (expected "
                              f"{meta['sha256'][:16]}..., got {digest[:16]}...): the bundle "
                              "is corrupt or was changed.")
        contents[name] = data
    entries = {i.filename: EntryInfo(i.file_size, i.compress_size,
                                     _METHOD_NAMES.get(i.compress_type, str(i.compress_type)))
               for i in infos}
    model_bytes = contents.pop(MODEL_ENTRY)
    return Bundle(manifest, manifest_bytes, model_bytes, contents, signature,
                  verified=pub is not None, path=where, entries=entries)


def read_bundle(
    path: str | os.PathLike | bytes,
    *,
    public_key: PublicKeyLike | None = None,
    require_signature: bool = False,
    limits: Limits | None = None,
) -> Bundle:
    """Read and check a bundle from a path (or from its bytes).

    With ``public_key`` (PEM path, PEM bytes or key object) the bundle must be signed and the
    signature must verify, else ``SignatureError``. ``require_signature=True`` demands a
    public key. Anything malformed, truncated, inconsistent or hostile raises ``BundleError``
    with a one-line reason; nothing is decompressed past ``limits`` (``Limits()`` defaults:
    model 2 GiB, manifest 1 MiB, extra file 512 MiB, ratio 200x).
    """
    if require_signature and public_key is None:
        raise ConfigError("read_bundle(require_signature=True) needs the public_key to verify "
                          "the signature with.")
    limits = limits or DEFAULT_LIMITS
    pub = load_public_key(public_key) if public_key is not None else None
    if isinstance(path, (bytes, bytearray)):
        import io

        opened: BinaryIO = io.BytesIO(bytes(path))
        where: Path | None = None
    else:
        where = check_path(path, "path", "read_bundle")
        try:
            mode = os.stat(where).st_mode
        except OSError:
            mode = None  # open() below says why
        if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            # a device or a FIFO would be read without end (/dev/zero) or block open() forever
            raise BundleError(f"{where} is not a regular file, so not a .eslim bundle.")
        try:
            opened = open(where, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise BundleError(f"No bundle at {where}: the file does not exist.") from None
        except IsADirectoryError:
            raise BundleError(f"{where} is a directory, not a .eslim bundle.") from None
        except OSError as exc:
            raise BundleError(f"Cannot open the bundle {where}: {exc.strerror}.") from None
    label = str(where) if where else "the bundle bytes"
    with opened:
        try:
            return _read(opened, where, pub, limits)
        except EdgeslimError as exc:
            if where is None or str(where) in str(exc):
                raise
            raise type(exc)(f"{where}: {exc}") from None
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error,
                lzma.LZMAError, struct.error, NotImplementedError, ValueError,
                OverflowError, OSError) as exc:
            raise BundleError(f"{label} is not a readable .eslim bundle: it is truncated or "
                              f"not a zip archive ({exc}).") from None


def sign_bundle(
    path: str | os.PathLike,
    sign_key: PrivateKeyLike,
    *,
    out: str | os.PathLike | None = None,
) -> Path:
    """Sign an existing bundle (replacing any signature); write it to ``out`` or in place.

    The manifest bytes are kept as they are, so the new signature covers the same manifest.
    """
    target = check_path(out if out is not None else path, "out" if out is not None else "path",
                        "sign_bundle")
    _check_target(target)
    bundle = read_bundle(path)
    key = load_private_key(sign_key)
    model_method = COMPRESSIONS.get(bundle.entries[MODEL_ENTRY].compression, zipfile.ZIP_DEFLATED)
    entries = [(MANIFEST_ENTRY, bundle.manifest_bytes,
                COMPRESSIONS.get(bundle.entries[MANIFEST_ENTRY].compression,
                                 zipfile.ZIP_DEFLATED)),
               (MODEL_ENTRY, bundle.model_bytes, model_method)]
    entries += [(n, d, COMPRESSIONS.get(bundle.entries[n].compression, model_method))
                for n, d in sorted(bundle.files.items())]
    entries.append((SIGNATURE_ENTRY, sign_manifest(bundle.manifest_bytes, key),
                    zipfile.ZIP_STORED))
    return _atomic_zip(target, entries)


def extract_bundle(
    path: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    public_key: PublicKeyLike | None = None,
    require_signature: bool = False,
    limits: Limits | None = None,
) -> Path:
    """Check a bundle, then unpack it into the new directory ``dest`` atomically.

    Everything is written into a temporary directory beside ``dest`` and renamed onto it, so
    ``dest`` either does not exist or holds the complete, verified bundle. ``dest`` must not
    exist yet (``ConfigError``). Nothing is written outside it: entry names were checked.
    """
    bundle = read_bundle(path, public_key=public_key, require_signature=require_signature,
                         limits=limits)
    target = Path(dest)
    if target.exists() or target.is_symlink():
        raise ConfigError(f"The destination {target} exists; extract_bundle installs into a "
                          "new directory (remove it or choose another name).")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".eslim-", suffix=".tmp"))
    except OSError as exc:
        raise BundleError(f"Cannot unpack the bundle into {target}: "
                          f"{write_error_reason(target, exc)}.") from None
    root = tmp.resolve()
    try:
        items = {MANIFEST_ENTRY: bundle.manifest_bytes, MODEL_ENTRY: bundle.model_bytes,
                 **bundle.files}
        if bundle.signature is not None:
            items[SIGNATURE_ENTRY] = bundle.signature
        for name, data in items.items():
            out = (tmp / name).resolve()
            if root not in out.parents:
                raise BundleError(f"Entry {name!r} would be written outside {target}.")
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        os.rename(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise BundleError(f"Cannot unpack the bundle into {target}: "
                              f"{exc.strerror or exc}.") from None
        raise
    return target
