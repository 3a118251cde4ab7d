"""``edgeslim demo``: the digits pipeline end to end (filled in by the recipe work)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd() -> None:
        """Compress the built-in digits model end to end and print a summary."""
        raise typer.Exit(0)
