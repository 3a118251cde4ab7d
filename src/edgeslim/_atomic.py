"""Writing a file whole or not at all: a temporary file beside it, fsync, then a rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: Path, fill: Callable[[BinaryIO], None], *, mode: int = 0o644) -> None:
    """Write ``path`` through a temporary file in its folder: ``fill(f)``, fsync, chmod
    ``mode``, rename. Readers never see a half-written file; on any failure the temporary
    file is removed, ``path`` is as it was, and the error (``OSError`` and all) propagates.
    Missing parent folders are created.
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w+b") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
