"""The ``.eslim`` bundle: write, read, verify and unpack signed model artifacts.

Torch-free and onnxruntime-free: the compression side writes bundles, edge nodes and the fleet
controller read them. The format is described in notes/MANIFEST.md; running a bundle is
``edgeslim.edge.runtime`` (``edgeslim.load``).

Example::

    from edgeslim.bundle import generate_keypair, read_bundle, write_bundle

    key, pub = generate_keypair("keys")
    write_bundle("digits.eslim", model_onnx=onnx_bytes, sign_key=key, manifest={
        "name": "digits-cnn", "task": "image-classification",
        "inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 64]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]})
    bundle = read_bundle("digits.eslim", public_key=pub)   # bundle.verified is True
"""

from __future__ import annotations

from edgeslim.bundle._zipread import Limits
from edgeslim.bundle.archive import (
    COMPRESSIONS,
    Bundle,
    EntryInfo,
    extract_bundle,
    read_bundle,
    sign_bundle,
    write_bundle,
)
from edgeslim.bundle.manifest import DTYPES, FORMAT, TensorSpec, dump_manifest, validate_manifest
from edgeslim.bundle.signing import (
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_manifest,
    verify_signature,
)

__all__ = [
    "COMPRESSIONS",
    "DTYPES",
    "FORMAT",
    "Bundle",
    "EntryInfo",
    "Limits",
    "TensorSpec",
    "dump_manifest",
    "extract_bundle",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "read_bundle",
    "sign_bundle",
    "sign_manifest",
    "validate_manifest",
    "verify_signature",
    "write_bundle",
]
