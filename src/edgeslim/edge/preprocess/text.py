"""Text preprocessing with the ``tokenizers`` library (Rust, no torch).

``text.tokenize`` loads the ``tokenizer.json`` carried in the bundle (its file name is the
``tokenizer`` parameter, its bytes come from the bundle's files), encodes one string or a list
of strings, truncates to ``max_length`` and pads to ``max_length`` (or to the longest in the
batch), giving int64 ``input_ids``, ``attention_mask`` and ``token_type_ids`` of shape
``(batch, length)``. Only the arrays the model declares as inputs are passed on.

``tokenizers`` truncates only after encoding the whole text (a 16 MB body took over a minute
and gigabytes), so each text is first cut to its head: ``max_length * CHARS_PER_TOKEN``
characters, ended before a space (see ``head``). The tokens kept are those of the whole text
unless its first ``max_length`` tokens span more characters than that.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeslim._validate import json_kind
from edgeslim.edge.preprocess._spec import (
    TEXT,
    TOKENS,
    BuildContext,
    OpSpec,
    Param,
    boolean,
    choice,
    int_range,
    nonempty_str,
    optional,
    register,
)
from edgeslim.errors import ConfigError, InferenceError

MAX_TEXTS = 1024

#: Characters a text may hold per token of ``max_length`` before it is cut (see ``head``).
#: English averages 4-5 characters per WordPiece or BPE token, code, numbers and URLs fewer;
#: 16 leaves more than three times that, and bounds the tokenizer's work (and memory, some
#: hundred bytes per token) to 16 characters per token of the answer.
CHARS_PER_TOKEN = 16


def _load_tokenizer(name: str, files: Any) -> Any:
    from tokenizers import Tokenizer

    if name not in files:
        have = ", ".join(sorted(files)) or "none"
        raise ConfigError(
            f"text.tokenize needs the file {name!r} from the bundle; the bundle carries: {have}"
        )
    data = files[name]
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else str(data)
        return Tokenizer.from_str(text)
    except Exception as exc:
        raise ConfigError(f"{name!r} is not a valid tokenizer.json: {exc}") from None


def head(text: str, limit: int) -> str:
    """The start of ``text`` that is encoded: all of it when it holds at most ``limit``
    characters, else at most ``limit``, ended just before the last space in the second half
    of that window that precedes a word (or a line break, failing a space).

    Ending before the space that precedes a word keeps the last word whole and gives the
    pre-tokenizers the same pieces as the whole text does (BERT splits on whitespace;
    byte-level BPE and SentencePiece's metaspace attach that space to the next word, which
    is cut away entirely). Only a text with no such space there is cut mid-word.
    """
    if len(text) <= limit:
        return text
    low = limit // 2
    for sep in (" ", "\n"):
        at = text.rfind(sep, low, limit + 1)
        while at >= low and text[at + 1:at + 2].isspace():  # not before a word: earlier
            at = text.rfind(sep, low, at)
        if at >= low:
            return text[:at]
    return text[:limit]


def _pad_id(tok: Any, explicit: int | None) -> int:
    if explicit is not None:
        return explicit
    padding = tok.padding
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    for token in ("[PAD]", "<pad>", "<PAD>"):
        idx = tok.token_to_id(token)
        if idx is not None:
            return int(idx)
    return 0


def _texts(raw: Any) -> list[str]:
    texts = [raw] if isinstance(raw, str) else raw
    if isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts):
        if len(texts) > MAX_TEXTS:
            raise InferenceError(f"at most {MAX_TEXTS} texts per request; got {len(texts)}")
        for i, text in enumerate(texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from "\ud800" in JSON
                raise InferenceError(f"text {i} is not valid Unicode: {exc.reason} at "
                                     f"character {exc.start}") from None
        return texts
    raise InferenceError(
        f"text.tokenize expects a string or a non-empty list of strings; got {json_kind(raw)}"
    )


def _tokenize(params: dict[str, Any], ctx: BuildContext) -> Any:
    tok = _load_tokenizer(params["tokenizer"], ctx.files)
    max_length = params["max_length"]
    pad_id = _pad_id(tok, params["pad_id"])  # before no_padding() forgets the tokenizer's own
    by_max = params["padding"] == "max_length"
    truncate = params["truncation"]
    special = params["add_special_tokens"]
    limit = max_length * CHARS_PER_TOKEN
    tok.no_padding()
    if truncate:  # the tokenizer's own truncation keeps the closing special token ([SEP])
        tok.enable_truncation(max_length)
    else:
        tok.no_truncation()

    def step(raw: Any) -> dict[str, np.ndarray]:
        texts = _texts(raw)
        heads = [head(text, limit) for text in texts]
        encs = tok.encode_batch(heads, add_special_tokens=special)
        lengths = [len(e.ids) for e in encs]
        if not truncate and max(lengths) > max_length:
            raise InferenceError(
                f"a text has {max(lengths)} tokens, more than max_length={max_length}, "
                f"and truncation is off"
            )
        if not truncate and any(len(h) < len(t) for h, t in zip(heads, texts, strict=True)):
            most = max(len(t) for t in texts)
            raise InferenceError(
                f"a text has {most} characters, more than the {limit} that max_length="
                f"{max_length} tokens may span ({CHARS_PER_TOKEN} a token), and truncation "
                f"is off"
            )
        width = max_length if by_max else min(max(lengths), max_length)
        ids = np.full((len(encs), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(encs), width), dtype=np.int64)
        types = np.zeros((len(encs), width), dtype=np.int64)
        for i, enc in enumerate(encs):
            n = min(len(enc.ids), width)
            ids[i, :n] = enc.ids[:n]
            mask[i, :n] = 1
            types[i, :n] = enc.type_ids[:n]
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    return step


register(OpSpec(
    "text.tokenize", "pre", frozenset({TEXT}), TOKENS,
    {
        "tokenizer": Param(nonempty_str, "tokenizer.json", "file name in the bundle"),
        "max_length": Param(int_range(1, 8192), 128, "truncate/pad to this many tokens"),
        "padding": Param(choice("max_length", "longest"), "max_length"),
        "truncation": Param(boolean, True),
        "add_special_tokens": Param(boolean, True),
        "pad_id": Param(optional(int_range(0, 1 << 31)), None, "default: the tokenizer's"),
    },
    _tokenize, "tokenize to int64 input_ids / attention_mask / token_type_ids (B, L)",
))
