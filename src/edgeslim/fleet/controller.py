"""The fleet controller: registry, bundle store, rollouts; MQTT to nodes, HTTP to people.

Threads: the MQTT link (network), ``ingest`` (applies broker messages to the registry in
batches, then acks telemetry), one ``Rollout`` per active deployment, and uvicorn serving the
HTTP API (``edgeslim.fleet.api``). The controller holds no state that is not in SQLite: after
a restart it reads the registry and republishes every node's desired state.

>>> c = Controller("mqtt://controller:pw@127.0.0.1:1883", "fleet-data",   # doctest: +SKIP
...                public_key="keys/signing.pub", http_port=8700).start()
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import secrets
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from edgeslim._validate import check_int_range, check_positive
from edgeslim.edge.auth import check_token
from edgeslim.errors import BundleError, ConfigError, SignatureError
from edgeslim.fleet.backoff import Backoff
from edgeslim.fleet.link import MqttLink
from edgeslim.fleet.protocol import (
    CONTROLLER_TOPIC,
    PREFIX,
    Ack,
    BrokerURL,
    Desired,
    ProtocolError,
    Record,
    Result,
    Status,
    check_node_id,
    check_sha256,
    decode,
    encode,
    node_from_topic,
    result_from_topic,
    topic,
)
from edgeslim.fleet.registry import Registry
from edgeslim.fleet.rollout import FINAL_STATES, Rollout, RolloutParams, pick_canaries

__all__ = ["Conflict", "Controller", "NotFound", "version_is_lower"]

log = logging.getLogger("edgeslim.fleet.controller")

# an upload on its way to bundles/SHA.eslim (Controller.upload_path): .ID.PID.tmp, where ID is
# 64 random hex digits (an older controller named it by the sha256)
_UPLOAD_TMP = re.compile(r"\.([0-9a-f]{64})\.([0-9]+)\.tmp")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a signal-0 probe)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):  # not a pid at all
        return False
    return True


def version_is_lower(version: str, than: str | None) -> bool:
    """Whether model ``version`` is clearly lower than ``than``: both read as PEP 440 versions
    (``1``, ``1.10``, ``2.0rc1``, ``v2``; what the manifest's ``version`` strings usually are)
    and ``version`` orders first. Versions that do not read so (``blue``, ``2024-05-01``) have
    no order, so they are never lower."""
    if than is None:
        return False
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) < Version(than)
    except InvalidVersion:
        return False


class NotFound(ConfigError):
    """A bundle, deployment or matching node that does not exist (HTTP 404)."""


class Conflict(ConfigError):
    """The request clashes with the current state, e.g. a deployment is running (HTTP 409)."""


class Controller:
    """Registry + bundle store + rollouts, reachable over MQTT (nodes) and HTTP (operators).

    ``offline_after`` (s): a node silent that long is shown stale and is not targeted.
    ``retention_s`` (s): stored records (telemetry, reports, results) older than this are
    deleted, checked once a minute. ``token``: the HTTP API then requires ``Authorization:
    Bearer TOKEN`` on every request but ``/healthz`` and the bundle downloads nodes make.
    """

    def __init__(
        self,
        broker: str | BrokerURL,
        data_dir: str | os.PathLike[str],
        *,
        public_key: str | os.PathLike[str] | None = None,
        http_host: str = "127.0.0.1",
        http_port: int = 0,
        offline_after: float = 30.0,
        retention_s: float = 7 * 86400.0,
        backoff: Backoff | None = None,
        client_id: str = "edgeslim-controller",
        token: str | None = None,
    ) -> None:
        f = "Controller"
        check_token(token, f)
        check_int_range(http_port, "http_port", f, 0, 65535)
        check_positive(offline_after, "offline_after", f)
        check_positive(retention_s, "retention_s", f)
        if Path(data_dir).exists() and not Path(data_dir).is_dir():
            raise ConfigError(f"The 'data_dir' parameter of {f} must be a folder; "
                              f"{str(data_dir)!r} is a file.")
        self.broker = broker if isinstance(broker, BrokerURL) else BrokerURL.parse(broker)
        self.data = Path(data_dir)
        self.bundles_dir = self.data / "bundles"
        self.bundles_dir.mkdir(parents=True, exist_ok=True)
        self.public_key = None
        if public_key is not None:
            from edgeslim.bundle import load_public_key

            self.public_key = load_public_key(public_key)
        self.offline_after = offline_after
        self.retention_s = retention_s
        self.token = token  # the HTTP API's bearer token (see fleet/api.py); None: no auth
        self.registry = Registry(self.data / "registry.db")
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._rollouts: dict[int, Rollout] = {}
        self._republisher: threading.Thread | None = None
        # held while a rollout is launched, aborted or declared succeeded (see Rollout)
        self.rollout_lock = threading.Lock()
        # held from reading or changing the targets to publishing the desired states they imply,
        # so that a republish (after a reconnect) never lands a state a rollback has undone
        self.desired_lock = threading.RLock()
        self.downloads: deque[tuple[str, str | None]] = deque(maxlen=10_000)  # (sha, Range)
        self.link = MqttLink(
            self.broker,
            client_id,
            subscriptions=[
                (f"{PREFIX}/nodes/+/status", 1),
                (f"{PREFIX}/nodes/+/telemetry", 1),
                (f"{PREFIX}/results/#", 0),
            ],
            on_message=self._on_message,
            on_connected=self._on_connected,
            will=(CONTROLLER_TOPIC, b'{"state":"offline"}', 1, True),
            backoff=backoff,
            name="controller",
        )
        self._ingest = threading.Thread(target=self._ingest_loop, name="ingest", daemon=True)
        from edgeslim.fleet._http import ServerThread
        from edgeslim.fleet.api import build_app

        self.http = ServerThread(build_app(self), http_host, http_port, name="controller-http")
        self.results: deque[dict[str, Any]] = deque(maxlen=1000)  # recent shared results

    @property
    def url(self) -> str:
        return self.http.url

    # ------------------------------------------------------------------ lifecycle
    def start(self, wait: float = 10.0) -> Controller:
        """Start ingest, the HTTP API and the broker link (waiting up to ``wait`` s for it).

        Raises ``ConfigError`` when the broker refuses the controller's credentials or the
        HTTP server does not start; whatever had started is stopped again and the registry
        closed first.
        """
        try:
            self._remove_stale_uploads()  # before the HTTP API takes uploads
            self._ingest.start()
            self.http.start()
            self.link.start(wait=wait)
            # Deployments interrupted by a controller restart are rolled back: the soak they
            # were in cannot be trusted after a gap.
            for dep in self.registry.deployments():
                if dep.state not in FINAL_STATES:
                    self._launch(
                        dep.id, RolloutParams.from_dict(dep.params), abort="controller restarted"
                    )
        except BaseException:
            try:
                self.stop()
            except Exception:  # the error to report is the one that stopped the start
                log.exception("stopping the controller after a failed start failed")
            raise
        return self

    def stop(self) -> None:
        """Stop every thread, then close the registry.

        A running rollout ends at its next wait and writes nothing more: its deployment stays
        as it stood, and the next ``start`` rolls it back. Rollouts and the republisher are
        joined while the link is still up (a desired state they publish reaches the broker)
        and before the registry closes under them.
        """
        with self.rollout_lock:  # a deploy or rollback launched before this is joined below;
            self._stop.set()  # one asked for after it is refused
            rollouts = list(self._rollouts.values())
        self.notify()  # wake the rollouts waiting for a change
        for t in [*rollouts, self._republisher]:
            if t is not None and t.ident is not None:
                t.join(30.0)
                if t.is_alive():
                    log.error("%s did not stop within 30 s", t.name)
        self.link.stop(final=[(CONTROLLER_TOPIC, b'{"state":"offline"}', 1, True)])
        self.http.stop()
        if self._ingest.ident is not None:  # (a start that failed early never started it)
            self._ingest.join(5.0)
        self.registry.close()

    def __enter__(self) -> Controller:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ change notification
    def notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def wait_change(self, timeout: float) -> None:
        """Block until the registry changed (ingest committed) or ``timeout`` seconds passed."""
        with self._changed:
            self._changed.wait(timeout)

    # ------------------------------------------------------------------ MQTT side
    def _on_message(self, name: str, payload: bytes) -> None:
        self._queue.put((name, payload))  # never block the network thread

    def _on_connected(self) -> None:
        self.link.publish(CONTROLLER_TOPIC, encode({"state": "online", "ts": time.time()}),
                          qos=1, retain=True)  # fmt: skip
        # Off the network thread: it reads the registry and publishes one message per node.
        t = threading.Thread(target=self._republish_desired, name="republish", daemon=True)
        # stop joins the newest; an older one still running holds desired_lock, which the
        # newest waits for, so joining the newest waits for every one
        self._republisher = t
        t.start()

    def _republish_desired(self) -> None:
        """The broker may have restarted without its retained messages: publish them again
        (and clear those of nodes a rollback left with no bundle, in case that was lost)."""
        with self.desired_lock:
            if self._stop.is_set():
                return
            for node, (dep, sha, rollback) in self.registry.latest_desired().items():
                if self._stop.is_set():  # the next start republishes them all
                    return
                if sha is None:
                    self.clear_desired(node)
                    continue
                b = self.registry.bundle(sha)
                if b is not None:
                    self.publish_desired(node, dep, sha, b, rollback=rollback)

    def publish_desired(
        self,
        node: str,
        dep: int,
        sha: str,
        bundle: dict[str, Any],
        rollback: bool,
    ) -> bool:
        msg = Desired(
            deployment=dep,
            sha256=sha,
            name=bundle["name"],
            size=bundle["size"],
            rollback=rollback,
            ts=time.time(),
        )
        return self.link.publish(topic("desired", node), encode(msg), qos=1, retain=True)

    def revert_node(self, node: str, dep: int, previous_sha: str | None) -> None:
        """Desired state back to ``previous_sha``; with none, clear the retained desired."""
        if previous_sha:
            b = self.registry.bundle(previous_sha) or {"name": "", "size": 0}
            self.publish_desired(node, dep, previous_sha, b, rollback=True)
        else:
            self.clear_desired(node)

    def clear_desired(self, node: str) -> bool:
        """No desired state for ``node`` (an empty retained message): it keeps what it has."""
        return self.link.publish(topic("desired", node), b"", qos=1, retain=True)

    def _ingest_loop(self) -> None:
        next_prune = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + 60.0
                try:
                    self.registry.prune_records(time.time() - self.retention_s)
                except Exception:
                    log.exception("pruning old records failed")
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < 2000:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._apply(batch)
            except Exception:  # a bad batch is logged; its telemetry is resent and retried
                log.exception("ingest of %d message(s) failed", len(batch))
            self.notify()

    def _apply(self, batch: list[tuple[str, bytes]]) -> None:
        acks: dict[str, list[str]] = {}
        now = time.time()
        with self.registry.tx() as db:
            for name, payload in batch:
                if name.startswith(f"{PREFIX}/results/"):
                    self._apply_result(name, payload)  # never raises: writes nothing to db
                    continue
                parsed = node_from_topic(name)
                if parsed is None or not payload:
                    continue
                node, kind = parsed
                db.execute("SAVEPOINT message")  # a bad message undoes its own writes only
                ids: list[str] = []
                try:
                    data = decode(payload)
                    if kind == "status":
                        st = Status.from_dict(data)
                        if st.id != node:
                            raise ProtocolError(f"status of {st.id!r} on the topic of {node!r}")
                        if st.state == "offline":
                            Registry.mark_offline(db, node)
                        else:
                            Registry.upsert_status(db, st, now)
                    elif kind == "telemetry":
                        ids = self._apply_records(db, node, data, now)
                except (ProtocolError, ConfigError, TypeError, ValueError, KeyError,
                        RecursionError, OverflowError) as exc:
                    # (the others: a field of the wrong type that a parser missed, a body
                    # too deeply nested to store, an integer beyond SQLite's 64 bits)
                    db.execute("ROLLBACK TO message")
                    db.execute("RELEASE message")
                    log.warning("dropped a message on %s: %s", name, exc)
                    continue
                db.execute("RELEASE message")
                if ids:
                    acks.setdefault(node, []).extend(ids)
        # Committed: only now tell the nodes they may forget these records.
        for node, ids in acks.items():
            self.link.publish(topic("ack", node), encode(Ack(ids=ids)), qos=1)

    def _apply_result(self, name: str, payload: bytes) -> None:
        """Keep a shared result that matches its topic (``results/MODEL_SHA/NODE``): the model
        and the node its body names must be the topic's. Anything else is logged and dropped,
        never allowed to undo the rest of the ingest batch.

        The broker's ACL lets a node publish only under its own id (``broker.py``), so on a
        broker set up that way a kept result's ``node`` is its sender. The same result also
        comes through the node's outbox (``nodes/NODE/telemetry``), durably, stored under the
        node that sent it (``_apply_records``): the copy ``GET /records`` returns.
        """
        try:
            parsed = result_from_topic(name)
            if parsed is None:
                raise ProtocolError("not a results topic: results go to "
                                    f"{PREFIX}/results/MODEL_SHA/NODE")
            sha, node = parsed
            result = Result.from_dict(decode(payload))
            if result.model_sha != sha:
                raise ProtocolError(f"a result of model {result.model_sha[:12]} on the topic "
                                    f"of {sha[:12]!r}")
            if result.node != node:
                raise ProtocolError(f"a result naming node {result.node!r} on the topic of "
                                    f"{node!r}")
            self.results.append(result.to_dict())
        except Exception as exc:  # any client the ACL allows may publish here
            log.warning("dropped a message on %.120s: %.300s", name, exc)

    def _apply_records(self, db: Any, node: str, data: dict[str, Any], now: float) -> list[str]:
        check_node_id(node)
        raw = data.get("records")
        if not isinstance(raw, list):
            raise ProtocolError("a telemetry batch needs a 'records' list")
        ids: list[str] = []
        stats = None
        for item in raw:
            rid = item.get("id") if isinstance(item, dict) else None
            try:
                rec = Record.from_dict(item)
            except (ProtocolError, ConfigError, TypeError, ValueError) as exc:
                log.warning("node %s sent a malformed record (acked and dropped): %s", node, exc)
                if isinstance(rid, str):
                    ids.append(rid)  # ack it, or the node would resend it forever
                continue
            ids.append(rec.id)
            if rec.kind == "result" and rec.body.get("node") != node:
                # The topic names the sender (the ACL ties it to the client id); the body's
                # 'node' is only what the sender wrote. Kept, attributed to the sender.
                log.warning("node %s sent a result naming node %.80r; stored as its own",
                            node, rec.body.get("node"))  # fmt: skip
                rec = Record(id=rec.id, seq=rec.seq, kind=rec.kind, ts=rec.ts,
                             body={**rec.body, "node": node})  # fmt: skip
            db.execute("SAVEPOINT record")  # a record SQLite cannot store undoes itself only
            try:
                new = Registry.insert_records(db, node, [rec], now)
                if rec.kind == "report" and new:
                    self._apply_report(db, node, rec.body, now)
            except (OverflowError, ValueError, TypeError, RecursionError) as exc:
                # an integer beyond 64 bits, a body too deeply nested to store: acked (above)
                # and dropped, or the node would resend it forever
                db.execute("ROLLBACK TO record")
                db.execute("RELEASE record")
                log.warning("node %s sent a record that cannot be stored (acked and dropped): "
                            "%s", node, exc)  # fmt: skip
                continue
            db.execute("RELEASE record")
            if rec.kind == "telemetry":
                stats = rec.body
        Registry.touch(db, node, now, stats)
        return ids

    @staticmethod
    def _apply_report(db: Any, node: str, body: dict[str, Any], now: float) -> None:
        dep = body.get("deployment")
        if not isinstance(dep, int):
            return
        outcome = body.get("outcome")
        detail = str(body.get("reason", ""))[:500]
        if body.get("rollback"):
            if outcome in ("installed", "already"):
                db.execute(
                    "UPDATE targets SET state='reverted', detail=?, updated=? "
                    "WHERE deployment=? AND node=? AND state='rolled_back'",
                    (detail or "serving the previous bundle", now, dep, node),
                )
            return
        state = "installed" if outcome in ("installed", "already") else "failed"
        Registry.report_target(db, dep, node, state, detail, now)  # never undoes a rollback

    # ------------------------------------------------------------------ bundles
    def _remove_stale_uploads(self) -> None:
        """Delete the temporary files of uploads a crash cut short (kill -9, power loss during
        ``add_bundle``'s write or fsync): their writer is gone and nothing else removes them.

        A file whose writer is another live process is kept: one data folder belongs to one
        controller (a second one on it would roll back the first one's running deployment
        at its start), but a second one started by mistake must not break an upload in
        progress. This process's own pid marks a file of an earlier process that had it
        (a container's controller is often pid 1 at every start): no upload of this one has
        begun yet.
        """
        removed = 0
        for path in self.bundles_dir.glob(".*.tmp"):
            m = _UPLOAD_TMP.fullmatch(path.name)
            if m is None:
                continue
            pid = int(m.group(2))
            if pid != os.getpid() and _alive(pid):
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
        if removed:
            log.info("removed %d unfinished upload(s) from %s", removed, self.bundles_dir)

    def bundle_path(self, sha: str) -> Path:
        return self.bundles_dir / f"{check_sha256(sha)}.eslim"

    def upload_path(self) -> Path:
        """A new path for an upload on its way into the store: ``bundles/.ID.PID.tmp``, ID
        64 random hex digits (the sha256 is known only once the upload is in), the name the
        sweep at start recognises. ``add_bundle`` takes the file written there."""
        return self.bundles_dir / f".{secrets.token_hex(32)}.{os.getpid()}.tmp"

    def add_bundle(
        self, data: bytes | str | os.PathLike[str], *, force: bool = False
    ) -> dict[str, Any]:
        """Store a bundle under its sha256; verify it against the controller's public key.

        ``data``: the bundle's bytes, or a file written at ``upload_path()`` (the HTTP API
        streams uploads there), which this takes: renamed into the store when accepted,
        deleted when refused. A bundle whose signature does not verify is refused
        (``SignatureError``) unless ``force``: then it is stored unverified, and every node
        will still refuse it.
        """
        if isinstance(data, (bytes, bytearray, memoryview)):
            tmp = self.upload_path()
            try:
                with open(tmp, "xb") as f:
                    f.write(data)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        else:
            tmp = Path(data)
            if tmp.parent != self.bundles_dir or _UPLOAD_TMP.fullmatch(tmp.name) is None:
                raise ConfigError(f"add_bundle takes a bundle's bytes or a file at "
                                  f"Controller.upload_path(). Got {str(tmp)!r} instead.")
        try:
            return self._store(tmp, force)
        finally:  # refused, or the disk failed: nothing is left behind
            tmp.unlink(missing_ok=True)

    def _store(self, tmp: Path, force: bool) -> dict[str, Any]:
        """Hash, fsync and check the upload at ``tmp``, then rename it into the store."""
        from edgeslim.bundle import read_bundle

        digest = hashlib.sha256()
        size = 0
        with open(tmp, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
            os.fsync(f.fileno())  # on disk before the rename makes it a bundle
        sha = digest.hexdigest()
        verified = False
        try:
            try:
                b = read_bundle(tmp, public_key=self.public_key,
                                require_signature=self.public_key is not None)  # fmt: skip
                verified = bool(b.verified)
                manifest, name, version = b.manifest, b.name, b.version
            except SignatureError:
                if not force:
                    raise
                b = read_bundle(tmp)
                manifest, name, version = b.manifest, b.name, b.version
            except BundleError:
                if not force:
                    raise
                manifest, name, version = {}, "unreadable", "?"
        except BundleError as exc:  # (SignatureError too) name the upload, not a scratch file
            raise type(exc)(str(exc).replace(str(tmp), "the upload")) from None
        os.replace(tmp, self.bundle_path(sha))
        self.registry.add_bundle(sha, name, version, size, verified, manifest)
        return {"sha256": sha, "name": name, "version": version, "size": size,
                "verified": verified}  # fmt: skip

    # ------------------------------------------------------------------ deployments
    def online_nodes(self, selector: dict[str, str] | None = None) -> list[Any]:
        now = time.time()
        return [
            n
            for n in self.registry.nodes(selector)
            if n.state != "offline" and now - n.last_seen <= self.offline_after
        ]

    def deploy(
        self, sha: str, selector: dict[str, str] | None = None, params: RolloutParams | None = None
    ) -> int:
        """Start a staged rollout of a stored bundle to the online nodes matching ``selector``."""
        p = (params or RolloutParams()).validate()
        check_sha256(sha, "bundle", "deploy")
        bundle = self.registry.bundle(sha)
        if bundle is None:
            raise NotFound(f"No bundle with sha256 {sha} on the controller; upload it first.")
        if not bundle["verified"] and self.public_key is not None and not p.force:
            raise SignatureError(
                f"Bundle {sha[:12]} did not verify against the controller's public key; "
                "refusing to deploy it (force=True deploys it anyway; nodes will still verify)."
            )
        with self.rollout_lock:
            self._check_running()
            active = [d for d, r in self._rollouts.items() if r.is_alive()]
            if active:
                raise Conflict(
                    f"Deployment {active[0]} is still running; wait for it or roll it back first."
                )
            nodes = self.online_nodes(selector)
            if not nodes:
                raise NotFound(f"No online node matches the selector {selector or {}}.")
            self._check_succession(sha, bundle, nodes, p)
            ids = [n.id for n in nodes]
            canaries = set(pick_canaries(ids, p.canary, sha))
            targets = [
                (n.id, "canary" if n.id in canaries else "rest", n.bundle_sha) for n in nodes
            ]
            dep = self.registry.create_deployment(
                sha, selector or {}, p.canary, p.to_dict(), targets
            )
            self._launch(dep, p)
        return dep

    @staticmethod
    def _check_succession(sha: str, bundle: dict[str, Any], nodes: list[Any],
                          p: RolloutParams) -> None:  # fmt: skip
        """Refuse (``Conflict``) a bundle of another model than a target serves, unless
        ``allow_model_change``, and one of a lower version, unless ``allow_downgrade``: both
        are legitimate (a rollback to an older version, a new model) but must be asked for,
        so that a stale or mistaken deploy cannot undo newer work. What a node serves is what
        its last status said (the registry's model_name, model_version)."""

        def listed(rows: list[str]) -> str:
            return ", ".join(rows[:5]) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")

        name, version = str(bundle["name"]), str(bundle["version"])
        serving = [n for n in nodes if n.model_name]  # a node serving nothing takes anything
        others = [f"{n.id} serves {n.model_name!r}" for n in serving if n.model_name != name]
        if others and not p.allow_model_change:
            raise Conflict(
                f"Bundle {sha[:12]} holds model {name!r}, but {listed(others)}: deploying it "
                f"replaces that model on {len(others)} node(s). If that is what you want, "
                "deploy with allow_model_change=True (--allow-model-change)."
            )
        older = [f"{n.id} (version {n.model_version})" for n in serving
                 if n.model_name == name and version_is_lower(version, n.model_version)]
        if older and not p.allow_downgrade:
            raise Conflict(
                f"Bundle {sha[:12]} of {name!r} version {version} is older than what "
                f"{len(older)} target(s) serve: {listed(older)}. To roll back to it on "
                "purpose, deploy with allow_downgrade=True (--allow-downgrade), or roll back "
                "the deployment that installed the newer version."
            )

    def _check_running(self) -> None:
        """Refuse to start a rollout once ``stop`` began (call under ``rollout_lock``)."""
        if self._stop.is_set():
            raise Conflict("The controller is stopping; deploy or roll back after it restarts.")

    def _launch(self, dep: int, p: RolloutParams, abort: str | None = None) -> None:
        r = Rollout(self, dep, p, stop=self._stop)
        self._rollouts[dep] = r
        if abort:
            r.abort(abort)
        r.start()

    def rollout_finished(self, dep: int) -> None:
        self.notify()

    def rollback(self, dep: int | None = None, reason: str = "rollback requested") -> int:
        """Roll back deployment ``dep`` (default: the latest); returns its id."""
        if dep is None:
            deps = self.registry.deployments(limit=1)
            if not deps:
                raise NotFound("There is no deployment to roll back.")
            dep = deps[0].id
        row = self.registry.deployment(dep)
        if row is None:
            raise NotFound(f"No deployment with id {dep}.")
        with self.rollout_lock:
            self._check_running()
            r = self._rollouts.get(dep)
            if r is not None and r.is_alive() and not r.succeeded:
                r.abort(reason)  # it checks before it may succeed, under this lock
                return dep
            row = self.registry.deployment(dep) or row  # as it is now, under the lock
            if row.state in ("rolled_back", "rolling_back"):
                raise Conflict(f"Deployment {dep} is already {row.state}.")
            latest = self.registry.deployments(limit=1)
            if latest and latest[0].id != dep:
                # Its nodes have moved on: sending them back to what they served before it
                # would fight the newer deployment's desired states.
                raise Conflict(f"Deployment {dep} is not the latest ({latest[0].id} is); roll "
                               f"back {latest[0].id} first.")
            r = Rollout(self, dep, RolloutParams.from_dict(row.params), rollback_reason=reason,
                        stop=self._stop)
            self._rollouts[dep] = r
            r.start()
        return dep

    def wait_deployment(self, dep: int, timeout: float) -> str:
        """Block until deployment ``dep`` reaches a final state or ``timeout``; return its state."""
        deadline = time.monotonic() + timeout
        while True:
            row = self.registry.deployment(dep)
            state = row.state if row else "missing"
            if state in FINAL_STATES or time.monotonic() > deadline:
                return state
            self.wait_change(0.2)
