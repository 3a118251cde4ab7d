"""HTTP/1.1 protocol tuning for the edge server: one send per response, bodies read in one go.

uvicorn writes a response's status line and headers as soon as the app sends
``http.response.start`` and the body on ``http.response.body``; with TCP_NODELAY that is two
segments and two send calls per response, and the client wakes up twice. The transport that
``edge_protocol()`` installs (``_CoalescingTransport``) gathers every write made during one
turn of the event loop and sends them with a single call at the end of that turn, so an
ordinary response leaves as one segment. Nothing is held back longer than the turn that
wrote it, and a close sends whatever is gathered first.

``RECEIVE_BUFFER`` is the socket receive buffer the server asks for: a 600 kB image tensor then
arrives in a few reads instead of a dozen, each of which wakes the event loop.

``tune_malloc`` keeps the C heap from handing large freed blocks back to the kernel. By
default glibc serves each buffer over ~128 kB (a request body, its copy for the app) from
fresh pages, and faulting in the 150 pages of a 600 kB image body costs more than moving it
through the socket: on the project's machine it is the difference between 1.2 ms and 0.5 ms
per request for a 600 kB POST.

``draining_server`` is the uvicorn server every HTTP server of the project runs (the edge
server, the fleet controller's API): its shutdown waits for the requests in flight for a
bounded time, then closes the connections still open.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from edgeslim.edge import DRAIN_S

log = logging.getLogger(__name__)

#: Seconds the requests of the connections closed at the end of the drain get to end.
HANG_UP_S = 1.0

#: Bytes asked for as SO_RCVBUF on the listening socket (the kernel caps it at rmem_max).
RECEIVE_BUFFER = 4 << 20

#: Blocks up to this size come from the heap and stay there when freed (glibc's maximum).
MALLOC_KEEP = 32 << 20

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_malloc_tuned: bool | None = None


def tune_malloc() -> bool:
    """Keep freed blocks of up to ``MALLOC_KEEP`` bytes in the heap (see module doc).

    glibc only (``mallopt``); returns False and changes nothing elsewhere. Affects the whole
    process, once; the cost is that the process keeps up to ~64 MB of freed heap for reuse.
    """
    global _malloc_tuned
    if _malloc_tuned is None:
        _malloc_tuned = False
        import ctypes
        import platform
        import sys

        if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
            try:
                mallopt = ctypes.CDLL(None).mallopt
                mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                _malloc_tuned = bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_KEEP)) and bool(
                    mallopt(_M_TRIM_THRESHOLD, 2 * MALLOC_KEEP))
            except (OSError, AttributeError):
                _malloc_tuned = False
    return _malloc_tuned


class _CoalescingTransport:
    """A transport that sends the writes of one event-loop turn together (see module doc)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._chunks: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._chunks.append(bytes(data))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        """Send what was gathered, as one write."""
        self._scheduled = False
        if not self._chunks:
            return
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._chunks.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(c) for c in self._chunks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class Connections:
    """How many HTTP connections are open now (kept by ``edge_protocol``'s protocol)."""

    def __init__(self) -> None:
        self.open = 0

    def one(self) -> bool:
        """True while exactly one client connection is open."""
        return self.open == 1


def edge_protocol(body_buffer: int, connections: Connections | None = None
                  ) -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol, tuned for tensors; ``"auto"`` without httptools.

    ``connections`` (optional) is kept up to date with the number of open connections.

    Writes are coalesced (see the module doc). Reading pauses only once ``body_buffer`` bytes
    of a request body wait for the app, not at uvicorn's 64 kB: at 64 kB a 600 kB body is read
    in ten pause/resume rounds, each a few system calls and a wake-up of the app's task, which
    cost more than the whole transfer. The server passes its body limit, so a connection never
    buffers more than a request the server would accept anyway.
    """
    try:
        from uvicorn.protocols.http.flow_control import FlowControl
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools missing: uvicorn's pure-Python h11 protocol
        return "auto"

    class BodyFlow(FlowControl):  # type: ignore[misc]
        """Flow control that lets up to ``body_buffer`` bytes of a request body queue up."""

        def __init__(self, transport: Any, protocol: Any) -> None:
            super().__init__(transport)
            self._protocol = protocol

        def pause_reading(self) -> None:
            cycle = getattr(self._protocol, "cycle", None)
            body = getattr(cycle, "body", None)
            if body is None or len(body) > body_buffer:
                super().pause_reading()

    class EdgeHttp(HttpToolsProtocol):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            wrapped = _CoalescingTransport(transport, asyncio.get_running_loop())
            super().connection_made(wrapped)  # type: ignore[arg-type]
            self.flow = BodyFlow(wrapped, self)
            if connections is not None:
                connections.open += 1

        def connection_lost(self, exc: Exception | None) -> None:
            if connections is not None:
                connections.open -= 1
            super().connection_lost(exc)

    return EdgeHttp


class _CancelledAtExit(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" for a request task cancelled as the
    server exits (one still waiting on a model run or a load after the drain): the shutdown
    has said what it cut short, and a traceback would read as a crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, asyncio.CancelledError)


_CANCELLED_AT_EXIT = _CancelledAtExit()


@functools.cache
def _draining_server_class() -> type[Any]:
    import uvicorn

    class DrainingServer(uvicorn.Server):  # type: ignore[misc]
        """uvicorn's server with a bounded shutdown (see ``draining_server``). It returns after
        SIGINT/SIGTERM (no re-raised signal), so a CLI serving with it exits 0."""

        drain_s = DRAIN_S
        hung_up = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit:  # a second signal: stop waiting for the requests
                self.force_exit = True
            self.should_exit = True

        async def shutdown(self, sockets: Any = None) -> None:
            # uvicorn waits for the open connections without a bound (and, on Python
            # 3.12+, also after a forced exit): close those left at the deadline, which
            # ends its wait, and the requests on them see the client gone
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.drain_s
            waiting = loop.create_task(super().shutdown(sockets))
            while not waiting.done():
                if self.force_exit or loop.time() >= deadline:
                    self.hang_up()
                await asyncio.wait({waiting}, timeout=0.05)
            await waiting
            if self.server_state.tasks:  # a run or load under way; then asyncio cancels
                await asyncio.wait(set(self.server_state.tasks), timeout=HANG_UP_S)

        def hang_up(self) -> None:
            """Close the connections still open (once); their requests see the client gone."""
            self.force_exit = True
            if self.hung_up:
                return
            self.hung_up = True
            left = [c for c in self.server_state.connections if not c.transport.is_closing()]
            if left:
                log.warning("%d connection%s still open after the %g s drain; closing %s",
                            len(left), "s" if len(left) > 1 else "", self.drain_s,
                            "them" if len(left) > 1 else "it")
            for connection in left:
                connection.transport.close()

    return DrainingServer


def draining_server(config: Any, drain_s: float) -> Any:
    """A ``uvicorn.Server`` for ``config`` whose shutdown is bounded.

    Once asked to exit (``should_exit``, or SIGINT/SIGTERM when it runs in the main thread) it
    stops accepting and lets the requests in flight finish for at most ``drain_s`` seconds
    (``server.drain_s``, which may be changed until then); the connections still open then are
    closed, so a client that stalls mid-request cannot keep the process, or the thread serving,
    from ending. A second signal closes them at once. Stock uvicorn waits for them for ever.
    """
    logging.getLogger("uvicorn.error").addFilter(_CANCELLED_AT_EXIT)
    server = _draining_server_class()(config)
    server.drain_s = float(drain_s)
    return server
