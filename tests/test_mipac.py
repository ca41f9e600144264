"""MiPAC, given a gateway JWT as its token, works through the gateway.

MiPAC 0.6 and newer require Python 3.12, so the client script runs under
``MIPAC_PYTHON`` when that variable is set, else under the test interpreter,
and the test is skipped when neither can import mipac.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).parent / "clients" / "mipac_calls.py"
STORED = "misskey-token-alice"

pytestmark = pytest.mark.clients


def mipac_python() -> str:
    """Return an interpreter that can import mipac, or skip the test.

    MiPAC 0.6 and newer require Python 3.12, newer than Debian 12's. scripts/test
    builds .venv-mipac with any Python 3.12 or newer it finds and points
    MIPAC_PYTHON at it; without one the test cannot run.
    """
    python = os.environ.get("MIPAC_PYTHON") or sys.executable
    check = subprocess.run(
        [python, "-c", "import mipac"], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        pytest.skip(
            f"{python} cannot import mipac, which needs Python 3.12 or newer; "
            "set MIPAC_PYTHON to a Python with mipac==0.8.1 installed"
        )
    return python


async def run_script(*command: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=90)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode or 0, stdout.decode(), stderr.decode()


def step_value(results: dict[str, Any], step: str) -> Any:
    result = results[step]
    assert result["ok"], f"{step}: {result['error']}"
    return result["value"]


async def test_mipac_through_gateway(gateway):
    python = mipac_python()
    jwt = gateway.jwt(scope="read:account write:notes write:drive")
    code, stdout, stderr = await run_script(python, str(SCRIPT), gateway.url, jwt)

    assert stdout, f"no output, exit status {code}: {stderr}"
    results = json.loads(stdout)

    me = step_value(results, "i")
    assert me["username"] == "alice"
    assert {r.token for r in gateway.fake.requests_to("i")} == {STORED}

    meta = step_value(results, "meta")
    assert meta["version"] == "2026.5.4"
    assert {r.token for r in gateway.fake.requests_to("meta")} == {STORED}

    note = step_value(results, "notes/create")
    assert note["text"] == "hello from MiPAC"
    assert {r.token for r in gateway.fake.requests_to("notes/create")} == {STORED}

    timeline = step_value(results, "notes/local-timeline")
    assert isinstance(timeline, list)
    timeline_requests = gateway.fake.requests_to("notes/local-timeline")
    assert {r.token for r in timeline_requests} == {STORED}

    # MiPAC sends its i field after the file, so the gateway keeps the file in
    # a temporary file until it has read the credential.
    upload = step_value(results, "drive/files/create")
    uploads = gateway.fake.requests_to("drive/files/create")
    assert upload["size"] == uploads[0].upload.size
    assert uploads[0].token == STORED
    assert uploads[0].upload.fields[0] == ("i", STORED)

    frame = step_value(results, "streaming")
    assert frame["type"] == "channel"
    assert frame["body"]["type"] == "connected"
    assert frame["body"]["body"] == {"channel": "main", "user": "alice"}
    streams = gateway.fake.streams
    assert len(streams) == 1
    assert streams[0].token == STORED
    assert streams[0].accepted
    # The gateway moves the token from the client's ?i= into a Bearer header.
    assert streams[0].query_string == ""
    assert streams[0].headers["Authorization"] == f"Bearer {STORED}"

    assert code == 0, stderr
    for request in gateway.fake.received:
        assert jwt not in request.body.decode(errors="replace"), request.path
        assert jwt not in request.query_string, request.path
        assert jwt not in str(request.upload), request.path
        assert "Authorization" not in request.headers, request.path
