"""The node's inference server: the edge package's ``EdgeServer`` behind the fleet middleware.

A fleet node serves one model at a time. ``swap`` hands a bundle to ``EdgeServer.swap``,
which reads it, verifies its signature against the pinned key, warms it up and runs its
probe beside the model being served, and switches atomically only when all of that passed;
on any failure it raises and the old model keeps answering. A swap to a bundle with another
model name then unloads the old name, so the node never serves two.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeslim.fleet.protocol import ModelRef

__all__ = ["Serving"]

log = logging.getLogger("edgeslim.fleet.serving")


class Serving:
    """``EdgeServer`` on ``host:port`` whose ASGI app is wrapped by ``wrap(app)``.

    ``token`` turns on the edge server's bearer auth (health checks stay open), never its
    ``load``/``unload`` endpoints: the controller decides what a node serves, and the token is
    the fleet's, shared by every client and peer; ``max_body_mb`` is its request body limit."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        public_key: Any,
        threads: int = 1,
        wrap: Callable[[Any], Any] | None = None,
        max_batch: int = 8,
        token: str | None = None,
        max_body_mb: float = 16.0,
    ) -> None:
        from edgeslim.edge.server import EdgeServer

        self.server = EdgeServer(
            host=host, port=port, public_key=public_key, threads=threads, max_batch=max_batch,
            token=token, admin=False, max_body_mb=max_body_mb,
        )
        if wrap is not None:
            # EdgeServer serves whatever ``app`` holds when it starts: put the middleware there.
            self.server.app = wrap(self.server.app)
        self._bundle: str | None = None
        self._model: ModelRef | None = None

    def start(self) -> Serving:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    @property
    def port(self) -> int:
        return int(self.server.port)

    @property
    def url(self) -> str:
        return str(self.server.url)

    def swap(self, path: Path, bundle_sha: str) -> ModelRef:
        """Serve the bundle at ``path`` (sha256 ``bundle_sha``); on failure raise, keep the old."""
        info = self.server.swap(str(path))
        ref = ModelRef(
            name=info["name"],
            version=str(info["version"]),
            sha256=info["sha256"],
            bundle=bundle_sha,
        )
        for other in [m["name"] for m in self.server.models() if m["name"] != ref.name]:
            self.server.unload(other)
        self._model = ref
        return ref

    @property
    def model(self) -> ModelRef | None:
        """What is being served now (None before the first successful swap)."""
        return self._model
