"""Edge fixtures: bundles built with onnx.helper and a real server on a loopback port."""

from __future__ import annotations

import io

import numpy as np
import pytest

from tests.edge._bundles import embed_onnx, image_onnx, linear_bundle

TOKEN = "edge-test-token"


def _tokenizer_json() -> bytes:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "edge", "node", "model", "fast", "small", "the",
         "is", "a", "runs", "here", "now", "ok"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok.to_str().encode()


@pytest.fixture(scope="session")
def edge_bundles(tmp_path_factory):
    """Paths of the test bundles: linear (dynamic batch), linear1 (batch 1 only), image,
    text and sensor models with pre/postprocessing."""
    from edgeslim.bundle import write_bundle

    d = tmp_path_factory.mktemp("edge-bundles")
    paths = {
        "linear": linear_bundle(d / "linear.eslim"),
        "linear1": linear_bundle(d / "linear1.eslim", name="linear1", batch=1),
        "sensor": linear_bundle(d / "sensor.eslim", name="sensor", preprocessing=[
            {"op": "sensor.impute", "method": "ffill"},
            {"op": "sensor.smooth", "window": 3},
            {"op": "sensor.zscore"},
            {"op": "sensor.window", "size": 64, "stride": 32},
        ], postprocessing=[{"op": "softmax"}, {"op": "topk", "k": 2}]),
    }
    paths["image"] = write_bundle(d / "image.eslim", model_onnx=image_onnx(), manifest={
        "name": "image", "task": "image-classification",
        "inputs": [{"name": "pixels", "dtype": "float32", "shape": ["batch", 3, 16, 16]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 4]}],
        "labels": ["red", "green", "blue", "bright"],
        "preprocessing": [
            {"op": "image.decode"}, {"op": "image.resize", "size": 20},
            {"op": "image.center_crop", "size": 16}, {"op": "image.scale"},
            {"op": "image.normalize", "mean": 0.5, "std": 0.5}, {"op": "image.layout"}],
        "postprocessing": [{"op": "topk", "k": 1}],
    })
    paths["text"] = write_bundle(d / "text.eslim", model_onnx=embed_onnx(), manifest={
        "name": "text", "task": "sentence-embedding",
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                   {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]}],
        "outputs": [{"name": "token_embeddings", "dtype": "float32",
                     "shape": ["batch", "seq", 4]}],
        "preprocessing": [{"op": "text.tokenize", "max_length": 8}],
        "postprocessing": [{"op": "mean_pool"}, {"op": "l2_normalize"}],
    }, extra_files={"tokenizer.json": _tokenizer_json()})
    return paths


@pytest.fixture(scope="module")
def server(edge_bundles):
    """A started EdgeServer with every test bundle, a token and a 1 MiB body limit."""
    from edgeslim.edge.server import EdgeServer

    srv = EdgeServer(list(edge_bundles.values()), token=TOKEN, threads=1, max_body_mb=1.0,
                     batch_window_ms=2.0).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    import httpx

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"},
                      timeout=30) as c:
        yield c


def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
