"""Rate limiter: GCRA on a real redis-server and in process memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.config import RedisSettings
from gateway.errors import StoreUnavailable
from gateway.ratelimit import (
    GCRA_SCRIPT_SHA,
    Decision,
    LocalRateLimiter,
    Rate,
    RateLimiter,
    RateLimitExceeded,
    RateLimitSettings,
    apply_gcra,
    local_limiter,
    redis_limiter,
)
from gateway.redis_client import RedisClient, create_client
from tests.conftest import RedisServer, free_port

MakeLimiter = Callable[..., RateLimiter]


def client_for(url: str, timeout: float = 1.0) -> RedisClient:
    return create_client(RedisSettings(url=url, timeout=timeout))


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[RedisClient]:
    client = client_for(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def second_client(redis_server: RedisServer) -> AsyncIterator[RedisClient]:
    """A client of its own, as a second gateway replica would have."""
    client = client_for(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture(params=["redis", "local"])
async def make_limiter(
    request: pytest.FixtureRequest, redis_server: RedisServer, redis_prefix: str
) -> AsyncIterator[MakeLimiter]:
    """Build a limiter of each kind from RateLimitSettings keyword arguments."""
    client = client_for(redis_server.url)

    def build(**settings: Any) -> RateLimiter:
        if request.param == "redis":
            return redis_limiter(client, redis_prefix, RateLimitSettings(**settings))
        return local_limiter(RateLimitSettings(**settings))

    yield build
    await client.aclose()


async def check_many(limiter: RateLimiter, principal: str, count: int) -> list[bool]:
    return [(await limiter.check(principal)).allowed for _ in range(count)]


# Settings


def test_settings_default_unlimited():
    settings = RateLimitSettings()
    assert not settings.enabled
    assert settings.limit_for("alice") == 0
    assert settings.rate_for("alice") is None


@pytest.mark.parametrize(
    ("per_minute", "burst"), [(1, 1), (6, 1), (7, 2), (60, 10), (600, 100)]
)
def test_settings_default_burst(per_minute, burst):
    settings = RateLimitSettings(requests_per_minute=per_minute)
    assert settings.burst_for("alice") == burst


def test_settings_overrides():
    settings = RateLimitSettings(
        requests_per_minute=60, principals={"bot": 12, "admin": 0}
    )
    assert settings.enabled
    assert settings.limit_for("alice") == 60
    assert settings.limit_for("bot") == 12
    assert settings.burst_for("bot") == 2
    assert settings.limit_for("admin") == 0
    assert settings.rate_for("admin") is None


def test_settings_override_only():
    settings = RateLimitSettings(principals={"bot": 60})
    assert settings.enabled
    assert settings.limit_for("alice") == 0
    assert settings.limit_for("bot") == 60


def test_settings_explicit_burst_everywhere():
    settings = RateLimitSettings(requests_per_minute=60, burst=3, principals={"bot": 6})
    assert settings.burst_for("alice") == 3
    assert settings.burst_for("bot") == 3


def test_settings_rate_microseconds():
    rate = RateLimitSettings(requests_per_minute=600, burst=5).rate_for("alice")
    assert rate == Rate(limit=600, interval=100_000, tolerance=500_000)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"requests_per_minute": -1}, "ratelimit.requests_per_minute"),
        ({"requests_per_minute": 1.5}, "ratelimit.requests_per_minute"),
        ({"requests_per_minute": True}, "ratelimit.requests_per_minute"),
        ({"requests_per_minute": 60_000_001}, "ratelimit.requests_per_minute"),
        ({"burst": -1}, "ratelimit.burst"),
        ({"burst": 1_000_001}, "ratelimit.burst"),
        ({"principals": {"bot": -5}}, "ratelimit.principals.bot"),
        ({"principals": {"bot": "10"}}, "ratelimit.principals.bot"),
        ({"principals": {"no spaces": 10}}, "ratelimit.principals"),
    ],
)
def test_settings_invalid(values, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        RateLimitSettings(**values)


# Error


@pytest.mark.parametrize(
    ("retry_after", "header"), [(0.05, "1"), (1.0, "1"), (2.01, "3"), (59.5, "60")]
)
def test_exceeded_retry_after_rounded_up(retry_after, header):
    error = RateLimitExceeded(limit=60, retry_after=retry_after)
    assert error.headers() == {"Retry-After": header}
    assert error.envelope()["error"]["info"] == {
        "limit": 60,
        "retryAfterSeconds": int(header),
    }


def test_exceeded_envelope():
    error = RateLimitExceeded(limit=120, retry_after=0.5)
    assert error.status == 429
    assert error.envelope() == {
        "error": {
            "message": "Rate limit exceeded. Please try again later.",
            "code": "RATE_LIMIT_EXCEEDED",
            "id": "d5826d14-3982-4d2e-8011-b9e9f02499ef",
            "kind": "client",
            "info": {"limit": 120, "retryAfterSeconds": 1},
        }
    }


# Algorithm on a fixed clock


def test_gcra_burst_then_steady():
    rate = Rate(limit=60, interval=1_000_000, tolerance=2_000_000)
    tat = None
    for remaining in (2, 1, 0):
        decision, tat = apply_gcra(10_000_000, tat, rate)
        assert decision == Decision(True, 0.0, remaining, 60)
    rejected, unchanged = apply_gcra(10_250_000, tat, rate)
    assert rejected == Decision(False, 0.75, 0, 60)
    assert unchanged is None
    decision, tat = apply_gcra(11_000_000, tat, rate)
    assert decision.allowed
    assert decision.remaining == 0


def test_gcra_idle_resets():
    rate = Rate(limit=60, interval=1_000_000, tolerance=2_000_000)
    decision, tat = apply_gcra(0, 50_000_000, rate)
    assert decision == Decision(False, 48.0, 0, 60)
    decision, tat = apply_gcra(100_000_000, 50_000_000, rate)
    assert decision == Decision(True, 0.0, 2, 60)
    assert tat == 101_000_000


# Both limiters


async def test_limiter_burst_then_rejects(make_limiter):
    limiter = make_limiter(requests_per_minute=60, burst=4)
    decisions = [await limiter.check("alice") for _ in range(5)]
    assert [d.allowed for d in decisions] == [True] * 5
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0]
    assert {d.limit for d in decisions} == {60}
    rejected = await limiter.check("alice")
    assert not rejected.allowed
    assert rejected.remaining == 0
    assert rejected.limit == 60
    # Five requests at once take five seconds of budget and the burst
    # tolerance covers four, so the next one is due one interval after the first.
    assert 0.9 < rejected.retry_after <= 1.0


async def test_limiter_default_burst(make_limiter):
    limiter = make_limiter(requests_per_minute=60)
    assert await check_many(limiter, "alice", 12) == [True] * 11 + [False]


async def test_limiter_recovers_at_steady_rate(make_limiter):
    limiter = make_limiter(requests_per_minute=600, burst=2)
    assert await check_many(limiter, "alice", 4) == [True, True, True, False]
    for _ in range(3):
        probe = await limiter.check("alice")
        assert not probe.allowed
        assert 0 < probe.retry_after <= 0.1
        await asyncio.sleep(probe.retry_after + 0.01)
        assert (await limiter.check("alice")).allowed
        assert not (await limiter.check("alice")).allowed


async def test_limiter_override(make_limiter):
    limiter = make_limiter(requests_per_minute=60, burst=2, principals={"bot": 120})
    assert await check_many(limiter, "alice", 4) == [True] * 3 + [False]
    bot = await limiter.check("bot")
    assert bot.allowed
    assert bot.limit == 120


async def test_limiter_override_default_burst(make_limiter):
    limiter = make_limiter(requests_per_minute=60, principals={"bot": 12})
    assert await check_many(limiter, "bot", 4) == [True] * 3 + [False]
    assert await check_many(limiter, "alice", 12) == [True] * 11 + [False]


async def test_limiter_override_unlimited(make_limiter):
    limiter = make_limiter(requests_per_minute=60, burst=1, principals={"admin": 0})
    decisions = [await limiter.check("admin") for _ in range(50)]
    assert all(d.allowed for d in decisions)
    assert {d.limit for d in decisions} == {0}
    assert await check_many(limiter, "alice", 3) == [True, True, False]


async def test_limiter_only_overridden_principal(make_limiter):
    limiter = make_limiter(principals={"bot": 60}, burst=1)
    assert await check_many(limiter, "alice", 50) == [True] * 50
    assert await check_many(limiter, "bot", 3) == [True, True, False]


async def test_limiter_principals_independent(make_limiter):
    limiter = make_limiter(requests_per_minute=60, burst=2)
    assert await check_many(limiter, "alice", 4) == [True] * 3 + [False]
    assert await check_many(limiter, "bob", 4) == [True] * 3 + [False]
    assert await check_many(limiter, "carol", 1) == [True]


async def test_limiter_concurrent_checks(make_limiter):
    limiter = make_limiter(requests_per_minute=60, burst=9)
    decisions = await asyncio.gather(*(limiter.check("alice") for _ in range(50)))
    assert sum(d.allowed for d in decisions) == 10
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(10))


# Redis limiter


async def test_redis_key_layout_and_ttl(redis_client, redis_prefix):
    settings = RateLimitSettings(requests_per_minute=60, burst=4)
    limiter = redis_limiter(redis_client, redis_prefix, settings)
    key = f"{redis_prefix}ratelimit:alice"
    assert limiter.key_for("alice") == key
    await limiter.check("alice")
    assert 0 < await redis_client.pttl(key) <= 1000
    await check_many(limiter, "alice", 4)
    assert 4000 < await redis_client.pttl(key) <= 5000
    # A rejected request writes nothing, so the expiry keeps counting down.
    assert not (await limiter.check("alice")).allowed
    assert await redis_client.pttl(key) <= 5000


async def test_redis_key_expires_when_idle(redis_client, redis_prefix):
    settings = RateLimitSettings(requests_per_minute=600, burst=1)
    limiter = redis_limiter(redis_client, redis_prefix, settings)
    await check_many(limiter, "alice", 2)
    assert await redis_client.exists(limiter.key_for("alice")) == 1
    await asyncio.sleep(0.25)
    assert await redis_client.exists(limiter.key_for("alice")) == 0


async def test_redis_tat_uses_server_time(redis_client, redis_prefix):
    settings = RateLimitSettings(requests_per_minute=60, burst=1)
    limiter = redis_limiter(redis_client, redis_prefix, settings)
    await limiter.check("alice")
    seconds, microseconds = await redis_client.time()
    server_now = seconds * 1_000_000 + microseconds
    tat = int(await redis_client.get(limiter.key_for("alice")))
    assert 0 < tat - server_now <= 1_000_000


async def test_redis_retry_after_stored_tat(redis_client, redis_prefix):
    settings = RateLimitSettings(requests_per_minute=60, burst=1)
    limiter = redis_limiter(redis_client, redis_prefix, settings)
    seconds, microseconds = await redis_client.time()
    server_now = seconds * 1_000_000 + microseconds
    # Another replica left the budget exhausted for five seconds of Redis time.
    await redis_client.set(limiter.key_for("alice"), server_now + 5_000_000)
    rejected = await limiter.check("alice")
    assert not rejected.allowed
    assert 3.9 < rejected.retry_after <= 4.0


async def test_redis_replicas_share_budget(redis_client, second_client, redis_prefix):
    settings = RateLimitSettings(requests_per_minute=60, burst=4)
    first = redis_limiter(redis_client, redis_prefix, settings)
    second = redis_limiter(second_client, redis_prefix, settings)
    allowed = []
    for index in range(10):
        limiter = first if index % 2 == 0 else second
        allowed.append((await limiter.check("alice")).allowed)
    assert allowed == [True] * 5 + [False] * 5


async def test_redis_replicas_concurrent(redis_client, second_client, redis_prefix):
    settings = RateLimitSettings(requests_per_minute=60, burst=14)
    replicas = [
        redis_limiter(redis_client, redis_prefix, settings),
        redis_limiter(second_client, redis_prefix, settings),
    ]
    decisions = await asyncio.gather(
        *(replicas[index % 2].check("alice") for index in range(60))
    )
    assert sum(d.allowed for d in decisions) == 15


async def test_redis_prefixes_separate(redis_client, redis_prefix):
    settings = RateLimitSettings(requests_per_minute=60, burst=1)
    first = redis_limiter(redis_client, redis_prefix, settings)
    other = redis_limiter(redis_client, f"{redis_prefix}other:", settings)
    assert await check_many(first, "alice", 3) == [True, True, False]
    assert await check_many(other, "alice", 3) == [True, True, False]


async def test_redis_reloads_flushed_script(redis_client, redis_prefix):
    settings = RateLimitSettings(requests_per_minute=60, burst=1)
    limiter = redis_limiter(redis_client, redis_prefix, settings)
    assert (await limiter.check("alice")).allowed
    await redis_client.script_flush()
    assert await redis_client.script_exists(GCRA_SCRIPT_SHA) == [False]
    assert (await limiter.check("alice")).allowed
    assert await redis_client.script_exists(GCRA_SCRIPT_SHA) == [True]
    assert not (await limiter.check("alice")).allowed


async def test_redis_down_unavailable(redis_prefix):
    client = client_for(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    settings = RateLimitSettings(requests_per_minute=60, principals={"admin": 0})
    limiter = redis_limiter(client, redis_prefix, settings)
    try:
        with pytest.raises(StoreUnavailable):
            await limiter.check("alice")
        # A principal without a limit never needs Redis.
        assert (await limiter.check("admin")).allowed
    finally:
        await client.aclose()


async def test_redis_wrong_type_unavailable(redis_client, redis_prefix):
    settings = RateLimitSettings(requests_per_minute=60)
    limiter = redis_limiter(redis_client, redis_prefix, settings)
    await redis_client.hset(limiter.key_for("alice"), "field", "value")
    with pytest.raises(StoreUnavailable):
        await limiter.check("alice")


# Local limiter


async def test_local_sweeps_idle_principals():
    settings = RateLimitSettings(requests_per_minute=600, burst=1)
    limiter = LocalRateLimiter(settings, sweep_interval=0.0)
    await limiter.check("alice")
    assert limiter.tracked_principals == 1
    await asyncio.sleep(0.15)
    await limiter.check("bob")
    assert limiter.tracked_principals == 1
    # Alice's state was dropped only once idle, so her budget is full again.
    assert await check_many(limiter, "alice", 3) == [True, True, False]


async def test_local_keeps_active_principals():
    settings = RateLimitSettings(requests_per_minute=60, burst=1)
    limiter = LocalRateLimiter(settings, sweep_interval=0.0)
    await check_many(limiter, "alice", 2)
    await limiter.check("bob")
    assert limiter.tracked_principals == 2
    assert not (await limiter.check("alice")).allowed


async def test_local_processes_count_separately():
    settings = RateLimitSettings(requests_per_minute=60, burst=1)
    first = local_limiter(settings)
    second = local_limiter(settings)
    assert await check_many(first, "alice", 3) == [True, True, False]
    assert await check_many(second, "alice", 3) == [True, True, False]


async def test_redis_one_evalsha_per_check(redis_client, redis_prefix):
    settings = RateLimitSettings(requests_per_minute=60, burst=9)
    limiter = redis_limiter(redis_client, redis_prefix, settings)
    await limiter.check("alice")
    before = await redis_client.info("commandstats")
    await check_many(limiter, "alice", 5)
    after = await redis_client.info("commandstats")
    assert after["cmdstat_evalsha"]["calls"] - before["cmdstat_evalsha"]["calls"] == 5
    assert after.get("cmdstat_eval") == before.get("cmdstat_eval")


# Through the gateway


async def test_gateway_answers_429(start_gateway):
    gateway = await start_gateway(
        **{"ratelimit.requests_per_minute": 60, "ratelimit.burst": 2}
    )
    gateway.fake.add_token("token-alice", "alice")
    await gateway.store_token("alice", "token-alice")
    headers = gateway.bearer("alice")
    statuses = []
    for _ in range(4):
        response = await gateway.client.post("/api/i", json={}, headers=headers)
        statuses.append(response.status)
    error = (await response.json())["error"]
    other = await gateway.client.post(
        "/api/meta", json={}, headers=gateway.bearer("bob")
    )

    assert statuses == [200, 200, 200, 429]
    assert error["code"] == "RATE_LIMIT_EXCEEDED"
    assert error["id"] == "d5826d14-3982-4d2e-8011-b9e9f02499ef"
    assert int(response.headers["Retry-After"]) >= 1
    assert other.status == 200
    assert len(gateway.fake.requests_to("i")) == 3


async def test_gateway_principal_override(start_gateway):
    gateway = await start_gateway(
        **{
            "ratelimit.requests_per_minute": 60,
            "ratelimit.burst": 1,
            "ratelimit.principals": {"trusted": 0},
        }
    )
    headers = gateway.bearer("trusted")
    statuses = []
    for _ in range(5):
        response = await gateway.client.post("/api/meta", json={}, headers=headers)
        statuses.append(response.status)

    assert statuses == [200] * 5


async def test_gateway_anonymous_not_limited(start_gateway):
    gateway = await start_gateway(
        **{"ratelimit.requests_per_minute": 60, "ratelimit.burst": 1}
    )
    statuses = []
    for _ in range(4):
        response = await gateway.client.post("/api/meta", json={})
        statuses.append(response.status)

    assert statuses == [200] * 4
