"""Edge server overhead: HTTP V2 API at concurrency 1 vs calling onnxruntime directly.

For digits-cnn and efficientnet-lite0 (exported from the zoo with ``export_zoo_model``), this
starts ``edgeslim serve`` in a separate process (onnxruntime pinned to ``--threads``), sends
requests with a keep-alive ``http.client`` connection using the binary tensor data extension
(as ``tritonclient.http`` does by default), and times each request end to end. In the same run,
interleaved call by call in a rotating order (so all see the same background load and none
always goes first), it times
``InferenceSession.run`` on the same inputs with the same session options. It checks that
every HTTP answer is bit-identical to the direct one. As a control it also calls the same
session in a second process over a ``multiprocessing`` pipe (no HTTP): the difference between
that and the direct call is what any cross-process server pays on this machine (process
wake-ups), and the difference between HTTP and the pipe is what the HTTP stack adds.

    .venv/bin/python bench/edge_overhead.py [--models digits-cnn efficientnet-lite0]
        [--threads 1] [--rounds 5] [--inline-ms MS] [--out bench/results/edge_overhead.json]

``--inline-ms`` is passed to ``edgeslim serve`` (default: the server's own default): model runs
expected to take at most that long run on the server's event loop instead of a worker thread,
which saves two thread handoffs per request; a node with one client may set it above its
model's run time.

Targets: p50 overhead <= 1.5 ms, p99 overhead <= 5 ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("EDGESLIM_BENCH_DIR", Path(tempfile.gettempdir()) / "edgeslim-bench"))
PER_ROUND = {"digits-cnn": 600, "efficientnet-lite0": 40}


# ------------------------------------------------------------------ shared with edge_batching


def zoo_onnx(name: str) -> Path:
    """Zoo model ``name`` exported to ONNX under the bench work folder (once, then cached).

    The export runs in a child process, so the calling process need not import torch.
    """
    WORK.mkdir(parents=True, exist_ok=True)
    onnx_path = WORK / f"{name}.onnx"
    if not onnx_path.exists():
        code = ("from edgeslim.export import export_zoo_model; "
                f"export_zoo_model({name!r}, {str(onnx_path)!r})")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    return onnx_path


def zoo_bundle(name: str) -> Path:
    """Export zoo model ``name`` to ONNX (cached, ``zoo_onnx``) and pack it as a bundle.

    This (client) process never imports torch and runs onnxruntime in the same kind of
    process as the torch-free server.
    """
    import onnxruntime as ort

    from edgeslim.bundle import write_bundle
    from edgeslim.edge.runtime import ORT_TYPES

    onnx_path = zoo_onnx(name)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def spec(t: Any) -> dict[str, Any]:
        shape = [d if isinstance(d, int) else (d or "batch") for d in t.shape]
        return {"name": t.name, "dtype": ORT_TYPES[t.type], "shape": shape}

    manifest = {"name": name, "task": "bench",
                "inputs": [spec(t) for t in sess.get_inputs()],
                "outputs": [spec(t) for t in sess.get_outputs()]}
    return write_bundle(WORK / f"{name}.eslim", model_onnx=onnx_path, manifest=manifest)


def direct_session(bundle: Path, threads: int) -> Any:
    """An onnxruntime session with the options the edge runtime uses."""
    import onnxruntime as ort

    from edgeslim.bundle import read_bundle

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(read_bundle(bundle).model_bytes, opts,
                                providers=["CPUExecutionProvider"])


class ServerProcess:
    """``edgeslim serve BUNDLE --port 0 ...`` in a child process; ``url`` once listening."""

    def __init__(self, bundle: Path, *args: str) -> None:
        cmd = [sys.executable, "-m", "edgeslim.cli", "serve", str(bundle), "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        lines = []
        deadline = time.monotonic() + 120
        self.url = ""
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"listening on http://([\d.]+):(\d+)", line)
            if m:
                self.host, self.port = m.group(1), int(m.group(2))
                self.url = f"http://{self.host}:{self.port}"
                break
        if not self.url:
            self.proc.kill()
            raise RuntimeError("edgeslim serve did not start:\n" + "".join(lines))
        for _ in range(200):
            try:
                c = http.client.HTTPConnection(self.host, self.port, timeout=5)
                c.request("GET", "/v2/health/ready")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def binary_request(model: str, x: np.ndarray, input_name: str = "input") -> tuple[bytes, dict]:
    """Body and headers of a V2 request with binary input and binary outputs."""
    head = json.dumps({
        "inputs": [{"name": input_name, "datatype": "FP32", "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    headers = {"Inference-Header-Content-Length": str(len(head)),
               "Content-Type": "application/octet-stream"}
    return head + x.astype(np.float32).tobytes(), headers


def decode_binary_response(body: bytes, header_length: int) -> np.ndarray:
    doc = json.loads(body[:header_length])
    out = doc["outputs"][0]
    return np.frombuffer(body[header_length:], np.float32).reshape(out["shape"])


def load_average() -> float:
    """The 1-minute load average (Linux), to judge how busy the machine was."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def server_mean_ms(host: str, port: int, endpoint: str = "infer") -> float:
    """Mean server-side handling time of ``endpoint`` from the server's /metrics."""
    c = http.client.HTTPConnection(host, port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    vals = {}
    for line in text.splitlines():
        for key in ("sum", "count"):
            prefix = f"edgeslim_request_latency_seconds_{key}{{endpoint=\"{endpoint}\""
            if line.startswith(prefix):
                vals[key] = float(line.rsplit(" ", 1)[1])
    return vals.get("sum", 0.0) / vals["count"] * 1e3 if vals.get("count") else float("nan")


def percentiles(times_s: list[float]) -> dict[str, float]:
    a = np.asarray(times_s) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "n": len(a)}


# ---------------------------------------------------------------------------- the benchmark


def example_inputs(name: str, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    if name.startswith("digits"):
        from sklearn.datasets import load_digits

        xt = load_digits().data / 16.0  # the zoo's pixel scaling, without importing torch
        return [xt[i % len(xt)][None].astype(np.float32) for i in range(n)]
    return [rng.random((1, 3, 224, 224), dtype=np.float32) for _ in range(n)]


def _pipe_worker(conn: Any, bundle: str, threads: int) -> None:
    """Control: the same session in another process, called over a pipe (no HTTP)."""
    sess = direct_session(Path(bundle), threads)
    while True:
        x = conn.recv()
        if x is None:
            return
        conn.send(sess.run(None, {"input": x})[0])


def bench_model(name: str, threads: int, rounds: int,
                inline_ms: float | None = None) -> dict[str, Any]:
    bundle = zoo_bundle(name)
    load_before = load_average()
    per_round = PER_ROUND.get(name, 50)
    xs = example_inputs(name, 16)
    sess = direct_session(bundle, threads)
    refs = [sess.run(None, {"input": x})[0] for x in xs]
    direct_t: list[float] = []
    http_t: list[float] = []
    pipe_t: list[float] = []
    mismatches = 0
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    worker = ctx.Process(target=_pipe_worker, args=(there, str(bundle), threads), daemon=True)
    worker.start()
    extra = [] if inline_ms is None else ["--inline-ms", str(inline_ms)]
    with ServerProcess(bundle, "--threads", str(threads), *extra) as server:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        reqs = [binary_request(name, x) for x in xs]
        path = f"/v2/models/{name}/infer"
        for i in range(max(5, per_round // 10)):  # warm all three paths
            sess.run(None, {"input": xs[i % len(xs)]})
            conn.request("POST", path, *reqs[i % len(xs)])
            conn.getresponse().read()
            here.send(xs[i % len(xs)])
            here.recv()
        def direct(k: int) -> None:
            t0 = time.perf_counter()
            sess.run(None, {"input": xs[k]})
            direct_t.append(time.perf_counter() - t0)

        def over_http(k: int) -> None:
            nonlocal mismatches
            body, headers = reqs[k]
            t0 = time.perf_counter()
            conn.request("POST", path, body, headers)
            resp = conn.getresponse()
            data = resp.read()
            http_t.append(time.perf_counter() - t0)
            got = decode_binary_response(
                data, int(resp.getheader("Inference-Header-Content-Length")))
            if resp.status != 200 or got.tobytes() != refs[k].tobytes():
                mismatches += 1

        def over_pipe(k: int) -> None:
            t0 = time.perf_counter()
            here.send(xs[k])
            here.recv()
            pipe_t.append(time.perf_counter() - t0)

        calls = [direct, over_http, over_pipe]
        for _ in range(rounds):
            for i in range(per_round):  # each input through all three, in a rotating order
                for j in range(3):
                    calls[(i + j) % 3](i % len(xs))
        conn.close()
        here.send(None)
        worker.join(30)
        server_ms = server_mean_ms(server.host, server.port)
    d, h, p = percentiles(direct_t), percentiles(http_t), percentiles(pipe_t)
    return {
        "model": name, "threads": threads, "inline_ms": inline_ms, "direct": d, "http": h,
        "pipe_control": p,
        "load_average": [load_before, load_average()],
        "overhead_p50_ms": h["p50_ms"] - d["p50_ms"],
        "overhead_p99_ms": h["p99_ms"] - d["p99_ms"],
        "paired_overhead_median_ms": float(np.median(np.subtract(http_t, direct_t)) * 1e3),
        "server_side_mean_ms": server_ms,
        "pipe_overhead_p50_ms": p["p50_ms"] - d["p50_ms"],
        "http_over_pipe_p50_ms": h["p50_ms"] - p["p50_ms"],
        "not_bit_identical": mismatches,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["digits-cnn", "efficientnet-lite0"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--inline-ms", type=float, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    results = []
    print(f"load average before: {load_average():.2f}", flush=True)
    for name in args.models:
        r = bench_model(name, args.threads, args.rounds, args.inline_ms)
        results.append(r)
        print(f"{name:20s} direct p50 {r['direct']['p50_ms']:.3f} ms p99 "
              f"{r['direct']['p99_ms']:.3f} | http p50 {r['http']['p50_ms']:.3f} ms p99 "
              f"{r['http']['p99_ms']:.3f} | overhead p50 {r['overhead_p50_ms']:.3f} ms "
              f"p99 {r['overhead_p99_ms']:.3f} ms (paired median "
              f"{r['paired_overhead_median_ms']:.3f}) | n={r['http']['n']} "
              f"not bit-identical: {r['not_bit_identical']} | server-side mean "
              f"{r['server_side_mean_ms']:.3f} ms | control (same session in another process "
              f"over a pipe, no HTTP) p50 {r['pipe_control']['p50_ms']:.3f} ms: HTTP minus "
              f"pipe p50 {r['http_over_pipe_p50_ms']:.3f} ms | load average {load_average():.2f}",
              flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    ok = all(r["overhead_p50_ms"] <= 1.5 and r["overhead_p99_ms"] <= 5.0
             and r["not_bit_identical"] == 0 for r in results)
    print("targets (p50 overhead <= 1.5 ms, p99 <= 5 ms, bit-identical):",
          "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
