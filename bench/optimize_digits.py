"""``edgeslim optimize digits-cnn --max-drop 0.01 --time-budget 10m``, then its figures.

1. Runs the command as a user would (a child process, wall time measured around it).
2. Measures the fp32 bundle (the search's baseline) and the chosen bundle in one process,
   interleaved round by round (onnxruntime, 2 threads): test accuracy, batch-256 throughput,
   batch-1 latency, bundle size. Ratios are medians of per-round ratios.
3. Device-profile prediction: every candidate bundle of the run is measured at 2 threads and
   at 1 thread; the 1-thread figure is predicted from the 2-thread one with the ratio of a
   reference model's latencies (digits-cnn fp32, and the fleet's 64-64-10 MLP as in node
   labels), as ``--device-profile`` does; the error against the 1-thread measurement is
   reported.
4. Writes the section ``## optimize`` of bench/RESULTS.md (other sections are left alone).

Run: ``.venv/bin/python bench/optimize_digits.py [--time-budget 10m] [--reuse RUN_DIR]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from peers import (  # bench/peers.py: shared machine description and RESULTS.md writer
    load_average,
    machine_description,
    write_section,
)

ROOT = Path(__file__).resolve().parents[1]


def run_optimize(run_dir: Path, budget: str) -> tuple[int, float, str]:
    cmd = [str(ROOT / ".venv/bin/edgeslim"), "optimize", "digits-cnn", "--max-drop", "0.01",
           "--time-budget", budget, "-o", str(run_dir / "best.eslim"),
           "--report", str(run_dir / "run")]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    sys.stderr.write(proc.stderr[-4000:])
    print(proc.stdout)
    shown = "edgeslim optimize digits-cnn --max-drop 0.01 --time-budget " + budget + \
        " -o best.eslim --report run"
    return proc.returncode, wall, shown


def session(model_bytes: bytes, threads: int) -> Any:
    from edgeslim.optimize.measure import ort_session

    return ort_session(model_bytes, threads)


def timed(sess: Any, feeds: dict[str, np.ndarray], seconds: float, min_runs: int) -> float:
    """Median milliseconds of ``sess.run`` over at least ``min_runs`` runs and ``seconds``."""
    sess.run(None, feeds)
    times, t0 = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - t0 < seconds:
        s = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - s) * 1e3)
    return statistics.median(times)


def accuracy(sess: Any) -> float:
    from edgeslim.zoo.digits import load_digits_split

    split = load_digits_split()
    logits = sess.run(None, {"input": split.x_test})[0]
    return float((logits.argmax(1) == split.y_test).mean())


def compare(fp32: bytes, best: bytes, rounds: int) -> dict[str, Any]:
    from edgeslim.zoo.digits import load_digits_split

    x = load_digits_split().x_test
    big = {"input": np.ascontiguousarray(np.resize(x, (256, 64)))}
    one = {"input": x[:1].copy()}
    sessions = {"fp32": session(fp32, 2), "chosen": session(best, 2)}
    thr: dict[str, list[float]] = {k: [] for k in sessions}
    lat: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            thr[k].append(256 / (timed(s, big, 0.5, 5) / 1e3))
            lat[k].append(timed(s, one, 0.3, 50))
    return {
        "accuracy": {k: accuracy(s) for k, s in sessions.items()},
        "throughput": {k: statistics.median(v) for k, v in thr.items()},
        "latency": {k: statistics.median(v) for k, v in lat.items()},
        "throughput_ratio": statistics.median(
            c / f for c, f in zip(thr["chosen"], thr["fp32"], strict=True)),
        "latency_ratio": statistics.median(
            f / c for c, f in zip(lat["chosen"], lat["fp32"], strict=True)),
    }


def profile_error(bundles: dict[str, bytes], rounds: int) -> dict[str, Any]:
    """Predict 1-thread figures from 2-thread ones by a reference ratio; compare."""
    from edgeslim.optimize.profile import reference_onnx
    from edgeslim.zoo.digits import load_digits_split

    x = load_digits_split().x_test
    big = {"input": np.ascontiguousarray(np.resize(x, (256, 64)))}
    one = {"input": x[:1].copy()}
    refs = {name: reference_onnx(name) for name in ("digits-cnn", "fleet-reference")}
    meas: dict[tuple[str, int], dict[str, list[float]]] = {}
    for _ in range(rounds):
        for t in (2, 1):
            for name, (data, feeds) in refs.items():
                meas.setdefault((f"ref:{name}", t), {"lat": []})["lat"].append(
                    timed(session(data, t), feeds, 0.3, 100))
            for label, data in bundles.items():
                s = session(data, t)
                m = meas.setdefault((label, t), {"lat": [], "thr": []})
                m["lat"].append(timed(s, one, 0.3, 50))
                m["thr"].append(256 / (timed(s, big, 0.4, 5) / 1e3))
    med = {k: {q: statistics.median(v) for q, v in d.items()} for k, d in meas.items()}
    out: dict[str, Any] = {"models": len(bundles), "per_model": {}}
    for ref in refs:
        factor = med[(f"ref:{ref}", 1)]["lat"] / med[(f"ref:{ref}", 2)]["lat"]
        lat_err, thr_err = [], []
        for label in bundles:
            pred_lat = med[(label, 2)]["lat"] * factor
            pred_thr = med[(label, 2)]["thr"] / factor
            lat_err.append(100 * (pred_lat / med[(label, 1)]["lat"] - 1))
            thr_err.append(100 * (pred_thr / med[(label, 1)]["thr"] - 1))
            out["per_model"].setdefault(label, {})[ref] = (round(lat_err[-1], 1),
                                                           round(thr_err[-1], 1))
        out[ref] = {"factor": factor,
                    "lat_mean_abs": statistics.mean(abs(e) for e in lat_err),
                    "lat_max_abs": max(abs(e) for e in lat_err),
                    "thr_mean_abs": statistics.mean(abs(e) for e in thr_err),
                    "thr_max_abs": max(abs(e) for e in thr_err)}
    out["actual_speedup_2t"] = {label: med[(label, 1)]["lat"] / med[(label, 2)]["lat"]
                                for label in bundles}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-budget", default="10m")
    parser.add_argument("--dir", default="/tmp/edgeslim-bench-optimize")
    parser.add_argument("--reuse", action="store_true",
                        help="measure an existing run in --dir instead of running optimize")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="do not edit RESULTS.md")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    run_dir = Path(args.dir)
    load_before = load_average()
    shown = ("edgeslim optimize digits-cnn --max-drop 0.01 --time-budget "
             f"{args.time_budget} -o best.eslim --report run")
    rc, wall = None, None
    if not args.reuse:
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        rc, wall, shown = run_optimize(run_dir, args.time_budget)
    from edgeslim.bundle import read_bundle
    from edgeslim.optimize.api import parse_duration
    from edgeslim.optimize.report import load_run

    data = load_run(run_dir / "run" / "search.sqlite")
    base, best = data["base"], data["best"]
    fp32 = read_bundle(base.bundle).model_bytes
    chosen_bundle = read_bundle(run_dir / "best.eslim")
    cmp = compare(fp32, chosen_bundle.model_bytes, args.rounds)
    bundles = {j.label: read_bundle(j.bundle).model_bytes
               for j in data["judged"] if j.key != base.key}
    prof = profile_error(bundles, max(3, args.rounds // 2))
    budget_s = parse_duration(args.time_budget)
    m = chosen_bundle.manifest["metrics"]
    lines = [
        f"Command: `{shown}` then `.venv/bin/python bench/optimize_digits.py` "
        f"(measures fp32 and chosen bundles interleaved, {args.rounds} rounds, "
        "onnxruntime with 2 threads).",
        "",
        machine_description(),
        f"Load average (1 min) before the run: {load_before:.1f} on 2 cores "
        "(the machine is shared; absolute timings are noisy, ratios come from one run).",
        "",
        f"Search: exit code {rc if rc is not None else '(reused run)'}, wall time "
        f"{'-' if wall is None else f'{wall:.0f} s'} for a budget of {budget_s:.0f} s, "
        f"{len(data['judged'])} candidates finished, {data['evaluations']} evaluations in "
        f"the store. Chosen: `{best.label}` (budget met: {m['budget_met']}).",
        "",
        "| | fp32 bundle | chosen bundle | ratio |",
        "|---|---:|---:|---:|",
        f"| test accuracy (onnxruntime) | {cmp['accuracy']['fp32']:.4f} | "
        f"{cmp['accuracy']['chosen']:.4f} | "
        f"{100 * (cmp['accuracy']['chosen'] - cmp['accuracy']['fp32']):+.2f} pt |",
        f"| throughput, batch 256 (samples/s) | {cmp['throughput']['fp32']:,.0f} | "
        f"{cmp['throughput']['chosen']:,.0f} | **{cmp['throughput_ratio']:.1f}x** |",
        f"| latency p50, batch 1 (ms) | {cmp['latency']['fp32']:.4f} | "
        f"{cmp['latency']['chosen']:.4f} | {cmp['latency_ratio']:.1f}x faster |",
        f"| bundle size (bytes) | {Path(base.bundle).stat().st_size:,} | "
        f"{(run_dir / 'best.eslim').stat().st_size:,} | "
        f"{Path(base.bundle).stat().st_size / (run_dir / 'best.eslim').stat().st_size:.1f}x "
        "smaller |",
        "",
        f"Device-profile prediction (predict each of {prof['models']} candidate bundles' "
        "1-thread figures from its 2-thread measurement times the reference's 1-thread / "
        "2-thread latency ratio; error against measuring at 1 thread):",
        "",
        "| reference | factor (1t/2t) | batch-1 latency error, mean / max | "
        "batch-256 throughput error, mean / max |",
        "|---|---:|---:|---:|",
    ]
    for ref in ("digits-cnn", "fleet-reference"):
        r = prof[ref]
        lines.append(f"| {ref} | {r['factor']:.2f} | {r['lat_mean_abs']:.0f}% / "
                     f"{r['lat_max_abs']:.0f}% | {r['thr_mean_abs']:.0f}% / "
                     f"{r['thr_max_abs']:.0f}% |")
    speed = prof["actual_speedup_2t"]
    lines += ["", f"Measured 1-thread/2-thread latency ratio across the candidates: "
                  f"{min(speed.values()):.2f} to {max(speed.values()):.2f} (one factor "
                  "cannot fit them all: small models gain nothing from a second thread)."]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("optimize", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
