"""Run a bundle's model with onnxruntime: ``load(path)`` gives a ``Runner``.

Torch-free. The runner checks the bundle (hashes, signature when a public key is given),
builds one ``InferenceSession`` from the model bytes, checks the manifest's inputs and outputs
against the graph, warms up, and then validates every call's inputs (names, dtypes, ranks,
fixed dims, symbolic dims shared between inputs) before onnxruntime sees them, so a bad call
gets an ``InferenceError`` that names the input, what was expected and what was given.

``Runner.run`` returns a dict output name -> ``np.ndarray`` in the manifest's output order.

Example::

    >>> runner = load("digits.eslim", public_key="keys/signing.pub")
    >>> runner.run(np.zeros((2, 64), np.float32))["logits"].shape
    (2, 10)
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim.bundle import Bundle, Limits, TensorSpec, read_bundle
from edgeslim.bundle.manifest import check_against_model
from edgeslim.bundle.signing import PublicKeyLike, verify_signature
from edgeslim.errors import BundleError, ConfigError, InferenceError, SignatureError, require

__all__ = ["Runner", "default_threads", "load", "ort_tensor_specs"]

#: onnxruntime's type strings -> numpy dtype names (the manifest's DTYPES).
ORT_TYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int8)": "int8", "tensor(int16)": "int16", "tensor(int32)": "int32",
    "tensor(int64)": "int64", "tensor(uint8)": "uint8", "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32", "tensor(uint64)": "uint64", "tensor(bool)": "bool",
}


def _physical_cores() -> int:
    """Physical cores available to this process (Linux sysfs), else the logical count."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            pkg = (base / "physical_package_id").read_text().strip()
            core = (base / "core_id").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add((pkg, core))
    return max(1, len(cores))


def default_threads() -> int:
    """onnxruntime intra-op threads by default: physical cores, at most 4."""
    return min(4, _physical_cores())


def ort_tensor_specs(session: Any) -> dict[str, list[tuple[str, str | None, tuple]]]:
    """A session's inputs and outputs as ``(name, dtype or None, shape)`` tuples."""
    return {
        kind: [(t.name, ORT_TYPES.get(t.type), tuple(t.shape)) for t in tensors]
        for kind, tensors in (("inputs", session.get_inputs()), ("outputs", session.get_outputs()))
    }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class Runner:
    """One bundle's model in an onnxruntime session, with checked inputs.

    ``bundle`` is a path or a ``Bundle`` from ``read_bundle``. ``intra_op_num_threads``
    defaults to ``default_threads()``; inter-op is 1, graph optimisation is "all" and execution
    sequential. ``spin``: whether idle intra-op threads spin-wait for the next run
    (onnxruntime's default) instead of sleeping. Spinning answers sooner but keeps the extra
    threads busy for a while after every run, which costs the most CPU for small models and
    sparse requests. Turn it off on a node that runs on battery or shares its cores.
    ``warmup`` runs the model once on zeros of the declared shapes (symbolic dims set to 1).
    A model onnxruntime cannot load or run raises ``BundleError``.

    Attributes: ``manifest`` (dict), ``bundle``, ``inputs`` / ``outputs`` (``TensorSpec``
    tuples in manifest order), ``name``, ``version``, ``session`` (the InferenceSession).
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        *,
        public_key: PublicKeyLike | None = None,
        intra_op_num_threads: int | None = None,
        spin: bool = True,
        warmup: bool = True,
        limits: Limits | None = None,
    ) -> None:
        if not isinstance(spin, bool):
            raise ConfigError(f"The 'spin' parameter of Runner must be True or False. "
                              f"Got {spin!r} instead.")
        require("onnxruntime", "edge", "Running a bundle")
        import onnxruntime as ort

        if not isinstance(bundle, Bundle):
            if not isinstance(bundle, (str, os.PathLike)):
                raise ConfigError(f"The bundle given to load/Runner must be a path or a Bundle "
                                  f"from read_bundle. Got {type(bundle).__name__} instead.")
            bundle = read_bundle(bundle, public_key=public_key, limits=limits)
        elif public_key is not None:  # always against this key: ``verified`` may mean another
            if bundle.signature is None:
                raise SignatureError(f"Bundle '{bundle.name}' is not signed, but a public key "
                                     "was given: refusing an unsigned bundle.")
            verify_signature(bundle.manifest_bytes, bundle.signature, public_key)
            bundle = dataclasses.replace(bundle, verified=True)
        if intra_op_num_threads is None:
            intra_op_num_threads = default_threads()
        if isinstance(intra_op_num_threads, bool) or not isinstance(intra_op_num_threads, int) \
                or not 1 <= intra_op_num_threads <= 256:
            raise ConfigError(f"The 'intra_op_num_threads' parameter of Runner must be an int "
                              f"in the range [1, 256]. Got {intra_op_num_threads!r} instead.")
        self.bundle = bundle
        self.manifest: dict[str, Any] = bundle.manifest
        self.inputs: tuple[TensorSpec, ...] = bundle.inputs
        self.outputs: tuple[TensorSpec, ...] = bundle.outputs
        self.intra_op_num_threads = intra_op_num_threads
        self.spin = spin

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_num_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only; a warning is not the user's problem
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        try:
            self.session = ort.InferenceSession(
                bundle.model_bytes, sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented
            raise BundleError(
                f"onnxruntime {ort.__version__} cannot load the model of bundle "
                f"'{self.name}': {_first_line(exc)}"
            ) from None
        actual = ort_tensor_specs(self.session)
        for kind, declared in (("inputs", self.inputs), ("outputs", self.outputs)):
            check_against_model(list(declared), actual[kind], kind, BundleError)
        self._output_names = [s.name for s in self.outputs]
        self._lock = threading.Lock()  # only guards the counters; session.run is thread-safe
        self.calls = 0
        if warmup:
            self.warmup()

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    def __repr__(self) -> str:
        return (f"Runner(name={self.name!r}, version={self.version!r}, "
                f"inputs={[s.name for s in self.inputs]}, "
                f"outputs={self._output_names}, threads={self.intra_op_num_threads})")

    def example_shapes(self) -> dict[str, list[int]]:
        """The declared input shapes with every symbolic dim 1."""
        return {s.name: [d if isinstance(d, int) else 1 for d in s.shape] for s in self.inputs}

    def example_inputs(self, fill: float = 0.0) -> dict[str, np.ndarray]:
        """Arrays of the declared shapes (symbolic dims 1) and dtypes, filled with ``fill``."""
        shapes = self.example_shapes()
        return {s.name: np.full(shapes[s.name], fill, s.dtype) for s in self.inputs}

    def warmup(self) -> None:
        """One run on zeros; ``BundleError`` when the model fails on them."""
        try:
            self.session.run(self._output_names, self.example_inputs())
        except Exception as exc:  # also MemoryError: zeros of the declared shapes do not fit
            raise BundleError(
                f"The model of bundle '{self.name}' failed its warm-up run on zeros of shapes "
                f"{self.example_shapes()}: {_first_line(exc)}"
            ) from None

    def check_inputs(self, inputs: Any, *, cast: bool = False) -> dict[str, np.ndarray]:
        """The feeds ``run`` would pass to onnxruntime; ``InferenceError`` when they are bad."""
        if not isinstance(inputs, Mapping):
            if len(self.inputs) != 1:
                raise InferenceError(
                    f"Model '{self.name}' takes {len(self.inputs)} inputs "
                    f"{[s.name for s in self.inputs]}; pass a dict name -> array."
                )
            inputs = {self.inputs[0].name: inputs}
        expected = [s.name for s in self.inputs]
        unknown = sorted(set(inputs) - set(expected))
        missing = [n for n in expected if n not in inputs]
        if unknown or missing:
            raise InferenceError(
                f"Model '{self.name}' takes inputs {expected}; got {sorted(map(str, inputs))}"
                + (f" (missing {missing})" if missing else "")
                + (f" (unknown {unknown})" if unknown else "")
                + "."
            )
        feeds: dict[str, np.ndarray] = {}
        symbols: dict[str, tuple[int, str]] = {}
        for spec in self.inputs:
            feeds[spec.name] = self._check_one(spec, inputs[spec.name], cast, symbols)
        return feeds

    def _check_one(
        self, spec: TensorSpec, value: Any, cast: bool, symbols: dict[str, tuple[int, str]]
    ) -> np.ndarray:
        if callable(getattr(value, "detach", None)):  # a torch tensor, maybe one with grad
            value = value.detach()
            value = value.cpu() if callable(getattr(value, "cpu", None)) else value
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InferenceError(f"Input '{spec.name}' is not an array: {exc}.") from None
        want = np.dtype(spec.dtype)
        if arr.dtype != want:
            if arr.dtype.kind in "OUSV":
                raise InferenceError(f"Input '{spec.name}' must be numeric {spec.dtype}; got "
                                     f"an array of {arr.dtype}.")
            if not cast:
                raise InferenceError(
                    f"Input '{spec.name}' must be {spec.dtype}; got {arr.dtype}. Convert it "
                    f"(array.astype('{spec.dtype}')) or pass cast=True."
                )
            if not np.can_cast(arr.dtype, want, casting="same_kind"):
                raise InferenceError(
                    f"Input '{spec.name}' must be {spec.dtype}; got {arr.dtype}, which does not "
                    f"cast to it even with cast=True (floats never become integers)."
                )
            arr = arr.astype(want)
        if arr.ndim != spec.rank:
            raise InferenceError(
                f"Input '{spec.name}' must have rank {spec.rank} (shape {list(spec.shape)}); "
                f"got shape {list(arr.shape)}."
            )
        for i, (dim, size) in enumerate(zip(spec.shape, arr.shape, strict=True)):
            if isinstance(dim, int):
                if dim != size:
                    raise InferenceError(
                        f"Input '{spec.name}' must have shape {list(spec.shape)}; got "
                        f"{list(arr.shape)} (dim {i} is {size}, expected {dim})."
                    )
            elif dim in symbols and symbols[dim][0] != size:
                other = symbols[dim][1]
                raise InferenceError(
                    f"Dim '{dim}' is {symbols[dim][0]} in input '{other}' but {size} in input "
                    f"'{spec.name}'; inputs sharing a dim name must agree."
                )
            else:
                symbols[dim] = (size, spec.name)
        return np.asarray(arr, order="C")  # C order, and a scalar stays rank 0

    def run(self, inputs: Any, *, cast: bool = False) -> dict[str, np.ndarray]:
        """Run the model; return ``{output name: array}`` in the manifest's output order.

        ``inputs`` is a dict input name -> array (numpy, or anything ``np.asarray`` reads, such
        as a torch tensor), or one array when the model has one input. Dtypes must match
        exactly unless ``cast=True``, which converts as numpy's "same_kind" rule allows
        (float64 -> float32, int -> float), never float -> int.
        """
        if not isinstance(cast, bool):
            raise ConfigError(f"The 'cast' parameter of run must be True or False. "
                              f"Got {cast!r} instead.")
        feeds = self.check_inputs(inputs, cast=cast)
        try:
            values = self.session.run(self._output_names, feeds)
        except Exception as exc:
            raise InferenceError(f"Model '{self.name}' failed on the inputs given: "
                                 f"{_first_line(exc)}") from None
        with self._lock:
            self.calls += 1
        return dict(zip(self._output_names, values, strict=True))

    def probe(self) -> float | None:
        """Run the manifest's probe; return the max abs error, None when there is no probe.

        ``BundleError`` when an output differs from the recorded one by more than ``atol``:
        the model does not answer here as it did when the bundle was built.
        """
        probe = self.manifest.get("probe")
        if not probe:
            return None
        feeds = {s.name: np.asarray(probe["inputs"][s.name], dtype=s.dtype) for s in self.inputs}
        got = self.run(feeds)
        atol = float(probe.get("atol", 1e-3))
        worst = 0.0
        for name, expected in probe["outputs"].items():
            exp = np.asarray(expected, dtype=np.float64)
            out = got[name].astype(np.float64)
            if exp.shape != out.shape:
                raise BundleError(f"Probe output '{name}' has shape {list(out.shape)}; the "
                                  f"manifest recorded {list(exp.shape)}.")
            err = float(np.max(np.abs(out - exp))) if exp.size else 0.0
            worst = max(worst, err)
            if not err <= atol:
                raise BundleError(
                    f"Probe output '{name}' of bundle '{self.name}' is off by {err:.3g}, over "
                    f"its atol {atol:g}: the model does not answer as when it was built."
                )
        return worst


def load(
    path: str | os.PathLike | Bundle,
    public_key: PublicKeyLike | None = None,
    *,
    intra_op_num_threads: int | None = None,
    spin: bool = True,
    warmup: bool = True,
) -> Runner:
    """``edgeslim.load``: check a bundle and return a warmed-up ``Runner`` for it.

    With ``public_key`` the bundle must carry a valid signature (``SignatureError`` if not).
    """
    return Runner(path, public_key=public_key, intra_op_num_threads=intra_op_num_threads,
                  spin=spin, warmup=warmup)
