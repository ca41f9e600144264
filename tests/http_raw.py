"""Send hand-written HTTP/1.1 requests, for inputs an HTTP client would tidy up."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

READ_TIMEOUT_SECONDS = 10


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


async def send_raw(host: str, port: int, request: bytes) -> RawResponse:
    """Send ``request`` as is on a new connection and read one response.

    The request should carry ``Connection: close`` so the response ends with
    the connection.
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), READ_TIMEOUT_SECONDS)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return RawResponse(status=status, headers=headers, body=body)
