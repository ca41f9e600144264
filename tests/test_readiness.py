"""/_gateway/readyz: token store, upstream and policy table."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import UPSTREAM_PROBE_KEY, create_app
from gateway.policy import PolicyTable
from tests.conftest import free_port

redis_only = pytest.mark.parametrize("store_backend", ["redis"], indirect=True)


async def test_readyz_upstream_down(start_gateway):
    gateway = await start_gateway(upstream_url=f"http://127.0.0.1:{free_port()}")
    response = await gateway.client.get("/_gateway/readyz")

    assert response.status == 503
    assert await response.json() == {"status": "unavailable", "failing": ["upstream"]}


@redis_only
async def test_readyz_names_every_failing_part(start_gateway):
    gateway = await start_gateway(
        upstream_url=f"http://127.0.0.1:{free_port()}",
        **{"store.url": f"redis://127.0.0.1:{free_port()}/0"},
    )
    response = await gateway.client.get("/_gateway/readyz")

    assert response.status == 503
    assert (await response.json())["failing"] == ["redis", "upstream"]


async def test_readyz_empty_policy_table(make_settings, upstream_server):
    settings = make_settings(str(upstream_server.make_url("")).rstrip("/"))
    client: TestClient[Any, Any] = TestClient(
        TestServer(create_app(settings, policy=PolicyTable({})), host="127.0.0.1")
    )
    await client.start_server()
    try:
        response = await client.get("/_gateway/readyz")
        body = await response.json()
    finally:
        await client.close()

    assert response.status == 503
    assert body["failing"] == ["policy"]


async def test_readyz_caches_upstream_result(start_gateway):
    upstream = web.Application()
    runner = web.AppRunner(upstream)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        gateway = await start_gateway(upstream_url=f"http://127.0.0.1:{port}")
        probe = gateway.client.server.app[UPSTREAM_PROBE_KEY]
        probe.cache_seconds = 0.5
        first = await gateway.client.get("/_gateway/readyz")
        await site.stop()
        cached = await gateway.client.get("/_gateway/readyz")
        await asyncio.sleep(0.6)
        expired = await gateway.client.get("/_gateway/readyz")
    finally:
        await runner.cleanup()

    assert first.status == 200
    # The upstream is gone, but the result from under 0.5 s ago is reused.
    assert cached.status == 200
    assert expired.status == 503
    assert (await expired.json())["failing"] == ["upstream"]


async def test_readyz_concurrent_probes_share_connect(gateway):
    probe = gateway.client.server.app[UPSTREAM_PROBE_KEY]
    probe.cache_seconds = 0
    calls = 0
    connect = probe._connect

    async def counted() -> bool:
        nonlocal calls
        calls += 1
        return await connect()

    probe._connect = counted
    responses = await asyncio.gather(
        *(gateway.client.get("/_gateway/readyz") for _ in range(5))
    )

    assert [response.status for response in responses] == [200] * 5
    assert calls < 5
