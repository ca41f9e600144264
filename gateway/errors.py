"""Errors the gateway responds with itself, in Misskey's error envelope.

Every error a client can see is a ``GatewayError`` subclass. Dependencies'
exceptions (aiohttp client, redis, pyjwt) are translated at one boundary and
chained with ``from``, so request handling deals only with these types::

    GatewayError
    ├── ClientError                 the request is wrong (4xx)
    │   ├── InvalidRequest          400 INVALID_PARAM
    │   ├── NoSuchEndpoint          404 UNKNOWN_API_ENDPOINT
    │   ├── MethodNotAllowed        405 METHOD_NOT_ALLOWED
    │   ├── RequestTimeout          408 REQUEST_TIMEOUT
    │   ├── PayloadTooLarge         413 PAYLOAD_TOO_LARGE
    │   ├── RateLimitExceeded       429 RATE_LIMIT_EXCEEDED (gateway.ratelimit)
    │   ├── UpgradeRequired         426 UPGRADE_REQUIRED (gateway.streaming)
    │   └── UnsupportedMediaType    415 UNSUPPORTED_MEDIA_TYPE
    ├── CredentialError             the client's identity or rights (401/403)
    │   ├── CredentialRequired      401 CREDENTIAL_REQUIRED
    │   ├── AuthenticationFailed    401 AUTHENTICATION_FAILED
    │   ├── PermissionDenied        403 PERMISSION_DENIED
    │   └── AccessDenied            403 ACCESS_DENIED
    ├── KeySetUnavailable           503 KEY_SET_UNAVAILABLE (JWKS fetch failed)
    ├── StoreError                  the token store (5xx)
    │   ├── StoreUnavailable        503 TOKEN_STORE_UNAVAILABLE
    │   └── StoredTokenInvalid      500 STORED_TOKEN_INVALID
    └── UpstreamError               the Misskey server (5xx)
        ├── UpstreamUnavailable     502 UPSTREAM_UNAVAILABLE
        └── UpstreamTimeout         504 UPSTREAM_TIMEOUT

Codes and ids that Misskey itself uses keep Misskey's values, so SDKs map
them as they map Misskey's own errors. The others are the gateway's own,
with fixed UUIDs that never change between releases.
"""

from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    """Root of every error the gateway responds with itself."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "INTERNAL_ERROR"
    error_id: ClassVar[str] = "5d37dbcb-891e-41ca-a3d6-e690c97775ac"
    kind: ClassVar[str] = "server"
    default_message: ClassVar[str] = "Internal error occurred."

    def __init__(self, message: str | None = None, info: dict[str, Any] | None = None):
        self.message = message or self.default_message
        self.info = info
        super().__init__(self.message)

    def envelope(self) -> dict[str, Any]:
        """Return the JSON body Misskey uses for errors."""
        error: dict[str, Any] = {
            "message": self.message,
            "code": self.code,
            "id": self.error_id,
            "kind": self.kind,
        }
        if self.info:
            error["info"] = self.info
        return {"error": error}

    def headers(self) -> dict[str, str]:
        """Return the extra response headers this error carries."""
        return {}


class ClientError(GatewayError):
    kind = "client"


class InvalidRequest(ClientError):
    status = 400
    code = "INVALID_PARAM"
    error_id = "3d81ceae-475f-4600-b2a8-2bc116157532"
    default_message = "Invalid param."


class NoSuchEndpoint(ClientError):
    status = 404
    code = "UNKNOWN_API_ENDPOINT"
    error_id = "2ca3b769-540a-4f08-9dd5-b5a825b6d0f1"
    default_message = "Unknown API endpoint."


class MethodNotAllowed(ClientError):
    status = 405
    code = "METHOD_NOT_ALLOWED"
    error_id = "b2b7e9a4-0d1f-4f63-9a51-2f6e4a0c8d17"
    default_message = "Method not allowed."

    def __init__(self, allowed: tuple[str, ...], message: str | None = None):
        super().__init__(message, {"allowed": list(allowed)})
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)}


class RequestTimeout(ClientError):
    status = 408
    code = "REQUEST_TIMEOUT"
    error_id = "f3a9c1d7-2e64-4b08-95d1-7c0b8e4a6f25"
    default_message = "The client sent the request body too slowly."


class PayloadTooLarge(ClientError):
    status = 413
    code = "PAYLOAD_TOO_LARGE"
    error_id = "e3c0a7b5-41f2-4c5e-8d3b-7a9f1c26b480"
    default_message = "Request body is too large."


class UnsupportedMediaType(ClientError):
    status = 415
    code = "UNSUPPORTED_MEDIA_TYPE"
    error_id = "6b1f0d9e-83a4-4e27-b5c9-0f4d2a8e7c31"
    default_message = "Unsupported request content type."


class CredentialError(GatewayError):
    kind = "client"


class CredentialRequired(CredentialError):
    status = 401
    code = "CREDENTIAL_REQUIRED"
    error_id = "1384574d-a912-4b81-8601-c7b1c4085df1"
    default_message = "Credential required."

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="Misskey"'}


class AuthenticationFailed(CredentialError):
    status = 401
    code = "AUTHENTICATION_FAILED"
    error_id = "b0a7f5f8-dc2f-4171-b91f-de88ad238e14"
    default_message = "Authentication failed. Please ensure your token is correct."

    def headers(self) -> dict[str, str]:
        # Misskey's own wording; the gateway's reason stays out of the header
        # so that the header never carries client-controlled text.
        return {
            "WWW-Authenticate": (
                'Bearer realm="Misskey", error="invalid_token", '
                'error_description="Authentication failed. '
                'Please ensure your token is correct."'
            )
        }


class PermissionDenied(CredentialError):
    status = 403
    code = "PERMISSION_DENIED"
    error_id = "1370e5b7-d4eb-4566-bb1d-7748ee6a1838"
    kind = "permission"
    default_message = (
        "Your app does not have the necessary permissions to use this endpoint."
    )

    def headers(self) -> dict[str, str]:
        return {
            "WWW-Authenticate": (
                'Bearer realm="Misskey", error="insufficient_scope", '
                'error_description="Your app does not have the necessary '
                'permissions to use this endpoint."'
            )
        }


class AccessDenied(CredentialError):
    status = 403
    code = "ACCESS_DENIED"
    error_id = "56f35758-7dd5-468b-8439-5d6fb8ec9b8e"
    kind = "permission"
    default_message = "Access denied."


class StoreError(GatewayError):
    kind = "server"


class StoreUnavailable(StoreError):
    status = 503
    code = "TOKEN_STORE_UNAVAILABLE"
    error_id = "9e4c2b71-5a38-4d0f-a6e2-c81b7f3d5094"
    default_message = "The token store is unavailable. Please try again later."
    retry_after_seconds = 1

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_seconds)}


class StoredTokenInvalid(StoreError):
    status = 500
    code = "STORED_TOKEN_INVALID"
    error_id = "0c7d5e1a-2b94-4f8e-9d36-a5f0e7b2c418"
    default_message = "The stored Misskey token for this principal is malformed."


class KeySetUnavailable(GatewayError):
    status = 503
    code = "KEY_SET_UNAVAILABLE"
    error_id = "d2e6b0c4-8f13-4a57-9c2e-5b7a1f0d3e86"
    kind = "server"
    default_message = (
        "The keys that verify credentials could not be fetched. Please try again later."
    )

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class UpstreamError(GatewayError):
    kind = "server"


class UpstreamUnavailable(UpstreamError):
    status = 502
    code = "UPSTREAM_UNAVAILABLE"
    error_id = "4f8a1c3e-6d27-4b95-8e0a-d2c5b7f19e63"
    default_message = "The Misskey server could not be reached."


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "UPSTREAM_TIMEOUT"
    error_id = "a71e5d08-3c9b-4f24-b6d1-8e2f0c4a9b57"
    default_message = "The Misskey server timed out."
