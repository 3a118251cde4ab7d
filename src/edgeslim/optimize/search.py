"""The budget-aware search: cheap candidates first, a greedy climb, and nothing done twice.

Order of work (see ``docs/optimize.md`` for why):

1. the fp32 export (the baseline every drop is measured against; always evaluated);
2. data-free candidates: int8 ``ptq`` with and without per-layer fp32 fallback, 5-bit
   ``pack``; then per-layer pruning sensitivity (a few evaluations, no training);
3. a greedy climb along the structured-pruning ratio (``RATIOS``), recovered with
   ``START_EPOCHS`` of fine-tuning; at the first ratio both recoveries (distillation and
   plain fine-tuning) are tried and the better one is kept. A ratio that misses ``max_drop``
   by a little is retried with twice the epochs (up to ``MAX_EPOCHS``: successive halving's
   idea, the budget goes to survivors near the boundary); the first ratio that still misses
   ends the climb, and one bisection step between the last pass and that miss follows;
4. on the largest passing ratio: number formats (ptq int8, QAT 8-bit, 5/4-bit packing), then
   a climb along unstructured sparsity (size), then the sparsest passing point packed;
5. with the time left: twice the longest recovery where the climb stopped; the passing
   ratios with widths rounded to a multiple of ``ROUND_TO`` (onnxruntime's convolution speed
   jumps with the channel count) where every layer keeps that many; step 4 on the lower
   passing ratios.

Each candidate's cost is estimated from those measured so far (export and measurement time
plus epochs x seconds per epoch); one that would not finish before the deadline (less a
reserve for writing the bundle and the report) is skipped. So is one whose structured
pruning the pruner would refuse (``check_structured``, the pruner's own check, run before
any work: ``ROUND_TO`` channels are more than digits-cnn's conv1 keeps at 0.8), with the
pruner's reason in the report's notes. Results go to the store before the next candidate
starts, so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeslim.optimize.select import Budget
from edgeslim.optimize.space import Candidate, available_steps, candidate_key
from edgeslim.optimize.store import ResultStore

__all__ = ["MAX_EPOCHS", "RATIOS", "SPARSITIES", "START_EPOCHS", "Evaluated", "Search",
           "auto_batch"]

RATIOS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)
SPARSITIES = (0.5, 0.7, 0.85, 0.95)
START_EPOCHS = 4
MAX_EPOCHS = 16
SPARSE_EPOCHS = 2
ROUND_TO = 8
# the prune_structured parameters its reachability check reads
_CHECKED = frozenset({"ratio", "scope", "head_ratio", "ignored_layers", "round_to"})

EventFn = Callable[..., None]


@dataclass
class Evaluated:
    """A candidate with its stored result (``cached`` when a previous run measured it)."""

    candidate: Candidate
    key: str
    result: dict[str, Any]
    bundle: str
    cached: bool = False


def auto_batch(latency_ms: float, target_ms: float = 200.0) -> int:
    """Throughput batch: the power of two in [8, 256] whose run takes about ``target_ms``
    at the baseline's batch-1 latency (digits: 256; EfficientNet-Lite0: 8)."""
    b = 8
    while b < 256 and 2 * b * latency_ms <= target_ms:
        b *= 2
    return b


class OutOfTime(Exception):
    """Raised inside the planner when the next candidate cannot finish in time."""


@dataclass
class Search:
    """One search over one model; ``run()`` walks the plan, ``evaluated`` holds the results."""

    model: Any
    workload: Any
    budget: Budget
    store: ResultStore
    run_dir: Path
    model_hash: str
    model_label: str
    threads: int = 2
    throughput_batch: int | None = None  # None: chosen from the baseline's latency
    seed: int = 0
    started: float | None = None
    on_event: EventFn = lambda *a, **k: None
    evaluated: list[Evaluated] = field(default_factory=list)
    skipped: list[tuple[Candidate, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.start = self.started if self.started is not None else time.monotonic()
        self.deadline = self.start + self.budget.time_s
        self.steps = available_steps()
        self.trainable = getattr(self.workload, "train", None) is not None and hasattr(
            self.model, "state_dict")
        self._base_cost: float | None = None
        self._epoch_cost: float | None = None
        self._ptq_cost: float | None = None
        self.base: Evaluated | None = None
        self.failed: list[tuple[Candidate, str]] = []
        self._measure = {"threads": self.threads, "batch": self.throughput_batch or "auto"}
        self._batch_meta = f"throughput_batch@{self.threads}"
        if self.throughput_batch is None:  # a resumed run measures as the first one did
            self.throughput_batch = self.store.get_meta(self.model_hash, self._batch_meta)
        self._tried: set[str] = set()  # keys built (or tried) by this run
        self.passing: list[Candidate] = []  # structured points meeting max_drop, climb order
        self.miss: Candidate | None = None  # the first structured point that missed it
        self._refusals: dict[str, str | None] = {}  # prune_structured settings -> why refused

    # -- time ------------------------------------------------------------------------------

    @property
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def reserve(self) -> float:
        """Seconds kept for writing the chosen bundle and the report (a few seconds, more
        with many candidates to plot) and for leaving the process."""
        return max(10.0, 2.0 * (self._base_cost or 5.0)) + 0.05 * len(self.evaluated)

    def estimate(self, c: Candidate) -> float:
        base = self._base_cost or 5.0
        epoch = self._epoch_cost if self._epoch_cost is not None else base
        est = base + c.trains * epoch
        if c.format == "ptq":
            est += self._ptq_cost if self._ptq_cost is not None else 3 * base
        return est

    def _learn(self, c: Candidate, seconds: float) -> None:
        if self._base_cost is None:
            self._base_cost = seconds
            return
        extra = max(0.0, seconds - self._base_cost)
        if c.format == "ptq" and not c.trains:
            self._ptq_cost = extra
        elif c.trains and c.format != "ptq":
            per = extra / c.trains
            self._epoch_cost = per if self._epoch_cost is None else max(per,
                                                                        0.7 * self._epoch_cost)

    # -- one candidate ---------------------------------------------------------------------

    def feasible(self, c: Candidate) -> bool:
        needed = c.steps_needed()
        if not needed <= self.steps:
            return False
        trains = {"distill", "finetune", "quantize"} & needed or (
            c.sparsity and c.sparse_epochs)
        return not (trains and not self.trainable)

    def evaluate(self, c: Candidate, *, force: bool = False) -> Evaluated | None:
        """The stored result of ``c``, or compress and measure it now.

        Returns None when ``c`` failed or was skipped (no time, unavailable step). Raises
        ``OutOfTime`` when the deadline is too near for anything but the final writing.
        """
        if not self.feasible(c):
            return None
        key = candidate_key(self.model_hash, self.workload.name, c, seed=self.seed,
                            measure=self._measure)
        for ev in self.evaluated:
            if ev.key == key:
                return ev
        row = self.store.get(key)
        if row is not None and row.status == "done" and row.bundle and Path(row.bundle).is_file():
            ev = Evaluated(c, key, row.result or {}, row.bundle, cached=True)
            self.evaluated.append(ev)
            if self.base is None:
                self.base = ev
            if row.seconds:
                self._learn(c, row.seconds)
            self.on_event("cached", evaluated=ev)
            return ev
        if row is not None and row.status == "failed" and key in self._tried:
            # failed in this run: once per run (a later run tries again, as the cause, a
            # blocked path or a full disk, may be gone by then)
            self.failed.append((c, (row.error or "failed").splitlines()[0]))
            return None
        refused = self.refusal(c)
        if refused is not None:
            if (c, refused) not in self.skipped:
                self.skipped.append((c, refused))
                self.on_event("skip", candidate=c, reason=refused)
            return None
        est = self.estimate(c)
        if not force and est > self.remaining - self.reserve:
            if self.remaining - self.reserve < (self._base_cost or 5.0):
                raise OutOfTime
            self.skipped.append((c, f"needs ~{est:.0f} s, {self.remaining:.0f} s left"))
            self.on_event("skip", candidate=c, reason=self.skipped[-1][1])
            return None
        return self._compute(c, key, est)

    def refusal(self, c: Candidate) -> str | None:
        """Why ``prune_structured`` would refuse ``c``'s structured step on this model (its
        own check, run once per setting on a copy), or None."""
        params = dict(c.step_list()).get("prune_structured")
        if params is None or not hasattr(self.model, "state_dict"):
            return None
        settings = {k: v for k, v in params.items() if k in _CHECKED}
        memo = repr(sorted(settings.items()))
        if memo not in self._refusals:
            from edgeslim.compress.structured import check_structured
            from edgeslim.errors import ConfigError

            try:
                check_structured(self.model, self.workload.example_inputs, **settings)
                self._refusals[memo] = None
            except ConfigError as exc:
                self._refusals[memo] = f"not built, prune_structured refuses it: {exc}"
        return self._refusals[memo]

    def _compute(self, c: Candidate, key: str, est: float) -> Evaluated | None:
        import torch

        from edgeslim.optimize.measure import measure_model
        from edgeslim.pipeline import compress

        self.on_event("start", candidate=c, estimate=est)
        self._tried.add(key)
        self.store.start(key, self.model_hash, c.config())
        out = self.run_dir / "candidates" / f"{key[:16]}.eslim"
        t0 = time.monotonic()
        torch.manual_seed(self.seed)
        gen = getattr(self.workload.train, "generator", None)
        if gen is not None:
            gen.manual_seed(self.seed)  # same shuffles whatever ran before
        try:
            # ptq searches too: give it what is left of ours, less the reserve
            ptq_time = max(10.0, min(300.0, self.remaining - self.reserve
                                     - (self._base_cost or 5.0)))
            with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime's calibrator prints
                res = compress(self.model, out=out, recipe=c.recipe(ptq_time_s=ptq_time),
                               workload=self.workload, name=f"{self.model_label}-opt",
                               progress=False)
            data = Path(res.bundle).read_bytes()
            from edgeslim.bundle import read_bundle

            model_bytes = read_bundle(data).model_bytes
            if self.throughput_batch is None:
                self.throughput_batch = auto_batch(float(res.onnx_metrics[
                    "latency_ms_p50_batch1"]))
                self.store.set_meta(self.model_hash, self._batch_meta, self.throughput_batch)
            measured = measure_model(model_bytes, self.workload, threads=self.threads,
                                     batch=self.throughput_batch)
        except KeyboardInterrupt:
            self.store.interrupted(key)
            raise
        except Exception as exc:  # a candidate that breaks must not end the search
            seconds = time.monotonic() - t0
            msg = f"{type(exc).__name__}: {exc}"
            self.store.fail(key, msg + "\n" + traceback.format_exc(limit=4), seconds=seconds)
            self.failed.append((c, msg))
            self.on_event("failed", candidate=c, error=msg)
            return None
        seconds = time.monotonic() - t0
        metric_name = self.workload.metric
        result = {
            "metric": float(res.onnx_metrics[metric_name]),
            "metric_name": metric_name,
            "bundle_bytes": len(data),
            "onnx_bytes": int(res.onnx_metrics["onnx_bytes"]),
            "seconds": seconds,
            "steps": [{"step": e["step"], "params": e.get("params", {}),
                       "report": e.get("report", {})} for e in res.manifest["compression"]],
            **measured,
        }
        self.store.finish(key, result, bundle=str(out), seconds=seconds)
        self._learn(c, seconds)
        ev = Evaluated(c, key, result, str(out))
        self.evaluated.append(ev)
        if self.base is None:
            self.base = ev
        self.on_event("done", evaluated=ev)
        return ev

    # -- the plan --------------------------------------------------------------------------

    def passes(self, ev: Evaluated | None) -> bool:
        if ev is None or self.base is None:
            return False
        return self.base.result["metric"] - ev.result["metric"] <= self.budget.max_drop + 1e-9

    def drop(self, ev: Evaluated) -> float:
        assert self.base is not None
        return float(self.base.result["metric"] - ev.result["metric"])

    def run(self) -> None:
        """Walk the plan until it ends or time runs out (``OutOfTime`` is absorbed)."""
        self.evaluate(Candidate(), force=True)  # the baseline, whatever the budget
        try:
            self._plan()
        except OutOfTime:
            self.on_event("phase", name="time budget spent")

    def _plan(self) -> None:
        base = Candidate()
        self.on_event("phase", name="data-free candidates")
        for c in (base.with_(format="ptq", bits=8, fallback=True,
                             ptq_drop=round(self.budget.max_drop / 2, 4)),
                  base.with_(format="ptq", bits=8, fallback=False),
                  base.with_(format="pack", bits=5)):
            self.evaluate(c)
        self.sensitivity()
        top = self.climb_structured()
        self.on_event("phase", name="formats and sparsity on " + top.label())
        self.stack(top)
        self.refine(top)

    def refine(self, top: Candidate) -> None:
        """With time left: a longer recovery where the climb stopped, then the formats and
        sparsity ladder on the lower passing ratios (more drop budget left for them)."""
        self.on_event("phase", name="refining with the time left")
        if self.miss is not None and self.miss.epochs and self.miss.ratio > top.ratio:
            c = self.miss.with_(epochs=max(2 * self.miss.epochs, 2 * MAX_EPOCHS))
            if self.passes(self.evaluate(c)):
                self.stack(c)
        # onnxruntime's convolution speed jumps with the channel count: try widths rounded
        # to a multiple of 8 at the passing ratios, largest first
        for c in sorted(self.passing, key=lambda c: -c.ratio):
            self.evaluate(c.with_(round_to=ROUND_TO))
        for c in reversed(self.passing):
            if c != top:
                self.stack(c)

    def sensitivity(self) -> None:
        if self.store.get_meta(self.model_hash, "sensitivity") is not None \
                or not hasattr(self.model, "state_dict"):
            return
        if self.remaining - self.reserve < 2 * (self._base_cost or 5.0):
            return
        from edgeslim.optimize.sensitivity import layer_sensitivity

        self.on_event("phase", name="per-layer sensitivity")
        rows = layer_sensitivity(copy.deepcopy(self.model), self.workload,
                                 deadline=time.monotonic() + max(
                                     1.0, 0.1 * (self.remaining - self.reserve)))
        self.store.set_meta(self.model_hash, "sensitivity", rows)

    def climb_structured(self) -> Candidate:
        """The largest structured ratio meeting ``max_drop`` (the fp32 baseline if none)."""
        best = Candidate()
        if "prune_structured" not in self.steps:
            return best
        self.on_event("phase", name="structured-pruning climb")
        epochs = START_EPOCHS if self.trainable else 0
        first = Candidate(ratio=RATIOS[0], distill=False, epochs=epochs)
        distill = False
        if epochs and "distill" in self.steps:
            ft, kd = self.evaluate(first), self.evaluate(first.with_(distill=True))
            if kd is not None and (ft is None or kd.result["metric"] > ft.result["metric"]):
                distill = True
        last_pass: Candidate | None = None
        self.passing: list[Candidate] = []
        for ratio in RATIOS:
            e = epochs
            while True:
                c = Candidate(ratio=ratio, distill=distill, epochs=e)
                ev = self.evaluate(c)
                if self.passes(ev):
                    last_pass = best = c
                    self.passing.append(c)
                    break
                near = ev is not None and self.drop(ev) <= self.budget.max_drop + max(
                    2 * self.budget.max_drop, 0.01)
                if near and e and e * 2 <= MAX_EPOCHS:
                    e *= 2
                    continue
                # the climb ends here; one bisection step towards the miss
                self.miss = c
                lo = last_pass.ratio if last_pass else 0.0
                mid = round((lo + ratio) / 2, 2)
                if lo < mid < ratio:
                    c = Candidate(ratio=mid, distill=distill,
                                  epochs=last_pass.epochs if last_pass else epochs)
                    if self.passes(self.evaluate(c)):
                        best = c
                        self.passing.append(c)
                    else:
                        self.miss = c
                return best
        return best

    def stack(self, top: Candidate) -> None:
        """Number formats and unstructured sparsity on top of the chosen structured point."""
        keep = self.base.result["metric"] - self._metric(top) if self.base else 0.0
        left = max(0.002, round(self.budget.max_drop - keep, 4))
        formats = [top.with_(format="ptq", bits=8, fallback=True, ptq_drop=left),
                   top.with_(format="qat", bits=8),
                   top.with_(format="pack", bits=5),
                   top.with_(format="pack", bits=4)]
        for c in sorted(formats, key=self.estimate):
            self.evaluate(c)
        sparse_best: Candidate | None = None
        for s in SPARSITIES:
            c = top.with_(sparsity=s, sparse_epochs=SPARSE_EPOCHS if self.trainable else 0)
            if not self.passes(self.evaluate(c)):
                break
            sparse_best = c
        if sparse_best is not None:
            self.evaluate(sparse_best.with_(format="pack", bits=4))
            left = max(0.002, round(self.budget.max_drop - (
                self.base.result["metric"] - self._metric(sparse_best)), 4)) if self.base \
                else left
            self.evaluate(sparse_best.with_(format="ptq", bits=8, fallback=True, ptq_drop=left))

    def _metric(self, c: Candidate) -> float:
        key = candidate_key(self.model_hash, self.workload.name, c, seed=self.seed,
                            measure=self._measure)
        for ev in self.evaluated:
            if ev.key == key:
                return float(ev.result["metric"])
        return float(self.base.result["metric"]) if self.base else 0.0
