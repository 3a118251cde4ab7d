"""Text preprocessing with the ``tokenizers`` library (Rust, no torch).

``text.tokenize`` loads the ``tokenizer.json`` carried in the bundle (its file name is the
``tokenizer`` parameter, its bytes come from the bundle's files), encodes one string or a list
of strings, truncates to ``max_length`` and pads to ``max_length`` (or to the longest in the
batch), giving int64 ``input_ids``, ``attention_mask`` and ``token_type_ids`` of shape
``(batch, length)``. Only the arrays the model declares as inputs are passed on.

``tokenizers`` truncates only after encoding the whole text (a 16 MB body took over a minute
and gigabytes), so each text is encoded a head at a time (see ``encode_heads``): first
``max_length * CHARS_PER_TOKEN`` characters, then four times as many, up to the whole text
or ``MAX_GROWTH`` (64) times the first head, until the head gives all the tokens that are
kept; a longer text that needs more is refused, so the cost is bounded by ``max_length``.
The tokens are those of the whole text (for normalizers and pre-tokenizers that act on each
character and its near neighbours, as all in use do); what is encoded is at most a few
times the characters those tokens span.
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

#: Characters per token of ``max_length`` in the first head encoded (see ``encode_heads``).
#: English averages 4-5 characters per WordPiece or BPE token, code, numbers and URLs fewer,
#: so 16 is almost always enough at once; a text that needs more is encoded again with a
#: head ``GROWTH`` times as long.
CHARS_PER_TOKEN = 16

#: How much longer each head is than the one before (see ``encode_heads``).
GROWTH = 4

#: How many times the first head the longest one is (see ``encode_heads``): a text whose
#: kept tokens this many characters do not settle is refused, so what one text costs is
#: bounded by ``max_length``, not by the size of the request.
MAX_GROWTH = 64


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
    is cut away entirely). Only a text with no such space there is cut mid-word. Which tokens
    of a head are trusted does not rest on this (see ``known_tokens``); a clean cut only
    makes more of them trusted.
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


def known_tokens(enc: Any, end: int) -> int:
    """How many leading tokens of ``enc``, the encoding of a head, the whole text gives too:
    those of every word (pre-token) but the head's last, ending at or before character
    ``end`` of the head (see ``trusted_end``).

    Normalizers and pre-tokenizers work on each character and its neighbours, and the model
    on each word alone, so cutting a text changes at most its last word: a word cut in two,
    or a whitespace run cut short. Added tokens (``[MASK]``, ``<|endoftext|>``) are matched
    before words are split, so a token close enough to the cut to be part of one in the
    whole text is not trusted either.
    """
    last = max((w for w in enc.word_ids if w is not None), default=None)
    if last is None:  # no tokens, or none known to belong to a word
        return 0
    n = enc.word_to_tokens(last)[0]
    ends = [e for _, e in enc.offsets[:n]]
    while n and ends[n - 1] > end:
        n -= 1
    return n


class Margins:
    """How far before a head's cut its tokens can still be changed by an added token that
    the cut split: ``raw``, the longest added token in characters of the text (those not
    normalized are matched on the text itself), and ``normalized``, the longest normalized
    one in characters of the normalized text, where it is matched."""

    def __init__(self, tok: Any) -> None:
        added = list(tok.get_added_tokens_decoder().values())
        normalizer = tok.normalizer
        self.raw = max((len(t.content) for t in added), default=0)
        self.normalize = normalizer.normalize_str if normalizer is not None else None
        self.normalized = 0
        if self.normalize is not None:
            self.normalized = max((max(len(t.content), len(self.normalize(t.content)))
                                   for t in added if t.normalized), default=0)  # fmt: skip

    def trusted_end(self, part: str) -> int:
        """The character of ``part`` (a head) before which no added token of the whole text
        can begin that the head does not hold whole: ``raw`` characters before the cut, and
        before as many characters as normalize to at least ``normalized`` (a normalizer can
        drop characters: accents, control characters), found in spans doubling in length,
        so at most twice ``part`` is normalized."""
        end = len(part) - self.raw
        if self.normalize is None or not self.normalized:
            return max(end, 0)
        span = self.normalized
        while span < len(part) and len(self.normalize(part[-span:])) < self.normalized:
            span *= 2
        return max(min(end, len(part) - span), 0)


def encode_heads(tok: Any, texts: list[str], first: int,
                 need: int, margins: Margins) -> list[tuple[Any, bool]]:
    """Each text's encoding without special tokens, and whether it is the whole text's; if
    not, it is a head's, whose first ``need`` tokens (at least) the whole text gives too.

    A text is encoded ``first`` characters at a time (see ``head``); one whose head gives
    fewer than ``need`` known tokens (see ``known_tokens``) is encoded again with a window
    ``GROWTH`` times as long, up to the whole text or ``MAX_GROWTH * first`` characters (the
    cap): a longer text whose cap-long head is not enough is refused (``InferenceError``
    naming its index, its length and the cap), as its tokens would take encoding more than
    ``max_length`` bounds. A text's heads together hold less than
    ``GROWTH / (GROWTH - 1)`` times its last window: less than 4/3 of ``first`` when the
    first head is enough; less than 7/3 of the text when it is encoded whole; else less than
    ``4/3 * 2 * GROWTH`` (11) times what the needed tokens span with the word after them,
    since ``head`` ends in the second half of its window.
    """
    out: list[tuple[Any, bool]] = [(None, False)] * len(texts)
    pending = list(range(len(texts)))
    size, cap = first, first * MAX_GROWTH
    while pending:
        parts = [head(texts[i], size) for i in pending]
        encs = tok.encode_batch(parts, add_special_tokens=False)
        later = []
        for i, part, enc in zip(pending, parts, encs, strict=True):
            whole = len(part) == len(texts[i])
            if whole or known_tokens(enc, margins.trusted_end(part)) >= need:
                out[i] = (enc, whole)
            elif size >= cap:
                raise InferenceError(
                    f"text {i} has {len(texts[i])} characters, more than the cap of {cap} "
                    f"({MAX_GROWTH} x max_length x {CHARS_PER_TOKEN}), and its first {cap} do "
                    f"not settle the {need} tokens needed; send a shorter text, or one with "
                    f"fewer characters a token (no long runs of spaces or of characters the "
                    f"tokenizer drops)")
            else:
                later.append(i)
        pending, size = later, min(size * GROWTH, cap)
    return out


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
    tok.no_padding()
    tok.no_truncation()  # each text's own tokens are cut below to what fits beside these:
    n_special = tok.num_special_tokens_to_add(False) if special else 0  # [CLS] and [SEP]
    budget = max(max_length - n_special, 0)
    need = budget if truncate else budget + 1  # enough to fill max_length, or to overflow it
    margins = Margins(tok)
    first = max_length * CHARS_PER_TOKEN

    def step(raw: Any) -> dict[str, np.ndarray]:
        texts = _texts(raw)
        encs = []
        for i, (enc, whole) in enumerate(encode_heads(tok, texts, first, need, margins)):
            count = len(enc.ids) + n_special
            if not truncate and (count > max_length or not whole):  # a head: over max_length
                has = f"{count} tokens, more than" if whole else "more tokens than"
                raise InferenceError(f"text {i} has {has} max_length={max_length}, and "
                                     f"truncation is off; send a shorter text")
            enc.truncate(budget)
            encs.append(tok.post_process(enc, add_special_tokens=special))
        lengths = [len(e.ids) for e in encs]
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
