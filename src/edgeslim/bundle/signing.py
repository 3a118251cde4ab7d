"""Ed25519 signing of bundle manifests, on the ``cryptography`` package.

A bundle's ``signature`` entry is the raw 64-byte Ed25519 signature over the exact bytes of
its ``manifest.json``; the manifest holds the sha256 of every other file, so one signature
covers the whole bundle. Keys live in PEM files: ``signing.key`` (PKCS8, mode 0600) and
``signing.pub`` (SubjectPublicKeyInfo).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Union

from edgeslim._atomic import make_folders, output_problem, remove_folders, write_error_reason
from edgeslim._validate import check_path
from edgeslim.errors import ConfigError, SignatureError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "SIGNATURE_SIZE",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "sign_manifest",
    "verify_signature",
]

PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"
SIGNATURE_SIZE = 64

#: A key given as a PEM file path, PEM bytes, or a loaded ``cryptography`` key object.
PrivateKeyLike = Union[str, os.PathLike, bytes, "Ed25519PrivateKey"]
PublicKeyLike = Union[str, os.PathLike, bytes, "Ed25519PublicKey"]


def _pem(source: str | os.PathLike | bytes, what: str) -> tuple[bytes, str]:
    if isinstance(source, bytes):
        return source, f"the {what} given as bytes"
    path = Path(source)
    try:
        size = path.stat().st_size
        if size > 64 * 1024:
            raise SignatureError(f"{path} is {size} bytes; an Ed25519 PEM {what} is ~120.")
        return path.read_bytes(), str(path)
    except FileNotFoundError:
        raise SignatureError(f"The {what} file {path} does not exist.") from None
    except IsADirectoryError:
        raise SignatureError(f"The {what} path {path} is a directory, not a PEM file.") from None
    except OSError as exc:
        raise SignatureError(f"Cannot read the {what} file {path}: {exc.strerror}.") from None


def load_private_key(key: PrivateKeyLike) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PKCS8 PEM file (path), PEM bytes, or a key object."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if isinstance(key, Ed25519PrivateKey):
        return key
    if not isinstance(key, (str, os.PathLike, bytes)):
        raise SignatureError(
            f"A signing key must be a PEM file path or an Ed25519PrivateKey. Got "
            f"{type(key).__name__}."
        )
    data, where = _pem(key, "private key")
    try:
        loaded = load_pem_private_key(data, password=None)
    except TypeError:
        raise SignatureError(f"{where} is password-protected; edgeslim needs an unencrypted "
                             "key (make one with: edgeslim keygen --out DIR).") from None
    except Exception as exc:  # ValueError or UnsupportedAlgorithm, depending on the input
        raise SignatureError(f"{where} is not a PEM private key ({exc}).") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise SignatureError(f"{where} holds a {type(loaded).__name__}; edgeslim signs with "
                             "Ed25519 keys only (make one with: edgeslim keygen --out DIR).")
    return loaded


def load_public_key(key: PublicKeyLike) -> Ed25519PublicKey:
    """An Ed25519 public key from a SubjectPublicKeyInfo PEM file, PEM bytes or a key object."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    if isinstance(key, Ed25519PublicKey):
        return key
    if not isinstance(key, (str, os.PathLike, bytes)):
        raise SignatureError(
            f"A public key must be a PEM file path or an Ed25519PublicKey. Got "
            f"{type(key).__name__}."
        )
    data, where = _pem(key, "public key")
    try:
        loaded = load_pem_public_key(data)
    except Exception as exc:  # ValueError or UnsupportedAlgorithm, depending on the input
        raise SignatureError(f"{where} is not a PEM public key ({exc}).") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise SignatureError(f"{where} holds a {type(loaded).__name__}; edgeslim verifies "
                             "Ed25519 signatures only.")
    return loaded


def sign_manifest(manifest_bytes: bytes, key: PrivateKeyLike) -> bytes:
    """The raw 64-byte Ed25519 signature over ``manifest_bytes`` (deterministic)."""
    return load_private_key(key).sign(manifest_bytes)


def verify_signature(manifest_bytes: bytes, signature: bytes, public_key: PublicKeyLike) -> None:
    """Raise ``SignatureError`` unless ``signature`` is a valid signature of the manifest."""
    from cryptography.exceptions import InvalidSignature

    pub = load_public_key(public_key)
    if len(signature) != SIGNATURE_SIZE:
        raise SignatureError(
            f"The bundle's signature is {len(signature)} bytes; an Ed25519 signature is "
            f"{SIGNATURE_SIZE}."
        )
    try:
        pub.verify(signature, manifest_bytes)
    except InvalidSignature:
        raise SignatureError(
            "The bundle's signature does not verify with the given public key: the manifest "
            "was changed after signing, or it was signed with another key."
        ) from None


def _write_temp(path: Path, data: bytes, mode: int) -> str:
    """Write ``data`` to a new temporary file beside ``path``; return its name.

    An ``OSError`` leaves no temporary file behind; the caller renames or removes it.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _unlink_quietly(*names: str | None) -> None:
    for name in names:
        if name is not None:
            with contextlib.suppress(OSError):
                os.unlink(name)


def _install_pair(key_path: Path, private_pem: bytes, pub_path: Path, public_pem: bytes) -> None:
    """Replace both key files, or neither: on any failure the old pair stays as it was.

    Both new files are written to temporary files first; the old private key is copied aside
    before it is replaced, and put back when the public key cannot be installed after it.
    """
    tmp_key = tmp_pub = backup = None
    current = key_path
    try:
        tmp_key = _write_temp(key_path, private_pem, 0o600)
        current = pub_path
        tmp_pub = _write_temp(pub_path, public_pem, 0o644)
        current = key_path
        if key_path.is_file():
            backup = _write_temp(key_path, key_path.read_bytes(),
                                 stat.S_IMODE(key_path.stat().st_mode))
        os.replace(tmp_key, key_path)
        tmp_key = None
        current = pub_path
        try:
            os.replace(tmp_pub, pub_path)
            tmp_pub = None
        except BaseException:
            if backup is None:  # there was no old private key: take the new one away again
                _unlink_quietly(str(key_path))
            else:
                kept, backup = backup, None  # never delete the only copy of the old key
                try:
                    os.replace(kept, key_path)
                except OSError as exc:
                    raise ConfigError(
                        f"Cannot write the key file {pub_path}, nor put the old private key "
                        f"back ({exc.strerror or exc}): the old private key is kept in "
                        f"{kept}.") from None
            raise
    except OSError as exc:
        raise ConfigError(f"Cannot write the key file {current}: "
                          f"{write_error_reason(current, exc)}. No key file was changed.") \
            from None
    finally:
        _unlink_quietly(tmp_key, tmp_pub, backup)


def generate_keypair(out_dir: str | os.PathLike, *, force: bool = False) -> tuple[Path, Path]:
    """Make a new Ed25519 key pair; return ``(out_dir/signing.key, out_dir/signing.pub)``.

    The private key is PKCS8 PEM with mode 0600, the public key SubjectPublicKeyInfo PEM.
    Existing key files are refused (``ConfigError``) unless ``force=True``; a folder in the
    place of either file is always refused. The two files are replaced together or not at
    all: on a failure the old pair is left as it was, and the folders made for it are removed.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = check_path(out_dir, "out_dir", "generate_keypair")
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"The 'out_dir' parameter of generate_keypair must be a directory; {out} is a file."
        )
    problem = output_problem(out, folder=True)
    if problem:
        raise ConfigError(f"Cannot write the key pair into {out}: {problem}.")
    key_path, pub_path = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    for p in (key_path, pub_path):
        if p.is_dir():
            raise ConfigError(f"Cannot write the key file {p}: it is a folder, not a file. "
                              "Remove it or choose another --out folder; no key was changed.")
    existing = [str(p) for p in (key_path, pub_path) if p.exists() or p.is_symlink()]
    if existing and not force:
        raise ConfigError(
            f"Refusing to overwrite existing key files {', '.join(existing)}; pass force=True "
            "(CLI: --force) to replace them."
        )
    try:
        made = make_folders(out)
    except OSError as exc:
        raise ConfigError(f"Cannot make the key folder {out}: "
                          f"{output_problem(out, folder=True) or exc.strerror or exc}.") from None
    try:
        key = Ed25519PrivateKey.generate()
        private_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        _install_pair(key_path, private_pem, pub_path, public_pem)
    except BaseException:
        remove_folders(made)  # a failed keygen leaves no empty key folder behind
        raise
    return key_path, pub_path
