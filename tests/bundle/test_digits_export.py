"""A torch-exported digits CNN through bundle and runner answers as the torch model does."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgeslim.bundle import read_bundle, write_bundle  # noqa: E402
from edgeslim.edge.runtime import load  # noqa: E402


def test_exported_digits_cnn_round_trip(tmp_path, keypair, digits_split):
    from edgeslim.export import export_onnx
    from edgeslim.zoo.digits import DigitsCNN

    torch.manual_seed(0)
    net = DigitsCNN().eval()
    x_test = digits_split.x_test[:7]  # (7, 64) float32 pixels in [0, 1]
    export_onnx(net, torch.from_numpy(x_test[:1]), tmp_path / "cnn.onnx",
                input_names=["input"], output_names=["logits"])
    path = write_bundle(
        tmp_path / "cnn.eslim", model_onnx=tmp_path / "cnn.onnx", compression="lzma",
        sign_key=keypair[0],
        manifest={"name": "digits-cnn", "task": "image-classification",
                  "inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 64]}],
                  "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}],
                  "labels": [str(i) for i in range(10)]})
    b = read_bundle(path, public_key=keypair[1])
    assert b.manifest["model"]["opset"] == 17 and b.verified
    runner = load(path, keypair[1], intra_op_num_threads=1)
    with torch.no_grad():
        expected = net(torch.from_numpy(x_test)).numpy()
    np.testing.assert_allclose(runner.run(x_test)["logits"], expected, rtol=1e-4, atol=1e-4)
