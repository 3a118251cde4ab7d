"""The controller's registry: nodes, bundles, deployments and telemetry in SQLite (WAL).

One connection, used under a lock by the controller's threads (ingest, rollout, HTTP); WAL
lets outside readers (``sqlite3 registry.db``, tests) look while it writes. Writes from the
broker are batched: ``ingest`` applies many messages in one transaction, so one fsync covers a
burst of heartbeats from thousands of nodes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeslim.fleet.protocol import Record, Status

__all__ = ["DeploymentRow", "NodeRow", "Registry", "TargetRow"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    labels TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL DEFAULT 'unknown',
    health TEXT NOT NULL DEFAULT 'down',
    model_name TEXT, model_version TEXT, model_sha TEXT, bundle_sha TEXT,
    http TEXT NOT NULL DEFAULT '',
    queue INTEGER NOT NULL DEFAULT 0,
    stats TEXT NOT NULL DEFAULT '{}',
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS bundles (
    sha256 TEXT PRIMARY KEY,
    name TEXT NOT NULL, version TEXT NOT NULL,
    size INTEGER NOT NULL,
    verified INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    added REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deployments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    bundle_sha TEXT NOT NULL,
    selector TEXT NOT NULL DEFAULT '{}',
    canary REAL NOT NULL,
    params TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS targets (
    deployment INTEGER NOT NULL,
    node TEXT NOT NULL,
    phase TEXT NOT NULL,             -- canary | rest
    previous_sha TEXT,               -- what the node served before (rollback target)
    state TEXT NOT NULL,             -- pending | sent | installed | failed | rolled_back |
                                     -- reverted | skipped (never sent; deployment rolled back)
    detail TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL,
    PRIMARY KEY (deployment, node)
);
CREATE TABLE IF NOT EXISTS records (
    node TEXT NOT NULL,
    id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    ts REAL NOT NULL,
    body TEXT NOT NULL,
    received REAL NOT NULL,
    PRIMARY KEY (node, id)
);
CREATE INDEX IF NOT EXISTS records_by_kind ON records (kind, node, ts);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass
class NodeRow:
    """A node as the registry knows it (``last_seen`` in Unix seconds)."""

    id: str
    labels: dict[str, str]
    state: str
    health: str
    model_name: str | None
    model_version: str | None
    model_sha: str | None
    bundle_sha: str | None
    http: str
    queue: int
    stats: dict[str, Any]
    first_seen: float
    last_seen: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TargetRow:
    deployment: int
    node: str
    phase: str
    previous_sha: str | None
    state: str
    detail: str
    updated: float


@dataclass
class DeploymentRow:
    id: int
    bundle_sha: str
    selector: dict[str, str]
    canary: float
    params: dict[str, Any]
    state: str
    reason: str
    created: float
    finished: float | None
    targets: list[TargetRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["targets"] = [t.__dict__ for t in self.targets]
        return d


class Registry:
    """SQLite registry; every method is one transaction, safe to call from any thread."""

    def __init__(self, path: str | Path) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a record is acked to its node only after this commit, and the node then deletes
        # it, so the commit must survive a power cut too (one fsync per ingest batch).
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT) under the registry lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (a full disk, an I/O error): a ROLLBACK
                # then raises "no transaction is active" over the real error. A COMMIT that
                # failed and left the transaction open is rolled back here too.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ nodes
    @staticmethod
    def upsert_status(db: sqlite3.Connection, status: Status, now: float) -> None:
        """Record a node's status (call inside ``tx()``)."""
        m = status.model
        db.execute(
            """INSERT INTO nodes (id, labels, state, health, model_name, model_version, model_sha,
                                  bundle_sha, http, queue, first_seen, last_seen)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(id) DO UPDATE SET
                 labels=excluded.labels, state=excluded.state, health=excluded.health,
                 model_name=excluded.model_name, model_version=excluded.model_version,
                 model_sha=excluded.model_sha, bundle_sha=excluded.bundle_sha,
                 http=excluded.http, queue=excluded.queue, last_seen=excluded.last_seen""",
            (
                status.id,
                json.dumps(status.labels, sort_keys=True),
                status.state,
                status.health,
                m.name if m else None,
                m.version if m else None,
                m.sha256 if m else None,
                m.bundle if m else None,
                status.http,
                status.queue,
                now,
                now,
            ),
        )

    @staticmethod
    def mark_offline(db: sqlite3.Connection, node: str) -> None:
        """The node's last will (or a clean goodbye): keep what it served, flag it offline."""
        db.execute("UPDATE nodes SET state='offline', queue=0 WHERE id=?", (node,))

    @staticmethod
    def touch(db: sqlite3.Connection, node: str, now: float, stats: dict[str, Any] | None) -> None:
        if stats is None:
            db.execute("UPDATE nodes SET last_seen=? WHERE id=?", (now, node))
        else:
            db.execute(
                "UPDATE nodes SET last_seen=?, stats=? WHERE id=?", (now, json.dumps(stats), node)
            )

    @staticmethod
    def insert_records(db: sqlite3.Connection, node: str, records: list[Record], now: float) -> int:
        """INSERT OR IGNORE by (node, id); returns how many were new."""
        before = db.total_changes
        db.executemany(
            "INSERT OR IGNORE INTO records (node, id, seq, kind, ts, body, received) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (node, r.id, r.seq, r.kind, r.ts, json.dumps(r.body, separators=(",", ":")), now)
                for r in records
            ],
        )
        new = db.total_changes - before
        dups = len(records) - new
        if dups:
            db.execute(
                "INSERT INTO counters (name, value) VALUES ('duplicate_records', ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (dups,),
            )
        return new

    def nodes(self, selector: dict[str, str] | None = None) -> list[NodeRow]:
        rows = self._query(
            "SELECT id, labels, state, health, model_name, model_version, model_sha, bundle_sha, "
            "http, queue, stats, first_seen, last_seen FROM nodes ORDER BY id"
        )
        out = []
        for r in rows:
            node = NodeRow(
                id=r[0], labels=json.loads(r[1]), state=r[2], health=r[3], model_name=r[4],
                model_version=r[5], model_sha=r[6], bundle_sha=r[7], http=r[8], queue=r[9],
                stats=json.loads(r[10]), first_seen=r[11], last_seen=r[12],
            )  # fmt: skip
            if selector and any(node.labels.get(k) != v for k, v in selector.items()):
                continue
            out.append(node)
        return out

    def node(self, node_id: str) -> NodeRow | None:
        for n in self.nodes():
            if n.id == node_id:
                return n
        return None

    # ------------------------------------------------------------------ bundles
    def add_bundle(
        self, sha: str, name: str, version: str, size: int, verified: bool, manifest: dict[str, Any]
    ) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO bundles (sha256, name, version, size, verified, manifest, "
                "added) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (sha, name, version, size, int(verified), json.dumps(manifest), time.time()),
            )

    def bundle(self, sha: str) -> dict[str, Any] | None:
        rows = self._query(
            "SELECT sha256, name, version, size, verified, added FROM bundles WHERE sha256=?", [sha]
        )
        if not rows:
            return None
        s, n, v, size, ver, added = rows[0]
        return {"sha256": s, "name": n, "version": v, "size": size, "verified": bool(ver),
                "added": added}  # fmt: skip

    def bundles(self) -> list[dict[str, Any]]:
        shas = [r[0] for r in self._query("SELECT sha256 FROM bundles ORDER BY added")]
        return [b for b in (self.bundle(s) for s in shas) if b is not None]

    # ------------------------------------------------------------------ deployments
    def create_deployment(
        self,
        bundle_sha: str,
        selector: dict[str, str],
        canary: float,
        params: dict[str, Any],
        targets: list[tuple[str, str, str | None]],
    ) -> int:
        """Insert a deployment and its ``(node, phase, previous_sha)`` targets; returns its id."""
        now = time.time()
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO deployments (bundle_sha, selector, canary, params, state, created) "
                "VALUES (?, ?, ?, ?, 'pending', ?)",
                (bundle_sha, json.dumps(selector), canary, json.dumps(params), now),
            )
            dep = int(cur.lastrowid or 0)
            db.executemany(
                "INSERT INTO targets (deployment, node, phase, previous_sha, state, updated) "
                "VALUES (?, ?, ?, ?, 'pending', ?)",
                [(dep, n, ph, prev, now) for n, ph, prev in targets],
            )
        return dep

    def set_deployment_state(self, dep: int, state: str, reason: str = "") -> None:
        finished = time.time() if state in ("succeeded", "rolled_back", "failed") else None
        with self.tx() as db:
            db.execute(
                "UPDATE deployments SET state=?, reason=?, finished=? WHERE id=?",
                (state, reason, finished, dep),
            )

    def set_targets(
        self,
        dep: int,
        nodes: Iterable[str],
        state: str,
        detail: str = "",
        *,
        only_from: tuple[str, ...] | None = None,
    ) -> None:
        """Set targets' state; with ``only_from``, only those currently in one of those states
        (so a report that raced ahead is never overwritten)."""
        now = time.time()
        sql = "UPDATE targets SET state=?, detail=?, updated=? WHERE deployment=? AND node=?"
        if only_from:
            sql += f" AND state IN ({','.join('?' * len(only_from))})"
        with self.tx() as db:
            db.executemany(sql, [(state, detail, now, dep, n, *(only_from or ())) for n in nodes])

    @staticmethod
    def report_target(
        db: sqlite3.Connection, dep: int, node: str, state: str, detail: str, now: float
    ) -> None:
        """Apply a node's deployment report (inside ``tx()``); a rolled-back target stays so."""
        db.execute(
            "UPDATE targets SET state=?, detail=?, updated=? "
            "WHERE deployment=? AND node=? AND state NOT IN ('rolled_back', 'reverted')",
            (state, detail, now, dep, node),
        )

    def deployment(self, dep: int) -> DeploymentRow | None:
        rows = self._query(
            "SELECT id, bundle_sha, selector, canary, params, state, reason, created, finished "
            "FROM deployments WHERE id=?",
            [dep],
        )
        if not rows:
            return None
        r = rows[0]
        d = DeploymentRow(
            id=r[0], bundle_sha=r[1], selector=json.loads(r[2]), canary=r[3],
            params=json.loads(r[4]), state=r[5], reason=r[6], created=r[7], finished=r[8],
        )  # fmt: skip
        d.targets = [
            TargetRow(*t)
            for t in self._query(
                "SELECT deployment, node, phase, previous_sha, state, detail, updated FROM targets "
                "WHERE deployment=? ORDER BY node",
                [dep],
            )
        ]
        return d

    def deployments(self, limit: int = 50) -> list[DeploymentRow]:
        ids = [
            r[0]
            for r in self._query("SELECT id FROM deployments ORDER BY id DESC LIMIT ?", [limit])
        ]
        return [d for d in (self.deployment(i) for i in ids) if d is not None]

    def latest_desired(self) -> dict[str, tuple[int, str | None, bool]]:
        """Per node, the (deployment, sha, rollback) it should serve now, from the history.

        A target in state ``rolled_back`` or ``reverted`` wants its previous sha (None: no
        bundle at all, the node served none before); others want the deployment's bundle.
        """
        rows = self._query(
            "SELECT t.node, t.deployment, t.state, t.previous_sha, d.bundle_sha FROM targets t "
            "JOIN deployments d ON d.id = t.deployment "
            "WHERE t.state NOT IN ('pending', 'skipped') ORDER BY t.deployment"
        )
        out: dict[str, tuple[int, str | None, bool]] = {}
        for node, dep, state, prev, sha in rows:
            if state in ("rolled_back", "reverted"):
                out[node] = (dep, prev or None, True)
            else:
                out[node] = (dep, sha, False)
        return out

    # ------------------------------------------------------------------ records
    def records(
        self, *, node: str | None = None, kind: str | None = None, since: float = 0.0
    ) -> list[dict[str, Any]]:
        """Stored records in arrival order (rowid) with their bodies decoded."""
        sql = "SELECT node, id, seq, kind, ts, body, received FROM records WHERE received >= ?"
        args: list[Any] = [since]
        if node is not None:
            sql += " AND node=?"
            args.append(node)
        if kind is not None:
            sql += " AND kind=?"
            args.append(kind)
        rows = self._query(sql + " ORDER BY rowid", args)
        return [
            {
                "node": n,
                "id": i,
                "seq": s,
                "kind": k,
                "ts": t,
                "body": json.loads(b),
                "received": rc,
            }
            for n, i, s, k, t, b, rc in rows
        ]

    def prune_records(self, before: float) -> int:
        """Delete records received before ``before`` (Unix seconds); returns how many."""
        with self.tx() as db:
            return int(db.execute("DELETE FROM records WHERE received < ?", (before,)).rowcount)

    def counter(self, name: str) -> int:
        rows = self._query("SELECT value FROM counters WHERE name=?", [name])
        return int(rows[0][0]) if rows else 0
