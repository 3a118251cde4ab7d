"""Shared assertion for command-line errors: one line on stderr, no traceback."""

from __future__ import annotations


def one_line_error(capsys, *words: str) -> str:
    """stderr since the last read: a single line holding every one of ``words``."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)
    return err
