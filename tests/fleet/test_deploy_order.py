"""A deploy never downgrades nodes or swaps their model by accident: a bundle older than, or
of another model than, what its targets serve needs the operator to say so. Real controller,
broker, node and HTTP."""

from __future__ import annotations

import pytest

from edgeslim.cli import main
from edgeslim.errors import ConfigError
from edgeslim.fleet.client import FleetClient
from edgeslim.fleet.controller import Conflict
from edgeslim.fleet.demo import wait_until
from edgeslim.fleet.node import Node
from edgeslim.fleet.rollout import RolloutParams
from tests.fleet.conftest import needs_broker, node_config
from tests.fleet.helpers import make_bundle

FAST = {"canary": 1.0, "soak_s": 0.0, "install_timeout_s": 30.0}


@pytest.mark.parametrize(("candidate", "current"), [
    ("1", "2"), ("1.9", "1.10"), ("2.0rc1", "2.0"), ("1.0", "1.0.post1"), ("0.9+cpu", "1"),
    ("v1", "v2"),
])  # fmt: skip
def test_versions_clearly_lower_are_lower(candidate, current):
    from edgeslim.fleet.controller import version_is_lower

    assert version_is_lower(candidate, current)
    assert not version_is_lower(current, candidate)


@pytest.mark.parametrize(("candidate", "current"), [
    ("2", "2"), ("2.0", "2"), ("blue", "2"), ("2", "blue"), ("2024-05-01", "2024-06-01"),
    ("1", None), ("?", "3"),
])  # fmt: skip
def test_versions_that_are_equal_or_not_ordered_are_not_lower(candidate, current):
    from edgeslim.fleet.controller import version_is_lower

    assert not version_is_lower(candidate, current)


@needs_broker
def test_a_deploy_refuses_a_downgrade_or_another_model_unless_told(broker, controller,
                                                                   tmp_path, keys, bundles,
                                                                   capsys):  # fmt: skip
    other = make_bundle(tmp_path / "other.eslim", keys[0], seed=11, version="9",
                        name="other-model")  # fmt: skip
    node = Node(node_config(broker, controller, tmp_path, keys, "edge-1")).start()
    try:
        wait_until(controller.online_nodes, 20, what="the node to register")
        with FleetClient(controller.url, timeout=30) as fleet:
            s1 = fleet.upload(bundles["v1"])["sha256"]
            s2 = fleet.upload(bundles["v2"])["sha256"]
            so = fleet.upload(other)["sha256"]
            assert fleet.wait(fleet.deploy(s2, **FAST)["id"], timeout=60)["state"] == "succeeded"
            wait_until(lambda: controller.registry.nodes()[0].model_version == "2", 10)

            with pytest.raises(ConfigError, match=r"409.*version 1 is older than.*edge-1 "
                                                  r"\(version 2\).*allow_downgrade"):
                fleet.deploy(s1, **FAST)
            with pytest.raises(Conflict, match="--allow-downgrade"):
                controller.deploy(s1, params=RolloutParams(**FAST))
            with pytest.raises(ConfigError, match=r"409.*model 'other-model'.*edge-1 serves "
                                                  r"'digits-linear'.*allow_model_change"):
                fleet.deploy(so, **FAST)
            # a newer model of another name needs the model flag, not the downgrade one
            with pytest.raises(ConfigError, match="allow_model_change"):
                fleet.deploy(so, allow_downgrade=True, **FAST)
            assert main(["fleet", "deploy", s1, "--controller", controller.url, "--canary",
                         "1", "--soak", "0"]) == 2  # fmt: skip
            assert "--allow-downgrade" in capsys.readouterr().err
            assert len(fleet.deployments()) == 1  # nothing was started
            assert node.model.version == "2"

            # said explicitly: the rollback to v1 goes ahead (CLI), then the model change
            assert main(["fleet", "deploy", s1, "--controller", controller.url, "--canary",
                         "1", "--soak", "0", "--allow-downgrade"]) == 0  # fmt: skip
            assert node.model.version == "1"
            wait_until(lambda: controller.registry.nodes()[0].model_version == "1", 10)
            dep = fleet.deploy(so, allow_model_change=True, **FAST)
            assert fleet.wait(dep["id"], timeout=60)["state"] == "succeeded"
            assert node.model.name == "other-model"
            assert fleet.deployment(dep["id"])["targets"][0]["node"] == "edge-1"
    finally:
        node.stop()


def test_the_flags_must_be_booleans():
    for name in ("allow_downgrade", "allow_model_change"):
        with pytest.raises(ConfigError, match=f"'{name}' parameter of deploy"):
            RolloutParams.from_dict({name: "yes"})
