"""Quantization-aware training: accuracy at 4 bits, a numpy reference, export, clean stripping."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.compress.prune import prune
from edgeslim.compress.qat import (
    QATLayer,
    activation_ranges,
    qat_weights,
    quantize_qat,
    strip_qat,
)
from edgeslim.compress.train import accuracy
from edgeslim.errors import ConfigError, ModelError
from edgeslim.zoo.digits import DigitsMLP, digits_loaders


@pytest.fixture(scope="module")
def loaders():
    return digits_loaders(batch_size=64, seed=0)


@pytest.fixture(scope="module")
def qat4(digits_mlp, loaders):
    train, _ = loaders
    torch.manual_seed(0)
    return quantize_qat(digits_mlp, train, bits=4, act_bits=4, epochs=2, lr=3e-4, progress=False)


@pytest.mark.slow
def test_4_bit_qat_on_digits_mlp_stays_within_1_5_points(digits_mlp, loaders, qat4):
    _, test = loaders
    fp32 = accuracy(digits_mlp, test)
    acc = accuracy(qat4, test)
    print(f"digits-mlp fp32 {fp32:.4f}, QAT w4a4 {acc:.4f}")
    assert acc >= fp32 - 0.015
    assert {type(m) for m in qat4.modules()} >= {QATLayer}
    assert len([m for m in qat4.modules() if isinstance(m, QATLayer)]) == 3


def test_qat_weights_lie_on_a_4_bit_grid_and_strip_keeps_them(digits_mlp, qat4):
    codes = qat_weights(qat4)
    assert set(codes) == {"fc1", "fc2", "fc3"}
    stripped = strip_qat(qat4)
    assert not any(isinstance(m, QATLayer) for m in stripped.modules())
    assert list(stripped.state_dict()) == list(digits_mlp.state_dict())
    for name, qt in codes.items():
        assert qt.q.dtype == torch.int8 and qt.axis == 0
        assert int(qt.q.min()) >= -7 and int(qt.q.max()) <= 7
        w = getattr(stripped, name).weight.detach()
        torch.testing.assert_close(qt.dequantize(), w, rtol=0, atol=1e-6)
        for row in w:  # at most 2**4 - 1 levels per output channel
            assert torch.unique(row).numel() <= 15
    # the stripped model is a plain float model of the same accuracy class
    ranges = activation_ranges(qat4)
    assert set(ranges) == {"fc1", "fc2", "fc3"}
    assert ranges["fc1"][0] == pytest.approx(0.0) and 0.9 <= ranges["fc1"][1] <= 1.0


def _np_fake_quant(x, scale, zp, qmin, qmax):
    return (np.clip(np.round(x / scale) + zp, qmin, qmax) - zp) * scale


def test_qat_forward_matches_a_numpy_transcription():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    calib = [torch.randn(16, 6) - 0.3 for _ in range(3)]
    q = quantize_qat(model, None, calib_data=calib, bits=3, act_bits=5, epochs=0,
                     progress=False)
    # calibrated range: the mean of the per-batch minima and maxima
    lo = np.mean([float(b.min()) for b in calib])
    hi = np.mean([float(b.max()) for b in calib])
    got = activation_ranges(q)["0"]
    assert got == pytest.approx((lo, hi), rel=1e-6)

    x = (torch.randn(7, 6) * 2).numpy().astype(np.float64)
    h = x
    for idx in ("0", "2"):
        layer = getattr(model, idx)
        amin, amax = activation_ranges(q)[idx]
        amin, amax = min(amin, 0.0), max(amax, 0.0)
        s = (amax - amin) / 31
        zp = np.clip(np.round(-amin / s), 0, 31)
        hq = _np_fake_quant(h, s, zp, 0, 31)
        w = layer.weight.detach().numpy().astype(np.float64)
        ws = np.abs(w).max(1, keepdims=True) / 3
        wq = _np_fake_quant(w, ws, 0, -3, 3)
        h = hq @ wq.T + layer.bias.detach().numpy()
        if idx == "0":
            h = np.maximum(h, 0)
    with torch.no_grad():
        out = q(torch.from_numpy(x).float()).double().numpy()
    np.testing.assert_allclose(out, h, rtol=1e-4, atol=1e-4)


def test_gradients_reach_the_weights_and_the_observer_tracks_by_ema():
    torch.manual_seed(0)
    model = DigitsMLP(hidden=(16, 8))
    data = [(torch.rand(8, 64), torch.randint(0, 10, (8,))) for _ in range(4)]
    q = quantize_qat(model, data, bits=4, epochs=0, progress=False, inplace=False)
    layer = q.fc1
    layer.frozen = False  # back to training
    q.train()
    before = float(layer.input_quant.max_val)
    out = q(torch.rand(8, 64) * 3)  # a wider batch moves the EMA range up by 1%
    assert float(layer.input_quant.max_val) > before
    out.sum().backward()
    assert layer.layer.weight.grad is not None and layer.layer.weight.grad.abs().sum() > 0

    frozen = quantize_qat(model, data, bits=4, epochs=0, observer="frozen", progress=False)
    frozen.train()
    before = float(frozen.fc1.input_quant.max_val)
    frozen(torch.rand(8, 64) * 3)
    assert float(frozen.fc1.input_quant.max_val) == before


def test_a_conv_subclass_keeps_its_own_forward_under_qat():
    """The zoo's Conv2dSame pads (TF "same") in its forward before convolving; QAT ran the
    bare convolution and efficientnet-lite0's logits moved by up to 5.49."""
    from edgeslim.zoo.efficientnet import Conv2dSame

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = Conv2dSame(3, 8, 3, stride=2)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.stem(x)).mean((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.rand(4, 3, 8, 8)
    data = [(x, torch.tensor([0, 1, 2, 0]))]
    q = quantize_qat(model, data, bits=8, quantize_activations=False, epochs=0, progress=False)
    plain = strip_qat(q)
    with torch.no_grad():
        torch.testing.assert_close(q(x), plain(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(q(x), model(x), rtol=0, atol=0.02)
    q.stem.frozen = False  # the training path, with the straight-through estimator
    q.train()
    out = q(x)
    torch.testing.assert_close(out.detach(), plain(x).detach(), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert q.stem.layer.weight.grad is not None and q.stem.layer.weight.grad.abs().sum() > 0


def test_pruned_zeros_stay_zero_through_qat(digits_mlp, loaders):
    train, _ = loaders
    small = [b for _, b in zip(range(4), train, strict=False)]
    pruned = prune(digits_mlp, sparsity=0.7, progress=False).model
    zeros = {n: getattr(pruned, n).weight == 0 for n in ("fc1", "fc2", "fc3")}
    q = strip_qat(quantize_qat(pruned, small, bits=4, epochs=2, lr=1e-3, progress=False))
    for name, mask in zeros.items():
        assert torch.all(getattr(q, name).weight[mask] == 0)


def test_a_zero_initialised_layer_trains_through_qat():
    torch.manual_seed(0)
    model = DigitsMLP(hidden=(16, 8))
    nn.init.zeros_(model.fc3.weight)
    data = [(torch.rand(16, 64), torch.randint(0, 10, (16,))) for _ in range(4)]
    q = strip_qat(quantize_qat(model, data, bits=8, epochs=2, lr=1e-2, progress=False))
    assert int(q.fc3.weight.count_nonzero()) > 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter
def test_qat_model_exports_to_onnx_and_runs_in_onnxruntime(qat4):
    ort = pytest.importorskip("onnxruntime")
    x = torch.rand(5, 64)
    buf = io.BytesIO()
    torch.onnx.export(
        qat4, (x,), buf, dynamo=False, input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}},
    )
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, qat4(x).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw", [{"bits": 1}, {"bits": 9}, {"bits": 4, "act_bits": 12}])
def test_bits_outside_2_to_8_is_a_config_error(kw, loaders):
    name, value = list(kw.items())[-1]
    with pytest.raises(ConfigError, match=rf"'{name}'.*\[2, 8\]. Got {value} instead"):
        quantize_qat(DigitsMLP(), loaders[0], **kw)


def test_other_bad_inputs(loaders):
    with pytest.raises(ModelError, match="Got str instead"):
        quantize_qat("digits-mlp", loaders[0])
    with pytest.raises(ConfigError, match=r"'observer'.*Got 'minmax'"):
        quantize_qat(DigitsMLP(), loaders[0], observer="minmax")
    with pytest.raises(ConfigError, match="'train_data'"):
        quantize_qat(DigitsMLP(), None)
    with pytest.raises(ConfigError, match="at least one calibration batch"):
        quantize_qat(DigitsMLP(), [], epochs=0)


def test_multihead_attention_out_proj_is_left_in_float():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.att(x, x, x)[0]).mean(1)

    torch.manual_seed(0)
    data = [(torch.randn(4, 5, 8), torch.randint(0, 3, (4,))) for _ in range(2)]
    q = quantize_qat(Tiny(), data, bits=4, epochs=1, progress=False)
    assert isinstance(q.fc, QATLayer) and not isinstance(q.att.out_proj, QATLayer)
    assert q(data[0][0]).shape == (4, 3)
    assert q.fc.weight is q.fc.layer.weight


def test_pruned_zeros_of_layers_left_in_float_stay_zero_through_qat():
    """QAT wraps Linear and convolutions; a ConvTranspose and attention's out_proj stay float
    but train too: their pruned weights must not regrow either."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose1d(4, 8, 3)
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.up(x)).transpose(1, 2)  # (B, 10, 8)
            return self.fc(self.att(h, h, h)[0].mean(1))

    data = [(torch.randn(16, 4, 8), torch.randint(0, 3, (16,))) for _ in range(10)]
    pruned = prune(Net(), sparsity=0.5, progress=False).model
    zeros = {n: p == 0 for n, p in pruned.named_parameters() if n.endswith("weight")}
    assert zeros["up.weight"].any() and zeros["att.out_proj.weight"].any()
    q = strip_qat(quantize_qat(pruned, data, bits=8, epochs=2, lr=1e-2, progress=False))
    for name, p in q.named_parameters():
        if name in zeros:
            assert bool((p[zeros[name]] == 0).all()), f"{name} regrew pruned weights"


def test_qat_refuses_a_bare_layer_and_bad_calibration_batches_in_one_line():
    """A bare nn.Linear recursed without end; unlabelled calibration batches ((x,) from a
    TensorDataset) hit an IndexError; inputs of the wrong width a raw RuntimeError."""
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.rand(32, 64)
    with pytest.raises(ModelError, match=r"bare Linear\. Put it in a container"):
        quantize_qat(nn.Linear(64, 10), None, calib_data=[x], epochs=0, progress=False)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    unlabelled = DataLoader(TensorDataset(x), batch_size=8)
    q = quantize_qat(model, None, calib_data=unlabelled, epochs=0, progress=False)
    assert q(x).shape == (32, 10)
    with pytest.raises(ConfigError, match=r"cannot calibrate on batch 0 of shape .*32.*63"):
        quantize_qat(model, None, calib_data=[torch.rand(32, 63)], epochs=0, progress=False)


def test_a_layer_pruning_emptied_stays_empty_through_qat():
    """Pruning by threshold can zero a whole small layer; freeing every all-zero tensor (for
    zero-initialised heads) let it grow back (0 -> 18,284 non-zero weights). In a pruned
    model an emptied layer is held like the others."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    with torch.no_grad():
        model[2].weight.mul_(0.1)  # all under the threshold
    pruned = prune(model, threshold=0.03, progress=False).model
    assert int(pruned[2].weight.count_nonzero()) == 0 and int(pruned[0].weight.count_nonzero())
    data = [(torch.rand(16, 64), torch.randint(0, 10, (16,))) for _ in range(4)]
    q = strip_qat(quantize_qat(pruned, data, epochs=1, lr=1e-2, progress=False))
    assert int(q[2].weight.count_nonzero()) == 0


def test_qat_calibrates_a_model_that_takes_keyword_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, a, b):
            return self.fc(a + b)

    batches = [{"x": {"a": torch.rand(4, 8), "b": torch.rand(4, 8)}}]  # no labels
    q = quantize_qat(TwoInputs(), None, calib_data=batches, epochs=0, progress=False)
    assert q(torch.rand(2, 8), torch.rand(2, 8)).shape == (2, 3)
