"""``edgeslim bench BUNDLE [--against original]``."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_cmd(
        bundle: Path = typer.Argument(..., help="the .eslim bundle to measure"),
        threads: int = typer.Option(2, "--threads", help="intra-op threads, pinned"),
        batch: int = typer.Option(64, "--batch", help="batch size for throughput"),
        repeats: int = typer.Option(200, "--repeats", help="batch-1 repetitions per variant"),
        against: str | None = typer.Option(
            None, "--against", help="'original': also run the fp32 original (PyTorch, ORT)"
        ),
        as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    ) -> None:
        """Latency (p50/p90/p99 at batch 1) and throughput at batch N on onnxruntime."""
        from rich.console import Console
        from rich.table import Table

        from edgeslim.benchmark import bench_bundle
        from edgeslim.errors import ConfigError

        if against not in (None, "original"):
            raise ConfigError(f"--against takes 'original'. Got {against!r} instead.")
        rows = bench_bundle(bundle, threads=threads, batch=batch, repeats=repeats,
                            against_original=against == "original")
        if as_json:
            typer.echo(json.dumps([r.to_dict() for r in rows], indent=2))
            return
        base = rows[0]
        table = Table(title=f"{bundle} — {threads} threads, warm runs in rounds")
        for col in ("variant", "p50 ms", "p90 ms", "p99 ms", f"rows/s @ {base.batch}",
                    "bundle speed-up (p50)", "bundle speed-up (throughput)"):
            table.add_column(col, justify="left" if col == "variant" else "right")
        for r in rows:
            table.add_row(r.variant, f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}", f"{r.p99_ms:.3f}",
                          f"{r.throughput:,.0f}", f"{r.p50_ms / base.p50_ms:.2f}x",
                          f"{base.throughput / r.throughput:.2f}x")
        Console().print(table)
