"""Gateway credentials: JWTs that name a principal and its permission kinds.

A credential yields one of three outcomes, kept distinct: none (the request
is anonymous), invalid (``AuthenticationFailed``), or a ``Principal``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from jwt.types import Options

from gateway.config import SYMMETRIC_ALGORITHMS, ConfigError, JwtSettings
from gateway.errors import AuthenticationFailed

# Principals name Redis keys and log fields, so they are kept to a plain
# alphabet and a bounded length.
PRINCIPAL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
# Base64url header.payload.signature; anything else is not a gateway JWT.
JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
MAX_CREDENTIAL_LENGTH = 8192
ALL_KINDS = "*"


@dataclass(frozen=True)
class Principal:
    """An authenticated client: its subject and its permission kinds."""

    subject: str
    scopes: frozenset[str]

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


class JwtVerifier:
    """Verify gateway JWTs with one key and a fixed algorithm allowlist.

    A JWT whose signature and claims passed is remembered, keyed by its exact
    text, until it expires, so a client that sends the same JWT again skips
    the signature check. Expiry is still checked on every use.
    """

    def __init__(self, settings: JwtSettings, key: str | bytes, cache_size: int = 4096):
        self._settings = settings
        self._key = key
        self._algorithms = list(settings.algorithms)
        required = ["exp", "sub"]
        if settings.issuer:
            required.append("iss")
        if settings.audience:
            required.append("aud")
        self._options: Options = {"require": required}
        self._cache: dict[str, _VerifiedJwt] = {}
        self._cache_size = cache_size

    def verify(self, credential: str) -> Principal:
        """Return the principal a JWT names, or raise AuthenticationFailed."""
        cached = self._cache.get(credential)
        if cached is not None:
            if time.time() <= cached.expires_at:
                return cached.principal
            del self._cache[credential]
            raise AuthenticationFailed("The credential has expired.")

        principal, expires_at = self._decode(credential)
        if len(self._cache) >= self._cache_size:
            # Dicts keep insertion order: drop the oldest entry.
            del self._cache[next(iter(self._cache))]
        self._cache[credential] = _VerifiedJwt(principal, expires_at)
        return principal

    def _decode(self, credential: str) -> tuple[Principal, float]:
        if len(credential) > MAX_CREDENTIAL_LENGTH or not JWT_SHAPE.fullmatch(
            credential
        ):
            raise AuthenticationFailed("The credential is not a gateway credential.")
        try:
            claims = jwt.decode(
                credential,
                self._key,
                algorithms=self._algorithms,
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
        # pyjwt has checked that exp is a number; nbf, if present, has passed.
        expires_at = float(claims["exp"]) + self._settings.leeway
        return Principal(subject=subject, scopes=parse_scope(scope)), expires_at


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
    }
    if settings.issuer:
        claims["iss"] = settings.issuer
    if settings.audience:
        claims["aud"] = settings.audience
    return jwt.encode(claims, secret, algorithm=algorithm)


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
