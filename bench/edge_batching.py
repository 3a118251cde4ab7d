"""Edge server throughput under 32 concurrent clients, dynamic batching on vs off.

Starts ``edgeslim serve`` (digits-cnn, onnxruntime pinned to ``--threads``) in a child process,
once with ``--max-batch 1`` (batching off) and once with ``--max-batch 32`` (on), alternating
``--repeats`` times, and drives it from this process with 32 keep-alive HTTP/1.1 connections
(a small asyncio client; binary tensor data as ``tritonclient.http`` sends it) for
``--requests`` requests each. Every answer is checked, after the timed run so that checking
does not slow the client: status 200 and logits within 1e-4 of onnxruntime on the same input.
Reports throughput, latency percentiles, errors, server and client CPU per request, rows per
model run, and the ratio.

    .venv/bin/python bench/edge_batching.py [--requests 10000] [--clients 32] [--threads 1]
        [--repeats 2] [--window-ms 2] [--out bench/results/edge_batching.json]

Also times onnxruntime alone at batch 1 and at batch 32 and splits the server's CPU per
request into work that every request pays (parsing, checking, answering) and work paid once
per model run, which shows the best ratio this server could reach with endless batches. Last,
it drives a bare uvicorn app on the server's HTTP protocol (no model, no V2 work: it reads
each request and sends one fixed answer of the same size) with the same load: what any app on
this HTTP layer pays per request before doing anything, and the ratio even such an app could
reach.

Target: throughput with batching on >= 2x off, zero errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_overhead import (
    ServerProcess,
    binary_request,
    decode_binary_response,
    direct_session,
    example_inputs,
    load_average,
    percentiles,
    zoo_bundle,
)

MODEL = "digits-cnn"


def _raw_request(host: str, port: int, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST /v2/models/{MODEL}/infer HTTP/1.1", f"Host: {host}:{port}",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _client(host: str, port: int, reqs: list[bytes], counter: list[int], total: int,
                  lat: list[float], answers: list[tuple[int, bytes, dict, bytes]]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while counter[0] < total:
            i = counter[0]
            counter[0] += 1
            k = i % len(reqs)
            t0 = time.perf_counter()
            writer.write(reqs[k])
            head = await reader.readuntil(b"\r\n\r\n")
            fields = {}
            for line in head.split(b"\r\n")[1:]:
                if b":" in line:
                    key, value = line.split(b":", 1)
                    fields[key.strip().lower()] = value.strip()
            body = await reader.readexactly(int(fields[b"content-length"]))
            lat.append(time.perf_counter() - t0)
            answers.append((k, head, fields, body))
    finally:
        writer.close()


def _check(answers: list[tuple[int, bytes, dict, bytes]], refs: list[np.ndarray]) -> list[str]:
    """Every answer: status 200 and logits within 1e-4 of onnxruntime on the same input."""
    errors = []
    for k, head, fields, body in answers:
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            errors.append(f"{status} {body[:200]!r}")
            continue
        got = decode_binary_response(body, int(fields[b"inference-header-content-length"]))
        if got.shape != refs[k].shape or not np.allclose(got, refs[k], atol=1e-4, rtol=0):
            errors.append("wrong logits")
    return errors


async def _load(host: str, port: int, reqs: list[bytes], refs: list[np.ndarray] | None,
                total: int, clients: int) -> dict[str, Any]:
    """``total`` requests over ``clients`` connections; every answer checked against ``refs``
    afterwards (None: only its status, for the bare app's fixed answer)."""
    counter = [0]
    lat: list[float] = []
    answers: list[tuple[int, bytes, dict, bytes]] = []
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(host, port, reqs, counter, total, lat, answers)
                           for _ in range(clients)))
    wall = time.perf_counter() - t0
    client_cpu = time.process_time() - cpu0
    if refs is not None:
        errors = _check(answers, refs)
    else:
        errors = [head[:40].decode() for _, head, _, _ in answers if b" 200 " not in head[:16]]
    first = min(answers, key=lambda a: a[0])
    return {"requests": len(lat), "errors": len(errors), "error_examples": errors[:3],
            "answer": (first[1], first[3]),
            "seconds": wall, "throughput_rps": len(lat) / wall,
            "client_cpu_us_per_request": client_cpu / max(1, len(lat)) * 1e6,
            **percentiles(lat)}


def _run(coro: Any) -> Any:
    """Run the client on uvloop when it is installed (less client CPU per request)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run_config(bundle: Path, max_batch: int, window_ms: float, threads: int, total: int,
               clients: int, xs: list[np.ndarray], refs: list[np.ndarray]) -> dict[str, Any]:
    args = ["--threads", str(threads), "--max-batch", str(max_batch),
            "--batch-window-ms", str(window_ms)]
    with ServerProcess(bundle, *args) as server:
        reqs = [_raw_request(server.host, server.port, *binary_request(MODEL, x)) for x in xs]
        _run(_load(server.host, server.port, reqs, refs, 500, clients))  # warm-up
        cpu0 = _cpu_seconds(server.proc.pid)
        result = _run(_load(server.host, server.port, reqs, refs, total, clients))
        cpu = _cpu_seconds(server.proc.pid) - cpu0
        metrics = _batch_metrics(server)
    return {"max_batch": max_batch, "window_ms": window_ms, **result, **metrics,
            "server_cpu_us_per_request": cpu / max(1, result["requests"]) * 1e6}


BARE_APP = """
import json, sys
import uvicorn
from edgeslim.edge._http import edge_protocol, tune_malloc

answer = json.load(open(sys.argv[1]))
HEADERS = [(k.encode(), v.encode()) for k, v in answer["headers"]]
BODY = bytes.fromhex(answer["body"])

async def app(scope, receive, send):
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})

tune_malloc()
uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[2]),
                              http=edge_protocol(16 << 20), lifespan="off", access_log=False,
                              log_level="warning", server_header=False,
                              proxy_headers=False)).run()
"""


def bare_uvicorn(answer: tuple[bytes, bytes], total: int, clients: int,
                 xs: list[np.ndarray]) -> dict[str, Any]:
    """The same load against a bare uvicorn app (the server's HTTP protocol, no model, no V2
    work) that reads each request and sends back one fixed answer of the same size: the server
    CPU per request that any app on this HTTP layer pays before doing anything."""
    import socket
    import subprocess
    import tempfile

    head, body = answer
    headers = [line.decode().split(":", 1) for line in head.split(b"\r\n")[1:] if b":" in line]
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as probe:
        spec = Path(tmp) / "answer.json"
        spec.write_text(json.dumps({
            "headers": [[k.strip(), v.strip()] for k, v in headers
                        if k.strip().lower() != "date"],
            "body": body.hex()}))
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        proc = subprocess.Popen([sys.executable, "-c", BARE_APP, str(spec), str(port)],
                                stderr=subprocess.DEVNULL)
        try:
            reqs = [_raw_request("127.0.0.1", port, *binary_request(MODEL, x)) for x in xs]
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("the bare uvicorn app did not start") from None
                    time.sleep(0.05)
            _run(_load("127.0.0.1", port, reqs, None, 500, clients))
            cpu0 = _cpu_seconds(proc.pid)
            result = _run(_load("127.0.0.1", port, reqs, None, total, clients))
            cpu = _cpu_seconds(proc.pid) - cpu0
        finally:
            proc.terminate()
            proc.wait(30)
    result.pop("answer")
    return {**result, "server_cpu_us_per_request": cpu / max(1, result["requests"]) * 1e6}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), in seconds."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _batch_metrics(server: ServerProcess) -> dict[str, float]:
    import http.client

    c = http.client.HTTPConnection(server.host, server.port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    vals = {}
    for line in text.splitlines():
        for key in ("edgeslim_batch_size_sum", "edgeslim_batch_size_count"):
            if line.startswith(key + "{"):
                vals[key] = float(line.rsplit(" ", 1)[1])
    count = vals.get("edgeslim_batch_size_count", 0.0)
    return {"model_runs": count,
            "mean_rows_per_run": vals.get("edgeslim_batch_size_sum", 0.0) / count if count else 0}


def model_costs(sess: Any, xs: list[np.ndarray], batch: int = 32,
                seconds: float = 1.0) -> dict[str, float]:
    """onnxruntime alone: us per request at batch 1 and us per row at ``batch``.

    What batching can save is the difference: the rest of a request's server CPU is paid per
    request whatever the batch.
    """
    single = xs[0]
    rows = np.concatenate([xs[i % len(xs)] for i in range(batch)])

    def per_run(feed: np.ndarray) -> float:
        for _ in range(20):
            sess.run(None, {"input": feed})
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            sess.run(None, {"input": feed})
            n += 1
        return (time.perf_counter() - t0) / n * 1e6

    return {"model_us_batch1": per_run(single), f"model_us_per_row_batch{batch}":
            per_run(rows) / batch}


def split_server_cpu(cpu_off: float, cpu_on: float, one: float, row: float,
                     rows: float) -> tuple[float, float]:
    """(P, R): server CPU per request that batching cannot share, and per model run.

    Solves off = P + R + one and on = P + R / rows + row, where ``one`` is the model alone at
    batch 1 and ``row`` its cost per row in a batch (all in us per request).
    """
    if rows <= 1.0:
        return cpu_off - one, 0.0
    r = max(0.0, (cpu_off - cpu_on - (one - row)) * rows / (rows - 1.0))
    return cpu_off - one - r, r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--window-ms", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    bundle = zoo_bundle(MODEL)
    xs = example_inputs(MODEL, 64)
    sess = direct_session(bundle, args.threads)
    refs = [sess.run(None, {"input": x})[0] for x in xs]
    costs = model_costs(sess, xs)
    one, row = costs["model_us_batch1"], costs["model_us_per_row_batch32"]
    print(f"onnxruntime alone ({args.threads} thread(s)): {one:.0f} us at batch 1, {row:.0f} us "
          f"per row at batch 32: batching can save at most {one - row:.0f} us per request (with "
          f"no server cost at all, the model alone gains {one / row:.2f}x from batches)",
          flush=True)
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for max_batch in (1, 32):
            r = run_config(bundle, max_batch, args.window_ms, args.threads, args.requests,
                           args.clients, xs, refs)
            r["repeat"] = rep
            r["load_average"] = load_average()
            runs.append(r)
            print(f"batching {'on ' if max_batch > 1 else 'off'} (max_batch {max_batch:2d}): "
                  f"{r['throughput_rps']:7.0f} req/s  p50 {r['p50_ms']:.2f} ms  "
                  f"p99 {r['p99_ms']:.2f} ms  errors {r['errors']}/{r['requests']}  "
                  f"rows/run {r['mean_rows_per_run']:.1f}  server CPU "
                  f"{r['server_cpu_us_per_request']:.0f} us/request  client CPU "
                  f"{r['client_cpu_us_per_request']:.0f} us/request  "
                  f"load {r['load_average']:.1f}", flush=True)
    answer = runs[0]["answer"]
    for r in runs:
        r.pop("answer")
    off = statistics.median(r["throughput_rps"] for r in runs if r["max_batch"] == 1)
    on = statistics.median(r["throughput_rps"] for r in runs if r["max_batch"] > 1)
    errors = sum(r["errors"] for r in runs)
    cpu_off = statistics.median(r["server_cpu_us_per_request"] for r in runs
                                if r["max_batch"] == 1)
    cpu_on = statistics.median(r["server_cpu_us_per_request"] for r in runs if r["max_batch"] > 1)
    summary = {"server_cpu_us_per_request_off": cpu_off, "server_cpu_us_per_request_on": cpu_on,
               "model": MODEL, "clients": args.clients, "threads": args.threads,
               "throughput_off_rps": off, "throughput_on_rps": on, "ratio": on / off,
               "errors": errors, **costs, "runs": runs}
    print(f"median server CPU per request: off {cpu_off:.0f} us, on {cpu_on:.0f} us "
          f"({cpu_off / cpu_on:.2f}x less work per request with batching)")
    b = statistics.median(r["mean_rows_per_run"] for r in runs if r["max_batch"] > 1)
    p, r = split_server_cpu(cpu_off, cpu_on, one, row, b)
    summary.update(per_request_us=p, per_run_us=r, ceiling=cpu_off / (p + row))
    print(f"server CPU split (off = P + R + model at batch 1, on = P + R / rows + model per "
          f"row): {p:.0f} us per request that no batch shares, {r:.0f} us per model run; "
          f"with endless batches the ratio tops out at {summary['ceiling']:.2f}x")
    bare = bare_uvicorn(answer, args.requests, args.clients, xs)
    floor = bare["server_cpu_us_per_request"]
    summary.update(bare_uvicorn=bare, ceiling_bare=(floor + r + one) / (floor + row))
    print(f"a bare uvicorn app on the same HTTP protocol, answering the same requests with a "
          f"fixed answer: {bare['throughput_rps']:.0f} req/s, {floor:.0f} us of server CPU per "
          f"request, {bare['errors']} answers not 200; with only that per request (and "
          f"{r:.0f} us per model run), the ratio would top out at "
          f"{summary['ceiling_bare']:.2f}x")
    print(f"median throughput: off {off:.0f} req/s, on {on:.0f} req/s, ratio {on / off:.2f}x; "
          f"errors {errors}; target (>= 2x, 0 errors): "
          f"{'met' if on / off >= 2 and errors == 0 else 'NOT met'}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
