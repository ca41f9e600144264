"""What reaches the upstream, and what comes back: headers, bodies, paths."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from aiohttp import web

from gateway.upstream_pool import MAX_ENCODED_FIELDS, MAX_ENCODED_LENGTH, UpstreamPool
from tests.http_raw import send_raw

STORED = "misskey-token-alice"


def raw_post(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: gateway.test", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def post_raw(
    gateway, path: str, body: bytes, headers: dict[str, str] | None = None
):
    server = gateway.client.server
    return await send_raw(server.host, server.port, raw_post(path, body, headers))


# Request headers


async def test_credentials_never_forwarded(gateway):
    headers = {
        **gateway.bearer(),
        "Cookie": "session=abc",
        "Proxy-Authorization": "Basic eDp5",
    }
    await gateway.client.post("/api/i", json={}, headers=headers)
    sent = gateway.fake.requests_to("i")[0]

    assert "Authorization" not in sent.headers
    assert "Cookie" not in sent.headers
    assert "Proxy-Authorization" not in sent.headers


async def test_authorization_name_variants_removed(gateway):
    response = await post_raw(
        gateway,
        "/api/i",
        b"{}",
        {
            **gateway.bearer(),
            "X_Forwarded_For": "203.0.113.9",
            "Proxy_Authorization": "y",
        },
    )
    sent = gateway.fake.requests_to("i")[0]

    assert response.status == 200
    assert "X_Forwarded_For" not in sent.headers
    assert "Proxy_Authorization" not in sent.headers


async def test_hop_by_hop_headers_removed(gateway):
    headers = {
        **gateway.bearer(),
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Upgrade": "h2c",
        "X-Custom": "kept",
    }
    await gateway.client.post("/api/i", json={}, headers=headers)
    sent = gateway.fake.requests_to("i")[0]

    for name in ("X-Secret-Hop", "Keep-Alive", "TE", "Upgrade"):
        assert name not in sent.headers, name
    assert sent.headers["X-Custom"] == "kept"


async def test_forwarded_for_set_by_gateway(gateway):
    headers = {
        **gateway.bearer(),
        "X-Forwarded-For": "203.0.113.9",
        "X-Real-IP": "203.0.113.9",
        "Forwarded": "for=203.0.113.9",
    }
    await gateway.client.post("/api/i", json={}, headers=headers)
    sent = gateway.fake.requests_to("i")[0]

    assert sent.headers.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert "X-Real-IP" not in sent.headers
    assert "Forwarded" not in sent.headers


async def test_connection_cannot_remove_forwarded_for(gateway):
    await gateway.client.post(
        "/api/i", json={}, headers={**gateway.bearer(), "Connection": "X-Forwarded-For"}
    )

    assert gateway.fake.requests_to("i")[0].headers["X-Forwarded-For"] == "127.0.0.1"


async def test_client_headers_forwarded(gateway):
    headers = {
        **gateway.bearer(),
        "User-Agent": "test-client/1.0",
        "Accept-Language": "ja",
    }
    await gateway.client.post("/api/i", json={}, headers=headers)
    sent = gateway.fake.requests_to("i")[0]

    assert sent.headers["User-Agent"] == "test-client/1.0"
    assert sent.headers["Accept-Language"] == "ja"
    assert sent.headers["Content-Type"] == "application/json"


async def test_request_id_kept_and_returned(gateway):
    response = await gateway.client.post(
        "/api/i", json={}, headers={**gateway.bearer(), "X-Request-Id": "abc-123"}
    )

    assert response.headers["X-Request-Id"] == "abc-123"
    assert gateway.fake.requests_to("i")[0].headers["X-Request-Id"] == "abc-123"


async def test_request_id_invalid_replaced(gateway):
    response = await gateway.client.post(
        "/api/i", json={}, headers={**gateway.bearer(), "X-Request-Id": "bad id\t!"}
    )
    generated = response.headers["X-Request-Id"]

    assert generated != "bad id\t!"
    assert len(generated) == 32
    assert gateway.fake.requests_to("i")[0].headers["X-Request-Id"] == generated


# Request bodies

BODIES = [
    pytest.param(b'{"text":"h\xc3\xa9llo \xf0\x9f\x8e\x89"}', id="utf8"),
    pytest.param(b'{"text":"h\\u00e9llo \\ud83c\\udf89"}', id="escaped-unicode"),
    pytest.param(b'{"a":{"i":"inner","b":[1,{"i":2}]}}', id="nested-i"),
    pytest.param(
        b'{"n":123456789012345678901234567890,"f":1.0e10,"z":-0.0}', id="numbers"
    ),
    pytest.param(b'{"z":1,"a":2,"m":3}', id="key-order"),
    pytest.param(
        b'{\n  "text": "x",\n  "poll": {\n    "choices": ["a", "b"]\n  }\n}\n',
        id="pretty",
    ),
    pytest.param(b'{"dup":1,"dup":2}', id="duplicate-keys"),
    pytest.param(b"{}", id="empty-object"),
]


@pytest.mark.parametrize("body", BODIES)
async def test_body_preserved_with_injection(gateway, body):
    response = await post_raw(
        gateway,
        "/api/notes/show",
        body,
        {**gateway.bearer(), "Content-Type": "application/json"},
    )
    sent = gateway.fake.requests_to("notes/show")[0]

    assert response.status == 200
    inner = body[body.index(b"{") + 1 :]
    separator = b"," if not inner.strip().startswith(b"}") else b""
    assert sent.body == b'{"i":"' + STORED.encode() + b'"' + separator + inner


@pytest.mark.parametrize("body", BODIES)
async def test_body_preserved_anonymous(gateway, body):
    response = await post_raw(
        gateway, "/api/notes/show", body, {"Content-Type": "application/json"}
    )
    sent = gateway.fake.requests_to("notes/show")[0]

    assert response.status == 200
    assert sent.body == body


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"i":"JWT","text":"x"}', b'{"i":"TOKEN","text":"x"}'),
        (b'{"text":"x","i":"JWT"}', b'{"i":"TOKEN","text":"x"}'),
        (b'{"a":1, "i":"JWT", "b":2}', b'{"i":"TOKEN","a":1, "b":2}'),
        (b'{ "i" : "JWT" }', b'{"i":"TOKEN"  }'),
        (b'{"\\u0069":"JWT","t":1}', b'{"i":"TOKEN","t":1}'),
    ],
)
async def test_body_credential_replaced_in_place(gateway, body, expected):
    jwt = gateway.jwt().encode()
    response = await post_raw(
        gateway,
        "/api/notes/show",
        body.replace(b"JWT", jwt),
        {"Content-Type": "application/json"},
    )

    assert response.status == 200
    assert gateway.fake.requests_to("notes/show")[0].body == expected.replace(
        b"TOKEN", STORED.encode()
    )


async def test_forwarded_content_length_matches(gateway):
    body = b'{"text":"\xc3\xa9","i":"' + gateway.jwt().encode() + b'"}'
    await post_raw(
        gateway, "/api/notes/show", body, {"Content-Type": "application/json"}
    )
    sent = gateway.fake.requests_to("notes/show")[0]

    assert int(sent.headers["Content-Length"]) == len(sent.body)


async def test_empty_body_forwarded_as_object(gateway):
    response = await post_raw(gateway, "/api/i", b"", gateway.bearer())

    assert response.status == 200
    assert gateway.fake.requests_to("i")[0].body == b'{"i":"' + STORED.encode() + b'"}'


async def test_text_plain_body_forwarded_as_json(gateway):
    response = await post_raw(
        gateway,
        "/api/meta",
        b'{"detail":true}',
        {"Content-Type": "text/plain;charset=UTF-8"},
    )
    sent = gateway.fake.requests_to("meta")[0]

    assert response.status == 200
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.body == b'{"detail":true}'


async def test_chunked_body_reframed(gateway):
    body = b'{"text":"chunked"}'
    request = (
        b"POST /api/notes/show HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
    )
    server = gateway.client.server
    response = await send_raw(server.host, server.port, request)
    sent = gateway.fake.requests_to("notes/show")[0]

    assert response.status == 200
    assert sent.body == body
    assert sent.headers["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in sent.headers


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{", "INVALID_PARAM"),
        (b'{"a":1,}', "INVALID_PARAM"),
        (b"[1,2]", "INVALID_PARAM"),
        (b'"text"', "INVALID_PARAM"),
        (b"null", "INVALID_PARAM"),
        (b'{"a":NaN}', "INVALID_PARAM"),
        (b'{"a":1} {"b":2}', "INVALID_PARAM"),
        (b'{"a":"\xff"}', "INVALID_PARAM"),
        (b"\xef\xbb\xbf{}", "INVALID_PARAM"),
        (b'{"i":"a","i":"b"}', "INVALID_PARAM"),
        (b"[" * 100_000, "INVALID_PARAM"),
    ],
)
async def test_invalid_body_rejected(gateway, body, code):
    response = await post_raw(
        gateway, "/api/notes/show", body, {"Content-Type": "application/json"}
    )

    assert response.status == 400
    assert json.loads(response.body)["error"]["code"] == code
    assert gateway.fake.received == []


async def test_body_over_limit_rejected(start_gateway):
    gateway = await start_gateway(**{"server.max_body_size": 1000})
    body = json.dumps({"text": "x" * 1000}).encode()
    response = await post_raw(
        gateway, "/api/notes/show", body, {"Content-Type": "application/json"}
    )

    assert response.status == 413
    assert json.loads(response.body)["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert gateway.fake.received == []


async def test_chunked_body_over_limit_rejected(start_gateway):
    gateway = await start_gateway(**{"server.max_body_size": 1000})
    chunk = b'{"text":"' + b"x" * 600
    request = (
        b"POST /api/notes/show HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(chunk):x}\r\n".encode()
        + chunk
        + b"\r\n"
        + f"{len(chunk):x}\r\n".encode()
        + chunk
        + b"\r\n0\r\n\r\n"
    )
    server = gateway.client.server
    response = await send_raw(server.host, server.port, request)

    assert response.status == 413
    assert gateway.fake.received == []


async def test_body_at_limit_accepted(start_gateway):
    gateway = await start_gateway(**{"server.max_body_size": 1000})
    body = b'{"text":"' + b"x" * (1000 - 11) + b'"}'
    response = await post_raw(
        gateway, "/api/notes/show", body, {"Content-Type": "application/json"}
    )

    assert len(body) == 1000
    assert response.status == 200


@pytest.mark.parametrize(
    ("content_type", "extra"),
    [
        ("multipart/form-data; boundary=x", {}),
        ("application/x-www-form-urlencoded", {}),
        ("application/xml", {}),
        ("application/json", {"Content-Encoding": "gzip"}),
    ],
)
async def test_unsupported_body_rejected(gateway, content_type, extra):
    response = await post_raw(
        gateway, "/api/notes/show", b"{}", {"Content-Type": content_type, **extra}
    )

    assert response.status == 415
    assert json.loads(response.body)["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
    assert gateway.fake.received == []


# Paths


@pytest.mark.parametrize(
    "path",
    [
        "/api/notes//create",
        "/api/notes/create/",
        "/api/notes/%63reate",
        "/api/notes%2Fcreate",
        "/api/notes%2fcreate",
        "/api/./notes/create",
        "/api/notes/../i",
        "/api/notes/%2e%2e/i",
        "/api/notes/create;x=1",
        "/api/notes/local_timeline",
        "/api/",
        "/api/n\xc3\xb6tes",
    ],
)
async def test_ambiguous_path_rejected(gateway, path):
    request = (
        f"POST {path} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n"
        f"Authorization: Bearer {gateway.jwt()}\r\nContent-Type: application/json\r\n"
        "Content-Length: 2\r\n\r\n{}"
    ).encode("latin-1")
    server = gateway.client.server
    response = await send_raw(server.host, server.port, request)

    assert response.status in (400, 404)
    assert gateway.fake.received == []


async def test_query_naming_other_endpoint_ignored(gateway):
    response = await gateway.client.post(
        "/api/meta?endpoint=i/regenerate-token&x=/api/i", json={}
    )

    assert response.status == 200
    sent = gateway.fake.requests_to("meta")[0]
    assert sent.query_string == "endpoint=i/regenerate-token&x=/api/i"


async def test_post_query_credential_stripped(gateway):
    response = await gateway.client.post(f"/api/meta?i={gateway.jwt()}&a=1", json={})

    assert response.status == 200
    assert gateway.fake.requests_to("meta")[0].query_string == "a=1"


async def test_non_api_path_is_404(gateway):
    response = await gateway.client.get("/notes/abc")

    assert response.status == 404
    assert (await response.json())["error"]["code"] == "UNKNOWN_API_ENDPOINT"
    assert gateway.fake.received == []


# Responses


async def test_compressed_response_relayed_unchanged(gateway):
    payload = gzip.compress(json.dumps({"big": "x" * 5000}).encode())

    async def compressed(request, received):
        return web.Response(
            body=payload,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    gateway.fake.handlers["fake/gzip"] = compressed
    response = await gateway.client.post(
        "/api/fake/gzip", json={}, headers=gateway.bearer(), auto_decompress=False
    )

    assert response.headers["Content-Encoding"] == "gzip"
    assert int(response.headers["Content-Length"]) == len(payload)
    assert await response.read() == payload


async def test_large_chunked_response_streamed(gateway):
    block = bytes(range(256)) * 4096  # 1 MiB

    async def large(request, received):
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(5):
            await response.write(block)
        await response.write_eof()
        return response

    gateway.fake.handlers["fake/large"] = large
    response = await gateway.client.post(
        "/api/fake/large", json={}, headers=gateway.bearer()
    )

    assert await response.read() == block * 5


async def test_response_headers_filtered(gateway):
    async def with_headers(request, received):
        response = web.Response(text="{}", content_type="application/json")
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        response.headers["Connection"] = "X-Upstream-Hop"
        response.headers["X-Upstream-Hop"] = "1"
        response.headers["Keep-Alive"] = "timeout=1"
        response.headers["X-Kept"] = "yes"
        return response

    gateway.fake.handlers["fake/headers"] = with_headers
    response = await gateway.client.post(
        "/api/fake/headers", json={}, headers=gateway.bearer()
    )

    assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    assert "X-Upstream-Hop" not in response.headers
    assert "Keep-Alive" not in response.headers
    assert response.headers["X-Kept"] == "yes"


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (500, b"", None),
        (502, b"<html>bad gateway</html>", "text/html"),
        (204, b"", None),
    ],
)
async def test_upstream_status_and_body_relayed(gateway, status, body, content_type):
    async def answer(request, received):
        return web.Response(status=status, body=body or None, content_type=content_type)

    gateway.fake.handlers["fake/status"] = answer
    response = await gateway.client.post(
        "/api/fake/status", json={}, headers=gateway.bearer()
    )

    assert response.status == status
    assert await response.read() == body


# CORS and proxies in front of the gateway


async def test_preflight_answered_without_credential(gateway):
    response = await gateway.client.options(
        "/api/notes/create",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )

    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.headers["Access-Control-Allow-Methods"] == "GET, POST"
    assert response.headers["Access-Control-Allow-Headers"] == (
        "authorization, content-type"
    )
    assert gateway.fake.received == []


async def test_preflight_without_store(start_gateway):
    from tests.conftest import free_port

    gateway = await start_gateway(**{"store.url": f"redis://127.0.0.1:{free_port()}/0"})
    response = await gateway.client.options(
        "/api/i", headers={"Origin": "https://app.example"}
    )

    assert response.status == 204


async def test_error_carries_cors_headers(gateway):
    response = await gateway.client.post(
        "/api/i", json={}, headers={"Origin": "https://app.example"}
    )

    assert response.status == 401
    assert response.headers["Access-Control-Allow-Origin"] == "*"


async def test_cors_listed_origins_only(start_gateway):
    gateway = await start_gateway(**{"server.cors_origins": ["https://ok.example"]})
    allowed = await gateway.client.options(
        "/api/i", headers={"Origin": "https://ok.example"}
    )
    refused = await gateway.client.options(
        "/api/i", headers={"Origin": "https://evil.example"}
    )

    assert allowed.headers["Access-Control-Allow-Origin"] == "https://ok.example"
    assert allowed.headers["Vary"] == "Origin"
    assert "Access-Control-Allow-Origin" not in refused.headers


async def test_trusted_proxy_keeps_chain(start_gateway):
    gateway = await start_gateway(**{"server.trusted_proxies": ["127.0.0.0/8"]})
    await gateway.client.post(
        "/api/meta", json={}, headers={"X-Forwarded-For": "203.0.113.9"}
    )

    assert gateway.fake.requests_to("meta")[0].headers["X-Forwarded-For"] == (
        "203.0.113.9, 127.0.0.1"
    )


async def test_untrusted_peer_chain_replaced(start_gateway):
    gateway = await start_gateway(**{"server.trusted_proxies": ["10.0.0.0/8"]})
    await gateway.client.post(
        "/api/meta", json={}, headers={"X-Forwarded-For": "203.0.113.9"}
    )

    assert gateway.fake.requests_to("meta")[0].headers["X-Forwarded-For"] == (
        "127.0.0.1"
    )


async def test_length_with_chunked_rejected(gateway):
    body = b'{"text":"x"}'
    request = (
        b"POST /api/notes/show HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
    )
    server = gateway.client.server
    response = await send_raw(server.host, server.port, request)

    assert response.status == 400
    assert gateway.fake.received == []


def load_path_corpus() -> list[tuple[str, str]]:
    corpus = Path(__file__).parent / "data" / "path_corpus.tsv"
    rows = []
    for line in corpus.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            raw, expected = line.split("\t")
            rows.append((raw, expected))
    return rows


@pytest.mark.parametrize(("raw_path", "expected"), load_path_corpus())
async def test_path_corpus(gateway, raw_path, expected):
    request = (
        f"POST {raw_path} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n"
        f"Authorization: Bearer {gateway.jwt()}\r\nContent-Type: application/json\r\n"
        "Content-Length: 2\r\n\r\n{}"
    ).encode()
    server = gateway.client.server
    response = await send_raw(server.host, server.port, request)

    if expected == "reject":
        assert 400 <= response.status < 500, response.status
        assert gateway.fake.received == []
        return
    endpoint = expected.removeprefix("forward:")
    assert [r.path for r in gateway.fake.received] == [f"/api/{endpoint}"]


async def test_long_string_and_big_numbers_kept(gateway):
    text = "x" * (1024 * 1024 - 200)
    body = (
        '{"text":"' + text + '","n":123456789012345678901234567890123456789,'
        '"f":1e308,"g":-1.5e-300}'
    ).encode()
    response = await post_raw(
        gateway,
        "/api/notes/show",
        body,
        {**gateway.bearer(), "Content-Type": "application/json"},
    )
    sent = gateway.fake.requests_to("notes/show")[0]

    assert response.status == 200
    assert sent.body == b'{"i":"' + STORED.encode() + b'",' + body[1:]


# Shared fields: the forwarded fields of a request, encoded once by the
# upstream client for later requests that forward the same ones.


async def test_shared_fields_encoded_in_order():
    pool = UpstreamPool("http://upstream.test:8080", 1, 1.0, 1.0)
    shared = (("User-Agent", "client/1"), ("X-Forwarded-For", "127.0.0.1"))
    heads = [
        pool._encode_head(
            "POST", "/api/i", [("X-Request-Id", rid)], b"{}", shared=shared
        )
        for rid in ("a", "b")
    ]

    assert heads == [
        b"POST /api/i HTTP/1.1\r\nHost: upstream.test:8080\r\n"
        b"User-Agent: client/1\r\nX-Forwarded-For: 127.0.0.1\r\n"
        b"X-Request-Id: " + rid + b"\r\nContent-Length: 2\r\n\r\n"
        for rid in (b"a", b"b")
    ]


async def test_shared_field_encodings_bounded():
    pool = UpstreamPool("http://upstream.test", 1, 1.0, 1.0)
    for n in range(MAX_ENCODED_FIELDS + 10):
        pool._encode_head("POST", "/api/i", [], b"", shared=(("X-N", str(n)),))
    long_value = "v" * MAX_ENCODED_LENGTH
    head = pool._encode_head(
        "POST", "/api/i", [], b"", shared=(("X-Long", long_value),)
    )

    assert len(pool._encoded) <= MAX_ENCODED_FIELDS
    assert f"X-Long: {long_value}\r\n".encode() in head
    assert all("X-Long" not in encoded for encoded in pool._encoded.values())


async def test_distinct_forwarded_fields_each_arrive(gateway):
    for n in range(3):
        response = await gateway.client.post(
            "/api/meta", json={}, headers={"X-Client-Build": str(n)}
        )
        assert response.status == 200

    assert [r.headers["X-Client-Build"] for r in gateway.fake.requests_to("meta")] == [
        "0",
        "1",
        "2",
    ]
