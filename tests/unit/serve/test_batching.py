"""Adaptive batching: the batch knobs follow load; the predictor splits batches and offloads slow engines."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np

from fabric.serve.batching import OFFLOAD_AFTER_S, AdaptiveBatching, Predictor


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_lone_request_never_waits() -> None:
    policy = AdaptiveBatching(32, 0.005, clock=Clock())
    for _ in range(5):
        policy.arrive()
        assert (policy.cap, policy.wait_s) == (1, 0.0)
        policy.depart()


def test_under_concurrency_the_batch_is_capped_at_the_peak_and_waits() -> None:
    clock = Clock()
    policy = AdaptiveBatching(32, 0.005, clock=clock)
    seen: list[tuple[int, float]] = []
    policy.bind(lambda cap, wait: seen.append((cap, wait)))
    for _ in range(16):
        policy.arrive()
    assert (policy.cap, policy.wait_s) == (16, 0.005)
    for _ in range(16):
        policy.depart()
    policy.arrive()  # the next round's first request: the peak of 16 is still remembered
    assert policy.cap == 16
    assert seen[0] == (1, 0.0) and seen[-1] == (16, 0.005)
    assert len(seen) == 16  # applied on change only


def test_under_load_the_wait_follows_the_engine_time() -> None:
    policy = AdaptiveBatching(32, 0.005, clock=Clock())
    policy.arrive()
    policy.arrive()
    assert policy.wait_s == 0.005  # no measurement yet: the configured wait
    for _ in range(40):
        policy.executed(0.00002)  # a cheap model: 20 us a call
    policy.arrive()
    assert policy.wait_s < 0.0001  # HTTP dominates: waiting would only add latency
    for _ in range(40):
        policy.executed(0.050)  # an expensive one
    policy.arrive()
    assert policy.wait_s == 0.005  # never beyond the configured wait


def test_the_cap_never_exceeds_max_batch_size() -> None:
    policy = AdaptiveBatching(8, 0.01, clock=Clock())
    for _ in range(50):
        policy.arrive()
    assert policy.cap == 8


def test_the_peak_is_forgotten_after_two_quiet_windows() -> None:
    clock = Clock()
    policy = AdaptiveBatching(32, 0.005, window_s=1.0, clock=clock)
    for _ in range(10):
        policy.arrive()
    for _ in range(10):
        policy.depart()
    clock.t += 1.5  # one window later: still remembered
    policy.arrive()
    policy.depart()
    assert policy.cap == 10
    clock.t += 2.5  # quiet for two windows: back to no waiting
    policy.arrive()
    assert (policy.cap, policy.wait_s) == (1, 0.0)


class FakeBatch:
    """Stands in for ray.serve.batch: gathers the calls made within one event-loop turn."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.settings: list[tuple[str, Any]] = []

    def __call__(self, max_batch_size: int, batch_wait_timeout_s: float) -> Any:
        fake = self

        def decorate(fn: Any) -> Any:
            pending: list[tuple[np.ndarray, asyncio.Future]] = []

            async def flush() -> None:
                await asyncio.sleep(0)
                batch = pending[:]
                pending.clear()
                fake.sizes.append(len(batch))
                outs = await fn([x for x, _ in batch])
                for (_, fut), out in zip(batch, outs, strict=True):
                    fut.set_result(out)

            async def call(x: np.ndarray) -> np.ndarray:
                fut = asyncio.get_running_loop().create_future()
                pending.append((x, fut))
                if len(pending) == 1:
                    asyncio.ensure_future(flush())
                return await fut

            call.set_max_batch_size = lambda n: fake.settings.append(("size", n))  # type: ignore[attr-defined]
            call.set_batch_wait_timeout_s = lambda s: fake.settings.append(("wait", s))  # type: ignore[attr-defined]
            return call

        return decorate


def test_a_batch_is_split_back_to_its_requests() -> None:
    batch = FakeBatch()
    pred = Predictor(lambda x: x * 2.0, max_batch_size=8, max_wait_s=0.001, batch=batch)

    async def main() -> list[np.ndarray]:
        xs = [np.full((n, 2), float(n), dtype=np.float32) for n in (1, 3, 2)]
        for _ in xs:
            pred.policy.arrive()  # as the service does when each request comes in
        return await asyncio.gather(*(pred(x) for x in xs))

    outs = asyncio.run(main())
    assert [o.shape[0] for o in outs] == [1, 3, 2]
    assert [float(o[0, 0]) for o in outs] == [2.0, 6.0, 4.0]
    assert batch.sizes == [3]
    stats = pred.stats.as_dict()
    assert stats["request_count"] == 3 and stats["inference_count"] == 6 and stats["execution_count"] == 1
    assert stats["batch_stats"] == [{"batch_size": 3, "count": 1}]
    # bound alone (no wait, size 1), then three requests around: wait, and close the batch at three
    assert batch.settings[:2] == [("wait", 0.0), ("size", 1)]
    assert batch.settings[-2:] == [("wait", 0.001), ("size", 3)]


def test_a_lone_request_skips_the_batch_queue() -> None:
    batch = FakeBatch()
    pred = Predictor(lambda x: x, max_batch_size=8, max_wait_s=0.01, batch=batch)

    async def main() -> None:
        for _ in range(3):
            pred.policy.arrive()
            await pred(np.zeros((1, 2), dtype=np.float32))
            pred.policy.depart()

    asyncio.run(main())
    assert batch.sizes == [] and pred.stats.executions == 3


def test_without_batching_each_request_runs_alone() -> None:
    pred = Predictor(lambda x: x + 1.0)
    out = asyncio.run(pred(np.zeros((2, 2), dtype=np.float32)))
    assert out.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert pred.stats.as_dict()["batch_stats"] == [{"batch_size": 1, "count": 1}]


def test_slow_engines_move_off_the_event_loop() -> None:
    threads: list[str] = []

    def slow(x: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread().name)
        time.sleep(OFFLOAD_AFTER_S * 3)
        return x

    pred = Predictor(slow)

    async def main() -> None:
        for _ in range(3):
            await pred(np.zeros((1, 1), dtype=np.float32))

    asyncio.run(main())
    pred.shutdown()
    assert threads[0] == threading.main_thread().name  # measured first, inline
    assert all(t.startswith("fabric-engine") for t in threads[1:])
