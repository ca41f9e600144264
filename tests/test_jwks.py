"""JWTs verified against a JSON Web Key Set served over HTTP."""

from __future__ import annotations

import asyncio
import time

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.config import ConfigError, load_settings

STORED = "misskey-token-alice"


class KeySetServer:
    """Serves a JWKS document that tests change, and counts fetches."""

    def __init__(self) -> None:
        self.keys: list[dict] = []
        self.fetches = 0
        self.failing = False

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.failing:
            return web.Response(status=500)
        return web.json_response({"keys": self.keys})


@pytest.fixture
async def key_server():
    state = KeySetServer()
    app = web.Application()
    app.router.add_get("/jwks.json", state.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state.url = str(server.make_url("/jwks.json"))
    yield state
    await server.close()


def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(private_key, kid: str, alg: str | None) -> dict:
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        document = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        document = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        document = OKPAlgorithm.to_jwk(public, as_dict=True)
    document["kid"] = kid
    if alg:
        document["alg"] = alg
    return document


def token(private_key, alg: str, kid: str | None, principal: str = "alice") -> str:
    now = int(time.time())
    claims = {"sub": principal, "scope": "*", "iat": now, "exp": now + 300}
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims, private_key, algorithm=alg, headers=headers)


async def gateway_with(start_gateway, key_server, **overrides):
    gateway = await start_gateway(
        **{
            "jwt.secret": "",
            "jwt.algorithms": ["RS256", "PS256", "ES256", "EdDSA"],
            "jwt.jwks_url": key_server.url,
            "jwt.jwks_refetch_interval": 30.0,
            **overrides,
        }
    )
    gateway.fake.add_token(STORED, "alice")
    await gateway.store_token("alice", STORED)
    return gateway


async def call(gateway, credential: str):
    return await gateway.client.post(
        "/api/i", json={}, headers={"Authorization": f"Bearer {credential}"}
    )


@pytest.mark.parametrize(
    ("make_key", "alg", "publish_alg"),
    [
        (rsa_key, "RS256", "RS256"),
        (rsa_key, "PS256", "PS256"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "ES256", None),
        (ed25519.Ed25519PrivateKey.generate, "EdDSA", None),
    ],
)
async def test_jwks_key_types(start_gateway, key_server, make_key, alg, publish_alg):
    private = make_key()
    key_server.keys = [jwk(private, "k1", publish_alg)]
    gateway = await gateway_with(start_gateway, key_server)
    response = await call(gateway, token(private, alg, "k1"))

    assert response.status == 200
    assert gateway.fake.requests_to("i")[0].token == STORED


async def test_jwks_kid_required(start_gateway, key_server):
    private = rsa_key()
    key_server.keys = [jwk(private, "k1", "RS256")]
    gateway = await gateway_with(start_gateway, key_server)
    response = await call(gateway, token(private, "RS256", None))

    assert response.status == 401
    assert "kid" in (await response.json())["error"]["message"]


@pytest.mark.parametrize("kid", ["../../etc/passwd", "a b", "x" * 200, ""])
async def test_jwks_kid_malformed(start_gateway, key_server, kid):
    private = rsa_key()
    key_server.keys = [jwk(private, "k1", "RS256")]
    gateway = await gateway_with(start_gateway, key_server)
    response = await call(gateway, token(private, "RS256", kid))

    assert response.status == 401
    assert gateway.fake.received == []


async def test_jwks_algorithm_pinned_per_key(start_gateway, key_server):
    private = rsa_key()
    key_server.keys = [jwk(private, "k1", "RS256")]
    gateway = await gateway_with(start_gateway, key_server)
    response = await call(gateway, token(private, "PS256", "k1"))

    assert response.status == 401


async def test_jwks_hmac_with_public_key_rejected(start_gateway, key_server):
    private = rsa_key()
    key_server.keys = [jwk(private, "k1", "RS256")]
    gateway = await gateway_with(start_gateway, key_server)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = _hs256_forgery(public_pem)
    response = await call(gateway, forged)

    assert response.status == 401


def _hs256_forgery(secret: bytes) -> str:
    """Sign an HS256 JWT with a public key as the HMAC secret, by hand.

    PyJWT refuses to do this itself, which is the attack being tested.
    """
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    payload = b64(
        json.dumps(
            {"sub": "alice", "scope": "*", "exp": int(time.time()) + 60}
        ).encode()
    )
    signature = hmac.new(
        secret, f"{header}.{payload}".encode(), hashlib.sha256
    ).digest()
    return f"{header}.{payload}.{b64(signature)}"


async def test_jwks_unknown_kid_triggers_one_refetch(start_gateway, key_server):
    old = rsa_key()
    new = rsa_key()
    key_server.keys = [jwk(old, "old", "RS256")]
    gateway = await gateway_with(start_gateway, key_server)
    assert (await call(gateway, token(old, "RS256", "old"))).status == 200
    fetches = key_server.fetches

    key_server.keys.append(jwk(new, "new", "RS256"))
    rotated = await call(gateway, token(new, "RS256", "new"))
    unknown_first = await call(gateway, token(new, "RS256", "made-up-1"))
    unknown_second = await call(gateway, token(new, "RS256", "made-up-2"))

    assert rotated.status == 200
    assert unknown_first.status == 401
    assert unknown_second.status == 401
    # The rotation fetched once; the made-up ids within the interval did not.
    assert key_server.fetches == fetches + 1


async def test_jwks_unavailable_is_503(start_gateway, key_server):
    private = rsa_key()
    key_server.failing = True
    gateway = await gateway_with(start_gateway, key_server)
    response = await call(gateway, token(private, "RS256", "k1"))

    assert response.status == 503
    assert (await response.json())["error"]["code"] == "KEY_SET_UNAVAILABLE"
    assert response.headers["Retry-After"] == "5"
    assert gateway.fake.received == []


async def test_jwks_cached_keys_survive_outage(start_gateway, key_server):
    private = rsa_key()
    key_server.keys = [jwk(private, "k1", "RS256")]
    gateway = await gateway_with(
        start_gateway, key_server, **{"jwt.jwks_cache_seconds": 0.05}
    )
    assert (await call(gateway, token(private, "RS256", "k1"))).status == 200
    key_server.failing = True
    await asyncio.sleep(0.1)
    response = await call(gateway, token(private, "RS256", "k1", principal="alice"))

    assert response.status == 200


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        (
            {"MISSKEY_GATEWAY_JWT_JWKS_URL": "ftp://idp.example/jwks"},
            "jwt.jwks_url",
        ),
        (
            {
                "MISSKEY_GATEWAY_JWT_JWKS_URL": "https://idp.example/jwks",
                "MISSKEY_GATEWAY_JWT_ALGORITHMS": "HS256",
            },
            "jwt.jwks_url",
        ),
        (
            {
                "MISSKEY_GATEWAY_JWT_JWKS_URL": "https://idp.example/jwks",
                "MISSKEY_GATEWAY_JWT_ALGORITHMS": "RS256",
                "MISSKEY_GATEWAY_JWT_PUBLIC_KEY_FILE": "key.pem",
            },
            "jwt.public_key_file",
        ),
        (
            {
                "MISSKEY_GATEWAY_JWT_JWKS_URL": "https://idp.example/jwks",
                "MISSKEY_GATEWAY_JWT_ALGORITHMS": "RS256",
                "MISSKEY_GATEWAY_JWT_JWKS_CACHE_SECONDS": "0",
            },
            "jwt.jwks_cache_seconds",
        ),
    ],
)
def test_jwks_config_invalid(environ, key):
    with pytest.raises(ConfigError) as raised:
        load_settings(None, environ=environ)
    assert raised.value.key.startswith(key)
