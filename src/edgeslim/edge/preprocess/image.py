"""Image preprocessing: decode JPEG/PNG, resize, center-crop, scale, normalise, layout.

The semantics follow the usual ImageNet-style evaluation transform: ``image.resize`` with an
int resizes the *shorter* side to that size keeping the aspect ratio (the longer side is
truncated to an int, or rounded with ``rounding: "round"``), ``image.center_crop`` takes the
central window (offsets rounded half to even, or floored with ``rounding: "floor"``),
``image.scale`` turns the image into a float32 ``(H, W, C)`` array divided by ``divisor`` (255
by default, so [0, 1], as torchvision's ToTensor), ``image.normalize`` subtracts ``mean`` and
divides by ``std`` per channel and ``image.layout`` moves to ``NCHW`` (or ``NHWC``, ``CHW``,
``HWC``), adding the batch axis for the N layouts.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from edgeslim.edge.preprocess._spec import (
    ARRAY,
    BYTES,
    HWC,
    IMAGE,
    BuildContext,
    OpSpec,
    Param,
    choice,
    int_range,
    number_or_list,
    positive,
    register,
    size_or_pair,
)
from edgeslim.errors import InferenceError

_INTERPOLATION = ("bilinear", "bicubic", "nearest", "box", "lanczos")
_FORMATS = ["JPEG", "PNG"]


def _pil() -> Any:
    from PIL import Image

    return Image


def _decode(params: dict[str, Any], ctx: BuildContext) -> Any:
    Image = _pil()
    mode = params["mode"]
    max_pixels = params["max_pixels"]

    def step(raw: Any) -> Any:
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise InferenceError(
                f"image.decode expects the encoded image bytes (JPEG or PNG); "
                f"got {type(raw).__name__}"
            )
        img = _open(bytes(raw))
        w, h = img.size
        # Pillow's own bound (twice MAX_IMAGE_PIXELS), which Image.open would apply with a
        # warning below it: applied here, since warnings filters are not thread-safe
        bound = Image.MAX_IMAGE_PIXELS
        most = min(max_pixels, 2 * bound) if bound else max_pixels
        if w * h > most:
            raise InferenceError(f"the image is {w}x{h} = {w * h} pixels; at most {most} are "
                                 f"allowed")
        try:
            img.load()
            if img.mode in _WIDE_GREY:
                # 16-bit grey: convert() would clip at 255 (a white image); scale it to 8 bits
                img = Image.fromarray(wide_grey_to_8bit(img), "L")
            return img.convert(mode)
        except Exception as exc:
            raise InferenceError(f"could not decode the image: {exc}") from None

    return step


_WIDE_GREY = ("I", "I;16", "I;16B", "I;16L")

#: Pixels converted at a time by ``wide_grey_to_8bit``: its temporaries stay near a megabyte
#: whatever the image's size (a 77 kB PNG can hold 40 million 16-bit pixels).
GREY_BAND_PIXELS = 1 << 18


def wide_grey_to_8bit(img: Any) -> np.ndarray:
    """The top 8 of 16 bits of a loaded 16-bit (or 32-bit ``"I"``) grey image, as a uint8
    ``(H, W)`` array: ``clip(v, 0, 65535) >> 8``.

    Converted a band of rows at a time in the image's own dtype (uint16, or int32 for mode
    ``"I"``), so the only full-size array is the 8-bit result.
    """
    w, h = img.size
    out = np.empty((h, w), dtype=np.uint8)
    rows = max(1, GREY_BAND_PIXELS // max(w, 1))
    for top in range(0, h, rows):
        bottom = min(h, top + rows)
        band = np.asarray(img.crop((0, top, w, bottom)))
        if band.dtype.kind == "i":  # mode "I" (int32) may hold values outside 16 bits
            band = np.clip(band, 0, 65535)
        np.right_shift(band, 8, out=out[top:bottom], casting="unsafe")
    return out


def _open(raw: bytes) -> Any:
    """``raw`` opened as a JPEG or PNG (header only) by the format's own Pillow plugin, as
    ``Image.open`` does but without its size check (``_decode`` applies it)."""
    from PIL import JpegImagePlugin, PngImagePlugin  # noqa: F401  (they register the formats)

    Image = _pil()
    for fmt in _FORMATS:
        factory, accept = Image.OPEN[fmt]
        if accept is not None and not accept(raw[:16]):
            continue
        try:
            return factory(io.BytesIO(raw), "")
        except Exception:  # SyntaxError and kin: not this format after all
            continue
    raise InferenceError(_not_an_image(raw))


def _not_an_image(raw: bytes) -> str:
    """Why ``raw`` is refused, naming what it is when Pillow knows the format."""
    if not raw:
        return "the body is empty; send the bytes of a JPEG or PNG image"
    try:
        fmt = _pil().open(io.BytesIO(raw)).format
    except Exception:
        fmt = None
    if fmt:
        return f"the body is a {fmt} image; this model takes JPEG or PNG"
    return (f"the body is not a JPEG or PNG image ({len(raw)} bytes starting with "
            f"{raw[:8]!r}); send the bytes of a JPEG or PNG image")


def _resample(name: str) -> Any:
    R = _pil().Resampling
    return {
        "bilinear": R.BILINEAR,
        "bicubic": R.BICUBIC,
        "nearest": R.NEAREST,
        "box": R.BOX,
        "lanczos": R.LANCZOS,
    }[name]


def resize_shape(
    h: int, w: int, size: int | tuple[int, int], rounding: str = "floor"
) -> tuple[int, int]:
    """Target ``(height, width)``: an int sets the shorter side, a pair is exact.

    The longer side is ``size * long / short`` truncated (``"floor"``, as torchvision) or
    rounded (``"round"``).
    """
    if isinstance(size, tuple):
        return size
    if rounding == "floor":  # torchvision: int(size * long / short)
        if h <= w:
            return size, max(size, int(size * w / h))
        return max(size, int(size * h / w)), size
    # round(long * (size / short)), as edgeslim.zoo.efficientnet.preprocess_image computes it
    if h <= w:
        return size, max(size, round(w * (size / h)))
    return max(size, round(h * (size / w))), size


#: The most pixels a resize may produce: a thin image (1 x 25,000) resized to a shorter side
#: of 224 would otherwise take gigabytes.
MAX_RESIZED_PIXELS = 40_000_000


def _resize(params: dict[str, Any], ctx: BuildContext) -> Any:
    size, rounding = params["size"], params["rounding"]
    resample = _resample(params["interpolation"])

    def step(img: Any) -> Any:
        w, h = img.size
        nh, nw = resize_shape(h, w, size, rounding)
        if (nh, nw) == (h, w):
            return img
        if nh * nw > MAX_RESIZED_PIXELS:
            raise InferenceError(
                f"resizing the {w}x{h} image gives {nw}x{nh} = {nw * nh} pixels; at most "
                f"{MAX_RESIZED_PIXELS} are allowed (its sides are too far apart)")
        return img.resize((nw, nh), resample=resample)

    return step


def crop_box(
    h: int, w: int, size: int | tuple[int, int], rounding: str = "round"
) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of the central crop.

    Offsets are ``(h - ch) / 2`` rounded half to even (``"round"``, as torchvision) or floored
    (``"floor"``).
    """
    ch, cw = (size, size) if isinstance(size, int) else size
    if ch > h or cw > w:
        raise InferenceError(
            f"image.center_crop of {ch}x{cw} does not fit in a {h}x{w} image; "
            f"resize it first (image.resize with size >= {max(ch, cw)})"
        )
    if rounding == "floor":
        return (h - ch) // 2, (w - cw) // 2, ch, cw
    return round((h - ch) / 2.0), round((w - cw) / 2.0), ch, cw


def _center_crop(params: dict[str, Any], ctx: BuildContext) -> Any:
    size, rounding = params["size"], params["rounding"]

    def step(img: Any) -> Any:
        w, h = img.size
        top, left, ch, cw = crop_box(h, w, size, rounding)
        return img.crop((left, top, left + cw, top + ch))

    return step


def _scale(params: dict[str, Any], ctx: BuildContext) -> Any:
    divisor = np.float32(params["divisor"])

    def step(img: Any) -> np.ndarray:
        arr = np.asarray(img, dtype=np.float32)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return arr / divisor

    return step


def _normalize(params: dict[str, Any], ctx: BuildContext) -> Any:
    mean = np.asarray(params["mean"], dtype=np.float32).reshape(-1)
    std = np.asarray(params["std"], dtype=np.float32).reshape(-1)

    def step(arr: np.ndarray) -> np.ndarray:
        c = arr.shape[-1]
        for label, v in (("mean", mean), ("std", std)):
            if v.size not in (1, c):
                raise InferenceError(
                    f"image.normalize has {v.size} '{label}' values but the image has {c} "
                    f"channels; give 1 or {c}"
                )
        return (arr - mean) / std

    return step


_LAYOUTS = {"NCHW": (2, 0, 1), "NHWC": (0, 1, 2), "CHW": (2, 0, 1), "HWC": (0, 1, 2)}


def _layout(params: dict[str, Any], ctx: BuildContext) -> Any:
    layout = params["layout"]
    perm = _LAYOUTS[layout]

    def step(arr: np.ndarray) -> np.ndarray:
        out = np.ascontiguousarray(np.transpose(arr, perm))
        return out[None] if layout.startswith("N") else out

    return step


register(OpSpec(
    "image.decode", "pre", frozenset({BYTES}), IMAGE,
    {
        "mode": Param(choice("RGB", "L"), "RGB", "colour mode after decoding"),
        "max_pixels": Param(int_range(1, 1 << 30), 40_000_000, "refuse larger images"),
    },
    _decode, "decode JPEG/PNG bytes to an image in `mode`",
))
register(OpSpec(
    "image.resize", "pre", frozenset({IMAGE}), IMAGE,
    {
        "size": Param(size_or_pair, doc="shorter side (int) or exact [height, width]"),
        "interpolation": Param(choice(*_INTERPOLATION), "bilinear"),
        "rounding": Param(choice("floor", "round"), "floor", "longer side: truncate or round"),
    },
    _resize, "resize; an int sets the shorter side, keeping the aspect ratio",
))
register(OpSpec(
    "image.center_crop", "pre", frozenset({IMAGE}), IMAGE,
    {
        "size": Param(size_or_pair, doc="crop size (int for square) or [height, width]"),
        "rounding": Param(choice("round", "floor"), "round", "offsets: round or floor"),
    },
    _center_crop, "take the central window",
))
register(OpSpec(
    "image.scale", "pre", frozenset({IMAGE}), HWC,
    {"divisor": Param(positive(), 255.0, "divide pixel values by this")},
    _scale, "to a float32 (H, W, C) array divided by `divisor` (default 255, so [0, 1])",
))
register(OpSpec(
    "image.normalize", "pre", frozenset({HWC}), HWC,
    {
        "mean": Param(number_or_list(), doc="per-channel mean (or one value)"),
        "std": Param(number_or_list(positive_only=True), doc="per-channel std (or one value)"),
    },
    _normalize, "(x - mean) / std per channel",
))
register(OpSpec(
    "image.layout", "pre", frozenset({HWC}), ARRAY,
    {"layout": Param(choice(*_LAYOUTS), "NCHW", "target layout; N adds the batch axis")},
    _layout, "HWC to the model's layout, adding the batch axis for N* layouts",
))
