"""Gateway credentials: JWTs that name a principal and its permission kinds.

A credential yields one of three outcomes, kept distinct: none (the request
is anonymous), invalid (``AuthenticationFailed``), or a ``Principal``.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
from jwt.types import Options

from gateway.config import SYMMETRIC_ALGORITHMS, ConfigError, JwtSettings
from gateway.errors import AuthenticationFailed
from gateway.jwks import JwksKeySet

if TYPE_CHECKING:
    from gateway.store import TokenStore

# Principals name Redis keys and log fields, so they are kept to a plain
# alphabet and a bounded length.
PRINCIPAL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
# Base64url header.payload.signature; anything else is not a gateway JWT.
JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
MAX_CREDENTIAL_LENGTH = 8192
# JWT ids name Redis keys and SQLite rows, so they keep to a plain alphabet.
JWT_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Key ids are looked up in the key set, never used as paths or patterns.
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9._:+/=-]{1,128}")
ALL_KINDS = "*"


@dataclass(frozen=True)
class Principal:
    """An authenticated client: its subject and its permission kinds."""

    subject: str
    scopes: frozenset[str]
    # The JWT's jti claim, for revocation; None for API keys and JWTs without.
    jwt_id: str | None = None
    # When the credential expires (UNIX seconds, leeway included), if it does.
    expires_at: float | None = None

    def allows(self, kind: str | None) -> bool:
        """Return whether the scope covers the permission kind ``kind``."""
        return kind is None or kind in self.scopes or ALL_KINDS in self.scopes


def validate_principal(subject: str) -> str:
    """Return ``subject`` if it is a valid principal name, else raise ValueError."""
    if not PRINCIPAL_PATTERN.fullmatch(subject):
        raise ValueError(
            "a principal is 1 to 128 characters of letters, digits and ._@+- "
            "starting with a letter or digit"
        )
    return subject


def parse_scope(scope: str) -> frozenset[str]:
    return frozenset(scope.split())


@dataclass(frozen=True)
class _VerifiedJwt:
    principal: Principal
    expires_at: float


class _VerifiedCache:
    """JWTs that passed verification, keyed by their exact text, until expiry.

    A client that sends the same JWT again skips the signature check; expiry
    is still checked on every use. The oldest entry goes when the cache is
    full (dicts keep insertion order).
    """

    def __init__(self, size: int):
        self._entries: dict[str, _VerifiedJwt] = {}
        self._size = size

    def get(self, credential: str) -> Principal | None:
        entry = self._entries.get(credential)
        if entry is None:
            return None
        if time.time() <= entry.expires_at:
            return entry.principal
        del self._entries[credential]
        raise AuthenticationFailed("The credential has expired.")

    def put(self, credential: str, principal: Principal, expires_at: float) -> None:
        if len(self._entries) >= self._size:
            del self._entries[next(iter(self._entries))]
        self._entries[credential] = _VerifiedJwt(principal, expires_at)


class JwtVerifier:
    """Verify gateway JWTs with one key and a fixed algorithm allowlist."""

    def __init__(self, settings: JwtSettings, key: Any, cache_size: int = 4096):
        self._settings = settings
        self._key = key
        self._algorithms = list(settings.algorithms)
        required = ["exp", "sub"]
        if settings.issuer:
            required.append("iss")
        if settings.audience:
            required.append("aud")
        self._options: Options = {"require": required}
        self._cache = _VerifiedCache(cache_size)

    def verify(self, credential: str) -> Principal:
        """Return the principal a JWT names, or raise AuthenticationFailed."""
        cached = self._cache.get(credential)
        if cached is not None:
            return cached
        check_shape(credential)
        principal, expires_at = self._decode(credential, self._key, self._algorithms)
        self._cache.put(credential, principal, expires_at)
        return principal

    def _decode(
        self, credential: str, key: Any, algorithms: list[str]
    ) -> tuple[Principal, float]:
        try:
            claims = jwt.decode(
                credential,
                key,
                algorithms=algorithms,
                options=self._options,
                issuer=self._settings.issuer or None,
                audience=self._settings.audience or None,
                leeway=self._settings.leeway,
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationFailed("The credential has expired.") from None
        except jwt.ImmatureSignatureError:
            raise AuthenticationFailed("The credential is not valid yet.") from None
        except jwt.PyJWTError:
            raise AuthenticationFailed("The credential is invalid.") from None

        subject = claims.get("sub")
        scope = claims.get("scope", "")
        if not isinstance(subject, str) or not PRINCIPAL_PATTERN.fullmatch(subject):
            raise AuthenticationFailed("The credential names no valid principal.")
        if not isinstance(scope, str):
            raise AuthenticationFailed("The credential's scope claim is not a string.")
        jwt_id = claims.get("jti")
        if jwt_id is not None and (
            not isinstance(jwt_id, str) or not JWT_ID_PATTERN.fullmatch(jwt_id)
        ):
            raise AuthenticationFailed("The credential's jti claim is malformed.")
        # pyjwt has checked that exp is a number; nbf, if present, has passed.
        expires_at = float(claims["exp"]) + self._settings.leeway
        principal = Principal(
            subject=subject,
            scopes=parse_scope(scope),
            jwt_id=jwt_id,
            expires_at=expires_at,
        )
        return principal, expires_at


class JwksVerifier(JwtVerifier):
    """Verify gateway JWTs against the keys of a JSON Web Key Set.

    Every JWT must name its key with ``kid``, and each key verifies only the
    one algorithm it is pinned to, so a token cannot pick another algorithm
    for a known key.
    """

    def __init__(
        self, settings: JwtSettings, key_set: JwksKeySet, cache_size: int = 4096
    ):
        super().__init__(settings, None, cache_size)
        self._key_set = key_set

    async def verify_async(self, credential: str) -> Principal:
        """Return the principal a JWT names, or raise AuthenticationFailed.

        Raises KeySetUnavailable when the key set cannot be fetched and no
        earlier copy is at hand.
        """
        cached = self._cache.get(credential)
        if cached is not None:
            return cached
        check_shape(credential)
        try:
            header = jwt.get_unverified_header(credential)
        except jwt.PyJWTError:
            raise AuthenticationFailed("The credential is invalid.") from None
        kid = header.get("kid")
        if not isinstance(kid, str) or not KEY_ID_PATTERN.fullmatch(kid):
            raise AuthenticationFailed("The credential names no valid key id (kid).")
        found = await self._key_set.key_for(kid)
        if found is None:
            raise AuthenticationFailed("The credential's key id is unknown.")
        key, algorithm = found
        principal, expires_at = self._decode(credential, key, [algorithm])
        self._cache.put(credential, principal, expires_at)
        return principal


def check_shape(credential: str) -> None:
    """Raise AuthenticationFailed unless ``credential`` looks like a JWT."""
    if len(credential) > MAX_CREDENTIAL_LENGTH or not JWT_SHAPE.fullmatch(credential):
        raise AuthenticationFailed("The credential is not a gateway credential.")


def issue_jwt(
    settings: JwtSettings,
    secret: str | bytes,
    principal: str,
    scope: str,
    ttl: int,
    now: float | None = None,
) -> str:
    """Sign a gateway JWT for ``principal`` with an HS* secret."""
    algorithm = next(
        (a for a in settings.algorithms if a in SYMMETRIC_ALGORITHMS), None
    )
    if algorithm is None:
        raise ConfigError(
            "jwt.algorithms",
            "jwt issue signs with an HS* secret; with public-key algorithms, "
            "issue tokens with the identity provider that holds the private key",
        )
    validate_principal(principal)
    issued_at = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "sub": principal,
        "iat": issued_at,
        "nbf": issued_at,
        "exp": issued_at + ttl,
        "scope": " ".join(sorted(parse_scope(scope))),
        # A random id, so that this one token can be revoked.
        "jti": secrets.token_urlsafe(12),
    }
    if settings.issuer:
        claims["iss"] = settings.issuer
    if settings.audience:
        claims["aud"] = settings.audience
    return jwt.encode(claims, secret, algorithm=algorithm)


async def sign_gateway_jwt(
    settings: JwtSettings, store: TokenStore, principal: str, scope: str, ttl: int
) -> str:
    """Sign a JWT with the secret the running gateway verifies with.

    That is ``jwt.secret`` when set, else the store's generated secret.
    Raises ConfigError when the gateway verifies with public keys only.
    """
    if SYMMETRIC_ALGORITHMS.isdisjoint(settings.algorithms):
        # issue_jwt raises the ConfigError before it would use the secret.
        return issue_jwt(settings, b"", principal, scope, ttl)
    secret: str | bytes = settings.secret or await store.jwt_secret()
    return issue_jwt(settings, secret, principal, scope, ttl)


def read_public_key(settings: JwtSettings) -> bytes:
    """Read the PEM public key named by ``jwt.public_key_file``."""
    path = Path(settings.public_key_file)
    try:
        key = path.read_bytes()
    except OSError as error:
        raise ConfigError(
            "jwt.public_key_file", f"cannot read {path}: {error.strerror}"
        ) from None
    if b"PRIVATE KEY" in key:
        raise ConfigError(
            "jwt.public_key_file",
            f"{path} contains a private key; configure the public key instead",
        )
    if b"-----BEGIN" not in key:
        raise ConfigError("jwt.public_key_file", f"{path} is not a PEM file")
    return key
