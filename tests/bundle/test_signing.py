"""Ed25519 keys and signatures: keygen files, signing, and every way verification fails."""

from __future__ import annotations

import json
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from edgeslim.bundle import (
    generate_keypair,
    load_private_key,
    read_bundle,
    sign_bundle,
    sign_manifest,
    verify_signature,
    write_bundle,
)
from edgeslim.errors import BundleError, ConfigError, SignatureError
from tests.bundle.helpers import craft_zip, mlp_manifest


@pytest.fixture()
def signed(tmp_path, mlp_bytes, keypair):
    return write_bundle(tmp_path / "s.eslim", model_onnx=mlp_bytes, manifest=mlp_manifest(),
                        sign_key=keypair[0])


def test_keygen_files(tmp_path):
    key, pub = generate_keypair(tmp_path / "k")
    assert (key.name, pub.name) == ("signing.key", "signing.pub")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")  # SubjectPublicKeyInfo
    private = load_pem_private_key(key.read_bytes(), None)
    public = load_pem_public_key(pub.read_bytes())
    assert isinstance(public, Ed25519PublicKey)
    assert private.public_key().public_bytes_raw() == public.public_bytes_raw()
    old = key.read_bytes()
    with pytest.raises(ConfigError, match="force"):
        generate_keypair(tmp_path / "k")
    assert key.read_bytes() == old
    generate_keypair(tmp_path / "k", force=True)
    assert key.read_bytes() != old
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["signing.key", "signing.pub"]


def test_signature_is_raw_ed25519_over_manifest_bytes(signed, keypair):
    b = read_bundle(signed, public_key=keypair[1])
    assert b.signed and b.verified and len(b.signature) == 64
    public = load_pem_public_key(keypair[1].read_bytes())
    public.verify(b.signature, b.manifest_bytes)  # raises if not
    assert sign_manifest(b.manifest_bytes, keypair[0]) == b.signature  # deterministic


def test_signed_without_key_reads_unverified(signed):
    b = read_bundle(signed)
    assert b.signed and not b.verified


def test_missing_signature_refused_under_key(tmp_path, mlp_bytes, keypair):
    path = write_bundle(tmp_path / "u.eslim", model_onnx=mlp_bytes, manifest=mlp_manifest())
    with pytest.raises(SignatureError, match="not signed"):
        read_bundle(path, public_key=keypair[1])
    with pytest.raises(ConfigError, match="public_key"):
        read_bundle(path, require_signature=True)


def test_wrong_key(signed, other_keypair):
    with pytest.raises(SignatureError, match="does not verify"):
        read_bundle(signed, public_key=other_keypair[1])


def _rezip(src, dst, replace):
    b = read_bundle(src)
    entries = {"manifest.json": b.manifest_bytes, "model.onnx": b.model_bytes,
               "signature": b.signature}
    entries.update(replace)
    return craft_zip(dst, list(entries.items()))


def test_tampered_manifest(tmp_path, signed, keypair):
    b = read_bundle(signed)
    m = json.loads(b.manifest_bytes)
    m["metrics"]["accuracy"] = 0.999  # a consistent but unsigned change
    bad = _rezip(signed, tmp_path / "t.eslim", {"manifest.json": json.dumps(m).encode()})
    read_bundle(bad)  # still a well-formed bundle without a key...
    with pytest.raises(SignatureError, match="does not verify"):
        read_bundle(bad, public_key=keypair[1])  # ...but not the signed one


def test_tampered_model(tmp_path, signed, keypair):
    model = bytearray(read_bundle(signed).model_bytes)
    model[-5] ^= 0xFF
    bad = _rezip(signed, tmp_path / "t.eslim", {"model.onnx": bytes(model)})
    with pytest.raises(BundleError, match="sha256") as info:
        read_bundle(bad, public_key=keypair[1])
    assert not isinstance(info.value, SignatureError)  # the signature is fine, the model not


def test_bad_signature_entries(tmp_path, signed, keypair):
    for sig, needle in ((b"\0" * 64, "does not verify"), (b"\0" * 63, "63 bytes")):
        bad = _rezip(signed, tmp_path / "t.eslim", {"signature": sig})
        with pytest.raises(SignatureError, match=needle):
            read_bundle(bad, public_key=keypair[1])


def test_sign_bundle_later(tmp_path, mlp_bytes, keypair, other_keypair):
    path = write_bundle(tmp_path / "u.eslim", model_onnx=mlp_bytes, manifest=mlp_manifest(),
                        compression="lzma")
    out = sign_bundle(path, keypair[0], out=tmp_path / "s.eslim")
    b = read_bundle(out, public_key=keypair[1])
    assert b.verified and b.manifest_bytes == read_bundle(path).manifest_bytes
    assert b.entries["model.onnx"].compression == "lzma"
    # signing again with the same key gives the same file as signing at write time
    direct = write_bundle(tmp_path / "d.eslim", model_onnx=mlp_bytes, manifest=mlp_manifest(),
                          compression="lzma", sign_key=keypair[0])
    assert direct.read_bytes() == out.read_bytes()
    sign_bundle(out, other_keypair[0])  # in place, replacing the signature
    assert read_bundle(out, public_key=other_keypair[1]).verified


def test_key_errors(tmp_path, keypair):
    with pytest.raises(SignatureError, match="does not exist"):
        load_private_key(tmp_path / "nope.key")
    with pytest.raises(SignatureError, match="not a PEM private key"):
        load_private_key(keypair[1])  # a public key where the private one belongs
    rsa = generate_private_key(public_exponent=65537, key_size=1024)
    (tmp_path / "rsa.key").write_bytes(
        rsa.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    with pytest.raises(SignatureError, match="Ed25519"):
        load_private_key(tmp_path / "rsa.key")
    with pytest.raises(SignatureError, match="not a PEM public key"):
        verify_signature(b"m", b"\0" * 64, keypair[0])
    with pytest.raises(SignatureError, match="public key"):
        read_bundle(tmp_path / "whatever.eslim", public_key=tmp_path / "nope.pub")
