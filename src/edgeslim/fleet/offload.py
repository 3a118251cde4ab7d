"""The node's ASGI middleware: request stats, offload to a peer or the cloud tier, results.

Wrapped around the edge server's app, it sees every V2 infer request
(``POST /v2/models/NAME[/versions/V]/infer``) and:

- counts requests, errors (HTTP >= 400) and latencies over the telemetry window, which the
  node sends to the controller (the rollout's canary judge reads them); with a ``token``, a
  request without it goes straight to the wrapped app (which refuses it, 401) and is counted
  nowhere here: neither in the window nor as load, so whoever can reach a canary without the
  token cannot make it look broken or busy;
- when more than ``threshold`` infer requests are in flight here, forwards the request to a
  peer serving the same model sha256 (learnt from the peers' retained status messages; the
  least loaded first) or else to the configured cloud-tier V2 endpoint (the body is read
  here only when there is one to send it to, under the edge server's ``max_body_bytes``
  limit: 413 past it), and relays its
  answer; a request that was already offloaded once (``x-edgeslim-offloaded``) is never
  forwarded again, and a peer that fails or cannot serve the request (5xx, or a 4xx other
  than 400/422, such as 404 from a peer serving the same model under another name or
  version) is skipped and the request served here;
- with a ``token`` (the fleet's node token: the node's own, which its peers share), offloads
  only requests that carry it (the others go to the wrapped app, which refuses them) and
  sends it to the peer or cloud tier as ``Authorization: Bearer TOKEN``: what the peer sees
  is the node's credential, never one the client sent;
- hands each successful JSON answer to ``on_result`` (the node shares the outputs - never
  the inputs - on ``edgeslim/results/SHA/NODE``).

Everything else (metadata, health, /metrics) goes straight to the wrapped app.
"""

from __future__ import annotations

import bisect
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgeslim.edge.auth import authorized, bearer, check_token
from edgeslim.edge.server import (
    INFER_PATH,
    ClientGone,
    error,
    error_status,
    receive_raw,
    request_headers,
)
from edgeslim.fleet.protocol import Status

__all__ = ["FleetMiddleware", "Peers", "WindowCounter"]

log = logging.getLogger("edgeslim.fleet.offload")

OFFLOAD_HEADER = "x-edgeslim-offloaded"
_HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}
# The only client headers a peer or the cloud tier gets: what the V2 request means, and
# tracing. Never the client's credentials (Authorization, Cookie, API keys...): they were
# given to this node, not to whichever host a status message names. (Accept-Encoding is not
# forwarded either: the offload client asks for, and decodes, its own encodings.)
_REQUEST_KEEP = {"content-type", "content-encoding", "inference-header-content-length",
                 "accept", "x-request-id", "traceparent", "tracestate"}
# not relayed: httpx hands over the body already decoded, and ``_send`` sets the length
_RESPONSE_DROP = _HOP_HEADERS | {"content-encoding"}
# A peer's answer that says the request itself is bad (any node serving that model would say
# the same): relayed. Every other 4xx (no such model name or version there, its own token or
# body limit, too many requests) and every 5xx means "that target cannot serve it".
_RELAYED_4XX = {400, 422}


class WindowCounter:
    """Requests, errors and latencies since the last ``snapshot()``; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset(time.monotonic())
        self.total_requests = 0
        self.total_errors = 0

    def _reset(self, now: float) -> None:
        self._start = now
        self._lat: list[float] = []
        self._requests = 0
        self._errors = 0
        self._offloaded = 0

    def observe(self, seconds: float, status: int, offloaded: bool = False) -> None:
        with self._lock:
            self._requests += 1
            self.total_requests += 1
            if status >= 400:
                self._errors += 1
                self.total_errors += 1
            if offloaded:
                self._offloaded += 1
            else:
                bisect.insort(self._lat, seconds)

    def snapshot(self) -> dict[str, Any]:
        """``{requests, errors, offloaded, p50_ms, p99_ms, window_s}``; starts a new window."""
        now = time.monotonic()
        with self._lock:
            lat, req, err, off, start = (
                self._lat, self._requests, self._errors, self._offloaded, self._start
            )  # fmt: skip
            self._reset(now)

        def q(p: float) -> float:
            if not lat:
                return 0.0
            return round(1000.0 * lat[min(len(lat) - 1, int(p * len(lat)))], 4)

        return {"requests": req, "errors": err, "offloaded": off, "p50_ms": q(0.5),
                "p99_ms": q(0.99), "window_s": round(now - start, 3)}  # fmt: skip


@dataclass
class Peer:
    id: str
    http: str
    sha256: str
    queue: int
    seen: float  # monotonic
    max_age: float = 30.0  # seconds after ``seen`` that it counts as fresh


class Peers:
    """Other nodes as their retained status messages describe them.

    A peer is fresh for ``max_age`` seconds after its last status, or three of its own
    heartbeats when it says it beats slower than that.
    """

    def __init__(self, self_id: str, max_age: float = 30.0) -> None:
        self.self_id = self_id
        self.max_age = max_age
        self._lock = threading.Lock()
        self._peers: dict[str, Peer] = {}

    def update(self, node: str, status: Status | None) -> None:
        """A status (None: cleared) for ``node``; offline or model-less nodes are dropped."""
        if node == self.self_id:
            return
        with self._lock:
            if (
                status is None
                or status.state == "offline"
                or status.model is None
                or not status.http
            ):
                self._peers.pop(node, None)
                return
            self._peers[node] = Peer(node, status.http, status.model.sha256, status.queue,
                                     time.monotonic(),
                                     max(self.max_age, 3.0 * status.heartbeat_s))  # fmt: skip

    def pick(self, sha: str, exclude: set[str] | frozenset[str] = frozenset()) -> Peer | None:
        """The least-loaded fresh peer serving ``sha`` (random among equals), or None."""
        now = time.monotonic()
        with self._lock:
            fresh = [
                p
                for p in self._peers.values()
                if p.sha256 == sha and now - p.seen <= p.max_age and p.id not in exclude
            ]
        if not fresh:
            return None
        least = min(p.queue for p in fresh)
        return random.choice([p for p in fresh if p.queue == least])

    def all(self) -> list[Peer]:
        with self._lock:
            return list(self._peers.values())


class FleetMiddleware:
    """ASGI middleware (see the module docstring). ``model_sha()`` is the sha served here."""

    def __init__(
        self,
        app: Any,
        *,
        node_id: str,
        model_sha: Callable[[], str | None],
        peers: Peers | None = None,
        threshold: int = 0,
        cloud_url: str | None = None,
        on_result: Callable[[str | None, bytes], None] | None = None,
        timeout: float = 10.0,
        token: str | None = None,
        max_body_bytes: int = 16 << 20,
    ) -> None:
        self.app = app
        self.node_id = node_id
        self.model_sha = model_sha
        self.peers = peers
        self.threshold = threshold
        self.cloud_url = cloud_url.rstrip("/") if cloud_url else None
        self.on_result = on_result
        self.timeout = timeout
        self._expected = bearer(token) if check_token(token, "FleetMiddleware") else None
        self.max_body = max_body_bytes
        self.window = WindowCounter()
        self.inflight = 0
        self.offloaded_total = 0
        self._client: Any = None

    def _http(self) -> Any:
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(timeout=self.timeout)
        return self._client

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or not INFER_PATH.fullmatch(scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        if not authorized(scope["headers"], self._expected):
            await self.app(scope, receive, send)  # its 401, before anything is counted here
            return
        self.inflight += 1
        t0 = time.perf_counter()
        status = 500
        offloaded = False
        gone = False
        try:
            headers: dict[str, str] = {}
            targets: list[tuple[str, str]] = []
            if self.threshold and self.inflight > self.threshold:  # else the app reads them
                headers = request_headers(scope)
                if OFFLOAD_HEADER not in headers:
                    targets = self._targets()
            if targets:  # only then is the body read here, under the server's own limit
                try:
                    body = await receive_raw(receive, headers, self.max_body)
                except ClientGone:
                    gone = True
                    return
                except Exception as exc:  # over the limit, a bad Content-Length
                    status, message = error_status(exc, "infer")
                    await error(status, message)(scope, receive, send)
                    return
                answer = await self._offload(scope, headers, body, targets)
                if answer is not None:
                    status, resp_headers, content = answer
                    offloaded = True
                    self.offloaded_total += 1
                    await _send(send, status, resp_headers, content)
                    return
                receive = _replay(body, receive)
            status, captured = await self._local(scope, receive, send)
            if self.on_result is not None and status == 200 and captured is not None:
                self.on_result(self.model_sha(), captured)
        finally:
            self.inflight -= 1
            if not gone:
                self.window.observe(time.perf_counter() - t0, status, offloaded)

    async def _local(
        self, scope: dict[str, Any], receive: Any, send: Any
    ) -> tuple[int, bytes | None]:
        state: dict[str, Any] = {"status": 500, "json": False, "body": []}
        capture = self.on_result is not None

        async def wrapped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                for k, v in message.get("headers", []):
                    if k.lower() == b"content-type" and v.startswith(b"application/json"):
                        state["json"] = True
            elif message["type"] == "http.response.body" and capture and state["json"]:
                state["body"].append(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, wrapped)
        body = b"".join(state["body"]) if capture and state["json"] else None
        return state["status"], body

    def _targets(self) -> list[tuple[str, str]]:
        """(who, base URL) to try, in order: up to two peers, then the cloud tier."""
        sha = self.model_sha()
        tried: set[str] = set()
        targets: list[tuple[str, str]] = []
        if self.peers is not None and sha:
            for _ in range(2):
                peer = self.peers.pick(sha, exclude=tried)
                if peer is None:
                    break
                tried.add(peer.id)
                targets.append((peer.id, peer.http.rstrip("/")))
        if self.cloud_url:
            targets.append(("cloud", self.cloud_url))
        return targets

    async def _offload(
        self, scope: dict[str, Any], headers: dict[str, str], body: bytes,
        targets: list[tuple[str, str]],
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        fwd = {k: v for k, v in headers.items() if k in _REQUEST_KEEP}
        fwd[OFFLOAD_HEADER] = self.node_id
        if self._expected is not None:
            fwd["authorization"] = self._expected.decode("ascii")
        path = scope["path"] + (
            ("?" + scope["query_string"].decode()) if scope.get("query_string") else ""
        )
        for who, base in targets:
            try:
                r = await self._http().post(base + path, content=body, headers=fwd)
            except Exception as exc:  # peer gone: try the next, else serve here
                log.info("offload to %s failed: %s", who, exc)
                continue
            if r.status_code >= 400 and r.status_code not in _RELAYED_4XX:
                log.info("offload to %s answered %d: trying the next", who, r.status_code)
                continue
            out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in r.headers.items()
                   if k.lower() not in _RESPONSE_DROP]  # fmt: skip
            out.append((b"x-edgeslim-served-by", who.encode()))
            return r.status_code, out, r.content
        return None


def _replay(body: bytes, original: Any) -> Callable[[], Any]:
    """A ``receive`` that gives the already-read body once, then defers to the real one."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await original()

    return receive


async def _send(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = [h for h in headers if h[0].lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
