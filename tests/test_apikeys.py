"""Opaque API keys: created once, stored as SHA-256, revoked at once."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from gateway.apikeys import API_KEY_PATTERN, digest_key, new_api_key

STORED = "misskey-token-alice"


async def create_key(gateway, principal: str = "alice", scope: str = "*") -> str:
    key, record = new_api_key(principal, scope)
    await gateway.store.put_api_key(record)
    return key


def test_new_key_shape():
    key, record = new_api_key("alice", "write:notes read:account write:notes")

    assert API_KEY_PATTERN.fullmatch(key)
    assert record.digest == digest_key(key)
    assert record.key_id == record.digest[:12]
    assert record.scope == "read:account write:notes"
    assert key not in repr(record)


async def test_key_as_bearer(gateway):
    key = await create_key(gateway)
    response = await gateway.client.post(
        "/api/i", json={}, headers={"Authorization": f"Bearer {key}"}
    )

    assert response.status == 200
    assert gateway.fake.requests_to("i")[0].json == {"i": STORED}


async def test_key_in_i_field(gateway):
    key = await create_key(gateway)
    response = await gateway.client.post("/api/i", json={"i": key})

    assert response.status == 200
    assert gateway.fake.requests_to("i")[0].json == {"i": STORED}


async def test_key_scope_enforced(gateway):
    key = await create_key(gateway, scope="read:account")
    response = await gateway.client.post(
        "/api/notes/create",
        json={"text": "x"},
        headers={"Authorization": f"Bearer {key}"},
    )

    assert response.status == 403
    assert (await response.json())["error"]["code"] == "PERMISSION_DENIED"
    assert gateway.fake.received == []


async def test_revoked_key_rejected_at_once(gateway):
    key = await create_key(gateway)
    headers = {"Authorization": f"Bearer {key}"}
    before = await gateway.client.post("/api/i", json={}, headers=headers)
    revoked = await gateway.store.delete_api_keys("alice")
    after = await gateway.client.post("/api/i", json={}, headers=headers)

    assert before.status == 200
    assert revoked == 1
    assert after.status == 401
    assert (await after.json())["error"]["code"] == "AUTHENTICATION_FAILED"


async def test_revoke_one_key_by_id(gateway):
    first, first_record = new_api_key("alice", "*")
    second, second_record = new_api_key("alice", "*")
    await gateway.store.put_api_key(first_record)
    await gateway.store.put_api_key(second_record)
    revoked = await gateway.store.delete_api_keys("alice", first_record.key_id)
    listed = await gateway.store.list_api_keys("alice")
    first_response = await gateway.client.post(
        "/api/i", json={}, headers={"Authorization": f"Bearer {first}"}
    )
    second_response = await gateway.client.post(
        "/api/i", json={}, headers={"Authorization": f"Bearer {second}"}
    )

    assert revoked == 1
    assert [record.key_id for record in listed] == [second_record.key_id]
    assert first_response.status == 401
    assert second_response.status == 200


@pytest.mark.parametrize(
    "credential",
    [
        "mgk_" + "A" * 43,  # well formed, never issued
        "mgk_short",
        "mgk_" + "A" * 42 + "!",
    ],
)
async def test_unknown_or_malformed_key_rejected(gateway, credential):
    response = await gateway.client.post(
        "/api/i", json={}, headers={"Authorization": f"Bearer {credential}"}
    )

    assert response.status == 401
    assert gateway.fake.received == []


async def test_key_never_logged(log_output, gateway):
    key = await create_key(gateway)
    await gateway.client.post(
        "/api/i", json={}, headers={"Authorization": f"Bearer {key}"}
    )
    await gateway.client.post("/api/i", json={"i": key[:-1] + "x"})
    events = [json.loads(line) for line in log_output.getvalue().splitlines()]

    assert key not in log_output.getvalue()
    assert digest_key(key) not in log_output.getvalue()
    assert [e.get("credential_type") for e in events if e["event"] == "request"] == [
        "api_key",
        "api_key",
    ]


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode or 0, stdout.decode(), stderr.decode()


async def test_cli_create_list_revoke(gateway):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MISSKEY_GATEWAY_")}
    env["MISSKEY_GATEWAY_STORE_URL"] = gateway.settings.store.url
    env["MISSKEY_GATEWAY_REDIS_PREFIX"] = gateway.settings.redis.prefix

    code, key, created = await run_cli(
        env, "key", "create", "alice", "--scope", "read:account"
    )
    key = key.strip()
    listing = await run_cli(env, "key", "list", "alice")
    used = await gateway.client.post(
        "/api/i", json={}, headers={"Authorization": f"Bearer {key}"}
    )
    revoke = await run_cli(env, "key", "revoke", "alice")
    again = await run_cli(env, "key", "revoke", "alice")
    after = await gateway.client.post(
        "/api/i", json={}, headers={"Authorization": f"Bearer {key}"}
    )

    assert code == 0
    assert API_KEY_PATTERN.fullmatch(key)
    assert key not in created
    assert digest_key(key)[:12] in created
    assert listing[0] == 0
    assert digest_key(key)[:12] in listing[1]
    assert "read:account" in listing[1]
    assert key not in listing[1]
    assert used.status == 200
    assert revoke[0] == 0
    assert "revoked 1 API key of alice" in revoke[1]
    assert again[0] == 1
    assert "no API key found for alice" in again[2]
    assert after.status == 401
