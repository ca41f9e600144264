"""OAuth 2.0 token endpoint for the client credentials grant (RFC 6749 §4.4).

A client, created with ``misskey-gateway client create``, authenticates with
its id and secret and gets a gateway JWT for its principal. The scope of
that JWT is the client's allowed scope, or the part of it that the request
names. Errors follow RFC 6749 §5.2.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any
from urllib.parse import unquote_plus

import structlog
from aiohttp import web

from gateway.config import ConfigError, Settings
from gateway.credentials import ALL_KINDS, parse_scope, sign_gateway_jwt
from gateway.errors import StoredTokenInvalid, StoreUnavailable
from gateway.grants import (
    CLIENT_ID_PATTERN,
    CLIENT_SECRET_PATTERN,
    OAuthClientRecord,
    digest_secret,
    secret_matches,
)
from gateway.store import TokenStore

logger = structlog.get_logger("gateway.oauth")

GRANT_TYPE = "client_credentials"
FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"
# RFC 6749 §5.1: responses with tokens must not be cached.
NO_STORE_HEADERS = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# Compared against when a client id is unknown, so that unknown ids and
# wrong secrets take the same time.
_UNKNOWN_CLIENT_DIGEST = digest_secret("unknown client")


class OAuthError(Exception):
    """An RFC 6749 §5.2 error response."""

    def __init__(self, error: str, description: str, status: int = 400):
        super().__init__(description)
        self.error = error
        self.status = status


class TokenEndpoint:
    """Handle POST /_gateway/oauth/token."""

    def __init__(self, settings: Settings, store: TokenStore):
        self._settings = settings
        self._store = store

    async def handle(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            return web.Response(
                status=405, headers={"Allow": "POST", **NO_STORE_HEADERS}
            )
        try:
            return await self._token(request)
        except OAuthError as error:
            return _error_response(error)
        except StoreUnavailable:
            logger.error("oauth.store_unavailable")
            return _error_response(
                OAuthError(
                    "temporarily_unavailable",
                    "The token store is unreachable; retry later.",
                    503,
                )
            )

    async def _token(self, request: web.Request) -> web.Response:
        if request.content_type != FORM_MEDIA_TYPE:
            raise OAuthError(
                "invalid_request", f"The request body must be {FORM_MEDIA_TYPE}."
            )
        form = await request.post()
        fields = _single_values(form)
        client = await self._authenticate(request, fields)

        grant_type = fields.get("grant_type")
        if not grant_type:
            raise OAuthError("invalid_request", "The grant_type parameter is missing.")
        if grant_type != GRANT_TYPE:
            raise OAuthError(
                "unsupported_grant_type",
                f"Only the {GRANT_TYPE} grant is supported.",
            )
        scope = grant_scope(client.scope, fields.get("scope", ""))

        try:
            has_token = await self._store.get_token(client.principal) is not None
        except StoredTokenInvalid:
            has_token = False
        if not has_token:
            logger.warning(
                "oauth.no_misskey_token",
                client_id=client.client_id,
                principal=client.principal,
            )
            raise OAuthError(
                "invalid_grant",
                "The client's principal has no usable Misskey token; "
                "link an account first.",
            )

        ttl = self._settings.onboarding.oauth_token_ttl
        try:
            access_token = await sign_gateway_jwt(
                self._settings.jwt, self._store, client.principal, scope, ttl
            )
        except ConfigError as error:
            logger.error("oauth.cannot_sign_jwt", error=str(error))
            raise OAuthError(
                "server_error",
                "This gateway verifies JWTs with public keys and cannot sign them.",
                500,
            ) from None
        logger.info(
            "oauth.token_issued",
            client_id=client.client_id,
            principal=client.principal,
            scope=scope,
        )
        body = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": ttl,
            "scope": scope,
        }
        return web.json_response(body, headers=NO_STORE_HEADERS)

    async def _authenticate(
        self, request: web.Request, fields: dict[str, str]
    ) -> OAuthClientRecord:
        """Return the client the request authenticates as, or raise invalid_client."""
        basic = _basic_credentials(request)
        in_body = "client_id" in fields or "client_secret" in fields
        if basic is not None and in_body:
            raise OAuthError(
                "invalid_request",
                "Authenticate the client with HTTP Basic or with form fields, "
                "not both.",
            )
        if basic is not None:
            client_id, secret = basic
        else:
            client_id = fields.get("client_id", "")
            secret = fields.get("client_secret", "")
        if not client_id or not secret:
            raise _invalid_client("Client authentication is missing.")

        record = None
        if CLIENT_ID_PATTERN.fullmatch(client_id) and CLIENT_SECRET_PATTERN.fullmatch(
            secret
        ):
            record = await self._store.get_oauth_client(client_id)
        expected = record.secret_digest if record else _UNKNOWN_CLIENT_DIGEST
        if not secret_matches(expected, secret) or record is None:
            logger.warning("oauth.invalid_client", client_id=client_id[:40])
            raise _invalid_client("The client id or secret is invalid.")
        return record


def grant_scope(allowed: str, requested: str) -> str:
    """Return the scope to grant, or raise invalid_scope.

    Without a requested scope the client gets all its allowed kinds. A
    client allowed "*" may request any kinds.
    """
    allowed_kinds = parse_scope(allowed)
    requested_kinds = parse_scope(requested)
    if not requested_kinds:
        return " ".join(sorted(allowed_kinds))
    if ALL_KINDS not in allowed_kinds:
        extra = requested_kinds - allowed_kinds
        if extra:
            raise OAuthError(
                "invalid_scope",
                f"The client may not request: {' '.join(sorted(extra))}.",
            )
    return " ".join(sorted(requested_kinds))


def _single_values(form: Any) -> dict[str, str]:
    """Return the form fields; RFC 6749 §3.2 forbids repeating a parameter."""
    fields: dict[str, str] = {}
    for name, value in form.items():
        if name in fields:
            raise OAuthError("invalid_request", f"The parameter {name} is repeated.")
        if not isinstance(value, str):
            raise OAuthError("invalid_request", f"The parameter {name} is not text.")
        fields[name] = value
    return fields


def _basic_credentials(request: web.Request) -> tuple[str, str] | None:
    """Return the client id and secret of an Authorization: Basic header."""
    values = request.headers.getall("Authorization", [])
    if not values:
        return None
    if len(values) > 1:
        raise OAuthError("invalid_request", "More than one Authorization header.")
    scheme, _, encoded = values[0].strip().partition(" ")
    if scheme.lower() != "basic":
        raise _invalid_client("The Authorization header must use the Basic scheme.")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise _invalid_client("The Basic credentials are malformed.") from None
    client_id, separator, secret = decoded.partition(":")
    if not separator:
        raise _invalid_client("The Basic credentials are malformed.")
    # RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding.
    return unquote_plus(client_id), unquote_plus(secret)


def _invalid_client(description: str) -> OAuthError:
    return OAuthError("invalid_client", description, 401)


def _error_response(error: OAuthError) -> web.Response:
    headers = dict(NO_STORE_HEADERS)
    if error.error == "invalid_client":
        headers["WWW-Authenticate"] = 'Basic realm="misskey-gateway"'
    body = {"error": error.error, "error_description": str(error)}
    return web.Response(
        status=error.status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )
