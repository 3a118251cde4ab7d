"""The ``edgeslim`` command line.

Each verb lives in its own module under ``edgeslim.commands`` and registers itself on the one
typer app; imports of heavy dependencies (torch, onnxruntime) happen inside the commands, so
``edgeslim --help`` and the edge verbs stay fast and torch-free. Errors raised on purpose
(``EdgeslimError``) are printed as one line with no traceback and mapped to exit codes.
"""

from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console

from edgeslim.errors import EdgeslimError

app = typer.Typer(
    name="edgeslim",
    help="Compress neural networks, package them as signed bundles, serve them at the edge.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        from edgeslim import __version__

        typer.echo(f"edgeslim {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Compress neural networks, package them as signed bundles, serve them at the edge."""

# Modules under edgeslim.commands that define ``register(app)``.
COMMAND_MODULES = ["zoo", "compress", "bench", "demo", "bundle", "serve", "fleet", "optimize"]

for _name in COMMAND_MODULES:
    importlib.import_module(f"edgeslim.commands.{_name}").register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning ``EdgeslimError`` into a message and an exit code."""
    try:
        rc = app(args=argv, standalone_mode=False)
    except EdgeslimError as exc:
        from rich.markup import escape

        from edgeslim._text import visible

        # escaped: messages quote shapes and lists in brackets, which are not style tags, and
        # text from elsewhere (a controller's answer, a file name) that could hold ESC codes
        text = escape(visible(str(exc), keep="\n"))
        Console(stderr=True).print(f"[bold red]error:[/] {text}", highlight=False,
                                   soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        Console(stderr=True).print("aborted")
        return 130
    except Exception as exc:
        if _is_usage_error(exc):  # a missing argument, an unknown option, a bad value
            exc.show()  # type: ignore[attr-defined]
            return int(exc.exit_code)  # type: ignore[attr-defined]
        raise
    return rc if isinstance(rc, int) else 0


def _is_usage_error(exc: Exception) -> bool:
    """True for click's usage errors, whether from click itself or from the copy of click
    that typer vendors (typer >= 0.20 raises its own classes, which are not click's)."""
    import click

    if isinstance(exc, click.ClickException):
        return True
    return (isinstance(exc, typer.TyperException) and callable(getattr(exc, "show", None))
            and isinstance(getattr(exc, "exit_code", None), int))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
