"""The node agent: serve a model, follow the controller's desired state, never lose a record.

Start-up order is what makes a restart safe: recover the bundle store (drop temporary files a
kill -9 left), load the bundle ``current`` names (falling back along its history), start the
V2 server, and only then talk to the broker. So the node answers with its last good model at
once, whether or not the broker or the controller is reachable.

Threads: the MQTT link, the outbox forwarder, ``worker`` (converges on the desired state:
download with resume -> verify -> probe -> swap -> point ``current`` -> report), ``ticker``
(status heartbeat and telemetry records) and, with ``share_results``, ``results``.

Example::

    cfg = NodeConfig(node_id="edge-1", broker="mqtt://node:pw@127.0.0.1:1883",
                     controller="http://127.0.0.1:8700", data_dir="node-1",
                     public_key="keys/signing.pub", port=9001)
    node = Node(cfg).start()   # serves V2 on :9001, follows the controller
    node.stop()
"""

from __future__ import annotations

import collections
import contextlib
import enum
import json
import logging
import os
import platform
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeslim._validate import check_int_range, check_positive
from edgeslim.edge.auth import check_token
from edgeslim.errors import BundleError, ConfigError, EdgeslimError
from edgeslim.fleet.backoff import Backoff
from edgeslim.fleet.client import check_url
from edgeslim.fleet.link import MqttLink
from edgeslim.fleet.offload import FleetMiddleware, Peers
from edgeslim.fleet.outbox import MAX_MESSAGE_BYTES, Forwarder, Outbox
from edgeslim.fleet.protocol import (
    CONTROLLER_TOPIC,
    PREFIX,
    Ack,
    BrokerURL,
    Desired,
    ModelRef,
    ProtocolError,
    Result,
    Status,
    check_node_id,
    decode,
    encode,
    node_from_topic,
    topic,
)
from edgeslim.fleet.store import BundleStore, Cancelled, NoSpace, TooLarge

__all__ = ["Node", "NodeConfig", "NodeState", "auto_labels"]

log = logging.getLogger("edgeslim.fleet.node")


def _desired_key(d: Desired | None) -> tuple[Any, ...] | None:
    """What makes two desired states the same: a retained redelivery (after every reconnect)
    is a new object with the same key."""
    return None if d is None else (d.deployment, d.sha256, d.rollback)


class NodeState(enum.Enum):
    """What the node is doing; it serves requests in every state but STARTING and STOPPED."""

    STARTING = "starting"
    EMPTY = "empty"  # serving nothing yet (no bundle ever installed)
    SERVING = "serving"
    DOWNLOADING = "downloading"
    INSTALLING = "installing"  # verify, warm up, probe, swap
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass
class NodeConfig:
    """Settings of one node agent (seconds; bytes per second for ``max_download_rate``)."""

    node_id: str
    broker: str
    controller: str
    data_dir: str | os.PathLike[str]
    public_key: str | os.PathLike[str]
    host: str = "127.0.0.1"
    port: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    heartbeat_s: float = 5.0
    telemetry_s: float = 5.0
    threads: int = 1  # onnxruntime intra-op threads
    max_download_rate: float | None = None
    # attempts in a row that get the download no further before it is given up
    download_attempts: int = 5
    # the most one download attempt may take (a later attempt resumes, and an attempt that
    # got further is not counted); under max_download_rate at least twice the time the
    # announced size needs at that rate
    download_deadline_s: float = 3600.0
    offload_threshold: int = 0  # in-flight infer requests before offloading; 0 = never
    cloud_url: str | None = None
    share_results: bool = False
    measure_reference: bool = True
    backoff_initial: float = 0.5
    backoff_cap: float = 30.0
    connect_wait: float = 5.0  # start(): how long to wait for the first CONNACK
    # the largest MQTT packet the node sends (a broker that names a smaller Maximum Packet
    # Size in its CONNACK lowers it); MQTT's own limit by default, 131072 for AWS IoT Core
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # bearer token of the node's V2 API (health checks stay open), shared by the nodes of a
    # fleet: a node sends it to the peers it offloads to
    token: str | None = field(default=None, repr=False)
    max_body_mb: float = 16.0  # largest request body, offloaded or not (MB)

    def validate(self) -> NodeConfig:
        f = "fleet node"
        check_node_id(self.node_id, f)
        check_int_range(self.port, "port", f, 0, 65535)
        for name in ("heartbeat_s", "telemetry_s"):  # a timer past a day overflows waits
            if check_positive(getattr(self, name), name, f) > 86400.0:
                raise ConfigError(f"The '{name}' parameter of {f} must be at most 86400 (a "
                                  f"day). Got {getattr(self, name)!r} instead.")
        check_int_range(self.threads, "threads", f, 1, 256)
        check_int_range(self.download_attempts, "download_attempts", f, 1, 1000)
        check_int_range(self.offload_threshold, "offload_threshold", f, 0, 10**6)
        check_int_range(self.max_message_bytes, "max_message_bytes", f, 4096, 268_435_455)
        check_positive(self.max_body_mb, "max_body_mb", f)
        check_positive(self.download_deadline_s, "download_deadline_s", f)
        check_token(self.token, f)
        rate = self.max_download_rate
        if rate is not None and check_positive(rate, "max_download_rate", f) < 1.0:
            raise ConfigError(f"The 'max_download_rate' parameter of {f} must be at least 1 "
                              f"(bytes/s). Got {rate!r} instead.")
        check_url(self.controller, "--controller")
        if self.cloud_url is not None:
            check_url(self.cloud_url, "--cloud")
        if Path(self.data_dir).exists() and not Path(self.data_dir).is_dir():
            raise ConfigError(f"The '--data' option {str(self.data_dir)!r} is a file, not a "
                              "folder.")
        if not Path(self.public_key).is_file():
            raise ConfigError(
                f"The '--public-key' file {str(self.public_key)!r} does not exist; a node only "
                "installs bundles signed by the key it pins (edgeslim keygen writes one)."
            )
        BrokerURL.parse(self.broker)
        return self


def _memory_mb() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)
    except (ValueError, OSError, AttributeError):
        return 0


def reference_latency_us(runs: int = 50) -> float:
    """Median latency (microseconds) of the bundled reference model (64-64-10 MLP, 1 thread)."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(
        str(Path(__file__).with_name("reference.onnx")), opts, providers=["CPUExecutionProvider"]
    )
    x = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(1, 64)
    for _ in range(5):
        sess.run(None, {"x": x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    times.sort()
    return round(times[len(times) // 2] * 1e6, 1)


def auto_labels(measure: bool = True) -> dict[str, str]:
    """What a node says about itself: device class, cores, memory, reference-model latency."""
    labels = {
        "device_class": platform.machine() or "unknown",
        "cores": str(os.cpu_count() or 1),
        "memory_mb": str(_memory_mb()),
    }
    if measure:
        try:
            labels["ref_latency_us"] = str(reference_latency_us())
        except Exception as exc:  # an odd runtime must not keep a node from starting
            log.warning("could not measure the reference model: %s", exc)
    return labels


class Node:
    """A fleet node agent (see the module docstring). ``start()``, then ``stop()``."""

    RESULTS_QUEUE = 10_000  # answers waiting to be shared (--share-results) at most
    REPORTS_WAITING = 100  # deployment reports waiting for the outbox (a full disk) at most

    def __init__(self, config: NodeConfig) -> None:
        self.cfg = config.validate()
        self.id = config.node_id
        self.data = Path(config.data_dir)
        self.data.mkdir(parents=True, exist_ok=True)
        self.store = BundleStore(self.data)
        self.controller = str(config.controller).rstrip("/")
        self._state = NodeState.STARTING
        self._health_note = ""  # why the last install failed ("" when it did not)
        self._desired: Desired | None = None
        self._desired_heard = False  # a desired state (or its clearing) has arrived
        self._handled: tuple[int, str, bool] | None = None
        self._work = threading.Event()
        self._stop = threading.Event()
        self._started = False  # start() was called (a node runs once)
        self._threads: list[threading.Thread] = []
        self._drained = threading.Event()  # set by stop() once the server has stopped
        self._worker_thread: threading.Thread | None = None
        self._results_thread: threading.Thread | None = None
        # answers waiting to be shared; bounded, so a results thread held up by a full disk
        # cannot make the node run out of memory (the overflow is counted and dropped)
        self._results: queue.Queue[tuple[str | None, bytes]] = queue.Queue(self.RESULTS_QUEUE)
        self.results_dropped = 0
        # deployment reports the outbox could not take yet (a full disk), oldest first; the
        # worker retries them while it goes on following the desired state
        self._unsent: collections.deque[dict[str, Any]] = collections.deque()
        self.reports_dropped = 0
        self.labels: dict[str, str] = {}
        self.peers = Peers(self.id, max_age=max(30.0, 3 * config.heartbeat_s))
        self.outbox: Outbox | None = None
        self.forwarder: Forwarder | None = None
        self.link: MqttLink | None = None
        self.serving: Any = None
        self.middleware: FleetMiddleware | None = None
        self.installs = 0  # successful swaps since start

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> NodeState:
        return self._state

    def _set_state(self, state: NodeState) -> None:
        if state is not self._state:
            self._state = state
            self.publish_status()

    @property
    def model(self) -> ModelRef | None:
        return self.serving.model if self.serving is not None else None

    @property
    def url(self) -> str:
        return str(self.serving.url) if self.serving is not None else ""

    def status(self) -> Status:
        model = self.model
        health = "down" if model is None else ("degraded" if self._health_note else "ok")
        return Status(
            id=self.id,
            state=self._state.value,
            health=health,
            labels=self.labels,
            model=model,
            http=self.url,
            queue=self.middleware.inflight if self.middleware else 0,
            ts=time.time(),
            heartbeat_s=self.cfg.heartbeat_s,
        )

    def publish_status(self) -> bool:
        if self.link is None or self._stop.is_set():  # stopping: the goodbye is the last word
            return False
        return self.link.publish(
            topic("status", self.id), encode(self.status()), qos=1, retain=True
        )

    def record(self, kind: str, body: dict[str, Any]) -> str:
        """Commit a record to the outbox (forwarded when the broker is reachable); its id."""
        if self.outbox is None:
            raise ConfigError("The node is not started.")
        return self.outbox.put(kind, body).id

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Node:
        """Serve, then follow the controller. On failure (a refused broker password, a port
        in use, ...) everything started so far is stopped again before the error is raised:
        no thread, port or open database is left behind. A node starts once."""
        if self._started or self._stop.is_set():
            raise ConfigError(
                f"Node {self.id!r} is already started or was stopped; a Node runs once "
                "(create a new one: Node(config).start())."
            )
        self._started = True
        try:
            return self._start()
        except BaseException:
            try:
                self.stop()
            except Exception:  # the start's own error is the one to raise
                log.exception("%s: cleaning up after a failed start", self.id)
            raise

    def _start(self) -> Node:
        from edgeslim.bundle import load_public_key
        from edgeslim.fleet.serving import Serving

        removed = self.store.recover()
        if removed:
            log.info("%s: removed %d temporary file(s) left by a crash", self.id, len(removed))
        self.outbox = Outbox(self.data / "outbox.db")
        pub = load_public_key(self.cfg.public_key)

        def wrap(app: Any) -> Any:
            self.middleware = FleetMiddleware(
                app,
                node_id=self.id,
                model_sha=lambda: self.model.sha256 if self.model else None,
                peers=self.peers,
                threshold=self.cfg.offload_threshold,
                cloud_url=self.cfg.cloud_url,
                on_result=self._on_result if self.cfg.share_results else None,
                token=self.cfg.token,
                max_body_bytes=int(self.cfg.max_body_mb * (1 << 20)),  # as the edge server
            )
            return self.middleware

        self.serving = Serving(
            host=self.cfg.host,
            port=self.cfg.port,
            public_key=pub,
            threads=self.cfg.threads,
            wrap=wrap,
            token=self.cfg.token,
            max_body_mb=self.cfg.max_body_mb,
        )
        self._restore()
        self.serving.start()
        self._state = NodeState.SERVING if self.model else NodeState.EMPTY
        self.labels = {**auto_labels(self.cfg.measure_reference), **self.cfg.labels}

        broker = BrokerURL.parse(self.cfg.broker)
        will = Status(id=self.id, state="offline", labels=self.labels, ts=time.time())
        subs = [(topic("desired", self.id), 1), (topic("ack", self.id), 1), (CONTROLLER_TOPIC, 1)]
        if self.cfg.offload_threshold:
            # Peer discovery: every node's retained status. Only nodes that offload pay for it
            # (each status of the fleet reaches every subscriber; see docs/fleet.md on scale).
            subs.append((f"{PREFIX}/nodes/+/status", 0))
        self.link = MqttLink(
            broker,
            self.id,
            subscriptions=subs,
            on_message=self._on_message,
            on_connected=self._on_connected,
            will=(topic("status", self.id), encode(will), 1, True),
            backoff=Backoff(initial=self.cfg.backoff_initial, cap=self.cfg.backoff_cap),
            name=f"node {self.id}",
        )
        self.forwarder = Forwarder(
            self.outbox,
            self.id,
            topic("telemetry", self.id),
            self._publish1,
            max_bytes=self.cfg.max_message_bytes,
            broker_limit=lambda: self.link.max_packet_size if self.link else None,
        )
        self.forwarder.start()
        self._worker_thread = self._spawn(self._worker, "worker")
        self._spawn(self._ticker, "ticker")
        if self.cfg.share_results:
            self._results_thread = self._spawn(self._results_loop, "results")
        self.link.start(wait=self.cfg.connect_wait)
        return self

    def _spawn(self, target: Any, name: str) -> threading.Thread:
        t = threading.Thread(target=target, name=f"{self.id}-{name}", daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def _restore(self) -> None:
        """Serve the last good bundle: ``current``, else the newest of its history that loads."""
        for sha in self.store.candidates():
            try:
                ref = self.serving.swap(self.store.path(sha), sha)
            except EdgeslimError as exc:
                log.error("%s: installed bundle %s does not load: %s", self.id, sha[:12], exc)
                continue
            ptr = self.store.current()
            if ptr is not None and ptr.sha256 != sha:
                self.store.set_current(sha, ref.name)  # fell back: make it the pointer again
            log.info("%s: serving %s (%s) from disk", self.id, ref.name, sha[:12])
            return

    def stop(self) -> None:
        """Stop cleanly, losing no record: say goodbye (offline, so peers stop offloading
        here), end the worker and the ticker, stop the server (the requests in flight are
        answered), store every answer it gave (``share_results``) and the last telemetry
        window, then stop the forwarder and the link and close the outbox. Stops whatever
        part a failed ``start()`` got to; a second call does nothing."""
        if self._state is NodeState.STOPPED:
            return
        self._state = NodeState.STOPPING
        self._stop.set()
        self._work.set()
        for t in self._threads:
            if t is not self._results_thread:
                t.join(5.0)
        # after the ticker: no heartbeat may follow it (publish_status is quiet from now on)
        bye = Status(id=self.id, state="offline", labels=self.labels, ts=time.time())
        goodbye = (topic("status", self.id), encode(bye), 1, True)
        if self.link is not None:
            self.link.publish(*goodbye)
        if self.serving is not None:
            self.serving.stop()
        # the server has stopped: no answer comes after this one, so the results thread
        # stores what is queued and ends
        self._drained.set()
        if self._results_thread is not None:
            self._results_thread.join(10.0)
        if self.outbox is not None:
            self._telemetry(final=True)
            worker = self._worker_thread
            if self._unsent and not (worker and worker.is_alive()) and not self._store_reports():
                log.error("%s: %d deployment report(s) could not be stored before the stop",
                          self.id, len(self._unsent))  # fmt: skip
        if self.forwarder is not None:
            self.forwarder.stop()
        if self.link is not None:
            self.link.stop(final=[goodbye])
        if self.outbox is not None:
            self.outbox.close()
        self._state = NodeState.STOPPED

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ MQTT
    def _publish1(self, name: str, payload: bytes) -> Any:
        """The forwarder's publish: paho's message info (None when the link is down)."""
        return None if self.link is None else self.link.publish_tracked(name, payload, qos=1)

    def _on_connected(self) -> None:
        self.publish_status()
        if self.forwarder is not None:
            self.forwarder.on_connected()

    def _on_message(self, name: str, payload: bytes) -> None:
        if name == CONTROLLER_TOPIC:
            # The controller (re)connected: what we sent while it was away went nowhere.
            if payload and self.forwarder is not None:
                with contextlib.suppress(ProtocolError):
                    if decode(payload).get("state") == "online":
                        self.forwarder.on_connected()
            return
        parsed = node_from_topic(name)
        if parsed is None:
            return
        node, kind = parsed
        try:
            if kind == "status":
                self.peers.update(node, Status.from_dict(decode(payload)) if payload else None)
            elif node != self.id:
                return
            elif kind == "ack" and self.forwarder is not None:
                self.forwarder.on_ack(Ack.from_dict(decode(payload)).ids)
            elif kind == "desired":
                self._desired = Desired.from_dict(decode(payload)) if payload else None
                self._desired_heard = True
                self._work.set()
        except (ProtocolError, ConfigError) as exc:
            log.warning("%s: dropped a message on %s: %s", self.id, name, exc)

    # ------------------------------------------------------------------ convergence
    def _worker(self) -> None:
        swept: Any = ()  # the desired state whose unwanted partial downloads are gone
        retry = Backoff(initial=self.cfg.backoff_initial, cap=self.cfg.backoff_cap)
        while not self._stop.is_set():
            self._work.wait(retry.next_delay() if self._unsent else 1.0)
            self._work.clear()
            if self._unsent and self._store_reports():
                retry.reset()
            if not self._desired_heard or self._stop.is_set():
                continue  # (nothing known yet, as after a restart: keep what may resume)
            d = self._desired
            key = _desired_key(d)
            if key != swept:
                self._drop_partials(d)
                swept = key
            if d is None or key == self._handled:
                continue
            try:
                finished = self._converge(d)
            except Exception as exc:  # a bug here must not stop the node from serving
                log.exception("%s: converging on %s failed", self.id, d.sha256[:12])
                self._report(d, "failed", f"node error: {exc}", 0.0)
                finished = True
            if finished:
                self._handled = key

    def _drop_partials(self, d: Desired | None) -> None:
        """Delete the partial downloads of every bundle but the one ``d`` wants: one rolled
        back or replaced while it travelled is not resumed, and would only take disk."""
        removed = self.store.drop_partials(keep=d.sha256 if d is not None else None)
        if removed:
            log.info("%s: deleted %d partial download(s) no longer wanted: %s", self.id,
                     len(removed), ", ".join(p.stem[:12] for p in removed))  # fmt: skip

    def _report(self, d: Desired, outcome: str, reason: str, seconds: float) -> None:
        """Commit a deployment report. While the outbox cannot take it (a full disk), it
        waits in memory, after any older one, and the worker retries it with backoff as it
        goes on following the desired state. Never raises: the worker lives on."""
        body = {
            "deployment": d.deployment,
            "bundle": d.sha256,
            "rollback": d.rollback,
            "outcome": outcome,
            "reason": reason,
            "seconds": round(seconds, 3),
            "serving": self.model.bundle if self.model else None,
        }
        if len(self._unsent) >= self.REPORTS_WAITING:
            old = self._unsent.popleft()
            self.reports_dropped += 1
            log.error("%s: dropped the unsaved %s report of deployment %s: %d reports wait "
                      "for the outbox already", self.id, old["outcome"], old["deployment"],
                      len(self._unsent))  # fmt: skip
        self._unsent.append(body)
        self._store_reports()
        self.publish_status()

    def _store_reports(self) -> bool:
        """Commit the waiting reports, oldest first; False when the outbox refused one."""
        while self._unsent:
            body = self._unsent[0]
            try:
                self.record("report", body)
            except Exception as exc:
                log.error("%s: could not store the %s report of deployment %s (%d waiting; "
                          "retrying): %s", self.id, body["outcome"], body["deployment"],
                          len(self._unsent), exc)  # fmt: skip
                return False
            self._unsent.popleft()
        return True

    def _converge(self, d: Desired) -> bool:
        """Install (or refuse) ``d`` and report it: True. False when the download stopped
        because the node stops or the desired state moved on (the worker looks again)."""
        t0 = time.monotonic()
        current = self.model
        if current is not None and current.bundle == d.sha256:
            self._health_note = ""
            self._report(d, "already", "already serving it", 0.0)
            return True
        refused = self.store.rejected(d.sha256)
        if refused is not None:
            self._report(d, "refused", refused, 0.0)
            return True
        try:
            path = self._download(d)
        except BundleError as exc:
            self._fail(d, "failed", str(exc), t0, reject=False)
            return True
        if path is None or self._unwanted(d):  # stopped, or the desired state moved on
            # (checked again after the download: a rollback that came as it finished must
            # not be installed and served)
            self._set_state(NodeState.SERVING if self.model else NodeState.EMPTY)
            self._work.set()
            return False
        self._set_state(NodeState.INSTALLING)
        try:
            ref = self.serving.swap(path, d.sha256)
        except EdgeslimError as exc:
            # Signature, hashes, corrupt archive, warm-up or probe: this bundle never serves.
            self._fail(d, "refused", f"{type(exc).__name__}: {exc}", t0, reject=True)
            return True
        self.store.set_current(d.sha256, ref.name)
        self.installs += 1
        self._health_note = ""
        self._set_state(NodeState.SERVING)
        log.info("%s: now serving %s (%s)", self.id, ref.name, d.sha256[:12])
        self._report(d, "installed", "", time.monotonic() - t0)
        return True

    def _fail(self, d: Desired, outcome: str, reason: str, t0: float, *, reject: bool) -> None:
        log.warning("%s: bundle %s %s: %s", self.id, d.sha256[:12], outcome, reason)
        if reject:
            self.store.reject(d.sha256, reason)
            cur = self.model
            if cur is None or cur.bundle != d.sha256:
                self.store.path(d.sha256).unlink(missing_ok=True)
        self._health_note = reason
        self._state = NodeState.SERVING if self.model else NodeState.EMPTY
        self._report(d, outcome, reason, time.monotonic() - t0)

    def _unwanted(self, d: Desired) -> bool:
        """True when the node stops or the desired state is no longer ``d`` (a rollback, a
        newer deployment, a cleared state; a redelivery of the same state is not a change)."""
        return self._stop.is_set() or _desired_key(self._desired) != _desired_key(d)

    def _download(self, d: Desired) -> Path | None:
        """The bundle file, fetched (and resumed) as needed; None when no longer wanted."""
        import httpx

        if self.store.has(d.sha256):
            return self.store.path(d.sha256)
        self._set_state(NodeState.DOWNLOADING)
        backoff = Backoff(initial=self.cfg.backoff_initial, cap=self.cfg.backoff_cap)
        url = f"{self.controller}/bundles/{d.sha256}"
        deadline = self.cfg.download_deadline_s
        if self.cfg.max_download_rate and d.size:
            deadline = max(deadline, 2.0 * d.size / self.cfg.max_download_rate)
        last: Exception | None = None
        # Attempts in a row that did not take the download further than it ever got. One
        # that did (a slow link cut by the deadline, a dropped connection) resumes with a
        # fresh count: such attempts are bounded all the same, as each leaves fewer bytes to
        # go and the file never grows past the size cap, while a server that stalls (the
        # read timeout), errs, ignores Range (starting over each time) or sends a bad file
        # (deleted) uses the attempts up.
        failures = 0
        furthest = self._resume_offset(d.sha256)
        with httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0)) as client:
            while failures < self.cfg.download_attempts:
                if self._unwanted(d):
                    return None
                try:
                    offset = self.store.resume_offset(d.sha256)
                    if offset:
                        log.info("%s: resuming %s at byte %d", self.id, d.sha256[:12], offset)
                    return self.store.download(
                        url,
                        d.sha256,
                        client=client,
                        max_rate=self.cfg.max_download_rate,
                        stop=self._stop,
                        cancel=lambda: self._unwanted(d),  # on every chunk
                        max_bytes=d.size or None,  # the announced size, else the bundle limit
                        deadline_s=deadline,
                    )
                except Cancelled:
                    return None
                except (NoSpace, TooLarge):  # retrying cannot help (the partial file is gone)
                    raise
                except (httpx.HTTPError, OSError, BundleError) as exc:
                    last = exc
                    if self._stop.is_set():
                        return None
                    reached = self._resume_offset(d.sha256)
                    if reached > furthest:
                        furthest, failures = reached, 0
                        backoff.reset()
                    else:
                        failures += 1
                        if reached == 0:  # the partial file was deleted (a bad file): anew
                            furthest = 0
                    log.info("%s: download attempt failed (%d in a row without progress): %s",
                             self.id, failures, exc)  # fmt: skip
                    if self._stop.wait(backoff.next_delay()):
                        return None
        self.store.discard_partial(d.sha256)  # given up: do not hold the disk for it
        raise BundleError(
            f"download of {d.sha256[:12]} failed {self.cfg.download_attempts} times in a row "
            f"without progress: {last}"
        )

    def _resume_offset(self, sha: str) -> int:
        """``store.resume_offset``, or -1 when the partial file cannot be looked at."""
        try:
            return self.store.resume_offset(sha)
        except OSError:
            return -1

    # ------------------------------------------------------------------ telemetry
    def _ticker(self) -> None:
        next_beat = next_tel = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                self.publish_status()
                next_beat = now + self.cfg.heartbeat_s
            if now >= next_tel:
                self._telemetry()
                next_tel = now + self.cfg.telemetry_s
            self._stop.wait(max(0.01, min(next_beat, next_tel) - time.monotonic()))

    def _telemetry(self, final: bool = False) -> None:
        """Store the window of request stats that ends now (``final``: the one the node
        stops in, stored only when it saw requests)."""
        if self.middleware is None or self.outbox is None:
            return
        body = self.middleware.window.snapshot()
        if final and not body["requests"]:
            return
        m = self.model
        body.update(
            model_sha=m.sha256 if m else None,
            bundle=m.bundle if m else None,
            queue=self.middleware.inflight,
            outbox=self.outbox.count(),
        )
        try:
            self.outbox.put("telemetry", body)
        except Exception:
            log.exception("%s: could not store telemetry", self.id)

    def _on_result(self, model_sha: str | None, body: bytes) -> None:
        try:
            self._results.put_nowait((model_sha, body))  # on the event loop: never block it
        except queue.Full:
            self.results_dropped += 1
            if self.results_dropped % 1000 == 1:
                log.warning("%s: %d result(s) waiting to be shared already; dropped %d",
                            self.id, self.RESULTS_QUEUE, self.results_dropped)  # fmt: skip

    def _results_loop(self) -> None:
        """Store, then publish, the answers the server gives; ends once the server has
        stopped (``stop()`` sets ``_drained``) and every answer it gave is stored."""
        backoff = Backoff(initial=self.cfg.backoff_initial, cap=self.cfg.backoff_cap)
        shared: list[tuple[str | None, Result]] = []  # read, not yet in the outbox
        while True:
            if not shared:
                shared = self._next_results()
                if not shared:
                    if self._drained.is_set() and self._results.empty():
                        return
                    continue
            try:
                if self.outbox is not None:
                    self.outbox.put_many([("result", r.to_dict()) for _, r in shared])
            except Exception as exc:  # a full disk: keep these, try again (the queue is bounded)
                if self._drained.is_set():  # the node stops: the disk is not waited for
                    lost = len(shared) + self._results.qsize()
                    self.results_dropped += lost
                    log.error("%s: could not store %d result(s) as the node stops: %s",
                              self.id, lost, exc)  # fmt: skip
                    return
                log.error("%s: could not store %d result(s) (retrying): %s",
                          self.id, len(shared), exc)  # fmt: skip
                self._drained.wait(backoff.next_delay())
                continue
            backoff.reset()
            if self.link is not None:
                for sha, r in shared:
                    if sha:
                        payload, where = encode(r), topic("results", sha, self.id)
                        if (self.forwarder is not None
                                and len(payload) > self.forwarder.payload_limit(where)):
                            continue  # the broker would drop the link; the outbox sends it
                        try:
                            self.link.publish(where, payload, qos=0)
                        except Exception:  # the live copy is best effort; the outbox has it
                            log.exception("%s: could not publish a result", self.id)
            shared = []

    def _next_results(self) -> list[tuple[str | None, Result]]:
        """Up to 500 queued answers as results (waits up to 0.2 s for the first)."""
        try:
            items = [self._results.get(timeout=0.2)]
        except queue.Empty:
            return []
        while len(items) < 500:
            try:
                items.append(self._results.get_nowait())
            except queue.Empty:
                break
        shared = []
        for sha, raw in items:
            try:
                doc = json.loads(raw)
                if not isinstance(doc, dict):
                    continue
            except (ValueError, RecursionError):
                continue
            shared.append(
                (
                    sha,
                    Result(
                        node=self.id,
                        model_sha=sha or "",
                        request_id=str(doc.get("id", "")),
                        outputs=doc.get("outputs"),
                    ),
                )
            )
        return shared
