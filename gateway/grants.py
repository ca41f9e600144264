"""Records of the onboarding flow and of OAuth clients, as the token store keeps them.

Invites and client secrets are high-entropy random strings. Like API keys,
the store keeps only their SHA-256 digests, so a copy of the store does not
reveal a usable invite or client secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass

INVITE_PREFIX = "mgi_"
CLIENT_ID_PREFIX = "mgc_"
CLIENT_SECRET_PREFIX = "mgs_"  # noqa: S105 - a prefix, not a secret
# 32 random bytes in URL-safe base64 are 43 characters.
INVITE_PATTERN = re.compile(r"mgi_[A-Za-z0-9_-]{43}")
CLIENT_ID_PATTERN = re.compile(r"mgc_[0-9a-f]{24}")
CLIENT_SECRET_PATTERN = re.compile(r"mgs_[A-Za-z0-9_-]{43}")
# MiAuth session ids are UUIDs (version 4), written in lowercase.
SESSION_ID_PATTERN = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
)
MIAUTH_SESSION_TTL = 600


def digest_secret(secret: str) -> str:
    """Return the hex SHA-256 digest under which an invite or secret is stored."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_invite() -> tuple[str, str]:
    """Generate an invite; return it and the digest to store."""
    invite = INVITE_PREFIX + secrets.token_urlsafe(32)
    return invite, digest_secret(invite)


@dataclass(frozen=True)
class MiAuthSession:
    """A MiAuth session that the gateway started and has not finished yet."""

    session_id: str
    principal: str
    # Misskey permission kinds requested, in the order of the request.
    permissions: tuple[str, ...]
    # "jwt" or "api_key": the gateway credential handed out at the end.
    credential: str
    # UNIX seconds after which the callback rejects the session.
    expires_at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> MiAuthSession | None:
        """Parse a stored session; None when the stored value is damaged."""
        try:
            values = json.loads(text)
            return cls(
                session_id=str(values["session_id"]),
                principal=str(values["principal"]),
                permissions=tuple(str(kind) for kind in values["permissions"]),
                credential=str(values["credential"]),
                expires_at=float(values["expires_at"]),
            )
        except (ValueError, TypeError, KeyError):
            return None

    @property
    def expired(self) -> bool:
        return time.time() > self.expires_at


@dataclass(frozen=True)
class OAuthClientRecord:
    """The stored record of one OAuth client, without its secret."""

    client_id: str
    secret_digest: str
    principal: str
    # Space-separated permission kinds the client may request; "*" is all.
    scope: str
    created_at: float


def new_oauth_client(principal: str, scope: str) -> tuple[str, OAuthClientRecord]:
    """Generate a client for ``principal``; return its secret and the record."""
    secret = CLIENT_SECRET_PREFIX + secrets.token_urlsafe(32)
    record = OAuthClientRecord(
        client_id=CLIENT_ID_PREFIX + secrets.token_hex(12),
        secret_digest=digest_secret(secret),
        principal=principal,
        scope=" ".join(sorted(set(scope.split()))),
        created_at=time.time(),
    )
    return secret, record


def secret_matches(expected_digest: str, secret: str) -> bool:
    """Compare a presented secret with a stored digest in constant time."""
    return hmac.compare_digest(expected_digest, digest_secret(secret))
