"""Token in the body for every Misskey, or as a Bearer header for newer ones."""

from __future__ import annotations

STORED = "misskey-token-alice"


async def started(start_gateway, transport: str, reads_bearer: bool = True):
    gateway = await start_gateway(**{"upstream.token_transport": transport})
    gateway.fake.reads_bearer = reads_bearer
    gateway.fake.add_token(STORED, "alice")
    await gateway.store_token("alice", STORED)
    return gateway


async def test_body_transport_with_old_misskey(start_gateway):
    gateway = await started(start_gateway, "body", reads_bearer=False)
    response = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())
    sent = gateway.fake.requests_to("i")[0]

    assert response.status == 200
    assert sent.json == {"i": STORED}
    assert "Authorization" not in sent.headers


async def test_header_transport(start_gateway):
    gateway = await started(start_gateway, "header")
    response = await gateway.client.post(
        "/api/notes/create", json={"i": gateway.jwt(), "text": "hi"}
    )
    sent = gateway.fake.requests_to("notes/create")[0]

    assert response.status == 200
    assert sent.headers["Authorization"] == f"Bearer {STORED}"
    assert sent.json == {"text": "hi"}
    assert sent.token == STORED


async def test_header_transport_fails_on_old_misskey(start_gateway):
    gateway = await started(start_gateway, "header", reads_bearer=False)
    response = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())

    assert response.status == 401
    assert (await response.json())["error"]["code"] == "CREDENTIAL_REQUIRED"


async def test_header_transport_anonymous_has_no_header(start_gateway):
    gateway = await started(start_gateway, "header")
    response = await gateway.client.post("/api/meta", json={})
    sent = gateway.fake.requests_to("meta")[0]

    assert response.status == 200
    assert "Authorization" not in sent.headers


async def test_header_transport_allows_required_get(start_gateway):
    gateway = await start_gateway(
        **{
            "upstream.token_transport": "header",
            "policy.endpoints": {"emojis": "required"},
        }
    )
    await gateway.store_token("alice", STORED)
    gateway.fake.add_token(STORED, "alice")
    response = await gateway.client.get("/api/emojis", headers=gateway.bearer())
    sent = gateway.fake.requests_to("emojis")[0]

    assert response.status == 200
    assert sent.headers["Authorization"] == f"Bearer {STORED}"
    assert sent.query_string == ""


async def test_header_transport_upload(start_gateway):
    gateway = await started(start_gateway, "header")
    boundary = "xyzBOUNDARY"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="a.txt"\r\n\r\nhello\r\n--{boundary}--\r\n'
    ).encode()
    response = await gateway.client.post(
        "/api/drive/files/create",
        data=body,
        headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            **gateway.bearer(),
        },
    )
    sent = gateway.fake.requests_to("drive/files/create")[0]

    assert response.status == 200
    assert sent.headers["Authorization"] == f"Bearer {STORED}"
    assert sent.upload.fields == []


async def test_header_transport_retry_replaces_header(start_gateway):
    gateway = await started(start_gateway, "header")
    gateway.fake.add_token("misskey-token-new", "alice")
    headers = gateway.bearer()
    assert (await gateway.client.post("/api/i", json={}, headers=headers)).status == 200
    store = gateway.store
    inner = getattr(store, "inner", store)
    await inner.set_token("alice", "misskey-token-new")
    gateway.fake.remove_token(STORED)
    response = await gateway.client.post("/api/i", json={}, headers=headers)

    assert response.status == 200
    assert gateway.fake.requests_to("i")[-1].headers["Authorization"] == (
        "Bearer misskey-token-new"
    )
