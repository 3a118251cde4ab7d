"""Offline evaluation data: bundled photo crops and English sentences from the Python manual."""

from __future__ import annotations

import numpy as np
import pytest

from edgeslim.datasets import _split_region as split_region
from edgeslim.datasets import (
    english_sentences,
    load_photo,
    normalize_images,
    photo_crops,
    photo_crops_uint8,
    photo_names,
)
from edgeslim.errors import ConfigError


def test_every_bundled_photo_loads_as_rgb():
    names = photo_names()
    assert len(names) == 15 and len(photo_names(include_gray=False)) == 9
    for name in names:
        image = load_photo(name)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert min(image.shape[:2]) >= 256
    colour = load_photo("coffee").astype(int)
    assert np.abs(colour[..., 0] - colour[..., 2]).mean() > 10


def test_crops_deterministic_and_split_dependent():
    a = photo_crops_uint8(8, size=64, seed=3)
    assert a.shape == (8, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, photo_crops_uint8(8, size=64, seed=3))
    assert not np.array_equal(a, photo_crops_uint8(8, size=64, seed=4))
    assert not np.array_equal(a, photo_crops_uint8(8, size=64, seed=3, split="evaluation"))


def test_normalised_crops_match_uint8_variant():
    raw = photo_crops_uint8(3, size=32, seed=1, split="evaluation")
    x = photo_crops(3, size=32, seed=1, split="evaluation")
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.float32
    expected = (raw.astype(np.float64) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(x, expected.transpose(0, 3, 1, 2), atol=1e-6)
    np.testing.assert_array_equal(x, normalize_images(raw))


@pytest.mark.parametrize("shape", [(300, 451, 3), (500, 200, 3)])
def test_split_regions_partition_the_photo(shape):
    image = np.arange(np.prod(shape), dtype=np.int64).reshape(shape)
    cal = split_region(image, "calibration")
    ev = split_region(image, "evaluation")
    assert cal.size + ev.size == image.size
    assert not set(cal.ravel()) & set(ev.ravel())


def test_bad_crop_arguments():
    with pytest.raises(ConfigError, match="'split'"):
        photo_crops(2, split="train")
    with pytest.raises(ConfigError, match="'n'"):
        photo_crops(0)
    with pytest.raises(ConfigError, match="uint8"):
        normalize_images(np.zeros((1, 4, 4, 3), dtype=np.float32))


def test_sentences_are_plain_prose_and_splits_disjoint():
    everything = english_sentences()
    assert len(everything) >= 400
    assert len({s.lower() for s in everything}) == len(everything)
    for s in everything:
        assert 6 <= len(s.split()) <= 40, s
        assert s[0].isupper() and s[-1] in ".?!", s
        assert not any(tok in s for tok in (">>>", "::", "=", "()", "{", "[")), s
    cal = english_sentences(split="calibration")
    ev = english_sentences(split="evaluation")
    assert not set(cal) & set(ev)
    assert sorted(cal + ev) == sorted(everything)
    assert english_sentences(5, split="evaluation") == ev[:5]


def test_bad_sentence_arguments():
    with pytest.raises(ConfigError, match="'n'"):
        english_sentences(10**6)
    with pytest.raises(ConfigError, match="'split'"):
        english_sentences(split="test")
