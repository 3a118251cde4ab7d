"""Quantization-aware training: fake-quantized weights and activations, trained with the STE.

``quantize_qat`` wraps every Linear/conv layer in a ``QATLayer`` that, on each forward,

- fake-quantizes its input activations per tensor with the min-max quantizer (integer zero
  point, range widened to include 0), the range coming from an observer: the average of the
  per-batch min/max over ``calib_batches`` calibration batches, then an exponential moving
  average during training (``observer="ema"``) or kept fixed (``observer="frozen"``);
- fake-quantizes its weight per output channel, symmetric (``q in [-(2^(b-1)-1),
  2^(b-1)-1]``, zero exactly representable, so pruned zeros stay zero), the scale taken from
  the weight itself on every step;

and trains with the straight-through estimator (``edgeslim.compress.quantizer.fake_quantize``).
In eval mode the fake quantization is plain torch ops (div, round, clip, mul), so
``torch.onnx.export`` traces the QAT model as is (``quantize_qat`` returns it with the weights
frozen on their grids, so the graph holds only the activation fake quantization).
``strip_qat`` returns a plain model with the weights snapped to their grid and no fake-quant
modules; ``qat_weights`` gives the integer weights with their scales. BatchNorm layers are
left in float: fold them into the preceding convolution before QAT when the integer weights
must be final.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from edgeslim._validate import check_choice, check_int_range, check_positive
from edgeslim.compress._batch import call_model, describe, split_batch
from edgeslim.compress.prune import _check_model, prunable_layers
from edgeslim.compress.quantizer import (
    MAX_BITS,
    MIN_BITS,
    QuantizedTensor,
    code_range,
    fake_quantize,
    minmax_qparams,
    minmax_quantize,
)
from edgeslim.compress.train import LossFn, fit, held_zeros, zero_keeper
from edgeslim.errors import ConfigError, ModelError

__all__ = [
    "ActivationFakeQuant",
    "QATLayer",
    "activation_ranges",
    "qat_weights",
    "quantize_qat",
    "strip_qat",
]


class ActivationFakeQuant(nn.Module):
    """Per-tensor asymmetric fake quantization of activations with a min/max observer.

    ``mode`` is ``"calibrate"`` (observe, pass through), ``"ema"`` (observe with moving
    average ``momentum`` and quantize, while training) or ``"frozen"`` (quantize only). In
    eval mode the range never moves. Calibrate on at least one batch before leaving
    ``"calibrate"`` mode.
    """

    def __init__(self, bits: int, momentum: float = 0.01):
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.mode = "calibrate"
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("batches", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}"

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().float(), x.detach().max().float()
        n = int(self.batches)
        if n == 0:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        else:
            w = 1.0 / (n + 1) if self.mode == "calibrate" else self.momentum
            self.min_val.lerp_(lo, w)
            self.max_val.lerp_(hi, w)
        self.batches += 1

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` from the observed range (scalars)."""
        return minmax_qparams(self.min_val, self.max_val, self.bits, integer_zero_point=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "calibrate":
            self._observe(x)
            return x
        if self.training and self.mode == "ema":
            self._observe(x)
        scale, zero_point = self.qparams()
        qmin, qmax = code_range(self.bits, symmetric=False)
        return fake_quantize(x, scale.to(x.dtype), zero_point.to(x.dtype), qmin, qmax)


class QATLayer(nn.Module):
    """A Linear/conv ``layer`` run with fake-quantized input and per-channel weight.

    ``keep_zeros`` records which weights are exactly zero (pruned) so training can hold them
    there (``hold_zeros()``, called after every optimiser step); ``quantize_qat`` passes it
    for the layers ``train.held_zeros`` names (a zero-initialised layer of an unpruned
    model is left free to train).
    """

    def __init__(
        self, layer: nn.Module, bits: int, act_bits: int | None, keep_zeros: bool = True
    ):
        super().__init__()
        if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise ModelError(f"QATLayer wraps Linear/Conv1d/2d/3d layers, not {type(layer)}.")
        self.layer = layer
        self.bits = bits
        self.input_quant = ActivationFakeQuant(act_bits) if act_bits else None
        self.frozen = False
        zero = layer.weight.detach() == 0
        if keep_zeros and bool(zero.any()):
            self.register_buffer("zero_mask", zero, persistent=False)
        else:
            self.zero_mask = None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, frozen={self.frozen}"

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's float weight (code that reads ``layer.weight`` keeps working)."""
        return self.layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-output-channel symmetric ``(scale, zero_point)``, shaped to broadcast."""
        w = self.layer.weight.detach()
        dims = list(range(1, w.ndim))
        amax = w.abs().amax(dim=dims, keepdim=True) if dims else w.abs()
        return minmax_qparams(-amax, amax, self.bits, symmetric=True)

    def quantized_weight(self) -> torch.Tensor:
        """The weight on its grid (differentiable through the STE while training)."""
        if self.frozen:
            return self.layer.weight
        scale, zero_point = self.weight_qparams()
        qmin, qmax = code_range(self.bits, symmetric=True)
        return fake_quantize(self.layer.weight, scale, zero_point, qmin, qmax)

    @torch.no_grad()
    def freeze(self) -> None:
        """Snap the weight onto its grid and stop re-quantizing it (for export and inference)."""
        self.layer.weight.copy_(self.quantized_weight())
        self.frozen = True

    @torch.no_grad()
    def hold_zeros(self) -> None:
        if self.zero_mask is not None:
            self.layer.weight.masked_fill_(self.zero_mask, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        if self.frozen:
            return self.layer(x)
        # the layer's own forward with the quantized weight swapped in: a subclass may do more
        # than the convolution (the zoo's Conv2dSame pads first)
        return functional_call(self.layer, {"weight": self.quantized_weight()}, (x,))


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _qat_layers(model: nn.Module) -> dict[str, QATLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QATLayer)}


def quantize_qat(
    model: nn.Module,
    train_data: Iterable[Any],
    *,
    bits: int = 8,
    act_bits: int | None = None,
    quantize_activations: bool = True,
    epochs: int = 3,
    lr: float = 1e-4,
    calib_batches: int = 8,
    calib_data: Iterable[Any] | None = None,
    observer: str = "ema",
    loss_fn: LossFn | None = None,
    ignored_layers: Iterable[str | nn.Module] | None = None,
    keep_zeros: bool = True,
    inplace: bool = False,
    progress: bool = True,
) -> nn.Module:
    """Quantization-aware training; returns the model with its layers wrapped in ``QATLayer``.

    ``bits`` (2..8) is the weight width, ``act_bits`` (2..8, default ``bits``) the activation
    width (``quantize_activations=False`` keeps activations in float). Activation ranges are
    calibrated on the first ``calib_batches`` batches of ``calib_data`` (default
    ``train_data``), then the model trains ``epochs`` epochs on ``(x, y)`` batches of
    ``train_data`` with Adam at ``lr`` and ``loss_fn`` (cross-entropy by default). Weights that
    are exactly zero stay zero when ``keep_zeros``. The model is copied unless ``inplace``.
    The result is in eval mode with its weights frozen on their grids; its activation fake
    quantization exports to ONNX as plain ops. Pass it to ``strip_qat`` for a plain model.
    """
    func = "quantize_qat"
    _check_model(model, func)
    bits = check_int_range(bits, "bits", func, MIN_BITS, MAX_BITS)
    act_bits = bits if act_bits is None else act_bits
    act_bits = check_int_range(act_bits, "act_bits", func, MIN_BITS, MAX_BITS)
    epochs = check_int_range(epochs, "epochs", func, 0, 10_000)
    calib_batches = check_int_range(calib_batches, "calib_batches", func, 1, 1_000_000)
    lr = check_positive(lr, "lr", func)
    observer = check_choice(observer, "observer", func, ("ema", "frozen"))
    if train_data is None and (epochs > 0 or calib_data is None):
        raise ConfigError(
            "The 'train_data' parameter of quantize_qat must be an iterable of (x, y) batches. "
            "Got None instead."
        )
    if _qat_layers(model):
        raise ModelError("quantize_qat got a model that already has QAT layers; strip_qat it.")
    # resolved before any copy, so ignored_layers may hold modules; MultiheadAttention reads
    # its out_proj weight directly instead of calling it, so that layer is left in float
    inside_mha = {
        f"{name}.{child}" if name else child
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for child, _ in m.named_children()
    }
    names = [
        name
        for name, m in prunable_layers(model, ignored_layers).items()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and name not in inside_mha
    ]
    if "" in names:  # wrapping the root in itself recursed without end
        raise ModelError(
            f"quantize_qat wraps the layers inside a model; it got a bare "
            f"{type(model).__name__}. Put it in a container, e.g. nn.Sequential(layer).")
    if not inplace:
        model = copy.deepcopy(model)
    layers = {name: model.get_submodule(name) for name in names}
    # every pruned weight must stay zero: the wrapped layers hold theirs (hold_zeros), the
    # layers left in float (ConvTranspose, attention's out_proj) through keep_pruned
    found = held_zeros(model) if keep_zeros else []
    held = {id(m) for m, _ in found}
    wrapped_ids = {id(m) for m in layers.values()}
    keep_pruned = zero_keeper(model, [(m, z) for m, z in found if id(m) not in wrapped_ids])
    if not layers:
        raise ModelError(
            f"quantize_qat found no Linear or convolution layer in {type(model).__name__}."
        )
    act = act_bits if quantize_activations else None
    for name, layer in layers.items():
        _set_submodule(model, name, QATLayer(layer, bits, act, id(layer) in held))
    wrapped = list(_qat_layers(model).values())

    if quantize_activations:
        model.eval()
        source = calib_data if calib_data is not None else train_data
        seen = 0
        with torch.no_grad():
            for batch in islice(iter(source), calib_batches):
                # calibration needs no labels: (x,), (x, y), {"x": ...} or x alone
                inputs = batch if isinstance(batch, torch.Tensor) else split_batch(batch)[0]
                try:
                    call_model(model, inputs)
                except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    raise ConfigError(
                        f"quantize_qat cannot calibrate on batch {seen} of shape "
                        f"{describe(batch)}: {reason[:300].rstrip('.')}. Calibration batches "
                        "must hold inputs the model accepts.") from None
                seen += 1
        if seen == 0:
            raise ConfigError(
                "quantize_qat needs at least one calibration batch; the calibration data "
                "(calib_data, else train_data) yielded none."
            )
        for m in wrapped:
            if m.input_quant is not None:
                m.input_quant.mode = observer

    if epochs > 0:

        def hold_zeros() -> None:
            for m in wrapped:
                m.hold_zeros()
            if keep_pruned is not None:
                keep_pruned()

        fit(
            model,
            train_data,
            epochs=epochs,
            lr=lr,
            loss_fn=loss_fn,
            after_step=hold_zeros if keep_zeros else None,
            desc=f"QAT {bits}-bit",
            progress=progress,
        )
    for m in wrapped:
        m.freeze()
    return model.eval()


def qat_weights(model: nn.Module) -> dict[str, QuantizedTensor]:
    """``{layer name: QuantizedTensor}`` of each QAT layer's weight (int8 codes, per channel)."""
    out = {}
    for name, m in _qat_layers(model).items():
        out[name] = minmax_quantize(
            m.layer.weight.detach(), m.bits, symmetric=True, per_channel=True, axis=0
        )
    return out


def activation_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """``{layer name: (min, max)}`` observed for each QAT layer's input."""
    return {
        name: (float(m.input_quant.min_val), float(m.input_quant.max_val))
        for name, m in _qat_layers(model).items()
        if m.input_quant is not None and int(m.input_quant.batches) > 0
    }


def strip_qat(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A plain model: each ``QATLayer`` replaced by its layer with the weight snapped to the grid.

    Activation fake quantization is dropped (``activation_ranges`` gives the ranges for a
    post-training quantizer). The state-dict keys are those of the model before QAT.
    """
    _check_model(model, "strip_qat")
    if not inplace:
        model = copy.deepcopy(model)
    for name, m in _qat_layers(model).items():
        with torch.no_grad():
            m.layer.weight.copy_(m.quantized_weight())
        _set_submodule(model, name, m.layer)
    return model

