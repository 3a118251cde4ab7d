"""Unstructured pruning on digits-cnn: accuracy and compressed size against sparsity.

For each sparsity it prunes the trained zoo digits-cnn globally and per layer, one-shot and
gradual, with and without a short fine-tune, and reports test accuracy, the seed's objective
L, and the deflated size of the weights relative to the dense model (unstructured zeros make
a bundle smaller; they do not make dense kernels faster, so no latency is reported here).
All figures of one table come from one run.

Run: ``.venv/bin/python bench/pruning.py [--epochs 2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import io
import json
import time
import zlib

import torch

from edgeslim.compress.prune import prune
from edgeslim.compress.train import accuracy
from edgeslim.zoo import load_model
from edgeslim.zoo.digits import digits_loaders


def deflated_size(model: torch.nn.Module) -> int:
    """Bytes of the float32 state dict after zlib level 9 (as a deflated bundle entry)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(zlib.compress(buf.getvalue(), 9))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.8,0.9,0.95")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)

    dense = load_model("digits-cnn")
    train, test = digits_loaders(batch_size=128, seed=0)
    dense_acc, dense_size = accuracy(dense, test), deflated_size(dense)
    rows = []
    for s in (float(v) for v in args.sparsities.split(",")):
        for scope in ("global", "layer"):
            for schedule, epochs in (("oneshot", 0), ("oneshot", args.epochs),
                                     ("gradual", args.epochs)):
                t0 = time.perf_counter()
                res = prune(dense, sparsity=s, scope=scope, schedule=schedule, steps=4,
                            train_data=train, epochs=epochs, progress=False)
                rows.append({
                    "sparsity": s, "scope": scope, "schedule": schedule, "epochs": epochs,
                    "accuracy": accuracy(res.model, test), "objective": res.objective,
                    "size_ratio": deflated_size(res.model) / dense_size,
                    "seconds": time.perf_counter() - t0,
                })

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"digits-cnn unstructured pruning (dense accuracy {dense_acc:.4f})")
    for col in ("sparsity", "scope", "schedule", "epochs", "accuracy", "Δ acc", "L",
                "size vs dense", "s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"{r['sparsity']:.2f}", r["scope"], r["schedule"], str(r["epochs"]),
            f"{r['accuracy']:.4f}", f"{r['accuracy'] - dense_acc:+.4f}", f"{r['objective']:.3g}",
            f"{r['size_ratio']:.2f}", f"{r['seconds']:.1f}",
        )
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense_accuracy": dense_acc, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
