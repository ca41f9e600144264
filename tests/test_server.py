"""The lean HTTP/1.1 server in front of aiohttp, driven over real sockets.

Requests are hand-written bytes, so pipelining, split writes, unusual heads
and half-sent bodies reach the server exactly as written. Differential tests
send the same bytes to a gateway with ``server.fast_path`` on and to one with
it off, and expect the same response from both.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.server import FrontServer
from tests.conftest import READ_OBSERVERS

# The server does not depend on the token store, so one store kind is enough.
pytestmark = pytest.mark.parametrize("store_backend", ["sqlite"], indirect=True)

STORED = "misskey-token-alice"
# Upper bound, in seconds, for any single wait on a gateway.
WAIT_SECONDS = 5.0
# Server timeouts, in seconds, for the tests that wait them out.
SHORT_TIMEOUT = 0.3
JSON = ("Content-Type", "application/json")
BLOCK = bytes(range(256)) * 256


def http_request(
    target: str = "/api/meta",
    body: bytes = b"{}",
    headers: Iterable[tuple[str, str]] = (JSON,),
    *,
    method: str = "POST",
    version: str = "HTTP/1.1",
    length: bool = True,
) -> bytes:
    """Return a request as bytes, with header values written as latin-1."""
    lines = [f"{method} {target} {version}", "Host: gateway.test"]
    lines += [f"{name}: {value}" for name, value in headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Response:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> dict:
        return json.loads(self.body)


async def read_head(reader: asyncio.StreamReader) -> Response:
    """Read a status line and header fields, skipping interim 1xx responses."""
    while True:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_SECONDS)
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        version, status, *reason = status_line.split(" ", 2)
        headers = []
        for line in lines:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
        response = Response(version, int(status), "".join(reason), headers)
        if not 100 <= response.status < 200:
            return response


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def read_body(
    reader: asyncio.StreamReader, response: Response, method: str = "POST"
) -> bytes:
    """Read the body after ``response``, framed by Content-Length or chunked coding."""
    if response.status in (204, 304) or method == "HEAD":
        return b""
    length = response.header("Content-Length")
    if (response.header("Transfer-Encoding") or "").lower() == "chunked":
        read = read_chunked(reader)
    elif length is not None:
        read = reader.readexactly(int(length))
    else:
        read = reader.read()
    return await asyncio.wait_for(read, WAIT_SECONDS)


class Connection:
    """A client connection to a gateway that writes bytes exactly as given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, gateway) -> Connection:
        server = gateway.client.server
        reader, writer = await asyncio.open_connection(server.host, server.port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, method: str = "POST") -> Response:
        response = await read_head(self.reader)
        response.body = await read_body(self.reader, response, method)
        return response

    async def rest(self) -> bytes:
        """Return what the server sends until it closes the connection."""
        return await asyncio.wait_for(self.reader.read(), WAIT_SECONDS)

    def close(self) -> None:
        self.writer.close()

    def reset(self) -> None:
        """Close with a TCP reset instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


async def exchange(gateway, request: bytes) -> Response:
    """Send ``request`` on a new connection and read one response."""
    connection = await Connection.open(gateway)
    try:
        await connection.send(request)
        return await connection.response(request.split(b" ", 1)[0].decode())
    finally:
        connection.close()


def front_server(gateway) -> FrontServer:
    server = gateway.client.server.runner.server
    assert isinstance(server, FrontServer)
    return server


async def wait_until(condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` is true, failing after WAIT_SECONDS."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition still false after {WAIT_SECONDS} s")
        await asyncio.sleep(0.01)


async def start_with_token(start_gateway, **overrides):
    gateway = await start_gateway(**overrides)
    gateway.fake.add_token(STORED, "alice")
    await gateway.store_token("alice", STORED)
    return gateway


def bearer(gateway, principal: str = "alice", scope: str = "*") -> tuple[str, str]:
    return ("Authorization", f"Bearer {gateway.jwt(principal, scope)}")


def echoed(response: Response) -> dict:
    """Return the params the fake Misskey echoed for notes/show."""
    return response.json()["params"]


def held_request(started: asyncio.Event, release: asyncio.Event):
    """Return an upstream handler that responds only once ``release`` is set."""

    async def handle(request, received):
        started.set()
        await release.wait()
        return web.json_response({"slow": True})

    return handle


@pytest.fixture
def arrivals() -> Iterator[asyncio.Queue[bytes]]:
    """Every chunk of bytes the lean server reads, in order."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    READ_OBSERVERS.append(queue)
    yield queue
    READ_OBSERVERS.remove(queue)


async def next_arrival(arrivals: asyncio.Queue[bytes]) -> bytes:
    return await asyncio.wait_for(arrivals.get(), WAIT_SECONDS)


# Lean path and hand-off


async def test_plain_request_stays_lean(gateway):
    connection = await Connection.open(gateway)
    await connection.send(http_request("/api/i", headers=[JSON, bearer(gateway)]))
    response = await connection.response()
    lean_connections = len(front_server(gateway).connections)
    connection.close()

    assert response.status == 200
    assert response.json()["username"] == "alice"
    assert lean_connections == 1


async def test_keep_alive_serves_sequence(gateway):
    connection = await Connection.open(gateway)
    statuses = []
    for n in range(3):
        await connection.send(http_request("/api/notes/show", b'{"n":%d}' % n))
        statuses.append((await connection.response()).status)
    lean_connections = len(front_server(gateway).connections)
    connection.close()

    assert statuses == [200, 200, 200]
    assert [r.json for r in gateway.fake.requests_to("notes/show")] == [
        {"n": 0},
        {"n": 1},
        {"n": 2},
    ]
    assert lean_connections == 1


CHUNKED_POST = http_request(
    "/api/notes/show",
    b'7\r\n{"n":1}\r\n0\r\n\r\n',
    [JSON, ("Transfer-Encoding", "chunked")],
    length=False,
)
HEALTH_CHECK = http_request("/_gateway/healthz", b"", [], method="GET", length=False)


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(HEALTH_CHECK, id="get-healthz"),
        pytest.param(CHUNKED_POST, id="chunked-post"),
    ],
)
async def test_not_plain_handed_off(gateway, request_bytes):
    connection = await Connection.open(gateway)
    await connection.send(request_bytes)
    response = await connection.response()
    lean_connections = len(front_server(gateway).connections)
    connection.close()

    assert response.status == 200
    assert lean_connections == 0


# Connection workers: one task per lean connection serves its requests in turn.


def connection_workers() -> int:
    """Return the number of running lean-server connection workers."""
    return sum(
        getattr(task.get_coro(), "__qualname__", "") == "FrontProtocol._work"
        for task in asyncio.all_tasks()
    )


async def test_worker_per_connection_ends_with_it(gateway):
    connections = [await Connection.open(gateway) for _ in range(3)]
    for connection in connections:
        for _ in range(2):
            await connection.send(http_request("/api/meta"))
            assert (await connection.response()).status == 200
    workers_while_open = connection_workers()
    for connection in connections:
        connection.close()
    await wait_until(lambda: connection_workers() == 0)

    assert workers_while_open == 3


async def test_worker_ends_at_hand_off(gateway):
    connection = await Connection.open(gateway)
    await connection.send(http_request("/api/meta"))
    lean = await connection.response()
    await connection.send(HEALTH_CHECK)
    handed_off = await connection.response()
    await wait_until(lambda: connection_workers() == 0)
    await connection.send(http_request("/api/meta"))
    after = await connection.response()
    connection.close()

    assert lean.status == 200
    assert handed_off.status == 200
    assert after.status == 200


async def test_cancelled_idle_worker_leaves_connection_usable(gateway):
    errors: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(
        lambda loop, context: errors.append(context)
    )
    front = front_server(gateway)
    connection = await Connection.open(gateway)
    await connection.send(http_request("/api/meta"))
    first = await connection.response()
    (protocol,) = front.connections
    # What cancelling every task on the way out does to an idle worker.
    protocol._task.cancel()
    await wait_until(lambda: connection_workers() == 0)
    await connection.send(http_request("/api/meta"))
    second = await connection.response()
    connection.close()
    await wait_until(lambda: not front.connections)

    assert first.status == 200
    assert second.status == 200
    assert errors == []


# Repeated heads: a head equal to the last one on the connection but for its
# Content-Length value reuses the last parse (gateway.server.ParsedHead).


def with_length(request: bytes, value: bytes) -> bytes:
    """Return ``request`` with its Content-Length value replaced, body unchanged."""
    head, separator, body = request.partition(b"\r\n\r\n")
    lines = [
        b"Content-Length: " + value if line.startswith(b"Content-Length:") else line
        for line in head.split(b"\r\n")
    ]
    return b"\r\n".join(lines) + separator + body


async def test_repeated_head_new_length_and_body(gateway):
    headers = [JSON, bearer(gateway), ("X-Client", "repeat")]
    bodies = [b'{"n":1}', b'{"n":22,"text":"longer"}', b'{"n":3}', b"{}"]
    connection = await Connection.open(gateway)
    responses = []
    for body in bodies:
        await connection.send(http_request("/api/notes/show", body, headers))
        responses.append(await connection.response())
    connection.close()

    received = gateway.fake.requests_to("notes/show")
    assert [r.status for r in responses] == [200] * 4
    assert [r.json for r in received] == [
        {"i": STORED, "n": 1},
        {"i": STORED, "n": 22, "text": "longer"},
        {"i": STORED, "n": 3},
        {"i": STORED},
    ]
    assert [int(r.headers["Content-Length"]) for r in received] == [
        len(r.body) for r in received
    ]
    assert all(r.headers["X-Client"] == "repeat" for r in received)
    # Each request has its own id, though the rest of the fields are shared.
    assert len({r.headers["X-Request-Id"] for r in received}) == 4


async def test_repeated_head_other_credential(start_gateway):
    gateway = await start_with_token(start_gateway)
    gateway.fake.add_token("misskey-token-bob", "bob")
    await gateway.store_token("bob", "misskey-token-bob")
    connection = await Connection.open(gateway)
    statuses = []
    for credential in [bearer(gateway), bearer(gateway, "bob"), bearer(gateway)]:
        await connection.send(http_request("/api/i", b"{}", [JSON, credential]))
        statuses.append((await connection.response()).status)
    await connection.send(
        http_request("/api/i", b"{}", [JSON, ("Authorization", "Bearer nonsense")])
    )
    refused = await connection.response()
    connection.close()

    assert statuses == [200, 200, 200]
    assert [r.json["i"] for r in gateway.fake.requests_to("i")] == [
        STORED,
        "misskey-token-bob",
        STORED,
    ]
    assert refused.status == 401


@pytest.mark.parametrize(
    ("value", "status"),
    [
        pytest.param(b"2x", 400, id="not-digits"),
        pytest.param(b"-2", 400, id="negative"),
        pytest.param(b"99999999", 413, id="over-limit"),
    ],
)
async def test_repeated_head_bad_length(start_gateway, value, status):
    gateway = await start_with_token(start_gateway, **{"server.max_body_size": 1024})
    request = http_request("/api/notes/show", b"{}", [JSON, bearer(gateway)])
    connection = await Connection.open(gateway)
    await connection.send(request)
    first = await connection.response()
    await connection.send(with_length(request, value))
    second = await read_head(connection.reader)
    connection.close()

    assert first.status == 200
    assert second.status == status
    assert len(gateway.fake.requests_to("notes/show")) == 1


async def test_repeated_head_other_forwarded_for(start_gateway):
    gateway = await start_gateway(**{"server.trusted_proxies": ["127.0.0.0/8"]})
    connection = await Connection.open(gateway)
    for address in ["203.0.113.9", "198.51.100.7", "203.0.113.9"]:
        await connection.send(
            http_request("/api/meta", b"{}", [JSON, ("X-Forwarded-For", address)])
        )
        assert (await connection.response()).status == 200
    connection.close()

    assert [r.headers["X-Forwarded-For"] for r in gateway.fake.requests_to("meta")] == [
        "203.0.113.9, 127.0.0.1",
        "198.51.100.7, 127.0.0.1",
        "203.0.113.9, 127.0.0.1",
    ]


# Pipelining


async def test_pipelined_responses_in_order(gateway):
    bodies = [b'{"n":%d,"pad":"%s"}' % (n, b"x" * n * 100) for n in range(5)]
    connection = await Connection.open(gateway)
    await connection.send(b"".join(http_request("/api/notes/show", b) for b in bodies))
    responses = [await connection.response() for _ in bodies]
    lean_connections = len(front_server(gateway).connections)
    connection.close()

    assert [r.status for r in responses] == [200] * 5
    assert [echoed(r)["n"] for r in responses] == [0, 1, 2, 3, 4]
    assert [r.body for r in gateway.fake.requests_to("notes/show")] == bodies
    assert lean_connections == 1


async def test_pipelined_over_buffer_limit(gateway):
    pad = "x" * 200_000
    bodies = [json.dumps({"n": n, "pad": pad}).encode() for n in range(4)]
    connection = await Connection.open(gateway)
    await connection.send(b"".join(http_request("/api/notes/show", b) for b in bodies))
    responses = [await connection.response() for _ in bodies]
    connection.close()

    assert [echoed(r)["n"] for r in responses] == [0, 1, 2, 3]
    assert [r.body for r in gateway.fake.requests_to("notes/show")] == bodies


async def test_hand_off_keeps_buffered_bytes(gateway):
    connection = await Connection.open(gateway)
    await connection.send(
        http_request("/api/notes/show", b'{"n":0}')
        + CHUNKED_POST
        + HEALTH_CHECK
        + http_request("/api/notes/show", b'{"n":2}')
    )
    responses = [await connection.response() for _ in range(4)]
    lean_connections = len(front_server(gateway).connections)
    connection.close()

    assert [r.status for r in responses] == [200, 200, 200, 200]
    assert echoed(responses[0]) == {"n": 0}
    assert echoed(responses[1]) == {"n": 1}
    assert responses[2].json() == {"status": "ok"}
    assert echoed(responses[3]) == {"n": 2}
    assert lean_connections == 0


# Split writes


async def test_head_and_body_split(gateway, arrivals):
    body = b'{"text":"split"}'
    request = http_request("/api/notes/show", body)
    head = request[: -len(body)]
    connection = await Connection.open(gateway)
    await connection.send(head)
    first = await next_arrival(arrivals)
    busy = [c.busy for c in front_server(gateway).connections]
    await connection.send(body)
    second = await next_arrival(arrivals)
    response = await connection.response()
    connection.close()

    assert first == head
    assert busy == [True]
    assert second == body
    assert response.status == 200
    assert gateway.fake.requests_to("notes/show")[0].body == body


async def test_head_split_inside_crlf(gateway, arrivals):
    body = b'{"text":"cr"}'
    request = http_request("/api/notes/show", body)
    cut = request.index(b"\r\n") + 1
    connection = await Connection.open(gateway)
    await connection.send(request[:cut])
    await next_arrival(arrivals)
    await connection.send(request[cut:])
    await next_arrival(arrivals)
    response = await connection.response()
    lean_connections = len(front_server(gateway).connections)
    connection.close()

    assert response.status == 200
    assert lean_connections == 1


async def test_body_split_over_writes(gateway, arrivals):
    body = b'{"text":"' + b"y" * 3000 + b'","n":7}'
    request = http_request("/api/notes/show", body)
    head = request[: -len(body)]
    writes = [head + body[:10], body[10:2000], body[2000:]]
    connection = await Connection.open(gateway)
    seen = []
    for data in writes:
        await connection.send(data)
        seen.append(await next_arrival(arrivals))
    response = await connection.response()
    connection.close()

    assert seen == writes
    assert echoed(response)["n"] == 7
    assert gateway.fake.requests_to("notes/show")[0].body == body


async def test_next_head_split(gateway, arrivals):
    first = http_request("/api/notes/show", b'{"n":0}')
    second = http_request("/api/notes/show", b'{"n":1}')
    connection = await Connection.open(gateway)
    await connection.send(first + second[:20])
    await next_arrival(arrivals)
    first_response = await connection.response()
    await connection.send(second[20:])
    await next_arrival(arrivals)
    second_response = await connection.response()
    connection.close()

    assert echoed(first_response) == {"n": 0}
    assert echoed(second_response) == {"n": 1}


async def test_long_partial_head_handed_off(gateway, arrivals):
    fields = [JSON] + [(f"X-Pad-{n}", "p" * 3000) for n in range(3)]
    request = http_request("/api/notes/show", b'{"n":3}', fields)
    connection = await Connection.open(gateway)
    await connection.send(request[:8500])
    first = await next_arrival(arrivals)
    lean_connections = len(front_server(gateway).connections)
    await connection.send(request[8500:])
    response = await connection.response()
    connection.close()

    assert first == request[:8500]
    assert lean_connections == 0
    assert echoed(response) == {"n": 3}
    assert gateway.fake.requests_to("notes/show")[0].headers["X-Pad-2"] == "p" * 3000


# Timeouts


async def test_body_timeout_is_408(start_gateway):
    gateway = await start_gateway(**{"server.client_body_timeout": SHORT_TIMEOUT})
    loop = asyncio.get_running_loop()
    connection = await Connection.open(gateway)
    request = http_request("/api/notes/show", b'{"text":"never finished"}')
    started = loop.time()
    await connection.send(request[:-5])
    response = await connection.response()
    elapsed = loop.time() - started
    rest = await connection.rest()
    connection.close()

    assert response.status == 408
    assert response.json()["error"]["code"] == "REQUEST_TIMEOUT"
    assert response.header("Connection") == "close"
    assert elapsed >= SHORT_TIMEOUT - 0.05
    assert rest == b""
    assert gateway.fake.received == []


async def test_body_timeout_matches_aiohttp(start_gateway):
    request = http_request("/api/notes/show", b'{"text":"never finished"}')[:-5]
    lean, plain = await compare_responses(
        start_gateway, request, **{"server.client_body_timeout": SHORT_TIMEOUT}
    )

    assert lean.status == plain.status
    assert lean.body == plain.body
    assert lean.header("Connection") == plain.header("Connection")


async def test_idle_connection_closed(start_gateway):
    gateway = await start_gateway(**{"server.keepalive_timeout": SHORT_TIMEOUT})
    loop = asyncio.get_running_loop()
    connection = await Connection.open(gateway)
    await connection.send(http_request())
    await connection.response()
    responded = loop.time()
    rest = await connection.rest()
    elapsed = loop.time() - responded
    connection.close()

    assert rest == b""
    assert elapsed >= SHORT_TIMEOUT - 0.05
    assert front_server(gateway).connections == set()


async def test_silent_connection_closed(start_gateway):
    gateway = await start_gateway(**{"server.keepalive_timeout": SHORT_TIMEOUT})
    connection = await Connection.open(gateway)
    rest = await connection.rest()
    connection.close()

    assert rest == b""


async def test_slow_head_closed(start_gateway):
    gateway = await start_gateway(**{"server.keepalive_timeout": SHORT_TIMEOUT})
    connection = await Connection.open(gateway)
    await connection.send(b"POST /api/meta HTTP/1.1\r\nHost: gateway.test\r\n")
    rest = await connection.rest()
    connection.close()

    assert rest == b""
    assert gateway.fake.received == []


async def test_keep_alive_outlasts_request(start_gateway):
    gateway = await start_with_token(
        start_gateway, **{"server.keepalive_timeout": SHORT_TIMEOUT}
    )
    started, release = asyncio.Event(), asyncio.Event()
    gateway.fake.handlers["fake/slow"] = held_request(started, release)
    connection = await Connection.open(gateway)
    await connection.send(http_request("/api/fake/slow", headers=[bearer(gateway)]))
    await asyncio.wait_for(started.wait(), WAIT_SECONDS)
    # Nothing to wait for: the idle timeout must pass while the request runs.
    await asyncio.sleep(SHORT_TIMEOUT * 2)
    release.set()
    response = await connection.response()
    connection.close()

    assert response.json() == {"slow": True}


# Connection: close and half-closed connections


async def test_connection_close_honoured(gateway):
    connection = await Connection.open(gateway)
    await connection.send(
        http_request("/api/notes/show", b'{"n":0}', [JSON, ("Connection", "close")])
        + http_request("/api/notes/show", b'{"n":1}')
    )
    response = await connection.response()
    rest = await connection.rest()
    connection.close()

    assert response.status == 200
    assert response.header("Connection") == "close"
    assert rest == b""
    assert len(gateway.fake.requests_to("notes/show")) == 1


async def test_half_close_gets_response(gateway):
    connection = await Connection.open(gateway)
    await connection.send(http_request("/api/notes/show", b'{"n":0}'))
    connection.writer.write_eof()
    response = await connection.response()
    rest = await connection.rest()
    connection.close()

    assert echoed(response) == {"n": 0}
    assert response.header("Connection") == "close"
    assert rest == b""


# Upstream bodies that arrive after the head


def held_body(length: bool, release: asyncio.Event):
    """Return an upstream handler that sends half a body, the rest once released."""

    async def handle(request, received):
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if length:
            response.content_length = len(BLOCK) * 2
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(BLOCK)
        await release.wait()
        await response.write(BLOCK)
        await response.write_eof()
        return response

    return handle


@pytest.mark.parametrize("length", [True, False], ids=["length", "chunked"])
async def test_held_upstream_body_relayed(gateway, length):
    release = asyncio.Event()
    gateway.fake.handlers["fake/held"] = held_body(length, release)
    connection = await Connection.open(gateway)
    await connection.send(
        http_request("/api/fake/held", headers=[JSON, bearer(gateway)])
        + http_request("/api/notes/show", b'{"n":1}')
    )
    head = await read_head(connection.reader)
    release.set()
    body = await read_body(connection.reader, head)
    after = await connection.response()
    lean_connections = len(front_server(gateway).connections)
    connection.close()

    assert head.status == 200
    assert head.header("Content-Length") == (str(len(BLOCK) * 2) if length else None)
    assert head.header("Transfer-Encoding") == (None if length else "chunked")
    assert body == BLOCK * 2
    assert echoed(after) == {"n": 1}
    assert lean_connections == 1


async def test_large_upstream_body_relayed(gateway):
    payload = BLOCK * 48

    async def large(request, received):
        return web.Response(body=payload, content_type="application/octet-stream")

    gateway.fake.handlers["fake/large"] = large
    response = await exchange(
        gateway, http_request("/api/fake/large", headers=[JSON, bearer(gateway)])
    )

    assert response.header("Content-Length") == str(len(payload))
    assert response.body == payload


async def test_streamed_body_waits_for_client(gateway):
    blocks = 64

    async def endless(request, received):
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(blocks):
            await response.write(BLOCK * 4)
        await response.write_eof()
        return response

    gateway.fake.handlers["fake/endless"] = endless
    response = await exchange(
        gateway, http_request("/api/fake/endless", headers=[JSON, bearer(gateway)])
    )

    assert len(response.body) == len(BLOCK) * 4 * blocks
    assert response.body == BLOCK * 4 * blocks


async def test_upstream_cut_ends_connection(gateway):
    release = asyncio.Event()

    async def cut(request, received):
        response = web.StreamResponse()
        response.content_length = len(BLOCK) * 4
        await response.prepare(request)
        await response.write(BLOCK)
        await release.wait()
        request.transport.abort()
        return response

    gateway.fake.handlers["fake/cut"] = cut
    connection = await Connection.open(gateway)
    await connection.send(
        http_request("/api/fake/cut", headers=[JSON, bearer(gateway)])
    )
    head = await read_head(connection.reader)
    release.set()
    try:
        received = len(await connection.rest())
    except ConnectionResetError:
        received = 0
    connection.close()
    after = await exchange(gateway, http_request())

    assert head.header("Content-Length") == str(len(BLOCK) * 4)
    assert received < len(BLOCK) * 4
    assert after.status == 200


# Client disconnects


def logged_requests(log_output, endpoint: str) -> list[dict]:
    entries = []
    for line in log_output.getvalue().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "request" and entry.get("endpoint") == endpoint:
            entries.append(entry)
    return entries


@pytest.mark.parametrize(
    ("reset", "error"),
    [(False, None), (True, "CLIENT_DISCONNECTED")],
    ids=["close", "reset"],
)
async def test_disconnect_during_upstream(gateway, log_output, reset, error):
    started, release = asyncio.Event(), asyncio.Event()
    gateway.fake.handlers["fake/slow"] = held_request(started, release)
    front = front_server(gateway)
    connection = await Connection.open(gateway)
    await connection.send(
        http_request("/api/fake/slow", headers=[JSON, bearer(gateway)])
    )
    await asyncio.wait_for(started.wait(), WAIT_SECONDS)
    if reset:
        connection.reset()
        await wait_until(lambda: not front.connections)
    else:
        connection.close()
        await wait_until(lambda: all(c.closing for c in front.connections))
    release.set()
    await wait_until(lambda: bool(logged_requests(log_output, "fake/slow")))
    await wait_until(lambda: not front.connections)
    after = await exchange(gateway, http_request("/api/i", headers=[bearer(gateway)]))
    logged = logged_requests(log_output, "fake/slow")[0]

    assert logged.get("error") == error
    assert after.status == 200
    assert "connection.failed" not in log_output.getvalue()
    assert "request.failed" not in log_output.getvalue()


@pytest.mark.parametrize(
    "reset",
    [
        pytest.param(
            False,
            id="close",
        ),
        pytest.param(True, id="reset"),
    ],
)
async def test_disconnect_mid_body(start_gateway, log_output, reset):
    gateway = await start_gateway(**{"server.client_body_timeout": 1.0})
    loop = asyncio.get_running_loop()
    connection = await Connection.open(gateway)
    await connection.send(http_request("/api/notes/show", b'{"text":"cut"}')[:-5])
    await wait_until(lambda: any(c.busy for c in front_server(gateway).connections))
    left = loop.time()
    if reset:
        connection.reset()
    else:
        connection.close()
    await wait_until(lambda: bool(logged_requests(log_output, "notes/show")))
    elapsed = loop.time() - left
    logged = logged_requests(log_output, "notes/show")[0]

    assert logged.get("error") == "CLIENT_DISCONNECTED"
    assert elapsed < 0.5


# Graceful shutdown


async def test_shutdown_finishes_busy_request(gateway):
    started, release = asyncio.Event(), asyncio.Event()
    gateway.fake.handlers["fake/slow"] = held_request(started, release)
    idle = await Connection.open(gateway)
    await idle.send(http_request())
    await idle.response()
    busy = await Connection.open(gateway)
    await busy.send(http_request("/api/fake/slow", headers=[JSON, bearer(gateway)]))
    await asyncio.wait_for(started.wait(), WAIT_SECONDS)
    closing = asyncio.create_task(gateway.client.server.close())
    idle_rest = await idle.rest()
    still_closing = not closing.done()
    release.set()
    response = await busy.response()
    busy_rest = await busy.rest()
    await asyncio.wait_for(closing, WAIT_SECONDS)
    idle.close()
    busy.close()

    assert idle_rest == b""
    assert still_closing
    assert response.json() == {"slow": True}
    assert response.header("Connection") == "close"
    assert busy_rest == b""


# Responses sent before the body arrived

DENIED_BODY = b'{"a":1}'
DENIED_HEAD = http_request("/api/i/regenerate-token", DENIED_BODY)[: -len(DENIED_BODY)]


async def test_early_response_keeps_connection(start_gateway):
    fast = await start_with_token(start_gateway)
    slow = await start_gateway(**{"server.fast_path": False})
    responses = []
    for gateway in (fast, slow):
        connection = await Connection.open(gateway)
        await connection.send(DENIED_HEAD)
        early = await connection.response()
        await connection.send(DENIED_BODY + http_request())
        try:
            after: int | None = (await connection.response()).status
        except (asyncio.IncompleteReadError, ConnectionResetError):
            after = None
        connection.close()
        responses.append((early, after))
    (lean_early, lean_after), (plain_early, plain_after) = responses

    assert lean_early.status == 403
    assert plain_early.status == 403
    assert lean_early.header("Connection") == plain_early.header("Connection")
    assert lean_after == plain_after


async def test_early_response_unfinished_body(start_gateway):
    gateway = await start_gateway(**{"server.client_body_timeout": SHORT_TIMEOUT})
    connection = await Connection.open(gateway)
    await connection.send(DENIED_HEAD)
    early = await connection.response()
    rest = await connection.rest()
    connection.close()

    assert early.status == 403
    assert rest == b""


async def test_shutdown_skips_unread_body(gateway):
    connection = await Connection.open(gateway)
    await connection.send(DENIED_HEAD)
    await connection.response()
    await asyncio.wait_for(gateway.client.server.close(), WAIT_SECONDS)
    rest = await connection.rest()
    connection.close()

    assert rest == b""


# Unusual requests, handled as aiohttp handles them

UNUSUAL = [
    pytest.param(http_request("/api/meta", version="HTTP/1.0"), id="http-1.0"),
    pytest.param(
        http_request("/api/notes/show", headers=[JSON, ("X-Name", "caf\xc3\xa9")]),
        id="utf8-field",
    ),
    pytest.param(
        http_request("/api/notes/show", headers=[JSON, ("X-Name", "caf\xe9")]),
        id="latin1-field",
    ),
    pytest.param(http_request("/api/notes%2Fshow"), id="encoded-slash"),
    pytest.param(http_request("/api/notes/../meta"), id="dot-dot"),
    pytest.param(http_request("/api/notes/%2e%2e/meta"), id="encoded-dot-dot"),
    pytest.param(http_request("/api/../_gateway/healthz"), id="dot-dot-out-of-api"),
    pytest.param(http_request("/api/notes//show"), id="empty-segment"),
    pytest.param(http_request("/api/notes/show/"), id="trailing-slash"),
    pytest.param(
        http_request("http://gateway.test/api/meta"), id="absolute-form-target"
    ),
    pytest.param(
        http_request("/api/meta", headers=[JSON, ("Content-Length", "2")]),
        id="duplicate-length",
    ),
    pytest.param(
        http_request("/api/meta", headers=[JSON, ("Content-Length", "3")]),
        id="conflicting-length",
    ),
    pytest.param(
        http_request(
            "/api/meta",
            b"2\r\n{}\r\n0\r\n\r\n",
            [JSON, ("Content-Length", "2"), ("Transfer-Encoding", "chunked")],
            length=False,
        ),
        id="length-and-chunked",
    ),
    pytest.param(http_request("/api/meta", length=False), id="no-length"),
    pytest.param(
        http_request(
            "/api/meta", headers=[JSON, ("Content-Length", "+2")], length=False
        ),
        id="signed-length",
    ),
    pytest.param(
        http_request(
            "/api/meta", headers=[JSON, ("Content-Length", "02")], length=False
        ),
        id="zero-padded-length",
    ),
    pytest.param(
        http_request("/api/meta", headers=[JSON, ("Content-Type", "text/plain")]),
        id="duplicate-content-type",
    ),
    pytest.param(
        b"POST /api/meta HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: 2\r\n"
        b" folded\r\n\r\n{}",
        id="folded-field",
    ),
    pytest.param(
        b"POST /api/meta HTTP/1.1\nHost: gateway.test\nContent-Length: 2\n\n{}",
        id="bare-newlines",
    ),
    pytest.param(
        b"POST /api/meta HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", id="no-host"
    ),
    pytest.param(
        http_request("/api/meta", headers=[JSON, ("Host", "other.test")]),
        id="two-hosts",
    ),
    pytest.param(
        b"POST /api/meta HTTP/1.1\r\nHost:\r\nContent-Length: 2\r\n\r\n{}",
        id="empty-host",
    ),
    pytest.param(
        http_request("/api/meta", headers=[JSON, ("X-A", "a\x00b")]), id="nul-in-field"
    ),
    pytest.param(
        http_request("/api/meta", headers=[JSON, ("X-A", "a\x7fb")]), id="del-in-field"
    ),
    pytest.param(
        http_request("/api/meta", headers=[JSON, ("X-A", "a\rb")]), id="cr-in-field"
    ),
    pytest.param(
        http_request("/api/meta", headers=[JSON, ("X-A", "a\tb")]), id="tab-in-field"
    ),
    pytest.param(
        http_request("/api/meta", headers=[JSON, ("X A", "1")]), id="space-in-name"
    ),
    pytest.param(
        http_request(
            "/api/meta", headers=[JSON, ("Content-Length ", "2")], length=False
        ),
        id="space-before-colon",
    ),
    pytest.param(
        http_request("/api/meta", headers=[JSON, ("Connection", "keep-alive, close")]),
        id="keep-alive-and-close",
    ),
    pytest.param(
        http_request("/api/meta", headers=[JSON, ("X-Long", "x" * 9000)]),
        id="long-field",
    ),
    pytest.param(http_request("/api/meta?q=" + "x" * 9000), id="long-target"),
    pytest.param(
        http_request(
            "/api/meta", headers=[JSON] + [(f"X-{n}", "1") for n in range(200)]
        ),
        id="many-fields",
    ),
]


@pytest.fixture
async def tolerant_upstream(fake_misskey) -> AsyncIterator[str]:
    """The fake Misskey behind a server with far larger head limits than aiohttp's.

    It records requests whose heads aiohttp's default limits would reject
    before the fake saw them.
    """
    server = TestServer(fake_misskey.make_app(), host="127.0.0.1")
    await server.start_server(
        max_line_size=65536, max_field_size=65536, max_headers=1024
    )
    yield str(server.make_url("")).rstrip("/")
    await server.close()


async def compare_responses(start_gateway, request: bytes, **overrides):
    """Return the responses of a lean and an aiohttp-only gateway to ``request``."""
    fast = await start_with_token(start_gateway, **overrides)
    slow = await start_gateway(**{"server.fast_path": False, **overrides})
    return await exchange(fast, request), await exchange(slow, request)


@pytest.mark.parametrize("request_bytes", UNUSUAL)
async def test_unusual_request_same_response(
    start_gateway, tolerant_upstream, request_bytes
):
    lean, plain = await compare_responses(
        start_gateway,
        request_bytes,
        upstream_url=tolerant_upstream,
        **{"server.keepalive_timeout": 1.0},
    )

    assert lean.status == plain.status
    assert error_code(lean) == error_code(plain)
    assert lean.version == plain.version
    assert comparable_fields(lean, request_bytes) == comparable_fields(
        plain, request_bytes
    )
    assert lean.body == plain.body


def error_code(response: Response) -> str | None:
    try:
        document = json.loads(response.body)
    except ValueError:
        return None
    if isinstance(document, dict) and isinstance(document.get("error"), dict):
        return document["error"].get("code")
    return None


def comparable_fields(response: Response, request: bytes) -> list[tuple[str, str]]:
    """Return the response fields sorted by name, without Date.

    A generated X-Request-Id differs per request, so only its presence counts
    unless it is the one the client sent.
    """
    fields = []
    for name, value in response.headers:
        lowered = name.lower()
        if lowered == "date":
            continue
        if lowered == "x-request-id" and value.encode() not in request:
            value = "<generated>"
        fields.append((lowered, value))
    return sorted(fields, key=lambda field: field[0])


def upstream_view(received: list, request: bytes) -> list:
    """Return what the fake Misskey saw, with generated request ids masked."""
    view = []
    for record in received:
        fields = []
        for name, value in record.headers.items():
            lowered = name.lower()
            if lowered == "x-request-id" and value.encode() not in request:
                value = "<generated>"
            fields.append((lowered, value))
        fields.sort(key=lambda field: field[0])
        view.append(
            (record.method, record.path, record.query_string, record.body, fields)
        )
    return view


# Differential: a table of requests, with the same response from both servers

MAX_BODY = 1000
REJECTED_TOKEN = "misskey-token-bob-revoked"


@dataclass
class Credentials:
    jwt: str
    narrow: str
    bob: str


def auth(credential: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {credential}")


def padded_body(size: int) -> bytes:
    body = b'{"text":"' + b"x" * (size - 11) + b'"}'
    assert len(body) == size
    return body


async def no_content(request, received):
    return web.Response(status=204)


async def not_modified(request, received):
    return web.Response(status=304, headers={"ETag": '"v1"'})


async def empty_error(request, received):
    return web.Response(status=500)


async def with_fields(request, received):
    response = web.json_response({"fields": True})
    response.headers.add("Set-Cookie", "a=1")
    response.headers.add("Set-Cookie", "b=2")
    response.headers["Connection"] = "X-Upstream-Hop"
    response.headers["X-Upstream-Hop"] = "1"
    response.headers["Keep-Alive"] = "timeout=1"
    response.headers["X-Kept"] = "yes"
    return response


async def utf8_field(request, received):
    return web.json_response({}, headers={"X-Name": "caf\u00e9"})


async def own_reason(request, received):
    return web.json_response({}, status=299, reason="Mostly Fine")


def streamed(length: bool):
    async def handle(request, received):
        response = web.StreamResponse()
        if length:
            response.content_length = len(BLOCK) * 4
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(4):
            await response.write(BLOCK)
        await response.write_eof()
        return response

    return handle


UPSTREAM_HANDLERS = {
    "fake/no-content": no_content,
    "fake/not-modified": not_modified,
    "fake/empty-error": empty_error,
    "fake/fields": with_fields,
    "fake/utf8-field": utf8_field,
    "fake/reason": own_reason,
    "fake/streamed-length": streamed(length=True),
    "fake/streamed-chunked": streamed(length=False),
}


@pytest.fixture
async def gateway_pair(start_gateway):
    """A lean gateway and an aiohttp-only one on the same store and upstream."""
    settings = {"server.max_body_size": MAX_BODY}
    fast = await start_with_token(start_gateway, **settings)
    slow = await start_gateway(**{"server.fast_path": False, **settings})
    await fast.store_token("bob", REJECTED_TOKEN)
    fast.fake.handlers.update(UPSTREAM_HANDLERS)
    credentials = Credentials(
        jwt=fast.jwt(),
        narrow=fast.jwt(scope="read:account"),
        bob=fast.jwt("bob"),
    )
    return fast, slow, credentials


def case(case_id: str, build: Callable[[Credentials], bytes]):
    return pytest.param(build, id=case_id)


def upstream_case(endpoint: str):
    return case(
        f"upstream-{endpoint}",
        lambda c: http_request(f"/api/fake/{endpoint}", headers=[JSON, auth(c.jwt)]),
    )


def typed(content_type: str, body: bytes = b'{"text":"a"}') -> bytes:
    return http_request("/api/notes/show", body, [("Content-Type", content_type)])


CASES = [
    case("bearer", lambda c: http_request("/api/i", headers=[JSON, auth(c.jwt)])),
    case("anonymous-required", lambda c: http_request("/api/i")),
    case(
        "bad-bearer",
        lambda c: http_request("/api/i", headers=[JSON, auth("not-a-credential")]),
    ),
    case(
        "basic-scheme",
        lambda c: http_request(
            "/api/i", headers=[JSON, ("Authorization", "Basic eDp5")]
        ),
    ),
    case(
        "lowercase-scheme",
        lambda c: http_request(
            "/api/i", headers=[JSON, ("Authorization", f"bearer {c.jwt}")]
        ),
    ),
    case(
        "scheme-without-credential",
        lambda c: http_request("/api/i", headers=[JSON, ("Authorization", "Bearer")]),
    ),
    case(
        "two-authorizations",
        lambda c: http_request("/api/i", headers=[JSON, auth(c.jwt), auth(c.jwt)]),
    ),
    case(
        "body-credential",
        lambda c: http_request("/api/i", json.dumps({"i": c.jwt}).encode()),
    ),
    case(
        "body-credential-differs",
        lambda c: http_request(
            "/api/i", json.dumps({"i": c.narrow}).encode(), [JSON, auth(c.jwt)]
        ),
    ),
    case("body-i-number", lambda c: http_request("/api/notes/show", b'{"i":5}')),
    case("body-i-null", lambda c: http_request("/api/notes/show", b'{"i":null}')),
    case(
        "text-plain",
        lambda c: http_request(
            "/api/meta",
            b'{"detail":true}',
            [("Content-Type", "text/plain;charset=UTF-8")],
        ),
    ),
    case("activity-json", lambda c: typed("application/activity+json")),
    case("json-charset", lambda c: typed("application/json; charset=utf-8")),
    case("uppercase-type", lambda c: typed("Application/JSON")),
    case("spaced-parameters", lambda c: typed('application/json ; charset="utf-8"')),
    case("vendor-json", lambda c: typed("application/vnd.example+json; charset=utf-8")),
    case("empty-content-type", lambda c: typed("")),
    case("two-types", lambda c: typed("application/json, text/plain")),
    case("xml-type", lambda c: typed("application/xml", b"<a/>")),
    case("form-type", lambda c: typed("application/x-www-form-urlencoded", b"a=1")),
    case(
        "multipart-elsewhere",
        lambda c: typed("multipart/form-data; boundary=x", b"--x--\r\n"),
    ),
    case(
        "no-content-type",
        lambda c: http_request("/api/notes/show", b'{"text":"a"}', []),
    ),
    case("empty-body", lambda c: http_request("/api/i", b"", [JSON, auth(c.jwt)])),
    case("empty-body-anonymous", lambda c: http_request("/api/notes/show", b"")),
    case("bad-json", lambda c: http_request("/api/notes/show", b"{")),
    case("array-body", lambda c: http_request("/api/notes/show", b"[1]")),
    case(
        "body-at-limit",
        lambda c: http_request("/api/notes/show", padded_body(MAX_BODY)),
    ),
    case(
        "body-over-limit",
        lambda c: http_request("/api/notes/show", padded_body(MAX_BODY + 1)),
    ),
    case(
        "unknown-endpoint",
        lambda c: http_request("/api/no/such-thing", headers=[JSON, auth(c.jwt)]),
    ),
    case("unknown-endpoint-anonymous", lambda c: http_request("/api/no/such-thing")),
    case(
        "denied-endpoint",
        lambda c: http_request("/api/i/regenerate-token", headers=[JSON, auth(c.jwt)]),
    ),
    case(
        "scope-lacks-kind",
        lambda c: http_request("/api/notes/create", headers=[JSON, auth(c.narrow)]),
    ),
    case(
        "stored-token-rejected",
        lambda c: http_request("/api/i", headers=[JSON, auth(c.bob)]),
    ),
    case("query", lambda c: http_request("/api/meta?a=1&b=%20x")),
    case("empty-query", lambda c: http_request("/api/meta?")),
    case("query-credential", lambda c: http_request(f"/api/meta?i={c.jwt}&a=1")),
    case(
        "query-and-body-credential",
        lambda c: http_request(
            f"/api/notes/show?i={c.jwt}", json.dumps({"i": c.jwt}).encode()
        ),
    ),
    case("empty-query-credential", lambda c: http_request("/api/meta?i=&a=1")),
    case(
        "request-id",
        lambda c: http_request("/api/meta", headers=[JSON, ("X-Request-Id", "id-1")]),
    ),
    case(
        "invalid-request-id",
        lambda c: http_request("/api/meta", headers=[JSON, ("X-Request-Id", "a b")]),
    ),
    case(
        "origin",
        lambda c: http_request(
            "/api/meta", headers=[JSON, ("Origin", "https://app.example")]
        ),
    ),
    case(
        "origin-on-error",
        lambda c: http_request(
            "/api/i", headers=[JSON, ("Origin", "https://app.example")]
        ),
    ),
    case(
        "forwarded-for",
        lambda c: http_request(
            "/api/meta", headers=[JSON, ("X-Forwarded-For", "203.0.113.9")]
        ),
    ),
    case(
        "proxy-fields",
        lambda c: http_request(
            "/api/meta",
            headers=[
                JSON,
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "evil.example"),
                ("Forwarded", "for=203.0.113.9"),
                ("X-Real-IP", "203.0.113.9"),
            ],
        ),
    ),
    case(
        "hop-by-hop-fields",
        lambda c: http_request(
            "/api/meta",
            headers=[
                JSON,
                ("Connection", "keep-alive, X-Hop"),
                ("X-Hop", "1"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Cookie", "session=abc"),
                ("User-Agent", "raw-test/1.0"),
            ],
        ),
    ),
    case(
        "repeated-field",
        lambda c: http_request("/api/meta", headers=[JSON, ("X-A", "1"), ("X-A", "2")]),
    ),
    case(
        "explicit-keep-alive",
        lambda c: http_request(
            "/api/meta", headers=[JSON, ("Connection", "keep-alive")]
        ),
    ),
    case(
        "connection-close",
        lambda c: http_request("/api/meta", headers=[JSON, ("Connection", "close")]),
    ),
    case(
        "get-allowed",
        lambda c: http_request("/api/emojis?a=1", b"", [], method="GET", length=False),
    ),
    case(
        "head-allowed",
        lambda c: http_request("/api/emojis", b"", [], method="HEAD", length=False),
    ),
    case(
        "get-not-allowed",
        lambda c: http_request("/api/i", b"", [], method="GET", length=False),
    ),
    case("put", lambda c: http_request("/api/meta", method="PUT")),
    case(
        "options-preflight",
        lambda c: http_request(
            "/api/notes/create",
            b"",
            [
                ("Origin", "https://app.example"),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "authorization, content-type"),
            ],
            method="OPTIONS",
            length=False,
        ),
    ),
    case(
        "gzip-body",
        lambda c: http_request(
            "/api/notes/show", headers=[JSON, ("Content-Encoding", "gzip")]
        ),
    ),
    case(
        "identity-encoding",
        lambda c: http_request(
            "/api/notes/show", headers=[JSON, ("Content-Encoding", "identity")]
        ),
    ),
    case("chunked-body", lambda c: CHUNKED_POST),
    case(
        "expect-continue",
        lambda c: http_request(
            "/api/notes/show", headers=[JSON, ("Expect", "100-continue")]
        ),
    ),
    case("not-api", lambda c: http_request("/notes/show")),
    *(upstream_case(endpoint.removeprefix("fake/")) for endpoint in UPSTREAM_HANDLERS),
]


@pytest.mark.parametrize("build", CASES)
async def test_same_response_both_paths(gateway_pair, build):
    fast, slow, credentials = gateway_pair
    request = build(credentials)
    lean = await exchange(fast, request)
    lean_upstream = list(fast.fake.received)
    fast.fake.received.clear()
    plain = await exchange(slow, request)
    plain_upstream = list(slow.fake.received)

    assert lean.status == plain.status
    assert lean.reason == plain.reason
    assert comparable_fields(lean, request) == comparable_fields(plain, request)
    assert lean.body == plain.body
    assert upstream_view(lean_upstream, request) == upstream_view(
        plain_upstream, request
    )


# Differential: upstream responses only a hand-written upstream sends


class RawUpstream:
    """An upstream server on loopback that writes responses as raw bytes."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader, writer) -> None:
        raise NotImplementedError

    @staticmethod
    async def read_request(reader: asyncio.StreamReader) -> None:
        """Read one request with a Content-Length body, or none."""
        request_head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in request_head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)


class ScriptedUpstream(RawUpstream):
    """An upstream that responds to every request with the same bytes.

    It sends ``head`` and ``first`` at once, then ``rest`` once ``release``
    is set, and closes the connection after that when ``close`` is true.
    """

    def __init__(self, head: bytes, first: bytes, rest: bytes, close: bool):
        super().__init__()
        self.response = (head, first, rest)
        self.close_after = close
        self.release = asyncio.Event()

    async def _serve(self, reader, writer) -> None:
        head, first, rest = self.response
        try:
            while True:
                await self.read_request(reader)
                writer.write(head + first)
                await writer.drain()
                await self.release.wait()
                writer.write(rest)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


SCRIPTED = [
    pytest.param(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"5\r\nhello\r\n",
        b"6\r\n world\r\n0\r\n\r\n",
        False,
        id="chunked-untyped",
    ),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n",
        b"hello",
        b" world",
        False,
        id="length-untyped",
    ),
    pytest.param(
        b"HTTP/1.1 200 OK\r\n\r\n", b"hello", b" world", True, id="close-delimited"
    ),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n",
        b"hello world",
        b"",
        False,
        id="complete-untyped",
    ),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"",
        b"",
        False,
        id="empty-untyped",
    ),
    pytest.param(
        b"HTTP/1.1 200 \r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\n",
        b"hello",
        b" world",
        False,
        id="empty-reason",
    ),
    pytest.param(
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n",
        b"hello",
        b" world",
        True,
        id="http-1.0-upstream",
    ),
]


@pytest.mark.parametrize(("head", "first", "rest", "close"), SCRIPTED)
async def test_scripted_upstream_same_response(start_gateway, head, first, rest, close):
    expected = b"hello world" if b"chunked" in head else first + rest
    upstream = ScriptedUpstream(head, first, rest, close)
    url = await upstream.start()
    settings = {"upstream_url": url, "policy.check_upstream": False}
    fast = await start_gateway(**settings)
    slow = await start_gateway(**{"server.fast_path": False, **settings})
    responses = []
    for gateway in (fast, slow):
        upstream.release.clear()
        connection = await Connection.open(gateway)
        await connection.send(http_request())
        response = await read_head(connection.reader)
        upstream.release.set()
        response.body = await read_body(connection.reader, response)
        connection.close()
        responses.append(response)
    await upstream.close()
    lean, plain = responses

    assert lean.body == expected
    assert lean.status == plain.status
    assert lean.reason == plain.reason
    assert comparable_fields(lean, b"") == comparable_fields(plain, b"")
    assert lean.body == plain.body


# Repeated upstream heads: a response head equal to one parsed before but for
# its Content-Length value is taken without llhttp (gateway.upstream_pool).


class SequencedUpstream(RawUpstream):
    """An upstream that sends ``responses`` in turn, one per request."""

    def __init__(self, responses: list[bytes]):
        super().__init__()
        self.responses = list(responses)

    async def _serve(self, reader, writer) -> None:
        try:
            while self.responses:
                await self.read_request(reader)
                writer.write(self.responses.pop(0))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def upstream_response(body: bytes, length: bytes | None = None, tag: bytes = b"a"):
    length = str(len(body)).encode() if length is None else length
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Tag: " + tag + b"\r\n"
        b"Content-Length: " + length + b"\r\n\r\n" + body
    )


async def relay_sequence(start_gateway, responses: list[bytes]) -> list[Response]:
    """Send one request per scripted response on one client connection."""
    upstream = SequencedUpstream(responses)
    url = await upstream.start()
    gateway = await start_gateway(upstream_url=url, **{"policy.check_upstream": False})
    connection = await Connection.open(gateway)
    relayed = []
    try:
        for _ in responses:
            await connection.send(http_request())
            relayed.append(await connection.response())
    finally:
        connection.close()
        await upstream.close()
    return relayed


async def test_repeated_upstream_head_new_length(start_gateway):
    bodies = [b"hello", b"hello world", b"", b"hello"]
    relayed = await relay_sequence(
        start_gateway, [upstream_response(body) for body in bodies]
    )

    assert [r.status for r in relayed] == [200] * 4
    assert [r.body for r in relayed] == bodies
    assert [r.header("Content-Length") for r in relayed] == ["5", "11", "0", "5"]
    assert [r.header("X-Tag") for r in relayed] == ["a"] * 4
    assert len({r.header("X-Request-Id") for r in relayed}) == 4


async def test_changed_upstream_head_parsed_again(start_gateway):
    responses = [
        upstream_response(b"one", tag=b"a"),
        upstream_response(b"two", tag=b"b"),
        upstream_response(b"three", tag=b"a"),
    ]
    relayed = await relay_sequence(start_gateway, responses)

    assert [r.header("X-Tag") for r in relayed] == ["a", "b", "a"]
    assert [r.body for r in relayed] == [b"one", b"two", b"three"]


@pytest.mark.parametrize(
    "length",
    [
        pytest.param(b"5x", id="not-digits"),
        pytest.param(b"-5", id="negative"),
        pytest.param(b"5 5", id="two-numbers"),
    ],
)
async def test_repeated_upstream_head_bad_length(start_gateway, length):
    responses = [upstream_response(b"hello"), upstream_response(b"hello", length)]
    upstream = SequencedUpstream(responses)
    url = await upstream.start()
    gateway = await start_gateway(upstream_url=url, **{"policy.check_upstream": False})
    connection = await Connection.open(gateway)
    await connection.send(http_request())
    first = await connection.response()
    await connection.send(http_request())
    second = await connection.response()
    connection.close()
    await upstream.close()

    assert first.body == b"hello"
    assert second.status == 502
    assert second.json()["error"]["code"] == "UPSTREAM_UNAVAILABLE"


class ChattyUpstream(RawUpstream):
    """An upstream that sends its response, then the same bytes again unasked.

    With ``pause`` None both copies go in one write, else the second follows
    ``pause`` seconds later.
    """

    def __init__(self, response: bytes, pause: float | None):
        super().__init__()
        self.response = response
        self.pause = pause
        self.connections = 0

    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        try:
            while True:
                await self.read_request(reader)
                if self.pause is None:
                    writer.write(self.response * 2)
                    await writer.drain()
                    continue
                writer.write(self.response)
                await writer.drain()
                await asyncio.sleep(self.pause)
                writer.write(self.response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize(
    "pause",
    [pytest.param(None, id="same-write"), pytest.param(0.05, id="later-write")],
)
async def test_unrequested_upstream_bytes_drop_connection(start_gateway, pause):
    errors: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(
        lambda loop, context: errors.append(context)
    )
    upstream = ChattyUpstream(upstream_response(b"hello"), pause)
    url = await upstream.start()
    gateway = await start_gateway(upstream_url=url, **{"policy.check_upstream": False})
    connection = await Connection.open(gateway)
    responses = []
    for _ in range(3):
        await connection.send(http_request())
        responses.append(await connection.response())
        await asyncio.sleep(0.1)
    connection.close()
    await upstream.close()

    assert [r.status for r in responses] == [200] * 3
    assert [r.body for r in responses] == [b"hello"] * 3
    # Each upstream connection is dropped once unrequested bytes arrive.
    assert upstream.connections == 3
    assert errors == []


async def test_upstream_head_after_interim_response(start_gateway):
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
    responses = [
        interim + upstream_response(b"first"),
        upstream_response(b"again"),
        interim + upstream_response(b"third"),
    ]
    relayed = await relay_sequence(start_gateway, responses)

    assert [r.status for r in relayed] == [200] * 3
    assert [r.body for r in relayed] == [b"first", b"again", b"third"]
