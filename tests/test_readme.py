"""The README's first-run commands, run as written against the fake Misskey."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PLACEHOLDER_UPSTREAM = "https://misskey.example"
PLACEHOLDER_TOKEN = "YOUR-MISSKEY-ACCESS-TOKEN"
README_PORT = "8080"


def section_code_blocks(heading: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else None]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)


def serve_command() -> str:
    """Return the part of the README's install command that starts the gateway."""
    install = section_code_blocks("Set up")[0].strip()
    steps = [step.strip() for step in install.split("&&")]
    serve = [step for step in steps if " serve " in f"{step} "]
    assert len(serve) == 1, install
    return serve[0]


@pytest.fixture
def readme_env(tmp_path):
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MISSKEY_GATEWAY_")
    }
    env["HOME"] = str(tmp_path / "home")
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    return env


async def test_readme_first_run(upstream_server, fake_misskey, readme_env, tmp_path):
    assert (ROOT / ".venv/bin/misskey-gateway").exists(), "scripts/test creates .venv"
    upstream = str(upstream_server.make_url("")).rstrip("/")
    port = str(free_port())
    token = "readme-token-0123456789"
    fake_misskey.add_token(token, "alice")
    readme_env["MISSKEY_GATEWAY_PORT"] = port

    serve = serve_command().replace(PLACEHOLDER_UPSTREAM, upstream)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        server = await asyncio.create_subprocess_exec(
            *shlex.split(serve), cwd=ROOT, env=readme_env, stdout=log, stderr=log
        )
    try:
        await wait_until_healthy(port)
        script = section_code_blocks("First request")[0]
        script = script.replace(PLACEHOLDER_TOKEN, token)
        script = script.replace(f"127.0.0.1:{README_PORT}", f"127.0.0.1:{port}")
        shell = await asyncio.create_subprocess_exec(
            "bash", "-euo", "pipefail", "-c", script,
            cwd=ROOT, env=readme_env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(shell.communicate(), 60)
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 10)
    log_lines = log_path.read_text().splitlines()

    assert shell.returncode == 0, stderr.decode()
    assert json.loads(stdout.splitlines()[-1])["username"] == "alice"
    sent = fake_misskey.requests_to("i")
    assert len(sent) == 1
    assert sent[0].body == f'{{"i":"{token}"}}'.encode()
    assert "Authorization" not in sent[0].headers
    starting = [json.loads(line) for line in log_lines if '"gateway.starting"' in line]
    assert starting[0]["store"] == f"sqlite {tmp_path}/data/misskey-gateway/store.db"
    assert token not in "\n".join(log_lines)
    database = tmp_path / "data/misskey-gateway/store.db"
    assert oct(database.stat().st_mode & 0o777) == "0o600"


async def wait_until_healthy(port: str) -> None:
    url = f"http://127.0.0.1:{port}/_gateway/healthz"
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"the gateway did not become healthy on port {port}")
