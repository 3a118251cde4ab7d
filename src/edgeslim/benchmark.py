"""``edgeslim bench``: latency and throughput of a bundle, optionally against its original.

All variants run in one process, on the same inputs, with the same pinned thread count. The
repetitions are split into rounds; in each round every variant runs its share back to back
after a few warm-up runs (A A A B B B C C C, then again), so that each is timed warm, as a
deployed model runs, and a noisy neighbour slows every variant alike across the rounds;
ratios are what to read, not absolute times. onnxruntime's threads spin-wait between the ops
of a run, as in ``edgeslim.load`` and ``edgeslim serve``, but stop when the run returns, so
that no session's pool spins on into the next variant's turn. Alternating run by run instead
would time every variant with the caches the previous one left (a 23 MB int8 model's weights
fit this machine's 32 MB L3, a 90 MB fp32 one's do not).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim._ort import ort_session
from edgeslim._validate import check_int_range
from edgeslim.errors import ConfigError, InferenceError

__all__ = ["BenchRow", "bench_bundle", "percentiles", "timed_rounds"]


@dataclass
class BenchRow:
    """One variant: batch-1 latency percentiles (ms) and throughput at batch N (rows/s)."""

    variant: str
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float
    batch: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def percentiles(samples_ms: list[float]) -> tuple[float, float, float]:
    arr = np.asarray(samples_ms)
    return tuple(float(np.percentile(arr, q)) for q in (50, 90, 99))  # type: ignore[return-value]


def _source_data(manifest: dict[str, Any]) -> tuple[Any, str | None]:
    """The bundle's source model and the data its recipe named (None for zoo defaults)."""
    provenance = manifest.get("provenance") or {}
    recipe = provenance.get("recipe") if isinstance(provenance.get("recipe"), dict) else {}
    data = recipe.get("data") if isinstance(recipe.get("data"), str) else None
    return provenance.get("source"), data


def _workload(manifest: dict[str, Any], reference: Any = None, *, callables: bool = False
              ) -> Any:
    """The evaluation workload of the bundle's source (a zoo model; with ``callables``, also
    a package.module:callable with the data its recipe named), or None: a torch-free
    install, or a source without one. A callable's workload is built only to run its original
    (photos: 2,048 crops and the zoo model, ~35 s); its bundle's probe inputs serve else."""
    source, data = _source_data(manifest)
    try:
        from edgeslim.recipe.workload import ZOO_WORKLOAD, workload_for
    except ImportError:  # torch-free install: no zoo workloads
        return None
    if source in ZOO_WORKLOAD or (callables and data is not None and ":" in str(source)):
        return workload_for(source, data, reference=reference)
    return None


def _inputs_for(manifest: dict[str, Any], batch: int, wl: Any = None, seq: int = 32
                ) -> dict[str, np.ndarray]:
    """``batch`` rows of inputs: the workload's evaluation data when there is one, else the
    manifest's probe inputs repeated (valid by construction: the model ran on them), else
    seeded random floats with zeros for integer inputs and ones for masks. An input whose
    first axis is fixed gets that many rows whatever ``batch`` says."""
    specs = manifest["inputs"]
    rows = [spec["shape"][0] if spec["shape"] and isinstance(spec["shape"][0], int) else batch
            for spec in specs]
    if wl is not None:
        first = wl.eval_batches[0][0]
    elif (manifest.get("probe") or {}).get("inputs"):
        first = [np.asarray(manifest["probe"]["inputs"][s["name"]], dtype=s["dtype"])
                 for s in specs]
    else:
        first = None
    if first is not None and all(np.ndim(a) >= 1 and len(a) for a in first):
        return {s["name"]: np.concatenate([a] * -(-n // len(a)))[:n]
                for s, a, n in zip(specs, first, rows, strict=True)}
    rng = np.random.default_rng(0)
    feeds = {}
    for spec, n in zip(specs, rows, strict=True):
        shape = [n if i == 0 else (seq if not isinstance(d, int) else d)
                 for i, d in enumerate(spec["shape"])]
        if spec["dtype"].startswith("float"):
            feeds[spec["name"]] = rng.standard_normal(shape).astype(spec["dtype"])
        elif "mask" in spec["name"]:
            feeds[spec["name"]] = np.ones(shape, dtype=spec["dtype"])
        else:  # an index of any table: zeros are always in range
            feeds[spec["name"]] = np.zeros(shape, dtype=spec["dtype"])
    return feeds


def _original_variants(source: str, model: Any, wl: Any, threads: int
                       ) -> dict[str, Callable[[dict], Any]]:
    """PyTorch eager and onnxruntime fp32 runners of the bundle's original ``model``."""
    import tempfile

    import torch

    from edgeslim.export import export_onnx

    torch.set_num_threads(threads)
    names = list(wl.input_names)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fp32.onnx"
        export_onnx(model, wl.example_inputs, path, input_names=names,
                    output_names=list(wl.output_names), dynamic_axes=wl.dynamic_axes or None)
        sess = ort_session(path.read_bytes(), threads=threads, spin_between_runs=False)

    def eager(feeds: dict) -> Any:
        with torch.inference_mode():
            return model(*(torch.from_numpy(feeds[n]) for n in names))

    return {"original PyTorch eager": eager,
            "original onnxruntime fp32": lambda feeds: sess.run(None, feeds)}


def bench_bundle(
    path: str | Path,
    *,
    threads: int = 2,
    batch: int = 64,
    repeats: int = 200,
    against_original: bool = False,
) -> list[BenchRow]:
    """Benchmark bundle ``path`` on onnxruntime (and its original with ``against_original``)."""
    from edgeslim.bundle import read_bundle

    threads = check_int_range(threads, "threads", "bench", 1, 256)
    batch = check_int_range(batch, "batch", "bench", 1, 65_536)
    repeats = check_int_range(repeats, "repeats", "bench", 5, 1_000_000)
    from edgeslim.edge.runtime import Runner

    bundle = read_bundle(path)
    manifest = bundle.manifest
    # As a node loads it: the model against its manifest, then a warm-up (a BundleError that
    # says what is wrong, not onnxruntime's traceback); timed on a session of its own below.
    Runner(bundle, intra_op_num_threads=threads)
    sess = ort_session(bundle.model_bytes, threads=threads, spin_between_runs=False)
    variants: dict[str, Callable[[dict], Any]] = {
        f"bundle {manifest['name']} (onnxruntime)": lambda feeds: sess.run(None, feeds)
    }
    if against_original and str(_source_data(manifest)[0]).endswith(".onnx"):
        # an ONNX original: onnxruntime fp32 only (there is no PyTorch model to run)
        source = Path(str(_source_data(manifest)[0]))
        if not source.is_file():
            raise ConfigError(f"--against original runs the bundle's source model, "
                              f"{str(source)!r}, which is not a file here (the path is as "
                              f"compress was given it).")
        fp32 = ort_session(source.read_bytes(), threads=threads, spin_between_runs=False)
        variants["original onnxruntime fp32"] = lambda feeds: fp32.run(None, feeds)
        wl = None  # the manifest's probe inputs: what the bundle was checked on
    elif against_original:
        source, _ = _source_data(manifest)
        from edgeslim.zoo import ZOO, load_model

        if source not in ZOO and ":" not in str(source):
            raise ConfigError(
                f"--against original needs the bundle's source model; its provenance names "
                f"{source!r}, which is neither a zoo model ({', '.join(sorted(ZOO))}), "
                "package.module:callable nor an .onnx file."
            )
        model = load_model(source).eval()
        wl = _workload(manifest, reference=model, callables=True)
        if wl is None:
            raise ConfigError(f"--against original needs the data the bundle was made with; "
                              f"the recipe of {source!r} named none (data:).")
        variants.update(_original_variants(source, model, wl, threads))
    else:
        wl = _workload(manifest)
    # the workload is built once (photos: 2,048 crops), for both batch sizes
    one, many = _inputs_for(manifest, 1, wl), _inputs_for(manifest, batch, wl)
    rows = len(next(iter(many.values())))  # a fixed first axis wins over --batch
    for feeds in (one, many):  # a model that cannot run on them: one line, not a traceback
        for name, fn in variants.items():
            try:
                fn(feeds)
            except Exception as exc:  # onnxruntime's and torch's errors alike
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise InferenceError(f"{name} cannot run on {len(next(iter(feeds.values())))} "
                                     f"row(s) of bench inputs: {first[:300]}") from None
    lat = timed_rounds(variants, one, repeats)
    thr_ms = timed_rounds(variants, many, max(5, repeats // 20))
    return [BenchRow(name, *percentiles(lat[name]), float(rows / np.median(thr_ms[name]) * 1e3),
                     rows)
            for name in variants]


def timed_rounds(
    variants: dict[str, Callable[[dict], Any]], feeds: dict, repeats: int, rounds: int = 5,
    warmup: int = 3,
) -> dict[str, list[float]]:
    """``repeats`` timed runs (ms) of each variant on ``feeds``, in ``rounds`` rounds; in each
    round every variant runs ``warmup`` untimed runs, then its share, back to back."""
    rounds = max(1, min(rounds, repeats))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        share = repeats // rounds + (1 if r < repeats % rounds else 0)
        for name, fn in variants.items():
            for _ in range(warmup):
                fn(feeds)
            for _ in range(share):
                t0 = time.perf_counter()
                fn(feeds)
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times
