"""Cross-tool table: edgeslim's bundles against what people use out of the box.

For digits-cnn, efficientnet-lite0 and minilm-l6, in one process, on the same inputs, with
2 threads everywhere:

- PyTorch fp32 eager;
- PyTorch dynamic int8 (``torch.ao.quantization.quantize_dynamic`` on ``nn.Linear``);
- onnxruntime fp32 (the project's checked export);
- onnxruntime ``quantize_dynamic`` and ``quantize_static`` with their defaults (static
  calibrated on the calibration split, never on the evaluation inputs);
- edgeslim: the ``int8`` preset (accuracy-aware ptq) when it is available, and for
  digits-cnn the bundle of ``edgeslim optimize`` (bench/optimize_digits.py) when present.
  Bundles are timed on a bare onnxruntime session with the same options as the others.

Fidelity is the workload's own metric: test accuracy for digits (and top-1 agreement with
PyTorch fp32), top-1 agreement with PyTorch fp32 on 200 photo crops for EfficientNet, mean
cosine to PyTorch fp32 embeddings on 300 sentences for MiniLM. Latency (batch 1) and
throughput (batch ``B``) are medians over rounds in which every tool runs warm, back to back
(0.3 s of batch-1 runs, 0.6 s of batch-B runs), in turn. Writes ``## peers`` in
bench/RESULTS.md with the machine description and the command.

Run: ``.venv/bin/python bench/peers.py [--models digits-cnn,...] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
THROUGHPUT_BATCH = {"digits-cnn": 256, "efficientnet-lite0": 16, "minilm-l6": 32}


# -- shared with bench/optimize_digits.py ----------------------------------------------------

def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def machine_description() -> str:
    """One paragraph: CPU model and SIMD flags, cores, library versions."""
    model, flags = platform.processor() or "unknown", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.SubprocessError):
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    import onnxruntime

    versions = [f"onnxruntime {onnxruntime.__version__}", f"numpy {np.__version__}",
                f"Python {platform.python_version()}"]
    try:
        import torch

        versions.insert(1, f"torch {torch.__version__}")
    except ImportError:
        pass
    return (f"Machine: {model}, {os.cpu_count()} cores visible, SIMD flags: "
            f"{', '.join(simd) or 'none of avx2/avx512/vnni'}; {', '.join(versions)}.")


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the ``## name`` section of RESULTS.md, leaving the others alone."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    heading = re.compile(rf"^## {re.escape(name)}\s*$", re.M)
    m = heading.search(text)
    block = f"## {name}\n\n{body.strip()}\n"
    if m is None:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        nxt = re.compile(r"^## ", re.M).search(text, m.end())
        end = nxt.start() if nxt else len(text)
        text = text[:m.start()] + block + ("\n" + text[end:] if nxt else "")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# -- the tools ----------------------------------------------------------------------------

@dataclass
class Tool:
    name: str
    run: Callable[..., np.ndarray]
    size_bytes: int
    note: str = ""


def ort_tool(name: str, model: bytes, input_names: tuple[str, ...], size: int,
             note: str = "") -> Tool:
    from edgeslim._ort import ort_session

    # threads spin between the ops of a run, as in edgeslim.load, and stop when it returns:
    # a pool that spins on would take the cores from the tool timed next (bench/int8.py)
    sess = ort_session(model, threads=2, spin_between_runs=False)

    def run(*arrays: np.ndarray) -> np.ndarray:
        return sess.run(None, dict(zip(input_names, arrays, strict=True)))[0]

    return Tool(name, run, size, note)


def torch_tool(name: str, model: Any, note: str = "") -> Tool:
    import torch

    model.eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)

    def run(*arrays: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(*(torch.from_numpy(a) for a in arrays)).numpy()

    return Tool(name, run, len(buf.getvalue()), note)


def calibration_feeds(name: str) -> list[dict[str, np.ndarray]]:
    """Inputs from the calibration split (disjoint from the evaluation inputs)."""
    if name.startswith("digits"):
        from edgeslim.zoo.digits import load_digits_split

        x = load_digits_split().x_train[:256]
        return [{"input": x[i:i + 64]} for i in range(0, len(x), 64)]
    if name == "efficientnet-lite0":
        from edgeslim.datasets import photo_crops

        crops = photo_crops(32, split="calibration")
        return [{"input": crops[i:i + 8]} for i in range(0, len(crops), 8)]
    from edgeslim.datasets import english_sentences
    from edgeslim.zoo.minilm import encode

    sentences = english_sentences(64, split="calibration")
    out = []
    for i in range(0, len(sentences), 16):
        ids, mask = encode(sentences[i:i + 16])
        out.append({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    return out


def build_tools(name: str, wl: Any, tmp: Path, optimize_bundle: Path | None) -> list[Tool]:
    import torch

    from edgeslim.export.specs import export_zoo_model
    from edgeslim.zoo import load_model

    model = load_model(name)
    tools = [torch_tool("PyTorch fp32 eager", model)]
    try:
        qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model),
                                                        {torch.nn.Linear}, dtype=torch.qint8)
        tools.append(torch_tool("PyTorch dynamic int8 (Linear)", qmodel))
    except Exception as exc:  # not every build ships the quantized CPU kernels
        print(f"{name}: torch dynamic int8 unavailable: {exc}", file=sys.stderr)
    fp32 = tmp / f"{name}.onnx"
    export_zoo_model(name, fp32, model)
    names = wl.input_names
    tools.append(ort_tool("onnxruntime fp32", fp32.read_bytes(), names, fp32.stat().st_size))
    try:  # onnxruntime's out-of-the-box quantizers, as bench/int8.py runs them
        from int8 import ort_defaults

        for label, path in ort_defaults(fp32, calibration_feeds(name), tmp).items():
            tool = "onnxruntime " + label.split()[1]
            note = "defaults" if "dynamic" in tool else "defaults (QDQ, MinMax)"
            tools.append(ort_tool(tool, path.read_bytes(), names, path.stat().st_size, note))
    except Exception as exc:
        print(f"{name}: onnxruntime quantize_dynamic/static failed: {exc}", file=sys.stderr)
    tools += edgeslim_tools(name, wl, tmp, optimize_bundle)
    return tools


def edgeslim_tools(name: str, wl: Any, tmp: Path, optimize_bundle: Path | None) -> list[Tool]:
    from edgeslim.bundle import read_bundle
    from edgeslim.errors import EdgeslimError
    from edgeslim.pipeline import compress

    out = []
    try:
        res = compress(name, out=tmp / f"{name}-int8.eslim", preset="int8", workload=wl,
                       progress=False)
        b = read_bundle(res.bundle)
        out.append(ort_tool("edgeslim int8 preset", b.model_bytes, wl.input_names,
                            res.bundle.stat().st_size, "bundle size"))
    except EdgeslimError as exc:
        print(f"{name}: edgeslim int8 preset unavailable: {exc}", file=sys.stderr)
    if name == "digits-cnn" and optimize_bundle is not None and optimize_bundle.is_file():
        b = read_bundle(optimize_bundle)
        label = b.manifest.get("provenance", {}).get("optimize", {}).get("label", "")
        out.append(ort_tool("edgeslim optimize", b.model_bytes, wl.input_names,
                            optimize_bundle.stat().st_size, f"{label}; bundle size"))
    return out


# -- measuring ----------------------------------------------------------------------------

def _timed(fn: Callable[[], Any], seconds: float, min_runs: int) -> float:
    fn()
    times, t0 = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - t0 < seconds:
        s = time.perf_counter()
        fn()
        times.append((time.perf_counter() - s) * 1e3)
    return statistics.median(times)


def timing_inputs(wl: Any, batch: int) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    first = wl.eval_batches[0][0]
    try:
        pool = tuple(np.concatenate([b[0][i] for b in wl.eval_batches])
                     for i in range(len(first)))
    except ValueError:
        pool = tuple(first)
    rows = np.arange(batch) % pool[0].shape[0]
    big = tuple(np.ascontiguousarray(a[rows]) for a in pool)
    one = tuple(np.ascontiguousarray(a[:1]) for a in pool)
    return one, big


def fidelity(tool: Tool, wl: Any, reference: list[np.ndarray] | None) -> dict[str, float]:
    outs = [tool.run(*inputs) for inputs, _ in wl.eval_batches]
    targets = np.concatenate([t for _, t in wl.eval_batches])
    res = {wl.metric: float(wl.score(np.concatenate(outs), targets))}
    if reference is not None and wl.metric == "accuracy":
        ref = np.concatenate(reference)
        res["top1_agreement"] = float((np.concatenate(outs).argmax(1) == ref.argmax(1)).mean())
    return res


def bench_model(name: str, rounds: int, optimize_bundle: Path | None) -> dict[str, Any]:
    from edgeslim.recipe.workload import workload_for
    from edgeslim.zoo import load_model

    wl = workload_for(name, reference=load_model(name) if name != "digits-cnn" else None)
    batch = THROUGHPUT_BATCH[name]
    with tempfile.TemporaryDirectory(prefix="edgeslim-peers-") as tmp:
        tools = build_tools(name, wl, Path(tmp), optimize_bundle)
        reference = [tools[0].run(*inputs) for inputs, _ in wl.eval_batches]
        rows = {t.name: {"size": t.size_bytes, "note": t.note,
                         **fidelity(t, wl, reference)} for t in tools}
        one, big = timing_inputs(wl, batch)
        lat: dict[str, list[float]] = {t.name: [] for t in tools}
        thr: dict[str, list[float]] = {t.name: [] for t in tools}
        for _ in range(rounds):
            for t in tools:
                lat[t.name].append(_timed(lambda t=t: t.run(*one), 0.3, 10))
                thr[t.name].append(batch / (_timed(lambda t=t: t.run(*big), 0.6, 3) / 1e3))
    base = tools[0].name
    for t in tools:
        r = rows[t.name]
        r["latency_ms"] = statistics.median(lat[t.name])
        r["throughput"] = statistics.median(thr[t.name])
        r["lat_speedup"] = statistics.median(
            b / x for b, x in zip(lat[base], lat[t.name], strict=True))
        r["thr_speedup"] = statistics.median(
            x / b for b, x in zip(thr[base], thr[t.name], strict=True))
    return {"model": name, "metric": wl.metric, "batch": batch, "rows": rows}


def markdown(results: list[dict[str, Any]], command: str, load: float) -> str:
    lines = [f"Command: `{command}` (one process; 2 threads for "
             "torch and onnxruntime (onnxruntime's threads spin within a run and stop when it "
             "returns; PyTorch with its defaults: each tool's first run of a turn is untimed); "
             "latency = median batch-1 ms, throughput = samples/s at the batch shown; "
             "speed-ups are medians of per-round ratios against PyTorch fp32 eager in the same "
             "round).", "", machine_description(),
             f"Load average (1 min) at the start: {load:.1f} on 2 cores (shared machine).", ""]
    for res in results:
        metric = res["metric"]
        extra = "top1_agreement" if metric == "accuracy" else None
        head = f"| tool | {metric} |" + (" top-1 agreement |" if extra else "") + \
            f" latency ms | vs torch | throughput/s (batch {res['batch']}) | vs torch |" \
            " size MB | note |"
        lines += [f"### {res['model']}", "", head,
                  "|---" * (head.count("|") - 1) + "|"]
        for tool, r in res["rows"].items():
            cells = [tool, f"{r[metric]:.4f}"]
            if extra:
                cells.append(f"{r[extra]:.4f}")
            cells += [f"{r['latency_ms']:.3f}", f"{r['lat_speedup']:.2f}x",
                      f"{r['throughput']:,.0f}", f"{r['thr_speedup']:.2f}x",
                      f"{r['size'] / 1e6:.3f}", r["note"]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits-cnn,efficientnet-lite0,minilm-l6")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--optimize-bundle", type=Path,
                        default=Path("/tmp/edgeslim-bench-optimize/best.eslim"),
                        help="edgeslim optimize's digits-cnn bundle (bench/optimize_digits.py)")
    parser.add_argument("--no-write", action="store_true", help="do not edit RESULTS.md")
    args = parser.parse_args()
    import logging
    import warnings

    # OMP_WAIT_POLICY=PASSIVE is not set: it stops PyTorch's OpenMP workers spinning between
    # ops within a run too (efficientnet-lite0 eager took 43 ms with it, 20-25 ms without);
    # the untimed first run of each tool's turn absorbs what the previous tool's workers spin
    import torch

    warnings.filterwarnings("ignore")  # torch's deprecation notes on its quantized kernels
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's "consider pre-processing"
    torch.set_num_threads(2)
    load = load_average()
    results = []
    for name in args.models.split(","):
        t0 = time.monotonic()
        results.append(bench_model(name.strip(), args.rounds, args.optimize_bundle))
        print(f"{name}: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    command = ".venv/bin/python bench/peers.py " + " ".join(sys.argv[1:])
    body = markdown(results, command.strip(), load)
    print(body)
    if not args.no_write:
        write_section("peers", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
