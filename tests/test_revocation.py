"""Revoked JWT ids: rejected on every request from the moment of revocation."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import jwt

from tests.conftest import JWT_SECRET

STORED = "misskey-token-alice"


async def call(gateway, credential: str):
    return await gateway.client.post(
        "/api/i", json={}, headers={"Authorization": f"Bearer {credential}"}
    )


def jwt_id(credential: str) -> str:
    return jwt.decode(credential, JWT_SECRET, algorithms=["HS256"])["jti"]


async def test_issued_jwts_carry_distinct_ids(gateway):
    first = gateway.jwt()
    second = gateway.jwt()

    assert jwt_id(first) != jwt_id(second)


async def test_revoked_jwt_rejected(gateway):
    credential = gateway.jwt()
    before = await call(gateway, credential)
    await gateway.store.revoke_jwt_id(jwt_id(credential), time.time() + 60)
    after = await call(gateway, credential)
    other = await call(gateway, gateway.jwt())

    assert before.status == 200
    assert after.status == 401
    assert "revoked" in (await after.json())["error"]["message"]
    assert other.status == 200
    assert len(gateway.fake.requests_to("i")) == 2


async def test_revocation_expires(gateway):
    credential = gateway.jwt()
    await gateway.store.revoke_jwt_id(jwt_id(credential), time.time() - 5)
    response = await call(gateway, credential)

    assert response.status == 200


async def test_jwt_without_id_still_accepted(gateway):
    now = int(time.time())
    credential = jwt.encode(
        {"sub": "alice", "scope": "*", "exp": now + 60}, JWT_SECRET, algorithm="HS256"
    )
    response = await call(gateway, credential)

    assert response.status == 200


async def test_malformed_jwt_id_rejected(gateway):
    now = int(time.time())
    credential = jwt.encode(
        {"sub": "alice", "exp": now + 60, "jti": "../x y"},
        JWT_SECRET,
        algorithm="HS256",
    )
    response = await call(gateway, credential)

    assert response.status == 401


async def run_cli(env, *args, stdin: bytes = b""):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(stdin), 30)
    return process.returncode, stdout.decode(), stderr.decode()


def cli_env(gateway) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MISSKEY_GATEWAY_")}
    env["MISSKEY_GATEWAY_STORE_URL"] = gateway.settings.store.url
    env["MISSKEY_GATEWAY_REDIS_PREFIX"] = gateway.settings.redis.prefix
    env["MISSKEY_GATEWAY_JWT_SECRET"] = JWT_SECRET
    return env


async def test_cli_revoke_from_stdin_reaches_gateway(gateway):
    credential = gateway.jwt()
    assert (await call(gateway, credential)).status == 200
    code, stdout, stderr = await run_cli(
        cli_env(gateway), "jwt", "revoke", stdin=credential.encode()
    )
    deadline = time.monotonic() + 3
    status = 200
    while status == 200 and time.monotonic() < deadline:
        status = (await call(gateway, credential)).status
        await asyncio.sleep(0.01)

    assert code == 0, stderr
    assert jwt_id(credential) in stdout
    assert credential not in stdout + stderr
    assert status == 401


async def test_cli_revoke_by_id_needs_duration(gateway):
    code, _, stderr = await run_cli(cli_env(gateway), "jwt", "revoke", "some-id")

    assert code == 1
    assert "--for" in stderr


async def test_cli_revoke_by_id(gateway):
    credential = gateway.jwt()
    code, _, stderr = await run_cli(
        cli_env(gateway), "jwt", "revoke", jwt_id(credential), "--for", "60"
    )
    deadline = time.monotonic() + 3
    status = 200
    while status == 200 and time.monotonic() < deadline:
        status = (await call(gateway, credential)).status
        await asyncio.sleep(0.01)

    assert code == 0, stderr
    assert status == 401
