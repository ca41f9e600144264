"""Outages of Redis and of the upstream: clear errors, never an anonymous request."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from tests.conftest import RedisServer, free_port

STORED = "misskey-token-alice"
redis_only = pytest.mark.parametrize("store_backend", ["redis"], indirect=True)


@pytest.fixture
def own_redis(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@redis_only
async def test_redis_unreachable_is_503(start_gateway):
    gateway = await start_gateway(**{"store.url": f"redis://127.0.0.1:{free_port()}/0"})
    response = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())
    error = (await response.json())["error"]

    assert response.status == 503
    assert error["code"] == "TOKEN_STORE_UNAVAILABLE"
    assert response.headers["Retry-After"] == "1"
    assert gateway.fake.received == []


@redis_only
async def test_store_down_on_recheck_releases_upstream(start_gateway, own_redis):
    gateway = await start_gateway(
        **{
            "store.url": own_redis.url,
            "store.cache_ttl": 60,
            "store.stale_limit": 0,
            "upstream.max_connections": 1,
            "upstream.connect_timeout": 1.0,
        }
    )
    # The fake Misskey does not know the stored token, so it returns 401
    # AUTHENTICATION_FAILED and the gateway reads the store again.
    await gateway.store_token("alice", STORED)
    headers = gateway.bearer()
    first = await gateway.client.post("/api/i", json={}, headers=headers)
    own_redis.stop()
    second = await gateway.client.post("/api/i", json={}, headers=headers)
    anonymous = await gateway.client.post("/api/app/create", json={"name": "x"})

    assert first.status == 401
    assert second.status == 503
    assert (await second.json())["error"]["code"] == "TOKEN_STORE_UNAVAILABLE"
    assert anonymous.status == 200


@redis_only
async def test_redis_down_optional_never_anonymous(start_gateway):
    gateway = await start_gateway(**{"store.url": f"redis://127.0.0.1:{free_port()}/0"})
    response = await gateway.client.post("/api/meta", json={}, headers=gateway.bearer())

    assert response.status == 503
    assert gateway.fake.received == []


@redis_only
async def test_redis_down_anonymous_request_served(start_gateway):
    gateway = await start_gateway(**{"store.url": f"redis://127.0.0.1:{free_port()}/0"})
    response = await gateway.client.post("/api/meta", json={})

    assert response.status == 200


@redis_only
async def test_redis_stopped_then_restarted(start_gateway, own_redis):
    gateway = await start_gateway(**{"store.url": own_redis.url, "store.cache_ttl": 0})
    gateway.fake.add_token(STORED, "alice")
    await gateway.store_token("alice", STORED)

    before = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())
    own_redis.stop()
    during = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())
    ready_during = await gateway.client.get("/_gateway/readyz")
    own_redis.start()
    await gateway.store_token("alice", STORED)  # the restarted server kept nothing
    after = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())

    assert before.status == 200
    assert during.status == 503
    assert ready_during.status == 503
    assert (await ready_during.json())["failing"] == ["redis"]
    assert after.status == 200
    assert len(gateway.fake.requests_to("i")) == 2


@redis_only
async def test_stored_token_malformed_never_forwarded(gateway):
    import redis.asyncio as redis

    client = redis.Redis.from_url(gateway.settings.store.url)
    await client.set(f"{gateway.settings.redis.prefix}token:alice", b"has space")
    await client.aclose()
    response = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())

    assert response.status == 500
    assert (await response.json())["error"]["code"] == "STORED_TOKEN_INVALID"
    assert gateway.fake.received == []


async def test_upstream_refused_is_502(start_gateway):
    gateway = await start_gateway(upstream_url=f"http://127.0.0.1:{free_port()}")
    await gateway.store_token("alice", STORED)
    response = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())

    assert response.status == 502
    assert (await response.json())["error"]["code"] == "UPSTREAM_UNAVAILABLE"


async def test_upstream_timeout_is_504(start_gateway):
    gateway = await start_gateway(**{"upstream.read_timeout": 0.3})
    await gateway.store_token("alice", STORED)

    async def slow(request, received):
        await asyncio.sleep(5)
        return web.json_response({})

    gateway.fake.handlers["fake/slow"] = slow
    started = asyncio.get_running_loop().time()
    response = await gateway.client.post(
        "/api/fake/slow", json={}, headers=gateway.bearer()
    )
    elapsed = asyncio.get_running_loop().time() - started

    assert response.status == 504
    assert (await response.json())["error"]["code"] == "UPSTREAM_TIMEOUT"
    assert elapsed < 3


async def test_upstream_timeout_on_reused_connection(start_gateway):
    gateway = await start_gateway(**{"upstream.read_timeout": 0.3})
    await gateway.store_token("alice", STORED)

    async def slow(request, received):
        await asyncio.sleep(5)
        return web.json_response({})

    async def quick(request, received):
        return web.json_response({})

    gateway.fake.handlers["fake/slow"] = slow
    gateway.fake.handlers["fake/quick"] = quick
    first = await gateway.client.post(
        "/api/fake/quick", json={}, headers=gateway.bearer()
    )
    await asyncio.sleep(0.2)
    started = asyncio.get_running_loop().time()
    second = await gateway.client.post(
        "/api/fake/slow", json={}, headers=gateway.bearer()
    )
    elapsed = asyncio.get_running_loop().time() - started

    assert first.status == 200
    assert second.status == 504
    assert elapsed < 3


async def test_trickling_upstream_body_not_timed_out(start_gateway):
    gateway = await start_gateway(**{"upstream.read_timeout": 0.3})
    await gateway.store_token("alice", STORED)
    pieces = [b'{"a":', b'"' + b"x" * 10 + b'"', b',"b":1', b"}"]

    async def trickle(request, received):
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
            await asyncio.sleep(0.15)
        await response.write_eof()
        return response

    gateway.fake.handlers["fake/trickle"] = trickle
    response = await gateway.client.post(
        "/api/fake/trickle", json={}, headers=gateway.bearer()
    )

    assert response.status == 200
    assert await response.read() == b"".join(pieces)


async def test_upstream_closes_without_answer_is_502(gateway):
    async def drop(request, received):
        request.transport.close()
        await asyncio.sleep(1)
        return web.Response()

    gateway.fake.handlers["fake/drop"] = drop
    response = await gateway.client.post(
        "/api/fake/drop", json={}, headers=gateway.bearer()
    )

    assert response.status == 502


async def test_upstream_body_cut_short_cuts_client(gateway):
    async def truncated(request, received):
        response = web.StreamResponse(headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"x" * 100)
        request.transport.close()
        return response

    gateway.fake.handlers["fake/truncated"] = truncated
    response = await gateway.client.post(
        "/api/fake/truncated", json={}, headers=gateway.bearer()
    )

    assert response.status == 200
    with pytest.raises(Exception):  # noqa: B017 - aiohttp raises one of several errors
        await response.read()

    # The gateway keeps serving afterwards.
    after = await gateway.client.post("/api/meta", json={})
    assert after.status == 200


async def test_gateway_serves_after_client_disconnect(gateway):
    started = asyncio.Event()

    async def slow_body(request, received):
        response = web.StreamResponse()
        await response.prepare(request)
        started.set()
        for _ in range(50):
            await response.write(b"x" * 1024)
            await asyncio.sleep(0.01)
        return response

    gateway.fake.handlers["fake/slow-body"] = slow_body
    server = gateway.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        b"POST /api/fake/slow-body HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\n"
        + f"Authorization: Bearer {gateway.jwt()}\r\n".encode()
        + b"Content-Length: 2\r\n\r\n{}"
    )
    await writer.drain()
    await asyncio.wait_for(started.wait(), 5)
    await reader.read(100)
    writer.close()

    response = await gateway.client.post("/api/meta", json={})
    assert response.status == 200


async def test_healthz_ok(gateway):
    response = await gateway.client.get("/_gateway/healthz")

    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_readyz_ok(gateway):
    response = await gateway.client.get("/_gateway/readyz")

    assert response.status == 200


@pytest.mark.parametrize("store_backend", ["sqlite"], indirect=True)
async def test_sqlite_unusable_is_503(start_gateway, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    gateway = await start_gateway(**{"store.url": f"sqlite:///{blocker}/tokens.db"})
    response = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())
    ready = await gateway.client.get("/_gateway/readyz")

    assert response.status == 503
    assert (await response.json())["error"]["code"] == "TOKEN_STORE_UNAVAILABLE"
    assert ready.status == 503
    assert (await ready.json())["failing"] == ["sqlite"]
    assert gateway.fake.received == []


@redis_only
async def test_redis_slow_is_503_within_timeout(start_gateway, own_redis):
    import signal

    gateway = await start_gateway(
        **{"store.url": own_redis.url, "store.cache_ttl": 0, "redis.timeout": 0.3}
    )
    gateway.fake.add_token(STORED, "alice")
    await gateway.store_token("alice", STORED)
    own_redis.process.send_signal(signal.SIGSTOP)
    try:
        started = asyncio.get_running_loop().time()
        response = await gateway.client.post(
            "/api/i", json={}, headers=gateway.bearer()
        )
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
    after = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())

    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    # One command timeout plus the one quick retry, with margin.
    assert elapsed < 2.0
    assert after.status == 200
    assert len(gateway.fake.requests_to("i")) == 1


# Resources after failures: a pool of two connections must survive many
# failed exchanges, so a slot lost per failure would show at once.


# Tasks that end on their own or with their connection: the start-up policy
# check, and the worker task of each open lean-server connection.
TRANSIENT_TASKS = frozenset({"check_policy_against_upstream", "_work"})


def gateway_tasks() -> list[str]:
    """Return the names of running tasks whose code is the gateway's own."""
    names = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if code is None or code.co_name in TRANSIENT_TASKS:
            continue
        if "/gateway/" in code.co_filename:
            names.append(code.co_qualname)
    return sorted(names)


def connection_workers() -> int:
    """Return the number of running lean-server connection workers."""
    return sum(
        getattr(task.get_coro(), "__qualname__", "") == "FrontProtocol._work"
        for task in asyncio.all_tasks()
    )


async def test_no_connection_leak_after_failures(start_gateway):
    gateway = await start_gateway(
        **{"upstream.max_connections": 2, "upstream.read_timeout": 0.2}
    )
    await gateway.store_token("alice", STORED)
    gateway.fake.add_token(STORED, "alice")

    async def drop(request, received):
        request.transport.close()
        await asyncio.sleep(0.5)
        return web.Response()

    async def slow(request, received):
        await asyncio.sleep(1)
        return web.json_response({})

    async def truncated(request, received):
        response = web.StreamResponse(headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"x" * 10)
        request.transport.close()
        return response

    gateway.fake.handlers.update(
        {"fake/drop": drop, "fake/slow": slow, "fake/truncated": truncated}
    )
    tasks_before = gateway_tasks()
    statuses = []
    for path in ["fake/drop", "fake/slow", "fake/truncated"] * 3:
        try:
            response = await gateway.client.post(
                f"/api/{path}", json={}, headers=gateway.bearer()
            )
            await response.read()
            statuses.append(response.status)
        except Exception:  # noqa: BLE001 - the truncated body ends the connection
            statuses.append(0)
    after = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())
    await asyncio.sleep(0.6)  # let the fake's handlers finish their sleeps

    assert set(statuses) <= {0, 200, 502, 504}
    assert after.status == 200
    assert gateway_tasks() == tasks_before
    assert connection_workers() <= len(gateway.client.server.runner.server.connections)


async def test_client_gone_mid_upload_releases_connection(start_gateway, log_output):
    gateway = await start_gateway(**{"upstream.max_connections": 1})
    await gateway.store_token("alice", STORED)
    gateway.fake.add_token(STORED, "alice")
    server = gateway.client.server
    boundary = "cut-boundary"
    for _ in range(3):
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(
            b"POST /api/drive/files/create HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {gateway.jwt()}\r\n".encode()
            + f"Content-Type: multipart/form-data; boundary={boundary}\r\n".encode()
            + b"Content-Length: 10000000\r\n\r\n"
            + f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '.encode()
            + b'filename="a"\r\n\r\n'
            + b"x" * 200_000
        )
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
    await asyncio.sleep(0.3)
    after = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())
    uploads = [
        json.loads(line)
        for line in log_output.getvalue().splitlines()
        if '"event":"request"' in line and "drive/files/create" in line
    ]

    assert after.status == 200
    # Each abandoned upload is logged once, as the request it was.
    assert len(uploads) == 3
    assert all(event["endpoint"] == "drive/files/create" for event in uploads)


# Slow clients


async def test_slow_json_body_is_408(start_gateway):
    gateway = await start_gateway(**{"server.client_body_timeout": 0.3})
    server = gateway.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        b"POST /api/meta HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"text":'
    )
    await writer.drain()
    started = asyncio.get_running_loop().time()
    # aiohttp may keep reading and dropping the rest of the body for a while
    # (lingering close), so read the response, not until the end of stream.
    data = await asyncio.wait_for(reader.read(2000), 5)
    elapsed = asyncio.get_running_loop().time() - started
    writer.close()

    assert data.startswith(b"HTTP/1.1 408")
    assert b"REQUEST_TIMEOUT" in data
    assert elapsed < 2
    assert gateway.fake.received == []


async def test_stalled_upload_is_408(start_gateway):
    gateway = await start_gateway(**{"server.client_body_timeout": 0.3})
    await gateway.store_token("alice", STORED)
    gateway.fake.add_token(STORED, "alice")
    server = gateway.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        b"POST /api/drive/files/create HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {gateway.jwt()}\r\n".encode()
        + b"Content-Type: multipart/form-data; boundary=stall\r\n"
        + b"Content-Length: 1000000\r\n\r\n"
        + b"--stall\r\n"
        + b'Content-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
        + b"x" * 1000
    )
    await writer.drain()
    data = await asyncio.wait_for(reader.read(2000), 5)
    writer.close()
    after = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())

    assert data.startswith(b"HTTP/1.1 408")
    assert after.status == 200


async def test_slow_headers_connection_closed(tmp_path):
    """A client dripping header lines is cut off after server.keepalive_timeout."""
    import os
    import sys

    import aiohttp

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MISSKEY_GATEWAY_")}
    env.update(
        {
            "MISSKEY_GATEWAY_SERVER_KEEPALIVE_TIMEOUT": "0.5",
            "MISSKEY_GATEWAY_STORE_URL": f"sqlite:///{tmp_path / 'store.db'}",
            "MISSKEY_GATEWAY_POLICY_CHECK_UPSTREAM": "false",
        }
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
        "--port", str(port), "--upstream", f"http://127.0.0.1:{free_port()}",
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(
                        f"http://127.0.0.1:{port}/_gateway/healthz"
                    ) as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /api/meta HTTP/1.1\r\nHost: x\r\n")
        started = asyncio.get_running_loop().time()
        closed_after = None
        for _ in range(50):
            await asyncio.sleep(0.1)
            try:
                writer.write(b"X-Slow: y\r\n")
                await writer.drain()
            except (ConnectionError, OSError):
                closed_after = asyncio.get_running_loop().time() - started
                break
            if reader.at_eof():
                closed_after = asyncio.get_running_loop().time() - started
                break
        writer.close()
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)

    assert closed_after is not None
    assert closed_after < 3
