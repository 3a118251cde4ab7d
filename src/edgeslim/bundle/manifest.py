"""The manifest of a ``.eslim`` bundle: its fields, their validation, its exact bytes.

The contract is ``notes/MANIFEST.md`` (format ``edgeslim.bundle/1``). One validator serves both
sides: the writer calls it on what the caller gives (bad values raise ``ConfigError``), the
reader on what it finds in a bundle (bad values raise ``BundleError``). Messages name the field
by its JSON path, e.g. ``inputs[0].dtype``.

Unknown top-level fields are kept and not checked, so a newer writer within format 1 can add
information that older nodes ignore.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim.errors import BundleError, ConfigError, EdgeslimError

__all__ = [
    "DTYPES",
    "FORMAT",
    "MANIFEST_ENTRY",
    "MODEL_ENTRY",
    "RESERVED_ENTRIES",
    "SIGNATURE_ENTRY",
    "TensorSpec",
    "check_against_model",
    "check_entry_name",
    "dump_manifest",
    "to_json_data",
    "utc_now",
    "validate_manifest",
]

FORMAT = "edgeslim.bundle/1"
MANIFEST_ENTRY = "manifest.json"
MODEL_ENTRY = "model.onnx"
SIGNATURE_ENTRY = "signature"
RESERVED_ENTRIES = frozenset({MANIFEST_ENTRY, MODEL_ENTRY, SIGNATURE_ENTRY})

#: Tensor element types a manifest may declare (numpy names; all run in onnxruntime).
DTYPES = (
    "bool",
    "float16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
)

#: The most values the fixed dims of one tensor may hold (symbolic dims count as 1): what a node
#: allocates for its warm-up run, so a hostile manifest cannot make it allocate without bound.
MAX_FIXED_ELEMENTS = 1 << 26
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
VERSION_RE = re.compile(r"[A-Za-z0-9_.+-]{1,64}")
#: NAME_RE in words, for messages
NAME_RULE = "1-64 of A-Z a-z 0-9 _ . - (a V2 model name)"
_TASK_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


def safe_model_name(raw: str, limit: int = 64) -> str:
    """``raw`` made a model name that NAME_RE accepts: characters outside A-Z a-z 0-9 _ . -
    become '-', at most ``limit`` of them, no leading or trailing dots."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", raw)[:limit].strip(".") or "model"


def model_name_for(model: Any, limit: int = 64) -> str:
    """The default model name of ``model`` as the user gave it: the callable of
    ``package.module:callable``, the stem of a file, the class of an object ("model" for None),
    made valid with ``safe_model_name``."""
    if model is None:
        raw = "model"
    elif isinstance(model, (str, os.PathLike)):
        text = str(model)
        is_file = text.endswith(".onnx") or Path(text).exists()
        raw = text.rsplit(":", 1)[-1] if ":" in text and not is_file else Path(text).stem
    else:
        raw = type(model).__name__
    return safe_model_name(raw, limit)
_CREATED_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")
_PART_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")


@dataclass(frozen=True)
class TensorSpec:
    """One declared input or output: ``shape`` holds ints (fixed) and strings (symbolic)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), str(d["dtype"]), tuple(d["shape"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @property
    def rank(self) -> int:
        return len(self.shape)


def utc_now() -> str:
    """The current UTC time as the manifest writes it: ``2026-11-29T13:00:00Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def dump_manifest(manifest: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a manifest: UTF-8 JSON, sorted keys, 2-space indent, final newline.

    The same manifest always gives the same bytes, so signatures are reproducible. NaN and
    infinities are refused (JSON has no spelling for them) with ``ConfigError``.
    """
    try:
        text = json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise ConfigError(
            f"The manifest holds a value JSON cannot represent ({exc}); metrics and probe "
            "values must be finite numbers."
        ) from exc
    except TypeError as exc:
        raise ConfigError(f"The manifest holds a value that is not JSON data: {exc}") from exc
    return (text + "\n").encode("utf-8")


def check_entry_name(name: Any, where: str, err: type[EdgeslimError] = ConfigError) -> str:
    """A relative POSIX path of safe parts (``tokenizer.json``, ``vocab/merges.txt``).

    Refuses absolute paths, ``..``, backslashes, empty parts and the reserved entry names, so
    an extra file can never land outside the directory a bundle is unpacked into.
    """
    if not isinstance(name, str) or not name or len(name) > 255:
        raise err(f"{where} must be a relative file name of 1-255 characters. Got {name!r}.")
    parts = name.split("/")
    bad = (
        name.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or not all(_PART_RE.fullmatch(p) for p in parts)
    )
    if bad:
        raise err(
            f"{where} must be a relative path of parts made of letters, digits, '_', '.', '-' "
            f"(no '..', no leading '/', no backslash). Got {name!r}."
        )
    if name in RESERVED_ENTRIES:
        raise err(f"{where} must not be one of the reserved entries {sorted(RESERVED_ENTRIES)}.")
    return name


class _Checker:
    """Validates one manifest, raising ``err`` with the field's JSON path in the message."""

    def __init__(self, err: type[EdgeslimError], stage: str) -> None:
        self.err = err
        self.stage = stage  # "write" (caller's input) or "read" (a bundle's manifest)

    def fail(self, path: str, what: str, value: Any) -> EdgeslimError:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return self.err(f"manifest field '{path}' must be {what}. Got {shown} instead.")

    def need(self, m: Mapping[str, Any], key: str) -> Any:
        if key not in m:
            origin = "the manifest given" if self.stage == "write" else "the bundle's manifest"
            raise self.err(f"{origin} lacks the required field '{key}'.")
        return m[key]

    def string(self, value: Any, path: str, pattern: re.Pattern[str], what: str) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise self.fail(path, what, value)
        return value

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise self.fail(path, "an object with string keys", value)
        return value

    def seq(self, value: Any, path: str) -> list[Any]:
        if not isinstance(value, (list, tuple)):
            raise self.fail(path, "a list", value)
        return list(value)

    def count(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(path, "an int >= 0", value)
        return value

    def tensors(self, value: Any, path: str) -> list[TensorSpec]:
        items = self.seq(value, path)
        if not items:
            raise self.fail(path, "a non-empty list of {name, dtype, shape}", value)
        specs: list[TensorSpec] = []
        for i, item in enumerate(items):
            p = f"{path}[{i}]"
            item = self.mapping(item, p)
            name = self.need(item, "name")
            if not isinstance(name, str) or not 0 < len(name) <= 256:
                raise self.fail(f"{p}.name", "a non-empty string", name)
            dtype = self.need(item, "dtype")
            if dtype not in DTYPES:
                raise self.fail(f"{p}.dtype", "one of " + ", ".join(DTYPES), dtype)
            shape = self.seq(self.need(item, "shape"), f"{p}.shape")
            for j, dim in enumerate(shape):
                fixed = isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0
                symbolic = isinstance(dim, str) and 0 < len(dim) <= 64 and dim.isprintable()
                if not (fixed or symbolic):
                    raise self.fail(
                        f"{p}.shape[{j}]",
                        "an int >= 0 or a symbolic dimension name such as 'batch'",
                        dim,
                    )
            fixed_values = math.prod(d for d in shape if isinstance(d, int))
            if fixed_values > MAX_FIXED_ELEMENTS:
                raise self.fail(
                    f"{p}.shape",
                    f"fixed dims holding at most {MAX_FIXED_ELEMENTS:,} values (a symbolic "
                    f"dim such as 'batch' for a free one)", shape)
            specs.append(TensorSpec(name, dtype, tuple(shape)))
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise self.fail(path, "a list of tensors with distinct names", names)
        return specs

    def steps(self, value: Any, path: str, key: str) -> None:
        for i, step in enumerate(self.seq(value, path)):
            step = self.mapping(step, f"{path}[{i}]")
            op = step.get(key)
            if not isinstance(op, str) or not op:
                raise self.fail(f"{path}[{i}].{key}", "a non-empty string", op)


def validate_manifest(manifest: Any, *, stage: str = "read") -> dict[str, Any]:
    """Check a manifest; return it as a plain dict.

    ``stage="write"``: the caller's manifest before ``write_bundle`` fills ``model`` and
    ``files``; problems raise ``ConfigError``. ``stage="read"``: a complete manifest found in a
    bundle; problems raise ``BundleError``. Preprocessing steps are checked for shape here
    (a list of ``{"op": ...}``); the step registry's own check runs in the writer.
    """
    err: type[EdgeslimError] = ConfigError if stage == "write" else BundleError
    c = _Checker(err, stage)
    if not isinstance(manifest, Mapping) or not all(isinstance(k, str) for k in manifest):
        raise err(f"The manifest must be a JSON object. Got {type(manifest).__name__}.")
    m = dict(manifest)

    c.string(c.need(m, "name"), "name", NAME_RE, "1-64 characters from A-Z a-z 0-9 _ . -")
    if set(m["name"]) == {"."}:
        raise c.fail("name", "a name that is not only dots", m["name"])
    inputs = c.tensors(c.need(m, "inputs"), "inputs")
    outputs = c.tensors(c.need(m, "outputs"), "outputs")

    required_on_read = ("format", "version", "created", "task", "model")
    for key in required_on_read if stage == "read" else ():
        c.need(m, key)
    if "format" in m and m["format"] != FORMAT:
        raise err(
            f"manifest field 'format' is {m['format']!r}; this edgeslim reads and writes "
            f"{FORMAT!r} only."
        )
    if "version" in m:
        c.string(m["version"], "version", VERSION_RE, "a string of 1-64 of A-Z a-z 0-9 _ . + -")
    if "created" in m:
        c.string(m["created"], "created", _CREATED_RE, "a UTC time like '2026-11-29T13:00:00Z'")
    if "task" in m:
        c.string(m["task"], "task", _TASK_RE, "a lowercase task name like 'image-classification'")
    for key in ("preprocessing", "postprocessing"):
        if key in m:
            c.steps(m[key], key, "op")
    if "compression" in m:
        c.steps(m["compression"], "compression", "step")
    if "labels" in m:
        labels = c.seq(m["labels"], "labels")
        if not all(isinstance(s, str) for s in labels):
            raise c.fail("labels", "a list of strings", labels)
    for key in ("metrics", "provenance"):
        if key in m:
            c.mapping(m[key], key)
    if "probe" in m:
        _check_probe(c, m["probe"], inputs, outputs)

    if stage == "write":
        for key in ("model", "files"):
            if key in m:
                raise ConfigError(
                    f"Do not pass the manifest field '{key}' to write_bundle: it holds the "
                    "sha256 and size of the bundled files, which write_bundle computes."
                )
        return m

    model = c.mapping(m["model"], "model")
    if c.need(model, "path") != MODEL_ENTRY:
        raise c.fail("model.path", f"'{MODEL_ENTRY}'", model["path"])
    c.string(c.need(model, "sha256"), "model.sha256", _SHA_RE, "64 lowercase hex digits")
    c.count(c.need(model, "size"), "model.size")
    if model.get("opset") is not None:
        c.count(model["opset"], "model.opset")
    for name, entry in c.mapping(m.get("files", {}), "files").items():
        check_entry_name(name, f"manifest field 'files' key {name!r}", BundleError)
        entry = c.mapping(entry, f"files.{name}")
        c.string(c.need(entry, "sha256"), f"files.{name}.sha256", _SHA_RE, "64 lowercase hex")
        c.count(c.need(entry, "size"), f"files.{name}.size")
    return m


def _check_probe(
    c: _Checker, probe: Any, inputs: list[TensorSpec], outputs: list[TensorSpec]
) -> None:
    probe = c.mapping(probe, "probe")
    ins = c.mapping(c.need(probe, "inputs"), "probe.inputs")
    outs = c.mapping(c.need(probe, "outputs"), "probe.outputs")
    if set(ins) != {s.name for s in inputs}:
        raise c.fail("probe.inputs", f"values for exactly {[s.name for s in inputs]}", list(ins))
    if not outs or not set(outs) <= {s.name for s in outputs}:
        raise c.fail(
            "probe.outputs", f"values for some of {[s.name for s in outputs]}", list(outs)
        )
    specs = {s.name: s for s in [*inputs, *outputs]}
    for kind, values in (("inputs", ins), ("outputs", outs)):
        for name, value in values.items():
            spec = specs[name]
            try:
                arr = np.asarray(value, dtype=spec.dtype)
            except (TypeError, ValueError, OverflowError):
                raise c.fail(
                    f"probe.{kind}.{name}", f"a nested list of {spec.dtype} values", value
                ) from None
            pairs = zip(spec.shape, arr.shape, strict=False)
            fixed_ok = all(isinstance(d, str) or d == n for d, n in pairs)
            if arr.ndim != spec.rank or not fixed_ok:
                raise c.fail(
                    f"probe.{kind}.{name}",
                    f"an array of shape {list(spec.shape)}",
                    f"an array of shape {list(arr.shape)}",
                )
    atol = probe.get("atol", 1e-3)
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not math.isfinite(atol):
        raise c.fail("probe.atol", "a finite number >= 0", atol)
    if atol < 0:
        raise c.fail("probe.atol", "a finite number >= 0", atol)


def to_json_data(value: Any) -> Any:
    """Turn numpy arrays and scalars (anything with ``tolist``) and tuples into JSON data."""
    if isinstance(value, Mapping):
        return {k: to_json_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_data(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return value


def check_against_model(
    declared: list[TensorSpec],
    actual: list[tuple[str, str | None, tuple[int | str | None, ...] | None]],
    kind: str,
    err: type[EdgeslimError],
) -> None:
    """Refuse a manifest whose ``inputs``/``outputs`` (``kind``) disagree with the model's.

    ``actual`` holds the model's ``(name, dtype, shape)``; dtype None and shape None mean
    "not recorded", a dim None or str means "free". Names must match as sets, dtypes and ranks
    exactly; a dim the manifest fixes must not contradict the model, and a dim the model fixes
    must be fixed to the same size in the manifest (else inputs the manifest allows would fail).
    """
    by_name = {name: (dtype, shape) for name, dtype, shape in actual}
    names = [s.name for s in declared]
    if set(names) != set(by_name):
        raise err(
            f"The manifest declares {kind} {names} but the model has {kind} {list(by_name)}."
        )
    for spec in declared:
        dtype, shape = by_name[spec.name]
        if dtype is not None and dtype != spec.dtype:
            raise err(
                f"The manifest declares {kind[:-1]} '{spec.name}' as {spec.dtype} but the model "
                f"has {dtype}."
            )
        if shape is None:
            continue
        if len(shape) != spec.rank:
            raise err(
                f"The manifest declares {kind[:-1]} '{spec.name}' with shape {list(spec.shape)} "
                f"(rank {spec.rank}) but the model has rank {len(shape)} {list(shape)}."
            )
        for i, (want, have) in enumerate(zip(spec.shape, shape, strict=True)):
            if isinstance(have, int) and want != have:
                raise err(
                    f"The manifest declares dim {i} of {kind[:-1]} '{spec.name}' as {want!r} "
                    f"but the model fixes it to {have}."
                )
