"""How much weight precision efficientnet-lite0 needs on the evaluation crops: int8 and beyond.

The int8 preset's top-1 agreement target (99%) is measured on random crops of the bundled
photos (``bench/int8.py``). This benchmark asks what precision that target takes, apart from
any method: it rounds only the weights of the float model (every activation stays float32)
and measures top-1 agreement and relative logit error against the float model on the same
300 evaluation crops:

- round-to-nearest per-channel symmetric integers of 8, 10 and 12 bits (the grid int8
  kernels use, and two finer ones no CPU kernel here runs);
- float16 weights;
- int8 for all but the two layers the int8 preset keeps in float;
- int8 for one layer at a time (the five layers whose rounding alone costs most).

It also prints how close the crops' top-1 and top-2 logits are, which is what any rounding
flips. Writes the "int8 weight precision" section of ``bench/RESULTS.md``.

    .venv/bin/python bench/int8_weight_precision.py [--crops 300] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_overhead import WORK
from peers import load_average, machine_description, write_section

THREADS = 2
SECTION = "int8 weight precision (efficientnet-lite0)"


def round_weights(model: Any, bits: int | None, only: set[str] | None = None) -> Any:
    """A copy of ``model`` whose Conv/Gemm weights are rounded: per output channel to
    symmetric ``bits``-bit integers times a max-abs scale, or to float16 when ``bits`` is None.
    ``only``: node names to round (default all)."""
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights = {n.input[1] for n in out.graph.node
               if n.op_type in ("Conv", "Gemm") and (only is None or n.name in only)}
    for init in out.graph.initializer:
        if init.name not in weights:
            continue
        w = numpy_helper.to_array(init).astype(np.float32)
        if bits is None:
            q = w.astype(np.float16).astype(np.float32)
        else:
            qmax = 2 ** (bits - 1) - 1
            flat = w.reshape(w.shape[0], -1)
            scale = np.abs(flat).max(axis=1, keepdims=True) / qmax
            scale[scale == 0] = 1.0
            q = (np.clip(np.round(flat / scale), -qmax, qmax) * scale).reshape(w.shape)
        init.CopyFrom(numpy_helper.from_array(q.astype(np.float32), init.name))
    return out


def logits(model: Any, crops: np.ndarray) -> np.ndarray:
    from edgeslim.ptq._graph import make_session

    session = make_session(model, threads=THREADS)
    return np.concatenate(
        [session.run(None, {"input": crops[i : i + 16]})[0] for i in range(0, len(crops), 16)]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--crops", type=int, default=300, help="evaluation crops to measure on")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args(argv)

    import onnx

    from edgeslim.datasets import photo_crops
    from edgeslim.export import export_zoo_model
    from edgeslim.ptq._graph import unique_node_names
    from edgeslim.ptq.metrics import classification_metrics
    from edgeslim.ptq.static import preprocess

    t0 = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    fp32 = WORK / "efficientnet-lite0.onnx"
    if not fp32.exists():
        export_zoo_model("efficientnet-lite0", fp32)
    model = unique_node_names(preprocess(onnx.load(str(fp32))))
    crops = photo_crops(300, split="evaluation")[: args.crops]  # as bench/int8.py measures
    ref = logits(model, crops)

    top2 = np.sort(ref, axis=1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    prob = np.exp(ref - ref.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    n = len(crops)
    margins = [
        f"The float model's top-1 probability on the {n} crops: median "
        f"{np.median(prob.max(axis=1)):.2f} (10% of crops below "
        f"{np.quantile(prob.max(axis=1), 0.1):.2f}). Top-1 minus top-2 logit: "
        + ", ".join(f"under {t:g} on {np.mean(gap < t):.1%}" for t in (0.05, 0.1, 0.2, 0.5))
        + " of the crops. At 99% agreement at most "
        f"{int(0.01 * n)} of them may flip.",
    ]
    print(margins[0], flush=True)

    lines = ["| weights (activations all float32) | top-1 agreement | rel. logit error |",
             "|---|---|---|"]

    def row(label: str, candidate: Any) -> None:
        m = classification_metrics(ref, logits(candidate, crops))
        lines.append(f"| {label} | {m['top1_agreement']:.1%} | {m['relative_error']:.4f} |")
        print(lines[-1], flush=True)

    layers = [node.name for node in model.graph.node if node.op_type in ("Conv", "Gemm")]
    for bits in (8, 10, 12):
        row(f"int{bits} per channel, round to nearest", round_weights(model, bits))
    # the int8 preset keeps the first two convolutions (stem, first depthwise) in float
    kept = ", ".join(f"`{name}`" for name in layers[:2])
    row(f"int8 per channel, round to nearest, but {kept} float (as the int8 preset)",
        round_weights(model, 8, set(layers[2:])))
    row("float16", round_weights(model, None))
    singles = []
    for name in layers:
        out = logits(round_weights(model, 8, {name}), crops)
        rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        singles.append((rel, name, out))
    singles.sort(key=lambda s: -s[0])
    for rel, name, out in singles[:5]:
        agree = float(np.mean(out.argmax(axis=1) == ref.argmax(axis=1)))
        lines.append(f"| int8 for `{name}` alone | {agree:.1%} | {rel:.4f} |")
        print(lines[-1], flush=True)
    seconds = time.perf_counter() - t0
    print(f"{seconds:.0f} s")
    if not args.no_write:
        head = [
            f"Command: `.venv/bin/python bench/int8_weight_precision.py --crops {args.crops}`",
            "",
            f"{machine_description()} Threads: {THREADS}; load average "
            f"{load_average():.1f} at the end; {seconds:.0f} s.",
            "",
            *margins,
            "",
            "Only the weights of the float model rounded, every activation left in float32, "
            f"against the float model on the same {n} evaluation crops as the int8 section:",
            "",
        ]
        tail = [
            "",
            "Reading: these crops are hard to agree on (many near-ties), and the network "
            "magnifies weight rounding: int8 weights alone, rounded to nearest, flip several "
            "times the 1% that 99% agreement allows, even with the layers the preset keeps in "
            "float, and rounding only reaches 99% at about 12 bits. The preset's GPTQ "
            "rounding, bias correction and tuning take the error of int8 weights and int8 "
            "activations together to about a third of plain int8 weights alone (the int8 "
            "and error budget sections), which is where its 95-97% comes from; 99% asks for "
            "about the error of 12-bit weights with float activations.",
        ]
        write_section(SECTION, "\n".join(head + lines + tail))
    return 0


if __name__ == "__main__":
    sys.exit(main())
