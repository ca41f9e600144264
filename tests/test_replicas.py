"""Three gateway processes share one Redis; tokens rotate under continuous load."""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time

import aiohttp
import redis.asyncio as redis

from gateway.config import JwtSettings, RedisSettings
from gateway.credentials import issue_jwt
from gateway.store import RedisTokenStore
from tests.conftest import JWT_SECRET, free_port

REPLICAS = 3
CLIENTS_PER_REPLICA = 4
ROTATIONS = 12
ROTATION_INTERVAL = 0.25
PROPAGATION_BOUND = 1.0


async def start_replica(env: dict[str, str], port: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve",
        "--host", "127.0.0.1", "--port", str(port),
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def wait_healthy(session: aiohttp.ClientSession, port: int) -> None:
    url = f"http://127.0.0.1:{port}/_gateway/healthz"
    for _ in range(300):
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"replica on port {port} did not become healthy")


async def test_rotation_reaches_every_replica(
    redis_server, redis_prefix, upstream_server, fake_misskey
):
    upstream = str(upstream_server.make_url("")).rstrip("/")
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MISSKEY_GATEWAY_")
    }
    env.update(
        {
            "MISSKEY_GATEWAY_UPSTREAM_URL": upstream,
            "MISSKEY_GATEWAY_STORE_URL": redis_server.url,
            "MISSKEY_GATEWAY_REDIS_PREFIX": redis_prefix,
            "MISSKEY_GATEWAY_JWT_SECRET": JWT_SECRET,
            "MISSKEY_GATEWAY_STORE_CACHE_TTL": "30",
            "MISSKEY_GATEWAY_LOG_LEVEL": "warning",
        }
    )
    settings = RedisSettings(url=redis_server.url, prefix=redis_prefix)
    store = RedisTokenStore(settings)
    tokens = [f"rotated-token-{n:02d}" for n in range(ROTATIONS + 1)]
    fake_misskey.add_token(tokens[0], "alice")
    await store.set_token("alice", tokens[0])
    jwt = issue_jwt(JwtSettings(secret=JWT_SECRET), JWT_SECRET, "alice", "*", 600)

    ports = [free_port() for _ in range(REPLICAS)]
    replicas = [await start_replica(env, port) for port in ports]
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load(session: aiohttp.ClientSession, replica: int) -> None:
        url = f"http://127.0.0.1:{ports[replica]}/api/i"
        headers = {"Authorization": f"Bearer {jwt}"}
        sent = 0
        while not stop.is_set() and sent < 20_000:
            sent += 1
            request_id = f"replica{replica}-{sent}"
            async with session.post(
                url, json={}, headers={**headers, "X-Request-Id": request_id}
            ) as response:
                await response.read()
                statuses.append(response.status)

    rotated_at: list[float] = []
    try:
        async with aiohttp.ClientSession() as session:
            for port in ports:
                await wait_healthy(session, port)
            workers = [
                asyncio.create_task(load(session, replica))
                for replica in range(REPLICAS)
                for _ in range(CLIENTS_PER_REPLICA)
            ]
            await asyncio.sleep(0.5)
            for n in range(1, ROTATIONS + 1):
                fake_misskey.add_token(tokens[n], "alice")
                if n % 3 == 0:
                    # As another tool would: SET, then PUBLISH on the channel.
                    raw = redis.Redis.from_url(redis_server.url)
                    await raw.set(f"{redis_prefix}token:alice", tokens[n])
                    await raw.publish(f"{redis_prefix}rotations", "alice")
                    await raw.aclose()
                else:
                    await store.set_token("alice", tokens[n])
                rotated_at.append(time.monotonic())
                # Misskey revokes the old token at once; requests still on
                # their way with it are retried with the new one.
                fake_misskey.remove_token(tokens[n - 1])
                await asyncio.sleep(ROTATION_INTERVAL)
            stop.set()
            await asyncio.gather(*workers)
    finally:
        for process in replicas:
            process.terminate()
        for process in replicas:
            await asyncio.wait_for(process.wait(), 10)
        await store.close()

    assert len(statuses) > 200
    assert set(statuses) == {200}

    # Propagation: from a rotation to the last request that replica sent
    # upstream with the previous token.
    delays = []
    received = [r for r in fake_misskey.received if r.path == "/api/i"]
    for n, moment in enumerate(rotated_at, start=1):
        for replica in range(REPLICAS):
            prefix = f"replica{replica}-"
            old = [
                r.received_at
                for r in received
                if r.token == tokens[n - 1]
                and r.headers.get("X-Request-Id", "").startswith(prefix)
            ]
            new = [
                r
                for r in received
                if r.token == tokens[n]
                and r.headers.get("X-Request-Id", "").startswith(prefix)
            ]
            assert new, f"replica {replica} never used token {n}"
            delays.append(max(0.0, max(old, default=moment) - moment))

    p50 = statistics.median(delays)
    p99 = statistics.quantiles(delays, n=100)[98] if len(delays) > 1 else delays[0]
    print(
        f"\nrotation propagation over {len(delays)} replica-rotations: "
        f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
        f"max {max(delays) * 1000:.1f} ms, "
        f"{len(statuses)} requests"
    )
    assert max(delays) < PROPAGATION_BOUND
