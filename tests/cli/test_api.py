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
