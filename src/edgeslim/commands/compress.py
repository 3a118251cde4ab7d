"""``edgeslim compress MODEL [--recipe FILE | --preset NAME] -o OUT.eslim``."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import typer


def register(app: typer.Typer) -> None:
    @app.command("compress")
    def compress_cmd(
        model: str = typer.Argument(
            ..., help="zoo name, path to a .onnx file, or package.module:callable"
        ),
        out: Path = typer.Option(..., "-o", "--out",
                                 help="where to write the .eslim bundle (an existing file is "
                                      "replaced, only once the new bundle is complete)"),
        recipe: Path | None = typer.Option(None, "--recipe", help="recipe YAML file"),
        preset: str | None = typer.Option(
            None, "--preset", help="fp32 | int8 (default) | deep-compression"
        ),
        name: str | None = typer.Option(None, "--name", help="model name in the bundle"),
        version: str | None = typer.Option(
            None, "--model-version", help="model version in the bundle (default 1)"),
        sign_key: Path | None = typer.Option(
            None, "--sign-key", help="Ed25519 private key (edgeslim keygen)"
        ),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    ) -> None:
        """Compress MODEL with a recipe or preset and write a (signed) bundle."""
        from rich.console import Console

        from edgeslim.pipeline import compress
        from edgeslim.recipe import load_recipe
        from edgeslim.recipe.run import render_table

        console = Console()
        rec = load_recipe(recipe) if recipe is not None else None
        previous = _cleanup_on_sigterm()
        try:
            result = compress(model, out=out, recipe=rec, preset=preset, name=name,
                              version=version, sign_key=sign_key, progress=not quiet)
        except BaseException as exc:
            if not interrupted(exc):
                raise
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this
            Console(stderr=True).print(f"interrupted: nothing was written to {out}")
            raise typer.Exit(130) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        metric_name = next(iter(result.onnx_metrics))
        if result.rows:
            console.print(render_table(result.rows, metric_name))
        print_bundle_summary(console, result)


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is a Ctrl-C (or the SIGTERM made one), also when Python wrapped it:
    one that lands while a class body runs ``__set_name__`` (a lazily imported dataclass,
    say) comes out as a RuntimeError caused by the KeyboardInterrupt."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def _cleanup_on_sigterm() -> Any:
    """Make SIGTERM stop the process as Ctrl-C does, through the cleanup code (temporary
    folders, partial files), instead of killing it on the spot; returns the old handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, stop)


def print_bundle_summary(console, result) -> None:  # type: ignore[no-untyped-def]
    """The ONNX-side figures: what the node will run."""
    from rich.table import Table

    m = result.onnx_metrics
    metric_name = next(iter(m))
    table = Table(title=f"bundle {result.bundle}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    if f"original_{metric_name}" in m:
        table.add_row(f"original {metric_name} (torch)", f"{m[f'original_{metric_name}']:.4f}")
    table.add_row(f"{metric_name} on onnxruntime", f"{m[metric_name]:.4f}")
    table.add_row("latency p50, batch 1 (ms)", f"{m['latency_ms_p50_batch1']:.3f}")
    table.add_row("original fp32 model.onnx (bytes)", f"{m['fp32_onnx_bytes']:,}")
    table.add_row("model.onnx (bytes)", f"{m['onnx_bytes']:,}")
    table.add_row(".eslim file (bytes)", f"{m['bundle_bytes']:,}")
    ratio = m["fp32_onnx_bytes"] / m["bundle_bytes"]
    table.add_row("smaller than the original fp32 model.onnx", f"{ratio:.1f}x")
    for entry in result.manifest["compression"]:
        table.add_row(f"step: {entry['step']}", str(entry["params"] or "defaults"))
    console.print(table)
