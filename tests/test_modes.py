"""Every policy mode against every kind of client credential."""

from __future__ import annotations

import json

import pytest

from gateway.credentials import issue_jwt
from tests.conftest import JWT_SECRET, Gateway

ENDPOINT = "notes/show"
STORED = "misskey-token-alice"

# (credential state) -> how the test sends it
CREDENTIAL_STATES = ["none", "bad", "good", "good_without_token", "scope_missing"]

# (mode, credential state) -> (status, error code or None, forwarded?, token sent?)
EXPECTED = {
    ("required", "none"): (401, "CREDENTIAL_REQUIRED", False, None),
    ("required", "bad"): (401, "AUTHENTICATION_FAILED", False, None),
    ("required", "good"): (200, None, True, STORED),
    ("required", "good_without_token"): (401, "CREDENTIAL_REQUIRED", False, None),
    ("required", "scope_missing"): (403, "PERMISSION_DENIED", False, None),
    ("optional", "none"): (200, None, True, None),
    ("optional", "bad"): (401, "AUTHENTICATION_FAILED", False, None),
    ("optional", "good"): (200, None, True, STORED),
    ("optional", "good_without_token"): (200, None, True, None),
    ("optional", "scope_missing"): (403, "PERMISSION_DENIED", False, None),
    ("none", "none"): (200, None, True, None),
    ("none", "bad"): (401, "AUTHENTICATION_FAILED", False, None),
    ("none", "good"): (200, None, True, None),
    ("none", "good_without_token"): (200, None, True, None),
    ("none", "scope_missing"): (200, None, True, None),
    ("deny", "none"): (403, "ACCESS_DENIED", False, None),
    ("deny", "bad"): (403, "ACCESS_DENIED", False, None),
    ("deny", "good"): (403, "ACCESS_DENIED", False, None),
    ("deny", "good_without_token"): (403, "ACCESS_DENIED", False, None),
    ("deny", "scope_missing"): (403, "ACCESS_DENIED", False, None),
}


def credential_for(gateway: Gateway, state: str) -> str | None:
    if state == "none":
        return None
    if state == "bad":
        return gateway.jwt("alice")[:-4] + "AAAA"
    if state == "good":
        return gateway.jwt("alice", scope="read:account")
    if state == "good_without_token":
        return gateway.jwt("carol", scope="read:account")
    if state == "scope_missing":
        return gateway.jwt("alice", scope="write:notes")
    raise AssertionError(state)


@pytest.mark.parametrize("source", ["header", "body"])
@pytest.mark.parametrize(("mode", "state"), sorted(EXPECTED))
async def test_mode_and_credential(start_gateway, mode, state, source):
    gateway = await start_gateway(
        **{"policy.endpoints": {ENDPOINT: {"mode": mode, "kind": "read:account"}}}
    )
    gateway.fake.add_token(STORED, "alice")
    await gateway.store_token("alice", STORED)
    credential = credential_for(gateway, state)
    status, code, forwarded, token = EXPECTED[(mode, state)]

    body = {"noteId": "note-1"}
    headers = {}
    if credential is not None and source == "header":
        headers["Authorization"] = f"Bearer {credential}"
    elif credential is not None:
        body["i"] = credential
    response = await gateway.client.post(f"/api/{ENDPOINT}", json=body, headers=headers)

    assert response.status == status
    received = gateway.fake.requests_to(ENDPOINT)
    assert len(received) == (1 if forwarded else 0)
    if code is not None:
        assert (await response.json())["error"]["code"] == code
    if forwarded:
        sent = received[0]
        assert sent.token == token
        assert "Authorization" not in sent.headers
        expected_body = (
            {"noteId": "note-1"} if token is None else {"i": token, "noteId": "note-1"}
        )
        assert sent.json == expected_body


async def test_credential_required_carries_www_authenticate(gateway):
    response = await gateway.client.post("/api/i", json={})

    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="Misskey"'


async def test_authentication_failed_carries_invalid_token(gateway):
    response = await gateway.client.post(
        "/api/i", json={}, headers={"Authorization": "Bearer not-a-jwt"}
    )

    assert response.status == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


async def test_error_envelope_shape(gateway):
    response = await gateway.client.post("/api/i", json={})
    error = (await response.json())["error"]

    assert error["code"] == "CREDENTIAL_REQUIRED"
    assert error["id"] == "1384574d-a912-4b81-8601-c7b1c4085df1"
    assert error["kind"] == "client"
    assert isinstance(error["message"], str)
    assert response.content_type == "application/json"


async def test_permission_denied_names_kind(gateway):
    response = await gateway.client.post(
        "/api/notes/create",
        json={"text": "x"},
        headers=gateway.bearer(scope="read:account"),
    )
    error = (await response.json())["error"]

    assert response.status == 403
    assert error["id"] == "1370e5b7-d4eb-4566-bb1d-7748ee6a1838"
    assert error["info"] == {"kind": "write:notes"}


async def test_wildcard_scope_allows_every_kind(gateway):
    response = await gateway.client.post(
        "/api/notes/create", json={"text": "x"}, headers=gateway.bearer(scope="*")
    )

    assert response.status == 200


async def test_default_table_denies_secure_endpoint(gateway):
    response = await gateway.client.post(
        "/api/i/regenerate-token", json={}, headers=gateway.bearer()
    )

    assert response.status == 403
    assert (await response.json())["error"]["code"] == "ACCESS_DENIED"
    assert gateway.fake.received == []


async def test_default_table_strips_token_on_auth_flow(gateway):
    response = await gateway.client.post(
        "/api/miauth/0f8a7c2e-session/check", json={}, headers=gateway.bearer()
    )

    assert response.status == 200
    sent = gateway.fake.requests_to("miauth/0f8a7c2e-session/check")[0]
    assert sent.token is None
    assert sent.body == b"{}"


async def test_unknown_endpoint_is_required(gateway):
    anonymous = await gateway.client.post("/api/some/new-endpoint", json={})
    authenticated = await gateway.client.post(
        "/api/some/new-endpoint", json={}, headers=gateway.bearer()
    )

    assert anonymous.status == 401
    assert authenticated.status == 404  # the fake Misskey does not know it
    assert gateway.fake.requests_to("some/new-endpoint")[0].json == {"i": STORED}


async def test_token_rotation_used_next_request(gateway):
    gateway.fake.add_token("misskey-token-rotated", "alice")
    first = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())
    await gateway.store_token("alice", "misskey-token-rotated")
    second = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())

    assert first.status == 200
    assert second.status == 200
    tokens = [r.token for r in gateway.fake.requests_to("i")]
    assert tokens == [STORED, "misskey-token-rotated"]


async def test_token_deleted_is_credential_required(gateway):
    await gateway.delete_token("alice")
    response = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())

    assert response.status == 401
    assert (await response.json())["error"]["code"] == "CREDENTIAL_REQUIRED"
    assert gateway.fake.received == []


async def test_upstream_rejection_relayed(gateway):
    # The stored token is no longer valid on the Misskey side.
    gateway.fake.remove_token(STORED)
    response = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())

    assert response.status == 401
    assert (await response.json())["error"]["code"] == "AUTHENTICATION_FAILED"
    assert len(gateway.fake.requests_to("i")) == 1


async def test_get_on_allow_get_endpoint_is_anonymous(gateway):
    jwt = gateway.jwt()
    response = await gateway.client.get(f"/api/emojis?i={jwt}&detail=true")

    assert response.status == 200
    sent = gateway.fake.requests_to("emojis")[0]
    assert sent.method == "GET"
    assert sent.query_string == "detail=true"
    assert sent.token is None


async def test_get_with_bad_query_credential_rejected(gateway):
    response = await gateway.client.get("/api/emojis?i=not-a-credential")

    assert response.status == 401
    assert gateway.fake.received == []


async def test_get_without_allow_get_is_405(gateway):
    response = await gateway.client.get("/api/notes/create", headers=gateway.bearer())

    assert response.status == 405
    assert response.headers["Allow"] == "POST"
    assert gateway.fake.received == []


async def test_get_on_required_endpoint_is_405(start_gateway):
    gateway = await start_gateway(**{"policy.endpoints": {"emojis": "required"}})
    response = await gateway.client.get("/api/emojis", headers=gateway.bearer())

    assert response.status == 405
    assert "POST" in (await response.json())["error"]["message"]
    assert gateway.fake.received == []


async def test_other_methods_are_405(gateway):
    for method in ("PUT", "DELETE", "PATCH"):
        response = await gateway.client.request(method, "/api/notes/create", json={})
        assert response.status == 405, method
    assert gateway.fake.received == []


async def test_body_credential_is_sdk_drop_in(gateway):
    response = await gateway.client.post("/api/i", json={"i": gateway.jwt()})

    assert response.status == 200
    assert gateway.fake.requests_to("i")[0].json == {"i": STORED}


async def test_body_real_misskey_token_rejected(gateway):
    response = await gateway.client.post("/api/i", json={"i": STORED})

    assert response.status == 401
    assert (await response.json())["error"]["code"] == "AUTHENTICATION_FAILED"
    assert gateway.fake.received == []


async def test_null_credential_field_is_anonymous(gateway):
    response = await gateway.client.post("/api/meta", json={"i": None, "detail": False})

    assert response.status == 200
    assert gateway.fake.requests_to("meta")[0].body == b'{"detail": false}'


@pytest.mark.parametrize("value", [1, 1.5, True, [], {}, ["x"], {"a": "b"}])
async def test_non_string_credential_field_rejected(gateway, value):
    response = await gateway.client.post("/api/meta", data=json.dumps({"i": value}))

    assert response.status == 400
    assert (await response.json())["error"]["code"] == "INVALID_PARAM"
    assert gateway.fake.received == []


async def test_header_and_body_credentials_agree(gateway):
    jwt = gateway.jwt()
    response = await gateway.client.post(
        "/api/i", json={"i": jwt}, headers={"Authorization": f"Bearer {jwt}"}
    )

    assert response.status == 200


async def test_header_and_body_credentials_differ(gateway):
    response = await gateway.client.post(
        "/api/i", json={"i": gateway.jwt("bob")}, headers=gateway.bearer("alice")
    )

    assert response.status == 400
    assert gateway.fake.received == []


async def test_bearer_scheme_case_insensitive(gateway):
    response = await gateway.client.post(
        "/api/i", json={}, headers={"Authorization": f"bearer {gateway.jwt()}"}
    )

    assert response.status == 200


async def test_other_authorization_scheme_rejected(gateway):
    response = await gateway.client.post(
        "/api/i", json={}, headers={"Authorization": "Basic YWxpY2U6c2VjcmV0"}
    )

    assert response.status == 401
    assert (await response.json())["error"]["code"] == "AUTHENTICATION_FAILED"
    assert gateway.fake.received == []


async def test_expired_jwt_rejected(gateway):
    expired = issue_jwt(
        gateway.settings.jwt, JWT_SECRET, "alice", "*", 1, now=1_000_000
    )
    response = await gateway.client.post(
        "/api/i", json={}, headers={"Authorization": f"Bearer {expired}"}
    )

    assert response.status == 401
    assert "expired" in (await response.json())["error"]["message"]
    assert gateway.fake.received == []


async def test_other_401_relayed_without_retry(gateway):
    from aiohttp import web

    async def unauthorized(request, received):
        return web.json_response({"error": {"code": "SOMETHING_ELSE"}}, status=401)

    gateway.fake.handlers["fake/unauthorized"] = unauthorized
    response = await gateway.client.post(
        "/api/fake/unauthorized", json={}, headers=gateway.bearer()
    )

    assert response.status == 401
    assert (await response.json())["error"]["code"] == "SOMETHING_ELSE"
    assert len(gateway.fake.requests_to("fake/unauthorized")) == 1
