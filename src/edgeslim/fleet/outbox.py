"""A node's durable outbox (SQLite, WAL) and the forwarder that drains it over MQTT.

Every record a node produces (stats, deployment reports, inference results) is committed here
before anything else happens to it; ``put`` returns only after the commit (``synchronous =
FULL``), so a record that was accepted survives a kill -9 or a power cut. The forwarder sends
the oldest unacknowledged records, one batch in flight at a time, and deletes a record only
when the controller's ack names it - and the controller acks only what it has committed. The
result: nothing is lost, records arrive in ``seq`` order, and a record resent after a lost
ack is recognised by its ``id`` and stored once (the one exception, below: a record larger
than any message the broker takes stays on the node, set aside).

A batch is capped in bytes as well as in records: a broker drops the connection of a client
that sends a packet over its maximum packet size (and paho does not check it), so a batch
over the limit would be resent after every reconnect, forever. A record too large to go
alone is moved to the ``set_aside`` table (kept, counted, logged) instead.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from edgeslim.fleet.protocol import RECORD_KINDS, Batch, Record, encode

__all__ = ["Forwarder", "Outbox"]

log = logging.getLogger("edgeslim.fleet.outbox")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq  INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, even after deletes
    id   TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    ts   REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS set_aside (  -- records too large for any message the broker takes
    seq    INTEGER PRIMARY KEY,
    id     TEXT NOT NULL UNIQUE,
    kind   TEXT NOT NULL,
    ts     REAL NOT NULL,
    body   TEXT NOT NULL,
    reason TEXT NOT NULL
);
"""

#: MQTT's own packet limit: no cap of the node's own unless one is set (AWS IoT Core takes
#: 128 KiB) or the broker names a smaller one in its CONNACK
MAX_MESSAGE_BYTES = 268_435_455


class Outbox:
    """Ordered, durable records with unique ids; thread-safe.

    >>> box = Outbox(":memory:")
    >>> r = box.put("event", {"msg": "hello"})
    >>> [x.seq for x in box.pending(10)] == [r.seq]
    True
    >>> box.ack([r.id]), box.count()
    (1, 0)
    """

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            from edgeslim.errors import ConfigError

            raise ConfigError(
                "The 'synchronous' parameter of Outbox must be one of 'EXTRA', 'FULL', 'NORMAL'. "
                f"Got {synchronous!r} instead."
            )
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(_SCHEMA)
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (no arguments, must not block) after each committed put."""
        self._listeners.append(callback)

    def put(self, kind: str, body: dict[str, Any], *, ts: float | None = None) -> Record:
        """Commit one record and return it (with its ``seq`` and ``id``)."""
        return self.put_many([(kind, body)], ts=ts)[0]

    def put_many(
        self, items: Iterable[tuple[str, dict[str, Any]]], *, ts: float | None = None
    ) -> list[Record]:
        """Commit several records in one transaction (one fsync)."""
        now = time.time() if ts is None else ts
        rows = []
        for kind, body in items:
            if kind not in RECORD_KINDS:
                from edgeslim.errors import ConfigError

                raise ConfigError(
                    f"The 'kind' parameter of Outbox.put must be one of {RECORD_KINDS}. "
                    f"Got {kind!r} instead."
                )
            rows.append(
                (uuid.uuid4().hex, kind, now, json.dumps(body, separators=(",", ":")), body)
            )
        out: list[Record] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for rid, kind, t, text, body in rows:
                    cur = self._db.execute(
                        "INSERT INTO outbox (id, kind, ts, body) VALUES (?, ?, ?, ?)",
                        (rid, kind, t, text),
                    )
                    out.append(
                        Record(id=rid, seq=int(cur.lastrowid or 0), kind=kind, ts=t, body=body)
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        for cb in self._listeners:
            cb()
        return out

    def _rollback(self) -> None:
        """End a failed write transaction, if SQLite has not ended it already: on a full disk
        or an I/O error it rolls back by itself, and a ROLLBACK then would raise "no
        transaction is active" over the real error. Called with the lock held."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def pending(self, limit: int, after_seq: int = 0) -> list[Record]:
        """The oldest ``limit`` records with ``seq > after_seq``, in ``seq`` order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, id, kind, ts, body FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [Record(id=i, seq=s, kind=k, ts=t, body=json.loads(b)) for s, i, k, t, b in rows]

    def ack(self, ids: Iterable[str]) -> int:
        """Delete the records the controller has saved; returns how many were deleted."""
        ids = list(ids)
        if not ids:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                n = 0
                for i in range(0, len(ids), 500):
                    chunk = ids[i : i + 500]
                    marks = ",".join("?" * len(chunk))
                    n += self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks})",
                                          chunk).rowcount
                self._db.execute("COMMIT")
            except BaseException:  # leave no transaction open for the next put
                self._rollback()
                raise
        return n

    def set_aside(self, ids: Iterable[str], reason: str) -> int:
        """Move records out of the queue into the ``set_aside`` table (never sent); how many."""
        ids = list(ids)
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR IGNORE INTO set_aside (seq, id, kind, ts, body, reason) "
                    f"SELECT seq, id, kind, ts, body, ? FROM outbox WHERE id IN ({marks})",
                    [reason, *ids],
                )
                n = self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", ids).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        return int(n)

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def count_set_aside(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM set_aside").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Forwarder:
    """Drains an ``Outbox`` through a publish function, one batch in flight, resending on loss.

    ``publish(topic, payload)`` returns False or None when the link is down; else True, or
    an object whose ``is_published()`` says when the message has left (paho's
    ``MQTTMessageInfo``). The forwarder thread wakes on a new record, on ``on_connected()``,
    on an ack, or every ``tick`` seconds. A batch not acknowledged within ``ack_timeout``
    seconds of leaving, or in flight when the link was lost, is sent again (the controller
    drops the duplicates by id); one still on its way out (a slow uplink) is not: another
    copy would only queue behind it.

    A batch holds at most ``batch`` records and its MQTT packet at most ``max_bytes`` bytes,
    or the broker's own maximum packet size when ``broker_limit()`` knows one (from the
    CONNACK) and it is smaller. A record that does not fit alone is set aside.
    """

    def __init__(
        self,
        outbox: Outbox,
        node_id: str,
        topic: str,
        publish: Callable[[str, bytes], Any],
        *,
        batch: int = 200,
        ack_timeout: float = 5.0,
        tick: float = 0.5,
        max_bytes: int = MAX_MESSAGE_BYTES,
        broker_limit: Callable[[], int | None] | None = None,
    ) -> None:
        self.outbox = outbox
        self.node_id = node_id
        self.topic = topic
        self._publish = publish
        self.batch = batch
        self.max_bytes = max_bytes
        self._broker_limit = broker_limit
        self.set_aside_records = 0  # too large to send: moved out of the queue
        self.ack_timeout = ack_timeout
        self.tick = tick
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._inflight: set[str] = set()
        self._acked: list[str] = []
        self._sent_at = 0.0  # when the batch in flight left (the ack timeout runs from it)
        self._leaving: Any = None  # its message info while it is still being sent
        self._thread: threading.Thread | None = None
        self.sent_batches = 0
        self.resent_batches = 0
        outbox.subscribe(self._wake.set)

    def start(self) -> Forwarder:
        self._thread = threading.Thread(target=self._run, name="outbox-forwarder", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def on_connected(self) -> None:
        """The link came (back) up: whatever was in flight may be lost, send it again."""
        with self._lock:
            self._inflight.clear()
            self._leaving = None
        self._wake.set()

    def on_ack(self, ids: list[str]) -> None:
        """The controller committed these ids (called on the network thread: no disk here;
        the forwarder thread deletes them and frees the window)."""
        with self._lock:
            self._acked.extend(ids)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.tick)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._step()
            except Exception:  # keep forwarding after a transient error (e.g. disk full)
                log.exception("outbox forwarder step failed")

    def _step(self) -> None:
        with self._lock:
            acked, self._acked = self._acked, []
        if acked:
            self.outbox.ack(acked)
            with self._lock:
                self._inflight.difference_update(acked)
        with self._lock:
            if self._inflight and self._leaving is not None:
                if not self._has_left(self._leaving):
                    return  # still going out: resending would only queue another copy
                self._leaving = None
                self._sent_at = time.monotonic()
            if self._inflight and time.monotonic() - self._sent_at < self.ack_timeout:
                return
            resend = bool(self._inflight)
        records, payload = self._fit(self.outbox.pending(self.batch))
        if not records:
            with self._lock:
                self._inflight.clear()
            return
        sent = self._publish(self.topic, payload)
        if sent is None or sent is False:
            with self._lock:
                self._inflight.clear()  # link down: resend when on_connected wakes us
            return
        with self._lock:
            self._inflight = {r.id for r in records}
            self._sent_at = time.monotonic()
            self._leaving = sent if hasattr(sent, "is_published") else None
        self.sent_batches += 1
        self.resent_batches += int(resend)

    @staticmethod
    def _has_left(info: Any) -> bool:
        try:
            return bool(info.is_published())
        except (ValueError, RuntimeError):  # paho gave up on it: the ack timeout decides
            return True

    def payload_limit(self, topic: str | None = None) -> int:
        """The most payload bytes one message on ``topic`` (the batches' by default) may
        carry: the packet limit less the header."""
        limit = self.max_bytes
        broker = self._broker_limit() if self._broker_limit is not None else None
        if broker:
            limit = min(limit, int(broker))
        # fixed header (5), topic (2 + length), packet id (2), properties (a few): 64 covers it
        return limit - len((self.topic if topic is None else topic).encode()) - 64

    def _fit(self, records: list[Record]) -> tuple[list[Record], bytes]:
        """The longest run of ``records`` whose batch fits ``payload_limit()``, and that
        batch encoded; a first record that cannot fit even alone is set aside (and the next
        ones looked at)."""
        while records:
            limit = self.payload_limit()
            payload = encode(Batch(node=self.node_id, records=records))
            if len(payload) <= limit:  # the usual case: all of them, encoded once
                return records, payload
            size = len(encode(Batch(node=self.node_id, records=[])))
            fit: list[Record] = []
            for r in records:
                size += len(encode(r)) + (1 if fit else 0)
                if size > limit:
                    break
                fit.append(r)
            if fit:
                return fit, encode(Batch(node=self.node_id, records=fit))
            big = records[0]
            log.error(
                "outbox record %s (%s, %d bytes) is larger than the %d bytes a message may "
                "carry: set aside, never sent", big.id, big.kind, len(encode(big)), limit,
            )
            self.set_aside_records += self.outbox.set_aside([big.id], f"larger than {limit} bytes")
            records = self.outbox.pending(self.batch)
        return [], b""
