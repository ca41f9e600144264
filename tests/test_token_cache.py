"""The per-process token cache in front of Redis and its pub/sub invalidation."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as redis

from gateway.store import RedisTokenStore
from gateway.token_cache import CachedTokenStore
from tests.conftest import RedisServer

pytestmark = pytest.mark.parametrize("store_backend", ["redis"], indirect=True)

OLD = "misskey-token-old"
NEW = "misskey-token-new"


async def started(start_gateway, **overrides):
    gateway = await start_gateway(**overrides)
    gateway.fake.add_token(OLD, "alice")
    gateway.fake.add_token(NEW, "alice")
    store = gateway.store
    assert isinstance(store, CachedTokenStore)
    async with asyncio.timeout(5):
        await store.wait_subscribed()
    await gateway.store_token("alice", OLD)
    return gateway


async def call_i(gateway) -> str:
    # One JWT per gateway, as a real client reuses its JWT: each new JWT's id
    # is checked against the revocation list once.
    headers = gateway.__dict__.setdefault("alice_headers", gateway.bearer())
    response = await gateway.client.post("/api/i", json={}, headers=headers)
    assert response.status == 200
    return gateway.fake.requests_to("i")[-1].token


async def wait_for_token(gateway, expected: str, limit: float) -> float:
    """Call the gateway until the upstream receives ``expected``; return the delay."""
    started_at = time.monotonic()
    while time.monotonic() - started_at < limit:
        if await call_i(gateway) == expected:
            return time.monotonic() - started_at
        await asyncio.sleep(0.005)
    raise AssertionError(f"the gateway did not use the new token within {limit} s")


async def test_cached_token_skips_redis(start_gateway):
    gateway = await started(start_gateway)
    store = gateway.store
    await call_i(gateway)
    misses = store.misses
    for _ in range(5):
        await call_i(gateway)

    assert store.misses == misses
    assert store.hits >= 5


async def test_rotation_by_other_replica_propagates(start_gateway):
    gateway = await started(start_gateway, **{"store.cache_ttl": 60})
    assert await call_i(gateway) == OLD
    other = RedisTokenStore(gateway.store.inner.settings)
    try:
        await other.set_token("alice", NEW)
    finally:
        await other.close()

    delay = await wait_for_token(gateway, NEW, limit=2)
    assert delay < 1


async def test_rotation_by_redis_cli_propagates(start_gateway):
    gateway = await started(start_gateway, **{"store.cache_ttl": 60})
    assert await call_i(gateway) == OLD
    settings = gateway.settings
    client = redis.Redis.from_url(settings.store.url)
    try:
        await client.set(f"{settings.redis.prefix}token:alice", NEW)
        await client.publish(f"{settings.redis.prefix}rotations", "alice")
    finally:
        await client.aclose()

    delay = await wait_for_token(gateway, NEW, limit=2)
    assert delay < 1


async def test_unannounced_change_bounded_by_ttl(start_gateway):
    gateway = await started(start_gateway, **{"store.cache_ttl": 0.5})
    assert await call_i(gateway) == OLD
    settings = gateway.settings
    client = redis.Redis.from_url(settings.store.url)
    try:
        await client.set(f"{settings.redis.prefix}token:alice", NEW)
    finally:
        await client.aclose()

    delay = await wait_for_token(gateway, NEW, limit=3)
    assert delay <= 0.5 + 0.5  # the TTL plus room for a busy machine


async def test_deleted_token_stops_injection(start_gateway):
    gateway = await started(start_gateway, **{"store.cache_ttl": 60})
    await call_i(gateway)
    other = RedisTokenStore(gateway.store.inner.settings)
    try:
        await other.delete_token("alice")
    finally:
        await other.close()

    deadline = time.monotonic() + 2
    status = 200
    while time.monotonic() < deadline and status == 200:
        response = await gateway.client.post(
            "/api/i", json={}, headers=gateway.bearer()
        )
        status = response.status
        await asyncio.sleep(0.005)
    assert status == 401


async def test_cached_token_survives_outage(start_gateway, tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    try:
        gateway = await started(
            start_gateway, **{"store.url": server.url, "store.cache_ttl": 60}
        )
        await call_i(gateway)
        server.stop()
        cached = await gateway.client.post(
            "/api/i", json={}, headers=gateway.alice_headers
        )
        uncached = await gateway.client.post(
            "/api/i", json={}, headers=gateway.bearer("bob")
        )
    finally:
        server.stop()

    assert cached.status == 200
    assert uncached.status == 503


async def test_subscription_restored_after_restart(start_gateway, tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    try:
        gateway = await started(
            start_gateway, **{"store.url": server.url, "store.cache_ttl": 60}
        )
        store = gateway.store
        server.stop()
        async with asyncio.timeout(5):
            while store.subscribed:  # noqa: ASYNC110 - polls public state
                await asyncio.sleep(0.01)
        server.start()
        async with asyncio.timeout(10):
            await store.wait_subscribed()
        await gateway.store_token("alice", OLD)
        assert await call_i(gateway) == OLD

        other = RedisTokenStore(store.inner.settings)
        try:
            await other.set_token("alice", NEW)
        finally:
            await other.close()
        delay = await wait_for_token(gateway, NEW, limit=2)
    finally:
        server.stop()

    assert delay < 1


async def test_cache_disabled_reads_every_time(start_gateway):
    gateway = await start_gateway(**{"store.cache_ttl": 0})

    assert isinstance(gateway.store, RedisTokenStore)


async def test_rejected_token_reread_and_retried(start_gateway):
    gateway = await started(start_gateway, **{"store.cache_ttl": 60})
    assert await call_i(gateway) == OLD
    settings = gateway.settings
    client = redis.Redis.from_url(settings.store.url)
    try:
        # Rotated by a tool that does not publish: the cache still contains OLD.
        await client.set(f"{settings.redis.prefix}token:alice", NEW)
    finally:
        await client.aclose()
    gateway.fake.remove_token(OLD)

    response = await gateway.client.post(
        "/api/notes/create", json={"text": "once"}, headers=gateway.bearer()
    )
    sent = gateway.fake.requests_to("notes/create")

    assert response.status == 200
    assert [r.token for r in sent] == [OLD, NEW]
    assert [r.json["text"] for r in sent] == ["once", "once"]
    assert await call_i(gateway) == NEW


async def test_rejected_unchanged_token_not_retried(start_gateway):
    gateway = await started(start_gateway, **{"store.cache_ttl": 60})
    gateway.fake.remove_token(OLD)

    response = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())
    error = (await response.json())["error"]

    assert response.status == 401
    assert error["code"] == "AUTHENTICATION_FAILED"
    assert len(gateway.fake.requests_to("i")) == 1


async def test_stale_token_used_within_limit(start_gateway, tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    try:
        gateway = await started(
            start_gateway,
            **{
                "store.url": server.url,
                "store.cache_ttl": 0.2,
                "store.stale_limit": 30,
            },
        )
        await call_i(gateway)
        server.stop()
        await asyncio.sleep(0.3)  # past the TTL
        stale = await gateway.client.post(
            "/api/i", json={}, headers=gateway.alice_headers
        )
    finally:
        server.stop()

    assert stale.status == 200
    assert gateway.store.stale_hits >= 1


async def test_stale_limit_exceeded_is_503(start_gateway, tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    try:
        gateway = await started(
            start_gateway,
            **{
                "store.url": server.url,
                "store.cache_ttl": 0.1,
                "store.stale_limit": 0.2,
            },
        )
        await call_i(gateway)
        server.stop()
        await asyncio.sleep(0.4)  # past TTL and stale limit
        response = await gateway.client.post(
            "/api/i", json={}, headers=gateway.bearer()
        )
    finally:
        server.stop()

    assert response.status == 503
    assert response.headers["Retry-After"] == "1"


async def test_outage_under_load_never_401(start_gateway, tmp_path):
    server = RedisServer(tmp_path, persistent=True)
    server.start()
    principals = [f"user{n}" for n in range(6)]
    try:
        gateway = await start_gateway(
            **{
                "store.url": server.url,
                "store.cache_ttl": 0.3,
                "store.stale_limit": 0.5,
            }
        )
        for principal in principals:
            gateway.fake.add_token(f"token-{principal}", principal)
            await gateway.store_token(principal, f"token-{principal}")
        statuses: list[tuple[float, int]] = []
        stop = asyncio.Event()

        async def load(principal: str) -> None:
            headers = gateway.bearer(principal)
            for _ in range(5000):
                if stop.is_set():
                    return
                response = await gateway.client.post(
                    "/api/notes/create", json={"text": "x"}, headers=headers
                )
                await response.read()
                statuses.append((time.monotonic(), response.status))
                await asyncio.sleep(0.005)

        workers = [asyncio.create_task(load(p)) for p in principals]
        await asyncio.sleep(0.3)
        server.stop()
        await asyncio.sleep(1.5)
        server.start()
        restarted_at = time.monotonic()
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*workers)
    finally:
        server.stop()

    codes = {status for _, status in statuses}
    assert codes <= {200, 503}
    assert 503 in codes
    assert [s for t, s in statuses if t > restarted_at + 0.5].count(200) > 10
    sent = gateway.fake.requests_to("notes/create")
    assert all(r.token is not None for r in sent)
