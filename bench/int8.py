"""int8 post-training quantization: edgeslim vs onnxruntime's defaults vs fp32, in one run.

For efficientnet-lite0 (crops of real photos) and minilm-l6 (real English sentences):

1. export the zoo model to ONNX (fp32);
2. quantize it with ``edgeslim.ptq.quantize_int8_preset`` (calibration split), and with
   onnxruntime's out-of-the-box ``quantize_dynamic`` and ``quantize_static`` (same calibration
   data);
3. measure fidelity to fp32 on the evaluation split (top-1 agreement; mean/min cosine and
   top-5 neighbour overlap), latency at batch 1 (2 threads; PyTorch eager, onnxruntime fp32
   and every int8 model interleaved input by input, medians), and the size of model.onnx
   against the fp32 parameter bytes;
4. write the section ``## int8 post-training quantization`` of bench/RESULTS.md.

    .venv/bin/python bench/int8.py            # both models (~15-30 min on 2 shared cores)
    .venv/bin/python bench/int8.py --models minilm-l6 --no-write
    .venv/bin/python bench/int8.py --models efficientnet-lite0 --seven-bit   # + a 7-bit row
    .venv/bin/python bench/int8.py --models minilm-l6 --export dynamo --no-write

``--seven-bit`` also runs the preset as a recipe's ``ptq: {bits: 7}`` does, with the same
budget, and adds its row: 7-bit weights (onnxruntime's ``reduce_range``) wherever 8-bit ones
would need the slower u8 x u8 kernels, so that on x86 CPUs without VNNI every kernel is the
fast u8 x s8 one and exact (ptq/exact.py): every weight for the dynamic scheme, and for the
static QOperator one all but the 1x1 convolutions whose input channels pair.

``--export`` says how minilm-l6 reaches ONNX: ``eager`` (the zoo's: eager attention,
TorchScript exporter), ``sdpa`` (transformers' default attention,
``scaled_dot_product_attention``, TorchScript exporter) or ``dynamo`` (that attention through
``torch.onnx.export``'s default exporter, which needs onnxscript): what a user's own export
of a BERT model looks like.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import load_average, machine_description, write_section

SECTION = "int8 post-training quantization"
THREADS = 2


def session(path: Path | str, spin: bool) -> Any:
    """A session for ``path``. A session whose idle threads spin on after its run takes the
    cores from the model timed next (minilm-l6's fp32 session measured 12-15 ms that way,
    interleaved input by input, 5 ms without). Timed in rounds (``spin``), threads spin
    between the ops of a run, as edgeslim.load and serve run them, and stop when it returns;
    interleaved, they never spin."""
    from edgeslim._ort import ort_session

    return ort_session(Path(path), threads=THREADS, spin=spin, spin_between_runs=False)


def sess_runner(sess: Any) -> Any:
    return lambda feed: sess.run(None, feed)


def interleaved(runners: dict[str, Any], inputs: list[Any], reps: int) -> dict[str, float]:
    """Median ms per runner; every input goes through every runner in turn (same noise, but
    each run starts with the caches the previous model left: its weights are evicted)."""
    for x in inputs[:3]:
        for run in runners.values():
            run(x)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(reps):
        for x in inputs:
            for name, run in runners.items():
                t = time.perf_counter()
                run(x)
                times[name].append(time.perf_counter() - t)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


def rounds(runners: dict[str, Any], inputs: list[Any], reps: int) -> dict[str, float]:
    """Median ms per runner; each of ``reps`` rounds runs every runner over all inputs in turn,
    after 3 warm-up runs, so each model is timed warm, as a deployed one runs, and the rounds
    spread the machine's noise over all runners alike."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(reps):
        for name, run in runners.items():
            for x in inputs[:3]:
                run(x)
            for x in inputs:
                t = time.perf_counter()
                run(x)
                times[name].append(time.perf_counter() - t)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


PROTOCOLS = {"rounds": rounds, "interleaved": interleaved}


def ort_defaults(fp32: Path, calib_feeds: list[dict], tmp: Path) -> dict[str, Path]:
    from onnxruntime.quantization import quantize_dynamic, quantize_static

    from edgeslim.ptq import FeedReader

    out = {
        "ort quantize_dynamic (defaults)": tmp / "ort_dynamic.onnx",
        "ort quantize_static (defaults)": tmp / "ort_static.onnx",
    }
    quantize_dynamic(str(fp32), str(out["ort quantize_dynamic (defaults)"]))
    quantize_static(str(fp32), str(out["ort quantize_static (defaults)"]), FeedReader(calib_feeds))
    return out


SEVEN = "edgeslim int8, bits: 7"


def dynamo_export(module: Any, path: Path) -> None:
    """``module`` (minilm-l6) to ``path`` through torch.onnx.export's default exporter, with a
    dynamic batch and sequence, as a user would export it."""
    import torch

    ids = torch.randint(1000, 2000, (1, 16))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2, max=256)
    torch.onnx.export(module, (ids, torch.ones_like(ids)), str(path), dynamo=True,
                      external_data=False,  # one file: the size column reads its bytes
                      input_names=["input_ids", "attention_mask"],
                      output_names=["sentence"],  # "embedding" already names a node's output
                      dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                      "attention_mask": {0: batch, 1: seq}})  # fmt: skip


def bench_model(
    name: str, tmp: Path, budget: float, n_eval: int, reps: int, protocol: str,
    seven_bit: bool = False, export: str = "eager",
) -> dict[str, Any]:
    import torch

    from edgeslim.export.onnx import onnx_param_bytes
    from edgeslim.export.specs import export_zoo_model
    from edgeslim.ptq import classification_metrics, embedding_metrics, quantize_int8_preset
    from edgeslim.zoo import load_model

    torch.set_num_threads(THREADS)
    if name == "minilm-l6" and export != "eager":
        from edgeslim.zoo.minilm import minilm_l6

        module = minilm_l6(attn_implementation="sdpa").eval()
    else:
        module = load_model(name).eval()
    fp32 = tmp / f"{name}.onnx"
    if name == "minilm-l6" and export == "dynamo":
        dynamo_export(module, fp32)
    else:
        export_zoo_model(name, fp32, model=module)
    param_bytes = onnx_param_bytes(fp32)
    if name == "efficientnet-lite0":
        from edgeslim.datasets import photo_crops

        task = "classification"
        # edgeslim calibrates ranges and GPTQ on the first 160 crops (the preset's
        # calibration_samples) and fine-tunes on all of them; onnxruntime gets those 160
        calib = photo_crops(2048, split="calibration")
        evals = photo_crops(n_eval, split="evaluation")
        calib_feeds = [{"input": calib[i : i + 1]} for i in range(160)]
        eval_feeds = [{"input": evals[i : i + 1]} for i in range(len(evals))]
        calib_data, eval_data = calib, evals
        metric = classification_metrics
        torch_run = lambda f: module(torch.from_numpy(f["input"]))  # noqa: E731
    else:
        from edgeslim.datasets import english_sentences
        from edgeslim.zoo.minilm import sentence_feeds as feeds

        task = "embedding"
        calib_feeds = feeds(english_sentences(128, split="calibration"))
        eval_feeds = feeds(english_sentences(n_eval, split="evaluation"))
        calib_data, eval_data = calib_feeds, eval_feeds
        metric = embedding_metrics

        def torch_run(f: dict) -> Any:
            return module(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"]))

    t = time.perf_counter()
    result = quantize_int8_preset(
        fp32,
        calib_data,
        eval_data,
        task=task,
        time_budget_s=budget,
        out_path=tmp / f"{name}.int8.onnx",
        progress=False,
    )
    quant_seconds = time.perf_counter() - t
    models = {"edgeslim int8": tmp / f"{name}.int8.onnx"}
    if seven_bit:
        from edgeslim.ptq.presets import PRESET_SETTINGS

        preset = PRESET_SETTINGS[task]
        pairs = preset["scheme"] == "static" and preset.get("quant_format") == "qoperator"
        seven = quantize_int8_preset(fp32, calib_data, eval_data, task=task, time_budget_s=budget,
                                     out_path=tmp / f"{name}.int8-7bit.onnx", progress=False,
                                     reduce_range="unpaired" if pairs else True)  # fmt: skip
        models[SEVEN] = tmp / f"{name}.int8-7bit.onnx"
        print(f"{name}: 7-bit preset goal met: {seven.goal_met}", flush=True)
    models.update(ort_defaults(fp32, calib_feeds, tmp))

    spin = protocol == "rounds"
    ref_sess = session(fp32, spin)
    reference = np.concatenate([ref_sess.run(None, f)[0] for f in eval_feeds])
    rows = {}
    sessions = {"onnxruntime fp32": ref_sess}
    for label, path in models.items():
        s = session(path, spin)
        sessions[label] = s
        out = np.concatenate([s.run(None, f)[0] for f in eval_feeds])
        rows[label] = {"metrics": metric(reference, out), "size_bytes": path.stat().st_size}
    rows["onnxruntime fp32"] = {
        "metrics": metric(reference, reference),
        "size_bytes": fp32.stat().st_size,
    }
    with torch.inference_mode():
        tout = np.concatenate([torch_run(f).numpy() for f in eval_feeds])
    rows["PyTorch fp32 eager"] = {"metrics": metric(reference, tout), "size_bytes": None}

    runners = {"PyTorch fp32 eager": lambda f: torch.inference_mode()(torch_run)(f)}
    for label, sess in sessions.items():
        runners[label] = sess_runner(sess)
    lat_inputs = eval_feeds[: min(60, len(eval_feeds))]
    load_before = load_average()
    latency = PROTOCOLS[protocol](runners, lat_inputs, reps)
    for label, ms in latency.items():
        rows[label]["latency_ms"] = ms
        rows[label]["vs_torch"] = latency["PyTorch fp32 eager"] / ms
        rows[label]["vs_ort_fp32"] = latency["onnxruntime fp32"] / ms
        if rows[label]["size_bytes"] is not None:
            rows[label]["size_vs_params"] = rows[label]["size_bytes"] / param_bytes
    return {
        "model": name,
        "task": task,
        "param_bytes": param_bytes,
        "rows": rows,
        "n_eval": len(eval_feeds),
        "n_latency": len(lat_inputs),
        "reps": reps,
        "protocol": protocol,
        "quantize_seconds": quant_seconds,
        "goal_met": result.goal_met,
        "excluded": result.excluded,
        "load_average": [load_before, load_average()],
        "mean_tokens": float(
            np.mean([f.get("input_ids", f.get("input")).shape[-1] for f in eval_feeds])
        )
        if task == "embedding"
        else None,
    }


NOTES = """\
How edgeslim gets there (all on onnxruntime's quantizer and kernels): efficientnet-lite0 uses
static int8 in QOperator format (QLinearConv, uint8 activations, percentile 99.99 calibration)
with int8 per-channel weights rounded by GPTQ on calibration activations plus bias correction,
then a sequential bias correction measured on the quantized model; the stem's output and the
logits stay float; then label-free end-to-end tuning of the int8 weights, biases and activation
scales against the float model's softmax (KL divergence) on 2,048 calibration crops (a PyTorch
replay of the QOperator graph's integer arithmetic), written back into the same onnxruntime
graph. minilm-l6 uses SmoothQuant (alpha 0.65) and int8 MatMuls: the inputs of the FFN's second
linear in the first four layers are quantized row by row at run time (one scale per token: the
[CLS] token's activations there are 6-8x the median token's, which is what ruins onnxruntime's
per-tensor dynamic range), the other 20 inputs (LayerNorm outputs, attention context; at most
3.5x) with one range calibrated on the calibration sentences, which costs no run-time reduction;
word embeddings are int8 with one scale per row. PyTorch eager with 2
threads suffers most from other work on this shared machine, so the ratios against it read
high when the load average is high."""

PROTOCOL_TEXT = {
    "rounds": "Protocol `rounds`: in each repetition every model runs all the latency inputs"
    " in turn (3 warm-up runs first), so it is timed warm as a deployed model runs and the"
    " repetitions spread the machine's noise over every model; onnxruntime's threads"
    " spin-wait between the ops of a run, as in `edgeslim.load` and `edgeslim serve`, and stop"
    " when the run returns (`session.force_spinning_stop`), so that no session spins on into"
    " the next model's turn; PyTorch runs with its defaults.",
    "interleaved": "Protocol `interleaved`: every input goes through every model in turn, so"
    " each run starts with the caches the previous model left; onnxruntime's idle threads"
    " sleep (spinning off), so that no session's threads spin into the next one's run.",
}

TARGETS = {
    "efficientnet-lite0": "top-1 agreement >= 99%, >= 3x PyTorch, >= 1.3x ORT fp32, size <= 27%",
    "minilm-l6": "mean cos >= 0.995, min >= 0.98, top-5 >= 0.95, >= 4x PyTorch, >= 1.4x ORT fp32, "
    "size <= 30%",
}


def table(res: dict[str, Any]) -> str:
    cls = res["task"] == "classification"
    head = (
        "| model | top-1 agreement | rel. logit error |"
        if cls
        else "| model | mean cosine | min cosine | top-5 overlap |"
    )
    head += " latency b=1 (ms) | vs PyTorch | vs ORT fp32 | model.onnx / fp32 params |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    order = [
        "PyTorch fp32 eager",
        "onnxruntime fp32",
        "ort quantize_dynamic (defaults)",
        "ort quantize_static (defaults)",
        "edgeslim int8",
        SEVEN,
    ]
    for label in (k for k in order if k in res["rows"]):
        r = res["rows"][label]
        m = r["metrics"]
        cells = (
            [f"{m['top1_agreement']:.1%}", f"{m['relative_error']:.3f}"]
            if cls
            else [f"{m['mean_cosine']:.4f}", f"{m['min_cosine']:.4f}", f"{m['top5_overlap']:.3f}"]
        )
        size = "-" if r.get("size_vs_params") is None else f"{r['size_vs_params']:.1%}"
        name = f"**{label}**" if label.startswith("edgeslim int8") else label
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {r['latency_ms']:.2f} | "
            f"{r['vs_torch']:.2f}x | {r['vs_ort_fp32']:.2f}x | {size} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet-lite0,minilm-l6")
    parser.add_argument("--budget", type=float, default=1200.0, help="search budget per model (s)")
    parser.add_argument("--n-eval", type=int, default=300)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="rounds",
                        help="rounds: each model timed warm over all inputs, models in turn, "
                        "onnxruntime spinning within runs; interleaved: input by input, "
                        "spinning off (each run finds the previous model's caches)")
    parser.add_argument("--seven-bit", action="store_true",
                        help="also quantize with 7-bit weights (ptq bits: 7) and add its row")
    parser.add_argument("--export", choices=["eager", "sdpa", "dynamo"], default="eager",
                        help="how minilm-l6 is exported: eager (the zoo's), sdpa "
                        "(transformers' default attention) or dynamo (that attention through "
                        "torch.onnx.export's default exporter)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-write", action="store_true", help="do not edit RESULTS.md")
    args = parser.parse_args()
    # OMP_WAIT_POLICY=PASSIVE is not set here: it slows the preset's PyTorch tuning, whose
    # 1,000 steps then no longer fit the budget (efficientnet-lite0: 95.0% instead of 97.3%)
    results = []
    with tempfile.TemporaryDirectory(prefix="edgeslim-int8-") as tmp:
        for name in args.models.split(","):
            res = bench_model(
                name.strip(), Path(tmp), args.budget, args.n_eval, args.reps, args.protocol,
                seven_bit=args.seven_bit, export=args.export,
            )
            results.append(res)
            print(f"\n### {name}\n" + table(res), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    command = "`.venv/bin/python bench/int8.py " + " ".join(sys.argv[1:]) + "`"
    body = [
        f"Command: {command.replace(' `', '`')}",
        "",
        machine_description(),
        f"Threads: {THREADS} (onnxruntime intra_op_num_threads, torch.set_num_threads). "
        + PROTOCOL_TEXT[args.protocol]
        + " Latency: batch 1, median over every input x repetition; ratios are of those"
        " medians.",
        "",
    ]
    for res in results:
        loads = ", ".join(f"{x:.1f}" for x in res["load_average"])
        extra = (
            f"; sentences at natural length, mean {res['mean_tokens']:.1f} tokens"
            if res["mean_tokens"]
            else "; 224x224 crops"
        )
        body += [
            f"### {res['model']}",
            "",
            f"Target: {TARGETS.get(res['model'], '-')}. Evaluation: {res['n_eval']} items of the "
            f"evaluation split (calibration on the distinct calibration split){extra}; latency on "
            f"{res['n_latency']} inputs x {res['reps']} repetitions; load average during timing "
            f"{loads}. edgeslim search: {res['quantize_seconds']:.0f} s, goal met: "
            f"{res['goal_met']}, nodes kept in float: {len(res['excluded'])} "
            f"({', '.join(res['excluded'][:8]) or 'none'}"
            f"{'...' if len(res['excluded']) > 8 else ''}).",
            "",
            table(res),
            "",
        ]
    body += [NOTES, ""]
    if not args.no_write:
        write_section(SECTION, "\n".join(body))


if __name__ == "__main__":
    main()
