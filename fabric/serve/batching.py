"""Dynamic batching that adapts to load, on top of Ray Serve's ``@serve.batch``.

A fixed batch wait costs every lone request the whole wait (5 ms of a 7.5 ms p50 at one client); under
load it pays only when the engine call it saves costs more than the wait, and a fixed batch size makes a
full batch wait for requests that are not coming. So each version's batcher watches how many requests
are inside the replica at once (the peak over the last second or two) and how long an engine call takes,
and before each batch forms sets ``@serve.batch``'s two knobs from them:

* batch size cap = that peak (at most ``max_batch_size``): a batch closes as soon as every request that
  is usually around has joined, instead of waiting out the timeout for requests that do not exist;
* wait = 0 when the peak is 1 (requests come one at a time: never wait; such a request even skips the
  batch queue), else the recent engine time per call, at most ``batch_wait_timeout_s``: waiting about as
  long as one call takes gathers what arrives meanwhile, while a cheap model (where HTTP dominates)
  hardly waits at all.

Engines whose calls take long (over :data:`OFFLOAD_AFTER_S`, measured) run on a worker thread so the
event loop keeps parsing the next requests meanwhile; cheap ones run inline, where a thread hop would
cost more than the call.

Everything here is plain asyncio and unit-tested without Ray; ``serve.batch`` is passed in.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

# Engine calls slower than this (moving average) run on a worker thread.
OFFLOAD_AFTER_S = 0.001
# The load estimate is the peak concurrency over the last one to two of these windows.
PEAK_WINDOW_S = 1.0


class AdaptiveBatching:
    """The batch size cap and wait for the next batch, from the recent peak of concurrent requests.

    Args:
        max_batch_size: the configured largest batch.
        max_wait_s: the configured longest wait for a batch to fill.
        window_s: length of each of the two windows the peak is taken over.
        clock: monotonic seconds (injected by tests).
    """

    def __init__(
        self,
        max_batch_size: int,
        max_wait_s: float,
        window_s: float = PEAK_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.window_s = window_s
        self._clock = clock
        self.in_flight = 0
        """Requests inside the replica for this version (arrived, not yet answered)."""
        self._window_start = clock()
        self._peak_now = 0
        self._peak_before = 0
        self.engine_s = max_wait_s
        """Moving average of an engine call's duration (the wait under load); starts at the maximum."""
        self._apply: Callable[[int, float], None] | None = None
        self.cap, self.wait_s = 1, 0.0
        self._publish()

    def bind(self, apply: Callable[[int, float], None]) -> None:
        """Have ``apply(cap, wait_s)`` called whenever the settings change (and once now)."""
        self._apply = apply
        apply(self.cap, self.wait_s)

    def peak(self) -> int:
        """Most requests in flight at once over the last one to two windows."""
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed >= self.window_s:
            # Rotate; after two idle windows the old peak is forgotten entirely.
            self._peak_before = self._peak_now if elapsed < 2 * self.window_s else 0
            self._peak_now = 0
            self._window_start = now
        return max(self._peak_now, self._peak_before, self.in_flight)

    def arrive(self) -> None:
        """A request entered the replica."""
        self.in_flight += 1
        self._peak_now = max(self._peak_now, self.in_flight)
        self._publish()

    def depart(self) -> None:
        """A request left (answered or failed)."""
        self.in_flight = max(0, self.in_flight - 1)

    def executed(self, seconds: float) -> None:
        """An engine call took ``seconds``."""
        self.engine_s = 0.8 * self.engine_s + 0.2 * seconds

    def _publish(self) -> None:
        cap = max(1, min(self.peak(), self.max_batch_size))
        wait = round(min(self.max_wait_s, self.engine_s), 4) if cap > 1 else 0.0
        if (cap, wait) != (self.cap, self.wait_s):
            self.cap, self.wait_s = cap, wait
            if self._apply is not None:
                self._apply(cap, wait)


class BatchStats:
    """Counts for the statistics endpoint: requests, rows, engine calls and their batch sizes."""

    def __init__(self) -> None:
        self.requests = 0
        self.rows = 0
        self.executions = 0
        self.batch_sizes: Counter[int] = Counter()
        """Requests per engine call -> how many calls had that many."""
        self.engine_seconds = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "inference_count": self.rows,
            "request_count": self.requests,
            "execution_count": self.executions,
            "engine_seconds": round(self.engine_seconds, 6),
            "batch_stats": [{"batch_size": b, "count": c} for b, c in sorted(self.batch_sizes.items())],
        }


class Predictor:
    """Runs an engine for one version: per request, or batched through ``batch`` (Ray's ``serve.batch``).

    Args:
        fn: the engine's ``predict`` (float32 ``[rows, features]`` -> ``[rows, outputs]``).
        max_batch_size: the largest batch (requests).
        max_wait_s: the longest wait for a batch to fill.
        batch: ``serve.batch``; None runs every request on its own (a bare server, unit tests).
    """

    def __init__(
        self,
        fn: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int = 1,
        max_wait_s: float = 0.0,
        batch: Callable[..., Any] | None = None,
    ) -> None:
        self._fn = fn
        self.policy = AdaptiveBatching(max_batch_size, max_wait_s)
        self.stats = BatchStats()
        self._avg_s = 0.0
        self._pool: ThreadPoolExecutor | None = None
        if batch is not None and max_batch_size > 1:

            async def run_batch(items: list[np.ndarray]) -> list[np.ndarray]:
                return await self._run_batch(items)

            # serve.batch inspects the signature on every call; a precomputed one makes that a lookup.
            run_batch.__signature__ = inspect.signature(run_batch)  # type: ignore[attr-defined]

            batched = batch(max_batch_size=max_batch_size, batch_wait_timeout_s=max_wait_s)(run_batch)
            cap = {"size": max_batch_size}

            def apply(size: int, wait_s: float) -> None:
                batched.set_batch_wait_timeout_s(wait_s)
                if size != cap["size"]:  # Serve re-checks max_ongoing_requests on every size change
                    cap["size"] = size
                    batched.set_max_batch_size(size)

            self.policy.bind(apply)
            self._batched: Callable[[np.ndarray], Any] | None = batched
        else:
            self._batched = None

    async def __call__(self, features: np.ndarray) -> np.ndarray:
        """Predict for one request's rows (joins a batch when batching and others are around)."""
        self.stats.requests += 1
        self.stats.rows += len(features)
        if self._batched is None or self.policy.cap == 1:
            # Alone: nothing to batch with, so skip the batch queue's overhead as well as its wait.
            return await self._execute(features, 1)
        return await self._batched(features)

    async def _run_batch(self, items: list[np.ndarray]) -> list[np.ndarray]:
        if len(items) == 1:
            return [await self._execute(items[0], 1)]
        out = await self._execute(np.concatenate(items), len(items))
        return np.split(out, np.cumsum([len(x) for x in items[:-1]]))

    async def _execute(self, features: np.ndarray, requests: int) -> np.ndarray:
        self.stats.executions += 1
        self.stats.batch_sizes[requests] += 1
        if self._avg_s > OFFLOAD_AFTER_S:
            if self._pool is None:
                # One thread: engines need not be thread-safe, and batches run one at a time anyway.
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="fabric-engine")
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._timed, features)
        return self._timed(features)

    def _timed(self, features: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = self._fn(features)
        took = time.perf_counter() - start
        self.stats.engine_seconds += took
        self._avg_s = took if self._avg_s == 0.0 else 0.8 * self._avg_s + 0.2 * took
        self.policy.executed(took)
        return out

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
