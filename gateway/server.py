"""The gateway's HTTP server: a lean HTTP/1.1 path for JSON calls, aiohttp for the rest.

aiohttp's server spends more CPU time per request than the gateway's whole
request path. Most traffic is one kind of request, ``POST /api/<endpoint>``
with a small JSON body, so each connection starts on ``FrontProtocol``, which
parses request heads with httptools (llhttp) and serves such plain requests
through ``ApiProxy.serve``, the same request path aiohttp's handler runs.

A request that is not plain is another method or path, an upload, a
WebSocket upgrade, a chunked or compressed body, or anything unusual. The
first such request hands the connection over to aiohttp's own protocol,
together with every byte not yet served. aiohttp then serves that request and
the rest of the connection, so everything but plain requests keeps aiohttp's
behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
from collections.abc import Mapping
from email.utils import formatdate
from http import HTTPStatus
from types import MappingProxyType
from typing import Any, cast

import httptools
import structlog
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict

from gateway.app import PROXY_KEY
from gateway.config import Settings
from gateway.deadline import Deadline
from gateway.errors import GatewayError
from gateway.http_heads import length_value, split_content_length
from gateway.proxy import (
    JSON_MEDIA_TYPES,
    ApiProxy,
    closes_connection,
    error_content,
)
from gateway.upstream import ClientDisconnected, UpstreamBodyFailed, response_fields
from gateway.upstream_pool import BodyReadError, UpstreamResponse

logger = structlog.get_logger("gateway.server")

# A plain request target: /api/ and an endpoint name without dot segments,
# percent-escapes, empty segments or a trailing slash, then an optional query
# of visible ASCII without "#". The path is then the same whether read raw or
# normalised, as aiohttp's router reads it.
PLAIN_TARGET = re.compile(r"/api/[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*(?:\?[!-\"$-~]*)?")
# A media type without parameters, as in "application/json".
MEDIA_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")
# Request header fields that make a request not plain: their handling is
# aiohttp's (100-continue, upgrades, chunked and compressed bodies).
NOT_PLAIN_FIELDS = frozenset(
    {"transfer-encoding", "expect", "upgrade", "content-encoding"}
)
# A head longer than this, or with more fields, goes to aiohttp, which applies
# its own limits (8190 bytes per line and 128 fields by default).
MAX_PLAIN_HEAD = 8190
MAX_PLAIN_FIELDS = 100
# Bytes buffered from a client while a request is in progress before the
# server stops reading from it.
MAX_BUFFERED = 256 * 1024
# Statuses whose responses have no body (RFC 9110 sections 6.4.1 and 15.3.5).
NO_BODY_STATUSES = frozenset({204, 304})
# Fields the server writes itself from the body it sends.
FRAMING_FIELDS = frozenset({"content-length", "transfer-encoding"})
EMPTY_FIELDS: Mapping[str, str] = MappingProxyType({})


class FastRequest:
    """A plain client request, with the parts ``ApiProxy.serve`` reads."""

    __slots__ = (
        "raw_path",
        "headers",
        "remote",
        "content_length",
        "content_type",
        "keep_alive",
        "body_timeout",
        "memo",
        "_body",
        "_body_arrived",
        "_lost",
    )

    method = "POST"
    scheme = "http"

    def __init__(
        self,
        raw_path: str,
        headers: CIMultiDict[str],
        remote: str | None,
        content_length: int,
        content_type: str,
        keep_alive: bool,
        body_timeout: float,
        memo: dict[Any, Any] | None = None,
    ):
        self.raw_path = raw_path
        self.headers = headers
        self.remote = remote
        self.content_length = content_length
        self.content_type = content_type
        self.keep_alive = keep_alive
        self.body_timeout = body_timeout
        # What the request path derived from an earlier request with the
        # same head on this connection, and may reuse; shared between them.
        self.memo = memo
        self._body: bytes | None = None
        self._body_arrived: asyncio.Future[None] | None = None
        self._lost = False

    @property
    def body_complete(self) -> bool:
        return self._body is not None

    def set_body(self, body: bytes) -> None:
        self._body = body
        if self._body_arrived is not None and not self._body_arrived.done():
            self._body_arrived.set_result(None)

    def body_lost(self) -> None:
        """End a wait for the body: the client closed the connection."""
        self._lost = True
        if self._body_arrived is not None and not self._body_arrived.done():
            self._body_arrived.set_exception(ClientDisconnected())

    async def read(self) -> bytes:
        """Return the body, waiting up to ``body_timeout`` for the rest of it.

        Raises TimeoutError when the body does not arrive in time.
        """
        if self._body is None:
            if self._lost:
                raise ClientDisconnected()
            if self._body_arrived is None:
                self._body_arrived = asyncio.get_running_loop().create_future()
            async with asyncio.timeout(self.body_timeout):
                await self._body_arrived
        if self._body is None:
            raise RuntimeError("the body future finished without a body")
        return self._body


class ParsedHead:
    """The parse of a plain request head, kept to parse the next head faster.

    A client on a keep-alive connection sends nearly the same head with every
    call: the same target or a few, the same credential, the same content
    type; often only Content-Length differs. ``key`` is the head without the
    Content-Length value, and a later head with the same key is the same
    request head but for that value, so it needs no parsing but of the value.
    """

    __slots__ = (
        "key",
        "prefix",
        "target",
        "fields",
        "length_index",
        "media_type",
        "keep_alive",
        "memo",
    )

    def __init__(
        self,
        key: bytes,
        prefix: bytes,
        target: str,
        fields: list[tuple[str, str]],
        length_index: int,
        media_type: str,
        keep_alive: bool,
    ):
        self.key = key
        # The head up to the Content-Length value: a quick first check.
        self.prefix = prefix
        self.target = target
        self.fields = fields
        self.length_index = length_index
        self.media_type = media_type
        self.keep_alive = keep_alive
        # Given to every request with this head, as ``FastRequest.memo``.
        self.memo: dict[Any, Any] = {}


class FastResponder:
    """Responder that writes HTTP/1.1 responses to a ``FrontProtocol``."""

    __slots__ = ("status", "keep_alive", "_connection")

    def __init__(self, connection: FrontProtocol, keep_alive: bool):
        self.status: int | None = None
        self.keep_alive = keep_alive
        self._connection = connection

    async def relay(
        self,
        upstream: UpstreamResponse,
        extra_headers: Mapping[str, str],
        prefetched: bytes | None = None,
    ) -> None:
        """Relay an upstream response, in one write when its body is here."""
        try:
            memo = upstream.memo
            fields = memo.get("fields") if memo is not None else None
            if fields is None:
                fields = response_fields(upstream.headers)
                if memo is not None:
                    memo["fields"] = fields
            status = upstream.status
            body = prefetched if prefetched is not None else upstream.body_if_complete()
            if body is not None:
                self._write_head(
                    status,
                    upstream.reason,
                    fields,
                    len(body),
                    body,
                    extra_headers,
                    memo,
                )
            else:
                await self._stream(upstream, status, fields, extra_headers)
        finally:
            upstream.release()

    def error(
        self, error: GatewayError, request_id: str, extra_headers: Mapping[str, str]
    ) -> None:
        """Respond with the error envelope, or cut the connection if too late."""
        if self.status is not None:
            # The status line of another response is already out.
            self._connection.abort()
            return
        body, headers = error_content(error, request_id)
        if closes_connection(error):
            self.keep_alive = False
        fields = list(headers.items())
        self._write_head(error.status, "", fields, len(body), body, extra_headers)

    def _write_head(
        self,
        status: int,
        reason: str,
        fields: list[tuple[str, str]],
        length: int | None,
        body: bytes = b"",
        extra: Mapping[str, str] = EMPTY_FIELDS,
        memo: dict[Any, Any] | None = None,
    ) -> None:
        """Write the status line, ``fields`` and ``extra``, and ``body`` with them.

        A field of ``extra`` replaces those of ``fields`` with the same name.
        The framing and default fields follow aiohttp's responses. ``memo``
        keeps the lines of ``fields`` for responses with the same fields.
        """
        self.status = status
        if self._connection.closing:
            self.keep_alive = False
        skipped = _skipped_fields(tuple(extra)) if extra else FRAMING_FIELDS
        key = ("lines", skipped)
        cached_lines = memo.get(key) if memo is not None else None
        if cached_lines is None:
            cached_lines = _field_lines(fields, skipped)
            if memo is not None:
                memo[key] = cached_lines
        field_lines, names = cached_lines
        lines = [f"HTTP/1.1 {status} {reason or _reason(status)}", *field_lines]
        present = set(names)
        for name, value in extra.items():
            lowered = name.lower()
            if lowered in FRAMING_FIELDS:
                continue
            present.add(lowered)
            lines.append(f"{name}: {value}")
        if status in NO_BODY_STATUSES or status < 200:
            body = b""
        else:
            if length is None:
                lines.append("Transfer-Encoding: chunked")
            else:
                lines.append(f"Content-Length: {length}")
            if length != 0 and "content-type" not in present:
                lines.append("Content-Type: application/octet-stream")
        if "date" not in present:
            lines.append(f"Date: {http_date()}")
        if "server" not in present:
            lines.append(f"Server: {SERVER_SOFTWARE}")
        if not self.keep_alive and "connection" not in present:
            lines.append("Connection: close")
        lines.append("\r\n")
        self._connection.write("\r\n".join(lines).encode("latin-1") + body)

    async def _stream(
        self,
        upstream: UpstreamResponse,
        status: int,
        fields: list[tuple[str, str]],
        extra: Mapping[str, str],
    ) -> None:
        """Write the body as it arrives: with its length if known, else chunked."""
        length = upstream.content_length
        chunked = length is None and status not in NO_BODY_STATUSES and status >= 200
        self._write_head(status, upstream.reason, fields, length, b"", extra)
        connection = self._connection
        try:
            async for chunk in upstream.iter_body():
                if not chunk:
                    continue
                if chunked:
                    connection.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                else:
                    connection.write(chunk)
                await connection.drain()
        except BodyReadError as error:
            # The status line is already sent, so the only honest signal left
            # is to cut the connection before the body is complete.
            connection.abort()
            raise UpstreamBodyFailed(str(error)) from error
        if chunked:
            connection.write(b"0\r\n\r\n")


def _field_lines(
    fields: list[tuple[str, str]], skipped: frozenset[str]
) -> tuple[list[str], frozenset[str]]:
    """Return the lines of ``fields`` not in ``skipped``, and their lowered names."""
    lines = []
    names = set()
    for name, value in fields:
        lowered = name.lower()
        if lowered in skipped:
            continue
        names.add(lowered)
        lines.append(f"{name}: {value}")
    return lines, frozenset(names)


@functools.lru_cache(maxsize=16)
def _skipped_fields(extra_names: tuple[str, ...]) -> frozenset[str]:
    """Return the names of fields not written when ``extra_names`` are added.

    The gateway adds the same few names (X-Request-Id, CORS fields) to every
    response, so the result is cached.
    """
    return FRAMING_FIELDS | {name.lower() for name in extra_names}


_date_second = 0
_date_text = ""


def http_date() -> str:
    """Return the current time as an HTTP date, formatted once per second."""
    global _date_second, _date_text  # noqa: PLW0603 - a one-entry cache
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_text = formatdate(now, usegmt=True)
    return _date_text


def _crlf_only(data: bytes | bytearray) -> bool:
    """Return whether every CR and LF in ``data`` is part of a CRLF pair."""
    pairs = data.count(b"\r\n")
    return data.count(b"\n") == pairs and data.count(b"\r") == pairs


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


# A request and the responder for its response, as the worker task takes them.
Exchange = tuple[FastRequest, FastResponder]


class FrontProtocol(asyncio.Protocol):
    """One client connection: plain requests served here, the rest by aiohttp."""

    def __init__(self, front: FrontServer):
        self._front = front
        self._loop = front.loop
        self._transport: asyncio.Transport | None = None
        self._remote: str | None = None
        self._buffer = bytearray()
        self._request: FastRequest | None = None
        self._body_end = 0
        # The connection's worker task serves one request after another, so
        # a request costs no task of its own. While idle it waits for
        # ``_wake``; a request that arrives while it runs waits in ``_queued``.
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[Exchange | None] | None = None
        self._queued: Exchange | None = None
        self._idle_deadline = Deadline(self._loop, self._idle_timeout)
        self._reading_paused = False
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        # Set by a graceful stop: close once the response in progress is out.
        self._stopping = False
        # Set when the client has sent everything it will send.
        self._eof = False
        self._closed = False
        # Set while the rest of a body is read after its response was sent.
        self._discarding = False
        self._discard_timer: asyncio.TimerHandle | None = None
        # Keep-alive of the head being parsed.
        self._keep_alive = False
        self._parser: httptools.HttpRequestParser | None = None
        # The last plain head, to recognise the next one (see ParsedHead).
        self._last_head: ParsedHead | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, (list, tuple)) and peer:
            self._remote = str(peer[0])
        self._front.connections.add(self)
        self._start_idle_timer()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        request = self._request
        if request is not None:
            # A request is in progress: complete its body, keep the rest.
            self._take_body()
            if (
                self._request is request
                and request.body_complete
                and len(self._buffer) > MAX_BUFFERED
                and not self._reading_paused
            ):
                # Pipelined requests pile up: read again once this one is done.
                self._reading_paused = True
                if self._transport is not None:
                    self._transport.pause_reading()
            return
        self._next_request()

    def eof_received(self) -> bool | None:
        # Requests already buffered still get their responses; then the
        # connection closes.
        self._eof = True
        request = self._request
        if request is None or self._discarding:
            self.close()
        elif not request.body_complete:
            # The rest of the body can no longer arrive.
            request.body_lost()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._end_worker()
        self._front.connections.discard(self)
        self._stop_idle_timer()
        if self._discard_timer is not None:
            self._discard_timer.cancel()
        if self._request is not None and not self._request.body_complete:
            self._request.body_lost()
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionResetError("client disconnected"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # Writing, for FastResponder

    def write(self, data: bytes) -> None:
        if self._closed or self._transport is None:
            raise ClientDisconnected()
        self._transport.write(data)

    async def drain(self) -> None:
        """Wait until the client has taken enough of the written bytes."""
        if self._closed:
            raise ClientDisconnected()
        if not self._write_paused:
            return
        self._drained = self._loop.create_future()
        try:
            await self._drained
        except ConnectionResetError as error:
            raise ClientDisconnected() from error
        finally:
            self._drained = None

    def abort(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        if not self._closed and self._transport is not None:
            self._closed = True
            self._transport.close()

    @property
    def busy(self) -> bool:
        """Whether a response is still being made."""
        return self._request is not None and not self._discarding

    @property
    def closing(self) -> bool:
        """Whether the connection closes after the response in progress."""
        return self._stopping or (self._eof and not self._buffer)

    @property
    def closed(self) -> bool:
        return self._closed

    def close_when_idle(self) -> None:
        """Close now if no request is in progress, else after its response."""
        self._stopping = True
        if not self.busy:
            self.close()

    def stop(self) -> None:
        """Cut the connection and cancel the request in progress."""
        if self._task is not None:
            self._task.cancel()
        self.abort()

    # httptools callback, while a head is parsed

    def on_headers_complete(self) -> None:
        # Read here: once a message without a body is complete, llhttp has
        # reset its flags for the next one.
        if self._parser is not None:
            self._keep_alive = self._parser.should_keep_alive()

    # Reading requests

    def _next_request(self) -> None:
        """Start the next buffered request, or hand it to aiohttp if not plain."""
        if self._stopping or self._closed:
            return
        buffer = self._buffer
        head_end = buffer.find(b"\r\n\r\n")
        if head_end < 0:
            if self._eof:
                # No more bytes will come to complete this head.
                self.close()
                return
            # A CRLF may be split between two reads.
            partial = buffer[:-1] if buffer.endswith(b"\r") else buffer
            if len(buffer) > MAX_PLAIN_HEAD or not _crlf_only(partial):
                self._hand_off()
            return
        head_end += 4
        if head_end > MAX_PLAIN_HEAD:
            self._hand_off()
            return
        head = bytes(buffer[:head_end])
        request = self._reuse_head(head) or self._parse_head(head)
        if request is None:
            self._hand_off()
            return
        self._cancel_idle_timer()
        self._request = request
        self._body_end = head_end + request.content_length
        self._take_body()
        responder = FastResponder(self, request.keep_alive)
        self._hand_to_worker(request, responder)

    def _reuse_head(self, head: bytes) -> FastRequest | None:
        """Return the request if ``head`` is the last plain head but for its length."""
        last = self._last_head
        if last is None or not head.startswith(last.prefix):
            # A head that differs usually does so before the Content-Length value.
            return None
        split = split_content_length(head)
        if split is None or split[0] != last.key:
            return None
        value = split[1]
        # Everything else was checked with the last head; the value is still
        # to be checked as ``_parse_head`` would.
        content_length = length_value(value)
        if content_length is None or content_length > self._front.max_body_size:
            return None
        fields = last.fields.copy()
        name = fields[last.length_index][0]
        fields[last.length_index] = (name, value.decode("ascii"))
        return FastRequest(
            last.target,
            CIMultiDict(fields),
            self._remote,
            content_length,
            last.media_type,
            last.keep_alive,
            self._front.body_timeout,
            last.memo,
        )

    def _parse_head(self, head: bytes) -> FastRequest | None:
        """Return the request a head starts, or None if it is not plain.

        llhttp checks the syntax of the head; the fields are then split here,
        which costs less than a callback per field.
        """
        if not head.isascii() or not _crlf_only(head):
            return None
        self._keep_alive = False
        parser = self._parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return None
        finally:
            self._parser = None

        # The head ends with an empty line, so the last two items are empty.
        lines = head.decode("ascii").split("\r\n")[:-2]
        request_line = lines[0].split(" ")
        if len(request_line) != 3 or len(lines) > MAX_PLAIN_FIELDS + 1:
            return None
        method, target, version = request_line
        if method != "POST" or version != "HTTP/1.1":
            return None
        if PLAIN_TARGET.fullmatch(target) is None:
            return None

        fields: list[tuple[str, str]] = []
        content_length: int | None = None
        length_index = 0
        media_type = ""
        hosts = 0
        for line in lines[1:]:
            if line[0] in " \t":
                # An obsolete folded line, which aiohttp rejects.
                return None
            name, _, value = line.partition(":")
            value = value.strip(" \t")
            lowered = name.lower()
            if lowered in NOT_PLAIN_FIELDS:
                return None
            if lowered == "host":
                hosts += 1
            elif lowered == "content-length":
                if content_length is not None or not value.isdigit():
                    return None
                content_length = int(value)
                length_index = len(fields)
            elif lowered == "content-type":
                if media_type:
                    return None
                media_type = value.split(";", 1)[0].strip().lower()
                if MEDIA_TYPE.fullmatch(media_type) is None:
                    return None
            fields.append((name, value))
        if content_length is None or content_length > self._front.max_body_size:
            return None
        if hosts != 1:
            # RFC 9112 section 3.2 requires one Host field; aiohttp responds 400.
            return None
        if media_type not in JSON_MEDIA_TYPES and not media_type.endswith("+json"):
            return None

        memo = None
        split = split_content_length(head)
        if split is not None:
            parsed = ParsedHead(
                split[0],
                head[: split[2]],
                target,
                fields,
                length_index,
                media_type,
                self._keep_alive,
            )
            self._last_head = parsed
            memo = parsed.memo
        return FastRequest(
            target,
            CIMultiDict(fields),
            self._remote,
            content_length,
            media_type,
            self._keep_alive,
            self._front.body_timeout,
            memo,
        )

    def _take_body(self) -> None:
        """Give the request its body once the buffer contains all of it."""
        request = self._request
        if request is None or request.body_complete:
            return
        end = self._body_end
        if len(self._buffer) < end:
            return
        start = end - request.content_length
        body = bytes(self._buffer[start:end])
        del self._buffer[:end]
        request.set_body(body)
        if self._discarding:
            self._after_response()

    def _hand_to_worker(self, request: FastRequest, responder: FastResponder) -> None:
        """Have the worker task serve ``request``, starting it if there is none."""
        wake = self._wake
        if wake is not None and not wake.done():
            self._wake = None
            wake.set_result((request, responder))
        elif self._task is None or self._task.done() or wake is not None:
            # No worker, or one whose wait was cancelled and that is ending.
            self._wake = None
            self._task = self._loop.create_task(self._work(request, responder))
        else:
            # Called by the worker itself, which serves this next.
            self._queued = (request, responder)

    def _end_worker(self) -> None:
        """Let an idle worker task return: no request will come."""
        wake = self._wake
        self._wake = None
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _work(self, request: FastRequest, responder: FastResponder) -> None:
        while True:
            await self._serve(request, responder)
            queued = self._queued
            if queued is not None:
                self._queued = None
                request, responder = queued
                continue
            if self._closed:
                return
            wake = self._wake = self._loop.create_future()
            try:
                handed = await wake
            finally:
                # A cancelled wait leaves nothing behind for the next request.
                if self._wake is wake:
                    self._wake = None
            if handed is None:
                return
            request, responder = handed

    async def _serve(self, request: FastRequest, responder: FastResponder) -> None:
        proxy = self._front.proxy
        try:
            await proxy.serve(request, responder)
            # Like aiohttp: no next request until a slow client has taken
            # most of this response, so pipelined responses cannot pile up.
            if self._write_paused or self._closed:
                await self.drain()
        except (ClientDisconnected, UpstreamBodyFailed):
            self.abort()
        except Exception:
            logger.exception("connection.failed")
            self.abort()
        self._request_done(request, responder)

    def _request_done(self, request: FastRequest, responder: FastResponder) -> None:
        if self._closed or self._stopping or not responder.keep_alive:
            self._request = None
            self.close()
            return
        if not request.body_complete:
            # The response went out before the body arrived. Like aiohttp,
            # read the rest of the body and drop it, so the connection stays
            # usable.
            self._discarding = True
            self._discard_timer = self._loop.call_later(
                self._front.body_timeout, self.close
            )
            return
        self._after_response()

    def _after_response(self) -> None:
        """Go on with the next request once a response and its body are done."""
        self._request = None
        self._discarding = False
        if self._discard_timer is not None:
            self._discard_timer.cancel()
            self._discard_timer = None
        if self._stopping or self._closed or (self._eof and not self._buffer):
            self.close()
            return
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
        self._start_idle_timer()
        if self._buffer:
            self._next_request()

    def _hand_off(self) -> None:
        """Pass the connection and its unread bytes to aiohttp's protocol."""
        transport = self._transport
        if transport is None or self._closed:
            return
        self._stop_idle_timer()
        self._front.connections.discard(self)
        self._closed = True
        self._end_worker()
        handler = self._front.aiohttp_protocol()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._write_paused:
            # The transport reports only changes, so tell the new protocol
            # that its buffer is already full.
            handler.pause_writing()
        if self._reading_paused:
            transport.resume_reading()
        data = bytes(self._buffer)
        self._buffer.clear()
        if data:
            handler.data_received(data)

    def _start_idle_timer(self) -> None:
        timeout = self._front.keepalive_timeout
        if timeout > 0:
            self._idle_deadline.start(timeout)

    def _cancel_idle_timer(self) -> None:
        self._idle_deadline.clear()

    def _stop_idle_timer(self) -> None:
        self._idle_deadline.stop()

    def _idle_timeout(self) -> None:
        # Like aiohttp: a connection that has not sent a whole request head
        # this long after it opened or after its last response is closed.
        if self._request is None:
            self.close()


class FrontServer:
    """Protocol factory for the listening socket, wrapping aiohttp's ``Server``.

    aiohttp's runner calls it to create each connection's protocol, and calls
    ``pre_shutdown`` and ``shutdown`` on it when the server stops. Any other
    attribute is read from aiohttp's server.
    """

    protocol_class: type[FrontProtocol] = FrontProtocol

    def __init__(self, inner: web.Server, app: web.Application, settings: Settings):
        self.loop = asyncio.get_running_loop()
        self.connections: set[FrontProtocol] = set()
        self.max_body_size: int = settings.server.max_body_size
        self.keepalive_timeout: float = settings.server.keepalive_timeout
        self.body_timeout: float = settings.server.client_body_timeout
        self._inner = inner
        self._app = app
        self._proxy: ApiProxy | None = None

    @property
    def proxy(self) -> ApiProxy:
        # The application creates the proxy when it starts, after this object.
        if self._proxy is None:
            self._proxy = self._app[PROXY_KEY]
        return self._proxy

    def __call__(self) -> FrontProtocol:
        return self.protocol_class(self)

    def aiohttp_protocol(self) -> asyncio.Protocol:
        """Create the aiohttp protocol that a connection is handed over to."""
        return self._inner()

    def pre_shutdown(self) -> None:
        """Close idle connections; busy ones close after their response."""
        for connection in list(self.connections):
            connection.close_when_idle()
        self._inner.pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - aiohttp's signature
        """Wait up to ``timeout`` seconds for requests in progress, then cut them."""
        await asyncio.gather(
            self._wait_for_requests(timeout), self._inner.shutdown(timeout)
        )

    async def _wait_for_requests(self, grace: float | None) -> None:
        deadline = None if grace is None else self.loop.time() + grace
        while any(connection.busy for connection in self.connections):
            if deadline is not None and self.loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        # Connections already closed finish sending what they wrote; those
        # still making a response after the grace period are cut.
        for connection in list(self.connections):
            if not connection.closed:
                connection.stop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class GatewayRunner(web.AppRunner):
    """aiohttp's application runner, with the lean server in front when enabled."""

    front_class: type[FrontServer] = FrontServer

    def __init__(self, app: web.Application, settings: Settings, **kwargs: Any):
        super().__init__(app, **kwargs)
        self._settings = settings

    async def _make_server(self) -> web.Server:
        inner = await super()._make_server()
        if not self._settings.server.fast_path:
            return inner
        # The runner only calls the factory and the two shutdown methods.
        return cast(web.Server, self.front_class(inner, self.app, self._settings))


def run_app(
    app: web.Application,
    settings: Settings,
    loop: asyncio.AbstractEventLoop,
    reuse_port: bool,
) -> None:
    """Serve ``app`` on the configured address until a graceful stop.

    A stop signal handler raises ``web.GracefulExit``; the listening socket is
    then closed and in-flight requests get ``server.shutdown_grace`` seconds.
    """
    main = loop.create_task(_serve(app, settings, reuse_port))
    try:
        loop.run_until_complete(main)
    except web.GracefulExit:
        pass
    finally:
        if not main.done():
            # Cancelling the serving task runs its cleanup: the graceful stop.
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError, web.GracefulExit):
                loop.run_until_complete(main)
        _cancel_remaining_tasks(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _serve(app: web.Application, settings: Settings, reuse_port: bool) -> None:
    runner = GatewayRunner(
        app,
        settings,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=settings.server.shutdown_grace,
        keepalive_timeout=settings.server.keepalive_timeout,
    )
    await runner.setup()
    try:
        site = web.TCPSite(
            runner,
            settings.server.host,
            settings.server.port,
            reuse_port=reuse_port,
        )
        await site.start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _cancel_remaining_tasks(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
