"""The search's memory: every candidate's result in one SQLite file (WAL), so a run resumes.

A candidate is keyed by the sha256 of (model weights, workload, candidate config, seed, the
measurement settings, search version) (``edgeslim.optimize.space.candidate_key``). A row is written
``running`` before the candidate starts and ``done`` (with its measurements as JSON) or ``failed``
(with the error) when it ends; each start adds one to ``evaluations``, so a test (or a curious user)
can see that a resumed run did not redo finished work. A candidate stopped by Ctrl-C is marked
``interrupted`` (one whose process was killed stays ``running``); either is evaluated again on the
next run, and so is a ``failed`` one, once per run. A candidate's bundle path is kept absolute,
so a store answers the same from any working directory, and a copy of it too. The ``runs``
table records each invocation; ``meta`` holds per-model facts that are worth keeping across
runs (per-layer sensitivity).

The file is opened in WAL mode with ``synchronous=NORMAL``: a reader (the report, a test
polling progress) never blocks the writer, and a kill loses at most the row being written.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeslim.errors import ConfigError

__all__ = ["CandidateRow", "ResultStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS candidates (
    key TEXT PRIMARY KEY,
    model_hash TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    result TEXT,
    error TEXT,
    bundle TEXT,
    evaluations INTEGER NOT NULL DEFAULT 0,
    seconds REAL,
    started REAL,
    finished REAL,
    seq INTEGER
);
CREATE INDEX IF NOT EXISTS candidates_model ON candidates (model_hash, status);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    model_hash TEXT NOT NULL,
    settings TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    outcome TEXT
);
CREATE TABLE IF NOT EXISTS meta (
    model_hash TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (model_hash, name)
);
"""


@dataclass(frozen=True)
class CandidateRow:
    """One stored candidate. ``result`` is the measurement dict of a ``done`` row."""

    key: str
    model_hash: str
    config: dict[str, Any]
    status: str
    result: dict[str, Any] | None
    error: str | None
    bundle: str | None
    evaluations: int
    seconds: float | None
    seq: int | None
    finished: float | None = None  # when it was last finished (time.time())


class ResultStore:
    """SQLite store of candidate results (see the module docstring). Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ConfigError(f"The store path {str(self.path)!r} is a directory; give a file "
                              "path such as RUN_DIR/search.sqlite.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"The store {str(self.path)!r} is not a usable SQLite file "
                              f"({exc}). Give another --store path.") from None

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- candidates ------------------------------------------------------------------------

    def get(self, key: str) -> CandidateRow | None:
        row = self._db.execute(
            "SELECT key, model_hash, config, status, result, error, bundle, evaluations, "
            "seconds, seq, finished FROM candidates WHERE key = ?", (key,)).fetchone()
        return self._row(row) if row else None

    def start(self, key: str, model_hash: str, config: dict[str, Any]) -> None:
        """Mark ``key`` running and count one more evaluation of it."""
        seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM candidates").fetchone()[0]
        self._db.execute(
            "INSERT INTO candidates (key, model_hash, config, status, evaluations, started, seq) "
            "VALUES (?, ?, ?, 'running', 1, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET status='running', evaluations=evaluations+1, "
            "started=excluded.started, error=NULL",
            (key, model_hash, json.dumps(config, sort_keys=True), time.time(), seq))

    def finish(self, key: str, result: dict[str, Any], *, bundle: str | None,
               seconds: float) -> None:
        self._db.execute(
            "UPDATE candidates SET status='done', result=?, bundle=?, seconds=?, finished=? "
            "WHERE key=?", (json.dumps(result, sort_keys=True), self._to_store(bundle), seconds,
                            time.time(), key))

    def fail(self, key: str, error: str, *, seconds: float) -> None:
        self._db.execute(
            "UPDATE candidates SET status='failed', error=?, seconds=?, finished=? WHERE key=?",
            (error, seconds, time.time(), key))

    def interrupted(self, key: str) -> None:
        self._db.execute("UPDATE candidates SET status='interrupted' WHERE key=? AND "
                         "status='running'", (key,))

    def candidates(self, model_hash: str | None = None, *,
                   status: str | None = None) -> list[CandidateRow]:
        """Stored candidates in the order they were first started."""
        sql = ("SELECT key, model_hash, config, status, result, error, bundle, evaluations, "
               "seconds, seq, finished FROM candidates")
        where, args = [], []
        if model_hash is not None:
            where.append("model_hash = ?")
            args.append(model_hash)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [self._row(r) for r in self._db.execute(sql + " ORDER BY seq", args)]

    def model_hashes(self) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT model_hash FROM runs GROUP BY model_hash ORDER BY MAX(id) DESC")]

    # -- bundle paths ----------------------------------------------------------------------

    @staticmethod
    def _to_store(bundle: str | None) -> str | None:
        """``bundle`` as kept in the store: absolute (a path relative to the working directory
        of the run means nothing to a report or a resumed run started elsewhere)."""
        return None if bundle is None else str(Path(bundle).resolve())

    def _from_store(self, stored: str | None) -> str | None:
        """A stored bundle path as a path usable from here. Stores written before paths were
        kept absolute hold paths relative to the working directory of their run
        (``RUN/candidates/KEY.eslim``); those resolve from that directory, and from anywhere
        when the store is in its run's folder (the default), by the file's name."""
        if stored is None or Path(stored).is_absolute() or Path(stored).is_file():
            return stored
        beside = self.path.parent / "candidates" / Path(stored).name
        return str(beside) if beside.is_file() else stored

    def _row(self, r: tuple[Any, ...]) -> CandidateRow:
        key, mh, config, status, result, error, bundle, evaluations, seconds, seq, finished = r
        return CandidateRow(key, mh, json.loads(config), status,
                            json.loads(result) if result else None, error,
                            self._from_store(bundle), int(evaluations), seconds, seq, finished)

    # -- runs and meta ---------------------------------------------------------------------

    def begin_run(self, model: str, model_hash: str, settings: dict[str, Any]) -> int:
        cur = self._db.execute(
            "INSERT INTO runs (model, model_hash, settings, started) VALUES (?, ?, ?, ?)",
            (model, model_hash, json.dumps(settings, sort_keys=True), time.time()))
        return int(cur.lastrowid or 0)

    def end_run(self, run_id: int, outcome: dict[str, Any]) -> None:
        self._db.execute("UPDATE runs SET finished=?, outcome=? WHERE id=?",
                         (time.time(), json.dumps(outcome, sort_keys=True), run_id))

    def runs(self) -> list[dict[str, Any]]:
        out = []
        for rid, model, mh, settings, started, finished, outcome in self._db.execute(
                "SELECT id, model, model_hash, settings, started, finished, outcome FROM runs "
                "ORDER BY id"):
            out.append({"id": rid, "model": model, "model_hash": mh,
                        "settings": json.loads(settings), "started": started,
                        "finished": finished,
                        "outcome": json.loads(outcome) if outcome else None})
        return out

    def set_meta(self, model_hash: str, name: str, value: Any) -> None:
        self._db.execute(
            "INSERT INTO meta (model_hash, name, value) VALUES (?, ?, ?) "
            "ON CONFLICT(model_hash, name) DO UPDATE SET value=excluded.value",
            (model_hash, name, json.dumps(value, sort_keys=True)))

    def get_meta(self, model_hash: str, name: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE model_hash=? AND name=?",
                               (model_hash, name)).fetchone()
        return json.loads(row[0]) if row else None


