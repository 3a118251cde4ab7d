"""Calibration data in every accepted form becomes onnxruntime feed dicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeslim.data import Dataset
from edgeslim.errors import ConfigError
from edgeslim.ptq import FeedReader, to_feeds

from .conftest import mlp


def test_forms_of_data():
    model = mlp()
    x = np.random.default_rng(0).normal(size=(20, 16))
    feeds = to_feeds(x, model, batch_size=8)
    assert [f["input"].shape for f in feeds] == [(8, 16), (8, 16), (4, 16)]
    assert feeds[0]["input"].dtype == np.float32
    pairs = Dataset([(torch.ones(16), 3), (torch.zeros(16), 1)])  # (sample, label)
    feeds = to_feeds(pairs, model)
    assert [f["input"].shape for f in feeds] == [(1, 16), (1, 16)]
    feeds = to_feeds([{"input": x[:2]}], model)
    np.testing.assert_array_equal(feeds[0]["input"], x[:2].astype(np.float32))
    assert len(to_feeds(x, model, batch_size=4, limit=6)) == 2
    reader = FeedReader(to_feeds(x, model))
    assert sum(1 for _ in iter(reader.get_next, None)) == 3


@pytest.mark.parametrize(
    "data, match",
    [
        ([], "empty"),
        ([np.zeros((2, 3, 16))], "axes"),
        ([{"other": np.zeros((1, 16))}], "lacks model input"),
        ([(np.zeros(16), np.zeros(16), np.zeros(16))], "sequence of 3"),
        (42, "Dataset, an iterable"),
    ],
)
def test_bad_data_is_a_config_error(data, match):
    with pytest.raises(ConfigError, match=match):
        to_feeds(data, mlp())
