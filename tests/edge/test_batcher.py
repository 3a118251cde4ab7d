"""Dynamic batching: results equal per-request runs, batches form, failures stay isolated."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edgeslim.edge.batcher import Batcher, batch_key

W = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)


class Model:
    """x @ W, recording the rows of each call; a row of NaN makes the call fail."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[int] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, feeds):
        x = feeds["x"]
        with self.lock:
            self.calls.append(x.shape[0])
        if self.delay:
            time.sleep(self.delay)
        if np.isnan(x).any():
            raise ValueError("NaN input")
        return {"y": x @ W, "first": x[:, :1] * 2}


def _run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(1) as ex:
        yield ex


def test_concurrent_requests_are_batched_and_split_back(pool):
    model = Model(delay=0.01)
    batcher = Batcher(model, pool, max_batch=16, window_ms=5)
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(int(rng.integers(1, 4)), 8)).astype(np.float32) for _ in range(20)]

    async def main():
        return await asyncio.gather(*(batcher.submit({"x": x}) for x in xs))

    outs = _run(main())
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_allclose(out["y"], x @ W, rtol=1e-6)
        np.testing.assert_array_equal(out["first"], x[:, :1] * 2)
    assert sum(model.calls) == sum(len(x) for x in xs)
    assert len(model.calls) < len(xs) and max(model.calls) <= 16


def test_one_failing_request_does_not_fail_the_others(pool):
    model = Model()
    batcher = Batcher(model, pool, max_batch=32, window_ms=5)
    xs = [np.ones((1, 8), np.float32) * i for i in range(6)]
    xs[3] = np.full((1, 8), np.nan, np.float32)

    async def main():
        for _ in range(6):
            batcher.expect()
        return await asyncio.gather(*(batcher.submit({"x": x}, expected=True) for x in xs),
                                    return_exceptions=True)

    outs = _run(main())
    assert isinstance(outs[3], ValueError)
    for i in (0, 1, 2, 4, 5):
        np.testing.assert_allclose(outs[i]["y"], xs[i] @ W, rtol=1e-6)
    assert model.calls[0] == 6 and batcher.fallbacks == 1  # one batch, then one by one


def test_incompatible_shapes_never_share_a_batch(pool):
    model = Model()
    batcher = Batcher(lambda f: {"y": f["x"].sum(axis=1)}, pool, max_batch=8, window_ms=1)
    a = np.ones((2, 8), np.float32)
    b = np.ones((2, 5), np.float32)

    async def main():
        return await asyncio.gather(batcher.submit({"x": a}), batcher.submit({"x": b}))

    ra, rb = _run(main())
    np.testing.assert_array_equal(ra["y"], [8, 8])
    np.testing.assert_array_equal(rb["y"], [5, 5])
    assert batch_key({"x": a}) != batch_key({"x": b}) and not model.calls


def test_lone_request_does_not_wait_for_the_window(pool):
    model = Model()
    batcher = Batcher(model, pool, max_batch=8, window_ms=2000)  # a huge window

    async def main():
        t0 = time.perf_counter()
        await batcher.submit({"x": np.ones((1, 8), np.float32)})
        return time.perf_counter() - t0

    assert _run(main()) < 1.0  # nobody else was admitted, so the 2 s window is skipped


def test_window_waits_for_admitted_requests(pool):
    model = Model()
    batcher = Batcher(model, pool, max_batch=8, window_ms=2000)

    async def late(x):
        await asyncio.sleep(0.05)
        return await batcher.submit({"x": x}, expected=True)

    async def main():
        batcher.expect()  # a second request has been admitted and is on its way
        return await asyncio.gather(batcher.submit({"x": np.ones((1, 8), np.float32)}),
                                    late(np.zeros((1, 8), np.float32)))

    _run(main())
    assert model.calls == [2]  # both ran in one batch


def test_max_batch_one_runs_each_request_alone(pool):
    model = Model()
    batcher = Batcher(model, pool, max_batch=1, window_ms=5)

    async def main():
        return await asyncio.gather(*(batcher.submit({"x": np.ones((1, 8), np.float32)})
                                      for _ in range(5)))

    _run(main())
    assert model.calls == [1] * 5


def test_a_burst_of_requests_for_a_fast_model_forms_a_batch(pool):
    """Requests that arrive in the same event-loop turn share a batch, even for a model fast
    enough to run inline when alone (no ``expect()`` announcements, as in a burst)."""
    model = Model()
    batcher = Batcher(model, pool, max_batch=16, window_ms=0)

    async def main():
        await batcher.submit({"x": np.ones((1, 8), np.float32)})  # alone: inline, timed
        assert batcher.row_seconds <= batcher.inline
        xs = [np.full((1, 8), i, np.float32) for i in range(8)]
        outs = await asyncio.gather(*(batcher.submit({"x": x}) for x in xs))
        for x, out in zip(xs, outs, strict=True):
            np.testing.assert_allclose(out["y"], x @ W, rtol=1e-6)
        t0 = time.perf_counter()
        await batcher.submit({"x": np.ones((1, 8), np.float32)})  # alone again: inline
        return time.perf_counter() - t0

    _run(main())
    assert model.calls[0] == 1 and model.calls[-1] == 1
    assert model.calls[1:-1] == [8]  # the burst ran as one batch


def test_slow_runs_leave_the_event_loop_free_and_fast_ones_stay_on_it(pool):
    """A run expected to take more than ``inline_ms`` goes to the worker thread, so the loop
    keeps serving (here: a ticker); a fast one runs on the loop thread itself."""
    threads: list[str] = []

    def run(feeds):
        threads.append(threading.current_thread().name)
        time.sleep(float(feeds["x"][0, 0]))
        return {"y": feeds["x"]}

    batcher = Batcher(run, pool, max_batch=8, window_ms=0, inline_ms=5)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.002)
                ticks += 1

        task = asyncio.get_running_loop().create_task(ticker())
        await batcher.submit({"x": np.full((1, 1), 0.05, np.float32)})  # first: measured
        before = ticks
        await batcher.submit({"x": np.full((1, 1), 0.05, np.float32)})  # known slow
        slow_ticks = ticks - before
        batcher.row_seconds = 0.0001  # now known fast
        await batcher.submit({"x": np.full((1, 1), 0.0, np.float32)})
        task.cancel()
        return slow_ticks

    assert _run(main()) >= 5  # the loop ticked while the 50 ms run was in the worker
    assert threads[1] != threading.main_thread().name  # slow: the worker
    assert threads[2] == threading.main_thread().name  # fast: the loop's own thread


@pytest.mark.parametrize("solo", [True, False])
def test_a_lone_request_of_the_only_client_runs_on_the_loop_up_to_the_solo_limit(pool, solo):
    threads: list[str] = []

    def run(feeds):
        threads.append(threading.current_thread().name)
        time.sleep(0.02)
        return {"y": feeds["x"]}

    batcher = Batcher(run, pool, max_batch=8, window_ms=0, inline_ms=1, solo_inline_ms=50,
                      solo=lambda: solo)

    async def main():
        for _ in range(3):
            await batcher.submit({"x": np.zeros((1, 1), np.float32)})

    _run(main())
    on_loop = [t == threading.main_thread().name for t in threads]
    # The first run is not timed yet (the worker); then 20 ms: over inline_ms, under 50 ms.
    assert on_loop == [False, solo, solo]


def test_a_request_cancelled_while_queued_is_not_run(pool):
    """A client that hung up before its batch ran costs no model rows; the rest are answered."""
    started = threading.Event()
    release = threading.Event()
    calls: list[int] = []

    def run(feeds):
        calls.append(feeds["x"].shape[0])
        started.set()
        release.wait(5)
        return {"y": feeds["x"] + 1}

    batcher = Batcher(run, pool, max_batch=8, window_ms=0)

    async def main():
        first = asyncio.ensure_future(batcher.submit({"x": np.zeros((1, 1), np.float32)}))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        # The first run blocks the worker; queue three more, then cancel one of them.
        rest = [asyncio.ensure_future(batcher.submit({"x": np.full((1, 1), i, np.float32)}))
                for i in (1, 2, 3)]
        await asyncio.sleep(0.01)
        rest[1].cancel()
        release.set()
        outs = await asyncio.gather(first, rest[0], rest[2])
        return [float(o["y"][0, 0]) for o in outs]

    assert _run(main()) == [1.0, 2.0, 4.0]
    assert calls == [1, 2]  # the cancelled request's row never reached the model


def test_a_model_whose_rows_depend_on_each_other_is_served_unbatched(tmp_path):
    """Batching promises that an answer does not depend on what it was batched with. A model
    that breaks it (here: each row less the batch mean; minilm-l6 on onnxruntime, whose
    kernels sum in another order for another number of rows, does too) is served one request
    at a time; a model whose rows are independent is batched."""
    from onnx import TensorProto, helper

    from edgeslim.bundle import write_bundle
    from edgeslim.edge.model_store import ModelStore
    from tests.edge._bundles import linear_bundle

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1),
         helper.make_node("Sub", ["x", "mean"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    centred = write_bundle(tmp_path / "centred.eslim", model_onnx=model.SerializeToString(),
                           manifest={"name": "centred",
                                     "inputs": [{"name": "x", "dtype": "float32",
                                                 "shape": ["batch", 4]}],
                                     "outputs": [{"name": "y", "dtype": "float32",
                                                  "shape": ["batch", 4]}]})
    with ThreadPoolExecutor(1) as pool:
        store = ModelStore(pool, threads=1, max_batch=32)
        assert store.build(centred).batcher.max_batch == 1
        assert store.build(linear_bundle(tmp_path / "linear.eslim")).batcher.max_batch == 32
