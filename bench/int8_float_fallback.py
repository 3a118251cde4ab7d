"""What keeping efficientnet-lite0's early layers in float buys the int8 preset, and costs.

The int8 preset keeps one activation unit in float (the stem's output: the stem and the first
depthwise convolution) and gives up a sensitivity-ranked float fallback (``max_excluded=0``).
This benchmark measures the trade-off that fallback would make, front to back, the order its
sensitivity ranking prefers on this network: the preset's model without its end-to-end tuning
(GPTQ rounding, bias correction, logits float; calibrated on the first 512 calibration crops
as ``bench/int8_tuning.py`` does), built with the first ``K`` activation units in float for
each ``K`` of ``--units`` (a unit: the node that writes an activation, its ReLU6 and every
node reading it, so that the activation is never quantized). For each: top-1 agreement and
relative logit error against the float model on the 300 evaluation crops of
``bench/int8.py``, model.onnx against the fp32 parameter bytes, and batch-1 latency against
onnxruntime fp32, all models timed in one run (rounds, 2 threads, ``bench/int8.py``'s
protocol). ``--tune K`` also tunes the model with ``K`` units end to end as the preset does
(KL on 2,048 calibration crops, ``--steps`` steps) and measures it again.

    .venv/bin/python bench/int8_float_fallback.py [--units 1 4 7 10 20 30 45] [--tune 7]
        [--steps 1000] [--no-write]

Writes the "int8 float fallback (efficientnet-lite0)" section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_overhead import WORK, zoo_onnx
from int8_tuning import untuned_model
from int8_weight_precision import logits
from peers import load_average, machine_description, write_section

THREADS = 2
SECTION = "int8 float fallback (efficientnet-lite0)"


def float_convs(model: Any) -> int:
    """Convolutions (and Gemms) the model computes in float."""
    return sum(n.op_type in ("Conv", "Gemm") for n in model.graph.node)


def tuned_model(model: Any, units: int, steps: int, ref_session: Any, calib: np.ndarray
                ) -> Path:
    """``model`` (``untuned_model``'s, with ``units`` float units) tuned end to end as the
    preset tunes it (KL on ``calib``, ``steps`` steps); cached in the bench work folder. With
    ``units=1`` and 1,000 steps this is the int8 preset's model."""
    import onnx

    from edgeslim.ptq.finetune import finetune_qoperator

    path = WORK / f"efficientnet-lite0.int8-float{units}.tuned{steps}.onnx"
    if not path.exists():
        onnx.save(finetune_qoperator(
            model, lambda x: ref_session.run(None, {"input": x})[0], calib,
            steps=steps, threads=THREADS, loss="kl"), str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--units", type=int, nargs="+", default=[1, 4, 7, 10, 20, 30, 45],
                    help="leading activation units kept in float, one model each")
    ap.add_argument("--tune", type=int, nargs="*", default=[],
                    help="unit counts whose model is also tuned end to end")
    ap.add_argument("--steps", type=int, default=1000, help="tuning steps (--tune)")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args(argv)
    if any(k < 0 for k in args.units + args.tune):
        ap.error("unit counts must be >= 0")

    import onnx
    import torch

    from edgeslim._ort import ort_session
    from edgeslim.benchmark import timed_rounds
    from edgeslim.datasets import photo_crops
    from edgeslim.ptq._graph import make_session
    from edgeslim.ptq.builders import float_bytes
    from edgeslim.ptq.metrics import classification_metrics

    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    fp32 = zoo_onnx("efficientnet-lite0")
    calib = photo_crops(2048, split="calibration")
    evals = photo_crops(300, split="evaluation")
    ref_session = make_session(fp32, threads=THREADS)
    ref = logits(fp32, evals)
    param_bytes = float_bytes(onnx.load(str(fp32)))
    models: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    for k in sorted(set(args.units + args.tune)):
        model = onnx.load(str(untuned_model(calib, evals, fp32, k)))
        name = f"{k} unit{'' if k == 1 else 's'}" + (" (the preset)" if k == 1 else "")
        variants = [(f"{name}, untuned", model)]
        if k in args.tune:
            path = tuned_model(model, k, args.steps, ref_session, calib)
            variants.append((f"{name}, tuned ({args.steps} steps)", onnx.load(str(path))))
        for label, m in variants:
            if k not in args.units and label.endswith("untuned"):
                continue
            metrics = classification_metrics(ref, logits(m, evals))
            data = m.SerializeToString()
            models[label] = data
            rows[label] = {"units": k, "agreement": metrics["top1_agreement"],
                           "error": metrics["relative_error"], "size": len(data) / param_bytes,
                           "float_convs": float_convs(m)}
            print(label, rows[label], flush=True)

    sessions = {"onnxruntime fp32": ort_session(str(fp32), threads=THREADS,
                                                 spin_between_runs=False)}
    sessions.update({label: ort_session(data, threads=THREADS, spin_between_runs=False)
                     for label, data in models.items()})
    feeds = {"input": evals[:1]}
    times = timed_rounds({label: (lambda f, s=s: s.run(None, f)) for label, s in
                          sessions.items()}, feeds, repeats=300, rounds=5)
    median = {label: float(np.median(t)) for label, t in times.items()}
    fp32_ms = median["onnxruntime fp32"]
    total_convs = float_convs(onnx.load(str(fp32)))
    lines = ["| activation units in float | convolutions in float | top-1 agreement | "
             "rel. logit error | latency b=1 (ms) | vs ORT fp32 | model.onnx / fp32 params |",
             "|---|---|---|---|---|---|---|",
             f"| onnxruntime fp32 | {total_convs} of {total_convs} | 100.0% | 0.000 | "
             f"{fp32_ms:.2f} | 1.00x | 100% |"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['float_convs']} of {total_convs} | {r['agreement']:.1%} | "
                     f"{r['error']:.3f} | {median[label]:.2f} | "
                     f"{fp32_ms / median[label]:.2f}x | {r['size']:.1%} |")
    met = [label for label, r in rows.items() if r["agreement"] >= 0.99
           and r["size"] <= 0.27 and fp32_ms / median[label] >= 1.3]
    fits = [label for label, r in rows.items()
            if r["size"] <= 0.27 and fp32_ms / median[label] >= 1.3]
    best = min(fits, key=lambda label: rows[label]["error"]) if fits else None
    reading = ["", "Reading (computed from the table): "
               + (f"{', '.join(met)} meet{'s' if len(met) == 1 else ''} all three targets."
                  if met else "no configuration meets all three targets.")]
    if best is not None:
        r = rows[best]
        reading[-1] += (f" Within the size and speed targets the lowest error is {best}'s: "
                        f"{r['error']:.3f}, {r['agreement']:.1%} agreement, "
                        f"{fp32_ms / median[best]:.2f}x onnxruntime fp32, {r['size']:.1%}.")
    most = max(rows, key=lambda label: rows[label]["float_convs"])
    reading[-1] += (f" With {rows[most]['float_convs']} of {total_convs} convolutions in "
                    f"float ({most}) the error is {rows[most]['error']:.3f} and agreement "
                    f"{rows[most]['agreement']:.1%}, at {fp32_ms / median[most]:.2f}x "
                    f"onnxruntime fp32 and {rows[most]['size']:.1%} of the fp32 bytes.")
    reading += ["", "Why it falls so slowly: the error is spread over the whole network "
                "(\"int8 error budget\"), so each unit put back in float removes a small share "
                "of it, while 99% agreement asks for about the error of 12-bit weights with float "
                "activations, ~0.008 (\"int8 weight precision\"). The float units' fp32 weights "
                "also count against the size target, and their float kernels against the "
                "speed target."]
    lines += reading
    seconds = time.perf_counter() - t0
    print("\n".join(lines))
    print(f"{seconds:.0f} s, load average {load_average():.1f}")
    if not args.no_write:
        units = " ".join(str(k) for k in args.units)
        tune = f" --tune {' '.join(str(k) for k in args.tune)} --steps {args.steps}" \
            if args.tune else ""
        head = [
            f"Command: `.venv/bin/python bench/int8_float_fallback.py --units {units}{tune}`",
            "",
            f"{machine_description()} Threads: {THREADS}; load average "
            f"{load_average():.1f} at the end; {seconds:.0f} s (models cached in the bench work "
            "folder are reused; building and tuning them all takes ~25 minutes). Latency: "
            "batch 1, median of "
            "300 runs in 5 rounds, every model in one run.",
            "",
            "The int8 preset's model without its tuning, with the first K activation units "
            "in float (the preset keeps 1), against the float model on the 300 evaluation "
            "crops of the int8 section. Targets there: agreement >= 99%, >= 1.3x onnxruntime "
            "fp32, model.onnx <= 27%.",
            "",
        ]
        write_section(SECTION, "\n".join(head + lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
