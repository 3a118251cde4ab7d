"""The fleet runs on torch-free edge nodes: none of its modules (nor the CLI, nor the Python
client) imports torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_fleet_modules_import_without_torch():
    code = textwrap.dedent(
        """
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")

        sys.meta_path.insert(0, Block())
        import edgeslim.cli
        for m in ("node", "controller", "serving", "offload", "store", "outbox", "registry",
                  "rollout", "api", "broker", "demo", "client"):
            __import__(f"edgeslim.fleet.{m}")
        import edgeslim
        from edgeslim.fleet.client import FleetClient
        assert edgeslim.FleetClient is FleetClient
        errors = []  # the client's lazy imports run too (nothing listens on port 9)
        with FleetClient("http://127.0.0.1:9") as fleet:
            for call in (fleet.nodes, lambda: fleet.deploy(b"PK", "site=lab", canary=2.0)):
                try:
                    call()
                except edgeslim.EdgeslimError as exc:
                    errors.append(type(exc).__name__)
        assert errors == ["UnreachableError", "ConfigError"], errors
        from edgeslim.fleet.node import reference_latency_us
        assert reference_latency_us(runs=5) > 0
        print("torch-free")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "torch-free"
