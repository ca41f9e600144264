"""The /streaming WebSocket relay, over real sockets to the fake Misskey."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType

from gateway.apikeys import new_api_key
from tests.conftest import JWT_SECRET, free_port
from tests.fake_streaming import StreamRecord

STORED = "misskey-token-alice"
CLIENTS = Path(__file__).parent / "clients"
# The headers of a WebSocket handshake, for plain HTTP requests that must be
# rejected before the upgrade.
HANDSHAKE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}
CONNECT_MAIN = {"type": "connect", "body": {"channel": "main", "id": "1"}}


async def accepted_stream(fake, index: int = 0) -> StreamRecord:
    """Wait until the fake Misskey has accepted its ``index``-th stream."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        accepted = [record for record in fake.streams if record.accepted]
        if len(accepted) > index:
            return accepted[index]
        await asyncio.sleep(0.01)
    raise AssertionError(f"the fake Misskey accepted {len(fake.streams)} streams")


async def receive_json(ws) -> Any:
    message = await ws.receive(timeout=5)
    assert message.type is WSMsgType.TEXT, message
    return json.loads(message.data)


async def receive_close(ws) -> aiohttp.WSMessage:
    message = await ws.receive(timeout=5)
    assert message.type is WSMsgType.CLOSE, message
    return message


def jwt_id(credential: str) -> str:
    return jwt.decode(credential, JWT_SECRET, algorithms=["HS256"])["jti"]


async def test_bearer_header_relays_frames(gateway):
    credential = gateway.jwt()
    ws = await gateway.client.ws_connect(
        "/streaming", headers={"Authorization": f"Bearer {credential}"}
    )
    await ws.send_json(CONNECT_MAIN)
    echo = await receive_json(ws)
    channel = await receive_json(ws)
    record = await accepted_stream(gateway.fake)
    await ws.close()

    assert echo == {"type": "echo", "body": {"received": CONNECT_MAIN, "user": "alice"}}
    assert channel["body"]["type"] == "connected"
    assert record.token == STORED
    assert record.headers["Authorization"] == f"Bearer {STORED}"
    assert credential not in str(list(record.headers.items()))
    assert record.query_string == ""


async def test_query_credential_stays_out_of_upstream_url(gateway):
    credential = gateway.jwt()
    ws = await gateway.client.ws_connect(f"/streaming?i={credential}&_t=1700000000")
    await ws.send_str("hello")
    echo = await receive_json(ws)
    record = await accepted_stream(gateway.fake)
    await ws.close()

    assert echo["body"] == {"received": "hello", "user": "alice"}
    assert record.query_string == "_t=1700000000"
    assert record.headers["Authorization"] == f"Bearer {STORED}"


async def test_subprotocol_credential_not_echoed(gateway):
    credential = gateway.jwt()
    ws = await gateway.client.ws_connect(
        "/streaming",
        protocols=("misskey-gateway", f"misskey-gateway.bearer.{credential}"),
    )
    selected = ws._response.headers.get("Sec-WebSocket-Protocol")
    await ws.send_str("hello")
    echo = await receive_json(ws)
    record = await accepted_stream(gateway.fake)
    await ws.close()

    assert ws.protocol == "misskey-gateway"
    assert selected == "misskey-gateway"
    assert echo["body"]["user"] == "alice"
    assert "Sec-WebSocket-Protocol" not in record.headers
    assert record.token == STORED


async def test_api_key_credential(gateway):
    key, api_key_record = new_api_key("alice", "read:account")
    await gateway.store.put_api_key(api_key_record)
    ws = await gateway.client.ws_connect(
        "/streaming", headers={"Authorization": f"Bearer {key}"}
    )
    await ws.send_str("hello")
    echo = await receive_json(ws)
    await ws.close()

    assert echo["body"]["user"] == "alice"


async def test_anonymous_stream_has_no_token(gateway):
    ws = await gateway.client.ws_connect("/streaming")
    await ws.send_str("hello")
    echo = await receive_json(ws)
    record = await accepted_stream(gateway.fake)
    await ws.close()

    assert echo["body"]["user"] is None
    assert record.token is None
    assert "Authorization" not in record.headers


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({"Authorization": "Bearer not-a-jwt"}, 401, "AUTHENTICATION_FAILED"),
        ({"Authorization": "Bearer mgk_" + "A" * 43}, 401, "AUTHENTICATION_FAILED"),
        ({"Authorization": "Basic YWxpY2U6cHc="}, 401, "AUTHENTICATION_FAILED"),
        (
            {"Sec-WebSocket-Protocol": "misskey-gateway.bearer.x.y.z"},
            400,
            "INVALID_PARAM",
        ),
    ],
)
async def test_bad_credential_rejected_before_upgrade(gateway, headers, status, code):
    response = await gateway.client.get("/streaming", headers={**HANDSHAKE, **headers})
    body = await response.json()

    assert response.status == status
    assert body["error"]["code"] == code
    assert "Sec-WebSocket-Accept" not in response.headers
    assert gateway.fake.streams == []


async def test_bad_credential_fails_ws_connect(gateway):
    with pytest.raises(aiohttp.WSServerHandshakeError) as raised:
        await gateway.client.ws_connect("/streaming?i=not-a-jwt")

    assert raised.value.status == 401
    assert gateway.fake.streams == []


async def test_revoked_jwt_rejected_before_upgrade(gateway):
    credential = gateway.jwt()
    await gateway.store.revoke_jwt_id(jwt_id(credential), time.time() + 60)
    response = await gateway.client.get(
        "/streaming", headers={**HANDSHAKE, "Authorization": f"Bearer {credential}"}
    )
    body = await response.json()

    assert response.status == 401
    assert "revoked" in body["error"]["message"]
    assert gateway.fake.streams == []


async def test_scope_without_read_account_denied(gateway):
    credential = gateway.jwt(scope="write:notes")
    response = await gateway.client.get(
        "/streaming", headers={**HANDSHAKE, "Authorization": f"Bearer {credential}"}
    )
    body = await response.json()

    assert response.status == 403
    assert body["error"]["code"] == "PERMISSION_DENIED"
    assert body["error"]["info"] == {"kind": "read:account"}
    assert gateway.fake.streams == []


async def test_conflicting_credentials_rejected(gateway):
    headers = {**HANDSHAKE, "Authorization": f"Bearer {gateway.jwt()}"}
    response = await gateway.client.get(
        f"/streaming?i={gateway.jwt()}", headers=headers
    )

    assert response.status == 400
    assert gateway.fake.streams == []


async def test_principal_without_token_rejected(gateway):
    credential = gateway.jwt(principal="bob")
    response = await gateway.client.get(
        "/streaming", headers={**HANDSHAKE, "Authorization": f"Bearer {credential}"}
    )
    body = await response.json()

    assert response.status == 401
    assert body["error"]["code"] == "CREDENTIAL_REQUIRED"
    assert gateway.fake.streams == []


async def test_plain_get_gets_upgrade_required(gateway):
    response = await gateway.client.get(
        "/streaming", headers={"Authorization": f"Bearer {gateway.jwt()}"}
    )
    body = await response.json()

    assert response.status == 426
    assert body["error"]["code"] == "UPGRADE_REQUIRED"
    assert response.headers["Upgrade"] == "websocket"
    assert gateway.fake.streams == []


async def test_post_not_allowed(gateway):
    response = await gateway.client.post("/streaming")

    assert response.status == 405
    assert response.headers["Allow"] == "GET"


async def test_upstream_refusing_token_rejected(gateway):
    gateway.fake.remove_token(STORED)
    response = await gateway.client.get(
        "/streaming", headers={**HANDSHAKE, "Authorization": f"Bearer {gateway.jwt()}"}
    )
    body = await response.json()

    assert response.status == 401
    assert body["error"]["code"] == "AUTHENTICATION_FAILED"
    assert len(gateway.fake.streams) == 1
    assert not gateway.fake.streams[0].accepted


async def test_upstream_down_gets_bad_gateway(start_gateway):
    started = await start_gateway(upstream_url=f"http://127.0.0.1:{free_port()}")
    response = await started.client.get("/streaming", headers=HANDSHAKE)
    body = await response.json()

    assert response.status == 502
    assert body["error"]["code"] == "UPSTREAM_UNAVAILABLE"


@pytest.mark.parametrize("store_backend", ["redis"], indirect=True)
async def test_store_down_gets_service_unavailable(start_gateway):
    started = await start_gateway(store__url=f"redis://127.0.0.1:{free_port()}/0")
    response = await started.client.get(
        "/streaming", headers={**HANDSHAKE, "Authorization": f"Bearer {started.jwt()}"}
    )
    body = await response.json()

    assert response.status == 503
    assert body["error"]["code"] == "TOKEN_STORE_UNAVAILABLE"
    assert started.fake.streams == []


async def test_binary_frames_both_ways(gateway):
    ws = await gateway.client.ws_connect(
        "/streaming", headers=gateway.bearer(scope="read:account")
    )
    await ws.send_bytes(b"\x00\x01binary")
    message = await ws.receive(timeout=5)
    record = await accepted_stream(gateway.fake)
    await ws.close()

    assert message.type is WSMsgType.BINARY
    assert message.data == b"echo:\x00\x01binary"
    assert record.frames == [b"\x00\x01binary"]


async def test_ping_answered(gateway):
    ws = await gateway.client.ws_connect(
        "/streaming", headers=gateway.bearer(), autoping=False
    )
    await ws.ping(b"are you there")
    message = await ws.receive(timeout=5)
    await ws.close()

    assert message.type is WSMsgType.PONG
    assert message.data == b"are you there"


async def test_client_close_code_reaches_upstream(gateway):
    ws = await gateway.client.ws_connect("/streaming", headers=gateway.bearer())
    record = await accepted_stream(gateway.fake)
    await ws.close(code=4000, message=b"client done")
    await asyncio.wait_for(record.closed.wait(), 5)

    assert ws.close_code == 4000
    assert record.close_code == 4000
    assert record.close_message == "client done"


async def test_upstream_close_code_reaches_client(gateway):
    ws = await gateway.client.ws_connect(
        "/streaming", headers=gateway.bearer(), autoclose=False
    )
    await ws.send_json({"type": "close-me", "body": {"code": 4321, "reason": "bye"}})
    message = await receive_close(ws)
    await ws.close()

    assert message.data == 4321
    assert message.extra == "bye"


async def test_lifetime_cap_closes_session(start_gateway):
    started = await start_gateway(streaming__max_lifetime=0.5)
    started.fake.add_token(STORED, "alice")
    await started.store_token("alice", STORED)
    ws = await started.client.ws_connect(
        "/streaming", headers=started.bearer(), autoclose=False
    )
    opened = time.monotonic()
    record = await accepted_stream(started.fake)
    message = await receive_close(ws)
    elapsed = time.monotonic() - opened
    await ws.close()
    await asyncio.wait_for(record.closed.wait(), 5)

    assert message.data == 4002
    assert 0.4 < elapsed < 3
    assert record.close_code == 4002


async def start_watched_gateway(start_gateway, store_backend: str):
    """A gateway whose sessions are closed by notifications (Redis) or polling."""
    # With Redis the periodic check is too slow to matter, so a quick close
    # shows that the rotation message did it.
    interval = 60.0 if store_backend == "redis" else 0.2
    started = await start_gateway(streaming__check_interval=interval)
    started.fake.add_token(STORED, "alice")
    await started.store_token("alice", STORED)
    if store_backend == "redis":
        await asyncio.wait_for(started.store.wait_subscribed(), 5)
    return started


async def test_rotation_closes_session(start_gateway, store_backend):
    started = await start_watched_gateway(start_gateway, store_backend)
    ws = await started.client.ws_connect(
        "/streaming", headers=started.bearer(), autoclose=False
    )
    record = await accepted_stream(started.fake)
    await started.store_token("alice", "misskey-token-alice-2")
    message = await receive_close(ws)
    await ws.close()
    await asyncio.wait_for(record.closed.wait(), 5)

    assert message.data == 4001
    assert record.close_code == 4001


async def test_rotation_of_other_principal_ignored(start_gateway, store_backend):
    started = await start_watched_gateway(start_gateway, store_backend)
    ws = await started.client.ws_connect("/streaming", headers=started.bearer())
    await started.store_token("bob", "misskey-token-bob")
    await asyncio.sleep(0.5)
    await ws.send_str("still there")
    echo = await receive_json(ws)
    await ws.close()

    assert echo["body"]["received"] == "still there"


async def test_revocation_closes_session(start_gateway, store_backend):
    started = await start_watched_gateway(start_gateway, store_backend)
    credential = started.jwt()
    ws = await started.client.ws_connect(
        "/streaming", headers={"Authorization": f"Bearer {credential}"}, autoclose=False
    )
    await accepted_stream(started.fake)
    await started.store.revoke_jwt_id(jwt_id(credential), time.time() + 60)
    message = await receive_close(ws)
    await ws.close()

    assert message.data == 4401
    assert "revoked" in message.extra


async def test_api_key_revocation_closes_session(start_gateway):
    started = await start_gateway(streaming__check_interval=0.2)
    started.fake.add_token(STORED, "alice")
    await started.store_token("alice", STORED)
    key, api_key_record = new_api_key("alice", "*")
    await started.store.put_api_key(api_key_record)
    ws = await started.client.ws_connect(
        "/streaming", headers={"Authorization": f"Bearer {key}"}, autoclose=False
    )
    await accepted_stream(started.fake)
    await started.store.delete_api_keys("alice")
    message = await receive_close(ws)
    await ws.close()

    assert message.data == 4401


async def test_session_logged_without_secrets(gateway, log_output):
    credential = gateway.jwt()
    ws = await gateway.client.ws_connect(f"/streaming?i={credential}")
    await ws.send_str("one")
    await receive_json(ws)
    await ws.send_str("two")
    await receive_json(ws)
    await ws.close(code=4000)
    deadline = time.monotonic() + 5
    events: list[dict[str, Any]] = []
    while not events and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        events = [
            json.loads(line)
            for line in log_output.getvalue().splitlines()
            if '"streaming.session"' in line
        ]
    text = log_output.getvalue()

    assert len(events) == 1
    event = events[0]
    assert event["principal"] == "alice"
    assert event["status"] == 101
    assert event["credential_source"] == "query"
    assert event["frames_from_client"] == 2
    assert event["frames_from_upstream"] == 2
    assert event["client_close_code"] == 4000
    assert event["upstream_close_code"] == 4000
    assert event["closed_by"] == "client"
    assert credential not in text
    assert STORED not in text


def node_command() -> list[str]:
    node = shutil.which("node")
    assert node is not None, "Node.js is missing; scripts/test installs it"
    modules = CLIENTS / "js" / "node_modules" / "misskey-js"
    assert modules.is_dir(), (
        "misskey-js is missing; scripts/test runs npm ci in tests/clients/js"
    )
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, check=True
    ).stdout
    major = int(version.lstrip("v").split(".")[0])
    # Node.js 22 and later have a global WebSocket without the flag.
    return [node, "--experimental-websocket"] if major < 22 else [node]


async def test_misskey_js_stream_through_gateway(gateway):
    process = await asyncio.create_subprocess_exec(
        *node_command(),
        str(CLIENTS / "js" / "stream.mjs"),
        gateway.url,
        gateway.jwt(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert process.returncode == 0, stderr.decode()
    assert json.loads(stdout) == {"channel": "main", "user": "alice"}
    record = await accepted_stream(gateway.fake)
    assert record.token == STORED
    assert "i=" not in record.query_string


async def test_client_vanishing_closes_upstream(gateway, log_output):
    ws = await gateway.client.ws_connect("/streaming", headers=gateway.bearer())
    record = await accepted_stream(gateway.fake)
    await ws.send_str("one")
    await receive_json(ws)
    # Drop the TCP connection without a WebSocket close frame.
    ws._response.connection.transport.abort()
    await asyncio.wait_for(record.closed.wait(), 5)
    deadline = time.monotonic() + 5
    events: list[dict[str, Any]] = []
    while not events and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        events = [
            json.loads(line)
            for line in log_output.getvalue().splitlines()
            if '"streaming.session"' in line
        ]
    await asyncio.sleep(0.2)
    events = [
        json.loads(line)
        for line in log_output.getvalue().splitlines()
        if '"streaming.session"' in line
    ]

    # The gateway ends the upstream socket itself, with 1001 (going away).
    assert record.close_code == 1001
    assert len(events) == 1
    assert events[0]["closed_by"] == "gateway"
