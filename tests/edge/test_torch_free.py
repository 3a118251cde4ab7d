"""The edge node runs where torch cannot be imported (subprocesses with torch blocked)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCK_TORCH = textwrap.dedent("""
    import sys

    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None

    sys.meta_path.insert(0, _NoTorch())
    sys.path.insert(0, {root!r})
""")

SERVE_AND_INFER = textwrap.dedent("""
    import tempfile
    from pathlib import Path

    import httpx
    import numpy as np
    import onnxruntime as ort

    import edgeslim.edge
    import edgeslim.edge.server
    from edgeslim.edge.server import EdgeServer
    from tests.edge._bundles import linear_bundle, linear_onnx

    path = linear_bundle(Path(tempfile.mkdtemp()) / "m.eslim")
    x = np.arange(64, dtype=np.float32).reshape(1, 64) / 64
    with EdgeServer([path], threads=1) as server:
        r = httpx.post(server.url + "/v2/models/linear/infer", json={"inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": x.ravel().tolist()}]})
        assert r.status_code == 200, r.text
        got = np.array(r.json()["outputs"][0]["data"], np.float32)
    ref = ort.InferenceSession(linear_onnx(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0].ravel()
    assert got.tobytes() == ref.tobytes()
    runner = edgeslim.edge.load(path)
    assert runner.run(x)["logits"].ravel().tobytes() == ref.tobytes()
    leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    assert not leaked, leaked
    try:
        import torch  # noqa: F401
    except ImportError:
        print("TORCH-FREE OK")
""")


def _python(code: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", BLOCK_TORCH.format(root=str(ROOT)) + code],
                            cwd=ROOT, env={**env, **kw.pop("env", {})}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_edge_package_and_server_run_without_torch():
    proc = _python(SERVE_AND_INFER)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "TORCH-FREE OK" in out


def test_edgeslim_serve_cli_without_torch(edge_bundles):
    import httpx

    code = ("from edgeslim.cli import main\n"
            f"sys.exit(main(['serve', {str(edge_bundles['linear'])!r}, '--port', '0', "
            "'--threads', '1', '--max-batch', '8']))\n")
    proc = _python(code, env={"EDGESLIM_TOKEN": "cli-token"})
    try:
        url = None
        deadline = time.monotonic() + 60
        lines = []
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            url = m.group(1) if m else None
        assert url, "".join(lines)
        for _ in range(100):
            try:
                if httpx.get(url + "/v2/health/live").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                            "data": [0.25] * 64}]}
        assert httpx.post(url + "/v2/models/linear/infer", json=body).status_code == 401
        r = httpx.post(url + "/v2/models/linear/infer", json=body,
                       headers={"Authorization": "Bearer cli-token"})
        assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 10]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "serving linear version 1 (batching on)" in "".join(lines)
