"""Device profiles: predict a model's latency on a device from measurements made here.

A profile names a reference model and its latency measured on the device. The search measures
every candidate here (onnxruntime, ``threads`` pinned) and measures the same reference here
with the same threads; a candidate's device latency is predicted as

    latency_device = latency_here * (reference_device / reference_here)

and its device throughput as ``throughput_here / factor``. The ratio carries both the
per-core speed and the thread count of the device for a model like the reference; how well it
carries to other models is measured in ``docs/optimize.md``. Without a reference latency a
profile can fall back to per-core scaling, ``factor = threads_here / device_threads`` (same
per-core speed, perfect parallel scaling: crude, and said so in the report).

A profile file (JSON or YAML)::

    name: rpi4
    cores: 4
    memory_mb: 3838
    threads: 4                      # threads the device runs models with (default: cores)
    reference:
      model: digits-cnn             # digits-cnn (fp32, batch 1) or fleet-reference
      latency_ms: 0.41              # measured on the device
      threads: 4                    # threads of that measurement (recorded; use threads)

A fleet node's labels (``edgeslim.fleet.node.auto_labels``: ``device_class``, ``cores``,
``memory_mb``, ``ref_latency_us`` of the bundled 64-64-10 MLP at one thread), alone or as a
``{"id": ..., "labels": {...}}`` entry of the controller's ``GET /nodes``, are a profile too.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeslim._validate import load_yaml, yaml_error_line
from edgeslim.errors import ConfigError

__all__ = [
    "REFERENCE_MODELS",
    "DeviceProfile",
    "check_profile_target",
    "load_profile",
    "measure_reference",
    "profile_from_labels",
    "write_profile",
]

REFERENCE_MODELS = ("digits-cnn", "fleet-reference")


@dataclass(frozen=True)
class DeviceProfile:
    """What the search needs to know of a device (see the module docstring)."""

    name: str
    cores: int | None = None
    memory_mb: int | None = None
    threads: int | None = None
    reference_model: str = "digits-cnn"
    reference_latency_ms: float | None = None
    reference_threads: int | None = None

    def __post_init__(self) -> None:
        if self.reference_model not in REFERENCE_MODELS:
            raise ConfigError(f"Unknown reference model {self.reference_model!r} in device "
                              f"profile {self.name!r}. Allowed: {', '.join(REFERENCE_MODELS)}.")
        for key in ("cores", "memory_mb", "threads", "reference_threads"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ConfigError(f"The '{key}' of device profile {self.name!r} must be an "
                                  f"int >= 1. Got {value!r} instead.")
        lat = self.reference_latency_ms
        if lat is not None and (isinstance(lat, bool) or not isinstance(lat, (int, float))
                                or not lat > 0):
            raise ConfigError(f"The reference latency_ms of device profile {self.name!r} must "
                              f"be a number > 0. Got {lat!r} instead.")
        if lat is None and self.device_threads is None:
            raise ConfigError(f"Device profile {self.name!r} has neither a reference latency "
                              "nor cores/threads: give reference.latency_ms (measured on the "
                              "device) or at least cores.")

    @property
    def device_threads(self) -> int | None:
        return self.threads or self.cores

    def factor(self, reference_here_ms: float | None, threads_here: int) -> float:
        """Multiply a latency measured here by this to predict it on the device."""
        if self.reference_latency_ms is not None:
            if not reference_here_ms:
                raise ConfigError("The reference model's latency here is needed to scale to "
                                  f"device {self.name!r}.")
            return float(self.reference_latency_ms) / reference_here_ms
        return threads_here / float(self.device_threads or threads_here)

    @property
    def method(self) -> str:
        if self.reference_latency_ms is not None:
            return f"ratio of {self.reference_model} batch-1 latencies"
        return "per-core scaling (no reference latency given)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def profile_from_labels(labels: dict[str, Any], *, name: str | None = None) -> DeviceProfile:
    """A profile from a fleet node's labels (``device_class``, ``cores``, ``memory_mb``,
    ``ref_latency_us``: the fleet reference MLP at one thread), given as a plain mapping or as
    an entry of the controller's ``GET /nodes`` (``{"id": ..., "labels": {...}}``)."""
    if isinstance(labels, dict) and isinstance(labels.get("labels"), dict):
        return profile_from_labels(labels["labels"], name=name or labels.get("name")
                                   or labels.get("id"))

    def _int(key: str) -> int | None:
        v = labels.get(key)
        if v in (None, ""):
            return None
        try:
            return int(str(v))
        except ValueError:
            raise ConfigError(f"The node label {key!r} must be an integer. Got {v!r}.") from None

    us = labels.get("ref_latency_us")
    try:
        latency = float(us) / 1e3 if us not in (None, "") else None
    except ValueError:
        raise ConfigError(f"The node label 'ref_latency_us' must be a number. Got {us!r}.") \
            from None
    cores = _int("cores")
    label = name or "-".join(str(x) for x in (labels.get("device_class"), cores) if x)
    return DeviceProfile(name=label or "node", cores=cores, memory_mb=_int("memory_mb"),
                         threads=cores, reference_model="fleet-reference",
                         reference_latency_ms=latency, reference_threads=1)


def load_profile(path: str | os.PathLike[str]) -> DeviceProfile:
    """Read a profile file (JSON or YAML; see the module docstring) or a node's labels."""
    import yaml

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"The device profile {str(path)!r} is a folder, not a file: give the "
                          "profile's JSON or YAML file (edgeslim device-profile -o FILE).")
    if not p.is_file():
        raise ConfigError(f"The device profile {str(path)!r} does not exist.")
    try:
        raw = load_yaml(p.read_text(encoding="utf-8"))  # YAML reads JSON too
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"The device profile {str(path)!r} is not JSON or YAML: "
                          f"{yaml_error_line(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"The device profile {str(path)!r} must be a mapping. Got "
                          f"{type(raw).__name__} instead.")
    if isinstance(raw.get("labels"), dict):
        return profile_from_labels(raw["labels"], name=raw.get("name") or raw.get("id"))
    if "ref_latency_us" in raw or "device_class" in raw:
        return profile_from_labels(raw, name=raw.get("name"))
    allowed = {"name", "cores", "memory_mb", "threads", "reference", "description"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"Unknown key {unknown[0]!r} in device profile {str(path)!r}. "
                          f"Allowed keys: {', '.join(sorted(allowed))}.")
    ref = raw.get("reference") or {}
    if not isinstance(ref, dict):
        raise ConfigError(f"'reference' in device profile {str(path)!r} must be a mapping "
                          f"with model and latency_ms. Got {ref!r} instead.")
    bad = sorted(set(ref) - {"model", "latency_ms", "threads", "batch"})
    if bad:
        raise ConfigError(f"Unknown key {bad[0]!r} under 'reference' in device profile "
                          f"{str(path)!r}. Allowed: batch, latency_ms, model, threads.")
    if ref.get("batch", 1) != 1:
        raise ConfigError(f"The reference latency must be measured at batch 1. Got batch "
                          f"{ref.get('batch')!r} in {str(path)!r}.")
    return DeviceProfile(
        name=str(raw.get("name") or p.stem), cores=raw.get("cores"),
        memory_mb=raw.get("memory_mb"), threads=raw.get("threads"),
        reference_model=ref.get("model", "digits-cnn"),
        reference_latency_ms=ref.get("latency_ms"), reference_threads=ref.get("threads"),
    )


_REFERENCE_CACHE: dict[str, bytes] = {}


def reference_onnx(model: str) -> tuple[bytes, dict[str, Any]]:
    """ONNX bytes of a reference model and its batch-1 feeds."""
    import numpy as np

    if model == "fleet-reference":
        data = (Path(__file__).parents[1] / "fleet" / "reference.onnx").read_bytes()
        return data, {"x": np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(1, 64)}
    if model not in _REFERENCE_CACHE:
        from edgeslim.export.specs import export_zoo_model

        with tempfile.TemporaryDirectory(prefix="edgeslim-ref-") as tmp:
            out = Path(tmp) / "ref.onnx"
            export_zoo_model(model, out)
            _REFERENCE_CACHE[model] = out.read_bytes()
    from edgeslim.zoo.digits import load_digits_split

    x = load_digits_split().x_test[:1].copy()
    return _REFERENCE_CACHE[model], {"input": x}


def measure_reference(model: str, threads: int, *, repeats: int = 300) -> float:
    """Median batch-1 latency (ms) of reference ``model`` here with ``threads`` threads."""
    from edgeslim.optimize.measure import ort_session
    from edgeslim.pipeline import onnx_latency_ms

    data, feeds = reference_onnx(model)
    return onnx_latency_ms(ort_session(data, threads), feeds, repeats=repeats)


def this_machine(threads: int, *, reference: str = "digits-cnn", name: str | None = None) \
        -> DeviceProfile:
    """A profile of this machine (what ``edgeslim device-profile`` writes on a device)."""
    import platform

    cores = os.cpu_count() or 1
    try:
        memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)
    except (ValueError, OSError, AttributeError):
        memory = None
    return DeviceProfile(
        name=name or f"{platform.machine()}-{cores}c", cores=cores, memory_mb=memory,
        threads=threads, reference_model=reference,
        reference_latency_ms=round(measure_reference(reference, threads), 5),
        reference_threads=threads,
    )


def dump_profile(profile: DeviceProfile) -> str:
    """The profile as the JSON that ``load_profile`` reads."""
    return json.dumps({
        "name": profile.name, "cores": profile.cores, "memory_mb": profile.memory_mb,
        "threads": profile.threads,
        "reference": {"model": profile.reference_model, "batch": 1,
                      "latency_ms": profile.reference_latency_ms,
                      "threads": profile.reference_threads},
    }, indent=2)


def check_profile_target(path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Refuse a profile path before anything is measured: a folder, a file among its parent
    folders, a folder that is not writable, or an existing file without ``force``."""
    from edgeslim._atomic import output_problem

    p = Path(path)
    problem = output_problem(p)
    if problem:
        raise ConfigError(f"Cannot write the device profile {p}: {problem}.")
    if (p.exists() or p.is_symlink()) and not force:
        raise ConfigError(f"Refusing to overwrite the existing file {p}; pass force=True "
                          "(CLI: --force) to replace it, or choose another -o path.")
    return p


def write_profile(path: str | os.PathLike[str], text: str, *, force: bool = False) -> Path:
    """Write a profile's text to ``path`` atomically (a temporary file beside it, then
    ``os.replace``): ``path`` never shows a half-written profile, and a failure leaves what
    was there. An existing file is replaced only with ``force`` (``ConfigError`` otherwise).
    """
    from edgeslim._atomic import write_atomically, write_error_reason

    p = check_profile_target(path, force=force)
    try:
        write_atomically(p, lambda f: f.write(text.encode("utf-8")))
    except OSError as exc:
        raise ConfigError(f"Cannot write the device profile {p}: "
                          f"{write_error_reason(p, exc)}.") from None
    return p
