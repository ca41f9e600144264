"""Flow control, hand-off and shutdown cases of the lean server, over real sockets.

The client in these tests pipelines many requests and then stops reading, the
way a slow or hostile client on a long network path does. Once the kernel's
socket buffers are full, every further response byte waits in the server's
own transport buffer, so its size shows how much memory one connection can
pin. aiohttp's server waits for that buffer to drain after each response;
the tests expect the lean server to bound it in the same way.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from tests.test_server import (
    JSON,
    WAIT_SECONDS,
    Connection,
    bearer,
    front_server,
    http_request,
    read_body,
    read_head,
    start_with_token,
)

pytestmark = pytest.mark.parametrize("store_backend", ["sqlite"], indirect=True)

# Size of each upstream response body. It is small enough to arrive with its
# head in one read, so the lean server writes each response in one call.
RESPONSE_SIZE = 32 * 1024
# Requests pipelined by the client: 8 MiB of responses, well beyond what the
# kernel buffers of a loopback connection hold (about 3 MiB in one run of
# test_aiohttp_pipelining_bounded on Linux 6, 92 responses).
PIPELINED = 256
# Largest server-side transport buffer, in bytes, that a client which stops
# reading may cause. aiohttp stays near its 64 KiB high-water mark plus one
# response, so 1 MiB leaves ample room.
MAX_WRITE_BUFFER = 1024 * 1024
# Seconds without a new upstream request after which the server is taken to
# have stopped serving the pipelined requests.
QUIET_SECONDS = 0.3
# Receive buffer, in bytes, of the client socket that stops reading.
CLIENT_RECEIVE_BUFFER = 4096


async def sized_response(request: web.Request, received: object) -> web.Response:
    return web.Response(body=b"x" * RESPONSE_SIZE, content_type="application/json")


async def open_slow_reader(gateway) -> Connection:
    """Open a connection with a small receive buffer, for a client that stops reading.

    The socket is connected before asyncio wraps it, because the buffer size
    must be set before the connection is made to take effect.
    """
    server = gateway.client.server
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RECEIVE_BUFFER)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (server.host, server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    return Connection(reader, writer)


def pipelined_requests(gateway, count: int = PIPELINED) -> bytes:
    authorization = bearer(gateway)
    request = http_request("/api/fake/sized", headers=[JSON, authorization])
    return request * count


async def wait_for_quiet(gateway) -> int:
    """Wait until the upstream gets no new request; return how many it got."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    count = -1
    changed_at = loop.time()
    while loop.time() < deadline:
        current = len(gateway.fake.requests_to("fake/sized"))
        if current != count:
            count = current
            changed_at = loop.time()
        elif count == PIPELINED or loop.time() - changed_at > QUIET_SECONDS:
            return count
        await asyncio.sleep(0.02)
    return count


def lean_write_buffer(gateway) -> int:
    """Return the bytes waiting in the lean server's transport buffers."""
    return sum(
        connection._transport.get_write_buffer_size()
        for connection in front_server(gateway).connections
        if connection._transport is not None
    )


def aiohttp_write_buffer(gateway) -> int:
    """Return the bytes waiting in the transport buffers of aiohttp's server."""
    server = gateway.client.server.runner.server
    assert isinstance(server, web.Server)
    return sum(
        handler.transport.get_write_buffer_size()
        for handler in server.connections
        if handler.transport is not None
    )


async def read_responses(connection: Connection) -> tuple[int, bool]:
    """Read responses until the server closes the connection.

    Returns the number of complete responses and whether the last one was truncated.
    """
    count = 0
    while True:
        try:
            head = await read_head(connection.reader)
        except asyncio.IncompleteReadError as error:
            return count, bool(error.partial)
        except ConnectionResetError:
            return count, True
        try:
            await read_body(connection.reader, head)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return count, True
        count += 1


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[str]]:
    """Messages passed to the event loop's exception handler during the test."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    messages: list[str] = []

    def record(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        messages.append(str(context.get("message")))

    loop.set_exception_handler(record)
    yield messages
    loop.set_exception_handler(previous)


# Back-pressure between pipelined responses


async def test_aiohttp_pipelining_bounded(start_gateway):
    """aiohttp's server, for reference: its buffer stays small."""
    gateway = await start_with_token(start_gateway, **{"server.fast_path": False})
    gateway.fake.handlers["fake/sized"] = sized_response
    connection = await open_slow_reader(gateway)
    await connection.send(pipelined_requests(gateway))
    served = await wait_for_quiet(gateway)
    buffered = aiohttp_write_buffer(gateway)
    connection.close()

    assert served < PIPELINED
    assert buffered <= MAX_WRITE_BUFFER


async def test_pipelined_responses_bounded(start_gateway):
    gateway = await start_with_token(start_gateway)
    gateway.fake.handlers["fake/sized"] = sized_response
    connection = await open_slow_reader(gateway)
    await connection.send(pipelined_requests(gateway))
    await wait_for_quiet(gateway)
    buffered = lean_write_buffer(gateway)
    connection.close()

    assert buffered <= MAX_WRITE_BUFFER


# Hand-off while the client is not reading


async def test_hand_off_while_writing_paused(start_gateway, loop_errors):
    gateway = await start_with_token(start_gateway)
    gateway.fake.handlers["fake/sized"] = sized_response
    connection = await open_slow_reader(gateway)
    health = b"GET /_gateway/healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    await connection.send(pipelined_requests(gateway) + health)
    await wait_for_quiet(gateway)
    count, truncated = await read_responses(connection)
    connection.close()

    assert count == PIPELINED + 1
    assert not truncated
    assert not [message for message in loop_errors if "resume_writing" in message]


# Graceful shutdown


async def test_shutdown_keeps_written_responses(start_gateway):
    gateway = await start_with_token(start_gateway)
    gateway.fake.handlers["fake/sized"] = sized_response
    connection = await open_slow_reader(gateway)
    await connection.send(pipelined_requests(gateway))
    await wait_for_quiet(gateway)
    closing = asyncio.create_task(gateway.client.server.close())
    # Give the server time to start its shutdown before the client reads on.
    await asyncio.sleep(QUIET_SECONDS)
    count, truncated = await read_responses(connection)
    await asyncio.wait_for(closing, WAIT_SECONDS)
    connection.close()

    assert count > 0
    assert not truncated


# Half-close


async def test_half_close_answers_pipelined(gateway):
    connection = await Connection.open(gateway)
    await connection.send(http_request(body=b'{"n":1}') + http_request(body=b'{"n":2}'))
    connection.writer.write_eof()
    count, truncated = await read_responses(connection)
    connection.close()

    assert not truncated
    assert count == 2
