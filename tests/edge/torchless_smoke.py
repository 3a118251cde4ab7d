"""Run in a venv that has only ``edgeslim[edge]`` (no torch installed): ``make test-edge``.

Proves the edge node needs no torch: the package imports, a bundle loads and answers
through the real HTTP server exactly as onnxruntime does, and the CLI's serve verb starts.
Usage: python torchless_smoke.py BUNDLE
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time

import httpx
import numpy as np
import onnxruntime as ort


def main(bundle: str) -> int:
    if importlib.util.find_spec("torch") is not None:
        print("FAIL: torch is installed in this environment; the check would prove nothing")
        return 1
    import edgeslim.edge
    from edgeslim.bundle import read_bundle
    from edgeslim.edge.server import EdgeServer

    b = read_bundle(bundle)
    spec = b.inputs[0]
    x = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 64)
    ref = ort.InferenceSession(b.model_bytes, providers=["CPUExecutionProvider"]).run(
        None, {spec.name: x})[0]
    assert edgeslim.edge.load(bundle).run(x)[b.outputs[0].name].tobytes() == ref.tobytes()
    with EdgeServer([bundle], threads=1) as server:
        body = {"inputs": [{"name": spec.name, "datatype": "FP32", "shape": [1, 64],
                            "data": x.ravel().tolist()}]}
        r = httpx.post(f"{server.url}/v2/models/{b.name}/infer", json=body)
        r.raise_for_status()
        got = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32)
        if got.tobytes() != ref.ravel().tobytes():
            print("FAIL: HTTP answer differs from onnxruntime")
            return 1
    # the CLI verb starts and reports ready
    port = 18731
    proc = subprocess.Popen([sys.executable, "-m", "edgeslim.cli", "serve", bundle,
                             "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                print("FAIL: edgeslim serve exited:", proc.stderr.read().decode()[-2000:])
                return 1
            time.sleep(0.1)
        else:
            print("FAIL: edgeslim serve never became ready")
            return 1
    finally:
        proc.terminate()
        proc.wait(10)
    leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    if leaked:
        print("FAIL: torch modules imported:", leaked)
        return 1
    print("torch-free edge node: OK (import, load, HTTP infer bit-identical, serve verb)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
