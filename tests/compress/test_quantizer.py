"""The min-max quantizer against a numpy transcription of the seed, and its error bounds."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgeslim.compress.quantizer import (
    QuantizedTensor,
    code_range,
    fake_quantize,
    level_quantize,
    minmax_quantize,
)
from edgeslim.errors import ConfigError

BITS = st.integers(2, 8)


@st.composite
def arrays(draw, min_dims: int = 1) -> np.ndarray:
    """Small float32/float64 arrays; some elements repeat so constant channels occur."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=3, min_side=1, max_side=5))
    finite = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32)
    elements = st.one_of(finite, st.sampled_from([0.0, 1.5, -2.0]))
    return draw(hnp.arrays(dtype, shape, elements=elements))


def _tolerance(x: np.ndarray, qt: QuantizedTensor) -> float:
    """Float slack on top of the half step: a few ulps of the largest value involved."""
    eps = np.finfo(x.dtype).eps
    return 4 * eps * (float(np.abs(x).max()) + float(np.max(qt.scale)))


def _seed_codes(x: np.ndarray, bits: int) -> np.ndarray:
    """The seed's formula, transcribed: Q(x) = round((x - xmin) / (xmax - xmin) * L)."""
    levels = 2**bits - 1
    return np.round((x - x.min()) / (x.max() - x.min()) * levels)


@settings(max_examples=150, deadline=None)
@given(x=arrays(), bits=BITS, symmetric=st.booleans(), per_channel=st.booleans(), data=st.data())
def test_round_trip_error_is_at_most_half_a_step(x, bits, symmetric, per_channel, data):
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1)) if per_channel else 0
    qt = minmax_quantize(x, bits, symmetric=symmetric, per_channel=per_channel, axis=axis)
    qmin, qmax = code_range(bits, symmetric)
    assert qt.q.shape == x.shape
    assert qt.q.min() >= qmin and qt.q.max() <= qmax
    back = qt.dequantize()
    assert back.dtype == x.dtype and back.shape == x.shape
    err = np.abs(x.astype(np.float64) - back.astype(np.float64))
    bound = np.broadcast_to(qt.scale / 2, x.shape) + _tolerance(x, qt)
    assert np.all(err <= bound), float((err - bound).max())


@settings(max_examples=100, deadline=None)
@given(x=arrays(), bits=BITS)
def test_asymmetric_codes_equal_the_seed_formula(x, bits):
    x64 = x.astype(np.float64)
    if x64.max() == x64.min():
        return  # the seed's formula divides by zero there; covered by the constant test
    qt = minmax_quantize(x, bits)
    np.testing.assert_array_equal(qt.q, _seed_codes(x64, bits))
    # and the dequantized value is x_min + Q * (x_max - x_min) / L
    step = (x64.max() - x64.min()) / (2**bits - 1)
    np.testing.assert_allclose(
        qt.dequantize().astype(np.float64), x64.min() + qt.q * step, rtol=1e-6, atol=1e-9 * step
    )


@settings(max_examples=60, deadline=None)
@given(x=arrays(min_dims=2), bits=BITS)
def test_per_channel_codes_equal_the_seed_formula_per_row(x, bits):
    qt = minmax_quantize(x, bits, per_channel=True, axis=0)
    for c in range(x.shape[0]):
        row = x[c].astype(np.float64)
        if row.max() > row.min():
            np.testing.assert_array_equal(qt.q[c], _seed_codes(row, bits))
        else:
            assert np.all(qt.q[c] == 0)


@settings(max_examples=100, deadline=None)
@given(x=arrays(min_dims=2), bits=BITS, symmetric=st.booleans())
def test_per_channel_step_and_error_never_exceed_per_tensor(x, bits, symmetric):
    """Each channel's range lies inside the tensor's, so its step (and error bound) is no larger.

    (The realised error of one element can be larger per channel when that element happens to
    sit on the per-tensor grid; the bound is what holds for every tensor.)
    """
    whole = minmax_quantize(x, bits, symmetric=symmetric)
    chan = minmax_quantize(x, bits, symmetric=symmetric, per_channel=True, axis=0)
    x64 = x.astype(np.float64)
    flat = x64.reshape(x.shape[0], -1)
    # a channel with nothing to span (constant; all zero when symmetric) has the placeholder
    # scale 1, which any value there round-trips through exactly
    spans = np.abs(flat).max(1) if symmetric else flat.max(1) - flat.min(1)
    whole_span = np.abs(flat).max() if symmetric else flat.max() - flat.min()
    if whole_span > 0:
        live = spans > 0
        assert np.all(chan.scale.ravel()[live] <= whole.scale.ravel()[0] * (1 + 1e-12))
    err_chan = np.abs(x64 - chan.dequantize().astype(np.float64)).max()
    assert err_chan <= float(whole.scale.max()) / 2 + _tolerance(x, whole)


def test_per_channel_error_is_lower_on_weights_with_unequal_channel_ranges():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8, 3, 3)) * rng.uniform(0.01, 1.0, (16, 1, 1, 1))
    for bits in range(2, 9):
        for symmetric in (False, True):
            whole = minmax_quantize(w, bits, symmetric=symmetric)
            chan = minmax_quantize(w, bits, symmetric=symmetric, per_channel=True)
            mse_whole = np.mean((w - whole.dequantize()) ** 2)
            mse_chan = np.mean((w - chan.dequantize()) ** 2)
            assert mse_chan < mse_whole, (bits, symmetric)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
def test_constant_tensors_round_trip_exactly(bits, symmetric):
    for value in (0.0, 3.25, -7.0):
        x = np.full((3, 4), value, dtype=np.float32)
        for per_channel in (False, True):
            qt = minmax_quantize(x, bits, symmetric=symmetric, per_channel=per_channel)
            np.testing.assert_array_equal(qt.dequantize(), x)


def test_symmetric_keeps_zero_exact_and_uses_signed_codes():
    x = np.array([[-1.0, 0.0, 0.3], [0.0, 2.0, -0.5]])
    qt = minmax_quantize(x, 4, symmetric=True, per_channel=True)
    assert qt.q.dtype == np.int8
    assert qt.dequantize()[0, 1] == 0.0 and qt.dequantize()[1, 0] == 0.0
    assert qt.q.min() >= -7 and qt.q.max() <= 7
    assert np.all(qt.zero_point == 0)
    np.testing.assert_allclose(qt.scale.ravel(), [1.0 / 7, 2.0 / 7])


@settings(max_examples=100, deadline=None)
@given(x=arrays(), bits=BITS)
def test_integer_zero_point_represents_zero_exactly(x, bits):
    qt = minmax_quantize(x, bits, integer_zero_point=True)
    zp = float(qt.zero_point.ravel()[0])
    assert zp == round(zp) and 0 <= zp <= 2**bits - 1
    zero = (np.float64(0.0) / qt.scale + zp).round() - zp
    assert float(zero.ravel()[0]) == 0.0
    # the range widened to include 0 may clip by half a step more at its ends
    err = np.abs(x.astype(np.float64) - qt.dequantize().astype(np.float64))
    assert np.all(err <= float(qt.scale.max()) + _tolerance(x, qt))


@settings(max_examples=50, deadline=None)
@given(x=arrays(), bits=BITS, symmetric=st.booleans())
def test_torch_and_numpy_inputs_agree(x, bits, symmetric):
    a = minmax_quantize(x, bits, symmetric=symmetric, per_channel=True)
    b = minmax_quantize(torch.from_numpy(x.copy()), bits, symmetric=symmetric, per_channel=True)
    assert isinstance(b.q, torch.Tensor) and isinstance(b.dequantize(), torch.Tensor)
    assert b.dequantize().dtype == torch.from_numpy(x).dtype
    np.testing.assert_array_equal(a.q, b.q.numpy())
    np.testing.assert_array_equal(a.dequantize(), b.dequantize().numpy())


@settings(max_examples=50, deadline=None)
@given(x=arrays(), levels=st.integers(1, 16))
def test_level_quantize_is_the_seed_formula(x, levels):
    np.testing.assert_array_equal(level_quantize(x, levels), np.round(x * levels) / levels)
    t = level_quantize(torch.from_numpy(x.copy()), levels)
    np.testing.assert_array_equal(t.numpy(), np.round(x * levels) / levels)


def test_seed_levels_example():
    w = np.array([0.26, -0.74, 0.24, 1.3])
    np.testing.assert_array_equal(level_quantize(w, 2), [0.5, -0.5, 0.0, 1.5])


def test_fake_quantize_matches_torch_builtin_forward_and_gradient():
    torch.manual_seed(0)
    x = (torch.randn(2000) * 3).requires_grad_()
    scale, zp = 0.05, 7
    ours = fake_quantize(x, torch.tensor(scale), torch.tensor(float(zp)), 0, 255)
    ref_x = x.detach().clone().requires_grad_()
    ref = torch.fake_quantize_per_tensor_affine(ref_x, scale, zp, 0, 255)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    g = torch.randn(2000)
    ours.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_straight_through_gradient_is_one_inside_the_range_and_zero_outside():
    x = torch.tensor([-3.0, -1.0, -0.26, 0.0, 0.4, 0.99, 2.5], requires_grad=True)
    qmin, qmax = code_range(4, symmetric=True)  # [-7, 7], scale 1/7: range [-1, 1]
    y = fake_quantize(x, torch.tensor(1 / 7), torch.tensor(0.0), qmin, qmax)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    # forward: on the grid, clipped at the ends
    assert y[0].item() == pytest.approx(-1.0) and y[-1].item() == pytest.approx(1.0)
    assert y[2].item() == pytest.approx(-2 / 7)
    # without gradients it is the same values, from plain ops
    with torch.no_grad():
        torch.testing.assert_close(
            fake_quantize(x, torch.tensor(1 / 7), torch.tensor(0.0), qmin, qmax), y.detach()
        )


@pytest.mark.parametrize("bits", [1, 9, 0, 16, 2.5, True, "8"])
def test_bits_outside_2_to_8_is_a_config_error(bits):
    with pytest.raises(ConfigError, match=r"'bits'.*\[2, 8\]") as info:
        minmax_quantize(np.ones(3), bits)
    assert repr(bits) in str(info.value)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ConfigError, match=r"axis.*Got 2"):
        minmax_quantize(np.ones((2, 2)), 8, per_channel=True, axis=2)
    with pytest.raises(ConfigError, match="NaN"):
        minmax_quantize(np.array([1.0, np.nan]), 8)
    with pytest.raises(ConfigError, match="non-empty"):
        minmax_quantize(np.array([]), 8)
    with pytest.raises(ConfigError, match="dtype <U1"):
        minmax_quantize(np.array(["a"]), 8)
    with pytest.raises(ConfigError, match=r"'levels'.*Got 0"):
        level_quantize(np.ones(2), 0)


@pytest.mark.parametrize(("value", "phrase"), [
    (None, "Got NoneType"), ({"a": 1}, "Got dict"), ("abc", "Got str"),
    ([0.1, "x"], "Got list of dtype"), (np.array([0.5, np.nan]), "NaN or infinite"),
    (torch.tensor([float("inf")]), "NaN or infinite"),
])
def test_level_quantize_refuses_what_is_not_finite_real_numbers(value, phrase):
    with pytest.raises(ConfigError, match=re.escape(phrase)):
        level_quantize(value)


def test_a_0d_input_keeps_its_shape_and_an_overflowing_range_is_refused():
    for x in (np.array(0.7), torch.tensor(0.7)):
        q = minmax_quantize(x)
        assert tuple(q.q.shape) == () and tuple(q.dequantize().shape) == ()
    with pytest.raises(ConfigError, match=re.escape("range (max - min) is a finite float64")):
        minmax_quantize(np.array([-1.7e308, 1.7e308]))
