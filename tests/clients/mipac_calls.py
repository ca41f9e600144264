"""Drive MiPAC through a Misskey server or gateway and print the results as JSON.

Usage: python mipac_calls.py BASE_URL CREDENTIAL

BASE_URL includes the scheme (``http://127.0.0.1:43123``). CREDENTIAL goes
where MiPAC 0.8 takes the Misskey token (``Client(url, token)``). MiPAC then
sends it as ``i`` in every JSON body, and as an ``i`` form field after the file
in ``drive/files/create``. MiPAC 0.8 has no streaming client of its own. Its
companion bot framework MiPA 0.5 connects with MiPAC's aiohttp session to
``ws(s)://HOST/streaming?i=TOKEN``, so the streaming step does the same.

Each step runs on its own, so one failure does not hide the others. Prints one
JSON object that maps each step to ``{"ok": true, "value": ...}`` or ``{"ok":
false, "error": "<type>: <message>"}``. Exits 0 when every step succeeded,
else prints each failed step to stderr and exits 1.

MiPAC 0.6 and newer require Python 3.12.
"""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from mipac.client import Client

# Seconds each step may take; a step that takes longer is reported as failed.
STEP_TIMEOUT = 10.0
UPLOAD_BYTES = b"uploaded by MiPAC\n"
CHANNEL_ID = "mipac-main-1"


async def fetch_me(client: Client) -> Any:
    me = await client.api.get_me()
    return {"id": me.id, "username": me.username}


async def fetch_meta(client: Client) -> Any:
    meta = await client.api.action.get_meta()
    return {"name": meta.name, "version": meta.version}


async def create_note(client: Client) -> Any:
    note = await client.api.note.action.create(text="hello from MiPAC")
    return {"id": note.id, "text": note.text}


async def read_local_timeline(client: Client) -> Any:
    notes = await client.api.note.action.get_local_timeline(limit=5)
    return [{"id": note.id, "text": note.text} for note in notes]


async def upload_file(client: Client) -> Any:
    uploaded = await client.api.drive.files.action.create(
        UPLOAD_BYTES, name="mipac.txt"
    )
    return {"id": uploaded.id, "name": uploaded.name, "size": uploaded.size}


def streaming_url(base_url: str, credential: str) -> str:
    """Build the /streaming URL as MiPA 0.5 does, with the token as ``?i=``.

    MiPA adds the token unencoded; encoding it changes nothing for a JWT.
    """
    parts = urllib.parse.urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    query = urllib.parse.urlencode({"i": credential})
    return f"{scheme}://{parts.netloc}/streaming?{query}"


async def stream_main_channel(client: Client, base_url: str, credential: str) -> Any:
    """Connect to the main channel and return the first channel message for it."""
    url = streaming_url(base_url, credential)
    async with client.http.session.ws_connect(url, heartbeat=60) as socket:
        connect = {"type": "connect", "body": {"channel": "main", "id": CHANNEL_ID}}
        await socket.send_json(connect)
        async for message in socket:
            if message.type is not aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"unexpected WebSocket message: {message.type}")
            frame = json.loads(message.data)
            body = frame.get("body")
            if frame.get("type") != "channel" or not isinstance(body, dict):
                continue
            if body.get("id") == CHANNEL_ID:
                return frame
    raise RuntimeError(
        f"stream closed before a main channel message (close code {socket.close_code})"
    )


async def run_step(step: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
    try:
        value = await asyncio.wait_for(step(), timeout=STEP_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - every failure is reported per step
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "value": value}


async def run_steps(base_url: str, credential: str) -> dict[str, dict[str, Any]]:
    client = Client(base_url, credential, log_level=None)
    steps: dict[str, Callable[[], Awaitable[Any]]] = {
        "i": lambda: fetch_me(client),
        "meta": lambda: fetch_meta(client),
        "notes/create": lambda: create_note(client),
        "notes/local-timeline": lambda: read_local_timeline(client),
        "drive/files/create": lambda: upload_file(client),
        "streaming": lambda: stream_main_channel(client, base_url, credential),
    }
    try:
        return {name: await run_step(step) for name, step in steps.items()}
    finally:
        await client.close_session()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} BASE_URL CREDENTIAL", file=sys.stderr)
        return 2
    results = asyncio.run(run_steps(argv[1], argv[2]))
    print(json.dumps(results))
    failed = {name: result for name, result in results.items() if not result["ok"]}
    for name, result in failed.items():
        print(f"{name} failed: {result['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
