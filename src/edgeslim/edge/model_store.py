"""The models a node serves, and their hot swap.

``ModelStore.load(path)`` loads a bundle *beside* the one being served: read and check it
(signature when a public key is configured, hashes), build an onnxruntime session, warm it up,
run the manifest's probe, build the pre/postprocessing pipelines, and only then switch the
name to the new model in one assignment. Requests that already hold the old model finish on
it (the old session is freed when the last of them lets go); any failure leaves the old model
serving and raises the error. Loads are serialised; serving never waits for a load, and
neither does an unload (it takes only the short lock of the switch itself).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeslim.bundle import Bundle
from edgeslim.bundle.signing import PublicKeyLike
from edgeslim.edge.batcher import Batcher
from edgeslim.edge.metrics import Metrics
from edgeslim.edge.preprocess import Pipeline, PostPipeline
from edgeslim.edge.runtime import Runner
from edgeslim.edge.v2 import InferRequest, V2Error, v2_datatype, v2_shape
from edgeslim.errors import BundleError, ConfigError, EdgeslimError, InferenceError

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"


@dataclass
class ServedModel:
    """One loaded, warmed-up model with its pipelines, batcher and V2 metadata."""

    runner: Runner
    pipeline: Pipeline
    post: PostPipeline
    batcher: Batcher
    executor: Executor
    source: str | None
    loaded_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        r = self.runner
        self.name: str = r.name
        self.version: str = r.version
        self.sha256: str = str(r.manifest.get("model", {}).get("sha256", ""))
        self._inputs = {
            s.name: (v2_datatype(s.dtype), s.shape, v2_shape(s.shape)) for s in r.inputs
        }
        self.output_names = [s.name for s in r.outputs]
        self.metadata: dict[str, Any] = {
            "name": self.name,
            "versions": [self.version],
            "platform": PLATFORM,
            "inputs": [{"name": s.name, "datatype": v2_datatype(s.dtype),
                        "shape": v2_shape(s.shape)} for s in r.inputs],
            "outputs": [{"name": s.name, "datatype": v2_datatype(s.dtype),
                         "shape": v2_shape(s.shape)} for s in r.outputs],
        }

    @property
    def dynamic_batch(self) -> bool:
        """True when every input and output has a symbolic first dim."""
        return has_dynamic_batch(self.runner)

    def info(self) -> dict[str, Any]:
        """What a node agent reports about the model."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "source": self.source, "loaded_at": self.loaded_at,
                "batching": self.batcher.max_batch > 1,
                "task": self.runner.manifest.get("task")}

    # ------------------------------------------------------------------ V2 requests

    def feeds(self, req: InferRequest) -> dict[str, np.ndarray]:
        """The request's tensors as model feeds; ``V2Error`` naming any mismatch."""
        feeds: dict[str, np.ndarray] = {}
        symbols: dict[str, tuple[int, str]] = {}
        for t in req.inputs:
            spec = self._inputs.get(t.name)
            if spec is None:
                raise V2Error(f"model '{self.name}' has no input '{t.name}'; its inputs are "
                              f"{list(self._inputs)}"[:400])
            datatype, shape, want = spec
            if t.datatype != datatype:
                raise V2Error(f"input '{t.name}' has datatype {t.datatype}, but model "
                              f"'{self.name}' expects {datatype}")
            if len(t.shape) != len(want) or any(
                w not in (-1, g) for w, g in zip(want, t.shape, strict=True)
            ):
                raise V2Error(f"input '{t.name}' has shape {t.shape}, but model "
                              f"'{self.name}' expects {want} (-1: any size)")
            for dim, size in zip(shape, t.shape, strict=True):
                if isinstance(dim, str):
                    seen = symbols.setdefault(dim, (size, t.name))
                    if seen[0] != size:
                        raise V2Error(f"dim '{dim}' is {seen[0]} in input '{seen[1]}' but "
                                      f"{size} in input '{t.name}'; they must agree")
            feeds[t.name] = t.array
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise V2Error(f"model '{self.name}' also needs the inputs {missing}")
        return feeds

    def wanted_outputs(self, req: InferRequest) -> list[str]:
        if not req.outputs:
            return self.output_names
        names = [o.name for o in req.outputs]
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise V2Error(f"the request asks for output {twice!r} twice; name each output once"
                          [:400])
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise V2Error(f"model '{self.name}' has no output {unknown[0]!r}; its outputs are "
                          f"{self.output_names}"[:400])
        return names

    def run_checked(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """onnxruntime on feeds already checked against the inputs (see ``run_session``)."""
        return run_session(self.runner.session, self.output_names, self.name, feeds)

    async def infer(self, feeds: dict[str, np.ndarray], *, expected: bool = False
                    ) -> dict[str, np.ndarray]:
        """Run through the batcher (which batches only models with a dynamic batch axis)."""
        return await self.batcher.submit(feeds, expected=expected)


def run_session(session: Any, output_names: list[str], name: str,
                feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One onnxruntime run on feeds already checked against the model's inputs.

    ``ServedModel.feeds`` or ``Runner.check_inputs`` did the checks (names, dtypes, dims), so
    this skips the runner's own; an onnxruntime failure still becomes an ``InferenceError``.
    """
    try:
        values = session.run(output_names, feeds)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InferenceError(f"model '{name}' failed on the inputs given: {first}") from None
    return dict(zip(output_names, values, strict=True))


def has_dynamic_batch(runner: Runner) -> bool:
    specs = [*runner.inputs, *runner.outputs]
    return all(s.rank > 0 and isinstance(s.shape[0], str) for s in specs)


def rows_independent(runner: Runner) -> bool:
    """Whether two rows run as one batch give, bit for bit, what each gives alone.

    Batching promises that a request's answer does not depend on what it was batched with.
    Some models break it: a reduction over the batch axis, or kernels that take another
    path (another summation order) for another number of rows. Checked on two made-up rows
    (symbolic dims other than the batch 8 long; floats from a fixed seed, integers 1).
    """
    def rows(seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        out = {}
        for s in runner.inputs:
            shape = [d if isinstance(d, int) else (1 if i == 0 else 8)
                     for i, d in enumerate(s.shape)]
            dtype = np.dtype(s.dtype)
            out[s.name] = (rng.normal(size=shape).astype(dtype) if dtype.kind == "f"
                           else np.ones(shape, dtype))
        return out

    names = [s.name for s in runner.outputs]
    a, b = rows(1), rows(2)
    try:
        alone = [runner.session.run(names, a), runner.session.run(names, b)]
        both = runner.session.run(names, {k: np.concatenate([a[k], b[k]]) for k in a})
    except Exception:  # made-up rows this model does not take: nothing to tell from them
        return True
    return all(
        np.array_equal(both[j][i : i + 1], alone[i][j], equal_nan=True)
        for i in (0, 1) for j in range(len(names))
    )


class ModelStore:
    """Models by name, loaded and swapped atomically.

    ``threads`` sets onnxruntime intra-op threads per model and ``spin`` whether idle ones
    spin-wait (see ``Runner``); ``max_batch`` > 1 turns on
    dynamic batching for models with a dynamic batch axis, waiting up to
    ``batch_window_ms`` for company (see ``Batcher``); other models run one request at a time.
    Model runs expected to take at most ``inline_ms`` run on the event loop, and so do those
    of a lone request while ``solo()`` (one client connected) holds (see ``Batcher``).
    """

    def __init__(
        self,
        executor: Executor,
        *,
        public_key: PublicKeyLike | None = None,
        threads: int | None = None,
        spin: bool = True,
        max_batch: int = 32,
        batch_window_ms: float = 2.0,
        inline_ms: float = 4.0,
        solo: Any = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.executor = executor
        self.public_key = public_key
        self.threads = threads
        self.spin = spin
        self.max_batch = max_batch
        self.batch_window_ms = batch_window_ms
        self.inline_ms = inline_ms
        self.solo = solo
        self.metrics = metrics
        self._models: dict[str, ServedModel] = {}
        self._load_lock = threading.Lock()  # held through a whole load (read, warm-up, probe)
        self._switch_lock = threading.Lock()  # held only to switch or drop a name
        # unloads while loads are pending, so that a load can tell its name was unloaded
        # after it began: (unload number, name), cleared when no load is pending
        self._pending_loads = 0
        self._unload_count = 0
        self._unloaded: list[tuple[int, str]] = []

    def get(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    def names(self) -> list[str]:
        return sorted(self._models)

    def __len__(self) -> int:
        return len(self._models)

    def build(self, source: str | os.PathLike | Bundle) -> ServedModel:
        """Load, verify, warm up and probe a bundle without serving it yet."""
        # Runner reads a path under our key, and checks a Bundle read elsewhere (maybe
        # verified with another key) against ours
        runner = Runner(source, public_key=self.public_key, intra_op_num_threads=self.threads,
                        spin=self.spin)
        bundle = runner.bundle
        runner.probe()
        m = runner.manifest
        try:
            pipeline = Pipeline(m.get("preprocessing") or [], inputs=m["inputs"],
                                files=bundle.files)
            post = PostPipeline(m.get("postprocessing") or [], outputs=m["outputs"],
                                labels=m.get("labels"))
        except ConfigError as exc:
            raise BundleError(f"bundle '{bundle.name}' has unusable processing steps: {exc}"
                              ) from None
        on_batch = None
        if self.metrics is not None:
            on_batch = self.metrics.batch_size.labels(runner.name).observe
        run = functools.partial(run_session, runner.session,
                                [s.name for s in runner.outputs], runner.name)
        batched = self.max_batch > 1 and has_dynamic_batch(runner)
        if batched and not rows_independent(runner):
            log.warning("model '%s' answers a row batched with others differently from the "
                        "same row alone; batching is off for it", runner.name)
            batched = False
        batcher = Batcher(run, self.executor,
                          max_batch=self.max_batch if batched else 1,
                          window_ms=self.batch_window_ms, inline_ms=self.inline_ms,
                          solo=self.solo, on_batch=on_batch)
        return ServedModel(runner, pipeline, post, batcher, self.executor,
                           str(bundle.path) if bundle.path else None)

    def load(self, source: str | os.PathLike | Bundle, *, name: str | None = None
             ) -> ServedModel:
        """Build a model and switch to it; on any failure the current model keeps serving.

        ``name``, when given, must be the bundle's model name (``ConfigError`` otherwise).
        Raises the load's ``EdgeslimError`` (``BundleError``, ``SignatureError``, ...), and a
        ``ConfigError`` when its model's name was unloaded after this call began: the later
        request wins.
        """
        with self._switch_lock:
            self._pending_loads += 1
            began = self._unload_count
        try:
            return self._load(source, name, began)
        finally:
            with self._switch_lock:
                self._pending_loads -= 1
                if not self._pending_loads:
                    self._unloaded.clear()

    def _load(self, source: str | os.PathLike | Bundle, name: str | None, began: int
              ) -> ServedModel:
        with self._load_lock:
            label = name or "?"
            try:
                served = self.build(source)
                label = served.name
                if name is not None and served.name != name:
                    raise ConfigError(f"the bundle holds model '{served.name}', not '{name}'; "
                                      f"load it as '{served.name}'")
            except EdgeslimError:
                if self.metrics is not None:
                    self.metrics.loads.labels(label, "failed").inc()
                raise
            with self._switch_lock:
                if any(n > began and u == served.name for n, u in self._unloaded):
                    # the later request wins: serving it again would undo the unload
                    if self.metrics is not None:
                        self.metrics.loads.labels(label, "failed").inc()
                    raise ConfigError(f"model '{served.name}' was unloaded while this load ran, "
                                      f"so it was not switched to; load it again to serve it")
                self._models[served.name] = served  # the atomic switch
                if self.metrics is not None:
                    self.metrics.loads.labels(served.name, "ok").inc()
                    self.metrics.set_model(served.name, served.version, served.sha256)
            return served

    def unload(self, name: str) -> bool:
        """Stop serving ``name``; in-flight requests finish. False when it was not loaded.

        Does not wait for a load in progress (the server calls it on its event loop); a load
        of ``name`` in progress then fails rather than serve it again.
        """
        with self._switch_lock:
            self._unload_count += 1
            if self._pending_loads:
                self._unloaded.append((self._unload_count, name))
            gone = self._models.pop(name, None)
            if gone is not None and self.metrics is not None:
                self.metrics.drop_model(name)
            return gone is not None

    def index(self) -> list[Mapping[str, Any]]:
        """V2 repository index entries."""
        return [{"name": m.name, "version": m.version, "state": "READY"}
                for m in self._models.values()]
