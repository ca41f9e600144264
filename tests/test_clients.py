"""Real Misskey SDKs, given a gateway JWT as their token, work through the gateway."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import pytest

CLIENTS = Path(__file__).parent / "clients"
STORED = "misskey-token-alice"
ENDPOINTS = ["i", "meta", "notes/create", "notes/local-timeline"]

pytestmark = pytest.mark.clients


async def run_client(*command: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode or 0, stdout.decode(), stderr.decode()


def assert_upstream_saw_only_stored_token(gateway, jwt: str) -> None:
    received = gateway.fake.received
    assert received, "the fake Misskey received nothing"
    for request in received:
        assert jwt not in request.body.decode(), request.path
        assert "Authorization" not in request.headers
    for endpoint in ENDPOINTS:
        tokens = {r.token for r in gateway.fake.requests_to(endpoint)}
        assert tokens == {STORED}, endpoint


async def test_misskey_py_through_gateway(gateway):
    jwt = gateway.jwt(scope="read:account write:notes")
    code, stdout, stderr = await run_client(
        sys.executable, str(CLIENTS / "misskey_py_calls.py"), gateway.url, jwt
    )

    assert code == 0, stderr
    results = json.loads(stdout)
    assert results["i"]["username"] == "alice"
    assert results["meta"]["version"] == "2026.5.4"
    assert results["notes/create"]["createdNote"]["text"] == "hello from Misskey.py"
    assert isinstance(results["notes/local-timeline"], list)
    assert_upstream_saw_only_stored_token(gateway, jwt)


async def test_misskey_js_through_gateway(gateway):
    node = shutil.which("node")
    modules = CLIENTS / "js" / "node_modules" / "misskey-js"
    assert node is not None, "Node.js is missing; scripts/test installs it"
    assert modules.is_dir(), (
        "misskey-js is missing; scripts/test runs npm ci in tests/clients/js"
    )
    jwt = gateway.jwt(scope="read:account write:notes")
    code, stdout, stderr = await run_client(
        node, str(CLIENTS / "js" / "calls.mjs"), gateway.url, jwt
    )

    assert code == 0, stderr
    results = json.loads(stdout)
    assert results["i"]["username"] == "alice"
    assert results["meta"]["version"] == "2026.5.4"
    assert results["notes/create"]["createdNote"]["text"] == "hello from misskey-js"
    assert isinstance(results["notes/local-timeline"], list)
    assert_upstream_saw_only_stored_token(gateway, jwt)


async def test_misskey_js_reports_gateway_error(gateway):
    jwt = gateway.jwt(scope="read:account")  # lacks write:notes
    node = shutil.which("node")
    assert node is not None
    code, _, stderr = await run_client(
        node, str(CLIENTS / "js" / "calls.mjs"), gateway.url, jwt
    )

    assert code == 1
    assert "PERMISSION_DENIED" in stderr
    assert gateway.fake.requests_to("notes/create") == []
