"""Shared fixtures: a throwaway Redis server, the fake Misskey, and the gateway."""

from __future__ import annotations

import asyncio
import io
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import SETTINGS_KEY, STORE_KEY, create_app
from gateway.config import Settings, load_settings
from gateway.credentials import issue_jwt
from gateway.logs import configure_logging
from gateway.server import FrontProtocol, FrontServer, GatewayRunner
from gateway.store import TokenStore
from tests.fake_misskey import FakeMisskey

JWT_SECRET = "test-secret-0123456789abcdef0123456789abcdef"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server process on a free loopback port, keeping nothing on disk."""

    def __init__(self, directory: Path, persistent: bool = False):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed; run scripts/test to install it"
            )
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                # A persistent server reloads its data when restarted.
                "--appendonly", "yes" if self.persistent else "no",
                "--appendfsync", "always",
                "--dir", str(self.directory),
                "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise RuntimeError(
                            f"redis-server did not start on {self.port}"
                        ) from None
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of its own for each test, so tests never see each other's keys."""
    return f"test-{uuid.uuid4().hex[:12]}:"


# Tokens and credentials a test handed out; no log line may contain one.
SECRETS: set[str] = set()


def remember_secret(value: str) -> str:
    SECRETS.add(value)
    return value


@pytest.fixture(autouse=True)
def no_secrets_in_logs() -> Iterator[None]:
    """Capture every test's gateway logs and fail the test if a secret is in them.

    The secrets are the JWT signing secret, every JWT the ``Gateway`` helper
    issued and every Misskey token a test stored or gave the fake Misskey.
    """
    buffer = io.StringIO()
    configure_logging("debug", "json", stream=buffer, cache=False)
    SECRETS.clear()
    SECRETS.add(JWT_SECRET)
    RESPONSES.clear()
    yield
    text = buffer.getvalue()
    leaked = sorted(secret for secret in SECRETS if secret and secret in text)
    # Responses may carry JWTs back to the client that sent them, but never a stored
    # Misskey token or the signing secret.
    sent = "\n".join(RESPONSES)
    exposed = sorted(
        secret for secret in SECRETS - ISSUED_JWTS if secret and secret in sent
    )
    SECRETS.clear()
    ISSUED_JWTS.clear()
    RESPONSES.clear()
    assert not leaked, f"{len(leaked)} secret(s) appeared in the gateway's logs"
    assert not exposed, f"{len(exposed)} secret(s) appeared in gateway responses"


# Headers and complete bodies of every response the gateways under test sent.
RESPONSES: list[str] = []
ISSUED_JWTS: set[str] = set()


async def record_response(request: web.Request, response: web.StreamResponse) -> None:
    body = getattr(response, "body", None)
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else ""
    RESPONSES.append(str(dict(response.headers)) + "\n" + text)


# Queues that receive every chunk the lean server reads, for the tests that
# wait for bytes to arrive.
READ_OBSERVERS: list[asyncio.Queue[bytes]] = []


class RecordingProtocol(FrontProtocol):
    """The lean server's connection, recording every byte it sends and reads."""

    def write(self, data: bytes) -> None:
        RESPONSES.append(data.decode("utf-8", "replace"))
        super().write(data)

    def data_received(self, data: bytes) -> None:
        for observer in READ_OBSERVERS:
            observer.put_nowait(data)
        super().data_received(data)


class RecordingFrontServer(FrontServer):
    protocol_class = RecordingProtocol


class RecordingRunner(GatewayRunner):
    front_class = RecordingFrontServer


class GatewayTestServer(TestServer):
    """aiohttp's test server running the gateway's own server stack."""

    async def _make_runner(self, **kwargs: Any) -> GatewayRunner:
        assert isinstance(self.app, web.Application)
        return RecordingRunner(self.app, self.app[SETTINGS_KEY], **kwargs)


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """The gateway's rendered JSON log lines, captured for the test."""
    buffer = io.StringIO()
    configure_logging("debug", "json", stream=buffer, cache=False)
    yield buffer
    configure_logging("warning", "json", stream=io.StringIO(), cache=False)


@pytest.fixture
def fake_misskey() -> FakeMisskey:
    return FakeMisskey()


@pytest.fixture
async def upstream_server(fake_misskey: FakeMisskey) -> AsyncIterator[TestServer]:
    server = TestServer(fake_misskey.make_app(), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture(params=["redis", "sqlite"])
def store_backend(request: pytest.FixtureRequest) -> str:
    """The token store kind; gateway tests run once against each.

    Tests that only make sense for one kind parametrize this fixture
    indirectly: ``@pytest.mark.parametrize("store_backend", ["redis"], indirect=True)``.
    """
    return str(request.param)


@pytest.fixture
def store_url(
    store_backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> str:
    if store_backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return server.url
    return f"sqlite:///{tmp_path / 'store' / 'tokens.db'}"


@pytest.fixture
def make_settings(store_url: str, redis_prefix: str) -> Callable[..., Settings]:
    """Build settings through the real loader; keyword arguments are dotted keys."""

    def build(upstream_url: str, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "upstream.url": upstream_url,
            "store.url": store_url,
            # Check the embedded store for changes on every request, so a
            # token written by the test is seen by the very next request.
            "store.poll_interval": 0.0,
            "redis.prefix": redis_prefix,
            "redis.timeout": 0.5,
            "jwt.secret": JWT_SECRET,
            "upstream.connect_timeout": 2.0,
            "upstream.read_timeout": 5.0,
        }
        values.update(
            {key.replace("__", "."): value for key, value in overrides.items()}
        )
        return load_settings(None, environ={}, overrides=values)

    return build


@dataclass
class Gateway:
    """A running gateway in front of the fake Misskey, with helpers for tests."""

    client: TestClient[Any, Any]
    fake: FakeMisskey
    settings: Settings

    @property
    def url(self) -> str:
        return str(self.client.make_url("")).rstrip("/")

    def jwt(self, principal: str = "alice", scope: str = "*", ttl: int = 300) -> str:
        issued = issue_jwt(self.settings.jwt, JWT_SECRET, principal, scope, ttl)
        ISSUED_JWTS.add(issued)
        return remember_secret(issued)

    def bearer(self, principal: str = "alice", scope: str = "*") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.jwt(principal, scope)}"}

    @property
    def store(self) -> TokenStore:
        """The running gateway's own token store."""
        return self.client.server.app[STORE_KEY]

    async def store_token(self, principal: str, token: str) -> None:
        """Store a token through the gateway's own store, so it is used at once."""
        await self.store.set_token(principal, remember_secret(token))

    async def delete_token(self, principal: str) -> None:
        await self.store.delete_token(principal)


@pytest.fixture
async def start_gateway(
    upstream_server: TestServer,
    fake_misskey: FakeMisskey,
    make_settings: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Any]]:
    """Start a gateway; keyword arguments override settings by dotted key."""
    clients: list[TestClient[Any, Any]] = []

    async def start(**overrides: Any) -> Gateway:
        upstream_url = overrides.pop("upstream_url", None) or str(
            upstream_server.make_url("")
        ).rstrip("/")
        settings = make_settings(upstream_url, **overrides)
        app = create_app(settings)
        app.on_response_prepare.append(record_response)
        server = GatewayTestServer(app, host="127.0.0.1")
        client: TestClient[Any, Any] = TestClient(server)
        await client.start_server()
        clients.append(client)
        return Gateway(client=client, fake=fake_misskey, settings=settings)

    yield start
    for client in clients:
        await client.close()


@pytest.fixture
async def gateway(start_gateway: Callable[..., Any]) -> Gateway:
    """A gateway with default settings, and alice's Misskey token stored."""
    started: Gateway = await start_gateway()
    started.fake.add_token("misskey-token-alice", "alice")
    await started.store_token("alice", "misskey-token-alice")
    return started
