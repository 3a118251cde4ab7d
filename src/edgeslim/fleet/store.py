"""A node's bundles on disk: resumable downloads, atomic installs, a ``current`` pointer.

Layout under the node's data directory::

    bundles/SHA.eslim     installed bundles, named by their sha256 (immutable)
    downloads/SHA.part    a download in progress (resumed with HTTP Range after a crash);
                          only the bundle the node wants keeps one
    current               JSON {"sha256", "name", "history": [older good shas]}
    rejected/SHA          why a bundle was refused (so a retained desired state that names
                          it is not downloaded again and again)

Every file that matters is written to a temporary name, fsynced, then ``os.replace``d and
the directory fsynced, so a kill -9 at any instant leaves either the old or the new file,
never half of one. On start, ``recover()`` drops temporary files; ``current`` then names the
last bundle that passed its checks, which the node serves at once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeslim.bundle import Limits
from edgeslim.errors import BundleError
from edgeslim.fleet.protocol import check_sha256

__all__ = ["MAX_BUNDLE_BYTES", "BundleStore", "Cancelled", "NoSpace", "Pointer", "TooLarge",
           "atomic_write"]

log = logging.getLogger("edgeslim.fleet.store")

CHUNK = 64 * 1024
#: bytes a download leaves free on the disk, for the outbox (the node's reports) and pointers
RESERVE = 1 << 20
#: the most a download may bring when its size was not announced: what a bundle reader
#: accepts at most (``edgeslim.bundle.Limits.max_total_bytes``), plus room for the zip's own
#: headers
MAX_BUNDLE_BYTES = Limits().max_total_bytes + (1 << 20)
#: write errors that mean the file cannot grow: a full disk, a quota, a file-size limit
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class Cancelled(BundleError):
    """A download given up because it is no longer wanted (shutdown, or the desired state
    moved on); the partial file stays, for a resume (the node deletes it once it knows that
    the bundle is no longer wanted)."""


class TooLarge(BundleError):
    """The server sent (or announced) more bytes than the bundle may have; the partial file
    is deleted. Retrying the same server cannot help."""


class NoSpace(BundleError):
    """The bundle does not fit on the node's disk (too large for the free space, or the disk
    filled up during the download); the partial file is deleted, so the disk is freed."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves the old content or the new, nothing else."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class Pointer:
    """What ``current`` says: the bundle to serve and the good ones before it (newest first)."""

    sha256: str
    name: str = ""
    history: list[str] = field(default_factory=list)


def _pieces(resp: Any, step: int) -> Any:
    """The body as it arrives, cut into pieces of at most ``step`` bytes. (``iter_bytes(step)``
    would hold bytes back until ``step`` of them came, so a server that drips could keep the
    download from ever seeing its deadline.)"""
    for data in resp.iter_bytes():
        for i in range(0, len(data), step):
            yield data[i:i + step]


class BundleStore:
    """Content-addressed bundle files of one node (see the module docstring for the layout)."""

    def __init__(
        self, root: str | os.PathLike[str], *, keep: int = 3, reserve: int = RESERVE
    ) -> None:
        self.root = Path(root)
        self.bundles = self.root / "bundles"
        self.downloads = self.root / "downloads"
        self.rejected_dir = self.root / "rejected"
        for d in (self.bundles, self.downloads, self.rejected_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.reserve = reserve

    # ------------------------------------------------------------------ recovery
    def recover(self) -> list[Path]:
        """Remove temporary files a crash left behind, and partial downloads of bundles that
        are installed or were refused (never resumed); returns what was removed."""
        removed = []
        for d in (self.root, self.bundles, self.downloads, self.rejected_dir):
            for p in d.glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
        for p in self.downloads.glob("*.part"):
            installed = (self.bundles / f"{p.stem}.eslim").exists()
            if installed or (self.rejected_dir / p.stem).exists():
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
        return removed

    def drop_partials(self, keep: str | None = None) -> list[Path]:
        """Delete every partial download but ``keep``'s (the bundle the node wants now, if
        any): a bundle rolled back or replaced is not resumed, and its bytes would only take
        disk space. Returns what was deleted."""
        removed = []
        for p in self.downloads.glob("*.part"):
            if p.stem != keep:
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
        return removed

    # ------------------------------------------------------------------ pointer
    def current(self) -> Pointer | None:
        path = self.root / "current"
        try:
            data = json.loads(path.read_text())
            return Pointer(
                sha256=check_sha256(data["sha256"]),
                name=str(data.get("name", "")),
                history=[h for h in data.get("history", []) if isinstance(h, str)],
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:  # cannot happen with atomic writes
            log.error("ignoring an unreadable %s: %s", path, exc)
            return None

    def set_current(self, sha: str, name: str) -> Pointer:
        """Point ``current`` at an installed bundle (atomically); older good ones go to history."""
        check_sha256(sha)
        if not self.path(sha).exists():
            raise BundleError(f"Cannot point at bundle {sha[:12]}: it is not installed.")
        old = self.current()
        history: list[str] = []
        if old is not None:
            history = [h for h in [old.sha256, *old.history] if h != sha][: self.keep]
        ptr = Pointer(sha256=sha, name=name, history=history)
        body = {"sha256": sha, "name": name, "history": history, "updated": time.time()}
        atomic_write(self.root / "current", json.dumps(body).encode())
        self.gc()
        return ptr

    def candidates(self) -> list[str]:
        """Installed bundles to try at start, best first: current, then its history."""
        ptr = self.current()
        if ptr is None:
            return []
        return [s for s in [ptr.sha256, *ptr.history] if self.path(s).exists()]

    # ------------------------------------------------------------------ files
    def path(self, sha: str) -> Path:
        return self.bundles / f"{check_sha256(sha)}.eslim"

    def has(self, sha: str) -> bool:
        return self.path(sha).exists()

    def gc(self) -> None:
        """Delete installed bundles that are neither current nor in the kept history."""
        ptr = self.current()
        keep = set([ptr.sha256, *ptr.history]) if ptr else set()
        for p in self.bundles.glob("*.eslim"):
            if p.stem not in keep:
                with contextlib.suppress(OSError):
                    p.unlink()

    def reject(self, sha: str, reason: str) -> None:
        atomic_write(self.rejected_dir / check_sha256(sha), reason.encode()[:2000])
        with contextlib.suppress(OSError):
            (self.downloads / f"{sha}.part").unlink()

    def rejected(self, sha: str) -> str | None:
        try:
            return (self.rejected_dir / check_sha256(sha)).read_text()
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------------ download
    def download(
        self,
        url: str,
        sha: str,
        *,
        client: Any,
        max_rate: float | None = None,
        stop: threading.Event | None = None,
        cancel: Callable[[], bool] | None = None,
        on_progress: Callable[[int, int | None], None] | None = None,
        max_bytes: int | None = None,
        deadline_s: float | None = None,
    ) -> Path:
        """Fetch ``url`` into ``downloads/SHA.part``, resuming with ``Range``; install it.

        ``client`` is an ``httpx.Client``. ``max_rate`` caps bytes per second (constrained
        links). ``stop`` set or ``cancel()`` true, checked on every chunk, raises
        ``Cancelled`` (the partial file is kept). ``max_bytes`` (the announced size of the
        bundle; ``MAX_BUNDLE_BYTES`` when None) bounds the file: a Content-Length that would
        pass it is refused before anything is written, and a server that sends more is cut
        off at once; either way the partial file is deleted and ``TooLarge`` raised.
        ``deadline_s`` bounds the time this call takes (``BundleError``; the partial file is
        kept, for a resume). What is left to download (Content-Length)
        must fit in the free space less ``reserve``, and the disk must not fill up on the
        way, else the partial file is deleted and ``NoSpace`` raised. The finished file must
        hash to ``sha`` or it is deleted and ``BundleError`` raised; a matching file is
        fsynced and moved to ``bundles/SHA.eslim`` atomically.
        """

        def check() -> None:
            if stop is not None and stop.is_set():
                raise Cancelled("download interrupted by shutdown")
            if cancel is not None and cancel():
                raise Cancelled(f"download of {sha[:12]} no longer wanted")

        check_sha256(sha)
        if self.has(sha):
            return self.path(sha)
        limit = MAX_BUNDLE_BYTES if max_bytes is None else int(max_bytes)
        part = self.downloads / f"{sha}.part"
        have = part.stat().st_size if part.exists() else 0
        if have > limit:  # left by a server that sent too much: not worth resuming
            part.unlink(missing_ok=True)
            have = 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        started = time.monotonic()
        got = 0

        def too_large(size: int, how: str) -> TooLarge:
            part.unlink(missing_ok=True)
            bound = "its announced size" if max_bytes is not None else "the bundle size limit"
            return TooLarge(
                f"The server {how} {size} bytes for bundle {sha[:12]}, which has at most "
                f"{limit} ({bound}); the partial file is deleted. Check what serves "
                f"{url.split('?')[0][:200]}."
            )
        with client.stream("GET", url, headers=headers) as resp:
            if resp.status_code == 416:  # we already have every byte (or more): start over
                part.unlink(missing_ok=True)
                raise BundleError(f"The server refused the range {have}- for {sha[:12]}; retrying")
            if resp.status_code == 404:
                raise BundleError(f"The controller has no bundle {sha[:12]} ({url}).")
            if resp.status_code not in (200, 206):
                raise BundleError(f"Downloading {url} failed with HTTP {resp.status_code}.")
            mode = "ab"
            if resp.status_code == 200 and have:  # the server ignored Range: start again
                mode, have = "wb", 0
            total = resp.headers.get("content-length")
            total_size = have + int(total) if total is not None else None
            if total is not None:
                if have + int(total) > limit:  # first: a bad server, not a full disk
                    raise too_large(have + int(total), "announced")
                self._check_space(sha, part, int(total), overwrite=mode == "wb")
            # under a cap, read about a tenth of a second's worth at a time, so the file (and
            # the link) grows smoothly instead of in 64 KiB bursts
            step = CHUNK if not max_rate else int(min(CHUNK, max(1024, max_rate / 10)))
            try:
                with open(part, mode) as f:
                    for chunk in _pieces(resp, step):
                        check()
                        if have + got + len(chunk) > limit:
                            f.close()
                            raise too_large(have + got + len(chunk), "sent at least")
                        if deadline_s is not None and time.monotonic() - started > deadline_s:
                            raise BundleError(
                                f"Downloading bundle {sha[:12]} took over {deadline_s:g} s "
                                f"({have + got} bytes so far); the partial file is kept "
                                "for a resume.")
                        f.write(chunk)
                        got += len(chunk)
                        if on_progress is not None:
                            on_progress(have + got, total_size)
                        if max_rate:
                            ahead = got / max_rate - (time.monotonic() - started)
                            if ahead > 0 and (stop or threading.Event()).wait(ahead):
                                raise Cancelled("download interrupted by shutdown")
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                if exc.errno not in _NO_SPACE:
                    raise
                # Resuming cannot help: the partial file would only keep the disk full, and
                # the node's reports and telemetry with it.
                part.unlink(missing_ok=True)
                raise NoSpace(
                    f"The disk filled up while downloading bundle {sha[:12]} ({have + got} of "
                    f"{total_size if total_size is not None else '?'} bytes; "
                    f"{os.strerror(exc.errno)}); the partial file is deleted. Free space on the "
                    "node or deploy a smaller bundle."
                ) from exc
        digest = hashlib.sha256()
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != sha:
            part.unlink(missing_ok=True)
            raise BundleError(
                f"The downloaded bundle hashes to {digest.hexdigest()[:12]}, not {sha[:12]}: "
                "corrupt in transit or on the controller; refused."
            )
        os.replace(part, self.path(sha))
        _fsync_dir(self.bundles)
        return self.path(sha)

    def _check_space(self, sha: str, part: Path, size: int, *, overwrite: bool) -> None:
        """Raise ``NoSpace`` (deleting the partial file) unless ``size`` more bytes fit."""
        reclaimed = part.stat().st_size if overwrite and part.exists() else 0
        free = shutil.disk_usage(self.downloads).free + reclaimed
        if size + self.reserve <= free:
            return
        part.unlink(missing_ok=True)
        raise NoSpace(
            f"Not enough disk space for bundle {sha[:12]}: {size} bytes to download, {free} "
            f"free in {self.downloads} ({self.reserve} of them kept free for the node's "
            "records). Free space on the node or deploy a smaller bundle."
        )

    def discard_partial(self, sha: str) -> None:
        """Delete the partial download of ``sha``, if any (a download given up)."""
        (self.downloads / f"{check_sha256(sha)}.part").unlink(missing_ok=True)

    def resume_offset(self, sha: str) -> int:
        """Bytes of ``sha`` already downloaded (0 when none)."""
        part = self.downloads / f"{check_sha256(sha)}.part"
        return part.stat().st_size if part.exists() else 0

    def describe(self) -> dict[str, Any]:
        ptr = self.current()
        return {
            "current": ptr.sha256 if ptr else None,
            "history": ptr.history if ptr else [],
            "installed": sorted(p.stem for p in self.bundles.glob("*.eslim")),
            "partial": sorted(p.stem for p in self.downloads.glob("*.part")),
        }
