"""Shared fixtures: pinned threads, trained zoo models (trained once per session)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _pin_threads():
    try:
        import torch
    except ImportError:  # the torch-free edge environment
        yield
        return
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def digits_split():
    from edgeslim.zoo.digits import load_digits_split

    return load_digits_split()


@pytest.fixture(scope="session")
def digits_cnn():
    """The trained zoo digits-cnn. Tests must deep-copy it before changing it."""
    from edgeslim.zoo import load_model

    return load_model("digits-cnn")


@pytest.fixture(scope="session")
def digits_mlp():
    """The trained zoo digits-mlp. Tests must deep-copy it before changing it."""
    from edgeslim.zoo import load_model

    return load_model("digits-mlp")
