"""/_gateway/metrics: request, upstream, token cache and rotation counters."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as redis
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import MULTIPROC_DIR_ENV, MetricsBatch, observe_all
from tests.conftest import JWT_SECRET, free_port

redis_only = pytest.mark.parametrize("store_backend", ["redis"], indirect=True)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_samples(text: str) -> Samples:
    """Map (sample name, labels) to the value of every sample in ``text``."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            samples[key] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(client) -> Samples:
    response = await client.get("/_gateway/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return parse_samples(await response.text())


# Batched updates


BOUNDS = (0.005, 0.01, 0.5, 1, 30)
# Values on, between, below and above the bounds, and a negative one.
OBSERVED = [0.0, 0.005, 0.0050001, 0.007, 0.01, 0.3, 1.0, 29.99, 30.0, 31.0, 1e9, -2.0]


def histogram_samples(values: list[float], together: bool) -> Samples:
    """Return the samples of a histogram of ``values``, without its creation time."""
    registry = CollectorRegistry()
    histogram = Histogram("t", "Test histogram.", buckets=BOUNDS, registry=registry)
    if together:
        observe_all(histogram, values)
    else:
        for observed in values:
            histogram.observe(observed)
    samples = parse_samples(generate_latest(registry).decode())
    return {key: got for key, got in samples.items() if key[0] != "t_created"}


def test_observe_all_matches_observe():
    together = histogram_samples(OBSERVED, together=True)

    assert together == histogram_samples(OBSERVED, together=False)
    assert value(together, "t_count") == len(OBSERVED)


async def test_batch_applied_before_next_events():
    registry = CollectorRegistry()
    counter = Counter("batched", "Test counter.", registry=registry)
    histogram = Histogram("waits", "Test histogram.", buckets=BOUNDS, registry=registry)
    batch = MetricsBatch(histogram)
    for _ in range(3):
        batch.inc(counter)
    batch.observe(0.3)
    before = registry.get_sample_value("batched_total")
    await asyncio.sleep(0)

    assert before == 0
    assert registry.get_sample_value("batched_total") == 3
    assert registry.get_sample_value("waits_bucket", {"le": "0.5"}) == 1
    assert registry.get_sample_value("waits_sum") == 0.3


def test_batch_outside_event_loop_applied_at_once():
    registry = CollectorRegistry()
    counter = Counter("direct", "Test counter.", registry=registry)
    batch = MetricsBatch(Histogram("unused", "Test.", registry=registry))
    batch.inc(counter)

    assert registry.get_sample_value("direct_total") == 1


async def test_metrics_count_requests_by_endpoint(gateway):
    before = await scrape(gateway.client)
    ok = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())
    unknown = await gateway.client.post(
        "/api/no-such/endpoint", json={}, headers=gateway.bearer()
    )
    denied = await gateway.client.post("/api/i", json={})
    after = await scrape(gateway.client)

    requests = "misskey_gateway_requests_total"
    assert ok.status == 200
    assert unknown.status == 404
    assert denied.status == 401
    ok_labels = {"endpoint": "i", "mode": "required", "status": "200"}
    assert (
        value(after, requests, **ok_labels) - value(before, requests, **ok_labels) == 1
    )
    other = {"endpoint": "other", "mode": "required", "status": "404"}
    assert value(after, requests, **other) - value(before, requests, **other) == 1
    unauthorized = {"endpoint": "i", "mode": "required", "status": "401"}
    assert (
        value(after, requests, **unauthorized) - value(before, requests, **unauthorized)
        == 1
    )
    assert not any(
        labels and ("endpoint", "no-such/endpoint") in labels for _, labels in after
    )


async def test_metrics_upstream_histogram(gateway):
    before = await scrape(gateway.client)
    for _ in range(3):
        response = await gateway.client.post(
            "/api/i", json={}, headers=gateway.bearer()
        )
        assert response.status == 200
    rejected = await gateway.client.post("/api/i", json={})
    after = await scrape(gateway.client)

    count = "misskey_gateway_upstream_seconds_count"
    total = "misskey_gateway_upstream_seconds_sum"
    assert rejected.status == 401
    # The rejected request never reached the upstream, so it is not observed.
    assert value(after, count) - value(before, count) == 3
    assert value(after, total) > value(before, total)
    infinite = value(after, "misskey_gateway_upstream_seconds_bucket", le="+Inf")
    assert infinite == value(after, count)


@redis_only
async def test_metrics_token_cache_results(gateway):
    cache = "misskey_gateway_token_cache_total"
    gateway.store.invalidate_all()
    before = await scrape(gateway.client)
    first = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())
    second = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())
    after = await scrape(gateway.client)

    assert first.status == 200
    assert second.status == 200
    assert value(after, cache, result="miss") - value(before, cache, result="miss") == 1
    assert value(after, cache, result="hit") - value(before, cache, result="hit") == 1
    assert value(after, cache, result="stale") == value(before, cache, result="stale")


@redis_only
async def test_metrics_count_rotation_messages(gateway, redis_server, redis_prefix):
    rotations = "misskey_gateway_rotations_total"
    await gateway.store.wait_subscribed()
    before = await scrape(gateway.client)
    client = redis.Redis.from_url(redis_server.url)
    try:
        for principal in ("alice", "bob"):
            await client.publish(f"{redis_prefix}rotations", principal)
    finally:
        await client.aclose()
    after = before
    for _ in range(100):
        after = await scrape(gateway.client)
        if value(after, rotations) - value(before, rotations) >= 2:
            break
        await asyncio.sleep(0.02)

    assert value(after, rotations) - value(before, rotations) == 2


@redis_only
async def test_metrics_count_store_errors(start_gateway):
    gateway = await start_gateway(**{"store.url": f"redis://127.0.0.1:{free_port()}/0"})
    errors = "misskey_gateway_store_errors_total"
    before = await scrape(gateway.client)
    failed = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())
    anonymous = await gateway.client.post("/api/meta", json={})
    after = await scrape(gateway.client)

    assert failed.status == 503
    assert anonymous.status == 200
    assert value(after, errors) - value(before, errors) == 1


async def start_serve(
    env: dict[str, str],
    port: int,
    workers: int,
    stdout: int = asyncio.subprocess.DEVNULL,
) -> asyncio.subprocess.Process:
    """Start ``misskey-gateway serve`` with its log lines sent to ``stdout``."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        env=env, stdout=stdout, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(300):
        try:
            async with session.get(f"{url}/_gateway/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"gateway at {url} did not become ready")


def serve_environment(upstream: str, store_url: str, prefix: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MISSKEY_GATEWAY_") and name != MULTIPROC_DIR_ENV
    }
    env.update(
        {
            "MISSKEY_GATEWAY_UPSTREAM_URL": upstream,
            "MISSKEY_GATEWAY_STORE_URL": store_url,
            "MISSKEY_GATEWAY_REDIS_PREFIX": prefix,
            "MISSKEY_GATEWAY_JWT_SECRET": JWT_SECRET,
            "MISSKEY_GATEWAY_LOG_LEVEL": "warning",
            "MISSKEY_GATEWAY_POLICY_CHECK_UPSTREAM": "false",
        }
    )
    return env


def metrics_directories(root: Path) -> list[Path]:
    return list(root.glob("misskey-gateway-metrics-*"))


def requests_per_worker(directory: Path) -> list[float]:
    """Return the meta requests that each worker's counter file records."""
    counts = []
    for path in sorted(directory.glob("counter_*.db")):
        total = 0.0
        for metric in MultiProcessCollector.merge([str(path)]):
            for sample in metric.samples:
                if (
                    sample.name == "misskey_gateway_requests_total"
                    and sample.labels.get("endpoint") == "meta"
                ):
                    total += sample.value
        counts.append(total)
    return counts


async def test_metrics_sum_over_workers(
    redis_server, redis_prefix, upstream_server, tmp_path: Path
):
    upstream = str(upstream_server.make_url("")).rstrip("/")
    env = serve_environment(upstream, redis_server.url, redis_prefix)
    # The private multiprocess directory is created under TMPDIR.
    env["TMPDIR"] = str(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = await start_serve(env, port, workers=2)
    sent = 0
    try:
        # A new connection per request, so the kernel spreads them over both
        # workers once both listen.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_ready(session, url)
            directories = await asyncio.to_thread(metrics_directories, tmp_path)
            per_worker: list[float] = []
            while sent < 1000:
                for _ in range(20):
                    async with session.post(f"{url}/api/meta", json={}) as response:
                        assert response.status == 200
                    sent += 1
                per_worker = await asyncio.to_thread(
                    requests_per_worker, directories[0]
                )
                if len(per_worker) == 2 and all(per_worker):
                    break
            # Every scrape, whichever worker serves it, reports both workers.
            totals = []
            histograms = []
            for _ in range(10):
                async with session.get(f"{url}/_gateway/metrics") as response:
                    samples = parse_samples(await response.text())
                totals.append(
                    value(
                        samples,
                        "misskey_gateway_requests_total",
                        endpoint="meta",
                        mode="optional",
                        status="200",
                    )
                )
                histograms.append(
                    value(samples, "misskey_gateway_upstream_seconds_count")
                )
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(process.wait(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert len(directories) == 1
    assert len(per_worker) == 2
    assert all(count > 0 for count in per_worker), per_worker
    assert sum(per_worker) == sent
    assert totals == [sent] * 10
    assert histograms == [sent] * 10
    assert returncode == 0
    assert metrics_directories(tmp_path) == []
