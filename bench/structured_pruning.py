"""Structured pruning on digits-cnn: PyTorch throughput, size and accuracy, dense vs pruned.

Prunes 50% of the channels of the trained zoo digits-cnn (both convolutions and the hidden
fc layer; the classifier is kept whole) by group L2 magnitude, recovers accuracy by
distilling from the dense model (3 epochs, teacher = the dense model), and measures
PyTorch inference throughput at batch 256 and batch 1 with 2 threads. Dense and pruned runs
are interleaved (dense, pruned, dense, pruned, ...) and the medians are compared, so the
speed-up is a ratio measured in one run on the same (possibly shared) machine.

Exits with status 1 when the batch-256 speed-up is below the goal (default 1.6x).

Run: ``.venv/bin/python bench/structured_pruning.py [--ratio 0.5] [--goal 1.6] [--json F]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from edgeslim.compress.distill import distill
from edgeslim.compress.structured import prune_structured
from edgeslim.compress.train import accuracy
from edgeslim.zoo import load_model
from edgeslim.zoo.digits import digits_loaders


@torch.inference_mode()
def throughput(models: dict[str, torch.nn.Module], batch: int, seconds: float) -> dict[str, float]:
    """Median images/s of each model, repetitions interleaved across the models."""
    x = torch.rand(batch, 64)
    for m in models.values():  # warm-up
        for _ in range(5):
            m(x)
    # calls per repetition so that one repetition of the dense model takes ~20 ms
    first = next(iter(models.values()))
    t0 = time.perf_counter()
    for _ in range(5):
        first(x)
    calls = max(1, int(0.02 / ((time.perf_counter() - t0) / 5)))
    samples: dict[str, list[float]] = {k: [] for k in models}
    start = time.perf_counter()
    while len(samples[next(iter(models))]) < 5 or time.perf_counter() - start < seconds:
        for name, m in models.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                m(x)
            samples[name].append(batch * calls / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=3, help="distillation epochs")
    parser.add_argument("--goal", type=float, default=1.6, help="batch-256 speed-up required")
    parser.add_argument("--seconds", type=float, default=4.0, help="timing per batch size")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    torch.manual_seed(0)

    dense = load_model("digits-cnn").eval()
    train, test = digits_loaders(seed=0)
    example = torch.zeros(1, 64)
    result = prune_structured(dense, example, ratio=args.ratio, importance="l2", progress=False)
    pruned, report = result.model.eval(), result.report
    pruned_acc = accuracy(pruned, test)
    torch.set_num_threads(1)  # training a model this small is fastest on one thread
    distill(pruned, dense, train, epochs=args.epochs, lr=1e-3, progress=False)

    torch.set_num_threads(2)
    models = {"dense": dense, "pruned": pruned}
    t256 = throughput(models, 256, args.seconds)
    t1 = throughput(models, 1, args.seconds)
    figures = {
        "ratio": args.ratio,
        "params": {"dense": report.params_before, "pruned": report.params_after},
        "macs": {"dense": report.macs_before, "pruned": report.macs_after},
        "accuracy": {"dense": accuracy(dense, test), "pruned": pruned_acc,
                     "pruned+distilled": accuracy(pruned, test)},
        "images_per_s_batch256": t256,
        "images_per_s_batch1": t1,
        "speedup_batch256": t256["pruned"] / t256["dense"],
        "speedup_batch1": t1["pruned"] / t1["dense"],
        "goal": args.goal,
    }

    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(report.format_table())
    table = Table(title=f"digits-cnn, {args.ratio:.0%} of channels removed (torch, 2 threads)")
    for col in ("model", "params", "MACs", "accuracy", "img/s @256", "img/s @1"):
        table.add_column(col, justify="right")
    acc = figures["accuracy"]
    table.add_row("dense", f"{report.params_before:,}", f"{report.macs_before:,}",
                  f"{acc['dense']:.4f}", f"{t256['dense']:,.0f}", f"{t1['dense']:,.0f}")
    table.add_row("pruned", f"{report.params_after:,}", f"{report.macs_after:,}",
                  f"{acc['pruned']:.4f}", f"{t256['pruned']:,.0f}", f"{t1['pruned']:,.0f}")
    table.add_row(f"+ KD {args.epochs} ep", "", "", f"{acc['pruned+distilled']:.4f}", "", "")
    table.add_row("pruned/dense", f"{report.params_kept:.3f}", f"{report.macs_kept:.3f}",
                  f"{acc['pruned+distilled'] - acc['dense']:+.4f}",
                  f"{figures['speedup_batch256']:.2f}x", f"{figures['speedup_batch1']:.2f}x")
    console.print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    ok = figures["speedup_batch256"] >= args.goal
    console.print(
        f"batch-256 speed-up {figures['speedup_batch256']:.2f}x "
        f"{'meets' if ok else 'MISSES'} the goal of {args.goal:.2f}x"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
