"""Gateway JWTs: issuing, verifying with HS* and public-key algorithms, scopes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.config import ConfigError, JwtSettings
from gateway.credentials import (
    MAX_CREDENTIAL_LENGTH,
    JwtVerifier,
    Principal,
    issue_jwt,
    read_public_key,
)
from gateway.errors import AuthenticationFailed

# 64 bytes, because PyJWT warns about HMAC keys shorter than the hash output
# (64 bytes for HS512) and the test run turns warnings into errors.
SECRET = "hs-secret-0123456789abcdef0123456789abcdef0123456789abcdef012345"  # noqa: S105
OTHER_SECRET = "hs-other-0123456789abcdef0123456789abcdef0123456789abcdef0123456"  # noqa: S105
HS256 = JwtSettings(algorithms=("HS256",), secret=SECRET)
ISSUER = "https://idp.example"
AUDIENCE = "misskey-gateway"


def make_claims(**changes: Any) -> dict[str, Any]:
    """Return valid claims for alice. A change set to None drops that claim."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "alice",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "scope": "read:account write:notes",
    }
    claims.update(changes)
    return {name: value for name, value in claims.items() if value is not None}


def sign_hs256(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_hs256(token: str, settings: JwtSettings = HS256) -> Principal:
    return JwtVerifier(settings, SECRET).verify(token)


def base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# HS256 and issue_jwt


def test_issue_verify_roundtrip():
    token = issue_jwt(HS256, SECRET, "alice", "write:notes read:account", 300)
    principal = verify_hs256(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert principal == Principal(
        subject="alice",
        scopes=frozenset({"read:account", "write:notes"}),
        jwt_id=claims["jti"],
        expires_at=claims["exp"] + HS256.leeway,
    )


def test_issue_claims():
    token = issue_jwt(HS256, SECRET, "bob", "write:notes  read:account", 600, now=1000)
    claims = jwt.decode(token, options={"verify_signature": False})
    jwt_id = claims.pop("jti")
    assert claims == {
        "sub": "bob",
        "iat": 1000,
        "nbf": 1000,
        "exp": 1600,
        "scope": "read:account write:notes",
    }
    assert re.fullmatch(r"[A-Za-z0-9_-]{16}", jwt_id)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_issue_issuer_audience():
    settings = JwtSettings(algorithms=("HS256",), issuer=ISSUER, audience=AUDIENCE)
    token = issue_jwt(settings, SECRET, "alice", "*", 300)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == ISSUER
    assert claims["aud"] == AUDIENCE
    assert JwtVerifier(settings, SECRET).verify(token).subject == "alice"


def test_issue_first_hs_algorithm():
    settings = JwtSettings(algorithms=("HS512", "HS256"))
    token = issue_jwt(settings, SECRET, "alice", "", 300)
    assert jwt.get_unverified_header(token)["alg"] == "HS512"
    assert JwtVerifier(settings, SECRET).verify(token).scopes == frozenset()


def test_issue_bytes_secret():
    secret = SECRET.encode()
    token = issue_jwt(HS256, secret, "alice", "*", 300)
    assert JwtVerifier(HS256, secret).verify(token).scopes == frozenset({"*"})


def test_issue_public_key_settings():
    settings = JwtSettings(algorithms=("RS256",), public_key_file="key.pem")
    with pytest.raises(ConfigError) as excinfo:
        issue_jwt(settings, SECRET, "alice", "*", 300)
    assert excinfo.value.key == "jwt.algorithms"


@pytest.mark.parametrize("principal", ["", "bob smith", "-bob", "a" * 129, "ålice"])
def test_issue_invalid_principal(principal):
    with pytest.raises(ValueError, match="principal"):
        issue_jwt(HS256, SECRET, principal, "*", 300)


@pytest.mark.parametrize(
    "principal",
    ["alice", "a", "A" * 128, "bot.1_2@misskey.example", "0day+tag-x"],
)
def test_verify_valid_principal(principal):
    assert verify_hs256(sign_hs256(make_claims(sub=principal))).subject == principal


def test_verify_scope_absent():
    principal = verify_hs256(sign_hs256(make_claims(scope=None)))
    assert principal.scopes == frozenset()


# Public-key algorithms


@dataclass(frozen=True)
class KeyPair:
    algorithm: str
    private_pem: bytes
    public_pem: bytes


def generate_pair(algorithm: str) -> KeyPair:
    private_key: Any
    if algorithm == "RS256":
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif algorithm == "ES256":
        private_key = ec.generate_private_key(ec.SECP256R1())
    else:
        private_key = ed25519.Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    return KeyPair(algorithm, private_pem, public_pem)


@pytest.fixture(scope="module", params=["RS256", "ES256", "EdDSA"])
def key_pair(request: pytest.FixtureRequest) -> KeyPair:
    return generate_pair(request.param)


@pytest.fixture(scope="module")
def rsa_pair() -> KeyPair:
    return generate_pair("RS256")


def public_key_settings(tmp_path: Path, pair: KeyPair) -> JwtSettings:
    path = tmp_path / "public.pem"
    path.write_bytes(pair.public_pem)
    return JwtSettings(algorithms=(pair.algorithm,), public_key_file=str(path))


def test_public_key_verify(tmp_path, key_pair):
    settings = public_key_settings(tmp_path, key_pair)
    key = read_public_key(settings)
    token = jwt.encode(
        make_claims(), key_pair.private_pem, algorithm=key_pair.algorithm
    )
    principal = JwtVerifier(settings, key).verify(token)
    assert principal.subject == "alice"
    assert principal.scopes == frozenset({"read:account", "write:notes"})


def test_public_key_other_key(tmp_path, key_pair):
    settings = public_key_settings(tmp_path, key_pair)
    verifier = JwtVerifier(settings, read_public_key(settings))
    other = generate_pair(key_pair.algorithm)
    token = jwt.encode(make_claims(), other.private_pem, algorithm=other.algorithm)
    with pytest.raises(AuthenticationFailed):
        verifier.verify(token)


def test_public_key_hs256_forgery(tmp_path, rsa_pair):
    """A token signed with HS256 and the public key PEM as secret is rejected."""
    settings = public_key_settings(tmp_path, rsa_pair)
    key = read_public_key(settings)
    header = base64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = base64url(json.dumps(make_claims()).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = hmac.new(key, signing_input, hashlib.sha256).digest()
    token = f"{header}.{payload}.{base64url(signature)}"
    with pytest.raises(AuthenticationFailed):
        JwtVerifier(settings, key).verify(token)


def test_public_key_hs256_with_secret(tmp_path, rsa_pair):
    settings = public_key_settings(tmp_path, rsa_pair)
    verifier = JwtVerifier(settings, read_public_key(settings))
    with pytest.raises(AuthenticationFailed):
        verifier.verify(sign_hs256(make_claims()))


# Rejected tokens


def test_verify_expired():
    token = sign_hs256(make_claims(exp=int(time.time()) - 100))
    with pytest.raises(AuthenticationFailed) as excinfo:
        verify_hs256(token)
    assert excinfo.value.status == 401
    assert "expired" in excinfo.value.message


@pytest.mark.parametrize(
    ("offset", "leeway", "valid"),
    [
        (-10, 30.0, True),
        (-10, 0.0, False),
        (-100, 30.0, False),
    ],
)
def test_verify_exp_leeway(offset, leeway, valid):
    settings = JwtSettings(algorithms=("HS256",), leeway=leeway)
    token = sign_hs256(make_claims(exp=int(time.time()) + offset))
    if valid:
        assert verify_hs256(token, settings).subject == "alice"
        return
    with pytest.raises(AuthenticationFailed):
        verify_hs256(token, settings)


@pytest.mark.parametrize(
    ("offset", "leeway", "valid"),
    [
        (10, 30.0, True),
        (10, 0.0, False),
        (100, 30.0, False),
    ],
)
def test_verify_nbf_leeway(offset, leeway, valid):
    settings = JwtSettings(algorithms=("HS256",), leeway=leeway)
    now = int(time.time())
    token = sign_hs256(make_claims(iat=now, nbf=now + offset))
    if valid:
        assert verify_hs256(token, settings).subject == "alice"
        return
    with pytest.raises(AuthenticationFailed) as excinfo:
        verify_hs256(token, settings)
    assert "not valid yet" in excinfo.value.message


@pytest.mark.parametrize(
    ("changes", "valid"),
    [
        ({"iss": ISSUER, "aud": AUDIENCE}, True),
        ({"iss": ISSUER, "aud": ["other", AUDIENCE]}, True),
        ({"iss": "https://evil.example", "aud": AUDIENCE}, False),
        ({"aud": AUDIENCE}, False),
        ({"iss": ISSUER, "aud": "other"}, False),
        ({"iss": ISSUER, "aud": ["other"]}, False),
        ({"iss": ISSUER}, False),
    ],
)
def test_verify_issuer_audience(changes, valid):
    settings = JwtSettings(algorithms=("HS256",), issuer=ISSUER, audience=AUDIENCE)
    token = sign_hs256(make_claims(**changes))
    if valid:
        assert verify_hs256(token, settings).subject == "alice"
        return
    with pytest.raises(AuthenticationFailed):
        verify_hs256(token, settings)


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"exp": None}, id="missing-exp"),
        pytest.param({"exp": "later"}, id="string-exp"),
        pytest.param({"sub": None}, id="missing-sub"),
        pytest.param({"sub": ""}, id="empty-sub"),
        pytest.param({"sub": 123}, id="integer-sub"),
        pytest.param({"sub": "bob smith"}, id="space-sub"),
        pytest.param({"sub": "-bob"}, id="leading-dash-sub"),
        pytest.param({"sub": "../bob"}, id="dot-sub"),
        pytest.param({"sub": "bob\n"}, id="newline-sub"),
        pytest.param({"sub": "ålice"}, id="non-ascii-sub"),
        pytest.param({"sub": "bob*"}, id="glob-sub"),
        pytest.param({"sub": "a" * 129}, id="long-sub"),
        pytest.param({"scope": ["read:account"]}, id="list-scope"),
        pytest.param({"scope": 5}, id="integer-scope"),
        pytest.param({"scope": {"read": True}}, id="object-scope"),
    ],
)
def test_verify_invalid_claims(changes):
    with pytest.raises(AuthenticationFailed):
        verify_hs256(sign_hs256(make_claims(**changes)))


def test_verify_null_scope():
    # make_claims drops None values, so the null scope is encoded separately.
    claims = make_claims()
    claims["scope"] = None
    with pytest.raises(AuthenticationFailed):
        verify_hs256(sign_hs256(claims))


def test_verify_alg_none():
    token = jwt.encode(make_claims(), None, algorithm="none")
    with pytest.raises(AuthenticationFailed):
        verify_hs256(token)


def test_verify_wrong_secret():
    with pytest.raises(AuthenticationFailed):
        verify_hs256(sign_hs256(make_claims(), OTHER_SECRET))


def test_verify_other_hs_algorithm():
    token = jwt.encode(make_claims(), SECRET, algorithm="HS512")
    with pytest.raises(AuthenticationFailed):
        verify_hs256(token)


def test_verify_tampered_payload():
    header, _, signature = sign_hs256(make_claims()).split(".")
    payload = base64url(json.dumps(make_claims(sub="mallory")).encode())
    with pytest.raises(AuthenticationFailed):
        verify_hs256(f"{header}.{payload}.{signature}")


@pytest.mark.parametrize(
    "credential",
    [
        "",
        "not a jwt",
        "misskey-token-0123456789",
        "a.b",
        "a.b.c.d",
        "x.y.z",
        "Bearer x.y.z",
        "e30.e30.",
        "é.é.é",
    ],
)
def test_verify_not_jwt(credential):
    with pytest.raises(AuthenticationFailed):
        verify_hs256(credential)


def test_verify_whitespace_around():
    token = sign_hs256(make_claims())
    with pytest.raises(AuthenticationFailed):
        verify_hs256(f" {token}\n")


def test_verify_over_long():
    scope = " ".join(f"kind:{index}" for index in range(1200))
    token = sign_hs256(make_claims(scope=scope))
    assert len(token) > MAX_CREDENTIAL_LENGTH
    with pytest.raises(AuthenticationFailed):
        verify_hs256(token)


def test_verify_over_long_garbage():
    with pytest.raises(AuthenticationFailed):
        verify_hs256("a" * 10_000 + ".b.c")


# Principal.allows

ALLOWS_CASES: list[tuple[frozenset[str], str | None, bool]] = [
    (frozenset({"read:account", "write:notes"}), "write:notes", True),
    (frozenset({"read:account", "write:notes"}), "read:account", True),
    (frozenset({"read:account", "write:notes"}), "write:drive", False),
    (frozenset({"read:account", "write:notes"}), "write", False),
    (frozenset({"read:account", "write:notes"}), "read:account:x", False),
    (frozenset({"read:account", "write:notes"}), None, True),
    (frozenset({"*"}), "write:admin:meta", True),
    (frozenset({"*"}), None, True),
    (frozenset({"read:*"}), "read:account", False),
    (frozenset(), "read:account", False),
    (frozenset(), None, True),
]


@pytest.mark.parametrize(("scopes", "kind", "expected"), ALLOWS_CASES)
def test_principal_allows(scopes, kind, expected):
    assert Principal(subject="alice", scopes=scopes).allows(kind) is expected


# read_public_key


def read_key_file(tmp_path: Path, content: bytes) -> Callable[[], bytes]:
    path = tmp_path / "key.pem"
    path.write_bytes(content)
    settings = JwtSettings(algorithms=("RS256",), public_key_file=str(path))
    return lambda: read_public_key(settings)


def test_read_public_key(tmp_path, rsa_pair):
    assert read_key_file(tmp_path, rsa_pair.public_pem)() == rsa_pair.public_pem


def test_read_public_key_private(tmp_path, rsa_pair):
    with pytest.raises(ConfigError) as excinfo:
        read_key_file(tmp_path, rsa_pair.private_pem)()
    assert excinfo.value.key == "jwt.public_key_file"
    assert "private key" in str(excinfo.value)


def test_read_public_key_private_traditional(tmp_path):
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    with pytest.raises(ConfigError) as excinfo:
        read_key_file(tmp_path, pem)()
    assert excinfo.value.key == "jwt.public_key_file"


@pytest.mark.parametrize(
    "content",
    [b"", b"not a key\n", b"\x30\x82\x01\x22\x30\x0d\x06\x09"],
)
def test_read_public_key_not_pem(tmp_path, content):
    with pytest.raises(ConfigError) as excinfo:
        read_key_file(tmp_path, content)()
    assert excinfo.value.key == "jwt.public_key_file"
    assert "PEM" in str(excinfo.value)


def test_read_public_key_der(tmp_path, rsa_pair):
    der = serialization.load_pem_public_key(rsa_pair.public_pem).public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    with pytest.raises(ConfigError) as excinfo:
        read_key_file(tmp_path, der)()
    assert excinfo.value.key == "jwt.public_key_file"


def test_read_public_key_missing(tmp_path):
    settings = JwtSettings(
        algorithms=("RS256",), public_key_file=str(tmp_path / "absent.pem")
    )
    with pytest.raises(ConfigError) as excinfo:
        read_public_key(settings)
    assert excinfo.value.key == "jwt.public_key_file"
    assert "absent.pem" in str(excinfo.value)
