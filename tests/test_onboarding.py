"""MiAuth onboarding: invite, start, approval on Misskey, callback, credential."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
from aiohttp import web

from gateway.config import ConfigError, load_settings
from gateway.grants import MiAuthSession, new_invite
from tests.conftest import JWT_SECRET

CLIENTS = Path(__file__).parent / "clients"
CLI = str(Path(sys.executable).with_name("misskey-gateway"))


async def started(start_gateway, **overrides):
    return await start_gateway(onboarding__enabled=True, **overrides)


async def make_invite(gateway, principal: str = "carol", ttl: float = 600) -> str:
    invite, digest = new_invite()
    await gateway.store.put_invite(principal, digest, time.time() + ttl)
    return invite


async def start_flow(
    gateway, principal="carol", permission="read:account", headers=None, **extra
):
    invite = extra.pop("invite", None) or await make_invite(gateway, principal)
    params = {"principal": principal, "permission": permission, "invite": invite}
    params.update(extra)
    return await gateway.client.get(
        "/_gateway/miauth/start",
        params=params,
        headers=headers,
        allow_redirects=False,
    )


async def approve(gateway, location: str) -> str:
    """Play the browser on the fake Misskey: open the page, approve; return session."""
    parts = urlsplit(location)
    session = parts.path.rsplit("/", 1)[1]
    async with gateway.client.session.get(location) as response:
        assert response.status == 200
    approve_url = f"{parts.scheme}://{parts.netloc}/miauth/{session}/approve"
    async with gateway.client.session.post(approve_url, allow_redirects=False) as r:
        assert r.status == 302
    assert gateway.fake.miauth[session].token is not None
    return session


async def run_node(*command: str) -> tuple[int, str, str]:
    # A session of its own, so that Chromium dies with Node.js on a timeout.
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=90)
    except TimeoutError:
        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        raise
    return process.returncode or 0, stdout.decode(), stderr.decode()


@pytest.mark.browser
async def test_browser_walks_through_onboarding(start_gateway, log_output, tmp_path):
    node = shutil.which("node")
    assert node is not None, "Node.js is missing; scripts/test installs it"
    assert shutil.which("chromium"), "chromium is missing; scripts/test installs it"
    modules = CLIENTS / "js" / "node_modules" / "playwright-core"
    assert modules.is_dir(), "playwright-core is missing; scripts/test installs it"  # noqa: ASYNC240
    gateway = await started(start_gateway)
    invite = await make_invite(gateway, "carol")
    form_url = f"{gateway.url}/_gateway/miauth/?principal=carol&invite={invite}"

    code, stdout, stderr = await run_node(
        node,
        str(CLIENTS / "js" / "miauth.mjs"),
        form_url,
        "write:notes",
        str(tmp_path / "chromium-profile"),
    )

    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["blocked"] == []
    assert result["scope"] == "read:account write:notes"
    session = urlsplit(result["approvalUrl"]).path.rsplit("/", 1)[1]
    grant = gateway.fake.miauth[session]
    misskey_token = grant.token
    assert misskey_token is not None
    assert grant.name == "misskey-gateway"
    assert grant.permissions == ("read:account", "write:notes")
    assert grant.callback == f"{gateway.url}/_gateway/miauth/callback"
    assert grant.checked

    credential = result["credential"]
    claims = jwt.decode(credential, JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "carol"
    assert claims["scope"] == "read:account write:notes"

    response = await gateway.client.post(
        "/api/i", json={}, headers={"Authorization": f"Bearer {credential}"}
    )
    assert response.status == 200
    assert (await response.json())["username"] == "carol"
    assert gateway.fake.requests_to("i")[-1].token == misskey_token

    for name, page in result["pages"].items():
        assert misskey_token not in page, name
    for url in result["urls"]:
        assert misskey_token not in url
    assert misskey_token not in log_output.getvalue()
    events = [json.loads(line)["event"] for line in log_output.getvalue().splitlines()]
    assert "onboarding.completed" in events


async def test_start_redirects_to_misskey(start_gateway):
    gateway = await started(start_gateway)

    response = await start_flow(gateway, permission="read:account,write:notes")

    assert response.status == 302
    assert response.headers["Referrer-Policy"] == "no-referrer"
    location = urlsplit(response.headers["Location"])
    assert f"{location.scheme}://{location.netloc}" == gateway.settings.upstream.url
    session = location.path.removeprefix("/miauth/")
    assert uuid.UUID(session).version == 4
    query = parse_qs(location.query)
    assert query["name"] == ["misskey-gateway"]
    assert query["permission"] == ["read:account,write:notes"]
    assert query["callback"] == [f"{gateway.url}/_gateway/miauth/callback"]


async def test_start_uses_public_url(start_gateway):
    gateway = await started(
        start_gateway,
        onboarding__public_url="https://gateway.example",
        onboarding__misskey_url="https://misskey.example",
        onboarding__app_name="Example bots",
    )

    response = await start_flow(gateway, headers={"Host": "evil.example"})

    location = urlsplit(response.headers["Location"])
    assert location.netloc == "misskey.example"
    query = parse_qs(location.query)
    assert query["callback"] == ["https://gateway.example/_gateway/miauth/callback"]
    assert query["name"] == ["Example bots"]


async def test_start_disabled_by_default(start_gateway):
    gateway = await start_gateway()
    invite = await make_invite(gateway)

    response = await start_flow(gateway, invite=invite)
    form = await gateway.client.get("/_gateway/miauth/")

    assert response.status == 404
    assert "onboarding.enabled" in await response.text()
    assert form.status == 404


async def test_start_requires_invite(start_gateway):
    gateway = await started(start_gateway)

    response = await gateway.client.get(
        "/_gateway/miauth/start",
        params={"principal": "carol", "permission": "read:account"},
        allow_redirects=False,
    )

    assert response.status == 403
    assert "Invite required" in await response.text()


async def test_invite_bound_to_principal(start_gateway):
    gateway = await started(start_gateway)
    invite = await make_invite(gateway, "carol")

    other = await start_flow(gateway, principal="mallory", invite=invite)
    own = await start_flow(gateway, principal="carol", invite=invite)
    again = await start_flow(gateway, principal="carol", invite=invite)

    assert other.status == 403
    assert own.status == 302
    assert again.status == 403
    assert "already used" in await again.text()


async def test_expired_invite_rejected(start_gateway):
    gateway = await started(start_gateway)
    invite = await make_invite(gateway, "carol", ttl=-5)

    response = await start_flow(gateway, invite=invite)

    assert response.status == 403


@pytest.mark.parametrize(
    ("principal", "permission", "expected"),
    [
        ("bad name", "read:account", "Invalid principal"),
        ("-carol", "read:account", "Invalid principal"),
        ("carol", "", "No permission"),
        ("carol", "read account", "Invalid permission"),
        ("carol", "<script>", "Invalid permission"),
    ],
)
async def test_start_validates_input(start_gateway, principal, permission, expected):
    gateway = await started(start_gateway)
    invite = await make_invite(gateway, "carol")

    response = await start_flow(
        gateway, principal=principal, permission=permission, invite=invite
    )

    assert response.status == 400
    text = await response.text()
    assert expected in text
    assert "<script>" not in text
    # The invite was not spent on a rejected request.
    assert (await start_flow(gateway, invite=invite)).status == 302


async def test_callback_stores_token_once(start_gateway, log_output):
    gateway = await started(start_gateway)
    response = await start_flow(gateway, permission="read:account")
    session = await approve(gateway, response.headers["Location"])
    misskey_token = gateway.fake.miauth[session].token

    first = await gateway.client.get(
        "/_gateway/miauth/callback", params={"session": session}
    )
    second = await gateway.client.get(
        "/_gateway/miauth/callback", params={"session": session}
    )

    assert first.status == 200
    assert first.headers["Cache-Control"] == "no-store"
    page = await first.text()
    assert misskey_token not in page
    assert "@carol" in page
    assert await gateway.store.get_token("carol") == misskey_token
    assert second.status == 400
    assert "already used" in await second.text()
    assert len(gateway.fake.requests_to(f"miauth/{session}/check")) == 1
    assert misskey_token not in log_output.getvalue()


async def test_callback_hands_out_api_key(start_gateway):
    gateway = await started(start_gateway)
    response = await start_flow(
        gateway, permission="read:account", credential="api_key"
    )
    session = await approve(gateway, response.headers["Location"])

    page = await (
        await gateway.client.get(
            "/_gateway/miauth/callback", params={"session": session}
        )
    ).text()

    start = page.index("mgk_")
    key = page[start : start + 47]
    api = await gateway.client.post("/api/i", json={"i": key})
    assert api.status == 200
    assert (await api.json())["username"] == "carol"


@pytest.mark.parametrize(
    "session", ["", "not-a-uuid", str(uuid.uuid4()), "../../api/i"]
)
async def test_callback_rejects_unknown_session(start_gateway, session):
    gateway = await started(start_gateway)

    response = await gateway.client.get(
        "/_gateway/miauth/callback", params={"session": session}
    )

    assert response.status == 400
    assert "Unknown or expired session" in await response.text()
    assert await gateway.store.get_token("carol") is None
    assert gateway.fake.received == []


async def test_callback_rejects_expired_session(start_gateway):
    gateway = await started(start_gateway)
    session_id = str(uuid.uuid4())
    await gateway.store.put_miauth_session(
        MiAuthSession(session_id, "carol", ("read:account",), "jwt", time.time() - 5)
    )

    response = await gateway.client.get(
        "/_gateway/miauth/callback", params={"session": session_id}
    )

    assert response.status == 400
    assert gateway.fake.received == []


async def test_callback_not_approved(start_gateway):
    gateway = await started(start_gateway)
    response = await start_flow(gateway)
    session = urlsplit(response.headers["Location"]).path.rsplit("/", 1)[1]

    callback = await gateway.client.get(
        "/_gateway/miauth/callback", params={"session": session}
    )

    assert callback.status == 400
    assert "not approved" in await callback.text()
    assert await gateway.store.get_token("carol") is None


async def test_callback_check_fails(start_gateway):
    gateway = await started(start_gateway)
    response = await start_flow(gateway)
    session = await approve(gateway, response.headers["Location"])
    gateway.fake.handlers[f"miauth/{session}/check"] = _broken_check

    callback = await gateway.client.get(
        "/_gateway/miauth/callback", params={"session": session}
    )

    assert callback.status == 502
    assert await gateway.store.get_token("carol") is None


async def _broken_check(request, received):
    return web.Response(status=500, text="Internal Server Error")


async def test_invite_create_cli(start_gateway, store_url, redis_prefix):
    gateway = await started(start_gateway)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MISSKEY_GATEWAY")},
        "MISSKEY_GATEWAY_REDIS_PREFIX": redis_prefix,
        "MISSKEY_GATEWAY_ONBOARDING_ENABLED": "true",
    }
    process = await asyncio.create_subprocess_exec(
        CLI, "invite", "create", "carol", "--store", store_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)

    assert process.returncode == 0, stderr.decode()
    invite = stdout.decode().strip()
    assert invite.startswith("mgi_")
    assert "shown only now" in stderr.decode()
    response = await start_flow(gateway, invite=invite)
    assert response.status == 302


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("onboarding.public_url", "https://gateway.example/path", "origin"),
        ("onboarding.public_url", "ftp://gateway.example", "http://"),
        ("onboarding.misskey_url", "misskey.example", "http://"),
        ("onboarding.credential_ttl", 0, "at least 1 second"),
        ("onboarding.oauth_token_ttl", -1, "at least 1 second"),
        ("onboarding.app_name", " ", "must not be empty"),
    ],
)
def test_onboarding_settings_validated(key, value, message):
    with pytest.raises(ConfigError) as raised:
        load_settings(None, environ={}, overrides={key: value})

    assert raised.value.key == key
    assert message in str(raised.value)
