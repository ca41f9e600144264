"""The API request path: identify, route, authorize, fetch the token, rewrite, relay."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any, Protocol

import structlog
from aiohttp import web
from multidict import MultiMapping

from gateway.apikeys import API_KEY_PATTERN, digest_key, looks_like_api_key, matches
from gateway.config import Settings
from gateway.credentials import (
    JwksVerifier,
    JwtVerifier,
    Principal,
    parse_scope,
    read_public_key,
)
from gateway.errors import (
    AccessDenied,
    AuthenticationFailed,
    CredentialRequired,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    PermissionDenied,
    RequestTimeout,
    StoreUnavailable,
    UnsupportedMediaType,
    UpstreamUnavailable,
)
from gateway.jwks import JwksKeySet
from gateway.logs import info_enabled, log_info
from gateway.metrics import STORE_ERRORS, RequestMetrics
from gateway.multipart import MultipartRewriter, parse_boundary
from gateway.policy import EndpointPolicy, Mode, PolicyTable, endpoint_from_path
from gateway.ratelimit import RateLimiter, RateLimitExceeded
from gateway.rewrite import (
    JsonBody,
    parse_json_body,
    rewrite_json_body,
    strip_query_credential,
)
from gateway.store import TokenStore
from gateway.upstream import (
    ClientDisconnected,
    Relay,
    UpstreamBodyFailed,
    forward_request_headers,
)
from gateway.upstream_pool import BodyReadError, UpstreamResponse

logger = structlog.get_logger("gateway.request")

REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Endpoints that take a file as multipart/form-data: Misskey's only endpoint
# with requireFile.
MULTIPART_ENDPOINTS = frozenset({"drive/files/create"})
# An HTTP header name (RFC 9110 token), for echoing requested CORS headers.
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
# Largest upstream 401 body read to look for AUTHENTICATION_FAILED.
MAX_ERROR_BODY = 64 * 1024
# Content types whose body Misskey parses as JSON. A missing type and
# text/plain are accepted too, because browsers' fetch() sends a string body
# as text/plain when no Content-Type is set.
JSON_MEDIA_TYPES = frozenset({"application/json", "text/plain", ""})


class RequestLog:
    """Fields of the one summary event logged for each request."""

    __slots__ = ("request_id", "method", "started", "fields", "timings")

    def __init__(self, request_id: str, method: str):
        self.request_id = request_id
        self.method = method
        self.started = time.perf_counter()
        self.fields: dict[str, Any] = {}
        self.timings: dict[str, float] = {}


class ClientRequest(Protocol):
    """The parts of a client request that the request path reads.

    aiohttp's ``web.Request`` has them, and so does the lean server's
    ``gateway.server.FastRequest``.
    """

    @property
    def method(self) -> str: ...

    @property
    def raw_path(self) -> str: ...

    @property
    def headers(self) -> MultiMapping[str]: ...

    @property
    def remote(self) -> str | None: ...

    @property
    def scheme(self) -> str: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def content_type(self) -> str: ...

    async def read(self) -> bytes: ...


class Responder(Protocol):
    """The receiver of the request path's response, for either server."""

    @property
    def status(self) -> int | None:
        """The status sent or about to be sent, or None before a response."""

    async def relay(
        self,
        upstream: UpstreamResponse,
        extra_headers: Mapping[str, str],
        prefetched: bytes | None = None,
    ) -> None:
        """Relay an upstream response; ``prefetched`` is its body if already read."""

    def error(
        self, error: GatewayError, request_id: str, extra_headers: Mapping[str, str]
    ) -> None:
        """Respond with the gateway's own error envelope for ``error``."""


class WebResponder:
    """Responder that builds the aiohttp response for aiohttp's server."""

    def __init__(self, request: web.Request, relay: Relay):
        self.response: web.StreamResponse | None = None
        self._request = request
        self._relay = relay

    @property
    def status(self) -> int | None:
        return self.response.status if self.response is not None else None

    async def relay(
        self,
        upstream: UpstreamResponse,
        extra_headers: Mapping[str, str],
        prefetched: bytes | None = None,
    ) -> None:
        self.response = await self._relay.respond(
            self._request, upstream, extra_headers, prefetched
        )

    def error(
        self, error: GatewayError, request_id: str, extra_headers: Mapping[str, str]
    ) -> None:
        response = error_response(error, request_id)
        response.headers.update(extra_headers)
        self.response = response


# Generated request ids: a random prefix per process and a counter, unique
# across processes without a system call per request.
_REQUEST_ID_PREFIX = os.urandom(8).hex()
_request_counter = itertools.count(1)


def new_request_id(request: ClientRequest) -> str:
    candidate = request.headers.get(REQUEST_ID_HEADER)
    if candidate is not None and REQUEST_ID_PATTERN.fullmatch(candidate):
        return candidate
    return f"{_REQUEST_ID_PREFIX}{next(_request_counter):016x}"


def error_content(error: GatewayError, request_id: str) -> tuple[bytes, dict[str, str]]:
    """Return the body and headers of the response to an error of the gateway's own."""
    headers = {"Content-Type": "application/json; charset=utf-8"}
    headers.update(error.headers())
    headers[REQUEST_ID_HEADER] = request_id
    return json.dumps(error.envelope()).encode(), headers


def closes_connection(error: GatewayError) -> bool:
    """Return whether the response to ``error`` ends the client connection.

    After a body timeout the rest of the body may still trickle in, and the
    server should not wait for it.
    """
    return isinstance(error, RequestTimeout)


def error_response(error: GatewayError, request_id: str) -> web.Response:
    """Build the client response for an error raised by the gateway itself."""
    body, headers = error_content(error, request_id)
    response = web.Response(status=error.status, body=body, headers=headers)
    if closes_connection(error):
        response.force_close()
    return response


class ApiProxy:
    """Handle every request under /api/."""

    def __init__(
        self,
        settings: Settings,
        policy: PolicyTable,
        store: TokenStore,
        relay: Relay,
        limiter: RateLimiter | None = None,
    ):
        self._settings = settings
        self._policy = policy
        self._store = store
        self._relay = relay
        self._limiter = limiter
        self._metrics = RequestMetrics(policy.names())
        self._verifier: JwtVerifier | None = None
        self._max_body_size = settings.server.max_body_size
        self._cors_origins = settings.server.cors_origins
        self._trusted_proxies = [
            ipaddress.ip_network(network, strict=False)
            for network in settings.server.trusted_proxies
        ]
        transport = settings.upstream.token_transport
        self._token_in_header = transport == "header"  # noqa: S105 - a mode name

    def forwarded_for(self, request: ClientRequest) -> str:
        """Return the X-Forwarded-For value to send upstream.

        A client's own X-Forwarded-For is kept, with the peer appended, only
        when the peer is a trusted proxy; otherwise it is the peer alone.
        """
        peer = request.remote or ""
        if not self._trusted_proxies or not peer:
            return peer
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return peer
        if not any(address in network for network in self._trusted_proxies):
            return peer
        chain = ", ".join(
            value.strip()
            for value in request.headers.getall("X-Forwarded-For", [])
            if value.strip()
        )
        return f"{chain}, {peer}" if chain else peer

    def cors_headers(self, request: ClientRequest) -> dict[str, str]:
        """Return the CORS headers for a response to ``request``, if any."""
        origin = request.headers.get("Origin")
        if origin is None or not self._cors_origins:
            return {}
        if "*" in self._cors_origins:
            return {"Access-Control-Allow-Origin": "*"}
        if origin in self._cors_origins:
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        return {}

    def preflight(self, request: web.Request) -> web.Response:
        """Respond to a CORS preflight without a credential or a store lookup."""
        headers = self.cors_headers(request)
        if headers:
            requested = request.headers.get("Access-Control-Request-Headers", "")
            names = [name.strip() for name in requested.split(",") if name.strip()]
            allowed = [name for name in names if HEADER_NAME.fullmatch(name)]
            headers.update(
                {
                    "Access-Control-Allow-Methods": "GET, POST",
                    "Access-Control-Allow-Headers": ", ".join(
                        allowed or ["Authorization", "Content-Type"]
                    ),
                    "Access-Control-Max-Age": "600",
                }
            )
        return web.Response(status=204, headers=headers)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Handle one /api/ request that aiohttp's server received."""
        if request.method == "OPTIONS":
            return self.preflight(request)
        responder = WebResponder(request, self._relay)
        await self.serve(request, responder)
        if responder.response is None:
            raise RuntimeError("the request path ended without a response")
        return responder.response

    async def serve(self, request: ClientRequest, responder: Responder) -> None:
        """Run the request path for ``request`` and respond through ``responder``.

        Both servers call this: aiohttp's, and the lean server in
        ``gateway.server`` that handles plain JSON requests itself.
        """
        log = RequestLog(request_id=new_request_id(request), method=request.method)
        try:
            await self._handle(request, responder, log)
        except GatewayError as error:
            log.fields["error"] = error.code
            if isinstance(error, StoreUnavailable):
                STORE_ERRORS.inc()
            responder.error(error, log.request_id, self.cors_headers(request))
        except UpstreamBodyFailed as error:
            log.fields["error"] = "UPSTREAM_BODY_FAILED"
            log.fields["detail"] = str(error)
            raise
        except ClientDisconnected:
            log.fields["error"] = "CLIENT_DISCONNECTED"
            raise
        except Exception:
            logger.exception("request.failed", request_id=log.request_id)
            log.fields["error"] = "INTERNAL_ERROR"
            responder.error(GatewayError(), log.request_id, {})
        finally:
            self._log_request(log, responder.status)
            self._metrics.record(
                log.fields.get("endpoint"),
                log.fields.get("mode"),
                responder.status,
                log.timings.get("upstream_ms"),
            )

    def _log_request(self, log: RequestLog, status: int | None) -> None:
        if not info_enabled():
            return
        # Milliseconds to three decimals: round(x * 1000) / 1000 rounds like
        # round(x, 3) but for some exact ties, at a third of the cost.
        duration_us = round((time.perf_counter() - log.started) * 1_000_000)
        fields: dict[str, Any] = {
            "request_id": log.request_id,
            "method": log.method,
            "status": status,
            "duration_ms": duration_us / 1000,
            **log.fields,
        }
        for name, value in log.timings.items():
            fields[name] = round(value * 1000) / 1000
        log_info(logger, "request", fields)

    async def _handle(
        self, request: ClientRequest, responder: Responder, log: RequestLog
    ) -> None:
        raw_path, _, raw_query = request.raw_path.partition("?")
        endpoint = endpoint_from_path(raw_path)
        log.fields["endpoint"] = endpoint
        policy = self._policy.lookup(endpoint)
        log.fields["mode"] = policy.mode.value

        if policy.mode is Mode.DENY:
            raise AccessDenied("This endpoint is not available through the gateway.")
        method = request.method
        if method in ("GET", "HEAD"):
            if not policy.allow_get:
                raise MethodNotAllowed(("POST",))
            if policy.mode is Mode.REQUIRED and not self._token_in_header:
                # Misskey would read a token from the query of a GET, but a
                # token in a URL ends up in access logs, so the gateway never
                # puts one there; it can send one only as a header.
                raise MethodNotAllowed(
                    ("POST",), "This endpoint needs a token; call it with POST."
                )
        elif method != "POST":
            allowed = ("GET", "HEAD", "POST") if policy.allow_get else ("POST",)
            raise MethodNotAllowed(allowed)

        query = strip_query_credential(raw_query)
        header_credential = self._header_credential(request)
        body: JsonBody | None = None
        media_type = _media_type(request)
        if method == "POST" and media_type == "multipart/form-data":
            if not isinstance(request, web.Request):
                # The lean server passes uploads on to aiohttp's server.
                raise TypeError("multipart uploads need aiohttp's request object")
            await self._handle_upload(
                request,
                responder,
                endpoint,
                policy,
                header_credential,
                query.query,
                log,
            )
            return
        if method == "POST":
            body = parse_json_body(await self._read_body(request, media_type))
            credential = self._pick_credential(
                header_credential, self._body_credential(body)
            )
        else:
            credential = self._pick_credential(header_credential, query.credential)

        principal = await self._identify(credential, log)
        if self._limiter is not None:
            await self._check_rate_limit(principal)
        # GET requests carry a token only as a header, for the reason above.
        token = await self._authorize(
            policy, principal, log, fetch=body is not None or self._token_in_header
        )

        shared = self._upstream_fields(request, media_type, body is not None)
        base_headers = [(REQUEST_ID_HEADER, log.request_id)]
        headers, forwarded_body = self._with_token(base_headers, body, token)
        log.fields["token_injected"] = token is not None

        target = f"/api/{endpoint}"
        if query.query:
            target = f"{target}?{query.query}"
        extra_headers = {REQUEST_ID_HEADER: log.request_id}
        upstream_started = time.perf_counter()
        upstream = await self._relay.send(
            method, target, headers, forwarded_body, log.timings, shared
        )
        prefetched: bytes | None = None
        if (
            upstream.status == 401
            and token is not None
            and principal is not None
            and body is not None
        ):
            retry = await self._token_rejected(upstream, principal, token, log)
            if isinstance(retry, str):
                upstream.release()
                headers, forwarded_body = self._with_token(base_headers, body, retry)
                upstream = await self._relay.send(
                    method, target, headers, forwarded_body, log.timings, shared
                )
            else:
                prefetched = retry
        log.fields["upstream_status"] = upstream.status
        await responder.relay(upstream, extra_headers, prefetched)
        log.timings["upstream_ms"] = (time.perf_counter() - upstream_started) * 1000

    def _upstream_fields(
        self, request: ClientRequest, media_type: str, json_body: bool
    ) -> tuple[tuple[str, str], ...]:
        """Return the fields to send upstream but the request id and the token.

        They depend only on the request head and the connection, so the lean
        server's requests with the same head on one connection share them
        through ``request.memo`` (see ``gateway.server.ParsedHead``), and the
        upstream client encodes them once (``UpstreamPool.request``).
        """
        memo: dict[Any, Any] | None = getattr(request, "memo", None)
        key = ("upstream_fields", json_body)
        if memo is not None:
            cached: tuple[tuple[str, str], ...] | None = memo.get(key)
            if cached is not None:
                return cached
        fields = forward_request_headers(request.headers)
        if json_body and media_type in ("", "text/plain"):
            fields = [(n, v) for n, v in fields if n.lower() != "content-type"]
            fields.append(("Content-Type", "application/json"))
        fields.append(("X-Forwarded-For", self.forwarded_for(request)))
        fields.append(("X-Forwarded-Proto", request.scheme))
        shared = tuple(fields)
        if memo is not None:
            memo[key] = shared
        return shared

    async def _token_rejected(
        self,
        upstream: UpstreamResponse,
        principal: Principal,
        token: str,
        log: RequestLog,
    ) -> str | bytes | None:
        """Decide whether to retry a request whose injected token Misskey rejected.

        Returns the new token to retry with when the store now contains a
        different one. Otherwise returns the body read to inspect the error
        (to be relayed as is), or None when nothing was read.
        """
        if upstream.status != 401:
            return None
        try:
            error_body = await upstream.read_body(MAX_ERROR_BODY)
        except BodyReadError as error:
            upstream.release()
            raise UpstreamUnavailable() from error
        if error_body is None or not _is_authentication_failed(error_body):
            return error_body

        # The stored token was rotated after it was cached, or was revoked in
        # Misskey: read it again, bypassing the cache.
        self._store.invalidate(principal.subject)
        try:
            fresh = await self._store.get_token(principal.subject)
        except BaseException:
            # The error response replaces the upstream's, which is not relayed.
            upstream.release()
            raise
        if fresh is None or fresh == token:
            log.fields["token_rejected"] = True
            return error_body
        log.fields["retried"] = True
        return fresh

    def _with_token(
        self, headers: list[tuple[str, str]], body: JsonBody | None, token: str | None
    ) -> tuple[list[tuple[str, str]], bytes | None]:
        """Return the headers and body to forward, with the token where it goes.

        With ``upstream.token_transport = "header"`` the token travels as
        ``Authorization: Bearer`` (Misskey 13.14 and newer read it before
        ``i``) and every ``i`` is removed from the body; otherwise it is the
        body's ``i``.
        """
        if not self._token_in_header:
            forwarded = rewrite_json_body(body, token) if body is not None else None
            return headers, forwarded
        forwarded = rewrite_json_body(body, None) if body is not None else None
        if token is None:
            return headers, forwarded
        return [*headers, ("Authorization", f"Bearer {token}")], forwarded

    async def _handle_upload(
        self,
        request: web.Request,
        responder: Responder,
        endpoint: str,
        policy: EndpointPolicy,
        header_credential: str | None,
        query: str,
        log: RequestLog,
    ) -> None:
        """Stream a multipart upload upstream, with ``i`` parts rewritten."""
        if endpoint not in MULTIPART_ENDPOINTS:
            raise UnsupportedMediaType(
                f"{endpoint} takes JSON; only {', '.join(sorted(MULTIPART_ENDPOINTS))} "
                "takes multipart/form-data."
            )
        self._reject_compressed(request)
        limit = self._settings.server.max_upload_size
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(
                f"The upload is larger than {limit} bytes.", {"limit": limit}
            )
        boundary = parse_boundary(request.headers.get("Content-Type", ""))
        rewriter = MultipartRewriter(
            boundary,
            request.content.iter_any(),
            limit,
            idle_timeout=self._settings.server.client_body_timeout,
        )
        try:
            await self._relay_upload(
                request,
                responder,
                endpoint,
                policy,
                header_credential,
                query,
                log,
                rewriter,
            )
        finally:
            rewriter.close()

    async def _relay_upload(
        self,
        request: web.Request,
        responder: Responder,
        endpoint: str,
        policy: EndpointPolicy,
        header_credential: str | None,
        query: str,
        log: RequestLog,
        rewriter: MultipartRewriter,
    ) -> None:
        spool_limit = 0
        if header_credential is None:
            spool_limit = self._settings.server.max_spooled_upload_size
        leading = await rewriter.read_leading_fields(spool_limit)
        credential = self._pick_credential(header_credential, leading.credential)

        principal = await self._identify(credential, log)
        await self._check_rate_limit(principal)
        token = await self._authorize(policy, principal, log, fetch=True)
        log.fields["token_injected"] = token is not None
        log.fields["upload"] = True

        headers = [
            *self._upstream_fields(request, "multipart/form-data", json_body=False),
            (REQUEST_ID_HEADER, log.request_id),
        ]
        target = f"/api/{endpoint}?{query}" if query else f"/api/{endpoint}"
        upstream_started = time.perf_counter()
        # A streamed body cannot be sent twice, so a rejected token is relayed
        # as Misskey returned it, without the retry JSON requests get.
        if self._token_in_header and token is not None:
            headers.append(("Authorization", f"Bearer {token}"))
            token = None
        upstream = await self._relay.send_streaming(
            "POST", target, headers, rewriter.stream(token), log.timings
        )
        log.fields["upstream_status"] = upstream.status
        await responder.relay(upstream, {REQUEST_ID_HEADER: log.request_id})
        log.timings["upstream_ms"] = (time.perf_counter() - upstream_started) * 1000

    # Public entry points for the /streaming route (gateway.streaming), which
    # identifies and limits clients exactly like the API path.

    def header_credential(self, request: ClientRequest) -> str | None:
        """Return the Bearer credential, or None; raise when the header is invalid."""
        return self._header_credential(request)

    async def identify(
        self, credential: str | None, log: RequestLog
    ) -> Principal | None:
        """Return the principal a gateway credential names, or None for none."""
        return await self._identify(credential, log)

    async def check_rate_limit(self, principal: Principal | None) -> None:
        """Raise RateLimitExceeded when the principal is over its limit."""
        await self._check_rate_limit(principal)

    async def _check_rate_limit(self, principal: Principal | None) -> None:
        if principal is not None and self._limiter is not None:
            decision = await self._limiter.check(principal.subject)
            if not decision.allowed:
                raise RateLimitExceeded(decision.limit, decision.retry_after)

    @staticmethod
    def _reject_compressed(request: ClientRequest) -> None:
        if request.headers.get("Content-Encoding", "identity").lower() != "identity":
            # A compressed body cannot be checked or rewritten without
            # inflating it, which the gateway does not do.
            raise UnsupportedMediaType("Compressed request bodies are not supported.")

    async def _read_body(self, request: ClientRequest, media_type: str) -> bytes:
        if media_type not in JSON_MEDIA_TYPES and not media_type.endswith("+json"):
            raise UnsupportedMediaType(
                f"Unsupported content type {media_type!r}; send application/json."
            )
        self._reject_compressed(request)

        limit = self._max_body_size
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(
                f"The request body is larger than {limit} bytes.", {"limit": limit}
            )
        try:
            if not isinstance(request, web.Request):
                # The lean server applies server.client_body_timeout itself.
                return await request.read()
            # The application's client_max_size is the same limit, so a
            # chunked body is refused as soon as it grows past it.
            async with asyncio.timeout(self._settings.server.client_body_timeout):
                return await request.read()
        except TimeoutError:
            raise RequestTimeout(
                "The request body did not arrive within "
                f"{self._settings.server.client_body_timeout:g} seconds."
            ) from None
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(
                f"The request body is larger than {limit} bytes.", {"limit": limit}
            ) from None

    @staticmethod
    def _header_credential(request: ClientRequest) -> str | None:
        values = request.headers.getall("Authorization", [])
        if not values:
            return None
        if len(values) > 1:
            raise InvalidRequest("The request has more than one Authorization header.")
        scheme, _, credential = values[0].strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise AuthenticationFailed(
                "The Authorization header must be 'Bearer' "
                "followed by a gateway credential."
            )
        return credential

    @staticmethod
    def _body_credential(body: JsonBody) -> str | None:
        value = body.credential
        if value is None:
            # Misskey treats "i": null as no token at all.
            return None
        if not isinstance(value, str):
            raise InvalidRequest("The 'i' field must be a string.", {"param": "i"})
        return value

    @staticmethod
    def _pick_credential(header: str | None, field_value: str | None) -> str | None:
        if (
            header is not None
            and field_value is not None
            and not hmac.compare_digest(header.encode(), field_value.encode())
        ):
            raise InvalidRequest(
                "The Authorization header and the 'i' field hold different credentials."
            )
        return header if header is not None else field_value

    async def _identify(
        self, credential: str | None, log: RequestLog
    ) -> Principal | None:
        if credential is None:
            log.fields["principal"] = None
            return None
        if looks_like_api_key(credential):
            log.fields["credential_type"] = "api_key"
            principal = await self._identify_api_key(credential)
        else:
            log.fields["credential_type"] = "jwt"
            verifier = self._verifier or await self._load_verifier()
            if isinstance(verifier, JwksVerifier):
                principal = await verifier.verify_async(credential)
            else:
                principal = verifier.verify(credential)
            if principal.jwt_id is not None and await self._store.is_jwt_id_revoked(
                principal.jwt_id
            ):
                raise AuthenticationFailed("The credential has been revoked.")
        log.fields["principal"] = principal.subject
        return principal

    async def _identify_api_key(self, key: str) -> Principal:
        if not API_KEY_PATTERN.fullmatch(key):
            raise AuthenticationFailed("The API key is malformed.")
        digest = digest_key(key)
        record = await self._store.get_api_key(digest)
        if record is None or not matches(record, digest):
            raise AuthenticationFailed("The API key is unknown or revoked.")
        return Principal(subject=record.principal, scopes=parse_scope(record.scope))

    async def _load_verifier(self) -> JwtVerifier:
        jwt_settings = self._settings.jwt
        key: str | bytes
        if jwt_settings.jwks_url:
            key_set = JwksKeySet(
                jwt_settings.jwks_url,
                jwt_settings.algorithms,
                jwt_settings.jwks_cache_seconds,
                jwt_settings.jwks_refetch_interval,
            )
            self._verifier = JwksVerifier(jwt_settings, key_set)
            return self._verifier
        if jwt_settings.public_key_file:
            key = read_public_key(jwt_settings)
        elif jwt_settings.secret:
            key = jwt_settings.secret
        else:
            key = await self._store.jwt_secret()
        self._verifier = JwtVerifier(jwt_settings, key)
        return self._verifier

    async def _authorize(
        self,
        policy: EndpointPolicy,
        principal: Principal | None,
        log: RequestLog,
        fetch: bool,
    ) -> str | None:
        """Return the token to inject, None to forward anonymously, or raise.

        With ``fetch`` false the checks still run but no token is read.
        """
        if policy.mode is Mode.NONE:
            return None
        if principal is None:
            if policy.mode is Mode.REQUIRED:
                raise CredentialRequired()
            return None
        if not principal.allows(policy.kind):
            raise PermissionDenied(info={"kind": policy.kind})
        if not fetch:
            return None

        started = time.perf_counter()
        token = await self._store.get_token(principal.subject)
        log.timings["store_ms"] = (time.perf_counter() - started) * 1000
        if token is None and policy.mode is Mode.REQUIRED:
            raise CredentialRequired(
                "Credential required. No Misskey token is stored for this principal."
            )
        return token


def _media_type(request: ClientRequest) -> str:
    """Return the request's media type, or "" when it sent no Content-Type."""
    if "Content-Type" not in request.headers:
        return ""
    return request.content_type.lower()


def _is_authentication_failed(body: bytes) -> bool:
    """Return whether a Misskey error body reports a rejected token."""
    try:
        document = json.loads(body)
    except ValueError:
        return False
    if not isinstance(document, dict):
        return False
    error = document.get("error")
    return isinstance(error, dict) and error.get("code") == "AUTHENTICATION_FAILED"
