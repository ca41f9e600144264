"""The fake Misskey's /streaming WebSocket endpoint.

Like Misskey 2025.7 to 2026.5, it reads the token from ``Authorization:
Bearer`` (exact prefix) before the query ``?i=``, rejects an unknown token, or
a token without ``read:account``, with a plain HTTP 401 before the upgrade,
and accepts connections without a token as anonymous.

Every text frame is answered with ``{"type": "echo", "body": {"received":
<frame>, "user": <username or null>}}``, a ``connect`` message also with a
``channel`` message of type ``connected`` for its id, and every binary frame
with ``b"echo:"`` followed by the frame. The text frame ``{"type":
"close-me", "body": {"code": N, "reason": "..."}}`` makes the server close
the connection with that code.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web
from multidict import CIMultiDict

if TYPE_CHECKING:
    from tests.fake_misskey import Account


@dataclass
class StreamRecord:
    """One /streaming request as the fake Misskey saw it."""

    headers: CIMultiDict[str]
    query_string: str
    token: str | None
    username: str | None = None
    accepted: bool = False
    frames: list[str | bytes] = field(default_factory=list)
    close_code: int | None = None
    close_message: str | None = None
    socket: web.WebSocketResponse | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def close(self, code: int, message: str = "") -> None:
        """Close the connection from the server side."""
        if self.socket is not None:
            await self.socket.close(code=code, message=message.encode())


async def handle_streaming(
    accounts: dict[str, Account], streams: list[StreamRecord], request: web.Request
) -> web.StreamResponse:
    authorization = request.headers.get("Authorization")
    if authorization is not None and authorization.startswith("Bearer "):
        token: str | None = authorization[len("Bearer ") :]
    else:
        token = request.query.get("i")
    record = StreamRecord(
        headers=CIMultiDict(request.headers),
        query_string=request.raw_path.partition("?")[2],
        token=token,
    )
    streams.append(record)

    account = None
    if token is not None:
        account = accounts.get(token)
        if account is None or "read:account" not in account.permissions:
            record.closed.set()
            return web.Response(
                status=401,
                headers={
                    "WWW-Authenticate": (
                        'Bearer realm="Misskey", error="invalid_token", '
                        'error_description="Failed to authenticate"'
                    )
                },
            )
    record.username = account.username if account is not None else None

    socket = web.WebSocketResponse()
    await socket.prepare(request)
    record.socket = socket
    record.accepted = True
    try:
        while True:
            message = await socket.receive()
            if message.type is WSMsgType.TEXT:
                record.frames.append(message.data)
                await _answer_text(socket, record, message.data)
            elif message.type is WSMsgType.BINARY:
                record.frames.append(message.data)
                await socket.send_bytes(b"echo:" + message.data)
            elif message.type is WSMsgType.CLOSE:
                record.close_code = int(message.data)
                record.close_message = message.extra
                break
            else:
                break
    finally:
        if record.close_code is None:
            record.close_code = socket.close_code
        record.closed.set()
    return socket


async def _answer_text(
    socket: web.WebSocketResponse, record: StreamRecord, text: str
) -> None:
    try:
        parsed: Any = json.loads(text)
    except ValueError:
        parsed = text
    kind = parsed.get("type") if isinstance(parsed, dict) else None
    body = parsed.get("body") if isinstance(parsed, dict) else None
    if kind == "close-me" and isinstance(body, dict):
        await socket.close(
            code=int(body["code"]), message=str(body.get("reason", "")).encode()
        )
        return
    await socket.send_json(
        {"type": "echo", "body": {"received": parsed, "user": record.username}}
    )
    if kind == "connect" and isinstance(body, dict):
        await socket.send_json(
            {
                "type": "channel",
                "body": {
                    "id": body.get("id"),
                    "type": "connected",
                    "body": {"channel": body.get("channel"), "user": record.username},
                },
            }
        )
