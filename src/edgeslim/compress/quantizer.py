"""The seed's min-max affine quantizer, generalised, and fake quantization for QAT.

The seed quantizes a tensor ``x`` to ``bits`` bits with

    Q(x) = round((x - x_min) / (x_max - x_min) * L),    L = 2**bits - 1,

so codes lie in ``[0, L]`` and ``x ≈ x_min + Q(x) * (x_max - x_min) / L``. This module keeps
that formula exactly (``symmetric=False``, the default) and adds:

- ``symmetric=True``: codes in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``, scale
  ``max|x| / (2**(bits-1) - 1)``, zero point 0, so 0.0 is represented exactly (what pruned
  weights need);
- ``integer_zero_point=True``: the hardware form ``x ≈ (q - zp) * scale`` with an integer
  ``zp`` (the range is widened to include 0, as ONNX ``QuantizeLinear`` expects);
- ``per_channel=True``: one range per slice along ``axis`` (output channels of a weight);
- ``level_quantize``: the seed's simpler ``round(w * levels) / levels``.

Every mode rounds to the nearest grid point, so within the range the round-trip error is at
most half a step (``scale / 2``); ``integer_zero_point`` may clip by up to a further half
step at the ends of the range. One implementation serves numpy arrays and torch tensors: codes
and parameters are computed in float64 torch and returned as the caller's kind of array.
Rounding is half-to-even, as ``numpy.round`` and ``torch.round`` both do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edgeslim._validate import check_int_range
from edgeslim.errors import ConfigError

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "QuantizedTensor",
    "code_range",
    "fake_quantize",
    "level_quantize",
    "minmax_qparams",
    "minmax_quantize",
]

MIN_BITS = 2
MAX_BITS = 8

ArrayLike = np.ndarray | torch.Tensor


def _check_bits(bits: Any, func: str) -> int:
    return check_int_range(bits, "bits", func, MIN_BITS, MAX_BITS)


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """``(qmin, qmax)``: ``[0, 2**bits - 1]``, or ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``."""
    if symmetric:
        half = 2 ** (bits - 1) - 1
        return -half, half
    return 0, 2**bits - 1


@dataclass(frozen=True)
class QuantizedTensor:
    """Integer codes and the parameters that map them back: ``x ≈ (q - zero_point) * scale``.

    ``q`` has the input's shape; ``scale`` and ``zero_point`` have the input's number of
    dimensions with size 1 everywhere (per tensor) or everywhere except ``axis`` (per channel),
    so they broadcast against ``q``. ``q`` is uint8 (asymmetric) or int8 (symmetric); the
    arrays are numpy when the input was numpy and torch tensors when it was a tensor.
    ``zero_point`` is real-valued in the seed's asymmetric form (the code of 0.0 need not be
    an integer there) and integral in the symmetric and ``integer_zero_point`` forms.
    """

    q: ArrayLike
    scale: ArrayLike
    zero_point: ArrayLike
    bits: int
    symmetric: bool
    axis: int | None
    dtype: Any  # the input's floating dtype, which dequantize() returns

    @property
    def qmin(self) -> int:
        return code_range(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return code_range(self.bits, self.symmetric)[1]

    def dequantize(self) -> ArrayLike:
        """The grid values ``(q - zero_point) * scale``, in the input's dtype and kind."""
        if isinstance(self.q, torch.Tensor):
            out = (self.q.to(torch.float64) - self.zero_point) * self.scale
            return out.to(self.dtype)
        q = np.asarray(self.q, dtype=np.float64)
        return ((q - self.zero_point) * self.scale).astype(self.dtype)


def _as_float64(x: Any, func: str) -> tuple[torch.Tensor, bool, Any]:
    """``(float64 tensor, was_numpy, output float dtype)``; refuses empty or non-finite input."""
    if isinstance(x, torch.Tensor):
        t = x.detach().to(torch.float64)
        is_numpy = False
        dtype = x.dtype if x.dtype.is_floating_point else torch.float64
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # ragged lists and the like
            raise ConfigError(
                f"{func} needs a numpy array or a torch tensor of numbers. "
                f"Got {type(x).__name__} instead."
            ) from exc
        if arr.dtype.kind not in "biuf":
            raise ConfigError(
                f"{func} needs a numpy array or a torch tensor of numbers. "
                + (f"Got an array of dtype {arr.dtype} instead." if isinstance(x, np.ndarray)
                   else f"Got {type(x).__name__} instead.")
            )
        # np.array, not np.ascontiguousarray: the latter turns a 0-d array into shape (1,)
        t = torch.from_numpy(np.array(arr, dtype=np.float64, order="C"))
        is_numpy = True
        dtype = arr.dtype if arr.dtype.kind == "f" else np.dtype(np.float64)
    if t.numel() == 0:
        raise ConfigError(f"{func} needs a non-empty array. Got shape {tuple(t.shape)} instead.")
    if not bool(torch.isfinite(t).all()):
        raise ConfigError(f"{func} needs finite values. Got an array holding NaN or inf.")
    if not bool(torch.isfinite(t.max() - t.min())):
        raise ConfigError(f"{func} needs values whose range (max - min) is a finite float64; "
                          f"these span from {float(t.min()):g} to {float(t.max()):g}.")
    return t, is_numpy, dtype


def _ranges(t: torch.Tensor, per_channel: bool, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over the whole tensor or over every dimension but ``axis`` (keepdim)."""
    if not per_channel:
        shape = [1] * t.ndim
        return t.min().reshape(shape), t.max().reshape(shape)
    dims = [d for d in range(t.ndim) if d != axis]
    if not dims:  # 1-D: each channel is one element
        return t.clone(), t.clone()
    return t.amin(dim=dims, keepdim=True), t.amax(dim=dims, keepdim=True)


def _check_axis(t: torch.Tensor, per_channel: bool, axis: Any, func: str) -> int:
    if not per_channel:
        return 0
    if t.ndim == 0:
        raise ConfigError(f"{func} with per_channel=True needs an array with at least 1 dimension.")
    if isinstance(axis, bool) or not isinstance(axis, int) or not -t.ndim <= axis < t.ndim:
        raise ConfigError(
            f"The 'axis' parameter of {func} must be an int in the range "
            f"[{-t.ndim}, {t.ndim - 1}] for an array of shape {tuple(t.shape)}. "
            f"Got {axis!r} instead."
        )
    return axis % t.ndim


def minmax_qparams(
    xmin: torch.Tensor,
    xmax: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = False,
    integer_zero_point: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` for observed ranges (tensors of any matching shape).

    A constant range (``xmax == xmin``) gets scale 1, so it still round-trips exactly.
    """
    qmin, qmax = code_range(bits, symmetric)
    if symmetric:
        amax = torch.maximum(xmin.abs(), xmax.abs())
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        return scale, torch.zeros_like(scale)
    if integer_zero_point:
        xmin = torch.clamp(xmin, max=0.0)
        xmax = torch.clamp(xmax, min=0.0)
    span = xmax - xmin
    scale = torch.where(span > 0, span / qmax, torch.ones_like(span))
    if integer_zero_point:
        return scale, torch.clamp(torch.round(-xmin / scale), qmin, qmax)
    return scale, -xmin / scale


def minmax_quantize(
    x: ArrayLike,
    bits: int = 8,
    *,
    symmetric: bool = False,
    per_channel: bool = False,
    axis: int = 0,
    integer_zero_point: bool = False,
) -> QuantizedTensor:
    """Quantize ``x`` (numpy array or torch tensor, any shape) with min-max ranges.

    ``bits`` in 2..8. The default is the seed's formula
    ``q = round((x - x_min) / (x_max - x_min) * (2**bits - 1))``; see the module docstring for
    ``symmetric``, ``per_channel``/``axis`` and ``integer_zero_point``.

    >>> qt = minmax_quantize(np.array([0.0, 0.5, 1.0]), bits=2)
    >>> qt.q.tolist(), qt.dequantize().tolist()
    ([0, 2, 3], [0.0, 0.6666666666666666, 1.0])
    """
    func = "minmax_quantize"
    bits = _check_bits(bits, func)
    t, is_numpy, dtype = _as_float64(x, func)
    axis = _check_axis(t, per_channel, axis, func)
    qmin, qmax = code_range(bits, symmetric)
    xmin, xmax = _ranges(t, per_channel, axis)
    scale, zero_point = minmax_qparams(
        xmin, xmax, bits, symmetric=symmetric, integer_zero_point=integer_zero_point
    )
    if symmetric or integer_zero_point:
        q = torch.clamp(torch.round(t / scale) + zero_point, qmin, qmax)
    else:
        # The seed's formula, written as the seed writes it so the codes match it exactly.
        span = xmax - xmin
        q = torch.round((t - xmin) / torch.where(span > 0, span, torch.ones_like(span)) * qmax)
    q_int = q.to(torch.int8 if symmetric else torch.uint8)
    if is_numpy:
        return QuantizedTensor(
            q_int.numpy(),
            scale.numpy(),
            zero_point.numpy(),
            bits,
            symmetric,
            axis if per_channel else None,
            dtype,
        )
    device = x.device  # type: ignore[union-attr]
    return QuantizedTensor(
        q_int.to(device),
        scale.to(device),
        zero_point.to(device),
        bits,
        symmetric,
        axis if per_channel else None,
        dtype,
    )


def level_quantize(x: ArrayLike, levels: int = 2) -> ArrayLike:
    """The seed's simple quantizer ``round(x * levels) / levels`` (a grid of step 1/levels).

    Works on real numpy arrays (or lists of numbers) and torch tensors; returns the same kind,
    with the same dtype for floats (integers come back as float64 or torch's default float,
    since the grid has fractions). NaN and infinities are refused, as by ``minmax_quantize``.

    >>> level_quantize(np.array([0.2, 0.3, -0.8]), levels=2).tolist()
    [0.0, 0.5, -1.0]
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ConfigError(
            f"The 'levels' parameter of level_quantize must be an int >= 1. Got {levels!r} instead."
        )
    if isinstance(x, torch.Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            raise ConfigError(f"level_quantize takes a real tensor. Got dtype {x.dtype}.")
        if not bool(torch.isfinite(x).all()):
            raise ConfigError("level_quantize got NaN or infinite values; quantize finite "
                              "values only.")
        return torch.round(x * levels) / levels
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError):
        arr = np.asarray(None)
    if arr.dtype.kind not in "iuf":
        raise ConfigError(f"level_quantize takes a real array, list of numbers or tensor. Got "
                          f"{type(x).__name__}" + (f" of dtype {arr.dtype}" if isinstance(
                              x, (np.ndarray, list, tuple)) else "") + ".")
    if not np.isfinite(arr).all():
        raise ConfigError("level_quantize got NaN or infinite values; quantize finite values "
                          "only.")
    return np.round(arr * levels) / levels


class _FakeQuantSTE(torch.autograd.Function):
    """Quantize-dequantize forward; straight-through backward (gradient 1 inside the range)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):  # type: ignore[override]
        v = torch.round(x / scale) + zero_point
        ctx.save_for_backward((v >= qmin) & (v <= qmax))
        return (torch.clamp(v, qmin, qmax) - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``.

    ``scale``/``zero_point`` broadcast against ``x``. When gradients are needed, the backward
    pass is the straight-through estimator: the incoming gradient passes unchanged where
    ``x`` falls inside the representable range and is zero where it was clipped. Otherwise
    the function is plain torch ops (``div``, ``round``, ``add``, ``clip``, ``sub``, ``mul``),
    which ``torch.onnx.export`` traces into standard ONNX nodes.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _FakeQuantSTE.apply(x, scale, zero_point, qmin, qmax)
    v = torch.round(x / scale) + zero_point
    return (torch.clamp(v, qmin, qmax) - zero_point) * scale
