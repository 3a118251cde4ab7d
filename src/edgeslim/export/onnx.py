"""torch -> ONNX export, checked against onnxruntime before it is handed on.

``export_onnx`` wraps PyTorch's TorchScript-based exporter (``torch.onnx.export(...,
dynamo=False)``; the dynamo exporter needs onnxscript, which is not a dependency) and adds what
the project relies on downstream:

- dynamic axes (batch, and sequence for text models) declared with symbolic names;
- BatchNorm folded into the preceding convolution (the exporter's eval-mode peephole with
  constant folding does it; the result counts any BatchNormalization node left over);
- constant subgraphs folded into initializers, and a zero ``Pad`` before a ``Conv`` merged
  into the convolution's own (possibly asymmetric) pads (``edgeslim.export.fold``);
- ``onnx.checker`` and strict shape inference on the written file;
- a numerical check: torch and onnxruntime run the example inputs and the same inputs with one
  more row in the batch, and the outputs must agree within a tolerance, else ``ModelError``
  naming the output and the max absolute difference.

Pruned zeros stay exact zeros: folding BatchNorm multiplies each output channel by a scale,
which keeps a zero weight zero.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim._atomic import staged
from edgeslim._validate import check_int_range, check_positive
from edgeslim.errors import ConfigError, ModelError
from edgeslim.export.fold import fold_constants, fold_pads

__all__ = [
    "MAX_OPSET",
    "MIN_OPSET",
    "ExportResult",
    "compare_with_onnxruntime",
    "export_onnx",
    "onnx_param_bytes",
]

MIN_OPSET = 17
MAX_OPSET = 20  # the TorchScript-based exporter's ceiling in torch 2.13


@dataclass(frozen=True)
class ExportResult:
    """What ``export_onnx`` wrote and measured.

    ``max_abs_diff`` is the largest |torch - onnxruntime| over every checked output element
    (None when ``check=False``); ``checked_batches`` the batch sizes compared;
    ``param_bytes`` the bytes of float initializers; ``size_bytes`` the file size;
    ``seconds`` the wall time of export plus checks.
    """

    path: Path
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    max_abs_diff: float | None
    checked_batches: tuple[int, ...]
    batchnorm_nodes: int
    param_bytes: int
    size_bytes: int
    seconds: float


def _as_input_tuple(example_inputs: Any) -> tuple[Any, ...]:
    import torch

    items = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(items, (tuple, list)) or not items:
        raise ModelError(
            "example_inputs must be a torch.Tensor or a non-empty tuple of tensors. "
            f"Got {type(example_inputs).__name__} instead."
        )
    for i, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            raise ModelError(
                f"example_inputs[{i}] must be a torch.Tensor. Got {type(item).__name__} instead."
            )
        if item.dim() == 0:
            raise ModelError(f"example_inputs[{i}] must have a batch axis. Got a 0-d tensor.")
    return tuple(items)


def _check_names(names: Sequence[str], what: str, expected: int | None) -> tuple[str, ...]:
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(
            f"The '{what}' parameter of export_onnx must be a list of non-empty "
            f"strings. Got {names!r} instead."
        )
    names = tuple(names)
    if len(set(names)) != len(names) or not names:
        raise ConfigError(
            f"The '{what}' parameter of export_onnx must hold distinct names. "
            f"Got {list(names)!r} instead."
        )
    if expected is not None and len(names) != expected:
        raise ConfigError(
            f"The '{what}' parameter of export_onnx must name each of the {expected} example "
            f"inputs. Got {len(names)} names ({list(names)!r}) instead."
        )
    return names


def _normalise_axes(
    dynamic_axes: Mapping[str, Any] | None, names: tuple[str, ...]
) -> dict[str, dict[int, str]]:
    if dynamic_axes is None:
        return {name: {0: "batch"} for name in names}
    out: dict[str, dict[int, str]] = {}
    for key, axes in dynamic_axes.items():
        if key not in names:
            raise ConfigError(
                f"dynamic_axes names {key!r}, which is not an input or output. "
                f"Expected one of {list(names)!r}."
            )
        if isinstance(axes, Mapping):
            out[key] = {int(a): str(n) for a, n in axes.items()}
        else:
            out[key] = {int(a): f"{key}_dim{int(a)}" for a in axes}
    return out


def _flatten(value: Any) -> list[Any]:
    """Torch outputs in the order the exporter flattens them (tensor, sequence or mapping)."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _flatten(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    if value is None:
        return []
    raise ModelError(f"The model returned {type(value).__name__}; expected tensors.")


def _grow_batch(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """The same inputs with the first row appended: batch size + 1."""
    import torch

    return tuple(torch.cat([x, x[:1]], dim=0) for x in inputs)


def compare_with_onnxruntime(
    model: Any,
    onnx_path: str | Path,
    inputs: Sequence[Any],
    input_names: Sequence[str],
    *,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    session: Any = None,
) -> float:
    """Run ``model`` (torch, eval mode) and the ONNX file on ``inputs``; return max |diff|.

    Raises ``ModelError`` naming the output, the max absolute difference and the tolerance
    when any element differs by more than ``atol + rtol * |torch value|``.
    """
    import torch

    if session is None:
        session = _session(onnx_path)
    with torch.no_grad():
        expected = [t.detach().cpu().numpy() for t in _flatten(model(*inputs))]
    feeds = {name: x.detach().cpu().numpy() for name, x in zip(input_names, inputs, strict=True)}
    got = session.run(None, feeds)
    out_names = [o.name for o in session.get_outputs()]
    if len(got) != len(expected):
        raise ModelError(
            f"The ONNX model has {len(got)} outputs but the torch model returned "
            f"{len(expected)} tensors."
        )
    worst = 0.0
    for name, ref, val in zip(out_names, expected, got, strict=True):
        if ref.shape != val.shape:
            raise ModelError(
                f"ONNX output {name!r} has shape {val.shape}, torch gives {ref.shape} "
                f"(batch {inputs[0].shape[0]})."
            )
        diff = np.abs(ref.astype(np.float64) - val.astype(np.float64))
        max_diff = float(diff.max()) if diff.size else 0.0
        worst = max(worst, max_diff)
        if np.any(diff > atol + rtol * np.abs(ref)) or not np.isfinite(val).all():
            raise ModelError(
                f"The exported ONNX model diverges from the torch model: output {name!r} "
                f"differs by up to {max_diff:.3g} (tolerance atol={atol:g} + rtol={rtol:g} * "
                f"|value|) on a batch of {inputs[0].shape[0]}."
            )
    return worst


def _session(path: str | Path) -> Any:
    import torch

    from edgeslim._ort import ort_session

    return ort_session(path, threads=torch.get_num_threads())


def export_onnx(
    model: Any,
    example_inputs: Any,
    path: str | Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Any] | None = None,
    opset: int = 17,
    fold_batchnorm: bool = True,
    fold_constant_nodes: bool = True,
    check: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    check_inputs: Sequence[Any] | None = None,
) -> ExportResult:
    """Export ``model`` (an ``nn.Module``) to ``path`` as ONNX and verify it.

    ``example_inputs``: a tensor or tuple of tensors, batch first, one per ``input_names``.
    ``dynamic_axes``: ``{name: {axis: "symbol"}}`` as in ``torch.onnx.export``; None makes
    axis 0 of every input and output dynamic as ``"batch"``. ``fold_batchnorm=False`` keeps
    BatchNormalization nodes; ``fold_constant_nodes`` turns small constant subgraphs and
    ``Constant`` nodes into initializers and merges a zero ``Pad`` into the ``Conv`` after it
    (``edgeslim.export.fold``). With ``check`` the model
    and the file are compared on the example inputs, on the example inputs with one more
    batch row, and on each extra input tuple in ``check_inputs``.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 2))
    >>> res = export_onnx(net, torch.randn(1, 4), "/tmp/net.onnx",
    ...                   input_names=["input"], output_names=["logits"])
    >>> res.max_abs_diff < 1e-5
    True
    """
    import onnx
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"export_onnx needs a torch.nn.Module. Got {type(model).__name__}.")
    inputs = _as_input_tuple(example_inputs)
    in_names = _check_names(input_names, "input_names", len(inputs))
    out_names = _check_names(output_names, "output_names", None)
    if set(in_names) & set(out_names):
        both = sorted(set(in_names) & set(out_names))
        raise ConfigError(f"Input and output names must differ. Got {both!r} on both sides.")
    axes = _normalise_axes(dynamic_axes, in_names + out_names)
    opset = check_int_range(opset, "opset", "export_onnx", MIN_OPSET, MAX_OPSET)
    atol = check_positive(atol, "atol", "export_onnx", allow_zero=True)
    rtol = check_positive(rtol, "rtol", "export_onnx", allow_zero=True)
    extra_checks = [_as_input_tuple(c) for c in (check_inputs or [])]
    path = Path(path)

    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        # exported and checked beside ``path``, which only a model that passed replaces
        with staged(path) as work:
            modes = torch.onnx.TrainingMode
            training = modes.EVAL if fold_batchnorm else modes.PRESERVE
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                # The model is in eval mode; PRESERVE only keeps BatchNorm nodes unfolded.
                warnings.filterwarnings("ignore", message=".*constant folding be turned off.*")
                # Left-over constant subgraphs are folded below, and every export is checked
                # numerically, so the exporter's own caveats need not reach the user.
                warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
                warnings.filterwarnings("ignore", message="Exporting aten::index operator")
                # Under no_grad nn.MultiheadAttention and nn.TransformerEncoder(Layer) take
                # torch's fused fast path, whose ops have no ONNX mapping: trace the plain ops
                fastpath = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)
                try:
                    torch.onnx.export(
                        model,
                        inputs,
                        str(work),
                        dynamo=False,
                        opset_version=opset,
                        input_names=list(in_names),
                        output_names=list(out_names),
                        dynamic_axes=axes,
                        do_constant_folding=True,
                        training=training,
                    )
                except Exception as exc:  # the exporter raises many types; name the model
                    raise ModelError(
                        f"torch.onnx.export failed for {type(model).__name__}: {exc}"
                    ) from exc
                finally:
                    torch.backends.mha.set_fastpath_enabled(fastpath)

            proto = onnx.load(str(work))
            with torch.no_grad():
                out_shapes = [tuple(t.shape) for t in _flatten(model(*inputs))]
            changed = _declare_shapes(proto, out_names, out_shapes, axes)
            if fold_constant_nodes:
                changed = fold_constants(proto) > 0 or changed
                changed = fold_pads(proto) > 0 or changed
            if changed:
                onnx.save(proto, str(work))
            try:
                onnx.checker.check_model(str(work))
                onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
            except Exception as exc:
                raise ModelError(f"The exported ONNX model at {path} is invalid: {exc}") from exc
            batchnorm = sum(node.op_type == "BatchNormalization" for node in proto.graph.node)

            max_diff: float | None = None
            batches: list[int] = []
            if check:
                session = _session(work)
                max_diff = 0.0
                for case in [inputs, _grow_batch(inputs), *extra_checks]:
                    diff = compare_with_onnxruntime(
                        model, work, case, in_names, atol=atol, rtol=rtol, session=session
                    )
                    max_diff = max(max_diff, diff)
                    batches.append(int(case[0].shape[0]))
    finally:
        model.train(was_training)
    return ExportResult(
        path=path,
        opset=opset,
        input_names=in_names,
        output_names=out_names,
        dynamic_axes=axes,
        max_abs_diff=max_diff,
        checked_batches=tuple(batches),
        batchnorm_nodes=batchnorm,
        param_bytes=onnx_param_bytes(proto),
        size_bytes=path.stat().st_size,
        seconds=time.perf_counter() - start,
    )


def _declare_shapes(
    proto: Any,
    names: tuple[str, ...],
    shapes: list[tuple[int, ...]],
    axes: dict[str, dict[int, str]],
) -> bool:
    """Write each output's shape into the graph: the symbol on dynamic axes, the size seen on
    the example run on every other axis (the exporter leaves some as generated symbols),
    except where the exporter itself carried a declared symbol through (an output's batch
    axis follows the input's ``batch`` even when ``dynamic_axes`` names only the inputs)."""
    if len(shapes) != len(proto.graph.output):
        raise ModelError(
            f"The model returned {len(shapes)} tensors but the ONNX graph has "
            f"{len(proto.graph.output)} outputs ({list(names)!r} were named)."
        )
    declared = {sym for dims in axes.values() for sym in dims.values()}
    changed = False
    for out, shape in zip(proto.graph.output, shapes, strict=True):
        dims = out.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            continue  # leave a rank the exporter disagrees on to the numerical check
        dynamic = axes.get(out.name, {})
        for axis, (dim, size) in enumerate(zip(dims, shape, strict=True)):
            if axis in dynamic and dim.dim_param != dynamic[axis]:
                dim.dim_param = dynamic[axis]
                changed = True
            elif axis not in dynamic and dim.dim_param not in declared and (
                    dim.dim_param or dim.dim_value != size):
                dim.dim_value = size
                changed = True
    return changed


def onnx_param_bytes(model: Any, *, float_only: bool = True) -> int:
    """Bytes held by the initializers (and Constant nodes) of an ONNX model.

    ``model`` is an ``onnx.ModelProto`` or a path. With ``float_only`` only floating-point
    tensors count (float32/16, bfloat16, double): the weights, not int8 quantized tensors or
    shape constants.
    """
    import onnx
    from onnx import numpy_helper

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model))
    if not isinstance(model, onnx.ModelProto):
        raise ModelError(f"Expected an onnx.ModelProto or a path. Got {type(model).__name__}.")
    floats = {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
    }
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors += [a.t for a in node.attribute if a.name == "value"]
    total = 0
    for tensor in tensors:
        if float_only and tensor.data_type not in floats:
            continue
        total += numpy_helper.to_array(tensor).nbytes
    return total
