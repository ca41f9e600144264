"""Opaque API keys: a long random secret that names a principal and its scope.

A key is shown once, when it is created. The store keeps only its SHA-256
digest with the principal, the scope and a short public id, so a copy of
the store does not reveal usable keys. Keys start with ``mgk_`` so that
secret scanners and people can tell them apart from JWTs and Misskey tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

API_KEY_PREFIX = "mgk_"
# 32 random bytes in URL-safe base64 are 43 characters.
API_KEY_PATTERN = re.compile(r"mgk_[A-Za-z0-9_-]{43}")
KEY_ID_LENGTH = 12


@dataclass(frozen=True)
class ApiKeyRecord:
    """The stored record of one API key; never the key itself."""

    digest: str
    key_id: str
    principal: str
    scope: str
    created_at: float


def digest_key(key: str) -> str:
    """Return the hex SHA-256 digest under which a key is stored."""
    return hashlib.sha256(key.encode()).hexdigest()


def looks_like_api_key(credential: str) -> bool:
    return credential.startswith(API_KEY_PREFIX)


def new_api_key(principal: str, scope: str) -> tuple[str, ApiKeyRecord]:
    """Generate a key for ``principal``; return it and the record to store."""
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    digest = digest_key(key)
    record = ApiKeyRecord(
        digest=digest,
        key_id=digest[:KEY_ID_LENGTH],
        principal=principal,
        scope=" ".join(sorted(set(scope.split()))),
        created_at=time.time(),
    )
    return key, record


def matches(record: ApiKeyRecord, digest: str) -> bool:
    """Compare a looked-up record's digest with the request's, in constant time."""
    return hmac.compare_digest(record.digest, digest)
