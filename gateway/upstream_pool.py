"""A lean HTTP/1.1 keep-alive client for the one upstream Misskey server.

aiohttp's ClientSession costs several times more per request than the rest
of the gateway together, because it is built for any server on the web. This
client talks to one origin only: it writes each request in one call, parses
responses with httptools (llhttp), streams bodies with back-pressure, and
keeps idle connections for reuse.

A connection is reused only when its last response was read to the end and
both sides allow keep-alive. Any failure, early stop or unexpected byte closes
it, so a connection in an unknown state is never used again. Idle connections
are dropped after ``idle_timeout`` seconds, before the upstream's own
keep-alive timeout can close them under a new request (Node.js, which runs
Misskey, closes idle connections after 5 seconds by default).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httptools

from gateway.deadline import Deadline
from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.http_heads import length_value, split_content_length

# Distinct sets of shared request fields whose encoding is kept, and the
# longest encoding kept: at most about 1 MiB in all. The shared fields never
# contain a credential, because the token travels in the body or in the
# fields of each request.
MAX_ENCODED_FIELDS = 256
MAX_ENCODED_LENGTH = 2048
# Distinct response heads kept to skip parsing their repeats (see KnownHead).
# The Date field changes every second, so this is about the number of kinds
# of response an upstream sends within one second.
MAX_KNOWN_HEADS = 64
# Statuses whose responses never have a body, whatever their fields announce.
BODILESS_STATUSES = frozenset({204, 304})
# Bytes of response body buffered before the client side is read from again.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class UpstreamProtocolError(Exception):
    """The upstream sent something that is not a valid HTTP/1.1 response."""


class BodyReadError(Exception):
    """The response body could not be read to its end."""


class KnownHead:
    """A response head that llhttp parsed, kept to take its repeats without parsing.

    ``key`` (see ``gateway.http_heads``) is the head without its
    Content-Length value, which is field ``length_index`` of ``headers``.
    """

    __slots__ = ("status", "reason", "headers", "length_index", "keep_alive", "memo")

    def __init__(
        self,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        length_index: int,
        keep_alive: bool,
    ):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.length_index = length_index
        self.keep_alive = keep_alive
        # What the relay derived from these fields, shared by every response
        # with this head (as ``UpstreamResponse.memo``).
        self.memo: dict[Any, Any] = {}


class UpstreamResponse:
    """The status, headers and streamed body of one upstream response."""

    def __init__(
        self, connection: _Connection, method: str, loop: asyncio.AbstractEventLoop
    ):
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self._connection = connection
        self._head_only = method == "HEAD"
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._complete = False
        self._error: BaseException | None = None
        self._loop = loop
        self._headers_ready: asyncio.Future[None] = loop.create_future()
        self._data_waiter: asyncio.Future[None] | None = None
        self._released = False
        # Set when the upstream responded before the request body was sent in
        # full; the connection's state is then unknown.
        self.request_incomplete = False
        # Shared with earlier responses with the same head, if it was known.
        self.memo: dict[Any, Any] | None = None
        # The head without its Content-Length value, when it was looked up
        # among the known heads and not found; kept to remember it after.
        self.head_key: bytes | None = None

    @property
    def head_only(self) -> bool:
        """Whether this responds to a HEAD request, so has no body in any case."""
        return self._head_only

    @property
    def headers_arrived(self) -> bool:
        return self._headers_ready.done()

    @property
    def complete(self) -> bool:
        """Whether the whole body has arrived and is buffered."""
        return self._complete and self._error is None

    def body_if_complete(self) -> bytes | None:
        """Return the whole body when it has already arrived, else None."""
        if not self.complete:
            return None
        body = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return body

    async def read_body(self, limit: int) -> bytes | None:
        """Read the whole body if it is at most ``limit`` bytes, else return None.

        Returns None without reading when the announced length is larger.
        Raises BodyReadError if the body is cut short.
        """
        if self.content_length is not None and self.content_length > limit:
            return None
        chunks: list[bytes] = []
        size = 0
        async for chunk in self.iter_body():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                # Too large after all: keep what was read for the relay.
                self._chunks.extendleft(reversed(chunks))
                self._buffered += size
                return None
        return b"".join(chunks)

    async def iter_body(self) -> AsyncIterator[bytes]:
        """Yield the body as it arrives; raise BodyReadError if it is cut short."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._buffered <= LOW_WATER:
                    self._connection.resume_reading()
                yield chunk
                continue
            if self._error is not None:
                raise BodyReadError(str(self._error) or type(self._error).__name__)
            if self._complete:
                return
            self._data_waiter = self._loop.create_future()
            try:
                await self._data_waiter
            finally:
                self._data_waiter = None

    def discard(self) -> None:
        """Close the connection of a failed exchange whose response is not read."""
        if self._headers_ready.done() and not self._headers_ready.cancelled():
            self._headers_ready.exception()  # mark the failure as seen
        self.release()

    def release(self) -> None:
        """Return the connection to the pool, or close it if it cannot be reused."""
        if self._released:
            return
        self._released = True
        reusable = (
            self._complete
            and not self.request_incomplete
            and self._error is None
            and not self._chunks
            and not self._head_only
            and self._connection.keep_alive
        )
        self._connection.finish(reusable)

    # Callbacks from the connection's parser.

    def on_status(self, status: bytes) -> None:
        self.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self, status: int, content_length: int | None) -> None:
        self.status = status
        self.content_length = content_length
        if self._head_only:
            # llhttp would wait for the body a HEAD response announces but
            # never sends, so the message ends here and the connection closes.
            self._complete = True
        if not self._headers_ready.done():
            self._headers_ready.set_result(None)

    def delimited_by_close(self) -> bool:
        """Return whether the body, if any, ends only when the connection closes."""
        if not self._headers_ready.done() or self._complete:
            return False
        framed = self.content_length is not None or any(
            name.lower() == "transfer-encoding" for name, _ in self.headers
        )
        return not framed

    def take_known(self, known: KnownHead, length: str, body: bytes) -> None:
        """Take a whole response whose head repeats ``known`` but for its length."""
        headers = known.headers.copy()
        headers[known.length_index] = (headers[known.length_index][0], length)
        self.status = known.status
        self.reason = known.reason
        self.headers = headers
        self.content_length = len(body)
        self.memo = known.memo
        if body:
            self._chunks.append(body)
            self._buffered = len(body)
        self._complete = True
        self._headers_ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered >= HIGH_WATER:
            self._connection.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if self._complete and not self._head_only:
            return
        self._error = error
        if not self._headers_ready.done():
            self._headers_ready.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        if self._data_waiter is not None and not self._data_waiter.done():
            self._data_waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; it carries one exchange at a time."""

    def __init__(self, pool: UpstreamPool):
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = False
        self.idle_since = 0.0
        # Created for each response unless its head is known (see KnownHead).
        self._parser: httptools.HttpResponseParser | None = None
        self._response: UpstreamResponse | None = None
        self._read_deadline = Deadline(self._loop, self._timed_out)
        self._paused = False
        self._informational = False
        self._writable = asyncio.Event()
        self._writable.set()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None:
            # Bytes on an idle connection: its state is unknown, so drop it.
            self.close()
            return
        if response.complete:
            # Unrequested bytes after the whole response: the connection's
            # state is unknown, so it is not used again.
            self.keep_alive = False
            self.close()
            return
        parser = self._parser
        first = parser is None
        if parser is None:
            # The first bytes of this response, whose head may be known.
            known = self._pool.known_head(response, data)
            if known is not None:
                self._cancel_read_timer()
                self.keep_alive = known.keep_alive
                return
            parser = self._parser = httptools.HttpResponseParser(self)
        self._restart_read_timer()
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as error:
            response.fail(UpstreamProtocolError(str(error)))
            self.close()
            return
        if first and response.complete:
            self._pool.remember_head(response, data, self.keep_alive)

    def eof_received(self) -> bool | None:
        response = self._response
        if response is not None and response.delimited_by_close():
            # A body without Content-Length or chunked framing ends here.
            self.keep_alive = False
            response.on_message_complete()
        else:
            self._fail_current(
                ConnectionResetError("the upstream closed the connection")
            )
        return None

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._writable.set()
        self._read_deadline.stop()
        self._fail_current(
            exc or ConnectionResetError("the upstream closed the connection")
        )
        self._pool.forget(self)

    # httptools callbacks

    def on_message_begin(self) -> None:
        response = self._response
        if response is not None and response.complete:
            # An unrequested second message in the same read. Stopping here
            # keeps it out of the response, and the connection is then closed
            # as after any parse error.
            raise UpstreamProtocolError("bytes after the end of the response")

    def on_status(self, status: bytes) -> None:
        if self._response is not None:
            self._response.on_status(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is not None:
            self._response.on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._response is None or self._parser is None:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim response (100 Continue, 103 Early Hints): the real
            # one follows on the same connection.
            self._informational = True
            self._response.headers.clear()
            return
        self.keep_alive = self._parser.should_keep_alive()
        length = None
        for name, value in self._response.headers:
            if name.lower() == "content-length":
                length = int(value)
        self._response.on_headers_complete(status, length)

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response.on_body(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._cancel_read_timer()
        if self._response is not None:
            self._response.on_message_complete()

    # Used by the pool and the response

    def send(self, request: bytes, method: str, timed: bool = True) -> UpstreamResponse:
        if self.transport is None:
            raise UpstreamUnavailable("The upstream connection is not open.")
        self._response = UpstreamResponse(self, method, self._loop)
        self._parser = None
        self.transport.write(request)
        if timed:
            self._restart_read_timer()
        return self._response

    def start_read_timer(self) -> None:
        """Start waiting for the response, once a streamed body has been sent."""
        if self._response is not None and not self._response.headers_arrived:
            self._restart_read_timer()

    async def write_body_chunk(self, data: bytes) -> None:
        """Write one chunk of a chunked request body; wait while buffers are full."""
        if self.transport is None or self.closed:
            raise ConnectionResetError("the upstream closed the connection")
        self.transport.write(b"%x\r\n" % len(data) + data + b"\r\n")
        await self._writable.wait()
        if self.closed:
            raise ConnectionResetError("the upstream closed the connection")

    def write_raw(self, data: bytes) -> None:
        if self.transport is None or self.closed:
            raise ConnectionResetError("the upstream closed the connection")
        self.transport.write(data)

    def finish(self, reusable: bool) -> None:
        self._response = None
        self._cancel_read_timer()
        if self._paused:
            self.resume_reading()
        if reusable and not self.closed:
            self.idle_since = time.monotonic()
            self._pool.put_back(self)
        else:
            self.close()
            self._pool.release_slot()

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self._cancel_read_timer()
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
            self._restart_read_timer()

    def close(self) -> None:
        self.closed = True
        self._read_deadline.stop()
        if self.transport is not None:
            self.transport.abort()

    def _fail_current(self, error: BaseException) -> None:
        if self._response is not None:
            self._response.fail(error)

    def _restart_read_timer(self) -> None:
        self._read_deadline.start(self._pool.read_timeout)

    def _cancel_read_timer(self) -> None:
        self._read_deadline.clear()

    def _timed_out(self) -> None:
        self._fail_current(TimeoutError("the upstream did not send data in time"))
        self.close()


class UpstreamPool:
    """Keep-alive connections to one upstream origin, at most ``max_connections``."""

    def __init__(
        self,
        url: str,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
        idle_timeout: float = 4.0,
    ):
        parts = urlsplit(url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        default_port = (parts.scheme == "https" and self.port == 443) or (
            parts.scheme == "http" and self.port == 80
        )
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._all: set[_Connection] = set()
        # Encoded field lines of the shared fields of recent requests.
        self._encoded: dict[tuple[tuple[str, str], ...], str] = {}
        self._known_heads: dict[bytes, KnownHead] = {}

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        shared: tuple[tuple[str, str], ...] = (),
    ) -> UpstreamResponse:
        """Send one request and return once the response headers have arrived.

        ``shared`` are header fields sent before ``headers``: those that many
        requests have in common, such as a client's forwarded fields. Their
        encoding is kept for the next requests with the same ones.
        Raises UpstreamUnavailable when no connection can be made or the
        connection fails before the headers, and UpstreamTimeout when the
        connection or the headers take longer than the timeouts.
        """
        head = self._encode_head(method, target, headers, body, shared=shared)
        connection = await self._acquire()
        response = connection.send(head + body if body else head, method)
        return await _wait_for_headers(response)

    async def request_streaming(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: AsyncIterator[bytes],
    ) -> UpstreamResponse:
        """Send a request whose body is streamed with chunked framing.

        The body is never held in full and never retried. If the upstream
        responds before the body is complete (a 413, say), sending stops and
        that response is returned; the connection is then not reused.
        An exception raised by ``body`` itself ends the request: the
        upstream receives an incomplete body on a connection that is closed.
        """
        head = self._encode_head(method, target, headers, None, chunked=True)
        connection = await self._acquire()
        # The read timeout starts once the body is sent: an upload may take
        # longer than the upstream's silence is allowed to.
        response = connection.send(head, method, timed=False)
        try:
            async for piece in body:
                if response.headers_arrived:
                    response.request_incomplete = True
                    break
                if piece:
                    await connection.write_body_chunk(piece)
            else:
                connection.write_raw(b"0\r\n\r\n")
        except ConnectionError:
            # The upstream stopped reading; its response, if any, follows.
            response.request_incomplete = True
        except BaseException:
            response.fail(ConnectionAbortedError("the request body failed"))
            response.discard()
            raise
        connection.start_read_timer()
        return await _wait_for_headers(response)

    async def close(self) -> None:
        for connection in list(self._all):
            connection.close()
        self._idle.clear()

    def _encode_head(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        chunked: bool = False,
        shared: tuple[tuple[str, str], ...] = (),
    ) -> bytes:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host_header}"]
        if shared:
            lines.append(self._encode_shared(shared))
        lines.extend([f"{name}: {value}" for name, value in headers])
        if chunked:
            lines.append("Transfer-Encoding: chunked")
        elif body is not None:
            lines.append(f"Content-Length: {len(body)}")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("latin-1")

    def known_head(self, response: UpstreamResponse, data: bytes) -> KnownHead | None:
        """Give ``response`` the whole response in ``data`` if its head is known.

        Returns the known head, or None (and changes nothing) when ``data`` is
        not exactly a known head, a plain Content-Length and that many bytes.
        """
        if response.head_only:
            return None
        head_end = data.find(b"\r\n\r\n") + 4
        split = split_content_length(data[:head_end]) if head_end >= 4 else None
        if split is None:
            return None
        known = self._known_heads.get(split[0])
        if known is None:
            response.head_key = split[0]
            return None
        length = length_value(split[1])
        if length is None or len(data) - head_end != length:
            return None
        response.take_known(known, split[1].decode("ascii"), data[head_end:])
        return known

    def remember_head(
        self, response: UpstreamResponse, data: bytes, keep_alive: bool
    ) -> None:
        """Keep the head of a response that llhttp parsed whole from ``data``.

        Only a final response of one piece is kept: a status with a body, one
        Content-Length, no Transfer-Encoding, and ``data`` exactly the head
        and the announced body.
        """
        status = response.status
        length = response.content_length
        if (
            response.head_only
            or status < 200
            or status in BODILESS_STATUSES
            or length is None
        ):
            return
        head_end = data.find(b"\r\n\r\n") + 4
        if head_end < 4 or len(data) - head_end != length:
            return
        if not data.startswith(b"HTTP/1.1 %d " % status):
            # The first head in ``data`` is not this response's (an interim
            # response came first), or not the usual HTTP/1.1 form.
            return
        length_index = -1
        for index, (name, _) in enumerate(response.headers):
            lowered = name.lower()
            if lowered == "transfer-encoding" or (
                lowered == "content-length" and length_index >= 0
            ):
                return
            if lowered == "content-length":
                length_index = index
        # Set by the lookup in ``known_head`` on the same ``data``.
        key = response.head_key
        if length_index < 0 or key is None:
            return
        if len(self._known_heads) >= MAX_KNOWN_HEADS:
            self._known_heads.clear()
        self._known_heads[key] = KnownHead(
            status, response.reason, response.headers.copy(), length_index, keep_alive
        )

    def _encode_shared(self, shared: tuple[tuple[str, str], ...]) -> str:
        """Return the field lines of ``shared``, without the final line end."""
        encoded = self._encoded.get(shared)
        if encoded is None:
            encoded = "\r\n".join([f"{name}: {value}" for name, value in shared])
            if len(encoded) <= MAX_ENCODED_LENGTH:
                if len(self._encoded) >= MAX_ENCODED_FIELDS:
                    self._encoded.clear()
                self._encoded[shared] = encoded
        return encoded

    async def _acquire(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            expired = now - connection.idle_since > self.idle_timeout
            if expired or connection.closed or _closing(connection):
                connection.close()
                self._slots.release()
                continue
            return connection

        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._slots.acquire()
                try:
                    _, connection = await self._loop().create_connection(
                        lambda: _Connection(self),
                        self.host,
                        self.port,
                        ssl=self._ssl,
                    )
                except BaseException:
                    self._slots.release()
                    raise
        except TimeoutError as error:
            raise UpstreamTimeout() from error
        except OSError as error:
            raise UpstreamUnavailable() from error
        self._all.add(connection)
        return connection

    def put_back(self, connection: _Connection) -> None:
        self._idle.append(connection)

    def release_slot(self) -> None:
        self._slots.release()

    def forget(self, connection: _Connection) -> None:
        self._all.discard(connection)

    @staticmethod
    def _loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()


def _closing(connection: _Connection) -> bool:
    transport: Any = connection.transport
    return transport is None or transport.is_closing()


async def _wait_for_headers(response: UpstreamResponse) -> UpstreamResponse:
    """Return ``response`` once its headers arrived; release it on any failure."""
    try:
        await response._headers_ready
    except TimeoutError as error:
        response.release()
        raise UpstreamTimeout() from error
    except (OSError, UpstreamProtocolError) as error:
        response.release()
        raise UpstreamUnavailable() from error
    except BaseException:
        response.release()
        raise
    return response
