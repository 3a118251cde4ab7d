"""Calibration methods on efficientnet-lite0: the int8 model's fidelity, the time and the memory.

Quantizes efficientnet-lite0's fp32 model with each activation calibration method on the first
160 crops of the calibration split (batches of 8), in a child process each so that its peak
resident set is its own, and measures the top-1 agreement and relative logit error against
the fp32 model on onnxruntime, on the 300 evaluation crops of ``bench/int8.py``:

- ``minmax``, ``percentile`` (99.99) and ``entropy``: edgeslim's calibration
  (``ptq/static.py``; the histogram methods read the crops a batch at a time, twice);
- ``entropy-onnxruntime``: onnxruntime's own entropy calibrator as ``quantize_static`` sets it
  up (128 bins, 128 levels), which holds every intermediate tensor of all the crops at once.

``--how plain`` runs ``ort_quantize_static`` alone (QOperator, uint8 activations, per-channel
int8 weights, nothing else); ``--how preset`` runs the int8 preset's graph preparation and
weight rounding (GPTQ, bias correction, stem and logits in float) without its end-to-end
tuning, with the method in place of the preset's percentile.

    .venv/bin/python bench/int8_calibration.py [--how plain preset] [--write]

About 1 minute per method plain and 2 per method through the preset, on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_overhead import zoo_onnx
from peers import load_average, machine_description, write_section

THREADS = 2
SECTION = "int8 calibration methods (efficientnet-lite0)"
METHODS = ("minmax", "percentile", "entropy", "entropy-onnxruntime")
CROPS, BATCH = 160, 8


def fp32_model() -> Path:
    return zoo_onnx("efficientnet-lite0")


def child(method: str, how: str) -> dict[str, Any]:
    """One quantization in this process: its figures, peak RSS included."""
    import onnx

    from edgeslim.datasets import photo_crops
    from edgeslim.ptq import static
    from edgeslim.ptq._graph import make_session
    from edgeslim.ptq.metrics import classification_metrics

    fp32 = fp32_model()
    calib = photo_crops(CROPS, split="calibration")
    evals = photo_crops(300, split="evaluation")
    feeds = [{"input": calib[i : i + BATCH]} for i in range(0, CROPS, BATCH)]
    name = "entropy" if method == "entropy-onnxruntime" else method
    if method == "entropy-onnxruntime":
        static.histogram_ranges = lambda *args, **kwargs: False  # onnxruntime's calibrator
    float_model = onnx.load(str(fp32))
    start = time.perf_counter()
    if how == "plain":
        qmodel = static.ort_quantize_static(float_model, feeds, method=name,
                                            quant_format="qoperator", percentile=99.99)
    else:
        from edgeslim.ptq.builders import Builder
        from edgeslim.ptq.presets import PRESET_SETTINGS

        cfg = dict(PRESET_SETTINGS["classification"])
        cfg.update(task="classification", reduce_range=False, exclude=[], threads=THREADS,
                   smooth_alpha=None, quantize_embeddings=False, bits=8, method=name)
        with tempfile.TemporaryDirectory(prefix="edgeslim-bench-") as tmp:
            builder = Builder(float_model, feeds, cfg, Path(tmp))
            qmodel = builder.build([])
            float_model = builder.float_model
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def run(model: Any) -> np.ndarray:
        session = make_session(model, threads=THREADS)
        return np.concatenate([session.run(None, {"input": evals[i : i + 1]})[0]
                               for i in range(len(evals))])

    metrics = classification_metrics(run(float_model), run(qmodel))
    return {"method": method, "how": how, "seconds": round(seconds, 1),
            "peak_gb": round(peak_gb, 2), "top1_agreement": float(metrics["top1_agreement"]),
            "relative_error": float(metrics["relative_error"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--how", nargs="+", choices=("plain", "preset"), default=["plain"])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--out", type=Path, default=Path("bench/results/int8_calibration.json"))
    ap.add_argument("--write", action="store_true", help="write the section of RESULTS.md")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "HOW"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0

    import torch

    torch.set_num_threads(THREADS)
    fp32_model()  # exported once, before the children
    rows = []
    for how in args.how:
        for method in args.methods:
            load = load_average()
            out = subprocess.run([sys.executable, __file__, "--child", method, how],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["load_average"] = round(load, 2)
            rows.append(row)
            print(f"{how:7s} {method:20s} agreement {row['top1_agreement']:.1%}  "
                  f"error {row['relative_error']:.3f}  {row['seconds']:6.1f} s  "
                  f"peak {row['peak_gb']:.2f} GB", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    if args.write:
        lines = [
            f"`.venv/bin/python bench/int8_calibration.py --how {' '.join(args.how)} --write`",
            "",
            f"{machine_description()} Threads: {THREADS}; {CROPS} calibration crops in batches "
            f"of {BATCH}; agreement and error on the 300 evaluation crops of bench/int8.py.",
            "",
            "| quantization | calibration | top-1 agreement | rel. logit error | time | peak RSS |",
            "|---|---|---|---|---|---|",
        ]
        lines += [f"| {r['how']} | {r['method']} | {r['top1_agreement']:.1%} | "
                  f"{r['relative_error']:.3f} | {r['seconds']:.0f} s | {r['peak_gb']:.1f} GB |"
                  for r in rows]
        write_section(SECTION, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
