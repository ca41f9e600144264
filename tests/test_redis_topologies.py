"""The Redis token store against real servers: TLS, ACL users, Sentinel, cluster.

Every server is a redis-server process started here on a free loopback port,
with its files in a temporary folder, and killed when its fixture ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from redis.crc import key_slot

from gateway.apikeys import ApiKeyRecord
from gateway.cli import main as cli_main
from gateway.config import Settings, load_settings
from gateway.errors import StoreUnavailable
from gateway.ratelimit import RateLimitSettings, redis_limiter
from gateway.store import RedisTokenStore
from gateway.token_cache import CachedTokenStore
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
OLD = "misskey-token-old"
NEW = "misskey-token-new"
DATA_PASSWORD = "data-password-Hq2v8"
SENTINEL_PASSWORD = "sentinel-password-Lm4x1"
ACL_PASSWORD = "acl-password-Zt6k3"
ADMIN_PASSWORD = "admin-password-Rw5n0"
MASTER_NAME = "tokens"


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed; scripts/test installs it with the "
            "redis-server package"
        )
    return path


# Processes


class ServerProcess:
    """One redis-server process, data node or sentinel, logging to a file."""

    def __init__(self, directory: Path, name: str, port: int, args: list[str]):
        self.name = name
        self.port = port
        self.log_path = directory / f"{name}.log"
        self.args = [
            require_binary("redis-server"),
            *args,
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.name} did not start on port {self.port}:\n"
                        + self.log_tail()
                    ) from None
                time.sleep(0.02)

    def log_tail(self) -> str:
        if not self.log_path.exists():
            return "(no log file)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])

    def kill(self) -> None:
        """Stop the process at once with SIGKILL, like a crashed machine."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()


class ProcessGroup:
    """Servers started for one fixture, all ended by ``stop_all``."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.servers: list[ServerProcess] = []

    def start(
        self, name: str, args: list[str], port: int | None = None
    ) -> ServerProcess:
        port = port or free_port()
        common = [
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
        ]  # fmt: skip
        server = ServerProcess(
            self.directory, name, port, ["--port", str(port), *common, *args]
        )
        self.servers.append(server)
        server.start()
        return server

    def start_sentinel(self, name: str, config: str) -> ServerProcess:
        port = free_port()
        path = self.directory / f"{name}.conf"
        path.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n{config}",
            encoding="utf-8",
        )
        server = ServerProcess(self.directory, name, port, [str(path), "--sentinel"])
        self.servers.append(server)
        server.start()
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def redis_settings(url: str, prefix: str, **overrides: Any) -> Settings:
    """Build settings through the real loader, so the URL is validated too."""
    values: dict[str, Any] = {
        "store.url": url,
        "redis.prefix": prefix,
        "redis.timeout": 0.5,
    }
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    return load_settings(None, environ={}, overrides=values)


def make_store(settings: Settings) -> RedisTokenStore:
    return RedisTokenStore(dataclasses.replace(settings.redis, url=settings.store.url))


async def start_cache(settings: Settings) -> CachedTokenStore:
    cache = CachedTokenStore(make_store(settings), ttl=60)
    cache.start()
    async with asyncio.timeout(10):
        await cache.wait_subscribed()
    return cache


async def wait_for_token(
    cache: CachedTokenStore, principal: str, expected: str, limit: float = 3.0
) -> None:
    """Read through the cache until it returns ``expected``."""
    deadline = time.monotonic() + limit
    while await cache.get_token(principal) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the cache did not return the new token of {principal} in {limit} s"
            )
        await asyncio.sleep(0.02)


async def check_rotation_reaches_cache(
    settings: Settings,
    cache: CachedTokenStore,
    principal: str,
    writer: RedisTokenStore | None = None,
) -> None:
    """Cache OLD, rotate it to NEW through another store, expect NEW."""
    own_writer = writer is None
    writer = writer or make_store(settings)
    try:
        await writer.set_token(principal, OLD)
        await cache.get_token(principal)
        assert await cache.get_token(principal) == OLD
        await writer.set_token(principal, NEW)
        await wait_for_token(cache, principal, NEW)
    finally:
        if own_writer:
            await writer.close()


# TLS certificates


@dataclass
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    # A second CA that signed none of the above.
    other_ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _make_ca(
    directory: Path, name: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    (directory / f"{name}.pem").write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
    )
    return key, cert


def _issue(
    directory: Path,
    name: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    usage: x509.ObjectIdentifier,
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        # Only the IP address: "localhost" must fail hostname verification.
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return cert_path, key_path


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("tls")
    ca_key, ca_cert = _make_ca(directory, "ca")
    _make_ca(directory, "other-ca")
    server_cert, server_key = _issue(
        directory, "server", ca_key, ca_cert, ExtendedKeyUsageOID.SERVER_AUTH
    )
    client_cert, client_key = _issue(
        directory, "client", ca_key, ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return Certificates(
        ca=directory / "ca.pem",
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
        other_ca=directory / "other-ca.pem",
    )


def start_tls_server(
    group: ProcessGroup, certificates: Certificates, name: str, auth_clients: bool
) -> ServerProcess:
    port = free_port()
    return group.start(
        name,
        [
            "--port", "0",
            "--tls-port", str(port),
            "--tls-cert-file", str(certificates.server_cert),
            "--tls-key-file", str(certificates.server_key),
            "--tls-ca-cert-file", str(certificates.ca),
            "--tls-auth-clients", "yes" if auth_clients else "no",
        ],
        port=port,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tls_servers(
    tmp_path_factory: pytest.TempPathFactory, certificates: Certificates
) -> Iterator[dict[str, ServerProcess]]:
    """Two TLS-only servers: one takes any client, one needs a client certificate."""
    group = ProcessGroup(tmp_path_factory.mktemp("tls-servers"))
    try:
        yield {
            "server_auth": start_tls_server(group, certificates, "tls", False),
            "mutual": start_tls_server(group, certificates, "mtls", True),
        }
    finally:
        group.stop_all()


async def test_tls_store_and_rotation(tls_servers, certificates, redis_prefix):
    port = tls_servers["server_auth"].port
    settings = redis_settings(
        f"rediss://127.0.0.1:{port}/0",
        redis_prefix,
        redis__tls_ca_file=str(certificates.ca),
    )
    store = make_store(settings)
    cache = await start_cache(settings)
    try:
        await store.ping()
        await store.set_token("alice", OLD)
        assert await store.get_token("alice") == OLD
        assert await store.principals() == ["alice"]
        assert len(await store.jwt_secret()) >= 32
        await check_rotation_reaches_cache(settings, cache, "bob")
        assert await store.delete_token("alice") is True
        assert await store.get_token("alice") is None
    finally:
        await cache.close()
        await store.close()


async def test_tls_wrong_ca_unavailable(tls_servers, certificates, redis_prefix):
    port = tls_servers["server_auth"].port
    settings = redis_settings(
        f"rediss://127.0.0.1:{port}/0",
        redis_prefix,
        redis__tls_ca_file=str(certificates.other_ca),
    )
    store = make_store(settings)
    try:
        with pytest.raises(StoreUnavailable) as excinfo:
            await store.get_token("alice")
        with pytest.raises(StoreUnavailable):
            await store.set_token("alice", OLD)
    finally:
        await store.close()

    assert "CERTIFICATE_VERIFY_FAILED" in str(excinfo.value.__cause__)


async def test_tls_plain_client_unavailable(tls_servers, redis_prefix):
    port = tls_servers["server_auth"].port
    store = make_store(redis_settings(f"redis://127.0.0.1:{port}/0", redis_prefix))
    try:
        with pytest.raises(StoreUnavailable):
            await store.get_token("alice")
    finally:
        await store.close()


@pytest.mark.parametrize("verify_hostname", [True, False])
async def test_tls_hostname_verification(
    tls_servers, certificates, redis_prefix, verify_hostname
):
    # The server certificate names 127.0.0.1 only, not localhost.
    port = tls_servers["server_auth"].port
    settings = redis_settings(
        f"rediss://localhost:{port}/0",
        redis_prefix,
        redis__tls_ca_file=str(certificates.ca),
        redis__tls_verify_hostname=verify_hostname,
    )
    store = make_store(settings)
    try:
        if verify_hostname:
            with pytest.raises(StoreUnavailable) as excinfo:
                await store.get_token("alice")
            assert "Hostname mismatch" in str(excinfo.value.__cause__)
        else:
            assert await store.get_token("alice") is None
    finally:
        await store.close()


@pytest.mark.parametrize("key_in_cert_file", [False, True])
async def test_mutual_tls_client_certificate(
    tls_servers, certificates, redis_prefix, tmp_path, key_in_cert_file
):
    port = tls_servers["mutual"].port
    files = {
        "redis__tls_cert_file": str(certificates.client_cert),
        "redis__tls_key_file": str(certificates.client_key),
    }
    if key_in_cert_file:
        combined = tmp_path / "client-with-key.pem"
        combined.write_bytes(
            certificates.client_cert.read_bytes() + certificates.client_key.read_bytes()
        )
        files = {"redis__tls_cert_file": str(combined)}
    settings = redis_settings(
        f"rediss://127.0.0.1:{port}/0",
        redis_prefix,
        redis__tls_ca_file=str(certificates.ca),
        **files,
    )
    store = make_store(settings)
    cache = await start_cache(settings)
    try:
        await store.set_token("alice", OLD)
        assert await store.get_token("alice") == OLD
        await check_rotation_reaches_cache(settings, cache, "bob")
    finally:
        await cache.close()
        await store.close()


async def test_mutual_tls_without_certificate(tls_servers, certificates, redis_prefix):
    port = tls_servers["mutual"].port
    settings = redis_settings(
        f"rediss://127.0.0.1:{port}/0",
        redis_prefix,
        redis__tls_ca_file=str(certificates.ca),
    )
    store = make_store(settings)
    try:
        with pytest.raises(StoreUnavailable):
            await store.get_token("alice")
    finally:
        await store.close()


# ACL users


def readme_acl_rule() -> str:
    """Return the ACL rule that the README gives operators to grant."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rules = re.findall(r"^ *(user misskey-gateway on .*)$", text, flags=re.MULTILINE)
    assert len(rules) == 1, "the README shows one ACL rule for the gateway"
    return rules[0]


@dataclass
class AclServer:
    server: ServerProcess
    prefix: str
    url: str = field(init=False)

    def __post_init__(self) -> None:
        self.url = f"redis://127.0.0.1:{self.server.port}/0"

    def admin(self) -> redis.Redis:
        return redis.Redis(
            port=self.server.port, username="admin", password=ADMIN_PASSWORD
        )


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclServer]:
    """A server whose user misskey-gateway has exactly the README's ACL rule."""
    prefix = "acl-test:"
    rule = readme_acl_rule()
    rule = rule.replace(">PASSWORD", f">{ACL_PASSWORD}")
    rule = rule.replace("misskey-gateway:", prefix)
    group = ProcessGroup(tmp_path_factory.mktemp("acl"))
    try:
        server = group.start(
            "acl",
            [
                "--user", "default", "off",
                "--user", "admin", "on", f">{ADMIN_PASSWORD}", "~*", "&*", "+@all",
                "--user", *rule.split()[1:],
            ],
        )  # fmt: skip
        yield AclServer(server, prefix)
    finally:
        group.stop_all()


def acl_denials(acl_server: AclServer) -> list[Any]:
    admin = acl_server.admin()
    try:
        entries: list[Any] = admin.execute_command("ACL", "LOG")
        return entries
    finally:
        admin.close()


async def test_acl_rule_covers_every_operation(acl_server):
    admin = acl_server.admin()
    admin.execute_command("ACL", "LOG", "RESET")
    admin.close()
    url = f"redis://misskey-gateway:{ACL_PASSWORD}@127.0.0.1:{acl_server.server.port}/0"
    settings = redis_settings(url, acl_server.prefix)
    store = make_store(settings)
    cache = await start_cache(settings)
    try:
        await store.ping()
        await store.set_token("alice", OLD)
        assert await store.get_token("alice") == OLD
        assert "alice" in await store.principals()
        assert len(await store.jwt_secret()) >= 32
        await check_rotation_reaches_cache(settings, cache, "bob")
        assert await store.delete_token("alice") is True
        assert await store.delete_token("alice") is False

        await store.revoke_jwt_id("jwt-1", time.time() + 60)
        assert await store.is_jwt_id_revoked("jwt-1") is True
        record = ApiKeyRecord(
            digest="ab" * 32,
            key_id="ab" * 6,
            principal="alice",
            scope="*",
            created_at=time.time(),
        )
        await store.put_api_key(record)
        assert await store.get_api_key(record.digest) == record
        assert await store.list_api_keys("alice") == [record]
        assert await store.delete_api_keys("alice") == 1

        limiter = redis_limiter(
            store.client,
            acl_server.prefix,
            RateLimitSettings(requests_per_minute=60, burst=1),
        )
        assert (await limiter.check("alice")).allowed
        # The second check runs EVALSHA on the script that EVAL loaded.
        assert (await limiter.check("alice")).allowed
    finally:
        await cache.close()
        await store.close()

    assert acl_denials(acl_server) == []


async def test_acl_user_from_settings_keys(acl_server):
    environ = {
        "MISSKEY_GATEWAY_STORE_URL": acl_server.url,
        "MISSKEY_GATEWAY_REDIS_PREFIX": acl_server.prefix,
        "MISSKEY_GATEWAY_REDIS_USERNAME": "misskey-gateway",
        "MISSKEY_GATEWAY_REDIS_PASSWORD": ACL_PASSWORD,
    }
    settings = load_settings(None, environ=environ)
    store = make_store(settings)
    try:
        await store.set_token("carol", OLD)
        assert await store.get_token("carol") == OLD
    finally:
        await store.close()

    assert ACL_PASSWORD not in repr(settings)


async def test_acl_wrong_password_unavailable(acl_server):
    wrong = "wrong-password-Yb7c2"
    settings = redis_settings(
        acl_server.url,
        acl_server.prefix,
        redis__username="misskey-gateway",
        redis__password=wrong,
    )
    store = make_store(settings)
    try:
        with pytest.raises(StoreUnavailable) as excinfo:
            await store.get_token("alice")
    finally:
        await store.close()

    chain: list[BaseException] = []
    error: BaseException | None = excinfo.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert len(chain) >= 2
    for link in chain:
        assert wrong not in str(link)
        assert wrong not in repr(link)
    assert wrong not in store.description


async def test_acl_key_outside_prefix_unavailable(acl_server):
    url = f"redis://misskey-gateway:{ACL_PASSWORD}@127.0.0.1:{acl_server.server.port}/0"
    store = make_store(redis_settings(url, "other-prefix:"))
    try:
        with pytest.raises(StoreUnavailable):
            await store.get_token("alice")
        with pytest.raises(StoreUnavailable):
            await store.set_token("alice", OLD)
    finally:
        await store.close()


def test_cli_wrong_password_not_shown(acl_server, monkeypatch, capsys):
    wrong = "wrong-password-Pc3d9"
    monkeypatch.setenv("MISSKEY_GATEWAY_REDIS_USERNAME", "misskey-gateway")
    monkeypatch.setenv("MISSKEY_GATEWAY_REDIS_PASSWORD", wrong)
    monkeypatch.setenv("MISSKEY_GATEWAY_REDIS_PREFIX", acl_server.prefix)

    status = cli_main(["token", "get", "alice", "--store", acl_server.url])

    output = capsys.readouterr()
    assert status == 1
    assert "cannot reach the token store" in output.err
    assert wrong not in output.err
    assert wrong not in output.out


# Sentinel


@dataclass
class SentinelSetup:
    master: ServerProcess
    replica: ServerProcess
    sentinels: list[ServerProcess]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://:{DATA_PASSWORD}@{hosts}/{MASTER_NAME}/0"

    def data_client(self, server: ServerProcess) -> redis.Redis:
        return redis.Redis(port=server.port, password=DATA_PASSWORD)

    def sentinel_client(self, server: ServerProcess) -> redis.Redis:
        return redis.Redis(port=server.port, password=SENTINEL_PASSWORD)

    def master_port(self) -> int:
        """Return the master's port, as reported by the first reachable sentinel."""
        for sentinel in self.sentinels:
            client = self.sentinel_client(sentinel)
            try:
                host, port = client.sentinel_get_master_addr_by_name(MASTER_NAME)
                return int(port)
            except redis.ConnectionError:
                continue
            finally:
                client.close()
        raise AssertionError("no sentinel was reachable")


def sentinel_config(master_port: int) -> str:
    return (
        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n"
        f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
        f"sentinel failover-timeout {MASTER_NAME} 10000\n"
        f"sentinel auth-pass {MASTER_NAME} {DATA_PASSWORD}\n"
        f"requirepass {SENTINEL_PASSWORD}\n"
        f"sentinel sentinel-pass {SENTINEL_PASSWORD}\n"
    )


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    """A master, one replica and three sentinels that have found each other."""
    group = ProcessGroup(tmp_path)
    try:
        auth = ["--requirepass", DATA_PASSWORD, "--masterauth", DATA_PASSWORD]
        master = group.start("master", auth)
        replica = group.start(
            "replica", [*auth, "--replicaof", "127.0.0.1", str(master.port)]
        )
        setup = SentinelSetup(master, replica, [])
        replica_client = setup.data_client(replica)
        wait_until(
            lambda: replica_client.info("replication")["master_link_status"] == "up",
            10,
            "the replica to sync",
        )
        replica_client.close()
        # Sentinels read INFO from the master as soon as they start, so with
        # the replica already attached they learn of it at once.
        for number in range(3):
            setup.sentinels.append(
                group.start_sentinel(f"sentinel-{number}", sentinel_config(master.port))
            )

        def sentinels_ready() -> bool:
            for sentinel in setup.sentinels:
                client = setup.sentinel_client(sentinel)
                try:
                    state = client.sentinel_master(MASTER_NAME)
                finally:
                    client.close()
                if state["num-other-sentinels"] != 2 or state["num-slaves"] != 1:
                    return False
            return True

        wait_until(sentinels_ready, 15, "the sentinels to find each other")
        yield setup
    finally:
        group.stop_all()


@dataclass
class LoadResult:
    """What a load run saw: (start time, duration, outcome) per operation."""

    operations: list[tuple[float, float, str]] = field(default_factory=list)
    unexpected: list[BaseException] = field(default_factory=list)

    def failures(self) -> list[tuple[float, float, str]]:
        return [op for op in self.operations if op[2] != "ok"]


async def run_load(store: RedisTokenStore, result: LoadResult, stop: asyncio.Event):
    """Alternate set_token and get_token on a few principals until ``stop``."""
    number = 0
    while not stop.is_set():
        principal = f"load-{number % 8}"
        started = time.monotonic()
        try:
            if number % 2 == 0:
                await store.set_token(principal, f"token-{number}")
            else:
                await store.get_token(principal)
            outcome = "ok"
        except StoreUnavailable:
            outcome = "unavailable"
        except Exception as error:
            # Recorded, so that the test can list every other exception.
            outcome = "unexpected"
            result.unexpected.append(error)
        result.operations.append((started, time.monotonic() - started, outcome))
        number += 1
        await asyncio.sleep(0.005)


async def test_sentinel_failover_under_load(sentinel_setup, redis_prefix):
    setup = sentinel_setup
    settings = redis_settings(
        setup.url,
        redis_prefix,
        redis__sentinel_password=SENTINEL_PASSWORD,
    )
    store = make_store(settings)
    cache = await start_cache(settings)
    result = LoadResult()
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(store, result, stop))
    try:
        await store.set_token("before", OLD)
        master_client = setup.data_client(setup.master)
        replicated = master_client.execute_command("WAIT", 1, 2000)
        master_client.close()
        assert replicated == 1
        await asyncio.sleep(0.3)

        killed_at = time.monotonic()
        setup.master.kill()
        subscription_dropped = False
        recovered_at: float | None = None
        while time.monotonic() - killed_at < 20:
            await asyncio.sleep(0.05)
            subscription_dropped = subscription_dropped or not cache.subscribed
            after = [op for op in result.operations if op[0] > killed_at]
            failed = [op for op in after if op[2] != "ok"]
            if failed:
                last_failure = max(op[0] for op in failed)
                later = [op for op in after if op[0] > last_failure]
                # Recovered: 20 operations in a row succeeded after the last failure.
                if len(later) >= 20:
                    recovered_at = later[0][0]
                    break
        stop.set()
        await load

        assert result.unexpected == []
        assert recovered_at is not None, "the store did not recover within 20 s"
        recovery = recovered_at - killed_at
        slowest_failure = max(op[1] for op in result.failures())
        print(
            f"sentinel failover: store recovered {recovery:.2f} s after the master "
            f"was killed; {len(result.failures())} of {len(result.operations)} "
            f"operations failed, the slowest in {slowest_failure:.3f} s"
        )
        assert recovery < 15
        # Each failure was a fast 503: redis.timeout is 0.5 s, retried once.
        assert slowest_failure < 2.0
        assert setup.master_port() == setup.replica.port

        assert await store.get_token("before") == OLD
        replica_client = setup.data_client(setup.replica)
        assert replica_client.info("replication")["role"] == "master"
        replica_client.close()

        # The cache's subscription followed the master to the replica.
        assert subscription_dropped
        async with asyncio.timeout(15):
            await cache.wait_subscribed()
        await check_rotation_reaches_cache(settings, cache, "alice")
    finally:
        stop.set()
        await load
        await cache.close()
        await store.close()


# Cluster


CLUSTER_ACL_EXTRA = "+cluster|slots +command"


@dataclass
class ClusterSetup:
    nodes: list[ServerProcess]

    @property
    def url(self) -> str:
        """The store URL, as the README's ACL user, with two of three seed nodes."""
        seeds = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[:2])
        return f"redis+cluster://misskey-gateway:{ACL_PASSWORD}@{seeds}/"

    def client(self, node: ServerProcess) -> redis.Redis:
        return redis.Redis(port=node.port)


def cluster_acl_rule() -> list[str]:
    """Return the README's ACL rule with its cluster additions, as arguments.

    Its key and channel patterns cover every ``test-*:`` prefix that the
    ``redis_prefix`` fixture makes. The ``default`` user stays unrestricted,
    for redis-cli and the tests' own checks.
    """
    assert CLUSTER_ACL_EXTRA in (ROOT / "README.md").read_text(encoding="utf-8")
    rule = readme_acl_rule().replace(">PASSWORD", f">{ACL_PASSWORD}")
    rule = rule.replace("misskey-gateway:", "test-*:")
    return [*rule.split()[1:], *CLUSTER_ACL_EXTRA.split()]


@pytest.fixture(scope="module")
def cluster_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSetup]:
    """Three masters without replicas, each serving a third of the slots."""
    redis_cli = require_binary("redis-cli")
    acl_rule = cluster_acl_rule()
    directory = tmp_path_factory.mktemp("cluster")
    group = ProcessGroup(directory)
    try:
        nodes = []
        for number in range(3):
            port = free_port()
            nodes.append(
                group.start(
                    f"node-{number}",
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        f"nodes-{port}.conf",
                        # The bus port defaults to port + 10000, which is out
                        # of range for many free ports.
                        "--cluster-port",
                        str(free_port()),
                        "--cluster-node-timeout",
                        "1000",
                        # The reachable masters keep serving their slots
                        # while one master is down.
                        "--cluster-require-full-coverage",
                        "no",
                        "--user",
                        *acl_rule,
                    ],
                    port=port,
                )  # fmt: skip
            )
        created = subprocess.run(
            [
                redis_cli, "--cluster", "create",
                *(f"127.0.0.1:{node.port}" for node in nodes),
                "--cluster-yes",
            ],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert created.returncode == 0, created.stdout + created.stderr
        setup = ClusterSetup(nodes)

        def cluster_ok() -> bool:
            for node in nodes:
                client = setup.client(node)
                try:
                    if client.cluster("info")["cluster_state"] != "ok":
                        return False
                finally:
                    client.close()
            return True

        wait_until(cluster_ok, 20, "cluster_state:ok on every node")
        yield setup
    finally:
        group.stop_all()


def node_of_key(setup: ClusterSetup, key: str) -> ServerProcess:
    """Return the node that serves ``key``'s slot, from CLUSTER SLOTS."""
    slot = key_slot(key.encode())
    client = setup.client(setup.nodes[0])
    try:
        ranges = client.execute_command("CLUSTER", "SLOTS")
    finally:
        client.close()
    for first, last, primary, *_ in ranges:
        if first <= slot <= last:
            port = int(primary[1])
            return next(node for node in setup.nodes if node.port == port)
    raise AssertionError(f"no node serves slot {slot}")


def cluster_acl_denials(setup: ClusterSetup, reset: bool = False) -> list[Any]:
    entries: list[Any] = []
    for node in setup.nodes:
        client = setup.client(node)
        try:
            if reset:
                client.acl_log_reset()
            entries += client.acl_log()
        finally:
            client.close()
    return entries


async def test_cluster_store_operations(cluster_setup, redis_prefix):
    setup = cluster_setup
    cluster_acl_denials(setup, reset=True)
    settings = redis_settings(setup.url, redis_prefix)
    store = make_store(settings)
    other = make_store(settings)
    try:
        await store.ping()
        principals = [f"user-{number}" for number in range(60)]
        for principal in principals:
            await store.set_token(principal, f"token-{principal}")

        for node in setup.nodes:
            client = setup.client(node)
            keys = list(client.scan_iter(match=f"{redis_prefix}token:*"))
            client.close()
            assert keys, f"no token key landed on the node on port {node.port}"
        for principal in principals:
            assert await store.get_token(principal) == f"token-{principal}"
        assert await store.principals() == sorted(principals)

        for principal in principals[:30]:
            assert await store.delete_token(principal) is True
        assert await store.delete_token(principals[0]) is False
        assert await store.principals() == sorted(principals[30:])

        secret = await store.jwt_secret()
        assert len(secret) >= 32
        assert await other.jwt_secret() == secret

        await store.revoke_jwt_id("jwt-1", time.time() + 60)
        assert await other.is_jwt_id_revoked("jwt-1") is True
        limiter = redis_limiter(
            store.client, redis_prefix, RateLimitSettings(requests_per_minute=60)
        )
        # Rate limit keys of many principals land on every master, and each
        # master loads the script with EVAL before EVALSHA finds it.
        for principal in principals[:20]:
            first = await limiter.check(principal)
            second = await limiter.check(principal)
            assert first.allowed
            assert second.remaining == first.remaining - 1
    finally:
        await other.close()
        await store.close()

    assert cluster_acl_denials(setup) == []


async def test_cluster_rotation_reaches_cache(cluster_setup, redis_prefix):
    settings = redis_settings(cluster_setup.url, redis_prefix)
    cache = await start_cache(settings)
    try:
        # Principals whose keys live on each of the three masters.
        by_node: dict[int, str] = {}
        for number in range(100):
            principal = f"rotated-{number}"
            node = node_of_key(cluster_setup, f"{redis_prefix}token:{principal}")
            by_node.setdefault(node.port, principal)
        assert len(by_node) == 3
        for principal in by_node.values():
            await check_rotation_reaches_cache(settings, cache, principal)
    finally:
        await cache.close()


def subscriber_counts(setup: ClusterSetup, channel: str) -> dict[int, int]:
    """Return the number of local subscribers to ``channel`` on each live node."""
    counts = {}
    for node in setup.nodes:
        if node.process is None or node.process.poll() is not None:
            continue
        client = setup.client(node)
        try:
            counts[node.port] = dict(client.pubsub_numsub(channel))[channel.encode()]
        finally:
            client.close()
    return counts


# This test kills a node, so it comes last among the tests of cluster_setup.
async def test_cluster_subscriber_moves_to_live_node(cluster_setup, redis_prefix):
    setup = cluster_setup
    settings = redis_settings(setup.url, redis_prefix)
    cache = await start_cache(settings)
    channel = cache.inner.rotation_channel
    # redis-py cannot set up a new cluster client while the first master in
    # CLUSTER SLOTS is down, so both clients connect before the kill.
    writer = make_store(settings)
    await writer.ping()
    await cache.ping()
    try:
        counts = subscriber_counts(setup, channel)
        assert sorted(counts.values()) == [0, 0, 1]
        subscribed_port = next(port for port, count in counts.items() if count)
        victim = next(node for node in setup.nodes if node.port == subscribed_port)
        principal = next(
            f"moved-{number}"
            for number in range(100)
            if node_of_key(setup, f"{redis_prefix}token:moved-{number}") is not victim
        )

        victim.kill()
        async with asyncio.timeout(5):
            while cache.subscribed:  # noqa: ASYNC110 - polls public state
                await asyncio.sleep(0.01)
        async with asyncio.timeout(10):
            await cache.wait_subscribed()

        assert sorted(subscriber_counts(setup, channel).values()) == [0, 1]
        await check_rotation_reaches_cache(settings, cache, principal, writer)
    finally:
        await writer.close()
        await cache.close()
