"""The flat public API: every exported name resolves, and importing edgeslim stays torch-free."""

from __future__ import annotations

import subprocess
import sys

import edgeslim


def test_every_exported_name_resolves():
    for name in edgeslim.__all__:
        assert getattr(edgeslim, name) is not None, name
    for verb in ("prune", "prune_structured", "distill", "quantize_qat", "minmax_quantize",
                 "compress_model", "load", "load_model"):
        assert callable(getattr(edgeslim, verb)), verb


def test_import_edgeslim_does_not_import_torch():
    code = "import sys, edgeslim, edgeslim.edge; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_run_and_extract_verbs_do_what_load_and_extract_bundle_do(tmp_path, capsys):
    """DESIGN.md: what Python does, the CLI does. edgeslim.load(b).run(x) and
    extract_bundle had no verb."""
    import json as _json

    import numpy as np

    from edgeslim.bundle import generate_keypair, read_bundle
    from edgeslim.cli import main
    from edgeslim.edge.runtime import load
    from edgeslim.pipeline import compress

    key, pub = generate_keypair(tmp_path / "keys")
    bundle = compress("digits-mlp", preset="fp32", out=tmp_path / "m.eslim", sign_key=key,
                      progress=False).bundle
    x = np.random.default_rng(0).random((3, 64)).astype(np.float32)
    want = load(bundle).run(x)["logits"]
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "x.json").write_text(_json.dumps({"input": x.tolist()}))
    capsys.readouterr()
    assert main(["run", str(bundle), str(tmp_path / "x.npy"), "--public-key", str(pub)]) == 0
    got = np.asarray(_json.loads(capsys.readouterr().out)["logits"], np.float32)
    np.testing.assert_array_equal(got, want)
    assert main(["run", str(bundle), str(tmp_path / "x.json"), "-o",
                 str(tmp_path / "y.npz")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "y.npz")["logits"], want)
    assert main(["run", str(bundle), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.txt")]) == 2
    (tmp_path / "b.json").write_text(_json.dumps({"input": [[True] + [0.5] * 63]}))
    assert main(["run", str(bundle), str(tmp_path / "b.json")]) == 2  # true is not 1.0
    assert main(["run", str(bundle), str(tmp_path / "nope.npy")]) == 2
    capsys.readouterr()

    assert main(["extract", str(bundle), str(tmp_path / "out"), "--public-key", str(pub)]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json",
                                                                  "model.onnx", "signature"]
    assert (tmp_path / "out" / "model.onnx").read_bytes() == read_bundle(bundle).model_bytes
    assert main(["extract", str(bundle), str(tmp_path / "out")]) == 2  # exists: refused
