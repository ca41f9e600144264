"""The OAuth 2.0 token endpoint: client credentials grant, RFC 6749 §4.4 and §5."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from pathlib import Path

import jwt
import pytest
from authlib.integrations.httpx_client import AsyncOAuth2Client

from gateway.grants import new_oauth_client
from tests.conftest import JWT_SECRET

TOKEN_PATH = "/_gateway/oauth/token"
CLI = str(Path(sys.executable).with_name("misskey-gateway"))


async def create_client(gateway, principal="alice", scope="read:account write:notes"):
    secret, record = new_oauth_client(principal, scope)
    await gateway.store.put_oauth_client(record)
    return record.client_id, secret


def basic(client_id: str, secret: str) -> dict[str, str]:
    encoded = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


async def post_token(gateway, data, headers=None):
    return await gateway.client.post(TOKEN_PATH, data=data, headers=headers)


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
async def test_authlib_client_calls_api(gateway, auth_method):
    client_id, secret = await create_client(gateway)

    async with AsyncOAuth2Client(
        client_id,
        secret,
        token_endpoint_auth_method=auth_method,
        scope="read:account",
    ) as client:
        token = await client.fetch_token(
            gateway.url + TOKEN_PATH, grant_type="client_credentials"
        )
        response = await client.post(gateway.url + "/api/i", json={})
        denied = await client.post(
            gateway.url + "/api/notes/create", json={"text": "hi"}
        )

    assert token["token_type"] == "Bearer"
    assert token["scope"] == "read:account"
    assert token["expires_in"] == 3600
    claims = jwt.decode(token["access_token"], JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert response.status_code == 200
    assert response.json()["username"] == "alice"
    assert gateway.fake.requests_to("i")[-1].token == "misskey-token-alice"
    assert denied.status_code == 403
    assert gateway.fake.requests_to("notes/create") == []


async def test_token_response_shape(gateway):
    client_id, secret = await create_client(gateway, scope="write:notes read:account")

    response = await post_token(
        gateway, {"grant_type": "client_credentials"}, basic(client_id, secret)
    )

    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Pragma"] == "no-cache"
    body = await response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert body["scope"] == "read:account write:notes"


async def test_token_ttl_from_config(start_gateway):
    gateway = await start_gateway(onboarding__oauth_token_ttl=120)
    await gateway.store_token("alice", "misskey-token-alice")
    client_id, secret = await create_client(gateway)

    response = await post_token(
        gateway, {"grant_type": "client_credentials"}, basic(client_id, secret)
    )

    body = await response.json()
    assert body["expires_in"] == 120
    claims = jwt.decode(body["access_token"], JWT_SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 120


async def test_wrong_secret_is_invalid_client(gateway):
    client_id, _ = await create_client(gateway)
    _, other_secret = await create_client(gateway)

    for headers, data in [
        (basic(client_id, other_secret), {"grant_type": "client_credentials"}),
        (
            None,
            {
                "grant_type": "client_credentials",
                "client_id": client_id,
                "client_secret": other_secret,
            },
        ),
        (basic("mgc_" + "0" * 24, other_secret), {"grant_type": "client_credentials"}),
        (basic("nonsense", "x"), {"grant_type": "client_credentials"}),
        (None, {"grant_type": "client_credentials"}),
        ({"Authorization": "Bearer abc"}, {"grant_type": "client_credentials"}),
        ({"Authorization": "Basic !!!"}, {"grant_type": "client_credentials"}),
    ]:
        response = await post_token(gateway, data, headers)
        assert response.status == 401, headers
        assert response.headers["WWW-Authenticate"].startswith("Basic")
        assert (await response.json())["error"] == "invalid_client"


async def test_revoked_client_is_invalid(gateway):
    client_id, secret = await create_client(gateway)
    assert await gateway.store.delete_oauth_client(client_id)

    response = await post_token(
        gateway, {"grant_type": "client_credentials"}, basic(client_id, secret)
    )

    assert response.status == 401
    assert (await response.json())["error"] == "invalid_client"


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({}, "invalid_request"),
        ({"grant_type": "password"}, "unsupported_grant_type"),
        ({"grant_type": "authorization_code"}, "unsupported_grant_type"),
        (
            {"grant_type": "client_credentials", "scope": "write:notes read:admin"},
            "invalid_scope",
        ),
    ],
)
async def test_request_errors(gateway, data, error):
    client_id, secret = await create_client(gateway)

    response = await post_token(gateway, data, basic(client_id, secret))

    assert response.status == 400
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert body["error"] == error
    assert body["error_description"]


async def test_repeated_parameter_rejected(gateway):
    client_id, secret = await create_client(gateway)

    response = await gateway.client.post(
        TOKEN_PATH,
        data="grant_type=client_credentials&grant_type=client_credentials",
        headers={
            **basic(client_id, secret),
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )

    assert response.status == 400
    assert (await response.json())["error"] == "invalid_request"


async def test_two_auth_methods_rejected(gateway):
    client_id, secret = await create_client(gateway)

    response = await post_token(
        gateway,
        {
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": secret,
        },
        basic(client_id, secret),
    )

    assert response.status == 400
    assert (await response.json())["error"] == "invalid_request"


async def test_json_body_rejected(gateway):
    client_id, secret = await create_client(gateway)

    response = await gateway.client.post(
        TOKEN_PATH,
        json={"grant_type": "client_credentials"},
        headers=basic(client_id, secret),
    )

    assert response.status == 400
    assert (await response.json())["error"] == "invalid_request"


async def test_principal_without_token_is_invalid_grant(gateway):
    client_id, secret = await create_client(gateway, principal="bob")

    response = await post_token(
        gateway, {"grant_type": "client_credentials"}, basic(client_id, secret)
    )

    assert response.status == 400
    assert (await response.json())["error"] == "invalid_grant"


async def test_star_scope_allows_any_kind(gateway):
    client_id, secret = await create_client(gateway, scope="*")

    response = await post_token(
        gateway,
        {"grant_type": "client_credentials", "scope": "read:admin:meta"},
        basic(client_id, secret),
    )

    assert response.status == 200
    assert (await response.json())["scope"] == "read:admin:meta"


async def test_get_not_allowed(gateway):
    response = await gateway.client.get(TOKEN_PATH)

    assert response.status == 405
    assert response.headers["Allow"] == "POST"


async def run_cli(store_url: str, redis_prefix: str, *args: str):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MISSKEY_GATEWAY")},
        "MISSKEY_GATEWAY_REDIS_PREFIX": redis_prefix,
    }
    process = await asyncio.create_subprocess_exec(
        CLI,
        *args,
        "--store",
        store_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    return process.returncode, stdout.decode(), stderr.decode()


async def test_client_cli_create_and_revoke(gateway, store_url, redis_prefix):
    code, stdout, stderr = await run_cli(
        store_url, redis_prefix, "client", "create", "alice", "--scope", "read:account"
    )
    assert code == 0, stderr
    values = dict(line.split("=", 1) for line in stdout.splitlines())
    client_id, secret = values["client_id"], values["client_secret"]
    assert "shown only now" in stderr

    granted = await post_token(
        gateway, {"grant_type": "client_credentials"}, basic(client_id, secret)
    )
    assert granted.status == 200
    assert (await granted.json())["scope"] == "read:account"

    code, stdout, stderr = await run_cli(
        store_url, redis_prefix, "client", "revoke", client_id
    )
    assert code == 0, stderr
    assert client_id in stdout
    rejected = await post_token(
        gateway, {"grant_type": "client_credentials"}, basic(client_id, secret)
    )
    assert rejected.status == 401

    code, _, stderr = await run_cli(
        store_url, redis_prefix, "client", "revoke", client_id
    )
    assert code == 1
    assert "no OAuth client" in stderr
