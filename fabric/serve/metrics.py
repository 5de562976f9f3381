"""A replica's own Prometheus metrics through ``ray.util.metrics``: responses per version, batch sizes.

Ray Serve already exports each replica's request latency histogram and request count
(``ray_serve_deployment_processing_latency_ms``, ``ray_serve_deployment_request_counter``, tagged by route).
These add what only fabric knows: which version of the traffic split answered and with which status, how
many rows it predicted, and how many requests each engine call served (the batch size, including the
calls of lone requests that skip ``@serve.batch``).

The request path only bumps plain in-process counters (:class:`~fabric.serve.service.TabularService`'s
``responses`` and each predictor's :class:`~fabric.serve.batching.BatchStats`); a daemon thread publishes
their growth every ``interval_s``, so a request pays nothing for its metrics.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from fabric.serve.service import TabularService

log = logging.getLogger("fabric.serve")

# Requests per engine call; the configured max_batch_size is at most a few hundred.
BATCH_SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
PUBLISH_INTERVAL_S = 1.0


class ServeMetrics:
    """Publishes a service's counters as Prometheus metrics (``ray_`` is prefixed by Ray's exporter).

    Args:
        service: the replica's service.
        interval_s: seconds between two publications by :meth:`start`'s thread.
    """

    def __init__(self, service: TabularService, interval_s: float = PUBLISH_INTERVAL_S) -> None:
        from ray.util.metrics import Counter as RayCounter
        from ray.util.metrics import Histogram

        self.service = service
        self.interval_s = interval_s
        self.responses = RayCounter(
            "fabric_serve_responses",
            "Inference responses by the version that answered and HTTP status",
            ("model", "version", "code"),
        )
        self.rows = RayCounter("fabric_serve_rows", "Rows predicted", ("model", "version"))
        self.batch_size = Histogram(
            "fabric_serve_batch_size",
            "Requests served by one engine call",
            BATCH_SIZE_BOUNDARIES,
            ("model", "version"),
        )
        self._responses: Counter[tuple[str, int]] = Counter()
        self._rows: Counter[str] = Counter()
        self._batches: dict[str, Counter[int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self) -> None:
        """Add what the counters grew by since the last call to the exported metrics."""
        with self._lock:
            model = self.service.model_name
            # dict() copies a Counter atomically under the GIL, while the event loop keeps counting.
            now = Counter(dict(self.service.responses))
            for (version, code), n in (now - self._responses).items():
                self.responses.inc(float(n), {"model": model, "version": version, "code": str(code)})
            self._responses = now
            for version, v in self.service.versions.items():
                tags = {"model": model, "version": version}
                rows = v.predictor.stats.rows
                if rows > self._rows[version]:
                    self.rows.inc(float(rows - self._rows[version]), tags)
                    self._rows[version] = rows
                sizes = Counter(dict(v.predictor.stats.batch_sizes))
                seen = self._batches.get(version, Counter())
                for size, n in (sizes - seen).items():
                    for _ in range(n):  # a Histogram takes one observation at a time
                        self.batch_size.observe(float(size), tags)
                self._batches[version] = sizes

    def start(self) -> ServeMetrics:
        """Publish every ``interval_s`` on a daemon thread until :meth:`stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="fabric-serve-metrics", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.publish()
            except Exception:  # metrics must never take a replica down
                log.exception("publishing serve metrics failed")

    def stop(self) -> None:
        """Publish a last time and end the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            self.publish()
        except Exception as e:  # Ray may already be going away
            log.debug("last serve metrics publication failed: %s", e)


def start_metrics(service: TabularService, interval_s: float = PUBLISH_INTERVAL_S) -> ServeMetrics | None:
    """:class:`ServeMetrics` for ``service``, publishing; None when Ray's metrics are not available here."""
    try:
        return ServeMetrics(service, interval_s).start()
    except Exception as e:  # metrics are best effort (e.g. Ray's metrics agent is off)
        log.warning("serve metrics are off: %s", e)
        return None
