"""Writing files safely: whole or not at all (a temporary file, fsync, rename), and the reason
in words when a path cannot be written, found before the work that fills it."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: Path, fill: Callable[[BinaryIO], None], *,
                     mode: int | None = None) -> None:
    """Write ``path`` through a temporary file in its folder: ``fill(f)``, fsync, chmod
    ``mode``, rename. Readers never see a half-written file; on any failure the temporary
    file is removed, ``path`` is as it was, and the error (``OSError`` and all) propagates.
    Missing parent folders are created. A ``path`` that is a symbolic link has its target
    replaced (the link stays); ``mode`` None keeps the mode of the file replaced (0o644 for a
    new one). Folders made for ``path`` are removed again when the write fails.
    """
    with staged(path, mode=mode) as tmp, open(tmp, "w+b") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def staged(path: Path, *, mode: int | None = None) -> Iterator[Path]:
    """A temporary file beside ``path`` for writers that need a file name (an exporter, a
    checker): it replaces ``path`` when the block ends without an error and is removed
    otherwise, ``path`` then being as it was. Links, modes and folders as in
    ``write_atomically``."""
    tmp: str | None = None
    made: list[Path] = []
    try:
        if path.is_symlink():
            path = Path(os.path.realpath(path))
        if mode is None:
            try:
                mode = stat.S_IMODE(os.stat(path).st_mode)
            except OSError:
                mode = 0o644
        made = make_folders(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".eslim-", suffix=".tmp")
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        remove_folders(made)
        raise


def make_folders(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; return the folders made, outermost first, for
    ``remove_folders`` to take away when the write they were made for fails (a failed write
    then leaves nothing behind, not even an empty folder). Made all or none."""
    missing = []
    for where in (folder, *folder.parents):
        if where.is_dir():
            break
        missing.append(where)
    made: list[Path] = []
    try:
        for where in reversed(missing):
            try:
                where.mkdir()
            except FileExistsError:
                if not where.is_dir():
                    raise
                continue  # made by someone else meanwhile: not ours to remove
            made.append(where)
    except BaseException:
        remove_folders(made)
        raise
    return made


def remove_folders(made: list[Path]) -> None:
    """Remove the folders ``make_folders`` made, innermost first; one that is no longer empty
    (something else was put there) stays."""
    for where in reversed(made):
        with contextlib.suppress(OSError):
            where.rmdir()


def output_problem(path: Path, *, folder: bool = False) -> str | None:
    """Why ``path`` cannot be written as a file (a folder with ``folder=True``), or None.

    Cheap and side-effect free, for checking an output before the work that fills it: a folder
    where a file goes (or a file where a folder goes), a file among the parent folders, or a
    nearest existing folder that is not writable. What it cannot foresee (a full disk) still
    fails at write time.
    """
    try:
        if folder and path.exists() and not path.is_dir():
            return f"{path} is a file, not a folder"
        if not folder and path.is_dir():
            return f"{path} is a folder, not a file"
        start = path if folder and path.is_dir() else path.parent
        for where in (start, *start.parents):
            if where.exists():
                if not where.is_dir():
                    return f"{where} is a file, not a folder"
                if not os.access(where, os.W_OK | os.X_OK):
                    return f"the folder {where} is not writable (Permission denied)"
                return None
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def write_error_reason(path: Path, exc: OSError) -> str:
    """The reason in words why writing ``path`` failed with ``exc`` (for a one-line error)."""
    return output_problem(path) or exc.strerror or str(exc)
