"""What structured pruning did: sizes, MACs and the width of every layer before and after."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any

import torch_pruning as tp
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch_pruning.utils import op_counter

from edgeslim.compress.structured.attention import find_attention

__all__ = ["LayerWidth", "StructuredReport", "StructuredResult", "count", "layer_widths"]


@dataclass(frozen=True)
class LayerWidth:
    """One layer's width before and after: ``unit`` is what is counted (``channels`` of a
    conv, ``features`` of a Linear, ``heads`` of an attention module, ``embed_dim`` of an
    ``nn.MultiheadAttention`` or an embedding table)."""

    name: str
    unit: str
    before: int
    after: int

    @property
    def kept(self) -> float:
        """Fraction of the width kept, in [0, 1]."""
        return self.after / self.before if self.before else 1.0


@dataclass(frozen=True)
class StructuredReport:
    """Parameters and MACs (multiply-accumulates of the conv/Linear layers for the example
    inputs, as counted by ``torch_pruning.utils.count_ops_and_params``) before and after,
    the widths of every layer, and the layers left whole (by request or because they shape
    an output)."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    layers: tuple[LayerWidth, ...]
    ignored: tuple[str, ...]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def params_kept(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def macs_kept(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (for a bundle manifest's ``compression`` entry)."""
        return {
            "step": "prune_structured",
            "params": dict(self.config),
            "metrics": {
                "params_before": self.params_before,
                "params_after": self.params_after,
                "macs_before": self.macs_before,
                "macs_after": self.macs_after,
                "layers": {
                    w.name: {"unit": w.unit, "before": w.before, "after": w.after}
                    for w in self.layers
                },
                "ignored": list(self.ignored),
            },
        }

    def format_table(self) -> str:
        """A plain-text table: one line per layer, then the totals."""
        width = max([len(w.name) for w in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'unit':<9} {'before':>7} {'after':>7}  kept"]
        for w in self.layers:
            lines.append(
                f"{w.name:<{width}}  {w.unit:<9} {w.before:>7} {w.after:>7}  {w.kept:5.0%}"
            )
        lines.append(
            f"params {self.params_before:,} -> {self.params_after:,} ({self.params_kept:.1%}); "
            f"MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_kept:.1%})"
        )
        return "\n".join(lines)


@dataclass
class StructuredResult:
    """The pruned model (fewer parameters, same output shape) and its report."""

    model: nn.Module
    report: StructuredReport


def count(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """``(MACs, parameters)`` of ``model`` for ``example_inputs``.

    torch-pruning's counter looks layers up by exact type, so a subclass (a ``Conv2d`` with
    TF "same" padding, say) would count zero MACs; subclasses are mapped to their base
    type's counter here.
    """
    mapping = {}
    for m in model.modules():
        kind = type(m)
        if kind in op_counter.MODULES_MAPPING or kind is NonDynamicallyQuantizableLinear:
            continue  # (the latter is nn.MultiheadAttention's out_proj, counted with it)
        for base, hook in op_counter.MODULES_MAPPING.items():
            if isinstance(m, base):
                mapping[kind] = hook
                break
    op_counter.CUSTOM_MODULES_MAPPING = mapping  # read and reset by count_ops_and_params
    with contextlib.redirect_stdout(io.StringIO()):  # torch-pruning prints warnings
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def layer_widths(model: nn.Module) -> dict[str, tuple[str, int]]:
    """``{name: (unit, width)}`` for every conv, Linear, attention, embedding and LSTM layer."""
    widths: dict[str, tuple[str, int]] = {}
    for layer in find_attention(model):
        widths[layer.name] = ("heads", layer.heads)
    inside_mha = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            widths[name] = ("channels", m.out_channels)
        elif isinstance(m, nn.Linear) and id(m) not in inside_mha:
            widths[name] = ("features", m.out_features)
        elif isinstance(m, nn.MultiheadAttention):
            widths[name] = ("embed_dim", m.embed_dim)
        elif isinstance(m, nn.Embedding):
            widths[name] = ("embed_dim", m.embedding_dim)
        elif isinstance(m, nn.LSTM):
            widths[name] = ("hidden", m.hidden_size)
    return widths
