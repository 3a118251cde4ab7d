"""Cross-layer equalization keeps the float model's outputs and balances channel ranges."""

from __future__ import annotations

import copy

import numpy as np

from edgeslim.ptq import equalize, find_pairs
from edgeslim.ptq._graph import Graph, make_session

from .conftest import conv_chain


def _run(model, x):
    return make_session(model).run(None, {"input": x})[0]


def _spread(model, name):
    w = Graph(model).array(name)
    r = np.abs(w).reshape(w.shape[0], -1).max(1)
    return r.max() / r.min()


def test_relu_pairs_are_equalized_exactly():
    model = conv_chain(clip=False)
    x = np.random.default_rng(1).normal(size=(4, 4, 8, 8)).astype(np.float32)
    before = _run(model, x)
    assert [(a.name, b.name) for a, _, b in find_pairs(model)] == [("conv1", "dw"), ("dw", "conv3")]
    eq, report = equalize(copy.deepcopy(model))
    after = _run(eq, x)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    assert len(report) == 2
    # conv1's channel ranges spanned 400x; equalization pulls them together
    assert _spread(eq, "w1") < _spread(model, "w1") / 5


def test_relu6_pairs_scale_only_channels_that_never_clip():
    model = conv_chain(clip=True)
    rng = np.random.default_rng(2)
    calib = [{"input": rng.normal(size=(8, 4, 8, 8)).astype(np.float32) * 0.2} for _ in range(4)]
    x = calib[0]["input"]
    before = _run(model, x)
    eq, report = equalize(copy.deepcopy(model), calib, margin=0.9)
    np.testing.assert_allclose(_run(eq, x), before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    first = next(r for r in report if r.first == "conv1")
    assert 0 < first.scaled < first.channels  # the loud channels clip at 6 and are left alone


def test_relu6_pairs_skipped_without_calibration_data():
    model = conv_chain(clip=True)
    _, report = equalize(copy.deepcopy(model))
    assert all(r.first != "conv1" for r in report)
