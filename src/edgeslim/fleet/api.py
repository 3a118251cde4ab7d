"""The controller's HTTP API (starlette): bundles by sha256 with Range, nodes, deployments.

| method | path                          | what                                                  |
|--------|-------------------------------|-------------------------------------------------------|
| GET    | ``/healthz``                  | ``{"ok": true, "broker": "connected" ...}``           |
| POST   | ``/bundles[?force=1]``        | body = the ``.eslim`` bytes; stores it by sha256      |
| GET    | ``/bundles``                  | stored bundles                                        |
| GET    | ``/bundles/SHA``              | the bundle bytes; ``Range: bytes=N-`` resumes (206)    |
| GET    | ``/nodes``                    | every node (``online`` computed from ``last_seen``)    |
| POST   | ``/deployments``              | ``{"bundle": SHA, "selector": {}, "params": {...}}``  |
| GET    | ``/deployments[/ID]``         | deployments with targets; ``latest``: the newest      |
| POST   | ``/deployments/ID/rollback``  | roll back (``latest`` for the newest)                 |
| GET    | ``/records?kind=&node=&since=``| stored outbox records (telemetry, reports, results)  |

With a token (``Controller(token=...)``, ``edgeslim fleet controller --token``) every request
needs ``Authorization: Bearer TOKEN`` (else 401) but two: ``GET /healthz`` and ``GET``/``HEAD
/bundles/SHA``, the download every node makes. Those stay open because nodes hold no API token
and need none: a bundle is signed, and each node verifies it against its pinned key before
using it; anyone who reaches the API can read a bundle whose sha256 they know, nothing more.

Errors are JSON ``{"error": MESSAGE}`` with 400 (bad input), 401 (no or a wrong token), 404,
409 (conflict), 413 (an upload over ``MAX_UPLOAD``), 422 (a bundle that does not verify) or
507 (the controller could not store an upload: its disk is full, say; nothing is kept).
An upload is streamed to a file in the bundles folder, never held in memory. Bundles are
immutable, so their responses carry a strong ``ETag`` (the sha256) and ``Cache-Control:
immutable``; Range handling is starlette's.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any

from edgeslim.edge.auth import BearerAuth
from edgeslim.errors import ConfigError, EdgeslimError, SignatureError
from edgeslim.fleet.rollout import RolloutParams

if TYPE_CHECKING:
    from edgeslim.fleet.controller import Controller

__all__ = ["TOKEN_ENV", "build_app", "is_open"]

log = logging.getLogger(__name__)

TOKEN_ENV = "EDGESLIM_FLEET_TOKEN"  # the token of the controller and of the operator verbs

MAX_UPLOAD = 2 << 30  # bytes; an upload is refused (413) as soon as it passes this
WRITE_BYTES = 1 << 20  # an upload is written to its file in pieces of about this size
_DOWNLOAD = re.compile(r"/bundles/[^/]+")  # GET/HEAD: open, as are these
OPEN_PATHS = frozenset({"/healthz"})


def is_open(scope: dict[str, Any]) -> bool:
    """Whether a request needs no token: ``OPEN_PATHS`` and bundle downloads."""
    path = scope["path"]
    return path in OPEN_PATHS or (
        scope["method"] in ("GET", "HEAD") and _DOWNLOAD.fullmatch(path) is not None
    )


def build_app(c: Controller) -> Any:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Route

    from edgeslim.fleet.controller import Conflict, NotFound

    def error(exc: EdgeslimError) -> JSONResponse:
        status = 400  # ConfigError, BundleError: bad input
        if isinstance(exc, SignatureError):
            status = 422
        elif isinstance(exc, Conflict):
            status = 409
        elif isinstance(exc, NotFound):
            status = 404
        return JSONResponse({"error": str(exc)}, status_code=status)

    def too_large(size: int, limit: int, sent: str = "") -> JSONResponse:
        return JSONResponse({"error": f"A bundle of {sent}{size} bytes is over the limit of "
                                      f"{limit} bytes."}, status_code=413)  # fmt: skip

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True, "broker": c.link.state.value, "time": time.time()})

    async def upload(request: Request) -> Response:
        limit = MAX_UPLOAD
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return too_large(int(declared), limit)
        force = request.query_params.get("force", "0") in ("1", "true", "yes")
        # Streamed to a file as it arrives, counted as it goes: a body sent chunked (no
        # Content-Length) is held to the same limit, and nothing is kept in memory.
        path = c.upload_path()
        try:
            size = 0
            with open(path, "xb") as f:
                pending = bytearray()
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        return too_large(size, limit, sent="at least ")
                    pending += chunk
                    if len(pending) >= WRITE_BYTES:
                        await run_in_threadpool(f.write, pending)
                        pending.clear()
                await run_in_threadpool(f.write, pending)
            info = await run_in_threadpool(c.add_bundle, path, force=force)
        except ClientDisconnect:  # nobody is left to answer
            return Response(status_code=400)
        except EdgeslimError as exc:
            return error(exc)
        except OSError as exc:  # a full disk, a file size limit, an I/O error: not the client's
            log.error("cannot store an upload: %s", exc)
            cause = exc.strerror or type(exc).__name__
            return JSONResponse({"error": f"The controller cannot store the bundle: {cause} "
                                          f"(errno {exc.errno}); free space on its disk, then "
                                          "upload again."}, status_code=507)  # fmt: skip
        finally:  # add_bundle took it or removed it; anything else removes it here
            path.unlink(missing_ok=True)
        return JSONResponse(info, status_code=201)

    def list_bundles(request: Request) -> Response:
        return JSONResponse(c.registry.bundles())

    async def get_bundle(request: Request) -> Response:
        sha = request.path_params["sha"]
        try:
            path = c.bundle_path(sha)
        except ConfigError as exc:
            return error(exc)
        if not path.exists():
            return JSONResponse({"error": f"No bundle {sha}"}, status_code=404)
        c.downloads.append((sha, request.headers.get("range")))
        headers = {"ETag": f'"{sha}"', "Cache-Control": "public, max-age=31536000, immutable"}
        return FileResponse(path, headers=headers, media_type="application/zip")

    def list_nodes(request: Request) -> Response:
        now = time.time()
        out = []
        for n in c.registry.nodes():
            d = n.to_dict()
            d["online"] = n.state != "offline" and now - n.last_seen <= c.offline_after
            d["age_s"] = round(now - n.last_seen, 3)
            out.append(d)
        return JSONResponse(out)

    async def create_deployment(request: Request) -> Response:
        try:
            body = await request.json()
            if not isinstance(body, dict) or not isinstance(body.get("bundle"), str):
                raise ConfigError('A deployment needs a JSON body {"bundle": SHA256, ...}.')
            selector = body.get("selector") or {}
            if not isinstance(selector, dict):
                raise ConfigError(f"'selector' must be an object of labels. Got {selector!r}.")
            params = RolloutParams.from_dict(dict(body.get("params") or {}))
            dep = await run_in_threadpool(
                c.deploy, body["bundle"], {str(k): str(v) for k, v in selector.items()}, params
            )
        except EdgeslimError as exc:
            return error(exc)
        except ValueError as exc:  # the body is not JSON
            return JSONResponse({"error": f"bad JSON body: {exc}"}, status_code=400)
        row = c.registry.deployment(dep)
        return JSONResponse(row.to_dict() if row else {"id": dep}, status_code=201)

    def list_deployments(request: Request) -> Response:
        return JSONResponse([d.to_dict() for d in c.registry.deployments()])

    def get_deployment(request: Request) -> Response:
        raw = request.path_params["dep"]
        if raw == "latest":  # as for rollback: the newest deployment
            rows = c.registry.deployments()
            if not rows:
                return JSONResponse({"error": "No deployment yet"}, status_code=404)
            return JSONResponse(max(rows, key=lambda d: d.id).to_dict())
        if not raw.isdigit():
            return JSONResponse({"error": "deployment id must be an integer or 'latest'"}, 400)
        row = c.registry.deployment(int(raw))
        if row is None:
            return JSONResponse({"error": f"No deployment {raw}"}, status_code=404)
        return JSONResponse(row.to_dict())

    def rollback(request: Request) -> Response:
        raw = request.path_params["dep"]
        if raw != "latest" and not raw.isdigit():
            return JSONResponse({"error": "deployment id must be an integer or 'latest'"}, 400)
        try:
            dep = c.rollback(None if raw == "latest" else int(raw))
        except EdgeslimError as exc:
            return error(exc)
        row = c.registry.deployment(dep)
        return JSONResponse(row.to_dict() if row else {"id": dep}, status_code=202)

    def records(request: Request) -> Response:
        q = request.query_params
        try:
            since = float(q.get("since", "0"))
        except ValueError:
            return JSONResponse({"error": "'since' must be Unix seconds"}, status_code=400)
        return JSONResponse(c.registry.records(node=q.get("node"), kind=q.get("kind"), since=since))

    routes = [
        Route("/healthz", healthz),
        Route("/bundles", upload, methods=["POST"]),
        Route("/bundles", list_bundles, methods=["GET"]),
        Route("/bundles/{sha}", get_bundle, methods=["GET", "HEAD"]),
        Route("/nodes", list_nodes),
        Route("/deployments", create_deployment, methods=["POST"]),
        Route("/deployments", list_deployments, methods=["GET"]),
        Route("/deployments/{dep}", get_deployment),
        Route("/deployments/{dep}/rollback", rollback, methods=["POST"]),
        Route("/records", records),
    ]
    app = Starlette(routes=routes)
    return BearerAuth(app, c.token, is_open=is_open,
                      hint=" with the token the controller was started with (--token)")
