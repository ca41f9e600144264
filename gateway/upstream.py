"""The connection to the Misskey server: pooled client, header filtering, relay."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Iterable, Mapping

from aiohttp import web
from multidict import CIMultiDict, MultiMapping

from gateway.config import UpstreamSettings
from gateway.upstream_pool import BodyReadError, UpstreamPool, UpstreamResponse

# RFC 9110 section 7.6.1 connection-specific fields, plus the legacy
# Keep-Alive and Proxy-Connection that some clients still send.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Client credentials, and fields the gateway sets itself. Names are compared
# after lowercasing and mapping "_" to "-", because some servers treat the
# two spellings alike.
DROPPED_REQUEST_HEADERS = HOP_BY_HOP | {
    "authorization",
    "cookie",
    "host",
    "content-length",
    "expect",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "x-request-id",
}
DROPPED_RESPONSE_HEADERS = HOP_BY_HOP | {"content-length"}


def create_pool(settings: UpstreamSettings) -> UpstreamPool:
    """Create the one pooled upstream client of a gateway process."""
    return UpstreamPool(
        settings.url,
        max_connections=settings.max_connections,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        idle_timeout=settings.idle_timeout,
    )


# Normalised spellings of header names seen so far; names repeat on every
# request, and the size bound keeps clients from growing it without end.
_normal_names: dict[str, str] = {}
MAX_NORMAL_NAMES = 1024


def _normal(name: str) -> str:
    normal = _normal_names.get(name)
    if normal is None:
        normal = name.lower().replace("_", "-")
        if len(_normal_names) < MAX_NORMAL_NAMES:
            _normal_names[name] = normal
    return normal


def _connection_tokens(values: Iterable[str]) -> set[str]:
    """Return the header names listed in Connection header values."""
    names: set[str] = set()
    for value in values:
        names.update(
            _normal(token.strip()) for token in value.split(",") if token.strip()
        )
    return names


def forward_request_headers(headers: MultiMapping[str]) -> list[tuple[str, str]]:
    """Return the client's headers without credentials and hop-by-hop fields."""
    listed = headers.getall("Connection", ())
    dropped = DROPPED_REQUEST_HEADERS
    if listed:
        dropped = dropped | _connection_tokens(listed)
    known = _normal_names.get
    return [
        (name, value)
        for name, value in headers.items()
        if (known(name) or _normal(name)) not in dropped
    ]


def response_fields(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Return the upstream's header fields without hop-by-hop fields."""
    kept: list[tuple[str, str]] = []
    listed: list[str] = []
    known = _normal_names.get
    for name, value in headers:
        normal = known(name) or _normal(name)
        if normal == "connection":
            listed.append(value)
        elif normal not in DROPPED_RESPONSE_HEADERS:
            kept.append((name, value))
    if not listed:
        return kept
    named = _listed_names(tuple(listed))
    if not named:
        return kept
    return [(name, value) for name, value in kept if _normal(name) not in named]


@functools.lru_cache(maxsize=64)
def _listed_names(values: tuple[str, ...]) -> frozenset[str]:
    """Return the fields that Connection values name beyond those dropped anyway.

    Upstreams send the same Connection value on every response (usually
    "keep-alive", which names nothing more), so the result is cached.
    """
    return frozenset(_connection_tokens(values) - DROPPED_RESPONSE_HEADERS)


def forward_response_headers(headers: list[tuple[str, str]]) -> CIMultiDict[str]:
    """Return the upstream's headers without hop-by-hop fields, for aiohttp.

    Field values arrive decoded as latin-1, and aiohttp encodes them as UTF-8,
    so a UTF-8 value is decoded as such to reach the client byte for byte.
    """
    return CIMultiDict(
        (name, value if value.isascii() else _utf8_value(value))
        for name, value in response_fields(headers)
    )


def _utf8_value(value: str) -> str:
    raw = value.encode("latin-1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # NOTE: aiohttp can only write UTF-8, so these bytes reach the client
        # re-encoded; the lean server relays them unchanged.
        return value


class Relay:
    """One request to the upstream, relayed back to the client as it streams."""

    def __init__(self, pool: UpstreamPool):
        self._pool = pool

    async def send(
        self,
        method: str,
        path_and_query: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        timings: dict[str, float],
        shared: tuple[tuple[str, str], ...] = (),
    ) -> UpstreamResponse:
        """Send the request upstream; return once the response headers arrived.

        ``shared`` are fields sent before ``headers`` that many requests share
        (see ``UpstreamPool.request``).
        Raises UpstreamUnavailable or UpstreamTimeout when no response came.
        The caller must pass the result to ``respond`` or release it.
        """
        started = time.perf_counter()
        upstream = await self._pool.request(
            method, path_and_query, headers, body, shared
        )
        timings["upstream_headers_ms"] = (time.perf_counter() - started) * 1000
        return upstream

    async def send_streaming(
        self,
        method: str,
        path_and_query: str,
        headers: list[tuple[str, str]],
        body: AsyncIterator[bytes],
        timings: dict[str, float],
    ) -> UpstreamResponse:
        """Send a request with a streamed body (``UpstreamPool.request_streaming``)."""
        started = time.perf_counter()
        upstream = await self._pool.request_streaming(
            method, path_and_query, headers, body
        )
        timings["upstream_headers_ms"] = (time.perf_counter() - started) * 1000
        return upstream

    async def respond(
        self,
        request: web.Request,
        upstream: UpstreamResponse,
        extra_response_headers: Mapping[str, str],
        prefetched_body: bytes | None = None,
    ) -> web.StreamResponse:
        """Relay an upstream response to the client, streaming its body.

        ``prefetched_body`` is the whole body when the caller already read it.
        Once the response has started, failures end the client connection.
        """
        method = request.method
        try:
            response_headers = forward_response_headers(upstream.headers)
            response_headers.update(extra_response_headers)
            complete_body = prefetched_body
            if complete_body is None:
                complete_body = upstream.body_if_complete()
            if complete_body is not None:
                # The whole response is here: aiohttp sends head and body in
                # one write.
                response: web.StreamResponse = web.Response(
                    status=upstream.status,
                    reason=upstream.reason or None,
                    headers=response_headers,
                    body=complete_body if method != "HEAD" else None,
                )
                if method == "HEAD" and upstream.content_length is not None:
                    response.headers["Content-Length"] = str(upstream.content_length)
            else:
                response = web.StreamResponse(
                    status=upstream.status,
                    reason=upstream.reason or None,
                    headers=response_headers,
                )
                if upstream.content_length is not None:
                    response.content_length = upstream.content_length
                await self._stream_body(request, upstream, response)
        finally:
            upstream.release()
        return response

    async def _stream_body(
        self,
        request: web.Request,
        upstream: UpstreamResponse,
        response: web.StreamResponse,
    ) -> None:
        await response.prepare(request)
        try:
            async for chunk in upstream.iter_body():
                try:
                    await response.write(chunk)
                except ConnectionResetError as error:
                    raise ClientDisconnected() from error
        except BodyReadError as error:
            # The status line is already sent, so the only honest signal left
            # is to cut the connection before the body is complete.
            if request.transport is not None:
                request.transport.abort()
            raise UpstreamBodyFailed(str(error)) from error
        try:
            await response.write_eof()
        except ConnectionResetError as error:
            raise ClientDisconnected() from error


class UpstreamBodyFailed(Exception):
    """The upstream failed while its body was relayed; the client was cut off."""


class ClientDisconnected(Exception):
    """The client closed its connection while the response was relayed."""
