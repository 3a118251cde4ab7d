"""Fixtures for the fleet tests: a real Mosquitto on 127.0.0.1, keys, tiny signed bundles."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from edgeslim.errors import MissingDependencyError
from tests.fleet.helpers import make_bundle

try:
    from edgeslim.fleet.broker import INSTALL_HINT, mosquitto_path

    mosquitto_path()
    HAVE_MOSQUITTO = True
except MissingDependencyError:
    HAVE_MOSQUITTO = False

needs_broker = pytest.mark.skipif(not HAVE_MOSQUITTO, reason=INSTALL_HINT)


def sha_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    """(private key path, public key path) of the fleet's signing key."""
    from edgeslim.bundle import generate_keypair

    key, pub = generate_keypair(tmp_path_factory.mktemp("keys"))
    return Path(key), Path(pub)


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, keys):
    """Signed test bundles by role: v1, v2 (good), probe (fails its probe), foreign (signed
    with another key), unsigned, slow (a heavy model), fixed (batch fixed at 2: every
    one-row request fails), slower (4x slow's work). All hold the model name
    ``digits-linear``."""
    from edgeslim.bundle import generate_keypair

    d = tmp_path_factory.mktemp("bundles")
    key, _ = keys
    other_key, _ = generate_keypair(d / "other")
    return {
        "v1": make_bundle(d / "v1.eslim", key, seed=1, version="1"),
        "v2": make_bundle(d / "v2.eslim", key, seed=2, version="2"),
        "probe": make_bundle(d / "probe.eslim", key, seed=3, version="3", probe_seed=4),
        "foreign": make_bundle(d / "foreign.eslim", other_key, seed=5, version="5"),
        "unsigned": make_bundle(d / "unsigned.eslim", None, seed=6, version="6"),
        "slow": make_bundle(d / "slow.eslim", key, seed=7, version="7", hidden=1024, repeats=64),
        "fixed": make_bundle(d / "fixed.eslim", key, seed=8, version="8", batch=2),
        # 4x slow's work: a p99 regression no load on the test machine can hide (slow's ~11 ms
        # came within a busy baseline's 3x once: 4 ms x 3 = 12 ms)
        "slower": make_bundle(d / "slower.eslim", key, seed=9, version="9", hidden=1024,
                              repeats=256),
    }


@pytest.fixture
def broker(tmp_path):
    """A Mosquitto with a controller user and a shared node user; stopped after the test."""
    if not HAVE_MOSQUITTO:
        pytest.skip(INSTALL_HINT)
    from edgeslim.fleet.broker import Broker

    b = Broker(
        {"controller": os.urandom(6).hex(), "node": os.urandom(6).hex()}, workdir=tmp_path / "mq"
    )
    b.start()
    yield b
    b.close()


@pytest.fixture
def controller(broker, tmp_path, keys):
    from edgeslim.fleet.backoff import Backoff
    from edgeslim.fleet.controller import Controller

    c = Controller(
        broker.url("controller"),
        tmp_path / "controller",
        public_key=keys[1],
        offline_after=10.0,
        backoff=Backoff(initial=0.2, cap=1.0),
    ).start()
    yield c
    c.stop()


def node_config(broker, controller, tmp_path, keys, node_id: str, **kw):
    from edgeslim.fleet.node import NodeConfig

    base = dict(
        node_id=node_id,
        broker=broker.url("node"),
        controller=controller.url,
        data_dir=tmp_path / node_id,
        public_key=keys[1],
        heartbeat_s=0.5,
        telemetry_s=0.5,
        measure_reference=False,
        backoff_initial=0.2,
        backoff_cap=1.0,
    )
    base.update(kw)
    return NodeConfig(**base)
