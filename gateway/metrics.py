"""Prometheus metrics of the gateway and the ``/_gateway/metrics`` view.

With several worker processes (``serve --workers N``), prometheus-client runs
in its multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` names a directory in
which every process keeps its values in memory-mapped files, and the view sums
the files of all processes. prometheus-client chooses the mode when it is
first imported, so the variable must be set before a worker starts.
"""

from __future__ import annotations

import asyncio
import bisect
import os

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Label value for requests to endpoints missing from the policy table, so a
# client that calls made-up endpoint names cannot create unbounded series.
OTHER_ENDPOINT = "other"
# Label values for requests that ended before a policy row was found or before
# a response was sent (the client disconnected, or the upstream body failed).
UNKNOWN_MODE = "unknown"
ABORTED_STATUS = "aborted"

REQUESTS = Counter(
    "misskey_gateway_requests",
    "Requests under /api/, by endpoint, policy mode and response status.",
    ["endpoint", "mode", "status"],
)
UPSTREAM_SECONDS = Histogram(
    "misskey_gateway_upstream_seconds",
    "Time from sending a request upstream to the end of relaying its response.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TOKEN_CACHE = Counter(
    "misskey_gateway_token_cache",
    "Token lookups in the per-process cache in front of Redis, by result.",
    ["result"],
)
TOKEN_CACHE_HIT = TOKEN_CACHE.labels("hit")
TOKEN_CACHE_MISS = TOKEN_CACHE.labels("miss")
TOKEN_CACHE_STALE = TOKEN_CACHE.labels("stale")
STORE_ERRORS = Counter(
    "misskey_gateway_store_errors",
    "Requests answered 503 because the token store could not be reached.",
)
ROTATIONS = Counter(
    "misskey_gateway_rotations",
    "Rotation messages received on the Redis rotation channel.",
)


class MetricsBatch:
    """Increments and observations of one event loop iteration, applied together.

    A request that updates prometheus-client's metrics directly takes a lock
    per counter and walks the histogram's buckets in Python, which together
    cost about as much as the gateway's own logging. Requests record here
    instead, and the batch is applied to the metrics by a callback at the
    start of the next loop iteration, before the process reads or handles
    anything else. A scrape therefore still counts every request its own
    process has responded to. In the multiprocess mode the memory-mapped
    files are written then too, so another worker's latest requests reach a
    scrape once that worker's event loop has started its next iteration.
    """

    def __init__(self, histogram: Histogram):
        self._histogram = histogram
        self._counts: dict[Counter, int] = {}
        self._observations: list[float] = []
        self._scheduled = False

    def inc(self, child: Counter) -> None:
        """Add one to a counter (a label child or a counter without labels)."""
        counts = self._counts
        counts[child] = counts.get(child, 0) + 1
        if not self._scheduled:
            self._schedule()

    def observe(self, seconds: float) -> None:
        """Record one observation of the batch's histogram."""
        self._observations.append(seconds)
        if not self._scheduled:
            self._schedule()

    def apply(self) -> None:
        """Apply everything recorded so far to the metrics."""
        self._scheduled = False
        counts = self._counts
        if counts:
            self._counts = {}
            for child, amount in counts.items():
                child.inc(amount)
        if self._observations:
            observations = self._observations
            self._observations = []
            observe_all(self._histogram, observations)

    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # Outside an event loop nothing would run the callback.
            self.apply()
            return
        self._scheduled = True
        loop.call_soon(self.apply)


def observe_all(histogram: Histogram, values: list[float]) -> None:
    """Observe every value, as many ``observe`` calls would, in one pass.

    prometheus-client has no call for adding several observations, so this
    adds to the histogram's bucket and sum values directly, the way
    ``Histogram.observe`` does. ``tests/test_metrics.py`` checks that the two
    give the same samples.
    """
    bounds = histogram._upper_bounds
    per_bucket = [0] * len(bounds)
    total = 0.0
    for value in values:
        total += value
        # The first bucket whose upper bound is at least the value; the last
        # bound is +Inf.
        per_bucket[bisect.bisect_left(bounds, value)] += 1
    histogram._sum.inc(total)
    for index, count in enumerate(per_bucket):
        if count:
            histogram._buckets[index].inc(count)


BATCH = MetricsBatch(UPSTREAM_SECONDS)


class RequestMetrics:
    """Count requests by endpoint, mode and status, with label children reused.

    ``Counter.labels`` takes a lock and validates the values on every call
    (about 2 µs against 0.8 µs for a dictionary lookup and ``inc``, measured
    with prometheus-client 0.26 on a 2-core machine), so each combination is
    bound once and kept in a dictionary. The counts go through ``BATCH``.
    """

    def __init__(self, endpoints: list[str]):
        self._endpoints = frozenset(endpoints)
        self._children: dict[tuple[str, str, int | None], Counter] = {}

    def record(
        self,
        endpoint: str | None,
        mode: str | None,
        status: int | None,
        upstream_ms: float | None,
    ) -> None:
        """Count one finished request.

        ``upstream_ms`` is None when no upstream response was relayed.
        """
        if endpoint not in self._endpoints:
            endpoint = OTHER_ENDPOINT
        key = (endpoint, mode or UNKNOWN_MODE, status)
        child = self._children.get(key)
        if child is None:
            status_label = ABORTED_STATUS if status is None else str(status)
            child = REQUESTS.labels(key[0], key[1], status_label)
            self._children[key] = child
        BATCH.inc(child)
        if upstream_ms is not None:
            BATCH.observe(upstream_ms / 1000)


def multiprocess_dir() -> str | None:
    """Return the multiprocess directory, or None in single-process mode."""
    return os.environ.get(MULTIPROC_DIR_ENV) or None


def render_metrics() -> bytes:
    """Render every metric in the Prometheus text format.

    In multiprocess mode the values are the sums over all worker processes,
    including those that have exited.
    """
    BATCH.apply()
    directory = multiprocess_dir()
    if directory is None:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


async def metrics_view(request: web.Request) -> web.Response:
    """Serve ``GET /_gateway/metrics``."""
    response = web.Response(body=render_metrics())
    # CONTENT_TYPE_LATEST contains a charset parameter, which aiohttp's
    # content_type argument rejects, so the header is set directly.
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
