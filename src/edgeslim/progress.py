"""Progress bars for long work (training loops, calibration, searches), on rich."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["progress_bar"]


@contextmanager
def progress_bar(
    desc: str, *, total: int | None, enabled: bool = True
) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n, **fields)``; shows a rich bar on a terminal, nothing when disabled.

    When standard error is not a terminal (CI, pipes) the bar is drawn once at the end rather
    than refreshed, so logs stay readable.
    """
    if not enabled:
        yield lambda n=1, **fields: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as p:
        task = p.add_task(desc, total=total, status="")

        def advance(n: int = 1, **fields: Any) -> None:
            status = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()
            )
            p.update(task, advance=n, status=status)

        yield advance
