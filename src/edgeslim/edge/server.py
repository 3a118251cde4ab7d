"""The edge node's HTTP server: Open Inference Protocol (KServe V2 REST) on starlette/uvicorn.

Endpoints (``{name}`` is a model name; ``/versions/{version}`` may follow it in the V2 paths):

==========================================  ================================================
``GET  /v2/health/live``                    200 while the process serves (no token needed)
``GET  /v2/health/ready``                   200 when at least one model is loaded, else 503
``GET  /v2``                                server metadata (name, version, extensions)
``GET  /v2/models/{name}``                  model metadata: versions, platform, inputs, outputs
``GET  /v2/models/{name}/ready``            200 when the model is loaded
``POST /v2/models/{name}/infer``            inference: JSON tensors or binary tensor data
``POST /v2/models/{name}/raw``              raw payload (image bytes, text, sensor JSON array)
                                            through the manifest's pre- and postprocessing
``POST /v2/repository/index``               loaded models
``POST /v2/repository/models/{name}/load``  hot swap: ``{"parameters": {"bundle": PATH}}``
``POST /v2/repository/models/{name}/unload``
``GET  /metrics``                           Prometheus text
==========================================  ================================================

With a token configured every endpoint but the two health checks needs
``Authorization: Bearer TOKEN``; without one, ``load`` and ``unload`` are refused (403), so
only a server with a token can be re-pointed over HTTP (``EdgeServer.swap`` always works).
``admin=False`` keeps them off with a token too (a fleet node: its controller decides what it
serves, and its token is shared by every client and peer).
Every error is ``{"error": "..."}`` with a 4xx status naming the
problem; a 500 only for a bug, and the node keeps serving either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgeslim.edge import DRAIN_S, MIN_BODY_MB
from edgeslim.edge._http import (
    HANG_UP_S,
    RECEIVE_BUFFER,
    Connections,
    draining_server,
    edge_protocol,
    tune_malloc,
)
from edgeslim.edge.auth import BearerAuth, check_token
from edgeslim.edge.metrics import CONTENT_TYPE, Metrics
from edgeslim.edge.model_store import ModelStore, ServedModel
from edgeslim.edge.v2 import (
    HEADER_LENGTH,
    V2Error,
    check_json_safe,
    encode_infer_response,
    parse_header_length,
    parse_infer_request,
)
from edgeslim.errors import BundleError, ConfigError, InferenceError, SignatureError

log = logging.getLogger("edgeslim.edge.server")

OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
SERVER_NAME = "edgeslim"
EXTENSIONS = ["binary_tensor_data", "model_repository", "edgeslim_raw"]

Handler = Callable[[Request], Awaitable[Response]]

#: ``POST`` paths of the inference endpoint: model name, optional version.
INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
HEADER_LENGTH_KEY = HEADER_LENGTH.lower()

def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The V2 error response."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def error_status(exc: Exception, label: str) -> tuple[int, str]:
    """HTTP status and message for an exception raised while handling ``label``."""
    if isinstance(exc, V2Error):
        return exc.status, exc.message
    if isinstance(exc, (InferenceError, ConfigError)):
        return 400, str(exc)
    if isinstance(exc, SignatureError):
        return 403, str(exc)
    if isinstance(exc, BundleError):
        return 422, str(exc)
    if isinstance(exc, ClientGone):
        return 400, "the client disconnected before the request body arrived"
    log.error("unhandled error in %s", label, exc_info=exc)  # a bug: answer, log, keep serving
    return 500, f"internal error in {label}: {type(exc).__name__}"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("edgeslim")
    except Exception:
        return "0"


class ClientGone(Exception):
    """The client disconnected before its request body arrived; nobody is left to answer."""


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (also after gzip/deflate decoding)."""
    return await receive_body(request.receive, request.headers, limit)


async def receive_body(receive: Any, headers: Any, limit: int) -> bytes:
    """The body of an ASGI request, at most ``limit`` bytes (also after gzip/deflate decoding).

    ``headers``: a mapping with lower-case keys (starlette's ``Headers`` or a plain dict).
    """
    body = await receive_raw(receive, headers, limit)
    encoding = (headers.get("content-encoding") or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise V2Error(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate "
                      f"or none"[:200], 415)
    d = zlib.decompressobj(31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise V2Error(f"the {encoding} body does not decompress: {exc}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise V2Error(f"the body decompresses to over {limit} bytes", 413)
    if not d.eof or d.unused_data:  # cut short, or more after the end (a second member)
        what = "cut short" if not d.eof else f"followed by {len(d.unused_data)} more bytes"
        raise V2Error(f"the {encoding} body is {what}; send one complete {encoding} stream")
    return out


def request_headers(scope: dict[str, Any]) -> dict[str, str]:
    """An ASGI request's headers by lower-case name; of a repeated header the first counts,
    as in starlette."""
    headers: dict[str, str] = {}
    for k, v in scope["headers"]:
        headers.setdefault(k.decode("latin-1"), v.decode("latin-1"))
    return headers


async def receive_raw(receive: Any, headers: Any, limit: int) -> bytes:
    """The body of an ASGI request as sent (still encoded), at most ``limit`` bytes: a
    Content-Length over it is refused before anything is read, a stream as soon as it passes
    it (``V2Error`` 413); ``ClientGone`` when the client leaves first."""
    declared = headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise V2Error(f"Content-Length is not an integer: {declared!r}"[:200]) from None
        if n > limit:
            raise V2Error(f"the body is {n} bytes; this server accepts at most {limit}", 413)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise V2Error(f"the body is over {limit} bytes, the most this server accepts",
                              413)
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def preprocess_workers() -> int:
    """Threads that run ``/raw`` preprocessing: one per CPU this process may use.

    Decoding an image or tokenizing a text is CPU work whose memory grows with the payload
    (a 40-million-pixel image takes a few hundred MB while it is decoded); more of them at
    once than there are CPUs finishes none sooner and only multiplies that memory. Further
    requests wait their turn with their body read.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class EdgeApp:
    """The starlette application over a ``ModelStore`` (see the module docstring).

    ``preprocess`` runs the ``/raw`` preprocessing (by default a pool of
    ``preprocess_workers()`` threads, which the app owns). ``admin`` turns on the ``load`` and
    ``unload`` endpoints; None (the default): on when there is a token.
    """

    def __init__(
        self,
        store: ModelStore,
        metrics: Metrics,
        *,
        token: str | None = None,
        admin: bool | None = None,
        max_body_bytes: int = 16 << 20,
        preprocess: Executor | None = None,
    ) -> None:
        self.store = store
        if preprocess is None:
            preprocess = ThreadPoolExecutor(max_workers=preprocess_workers(),
                                            thread_name_prefix="edgeslim-pre")
        self.preprocess = preprocess
        self.metrics = metrics
        self.admin = bool(token) if admin is None else admin
        self.max_body = max_body_bytes
        self.max_elements = max(1, max_body_bytes)  # a tensor cannot hold more than the body
        ep = self._endpoint
        v = "/v2/models/{name}/versions/{version}"
        routes = [
            Route("/v2/health/live", ep("live", self.live), methods=["GET"]),
            Route("/v2/health/ready", ep("ready", self.ready), methods=["GET"]),
            Route("/v2", ep("server_metadata", self.server_metadata), methods=["GET"]),
            Route("/v2/models/{name}", ep("model_metadata", self.model_metadata),
                  methods=["GET"]),
            Route(v, ep("model_metadata", self.model_metadata), methods=["GET"]),
            Route("/v2/models/{name}/ready", ep("model_ready", self.model_ready),
                  methods=["GET"]),
            Route(v + "/ready", ep("model_ready", self.model_ready), methods=["GET"]),
            Route("/v2/models/{name}/infer", ep("infer", self.infer), methods=["POST"]),
            Route(v + "/infer", ep("infer", self.infer), methods=["POST"]),
            Route("/v2/models/{name}/raw", ep("raw", self.raw), methods=["POST"]),
            Route(v + "/raw", ep("raw", self.raw), methods=["POST"]),
            Route("/v2/repository/index", ep("repository", self.index), methods=["POST"]),
            Route("/v2/repository/models/{name}/load", ep("load", self.load),
                  methods=["POST"]),
            Route("/v2/repository/models/{name}/unload", ep("unload", self.unload),
                  methods=["POST"]),
            Route("/metrics", ep("metrics", self.prometheus), methods=["GET"]),
        ]
        starlette = Starlette(routes=routes, exception_handlers={
            HTTPException: self._http_exception,
            Exception: self._crash,
        })
        self.starlette = starlette
        self.asgi = BearerAuth(
            self._dispatch, token, is_open=lambda scope: scope["path"] in OPEN_PATHS,
            on_refused=lambda seconds: metrics.observe("auth", "", 401, seconds))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self.asgi(scope, receive, send)

    async def _dispatch(self, scope: dict, receive: Any, send: Any) -> None:
        """``POST .../infer`` straight to ``_infer_asgi``; everything else through starlette."""
        if scope["type"] == "http" and scope["method"] == "POST":
            m = INFER_PATH.fullmatch(scope["path"])
            if m is not None:
                await self._infer_asgi(scope, receive, send, m[1], m[2])
                return
        await self.starlette(scope, receive, send)

    async def _infer_asgi(self, scope: dict, receive: Any, send: Any, name: str,
                          version: str | None) -> None:
        """The inference endpoint in plain ASGI: the hot path, without routing, request and
        response objects (the same checks, errors and metrics as every other endpoint)."""
        t0 = time.perf_counter()
        self.metrics.enter()
        try:
            content, out_headers = await self._infer(name, version, request_headers(scope),
                                                     receive)  # fmt: skip
            status = 200
        except ClientGone:
            return
        except Exception as exc:
            status, message = error_status(exc, "infer")
            content = json.dumps({"error": message}).encode()
            out_headers = {"content-type": "application/json"}
        finally:
            self.metrics.leave()
        raw = [(b"content-length", str(len(content)).encode())]
        raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in out_headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": content})
        model = name if self.store.get(name) is not None else ""
        self.metrics.observe("infer", model, status, time.perf_counter() - t0)

    # ------------------------------------------------------------------- plumbing

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        status = exc.status_code
        msg = {404: f"no endpoint {request.url.path!r}"[:200],
               405: f"{request.method} is not allowed on {request.url.path!r}"[:200]}.get(
            status, str(exc.detail))
        self.metrics.observe("unknown", "", status, 0.0)
        return error(status, msg, dict(exc.headers or {}))

    async def _crash(self, request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return error(500, f"internal error: {type(exc).__name__}")

    def _endpoint(self, label: str, fn: Handler) -> Handler:
        metrics = self.metrics

        async def handle(request: Request) -> Response:
            t0 = time.perf_counter()
            metrics.enter()
            try:
                resp = await fn(request)
            except Exception as exc:
                resp = error(*error_status(exc, label))
            finally:
                metrics.leave()
            name = request.path_params.get("name", "")
            model = name if name and self.store.get(name) is not None else ""
            metrics.observe(label, model, resp.status_code, time.perf_counter() - t0)
            return resp

        return handle

    def _model(self, request: Request) -> ServedModel:
        return self._lookup(request.path_params["name"], request.path_params.get("version"))

    def _lookup(self, name: str, version: str | None) -> ServedModel:
        model = self.store.get(name)
        if model is None:
            raise V2Error(f"unknown model {name!r}; this server has {self.store.names()}"[:300],
                          404)
        if version is not None and version != model.version:
            raise V2Error(f"model '{name}' has no version {version!r}; it serves version "
                          f"{model.version!r}"[:300], 404)
        return model

    # ------------------------------------------------------------------ endpoints

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ok = len(self.store) > 0
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": SERVER_NAME, "version": _version(),
                             "extensions": EXTENSIONS})

    async def model_metadata(self, request: Request) -> Response:
        return JSONResponse(self._model(request).metadata)

    async def model_ready(self, request: Request) -> Response:
        model = self._model(request)
        return JSONResponse({"name": model.name, "ready": True})

    async def infer(self, request: Request) -> Response:
        content, headers = await self._infer(
            request.path_params["name"], request.path_params.get("version"), request.headers,
            request.receive)
        media = headers.pop("content-type")
        return Response(content, headers=headers, media_type=media)

    async def _infer(self, name: str, version: str | None, headers: Any, receive: Any
                     ) -> tuple[bytes, dict[str, str]]:
        """One V2 inference: body and headers of the answer, or the error raised."""
        model = self._lookup(name, version)
        # Announced before its body is read, so that a batch forming meanwhile waits (up to
        # the window) for a request still arriving: a large tensor takes several reads.
        model.batcher.expect()
        try:
            body = await receive_body(receive, headers, self.max_body)
            header_length = parse_header_length(headers.get(HEADER_LENGTH_KEY), len(body))
            req = parse_infer_request(body, header_length, max_elements=self.max_elements)
            feeds = model.feeds(req)
            names = model.wanted_outputs(req)
        except BaseException:
            model.batcher.unexpect()
            raise
        outputs = await model.infer(feeds, expected=True)
        return encode_infer_response(model.name, model.version, req,
                                     {n: outputs[n] for n in names})

    async def raw(self, request: Request) -> Response:
        model = self._model(request)
        model.batcher.expect()  # as for infer: announced while its body and preprocessing run
        try:
            feeds, context = await self._raw_feeds(request, model)
        except BaseException:
            model.batcher.unexpect()
            raise
        outputs = await model.infer(feeds, expected=True)
        results = model.post.apply(outputs, context)
        doc: dict[str, Any] = {"model_name": model.name, "model_version": model.version,
                               "outputs": {}}
        for key, value in results.items():
            if isinstance(value, np.ndarray):
                check_json_safe(key, value)
                doc["outputs"][key] = value.tolist()
            else:
                doc[key] = value
        try:
            content = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
        except ValueError:  # a NaN score from postprocessing
            raise V2Error(f"the answer of model '{model.name}' holds NaN or infinity, which "
                          f"JSON cannot carry", 422) from None
        return Response(content, media_type="application/json")

    async def _raw_feeds(self, request: Request, model: ServedModel
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The raw payload of ``request`` through the model's preprocessing: the model feeds,
        checked, and the postprocessing context (the feeds and every other array that
        preprocessing gave, such as an ``attention_mask`` the model does not take)."""
        body = await read_body(request, self.max_body)
        kind = model.pipeline.raw_kind
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "bytes":
            payload: Any = body
        elif kind == "text" and ctype == "text/plain":
            try:
                payload = body.decode("utf-8")
            except UnicodeDecodeError:
                raise V2Error("the text/plain body is not UTF-8") from None
        else:
            try:
                payload = json.loads(body)
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                want = "a JSON string or list of strings" if kind == "text" else "a JSON array"
                raise V2Error(f"model '{model.name}' takes {want}; the body is not valid "
                              f"JSON: {exc}"[:300]) from None
        # on the bounded pool, not asyncio's default one (cpu + 4 threads, shared with loads)
        loop = asyncio.get_running_loop()
        feeds, context = await loop.run_in_executor(self.preprocess,
                                                    model.pipeline.apply_with_context, payload)
        # (the context already holds the feeds: apply_with_context merges them in)
        return model.runner.check_inputs(feeds), context

    async def index(self, request: Request) -> Response:
        return JSONResponse(self.store.index())

    def _check_admin(self) -> None:
        if self.admin:
            return
        if self.asgi.expected is not None:  # a token, but admin=False (a fleet node)
            raise V2Error("the model repository endpoints (load, unload) are off on this "
                          "server: what it serves is changed by its owner (a fleet node: "
                          "the controller's deployments)", 403)
        raise V2Error("the model repository endpoints (load, unload) are off: start the "
                      "server with a token (--token or EDGESLIM_TOKEN) to use them", 403)

    async def load(self, request: Request) -> Response:
        self._check_admin()
        name = request.path_params["name"]
        body = await read_body(request, 1 << 20)
        try:
            doc = json.loads(body) if body.strip() else {}
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise V2Error(f"the load request is not valid JSON: {exc}"[:300]) from None
        params = doc.get("parameters") if isinstance(doc, dict) else None
        path = (params or {}).get("bundle") if isinstance(params, dict) else None
        if path is None and isinstance(doc, dict):
            path = doc.get("bundle")
        if not isinstance(path, str) or not path:
            raise V2Error('the load request needs {"parameters": {"bundle": "/path/model.eslim"}}')
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            raise V2Error(f"the bundle path {path!r} is not valid Unicode"[:300]) from None
        served = await asyncio.to_thread(self.store.load, path, name=name)
        return JSONResponse({"loaded": served.info()})

    async def unload(self, request: Request) -> Response:
        self._check_admin()
        name = request.path_params["name"]
        if not self.store.unload(name):
            raise V2Error(f"unknown model {name!r}; this server has {self.store.names()}"[:300],
                          404)
        return JSONResponse({"unloaded": name})

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)


class EdgeServer:
    """An edge node's inference server, for the CLI and for embedding in a node agent.

    ``bundles`` are loaded before serving. ``port=0`` picks a free port (see ``port`` after
    ``start()``). ``token`` turns on bearer auth and, unless ``admin=False``, the ``load`` and
    ``unload`` endpoints (``admin=True`` without a token opens them to anyone who reaches the
    port); ``public_key`` makes every load verify the bundle's signature. ``max_batch`` > 1
    batches concurrent requests for models with a dynamic batch axis (``batch_window_ms`` is the
    most a request waits for company); model runs expected to take at most ``inline_ms`` run on
    the event loop, slower ones in a worker, except that a lone request of the only connected
    client runs on the loop for up to 50 ms (see ``Batcher``); ``threads`` are onnxruntime
    intra-op threads per model and ``spin`` whether idle ones spin-wait for the next run (see
    ``Runner``); ``workers`` run model calls. ``/raw`` preprocessing runs on its own pool of
    ``preprocess_workers()`` threads (one per CPU), so at most that many payloads are decoded at
    once.
    ``connections.open`` counts the open HTTP connections.

    Shutdown (SIGINT/SIGTERM under ``serve_forever``, or ``stop()``) stops accepting, lets the
    requests in flight finish for at most ``drain_s`` seconds, then closes the connections
    still open (a client that stalls mid-request cannot keep the node from exiting); a second
    SIGINT or SIGTERM closes them at once.

    ``app`` is the ASGI application; a node agent may replace it with a wrapper (middleware)
    before ``start()``, which serves whatever ``app`` holds then. ``metrics`` (Prometheus
    families) and ``store`` (the ``ModelStore``) are public too.

    Example (a node agent)::

        server = EdgeServer(["digits.eslim"], port=8000, token="s3cret").start()
        server.swap("/var/lib/edgeslim/digits-v2.eslim")   # zero-downtime hot swap
        server.stop()
    """

    def __init__(
        self,
        bundles: list[Any] | tuple[Any, ...] = (),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        admin: bool | None = None,
        public_key: Any = None,
        max_batch: int = 32,
        batch_window_ms: float = 2.0,
        inline_ms: float = 4.0,
        max_body_mb: float = 16.0,
        threads: int | None = None,
        spin: bool = True,
        workers: int = 1,
        drain_s: float = DRAIN_S,
    ) -> None:
        from edgeslim._validate import check_int_range, check_positive

        if isinstance(bundles, (str, os.PathLike)) or not isinstance(bundles, (list, tuple)):
            raise ConfigError(f"The 'bundles' parameter of EdgeServer must be a list of bundle "
                              f"paths (or Bundles), e.g. [{str(bundles)!r}]. Got "
                              f"{type(bundles).__name__} instead.")
        if not isinstance(host, str) or not host:
            raise ConfigError(f"The 'host' parameter of EdgeServer must be an address such as "
                              f"'127.0.0.1' or '::'. Got {host!r} instead.")
        check_int_range(port, "port", "EdgeServer", 0, 65535)
        check_int_range(max_batch, "max_batch", "EdgeServer", 1, 65536)
        check_positive(batch_window_ms, "batch_window_ms", "EdgeServer", allow_zero=True)
        check_positive(inline_ms, "inline_ms", "EdgeServer", allow_zero=True)
        check_positive(max_body_mb, "max_body_mb", "EdgeServer")
        if max_body_mb < MIN_BODY_MB:
            raise ConfigError(f"The 'max_body_mb' parameter of EdgeServer must be at least "
                              f"{MIN_BODY_MB} (about 1 kB; the default is 16). Got "
                              f"{max_body_mb!r} instead.")
        check_int_range(workers, "workers", "EdgeServer", 1, 256)
        check_positive(drain_s, "drain_s", "EdgeServer", allow_zero=True)
        if threads is not None:
            check_int_range(threads, "threads", "EdgeServer", 1, 256)
        if not isinstance(spin, bool):
            raise ConfigError(f"The 'spin' parameter of EdgeServer must be True or False. "
                              f"Got {spin!r} instead.")
        check_token(token, "EdgeServer")
        if admin is not None and not isinstance(admin, bool):
            raise ConfigError(f"The 'admin' parameter of EdgeServer must be True, False or None "
                              f"(on with a token). Got {admin!r} instead.")
        self.host = host
        self._port = port
        self.drain_s = float(drain_s)
        self.executor = ThreadPoolExecutor(max_workers=workers,
                                           thread_name_prefix="edgeslim-infer")
        self.preprocess_executor = ThreadPoolExecutor(max_workers=preprocess_workers(),
                                                      thread_name_prefix="edgeslim-pre")
        self.metrics = Metrics()
        self.connections = Connections()
        self.store = ModelStore(self.executor, public_key=public_key, threads=threads, spin=spin,
                                max_batch=max_batch, batch_window_ms=batch_window_ms,
                                inline_ms=inline_ms, solo=self.connections.one,
                                metrics=self.metrics)
        sources: dict[str, Any] = {}
        for bundle in bundles:
            served = self.store.load(bundle)
            if served.name in sources:  # one name serves one model: refuse, do not shadow
                raise ConfigError(
                    f"two bundles hold the model '{served.name}': {sources[served.name]} and "
                    f"{served.source or bundle}; serve one of them (a node serves one version "
                    f"of each model name, and 'load' swaps it)")
            sources[served.name] = served.source or bundle
        self.max_body_bytes = int(max_body_mb * (1 << 20))
        self.app = EdgeApp(self.store, self.metrics, token=token, admin=admin,
                           max_body_bytes=self.max_body_bytes,
                           preprocess=self.preprocess_executor)
        self._server: Any = None
        self._thread: Any = None
        self._stopped = False

    # --------------------------------------------------------------- models

    def swap(self, bundle: Any, *, name: str | None = None) -> dict[str, Any]:
        """Load ``bundle`` beside the served model and switch to it (see ``ModelStore.load``).

        Blocking (read, verify, warm-up, probe); safe to call from any thread while serving.
        Returns the new model's ``info()``; on failure raises and the old model keeps serving.
        """
        return self.store.load(bundle, name=name).info()

    load = swap

    def unload(self, name: str) -> bool:
        return self.store.unload(name)

    def models(self) -> list[dict[str, Any]]:
        """``info()`` of every served model."""
        return [m.info() for n in self.store.names() if (m := self.store.get(n)) is not None]

    # -------------------------------------------------------------- serving

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    def _socket(self) -> Any:
        import socket

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):  # accepted sockets inherit it; best effort
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        try:
            sock.bind((self.host, self._port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"Cannot listen on {self.host}:{self._port}: "
                              f"{exc.strerror or exc}.") from None
        self._port = sock.getsockname()[1]
        return sock

    def _uvicorn(self) -> Any:
        import uvicorn

        tune_malloc()
        # proxy_headers off: the node never reads the client address, and uvicorn's
        # X-Forwarded-For middleware would wrap every request for nothing
        config = uvicorn.Config(self.app,
                                http=edge_protocol(self.max_body_bytes, self.connections),
                                lifespan="off", access_log=False,
                                log_level="warning", timeout_keep_alive=30,
                                server_header=False, proxy_headers=False)
        return draining_server(config, self.drain_s)

    def start(self, timeout: float = 30.0) -> EdgeServer:
        """Serve in a background thread; return once the socket accepts connections."""
        import threading

        if self._thread is not None or self._stopped:
            raise ConfigError("This EdgeServer is already started or was stopped; an "
                              "EdgeServer serves once (create a new one).")
        sock = self._socket()
        self._server = self._uvicorn()
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="edgeslim-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"The edge server did not start on {self.url}.")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop serving and free the workers: the requests in flight get ``timeout`` seconds
        (default ``drain_s``) to finish, then the connections still open are closed."""
        from edgeslim._validate import check_positive

        if timeout is not None:
            check_positive(timeout, "timeout", "EdgeServer.stop", allow_zero=True)
        if self._server is not None:
            if timeout is not None:
                self._server.drain_s = float(timeout)
            self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(self._server.drain_s + HANG_UP_S + 5.0)
        self._server = self._thread = None
        self._stopped = True
        self._shutdown_executors()

    def serve_forever(self, announce: Callable[[str], None] | None = None) -> None:
        """Serve in this thread until SIGINT/SIGTERM (the CLI); ``announce(url)`` once bound."""
        sock = self._socket()
        if announce is not None:
            announce(self.url)
        self._server = self._uvicorn()
        try:
            self._server.run(sockets=[sock])
        finally:
            self._shutdown_executors()

    def _shutdown_executors(self) -> None:
        for pool in (self.executor, self.preprocess_executor):
            pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> EdgeServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
