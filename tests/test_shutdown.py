"""SIGTERM: in-flight requests finish, new connections are refused, exit 0."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import free_port
from tests.test_metrics import serve_environment, start_serve, wait_ready

# Seconds the fake upstream takes to respond on the slow endpoint.
UPSTREAM_DELAY = 1.5


def slow_meta_handler(started: asyncio.Event):
    async def handle(request: web.Request, received: object) -> web.Response:
        started.set()
        await asyncio.sleep(UPSTREAM_DELAY)
        return web.json_response({"name": "slow"})

    return handle


async def connection_refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (ConnectionRefusedError, ConnectionResetError):
        # A connection that reached the listening socket just as it closed
        # is reset rather than refused; either way it was not accepted.
        return True
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionResetError:
        pass
    return False


async def wait_refused(port: int, deadline: float) -> bool:
    """Return whether connections to ``port`` are refused before ``deadline``."""
    while time.monotonic() < deadline:
        if await connection_refused(port):
            return True
        await asyncio.sleep(0.02)
    return False


def log_events(output: bytes) -> list[str]:
    """Return the logged event names, with the endpoint added to requests."""
    events = []
    for line in output.decode().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "request":
            events.append(f"request {entry.get('endpoint')}")
        else:
            events.append(str(entry.get("event")))
    return events


async def wait_workers(url: str, workers: int) -> None:
    """Wait until ``workers`` processes respond on the shared port.

    Generated request ids start with a random prefix per process, so the
    prefixes seen over new connections tell the workers apart.
    """
    prefixes = set()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(500):
            async with session.post(f"{url}/api/i", json={}) as response:
                assert response.status == 401
                prefixes.add(response.headers["X-Request-Id"][:16])
            if len(prefixes) == workers:
                return
            await asyncio.sleep(0.01)
    raise AssertionError(f"only {len(prefixes)} of {workers} workers responded")


async def run_shutdown(
    redis_server,
    redis_prefix,
    upstream_server,
    fake_misskey,
    workers: int,
    grace: float,
    signals: int = 1,
) -> tuple[int | None, bool, int, list[str]]:
    """Start serve, send SIGTERM during a slow request, and report what happened.

    ``signals`` is the number of SIGTERMs sent, 0.1 seconds apart.

    Returns the request's status (None when it failed), whether new
    connections were refused while it was in flight, the exit code and the
    logged events.
    """
    started = asyncio.Event()
    fake_misskey.handlers["meta"] = slow_meta_handler(started)
    upstream = str(upstream_server.make_url("")).rstrip("/")
    env = serve_environment(upstream, redis_server.url, redis_prefix)
    env["MISSKEY_GATEWAY_LOG_LEVEL"] = "info"
    env["MISSKEY_GATEWAY_SERVER_SHUTDOWN_GRACE"] = str(grace)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = await start_serve(env, port, workers, stdout=asyncio.subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, url)
            await wait_workers(url, workers)

            async def slow_request() -> int | None:
                try:
                    async with session.post(f"{url}/api/meta", json={}) as response:
                        await response.read()
                        return response.status
                except aiohttp.ClientError:
                    return None

            request = asyncio.create_task(slow_request())
            await asyncio.wait_for(started.wait(), 10)
            process.send_signal(signal.SIGTERM)
            for _ in range(signals - 1):
                await asyncio.sleep(0.1)
                process.send_signal(signal.SIGTERM)
            refused = await wait_refused(port, time.monotonic() + UPSTREAM_DELAY - 0.3)
            in_flight = not request.done()
            status = await asyncio.wait_for(request, 30)
        stdout, _ = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert in_flight
    assert process.returncode is not None
    return status, refused, process.returncode, log_events(stdout)


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_lets_request_finish(
    redis_server, redis_prefix, upstream_server, fake_misskey, workers
):
    status, refused, returncode, events = await run_shutdown(
        redis_server, redis_prefix, upstream_server, fake_misskey, workers, grace=30
    )

    assert status == 200
    assert refused
    assert returncode == 0
    assert events.count("gateway.stopping") == workers
    assert events.count("gateway.stopped") == workers
    assert events.index("gateway.stopping") < events.index("request meta")


async def test_sigterm_grace_expires(
    redis_server, redis_prefix, upstream_server, fake_misskey
):
    status, refused, returncode, events = await run_shutdown(
        redis_server, redis_prefix, upstream_server, fake_misskey, 1, grace=0.3
    )

    assert status is None
    assert refused
    assert returncode == 0
    assert "gateway.stopped" in events


async def test_repeated_sigterm_keeps_grace(
    redis_server, redis_prefix, upstream_server, fake_misskey
):
    status, refused, returncode, events = await run_shutdown(
        redis_server, redis_prefix, upstream_server, fake_misskey, 1, 30, signals=3
    )

    assert status == 200
    assert refused
    assert returncode == 0
    assert events.count("gateway.signal_ignored") == 2
    assert "gateway.stopped" in events
