"""Attention layers whose heads can be removed whole.

torch-pruning removes heads when told which Linear layers project queries, keys and values
and how many heads they hold (``num_heads``), but it leaves the attention module's own
bookkeeping (head count, total width) stale. This module finds such layers and fixes that
bookkeeping after each pruning step; it is edgeslim's addition to torch-pruning.

Supported: the Hugging Face BERT family's self-attention (``query``/``key``/``value``
Linear layers, ``num_attention_heads``, ``attention_head_size``, ``all_head_size``): BERT,
MiniLM, RoBERTa, ELECTRA, ViT, ... ``nn.MultiheadAttention`` packs its projections in one
tensor and ties its inner width to the embedding width, so it keeps its heads: torch-pruning
narrows it together with the residual stream, each head losing the same number of dims.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["AttentionLayer", "find_attention", "mha_heads"]


@dataclass
class AttentionLayer:
    """One attention module: its name, the q/k/v projections and its head count."""

    name: str
    module: nn.Module
    projections: tuple[nn.Linear, nn.Linear, nn.Linear]
    heads: int
    head_size: int

    def set_heads(self, heads: int) -> None:
        """Record that the module now holds ``heads`` heads of ``head_size`` dims each."""
        q = self.projections[0]
        if q.out_features != heads * self.head_size:
            raise RuntimeError(
                f"attention {self.name!r}: {q.out_features} query features do not make "
                f"{heads} heads of {self.head_size}"
            )
        self.heads = heads
        self.module.num_attention_heads = heads
        self.module.all_head_size = heads * self.head_size


def _bert_style(name: str, module: nn.Module) -> AttentionLayer | None:
    parts = [getattr(module, a, None) for a in ("query", "key", "value")]
    heads = getattr(module, "num_attention_heads", None)
    size = getattr(module, "attention_head_size", None)
    if not all(isinstance(p, nn.Linear) for p in parts) or not isinstance(heads, int):
        return None
    if not isinstance(size, int) or parts[0].out_features != heads * size:
        return None
    return AttentionLayer(name, module, (parts[0], parts[1], parts[2]), heads, size)


_ADAPTERS = (_bert_style,)


def find_attention(model: nn.Module) -> list[AttentionLayer]:
    """Every attention module of ``model`` whose heads can be removed whole."""
    found = []
    for name, module in model.named_modules():
        for adapter in _ADAPTERS:
            layer = adapter(name, module)
            if layer is not None:
                found.append(layer)
                break
    return found


def mha_heads(model: nn.Module) -> list[int]:
    """Head counts of the ``nn.MultiheadAttention`` modules (their widths must stay multiples)."""
    return [m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
