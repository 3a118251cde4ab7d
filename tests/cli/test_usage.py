"""Usage mistakes on the command line: one message and exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgeslim import __version__
from edgeslim.cli import main

MISTAKES = [
    (["serve"], "Missing argument 'bundles'"),
    (["bogus"], "No such command 'bogus'"),
    (["compress", "digits-cnn"], "Missing option '-o' / '--out'"),
    (["inspect", "x.eslim", "--bogus"], "No such option: --bogus"),
    (["serve", "x.eslim", "--max-batch", "abc"], "Invalid value for '--max-batch'"),
    (["fleet", "bogus"], "No such command 'bogus'"),
]


@pytest.mark.parametrize(("argv", "phrase"), MISTAKES)
def test_usage_mistakes_print_one_error_and_exit_2(argv, phrase, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err


def test_version_and_short_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"edgeslim {__version__}"
    assert main(["serve", "-h"]) == 0
    assert "--max-batch" in capsys.readouterr().out


def test_the_installed_command_shows_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "edgeslim.cli", "serve"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "Missing argument 'bundles'" in proc.stderr and "Traceback" not in proc.stderr


def test_error_lines_print_bracketed_text_as_written(tmp_path, capsys):
    """Errors quote values such as shapes and layer pairs in brackets; the terminal printer
    took '[student_layer, teacher_layer]' for a style tag and dropped it."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - distill: {loss: feature}\n")
    assert main(["compress", "digits-mlp", "--recipe", str(recipe), "-o",
                 str(tmp_path / "x.eslim")]) == 2
    err = capsys.readouterr().err
    assert "a list of [student_layer, teacher_layer] pairs, e.g. [[fc1, fc1]]" in err
