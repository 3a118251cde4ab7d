"""MiniLM-L6 sentence embeddings against sentence-transformers, on real sentences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeslim.datasets import english_sentences
from edgeslim.errors import ConfigError
from edgeslim.zoo.minilm import (
    EMBEDDING_DIM,
    encode,
    minilm_l6,
    minilm_model_dir,
    minilm_tokenizer,
    minilm_tokenizer_json,
    minilm_tokenizer_path,
)


@pytest.fixture(scope="module")
def minilm():
    return minilm_l6()


def _embed(model, sentences: list[str]) -> np.ndarray:
    ids, mask = encode(sentences)
    with torch.no_grad():
        return model(ids, mask).numpy()


@pytest.mark.slow
def test_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_model_dir()), device="cpu", local_files_only=True)
    sentences = [*english_sentences(14, split="evaluation"), "Hi.", "A cat."]
    expected = reference.encode(sentences, convert_to_numpy=True, batch_size=8)
    got = _embed(minilm, sentences)
    assert got.shape == (len(sentences), EMBEDDING_DIM)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_unit_norm_and_padding_invariance(minilm):
    sentences = english_sentences(6, split="calibration")
    batch = _embed(minilm, sentences)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    alone = np.concatenate([_embed(minilm, [s]) for s in sentences])
    np.testing.assert_allclose(batch, alone, rtol=0, atol=1e-5)


def test_the_sdpa_attention_gives_the_same_embeddings(minilm):
    sentences = [*english_sentences(5, split="calibration"), "Hi."]
    sdpa = minilm_l6(attn_implementation="sdpa")
    np.testing.assert_allclose(_embed(sdpa, sentences), _embed(minilm, sentences), atol=1e-5)


def test_an_unknown_attention_implementation_is_refused():
    with pytest.raises(ConfigError, match=r"'flash' is not one of: eager, sdpa"):
        minilm_l6(attn_implementation="flash")


def test_similar_sentences_are_closer(minilm):
    e = _embed(
        minilm,
        [
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "The new movie is awesome.",
            "The new film is so great.",
            "Interest rates rose again this quarter.",
        ],
    )
    cos = e @ e.T
    assert cos[0, 1] > 0.6 and cos[2, 3] > 0.6
    for unrelated in (cos[0, 2], cos[0, 4], cos[1, 3], cos[3, 4]):
        assert unrelated < min(cos[0, 1], cos[2, 3]) - 0.3


def test_tokenizer_truncates_pads_and_serialises():
    from tokenizers import Tokenizer

    tok = minilm_tokenizer(max_length=16)
    long_text = " ".join(english_sentences(5))
    batch = tok.encode_batch([long_text, "Short."])
    assert [len(e.ids) for e in batch] == [16, 16]
    assert batch[0].ids[0] == 101 and batch[0].ids[-1] == 102  # [CLS] ... [SEP]
    assert batch[1].attention_mask == [1] * 4 + [0] * 12  # [CLS] short . [SEP]
    assert minilm_tokenizer_path().name == "tokenizer.json" and minilm_tokenizer_path().is_file()
    again = Tokenizer.from_str(minilm_tokenizer_json(max_length=16))
    assert [e.ids for e in again.encode_batch([long_text, "Short."])] == [e.ids for e in batch]
    with pytest.raises(ConfigError, match="'max_length'"):
        minilm_tokenizer(max_length=1000)
