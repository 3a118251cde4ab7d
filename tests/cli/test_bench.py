"""edgeslim bench: rows for the bundle and, with --against original, its fp32 original."""

from __future__ import annotations

import json

import pytest

from edgeslim.benchmark import bench_bundle
from edgeslim.cli import main
from edgeslim.errors import ConfigError
from edgeslim.pipeline import compress


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "mlp.eslim"
    return compress("digits-mlp", preset="fp32", out=out, progress=False).bundle


def test_bench_against_original_measures_three_variants(mlp_bundle):
    rows = bench_bundle(mlp_bundle, threads=1, batch=16, repeats=10, against_original=True)
    assert [r.variant.split(" (")[0] for r in rows] == [
        "bundle digits-mlp", "original PyTorch eager", "original onnxruntime fp32"]
    for r in rows:
        assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms
        assert r.throughput > 0 and r.batch == 16


def test_bench_cli_json_and_errors(mlp_bundle, capsys):
    assert main(["bench", str(mlp_bundle), "--repeats", "5", "--batch", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["batch"] == 4
    assert main(["bench", str(mlp_bundle), "--against", "yesterday"]) == 2
    assert "--against takes 'original'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'threads' parameter of bench"):
        bench_bundle(mlp_bundle, threads=0)
