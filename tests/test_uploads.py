"""Multipart uploads to drive/files/create: i rewritten, file streamed as sent."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import pytest

STORED = "misskey-token-alice"
BOUNDARY = "----gateway-test-boundary-7MA4YWxkTrZu0gW"
CLIENTS = Path(__file__).parent / "clients"


def field_part(name: str, value: str) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
        f"{value}\r\n"
    ).encode()


def file_part(content: bytes, filename: str = "photo.jpg") -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()
    return head + content + b"\r\n"


def closing() -> bytes:
    return f"--{BOUNDARY}--\r\n".encode()


def file_bytes(size: int) -> bytes:
    # Random bytes that contain the boundary's leading "--" and CRLFs often.
    block = os.urandom(4096) + b"\r\n--" + BOUNDARY[:10].encode() + b"\r\n"
    return (block * (size // len(block) + 1))[:size]


async def upload(
    gateway, body: bytes, headers: dict[str, str] | None = None, chunked=False
):
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    data: object = io.BytesIO(body)
    if chunked:

        async def pieces():
            for start in range(0, len(body), 65_521):
                yield body[start : start + 65_521]

        data = pieces()
    return await gateway.client.post(
        "/api/drive/files/create",
        data=data,
        headers={"Content-Type": content_type, **(headers or {})},
    )


@pytest.mark.parametrize("chunked", [False, True])
async def test_upload_with_bearer(gateway, chunked):
    content = file_bytes(3 * 1024 * 1024 + 17)
    body = field_part("name", "holiday.jpg") + file_part(content) + closing()
    response = await upload(gateway, body, gateway.bearer(), chunked=chunked)
    sent = gateway.fake.requests_to("drive/files/create")[0]

    assert response.status == 200
    assert (await response.json())["sha256"] == hashlib.sha256(content).hexdigest()
    assert sent.upload.size == len(content)
    assert sent.upload.order == ["field:i", "field:name", "file:file"]
    assert sent.upload.fields == [("i", STORED), ("name", "holiday.jpg")]
    assert "Authorization" not in sent.headers


async def test_upload_credential_in_i_field(gateway):
    content = file_bytes(100_000)
    body = field_part("i", gateway.jwt()) + field_part("folderId", "f1")
    body += file_part(content) + closing()
    response = await upload(gateway, body)
    sent = gateway.fake.requests_to("drive/files/create")[0]

    assert response.status == 200
    assert sent.upload.fields == [("i", STORED), ("folderId", "f1")]
    assert sent.upload.sha256 == hashlib.sha256(content).hexdigest()


async def test_upload_credential_after_file_spooled(gateway):
    # MiPAC sends its fields, then the file, then i.
    content = file_bytes(300_000)
    body = field_part("name", "n.bin") + file_part(content)
    body += field_part("i", gateway.jwt()) + field_part("force", "true") + closing()
    response = await upload(gateway, body)
    sent = gateway.fake.requests_to("drive/files/create")[0]

    assert response.status == 200
    assert sent.upload.order == ["field:i", "field:name", "file:file", "field:force"]
    assert sent.upload.fields == [("i", STORED), ("name", "n.bin"), ("force", "true")]
    assert sent.upload.sha256 == hashlib.sha256(content).hexdigest()


async def test_upload_spool_limit(start_gateway):
    gateway = await start_gateway(**{"server.max_spooled_upload_size": 1000})
    body = file_part(file_bytes(5000)) + field_part("i", gateway.jwt()) + closing()
    response = await upload(gateway, body)
    error = (await response.json())["error"]

    assert response.status == 413
    assert "before the file" in error["message"]
    assert gateway.fake.received == []


async def test_upload_two_credentials_after_file(gateway):
    body = file_part(b"x") + field_part("i", gateway.jwt()) + field_part("i", "y")
    response = await upload(gateway, body + closing())

    assert response.status == 400
    assert gateway.fake.received == []


async def test_upload_i_after_file_dropped(gateway):
    content = file_bytes(10_000)
    body = field_part("comment", "x") + file_part(content)
    body += field_part("i", "misskey-token-of-someone-else") + closing()
    response = await upload(gateway, body, gateway.bearer())
    sent = gateway.fake.requests_to("drive/files/create")[0]

    assert response.status == 200
    assert sent.upload.fields == [("i", STORED), ("comment", "x")]
    assert sent.upload.order == ["field:i", "field:comment", "file:file"]


async def test_upload_without_credential_is_401(gateway):
    body = file_part(b"data") + closing()
    response = await upload(gateway, body)

    assert response.status == 401
    assert (await response.json())["error"]["code"] == "CREDENTIAL_REQUIRED"
    assert gateway.fake.received == []


async def test_upload_bad_credential_is_401(gateway):
    body = field_part("i", STORED) + file_part(b"data") + closing()
    response = await upload(gateway, body)

    assert response.status == 401
    assert (await response.json())["error"]["code"] == "AUTHENTICATION_FAILED"
    assert gateway.fake.received == []


async def test_upload_scope_checked(gateway):
    body = file_part(b"data") + closing()
    response = await upload(gateway, body, gateway.bearer(scope="read:account"))

    assert response.status == 403
    assert gateway.fake.received == []


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/form-data",
        "multipart/form-data; boundary=",
        'multipart/form-data; boundary="a@b"',
    ],
)
async def test_upload_without_boundary_is_400(gateway, content_type):
    response = await gateway.client.post(
        "/api/drive/files/create",
        data=b"--x\r\n",
        headers={"Content-Type": content_type, **gateway.bearer()},
    )

    assert response.status == 400
    assert gateway.fake.received == []


@pytest.mark.parametrize(
    "body",
    [
        b"garbage before the boundary",
        field_part("a", "unterminated")[: -len("\r\n")],
        field_part("i", "a") + field_part("i", "b") + file_part(b"x") + closing(),
    ],
)
async def test_upload_malformed_is_400(gateway, body):
    response = await upload(gateway, body, gateway.bearer())

    assert response.status == 400
    assert gateway.fake.received == []


async def test_upload_upstream_413_relayed(gateway):
    gateway.fake.max_upload_size = 1000
    body = file_part(file_bytes(500_000)) + closing()
    response = await upload(gateway, body, gateway.bearer())

    assert response.status == 413


async def test_upload_over_gateway_limit_is_413(start_gateway):
    gateway = await start_gateway(**{"server.max_upload_size": 10_000})
    body = file_part(file_bytes(20_000)) + closing()
    response = await upload(gateway, body, gateway.bearer())

    assert response.status == 413
    assert (await response.json())["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert gateway.fake.received == []


async def test_multipart_on_json_endpoint_is_415(gateway):
    body = field_part("text", "x") + closing()
    response = await gateway.client.post(
        "/api/notes/create",
        data=body,
        headers={
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
            **gateway.bearer(),
        },
    )

    assert response.status == 415
    assert gateway.fake.received == []


async def test_upload_connection_reused_after(gateway):
    body = file_part(file_bytes(50_000)) + closing()
    first = await upload(gateway, body, gateway.bearer())
    second = await gateway.client.post("/api/i", json={}, headers=gateway.bearer())

    assert first.status == 200
    assert second.status == 200


async def run_client(*command: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, stdout.decode(), stderr.decode()


async def test_misskey_js_upload(gateway):
    script = CLIENTS / "js" / "upload.mjs"
    code, stdout, stderr = await run_client(
        "node", str(script), gateway.url, gateway.jwt(scope="write:drive")
    )

    assert code == 0, stderr
    result = json.loads(stdout)
    sent = gateway.fake.requests_to("drive/files/create")[0]
    assert result["size"] == sent.upload.size
    assert sent.upload.fields[0] == ("i", STORED)


async def test_misskey_py_upload(gateway, tmp_path):
    path = tmp_path / "upload.bin"
    path.write_bytes(file_bytes(200_000))
    script = (
        "import sys, json\n"
        "from misskey import Misskey\n"
        "client = Misskey(sys.argv[1], i=sys.argv[2])\n"
        "with open(sys.argv[3], 'rb') as handle:\n"
        "    print(json.dumps(client.drive_files_create(handle)))\n"
    )
    code, stdout, stderr = await run_client(
        sys.executable, "-c", script, gateway.url, gateway.jwt(scope="*"), str(path)
    )

    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    sent = gateway.fake.requests_to("drive/files/create")[0]
    assert sent.upload.fields[0] == ("i", STORED)
