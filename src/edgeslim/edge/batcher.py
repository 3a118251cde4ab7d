"""Dynamic micro-batching on the server's event loop.

Concurrent requests for a model with a dynamic batch axis are concatenated along axis 0, run
as one batch, and the outputs are split back by each request's rows.

Policy (the project's own): a request never waits for company it cannot get. While a batch runs,
new requests queue up and the next batch takes them all (up to ``max_batch`` rows). When the
queue is short, the batcher waits up to ``window_ms`` for more, but only while other requests
for the same model have been admitted by the server and not yet submitted (``expect()``), so a
lone client at concurrency 1 pays no window at all. Requests whose non-batch shapes or dtypes
differ are never mixed. When a batched run fails, or an output lacks the batch axis, each
request of that batch is run on its own, so one bad request fails alone.

A fast run (``rows`` times the recent time per row is under ``inline_ms``), batched or not,
runs right on the event loop: handing a 50-microsecond run to a worker thread and back costs
more than the run itself. Slower runs go to the worker threads, so that the loop keeps reading
requests meanwhile: while the loop runs a model, arriving requests stay unseen in the socket
buffers, where they can neither join the next batch nor count as load (for offloading). A
node whose lone client waits for each answer would only pay for that, so while ``solo()``
says a single client is connected and nothing else is in flight, a run of up to
``solo_inline_ms`` runs on the loop too (new connections wait for it in the kernel's accept
queue, at most that long). Before a lone request runs inline it yields once to the event loop,
so that the requests the server read in the same turn announce themselves and join one batch.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeslim._validate import check_int_range, check_positive

Arrays = dict[str, np.ndarray]
RunFn = Callable[[Arrays], Arrays]


@dataclass
class _Item:
    inputs: Arrays
    rows: int
    key: tuple[Any, ...]
    future: asyncio.Future[Arrays]


def batch_key(inputs: Arrays) -> tuple[tuple[Any, ...], int] | None:
    """``(key, rows)`` for requests that may share a batch, None when it cannot be batched."""
    rows = -1
    key = []
    for name, arr in inputs.items():
        if arr.ndim == 0:
            return None
        if rows == -1:
            rows = arr.shape[0]
        elif arr.shape[0] != rows:
            return None
        key.append((name, arr.dtype.str, arr.shape[1:]))
    if rows <= 0:
        return None
    return tuple(key), rows


class Batcher:
    """Queue of requests for one model, run in batches of up to ``max_batch`` rows.

    ``run`` maps ``{input: array (N, ...)}`` to ``{output: array (N, ...)}`` and is called in
    ``executor``. ``on_batch(rows)`` is told the rows of each model run (for metrics).
    """

    def __init__(
        self,
        run: RunFn,
        executor: Executor,
        *,
        max_batch: int = 32,
        window_ms: float = 2.0,
        inline_ms: float = 4.0,
        solo_inline_ms: float = 50.0,
        solo: Callable[[], bool] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.max_batch = check_int_range(max_batch, "max_batch", "Batcher", 1, 65536)
        self.window = check_positive(window_ms, "window_ms", "Batcher", allow_zero=True) / 1e3
        self.inline = check_positive(inline_ms, "inline_ms", "Batcher", allow_zero=True) / 1e3
        self.solo_inline = check_positive(solo_inline_ms, "solo_inline_ms", "Batcher",
                                          allow_zero=True) / 1e3
        self._solo = solo
        self.row_seconds = math.inf  # moving average of recent model runs, per row
        self._active = 0
        self._run_fn = run
        self._executor = executor
        self._on_batch = on_batch
        self._pending: collections.deque[_Item] = collections.deque()
        self._expected = 0
        self._arrival: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.fallbacks = 0

    # -------------------------------------------------------------- announcing arrivals

    def expect(self) -> None:
        """A request for this model was admitted and will ``submit`` (or ``unexpect``) soon."""
        self._expected += 1

    def unexpect(self) -> None:
        """An admitted request will not submit after all (bad input)."""
        self._expected = max(0, self._expected - 1)
        self._wake()

    def _wake(self) -> None:
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)

    # ------------------------------------------------------------------------ submit

    async def submit(self, inputs: Arrays, *, expected: bool = False) -> Arrays:
        """Run ``inputs`` (possibly with others) and return this request's outputs.

        ``expected=True`` when the caller announced the request with ``expect()``.
        """
        if expected:
            self._expected = max(0, self._expected - 1)
        self._active += 1
        try:
            kr = batch_key(inputs)
            rows = kr[1] if kr is not None else 1
            if self._alone(rows):
                if self.max_batch > 1:
                    # Let the requests the server read in the same loop turn reach the batcher
                    # first: a lone request still runs inline, a burst forms a batch.
                    await asyncio.sleep(0)
                if self._alone(rows):
                    return self._inline(inputs, rows)
            loop = asyncio.get_running_loop()
            if kr is None or self.max_batch == 1:
                return await self._call(loop, inputs, rows)
            key = kr[0]
            fut: asyncio.Future[Arrays] = loop.create_future()
            self._pending.append(_Item(inputs, rows, key, fut))
            self._wake()
            if self._task is None:
                self._task = loop.create_task(self._consume())
            return await fut
        finally:
            self._active -= 1

    def _fast(self, rows: int, limit: float | None = None) -> bool:
        """True when a run of ``rows`` is expected to take at most ``limit`` (``inline_ms``)."""
        return rows * self.row_seconds <= (self.inline if limit is None else limit)

    def _alone(self, rows: int) -> bool:
        """True when this is the only request in sight and its run is fast, or when it is
        also the only client's and its run takes at most ``solo_inline_ms``: run it now."""
        if not (self._active == 1 and self._expected == 0 and self._task is None):
            return False
        if self._fast(rows):
            return True
        return self._solo is not None and self._fast(rows, self.solo_inline) and self._solo()

    def _inline(self, inputs: Arrays, rows: int) -> Arrays:
        if self._on_batch is not None:
            self._on_batch(rows)
        return self._timed(inputs, rows)

    def _timed(self, inputs: Arrays, rows: int) -> Arrays:
        t0 = time.perf_counter()
        out = self._run_fn(inputs)
        dt = (time.perf_counter() - t0) / max(1, rows)
        self.row_seconds = dt if math.isinf(self.row_seconds) else 0.8 * self.row_seconds + 0.2 * dt
        return out

    async def _call(self, loop: asyncio.AbstractEventLoop, inputs: Arrays, rows: int) -> Arrays:
        """One model run: on the event loop when it is fast (a thread handoff would cost more
        than the run), else in a worker thread so the loop keeps reading requests."""
        if self._fast(rows):
            return self._inline(inputs, rows)
        if self._on_batch is not None:
            self._on_batch(rows)
        return await loop.run_in_executor(self._executor, self._timed, inputs, rows)

    # ---------------------------------------------------------------------- consumer

    def _ready_rows(self) -> int:
        return sum(item.rows for item in self._pending)

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                if self.window > 0 and self._expected > 0 and self._ready_rows() < self.max_batch:
                    deadline = loop.time() + self.window
                    while self._expected > 0 and self._ready_rows() < self.max_batch:
                        remaining = deadline - loop.time()
                        if remaining <= 0:
                            break
                        self._arrival = loop.create_future()
                        try:
                            await asyncio.wait_for(self._arrival, remaining)
                        except asyncio.TimeoutError:
                            break
                        finally:
                            self._arrival = None
                await self._run_batch(loop, self._take())
        finally:
            self._task = None

    def _take(self) -> list[_Item]:
        first = self._pending.popleft()
        batch, rows = [first], first.rows
        keep: list[_Item] = []
        while self._pending:
            item = self._pending.popleft()
            if item.key == first.key and rows + item.rows <= self.max_batch:
                batch.append(item)
                rows += item.rows
            else:
                keep.append(item)
                if rows >= self.max_batch:
                    break
        self._pending.extendleft(reversed(keep))
        return batch

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        live = [item for item in batch if not item.future.done()]  # cancelled by a disconnect
        if not live:
            return
        self.batches += 1
        if len(live) == 1:
            await self._run_alone(loop, live[0])
            return
        total = sum(item.rows for item in live)
        names = list(live[0].inputs)
        feeds = {n: np.concatenate([item.inputs[n] for item in live]) for n in names}
        try:
            out = await self._call(loop, feeds, total)
            if not all(np.ndim(a) > 0 and a.shape[0] == total for a in out.values()):
                raise ValueError("an output lacks the batch axis")
        except Exception:
            self.fallbacks += 1
            for item in live:
                await self._run_alone(loop, item)
            return
        start = 0
        for item in live:
            stop = start + item.rows
            if not item.future.done():
                item.future.set_result({n: a[start:stop] for n, a in out.items()})
            start = stop

    async def _run_alone(self, loop: asyncio.AbstractEventLoop, item: _Item) -> None:
        try:
            result = await self._call(loop, item.inputs, item.rows)
        except Exception as exc:
            if not item.future.done():
                item.future.set_exception(exc)
            return
        if not item.future.done():
            item.future.set_result(result)
