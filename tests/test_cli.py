"""The ``misskey-gateway`` console script, run as a subprocess.

Every test starts the installed script with an environment that contains no
``MISSKEY_GATEWAY_*`` variable except those the test sets, against the
throwaway Redis server and, where needed, the fake Misskey running in this
process. Subprocesses are started with asyncio so that the fake Misskey keeps
serving while a command runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import RedisServer, free_port
from tests.fake_misskey import VERSION, FakeMisskey

# The script installed next to the interpreter that runs pytest.
CLI = str(Path(sys.executable).with_name("misskey-gateway"))
ENV_PREFIX = "MISSKEY_GATEWAY_"
JWT_SECRET = "cli-test-secret-6b1d0e3f9a27c48e5d1f0a93"
# Seconds to wait for a one-shot command to exit, for `serve` to pass its
# health check, and for `serve` to exit after SIGTERM.
COMMAND_TIMEOUT = 30.0
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
# Connection state of a listening socket in /proc/net/tcp.
TCP_LISTEN = "0A"


@pytest.fixture(autouse=True)
def isolated_data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point XDG_DATA_HOME at a temporary directory for every subprocess.

    Without a Redis URL the gateway keeps tokens in SQLite under
    XDG_DATA_HOME, which must never be the data directory of the user running
    the tests.
    """
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def cli_env(variables: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return os.environ without MISSKEY_GATEWAY_* variables, plus ``variables``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(ENV_PREFIX)
    }
    env.update(variables or {})
    return env


async def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
) -> CliResult:
    """Run ``misskey-gateway ARGS`` to completion and capture its output.

    Without ``stdin`` the command reads from /dev/null.
    """
    stdin_source = asyncio.subprocess.DEVNULL
    input_bytes = None
    if stdin is not None:
        stdin_source = asyncio.subprocess.PIPE
        input_bytes = stdin.encode()
    process = await asyncio.create_subprocess_exec(
        CLI,
        *args,
        stdin=stdin_source,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env) if env is not None else cli_env(),
    )
    try:
        stdout, stderr = await asyncio.wait_for(
            process.communicate(input_bytes), COMMAND_TIMEOUT
        )
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(
            f"misskey-gateway {' '.join(args)} did not exit within {COMMAND_TIMEOUT} s"
        )
    assert process.returncode is not None
    return CliResult(process.returncode, stdout.decode(), stderr.decode())


@dataclass
class Cli:
    """The script bound to the test Redis and this test's key prefix."""

    env: dict[str, str]

    async def __call__(
        self,
        *args: str,
        stdin: str | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> CliResult:
        return await run_cli(*args, env={**self.env, **(extra_env or {})}, stdin=stdin)


@pytest.fixture
def cli(redis_server: RedisServer, redis_prefix: str) -> Cli:
    return Cli(
        cli_env(
            {
                f"{ENV_PREFIX}REDIS_URL": redis_server.url,
                f"{ENV_PREFIX}REDIS_PREFIX": redis_prefix,
            }
        )
    )


@pytest.fixture
async def redis_client(
    redis_server: RedisServer, redis_prefix: str
) -> AsyncIterator[aioredis.Redis]:
    """A client of the test Redis that deletes the test's keys afterwards."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{redis_prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
def upstream_url(upstream_server: TestServer) -> str:
    return str(upstream_server.make_url("")).rstrip("/")


def token_fingerprint(token: str) -> str:
    """Return the fingerprint the CLI prints: the first 16 hex digits of SHA-256."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:16]


def parse_fields(text: str) -> dict[str, str]:
    """Parse ``name: value`` lines, as printed by ``policy show``."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    return fields


# token


async def test_token_set_stores_stdin(
    cli: Cli, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    token = "tok-set-4f1a9c"

    result = await cli("token", "set", "alice", stdin=f"{token}\n")

    assert result.returncode == 0, result.stderr
    assert token_fingerprint(token) in result.stdout
    assert token not in result.stdout
    assert token not in result.stderr
    assert await redis_client.get(f"{redis_prefix}token:alice") == token.encode()


async def test_token_set_overwrites(
    cli: Cli, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    await cli("token", "set", "alice", stdin="tok-old\n")

    result = await cli("token", "set", "alice", stdin="tok-new\n")

    assert result.returncode == 0, result.stderr
    assert await redis_client.get(f"{redis_prefix}token:alice") == b"tok-new"


async def test_token_get_prints_fingerprint(cli: Cli) -> None:
    token = "tok-get-8e2b71"
    await cli("token", "set", "alice", stdin=f"{token}\n")

    result = await cli("token", "get", "alice")

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["alice", token_fingerprint(token)]
    assert token not in result.stdout


async def test_token_get_reveal(cli: Cli) -> None:
    token = "tok-reveal-0d93aa"
    await cli("token", "set", "alice", stdin=f"{token}\n")

    result = await cli("token", "get", "alice", "--reveal")

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{token}\n"


async def test_token_get_missing(cli: Cli) -> None:
    result = await cli("token", "get", "nobody")

    assert result.returncode == 1
    assert "no token stored" in result.stderr


async def test_token_get_invalid_stored_value(
    cli: Cli, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    await redis_client.set(f"{redis_prefix}token:alice", b"has a space")

    result = await cli("token", "get", "alice", "--reveal")

    assert result.returncode == 1
    assert "not a valid token" in result.stderr
    assert "alice" in result.stderr
    assert "has a space" not in result.stdout
    assert "has a space" not in result.stderr


async def test_token_delete_then_get(
    cli: Cli, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    await cli("token", "set", "alice", stdin="tok-delete\n")

    deleted = await cli("token", "delete", "alice")
    result = await cli("token", "get", "alice")

    assert deleted.returncode == 0, deleted.stderr
    assert await redis_client.exists(f"{redis_prefix}token:alice") == 0
    assert result.returncode == 1
    assert "no token stored for alice" in result.stderr


async def test_token_delete_missing(cli: Cli) -> None:
    result = await cli("token", "delete", "nobody")

    assert result.returncode == 1
    assert "no token stored" in result.stderr


async def test_token_list_sorted_own_prefix(
    cli: Cli, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    for principal in ("carol", "alice", "bob"):
        await cli("token", "set", principal, stdin=f"tok-{principal}\n")
    # Keys of another prefix, and a key of this prefix that is not a token.
    await redis_client.set(f"{redis_prefix}other:token:zed", b"tok-zed")
    await redis_client.set(f"other-{redis_prefix}token:yan", b"tok-yan")
    await redis_client.set(f"{redis_prefix}jwt:secret", b"x" * 32)

    try:
        result = await cli("token", "list")
    finally:
        await redis_client.delete(f"other-{redis_prefix}token:yan")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["alice", "bob", "carol"]


async def test_token_list_empty(cli: Cli) -> None:
    result = await cli("token", "list")

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


async def test_token_list_glob_prefix(
    cli: Cli, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    # Glob characters in the prefix are matched literally, so the key below,
    # which the unescaped pattern "<prefix>[ab]*token:*" would match, is not listed.
    prefix = f"{redis_prefix}[ab]*"
    extra_env = {f"{ENV_PREFIX}REDIS_PREFIX": prefix}
    await cli("token", "set", "alice", stdin="tok-alice\n", extra_env=extra_env)
    await redis_client.set(f"{redis_prefix}a-x-token:mallory", b"tok-mallory")

    result = await cli("token", "list", extra_env=extra_env)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["alice"]


@pytest.mark.parametrize(
    "principal",
    ["a b", "../x", "", "-alice", "alice/bob", "a" * 129],
    ids=["space", "dot-dot", "empty", "leading-dash", "slash", "too-long"],
)
async def test_token_set_invalid_principal(
    cli: Cli, redis_client: aioredis.Redis, redis_prefix: str, principal: str
) -> None:
    result = await cli("token", "set", "--", principal, stdin="tok-valid\n")

    assert result.returncode == 1
    assert "invalid principal" in result.stderr
    assert [key async for key in redis_client.scan_iter(match=f"{redis_prefix}*")] == []


@pytest.mark.parametrize("action", ["get", "delete"])
async def test_token_action_invalid_principal(cli: Cli, action: str) -> None:
    result = await cli("token", action, "../x")

    assert result.returncode == 1
    assert "invalid principal" in result.stderr


@pytest.mark.parametrize(
    "stdin",
    ["", "\n", "tok with spaces\n", "tok\tafter-tab\n", "tök-non-ascii\n"],
    ids=["empty", "newline-only", "spaces", "tab", "non-ascii"],
)
async def test_token_set_invalid_token(
    cli: Cli, redis_client: aioredis.Redis, redis_prefix: str, stdin: str
) -> None:
    result = await cli("token", "set", "alice", stdin=stdin)

    assert result.returncode == 1
    assert "invalid token" in result.stderr
    assert await redis_client.exists(f"{redis_prefix}token:alice") == 0
    if stdin.strip():
        assert stdin.strip() not in result.stderr


async def test_token_redis_unreachable() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"

    result = await run_cli("token", "get", "alice", "--redis-url", url)

    assert result.returncode == 1
    assert url in result.stderr


# jwt


async def test_jwt_issue_with_secret(cli: Cli) -> None:
    result = await cli(
        "jwt",
        "issue",
        "alice",
        "--scope",
        "read:account write:notes",
        "--ttl",
        "60",
        extra_env={f"{ENV_PREFIX}JWT_SECRET": JWT_SECRET},
    )

    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert set(claims["scope"].split()) == {"read:account", "write:notes"}
    assert claims["exp"] - claims["iat"] == 60


async def test_jwt_issue_default_ttl(cli: Cli) -> None:
    result = await cli(
        "jwt", "issue", "alice", extra_env={f"{ENV_PREFIX}JWT_SECRET": JWT_SECRET}
    )

    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), JWT_SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["scope"] == ""


async def test_jwt_issue_secret_skips_redis() -> None:
    # With a configured secret the command signs locally and never needs Redis.
    env = cli_env({f"{ENV_PREFIX}JWT_SECRET": JWT_SECRET})
    url = f"redis://127.0.0.1:{free_port()}/0"

    result = await run_cli("jwt", "issue", "alice", "--redis-url", url, env=env)

    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"


async def test_jwt_issue_redis_secret(
    cli: Cli, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    first = await cli("jwt", "issue", "alice", "--scope", "read:account")
    secret = await redis_client.get(f"{redis_prefix}jwt:secret")
    second = await cli("jwt", "issue", "bob")

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert secret is not None
    assert len(secret) >= 32
    assert await redis_client.get(f"{redis_prefix}jwt:secret") == secret
    first_claims = jwt.decode(first.stdout.strip(), secret, algorithms=["HS256"])
    second_claims = jwt.decode(second.stdout.strip(), secret, algorithms=["HS256"])
    assert first_claims["sub"] == "alice"
    assert first_claims["scope"] == "read:account"
    assert second_claims["sub"] == "bob"


@pytest.mark.parametrize("ttl", ["0", "-5"])
async def test_jwt_issue_invalid_ttl(cli: Cli, ttl: str) -> None:
    result = await cli(
        "jwt",
        "issue",
        "alice",
        f"--ttl={ttl}",
        extra_env={f"{ENV_PREFIX}JWT_SECRET": JWT_SECRET},
    )

    assert result.returncode == 1
    assert "--ttl" in result.stderr
    assert result.stdout == ""


async def test_jwt_issue_invalid_principal(cli: Cli) -> None:
    result = await cli(
        "jwt", "issue", "a b", extra_env={f"{ENV_PREFIX}JWT_SECRET": JWT_SECRET}
    )

    assert result.returncode == 1
    assert "invalid principal" in result.stderr
    assert result.stdout == ""


# policy


async def test_policy_show_default_row() -> None:
    result = await run_cli("policy", "show", "notes/create")

    assert result.returncode == 0, result.stderr
    fields = parse_fields(result.stdout)
    assert fields["endpoint"] == "notes/create"
    assert fields["mode"] == "required"
    assert fields["kind"] == "write:notes"
    assert fields["allow_get"] == "false"
    assert fields["source"] == "default"


async def test_policy_show_api_path() -> None:
    result = await run_cli("policy", "show", "/api/meta")

    assert result.returncode == 0, result.stderr
    fields = parse_fields(result.stdout)
    assert fields["endpoint"] == "meta"
    assert fields["mode"] == "optional"
    assert fields["source"] == "default"


async def test_policy_show_config_override(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[policy.endpoints]\n"meta" = "deny"\n')

    result = await run_cli("policy", "show", "meta", "--config", str(config))

    assert result.returncode == 0, result.stderr
    fields = parse_fields(result.stdout)
    assert fields["mode"] == "deny"
    assert fields["source"] == "override"


async def test_policy_show_config_env(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[policy.endpoints]\n"notes/create" = { mode = "optional", allow_get = true }\n'
    )
    env = cli_env({f"{ENV_PREFIX}CONFIG": str(config)})

    result = await run_cli("policy", "show", "notes/create", env=env)

    assert result.returncode == 0, result.stderr
    fields = parse_fields(result.stdout)
    assert fields["mode"] == "optional"
    assert fields["kind"] == "write:notes"
    assert fields["allow_get"] == "true"
    assert fields["source"] == "override"


async def test_policy_show_unknown_endpoint() -> None:
    result = await run_cli("policy", "show", "no/such-endpoint")

    assert result.returncode == 0, result.stderr
    fields = parse_fields(result.stdout)
    assert fields["endpoint"] == "no/such-endpoint"
    assert fields["mode"] == "required"
    assert fields["kind"] == "-"
    assert fields["source"] == "unknown endpoint"


# configuration errors


@pytest.mark.parametrize(
    ("document", "key"),
    [
        ("[server]\nportt = 8080\n", "server.portt"),
        ("[srever]\nport = 8080\n", "srever"),
        ('[policy.endpoints]\n"meta" = "sometimes"\n', "mode"),
        ("[server]\nport = ", "invalid TOML"),
    ],
    ids=["unknown-key", "unknown-section", "invalid-mode", "invalid-toml"],
)
async def test_config_file_invalid(tmp_path: Path, document: str, key: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(document)

    result = await run_cli("policy", "show", "meta", "--config", str(config))

    assert result.returncode == 2
    assert key in result.stderr
    assert result.stdout == ""


async def test_config_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"

    result = await run_cli("policy", "show", "meta", "--config", str(missing))

    assert result.returncode == 2
    assert str(missing) in result.stderr


async def test_config_env_port_not_integer() -> None:
    env = cli_env({f"{ENV_PREFIX}SERVER_PORT": "abc"})

    result = await run_cli("policy", "show", "meta", env=env)

    assert result.returncode == 2
    assert "server.port" in result.stderr
    assert f"{ENV_PREFIX}SERVER_PORT" in result.stderr


async def test_config_env_unknown_variable() -> None:
    env = cli_env({f"{ENV_PREFIX}SERVER_PROT": "8080"})

    result = await run_cli("policy", "show", "meta", env=env)

    assert result.returncode == 2
    assert f"{ENV_PREFIX}SERVER_PROT" in result.stderr


async def test_config_jwt_secret_short() -> None:
    secret = "tiny-7c2e"
    env = cli_env({f"{ENV_PREFIX}JWT_SECRET": secret})

    result = await run_cli("jwt", "issue", "alice", env=env)

    assert result.returncode == 2
    assert "jwt.secret" in result.stderr
    assert secret not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("command", ["serve", "check"])
async def test_config_upstream_missing(cli: Cli, command: str) -> None:
    result = await cli(command)

    assert result.returncode == 2
    assert "upstream.url" in result.stderr


async def test_config_upstream_invalid(cli: Cli) -> None:
    result = await cli("check", "--upstream", "ftp://127.0.0.1/")

    assert result.returncode == 2
    assert "upstream.url" in result.stderr


# check


async def test_check_ok(redis_server: RedisServer, upstream_url: str) -> None:
    result = await run_cli(
        "check", "--upstream", upstream_url, "--redis-url", redis_server.url
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("config: ok")
    assert ": ok" in lines[1]
    assert redis_server.url in lines[1]
    assert lines[2].startswith("upstream: ok")
    assert VERSION in lines[2]


async def test_check_redis_unreachable(upstream_url: str) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"

    result = await run_cli("check", "--upstream", upstream_url, "--redis-url", url)

    assert result.returncode == 1
    assert "redis" in result.stderr
    assert url in result.stderr
    assert url not in result.stdout


async def test_check_redis_password_hidden(
    redis_server: RedisServer, upstream_url: str
) -> None:
    # The test Redis has no password configured and accepts the connection,
    # so `check` prints the URL with the password replaced.
    password = "pw-5e0c9b1d"
    url = f"redis://:{password}@127.0.0.1:{redis_server.port}/0"

    result = await run_cli("check", "--upstream", upstream_url, "--redis-url", url)

    assert result.returncode == 0, result.stderr
    assert f"redis://:***@127.0.0.1:{redis_server.port}/0" in result.stdout
    assert password not in result.stdout
    assert password not in result.stderr


async def test_check_upstream_unreachable(redis_server: RedisServer) -> None:
    upstream = f"http://127.0.0.1:{free_port()}"

    result = await run_cli(
        "check", "--upstream", upstream, "--redis-url", redis_server.url
    )

    assert result.returncode == 1
    assert "upstream" in result.stderr
    assert upstream in result.stderr
    assert redis_server.url in result.stdout


async def test_check_upstream_not_misskey(
    redis_server: RedisServer, upstream_url: str, fake_misskey: FakeMisskey
) -> None:
    async def not_found(request: Any, received: Any) -> web.Response:
        return web.Response(status=404, text="not here")

    fake_misskey.handlers["meta"] = not_found

    result = await run_cli(
        "check", "--upstream", upstream_url, "--redis-url", redis_server.url
    )

    assert result.returncode == 1
    assert "404" in result.stderr


# serve


@dataclass
class ServeProcess:
    """A running ``misskey-gateway serve`` and the output it has written so far."""

    process: asyncio.subprocess.Process
    port: int
    stdout_lines: list[str] = field(default_factory=list)
    stderr_lines: list[str] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stdout(self) -> str:
        return "".join(self.stdout_lines)

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def events(self, name: str) -> list[dict[str, Any]]:
        """Return the JSON log events on stdout whose ``event`` is ``name``."""
        records = [json.loads(line) for line in self.stdout_lines if line.strip()]
        return [record for record in records if record.get("event") == name]

    async def terminate(self) -> int:
        """Send SIGTERM and return the exit status, failing after STOP_TIMEOUT."""
        self.process.send_signal(signal.SIGTERM)
        try:
            returncode = await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            pytest.fail(f"serve did not exit within {STOP_TIMEOUT} s of SIGTERM")
        await asyncio.gather(*self.readers)
        return returncode


async def _collect_lines(stream: asyncio.StreamReader | None, lines: list[str]) -> None:
    assert stream is not None
    async for line in stream:
        lines.append(line.decode(errors="replace"))


def descendant_pids(pid: int) -> set[int]:
    """Return the pids of every descendant of ``pid``, read from /proc."""
    found: set[int] = set()
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                children = (task / "children").read_text().split()
            except FileNotFoundError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    pending.append(child)
    return found


def listening_socket_owners(port: int, pids: set[int]) -> set[int]:
    """Return which of ``pids`` have a TCP socket listening on 127.0.0.1:``port``."""
    local_address = f"0100007F:{port:04X}"
    inodes: set[str] = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        columns = line.split()
        if columns[1] == local_address and columns[3] == TCP_LISTEN:
            inodes.add(columns[9])
    owners: set[int] = set()
    for pid in pids:
        try:
            descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
        except (FileNotFoundError, PermissionError):
            continue
        for descriptor in descriptors:
            try:
                target = os.readlink(descriptor)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                owners.add(pid)
    return owners


def kill_pids(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def wait_healthy(serve: ServeProcess) -> None:
    """Poll ``/_gateway/healthz`` until it returns 200, for up to START_TIMEOUT."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    request_timeout = aiohttp.ClientTimeout(total=1)
    async with aiohttp.ClientSession(timeout=request_timeout) as session:
        while True:
            if serve.process.returncode is not None:
                await asyncio.gather(*serve.readers)
                pytest.fail(
                    f"serve exited with {serve.process.returncode} before it was "
                    f"healthy; stderr:\n{serve.stderr}"
                )
            try:
                async with session.get(f"{serve.url}/_gateway/healthz") as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if loop.time() > deadline:
                pytest.fail(
                    f"serve did not answer its health check within {START_TIMEOUT} s"
                )
            await asyncio.sleep(0.05)


@asynccontextmanager
async def serve_gateway(
    *args: str, env: Mapping[str, str], port: int | None = None
) -> AsyncIterator[ServeProcess]:
    """Run ``misskey-gateway serve ARGS --port PORT`` until the block ends.

    The process is healthy when the block starts. If it still runs when the
    block ends, it and every process it started are killed.
    """
    port = free_port() if port is None else port
    process = await asyncio.create_subprocess_exec(
        CLI,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
    )
    serve = ServeProcess(process=process, port=port)
    serve.readers = [
        asyncio.create_task(_collect_lines(process.stdout, serve.stdout_lines)),
        asyncio.create_task(_collect_lines(process.stderr, serve.stderr_lines)),
    ]
    try:
        await wait_healthy(serve)
        yield serve
    finally:
        if process.returncode is None:
            children = descendant_pids(process.pid)
            process.kill()
            kill_pids(children)
            await process.wait()
        await asyncio.gather(*serve.readers)


@pytest.fixture
def serve_env(redis_server: RedisServer, redis_prefix: str) -> dict[str, str]:
    return cli_env(
        {
            f"{ENV_PREFIX}JWT_SECRET": JWT_SECRET,
            f"{ENV_PREFIX}REDIS_PREFIX": redis_prefix,
        }
    )


async def post_note(gateway_url: str, bearer: str) -> tuple[int, str, str]:
    """POST notes/create with a bearer JWT and a cookie.

    Returns the status, the body and the X-Request-Id response header.
    """
    headers = {
        "Authorization": f"Bearer {bearer}",
        "Cookie": "session=browser-cookie-3a7f",
        "Content-Type": "application/json",
    }
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(
            f"{gateway_url}/api/notes/create", data=b'{"text":"hi"}', headers=headers
        ) as response:
            return (
                response.status,
                await response.text(),
                response.headers.get("X-Request-Id", ""),
            )


async def test_serve_end_to_end(
    serve_env: dict[str, str],
    redis_server: RedisServer,
    upstream_url: str,
    fake_misskey: FakeMisskey,
    redis_client: aioredis.Redis,
) -> None:
    first_token = "misskey-token-e2e-1"
    second_token = "misskey-token-e2e-2"
    fake_misskey.add_token(first_token, "alice")
    fake_misskey.add_token(second_token, "alice")
    redis_args = ("--redis-url", redis_server.url)

    async with serve_gateway(
        "--upstream", upstream_url, *redis_args, env=serve_env
    ) as serve:
        stored = await run_cli(
            "token",
            "set",
            "alice",
            *redis_args,
            env=serve_env,
            stdin=f"{first_token}\n",
        )
        issued = await run_cli(
            "jwt",
            "issue",
            "alice",
            "--scope",
            "read:account write:notes",
            *redis_args,
            env=serve_env,
        )
        assert stored.returncode == 0, stored.stderr
        assert issued.returncode == 0, issued.stderr
        bearer = issued.stdout.strip()

        first_status, first_body, first_id = await post_note(serve.url, bearer)
        first_received = fake_misskey.requests_to("notes/create")[-1]

        rotated = await run_cli(
            "token",
            "set",
            "alice",
            *redis_args,
            env=serve_env,
            stdin=f"{second_token}\n",
        )
        assert rotated.returncode == 0, rotated.stderr
        second_status, _, second_id = await post_note(serve.url, bearer)
        second_received = fake_misskey.requests_to("notes/create")[-1]

        returncode = await serve.terminate()

    assert first_status == 200, first_body
    assert json.loads(first_body)["createdNote"]["text"] == "hi"
    assert first_received.body == f'{{"i":"{first_token}","text":"hi"}}'.encode()
    assert "Authorization" not in first_received.headers
    assert "Cookie" not in first_received.headers

    assert second_status == 200
    assert second_received.body == f'{{"i":"{second_token}","text":"hi"}}'.encode()
    assert "Authorization" not in second_received.headers
    assert "Cookie" not in second_received.headers
    assert len(fake_misskey.requests_to("notes/create")) == 2

    assert returncode == 0, serve.stderr
    assert len(serve.events("gateway.stopped")) == 1
    for line in serve.stdout_lines:
        assert isinstance(json.loads(line), dict), line
    requests = serve.events("request")
    assert len(requests) == 2
    for record, request_id in zip(requests, (first_id, second_id), strict=True):
        assert record["request_id"] == request_id
        assert record["principal"] == "alice"
        assert record["endpoint"] == "notes/create"
        assert record["mode"] == "required"
        assert record["status"] == 200
        assert record["upstream_status"] == 200
        assert isinstance(record["duration_ms"], int | float)
        assert record["duration_ms"] >= 0
    assert first_id != second_id

    for name, text in (("stdout", serve.stdout), ("stderr", serve.stderr)):
        assert first_token not in text, f"serve {name}"
        assert second_token not in text, f"serve {name}"
        assert bearer not in text, f"serve {name}"
        assert JWT_SECRET not in text, f"serve {name}"
    for command in (stored, rotated):
        assert first_token not in command.stdout + command.stderr
        assert second_token not in command.stdout + command.stderr


async def test_serve_redis_secret_jwt(
    redis_server: RedisServer,
    redis_prefix: str,
    upstream_url: str,
    fake_misskey: FakeMisskey,
    redis_client: aioredis.Redis,
) -> None:
    # Without jwt.secret, `jwt issue` and `serve` share the secret kept in Redis.
    token = "misskey-token-shared-secret"
    fake_misskey.add_token(token, "alice")
    env = cli_env(
        {
            f"{ENV_PREFIX}REDIS_URL": redis_server.url,
            f"{ENV_PREFIX}REDIS_PREFIX": redis_prefix,
        }
    )

    async with serve_gateway("--upstream", upstream_url, env=env) as serve:
        stored = await run_cli("token", "set", "alice", env=env, stdin=f"{token}\n")
        issued = await run_cli(
            "jwt", "issue", "alice", "--scope", "write:notes", env=env
        )
        status, body, _ = await post_note(serve.url, issued.stdout.strip())
        returncode = await serve.terminate()

    assert stored.returncode == 0, stored.stderr
    assert issued.returncode == 0, issued.stderr
    assert status == 200, body
    received = fake_misskey.requests_to("notes/create")[-1]
    assert received.body == f'{{"i":"{token}","text":"hi"}}'.encode()
    assert returncode == 0, serve.stderr


async def test_serve_rejects_foreign_jwt(
    serve_env: dict[str, str],
    redis_server: RedisServer,
    upstream_url: str,
    fake_misskey: FakeMisskey,
) -> None:
    other_env = {**serve_env, f"{ENV_PREFIX}JWT_SECRET": "another-secret-" + "0" * 32}
    issued = await run_cli(
        "jwt", "issue", "alice", "--scope", "write:notes", env=other_env
    )

    async with serve_gateway(
        "--upstream", upstream_url, "--redis-url", redis_server.url, env=serve_env
    ) as serve:
        status, body, _ = await post_note(serve.url, issued.stdout.strip())
        returncode = await serve.terminate()

    assert issued.returncode == 0, issued.stderr
    assert status == 401
    assert json.loads(body)["error"]["code"] == "AUTHENTICATION_FAILED"
    assert fake_misskey.requests_to("notes/create") == []
    assert returncode == 0, serve.stderr


async def test_serve_two_workers(
    serve_env: dict[str, str], redis_server: RedisServer, upstream_url: str
) -> None:
    port = free_port()
    args = ("--upstream", upstream_url, "--redis-url", redis_server.url)
    loop = asyncio.get_running_loop()

    async with serve_gateway(
        *args, "--workers", "2", env=serve_env, port=port
    ) as serve:
        # The health check passes once one worker listens, so wait until both do.
        deadline = loop.time() + START_TIMEOUT
        workers = descendant_pids(serve.process.pid)
        while (
            len(listening_socket_owners(port, workers)) < 2 and loop.time() < deadline
        ):
            await asyncio.sleep(0.05)
            workers = descendant_pids(serve.process.pid)
        listeners = listening_socket_owners(port, workers)

        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            statuses = []
            for _ in range(4):
                async with session.get(f"{serve.url}/_gateway/healthz") as response:
                    statuses.append(response.status)

        returncode = await serve.terminate()

    assert len(listeners) == 2
    assert serve.process.pid not in listeners
    assert statuses == [200, 200, 200, 200]
    assert returncode == 0, serve.stderr
    assert [pid for pid in listeners if pid_alive(pid)] == []
    assert len(serve.events("gateway.starting")) == 2


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_serve_port_in_use(
    serve_env: dict[str, str],
    redis_server: RedisServer,
    upstream_url: str,
    workers: str,
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]

        result = await run_cli(
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            workers,
            "--upstream",
            upstream_url,
            "--redis-url",
            redis_server.url,
            env=serve_env,
        )

    assert result.returncode == 1
    assert str(port) in result.stderr
    assert "address already in use" in result.stderr
    assert "Traceback" not in result.stderr
