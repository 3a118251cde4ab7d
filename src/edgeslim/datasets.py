"""Real evaluation and calibration data that ships with installed packages: nothing is downloaded.

Images: crops of the natural photos bundled inside the scikit-image wheel (``skimage.data``),
for the ImageNet model (efficientnet-lite0). Text: English sentences of the Python reference
manual bundled with CPython (``pydoc_data.topics``), for the sentence-embedding model
(minilm-l6).

Both come in two disjoint splits, ``"calibration"`` (for post-training quantization ranges)
and ``"evaluation"`` (for measuring accuracy/fidelity): photo crops of the two splits are cut
from non-overlapping halves of each photo, and each sentence belongs to exactly one split.

>>> from edgeslim.datasets import english_sentences, photo_crops
>>> photo_crops(4, split="evaluation").shape
(4, 3, 224, 224)
>>> len(english_sentences(10, split="calibration"))
10
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from edgeslim._validate import check_choice, check_int_range
from edgeslim.errors import ConfigError, MissingDependencyError

__all__ = [
    "GRAY_PHOTOS",
    "RGB_PHOTOS",
    "SPLITS",
    "english_sentences",
    "load_photo",
    "normalize_images",
    "photo_crops",
    "photo_crops_uint8",
    "photo_names",
]

SPLITS = ("calibration", "evaluation")

#: Colour photographs bundled in the scikit-image wheel (no pooch download needed).
RGB_PHOTOS: tuple[str, ...] = (
    "chelsea",
    "astronaut",
    "coffee",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
)
#: Grayscale photographs bundled in the wheel; used as 3 equal channels.
GRAY_PHOTOS: tuple[str, ...] = ("camera", "coins", "moon", "brick", "grass", "gravel")

_MEAN = 0.5
_STD = 0.5


def photo_names(*, include_gray: bool = True) -> tuple[str, ...]:
    """Names of the bundled photos ``photo_crops`` draws from, in a fixed order."""
    return RGB_PHOTOS + (GRAY_PHOTOS if include_gray else ())


@lru_cache(maxsize=32)
def load_photo(name: str) -> np.ndarray:
    """One bundled photo as uint8 (H, W, 3) RGB. Grayscale photos get 3 equal channels."""
    check_choice(name, "name", "load_photo", photo_names())
    try:
        import skimage.data as skdata
        import skimage.io as skio
    except ImportError as exc:  # pragma: no cover - models extra missing
        raise MissingDependencyError(
            "Photo data needs the Python package 'scikit-image', which is not installed. "
            "Install it with: pip install 'edgeslim[models]'"
        ) from exc
    if name.startswith("motorcycle_"):  # no loader function of its own, file is in the wheel
        from pathlib import Path

        image = skio.imread(Path(skdata.__file__).parent / f"{name}.png")
    else:
        image = getattr(skdata, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = image[:, :, :3]
    if image.dtype != np.uint8:
        raise ConfigError(f"The photo {name!r} is {image.dtype}, expected uint8.")
    image.setflags(write=False)
    return image


def _split_region(image: np.ndarray, split: str) -> np.ndarray:
    """The first (calibration) or second (evaluation) half of ``image`` along its longer side."""
    h, w = image.shape[:2]
    if w >= h:
        half = w // 2
        return image[:, :half] if split == "calibration" else image[:, half:]
    half = h // 2
    return image[:half] if split == "calibration" else image[half:]


def _random_resized_crop(region: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A crop covering 20-100% of ``region``'s area, aspect 3/4-4/3, random flip, resized."""
    from PIL import Image

    h, w = region.shape[:2]
    area = h * w
    for _ in range(20):
        target = area * rng.uniform(0.20, 1.0)
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw = round(np.sqrt(target * aspect))
        ch = round(np.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:  # fall back to the largest centred square
        cw = ch = min(h, w)
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    crop = region[top : top + ch, left : left + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    pil = Image.fromarray(np.ascontiguousarray(crop))
    return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def photo_crops_uint8(
    n: int = 64,
    *,
    size: int = 224,
    seed: int = 0,
    split: str = "calibration",
    include_gray: bool = True,
) -> np.ndarray:
    """``n`` random-resized, randomly flipped crops of the bundled photos: uint8 (n, size, size, 3).

    Crop ``i`` comes from photo ``i % P`` (P photos, see ``photo_names``), so every photo is
    used evenly. ``split`` picks the half of each photo the crops are cut from; the two
    splits never share a pixel. The same arguments give the same crops.
    """
    func = "photo_crops"
    check_int_range(n, "n", func, 1, 100_000)
    check_int_range(size, "size", func, 8, 4096)
    check_int_range(seed, "seed", func, 0, 2**32 - 1)
    check_choice(split, "split", func, SPLITS)
    names = photo_names(include_gray=include_gray)
    # One stream per split so the calibration and evaluation crops differ even for one seed.
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        region = _split_region(load_photo(names[i % len(names)]), split)
        out[i] = _random_resized_crop(region, size, rng)
    return out


def normalize_images(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB -> float32 (N, 3, H, W) with ``(x / 255 - 0.5) / 0.5``."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(
            "normalize_images expects uint8 images of shape (N, H, W, 3). "
            f"Got {images.dtype} of shape {images.shape} instead."
        )
    x = images.astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(_MEAN)) / np.float32(_STD)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def photo_crops(
    n: int = 64,
    *,
    size: int = 224,
    seed: int = 0,
    split: str = "calibration",
    include_gray: bool = True,
) -> np.ndarray:
    """``photo_crops_uint8(...)`` normalised for efficientnet-lite0: float32 (n, 3, size, size).

    Values lie in [-1, 1] (mean = std = 0.5 on [0, 1] pixels).
    """
    return normalize_images(
        photo_crops_uint8(n, size=size, seed=seed, split=split, include_gray=include_gray)
    )


# --- sentences --------------------------------------------------------------------------

_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "Mr.", "Dr.", "No.")
_PLACEHOLDER = "\x00"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"“(]?[A-Z])")
_CODEISH = re.compile(r"[=<>{}\[\]|\\#@$^~`]|\.\.\.|::|->|__|\w\.\w+\(|\(\)")
_UNDERLINE = re.compile(r"^\s*([*=\-~^\"'+])\1{2,}\s*$")
_LIST_MARKER = re.compile(r"^(\d+\.|[*\-•])\s+")
_MIN_WORDS, _MAX_WORDS = 6, 40


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs of one topic, each joined onto one line; headings and code dropped."""
    lines = text.splitlines()
    keep: list[str] = []
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if _UNDERLINE.match(line) or _UNDERLINE.match(nxt):
            keep.append("")  # a heading or its underline ends the paragraph
            continue
        keep.append(line)
    paragraphs: list[str] = []
    block: list[str] = []
    for line in [*keep, ""]:
        if line.strip():
            block.append(line)
            continue
        if block:
            indent = len(block[0]) - len(block[0].lstrip())
            # Code and grammar blocks are indented deeper than the prose around them.
            if indent < 6 and not any(">>>" in b or "::=" in b for b in block):
                paragraphs.append(_LIST_MARKER.sub("", " ".join(b.strip() for b in block)))
            block = []
    return paragraphs


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not _MIN_WORDS <= len(words) <= _MAX_WORDS:
        return False
    if not sentence[0].isupper() or sentence[-1] not in ".?!":
        return False
    if _CODEISH.search(sentence):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in sentence)
    if letters < 0.9 * len(sentence):
        return False
    quoted = sentence.count('"')
    return quoted <= 4 and quoted % 2 == 0


@lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    seen: set[str] = set()
    out: list[str] = []
    for key in sorted(topics):
        for para in _paragraphs(topics[key]):
            protected = para
            for abbr in _ABBREVIATIONS:
                protected = protected.replace(abbr, abbr.replace(".", _PLACEHOLDER))
            for raw in _SENTENCE_END.split(protected):
                sentence = " ".join(raw.replace(_PLACEHOLDER, ".").split())
                if sentence and _is_prose(sentence) and sentence.lower() not in seen:
                    seen.add(sentence.lower())
                    out.append(sentence)
    return tuple(out)


@lru_cache(maxsize=1)
def _sentence_splits() -> dict[str, tuple[str, ...]]:
    sentences = _all_sentences()
    order = np.random.default_rng(0).permutation(len(sentences))
    cut = len(sentences) // 4
    return {
        "calibration": tuple(sentences[i] for i in order[:cut]),
        "evaluation": tuple(sentences[i] for i in order[cut:]),
        "all": sentences,
    }


def english_sentences(n: int | None = None, *, split: str = "all") -> list[str]:
    """Real English sentences from the Python reference manual bundled with CPython.

    Sentences are plain prose of 6-40 words (code, grammar rules and symbol-heavy lines are
    dropped), deduplicated case-insensitively, in a fixed order. ``split`` is ``"all"``,
    ``"calibration"`` (a fixed quarter) or ``"evaluation"`` (the other three quarters); the
    two never share a sentence. ``n`` takes the first ``n`` of the split (all when None).
    The text depends on the Python version (each release updates its manual).
    """
    func = "english_sentences"
    check_choice(split, "split", func, ("all", *SPLITS))
    pool = _sentence_splits()[split]
    if n is None:
        return list(pool)
    check_int_range(n, "n", func, 1, len(pool))
    return list(pool[:n])
