"""Run an ASGI app with uvicorn on a background thread (controller API, node fallbacks)."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Any

from edgeslim.edge._http import HANG_UP_S, draining_server
from edgeslim.errors import ConfigError, MissingDependencyError

__all__ = ["ServerThread"]

log = logging.getLogger(__name__)


class ServerThread:
    """uvicorn on a daemon thread, bound before start (``port=0`` picks a free port).

    The socket is bound here, so ``port`` is known at once and two servers never race for it.
    The server is the edge server's (``edgeslim.edge._http.draining_server``): ``stop`` lets
    the requests in flight finish for a bounded time, then closes the connections still open,
    so a client stalled mid-request cannot keep it (or the thread) from ending.
    """

    def __init__(
        self, app: Any, host: str = "127.0.0.1", port: int = 0, name: str = "http"
    ) -> None:
        try:
            import uvicorn
        except ImportError as exc:  # pragma: no cover - the edge extra carries it
            raise MissingDependencyError(
                "The fleet HTTP API needs 'uvicorn'. Install it with: pip install 'edgeslim[edge]'"
            ) from exc
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise ConfigError(f"Cannot listen on {host}:{port}: {exc}. Pick another port.") from exc
        self.host = host
        self.port = int(self._sock.getsockname()[1])
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=30
        )
        self._server = draining_server(config, drain_s=5.0)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name=name, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"The HTTP server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving: the requests in flight get ``timeout`` seconds to finish, then the
        connections still open are closed and the server thread ends."""
        self._server.drain_s = float(timeout)
        self._server.should_exit = True
        if self._thread.is_alive():
            limit = timeout + HANG_UP_S + 5.0  # the drain, the hang-up, the loop's close
            self._thread.join(limit)
            if self._thread.is_alive():
                log.error("the HTTP server on %s did not stop within %g s", self.url, limit)
        with contextlib.suppress(OSError):
            self._sock.close()
