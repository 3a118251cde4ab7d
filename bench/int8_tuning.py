"""What the end-to-end tuning of the int8 preset gains on efficientnet-lite0, by loss and data.

Quantizes efficientnet-lite0 with the int8 preset but without its tuning stage
(``finetune_share=0``: GPTQ rounding, bias correction, the stem and logits in float), on the
first 512 crops of the calibration split as ``bench/int8.py`` does, and caches that model.
Then tunes it with ``finetune_qoperator`` for ``--steps`` steps (the preset's learning rates,
batch 8, mirrored crops) on the first ``--crops`` calibration crops, minimising ``--loss``
(``mse`` on the logits or ``kl`` on their softmax), and measures on onnxruntime the top-1
agreement and relative logit error against the float model on the 300 evaluation crops of
``bench/int8.py`` and on the first 300 calibration crops (which the tuning saw). A gap
between the two says how much the tuning fits its own crops rather than the photos.

    .venv/bin/python bench/int8_tuning.py --loss kl --steps 1000 --crops 2048

One configuration per call (about 15 minutes for 1,000 steps on 2 cores); the results are
appended to ``--out`` (JSON lines) and the untuned model's figures printed first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_overhead import WORK, zoo_onnx
from peers import load_average

THREADS = 2


def untuned_model(calib: np.ndarray, evals: np.ndarray, fp32: Path,
                  float_units: int | None = None) -> Path:
    """The int8 preset's model before tuning (cached under the bench work folder), with the
    first ``float_units`` activation units in float (None: as many as the preset keeps)."""
    from edgeslim.ptq.presets import PRESET_SETTINGS, quantize_int8_preset

    preset = PRESET_SETTINGS["classification"]["float_leading_units"]
    units = preset if float_units is None else float_units
    suffix = "" if units == preset else f"-float{units}"
    path = WORK / f"efficientnet-lite0.int8-untuned{suffix}.onnx"
    if not path.exists():
        quantize_int8_preset(fp32, calib[:512], evals, task="classification",
                             time_budget_s=1200, out_path=path, progress=False,
                             finetune_share=0.0, float_leading_units=units)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loss", choices=("mse", "kl"), default="kl")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--crops", type=int, default=2048, help="calibration crops to tune on")
    ap.add_argument("--out", type=Path, default=Path("bench/results/int8_tuning.jsonl"))
    args = ap.parse_args(argv)

    import onnx
    import torch

    from edgeslim.datasets import photo_crops
    from edgeslim.ptq._graph import make_session
    from edgeslim.ptq.finetune import finetune_qoperator
    from edgeslim.ptq.metrics import classification_metrics

    torch.set_num_threads(THREADS)
    fp32 = zoo_onnx("efficientnet-lite0")
    calib = photo_crops(max(args.crops, 512), split="calibration")
    evals = photo_crops(300, split="evaluation")
    ref = make_session(fp32, threads=THREADS)

    def run(session: Any, x: np.ndarray) -> np.ndarray:
        return np.concatenate([session.run(None, {"input": x[i : i + 16]})[0]
                               for i in range(0, len(x), 16)])

    ref_eval, ref_seen = run(ref, evals), run(ref, calib[:300])

    def score(model: Any) -> dict[str, Any]:
        s = make_session(model, threads=THREADS)
        return {"evaluation": classification_metrics(ref_eval, run(s, evals)),
                "calibration": classification_metrics(ref_seen, run(s, calib[:300]))}

    qmodel = onnx.load(str(untuned_model(calib, evals, fp32)))
    print("untuned:", json.dumps(score(qmodel)), flush=True)
    t0 = time.perf_counter()
    tuned = finetune_qoperator(
        qmodel, lambda x: ref.run(None, {"input": x})[0], calib[: args.crops],
        steps=args.steps, threads=THREADS, loss=args.loss,
        log=lambda step, value: print(f"step {step}: loss {value:.5f}", flush=True)
        if step % 100 == 0 else None,
    )
    row = {"loss": args.loss, "steps": args.steps, "crops": args.crops,
           "seconds": round(time.perf_counter() - t0, 1), "load_average": load_average(),
           **score(tuned)}
    print("tuned:", json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
