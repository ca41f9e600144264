"""The connection to the Misskey server: pooled client, header filtering, relay."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import UpstreamSettings
from gateway.errors import UpstreamTimeout, UpstreamUnavailable

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


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    reason: str | None


def _normal(name: str) -> str:
    return name.lower().replace("_", "-")


def _connection_tokens(headers: Mapping[str, str] | CIMultiDictProxy[str]) -> set[str]:
    names: set[str] = set()
    getall = getattr(headers, "getall", None)
    values: Iterable[str] = getall("Connection", []) if getall else []
    for value in values:
        names.update(
            _normal(token.strip()) for token in value.split(",") if token.strip()
        )
    return names


def forward_request_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Return the client's headers without credentials and hop-by-hop fields."""
    dropped = DROPPED_REQUEST_HEADERS | _connection_tokens(headers)
    return CIMultiDict(
        (name, value) for name, value in headers.items() if _normal(name) not in dropped
    )


def forward_response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Return the upstream's headers without hop-by-hop fields."""
    dropped = DROPPED_RESPONSE_HEADERS | _connection_tokens(headers)
    return CIMultiDict(
        (name, value) for name, value in headers.items() if _normal(name) not in dropped
    )


def create_session(settings: UpstreamSettings) -> aiohttp.ClientSession:
    """Create the one pooled upstream client of a gateway process."""
    connector = aiohttp.TCPConnector(
        limit=settings.max_connections,
        limit_per_host=settings.max_connections,
        # The upstream is one fixed host; cache its address for a minute.
        ttl_dns_cache=60,
    )
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=settings.connect_timeout,
        sock_read=settings.read_timeout,
    )
    return aiohttp.ClientSession(
        base_url=settings.url,
        connector=connector,
        timeout=timeout,
        # Bodies are relayed as sent, compressed or not; only the client's
        # own headers are forwarded.
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
        raise_for_status=False,
    )


class Relay:
    """One request to the upstream, relayed back to the client as it streams."""

    def __init__(self, session: aiohttp.ClientSession):
        self._session = session

    async def relay(
        self,
        request: web.Request,
        method: str,
        path_and_query: str,
        headers: CIMultiDict[str],
        body: bytes | None,
        extra_response_headers: Mapping[str, str],
        timings: dict[str, float],
    ) -> tuple[web.StreamResponse, int]:
        """Send the request upstream and stream the response to the client.

        Returns the client response and the upstream status. Raises
        UpstreamUnavailable or UpstreamTimeout when no response arrived; once
        the response has started, failures end the client connection instead.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            upstream = await self._session.request(
                method,
                path_and_query,
                headers=headers,
                data=body,
                allow_redirects=False,
            )
        except TimeoutError as error:
            raise UpstreamTimeout() from error
        except aiohttp.ClientError as error:
            raise UpstreamUnavailable() from error
        timings["upstream_headers_ms"] = (loop.time() - started) * 1000

        async with upstream:
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason
            )
            response.headers.extend(forward_response_headers(upstream.headers))
            response.headers.update(extra_response_headers)
            if upstream.content_length is not None and method != "HEAD":
                response.content_length = upstream.content_length
            await self._stream_body(request, upstream, response)
        timings["upstream_ms"] = (loop.time() - started) * 1000
        return response, upstream.status

    async def _stream_body(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        response: web.StreamResponse,
    ) -> None:
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                try:
                    await response.write(chunk)
                except ConnectionResetError as error:
                    raise ClientDisconnected() from error
        except (aiohttp.ClientError, TimeoutError) as error:
            # The status line is already sent, so the only honest signal left
            # is to cut the connection before the body is complete.
            if request.transport is not None:
                request.transport.abort()
            raise UpstreamBodyFailed(str(error) or type(error).__name__) from error
        try:
            await response.write_eof()
        except ConnectionResetError as error:
            raise ClientDisconnected() from error


class UpstreamBodyFailed(Exception):
    """The upstream failed while its body was relayed; the client was cut off."""


class ClientDisconnected(Exception):
    """The client closed its connection while the response was relayed."""
