"""Fixtures of the bundle tests: key pairs and the small ONNX model."""

from __future__ import annotations

import pytest

from tests.bundle.helpers import mlp_onnx


@pytest.fixture(scope="session")
def keypair(tmp_path_factory):
    from edgeslim.bundle import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def other_keypair(tmp_path_factory):
    from edgeslim.bundle import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("other-keys"))


@pytest.fixture(scope="session")
def mlp_bytes():
    return mlp_onnx()
