"""Starting a command as a terminal would, for the tests that press Ctrl-C on it."""

from __future__ import annotations

import signal
from pathlib import Path


def as_from_a_terminal() -> None:
    """``preexec_fn``: SIGINT and SIGTERM at their defaults and not blocked, as a shell at a
    terminal starts a command. A job started in the background of a script (as CI runners
    start jobs) inherits SIGINT ignored, and a test process may run with signals blocked in
    the thread that starts the command: either would hide the Ctrl-C from the command."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def signal_state(pid: int, sig: int = signal.SIGINT) -> str:
    """Whether process ``pid`` blocks, ignores or catches ``sig`` (from /proc), for the
    message of a test whose signal went unanswered."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError as exc:
        return f"no /proc status for {pid}: {exc}"
    masks = {k: int(v, 16) for k, _, v in (ln.partition(":\t") for ln in lines)
             if k in ("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")}
    bit = 1 << (sig - 1)
    return ", ".join(f"{k} {'yes' if m & bit else 'no'}" for k, m in masks.items())
