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
"""

from __future__ import annotations

import asyncio
from typing import Any

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
