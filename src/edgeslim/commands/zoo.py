"""``edgeslim zoo``: list the built-in models."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("zoo")
    def zoo_cmd() -> None:
        """List the zoo models that MODEL arguments accept by name."""
        from rich.console import Console
        from rich.table import Table

        from edgeslim.zoo import ZOO

        table = Table(title="edgeslim zoo")
        for col in ("name", "task", "extra", "summary"):  # wrap, never cut with an ellipsis
            table.add_column(col, overflow="fold", no_wrap=col == "name")
        for entry in ZOO.values():
            table.add_row(entry.name, entry.task, entry.extra, entry.summary)
        Console().print(table)
