"""Redis store URLs and [redis] options: parsing, validation and client types."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster

from gateway.config import ConfigError, RedisSettings, Settings, load_settings
from gateway.redis_client import SentinelMasterClient, create_client
from gateway.redis_url import Topology, parse_redis_url
from gateway.store import describe_store

# Distinctive values, so that a test can search messages for them.
PASSWORD = "url-password-Vd8s3"  # noqa: S105
OTHER_PASSWORD = "key-password-Jn5w7"  # noqa: S105


def load(environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
    values = {key.replace("__", "."): value for key, value in overrides.items()}
    return load_settings(None, environ=environ or {}, overrides=values)


def config_error(**overrides: Any) -> ConfigError:
    with pytest.raises(ConfigError) as excinfo:
        load(**overrides)
    return excinfo.value


# URL forms


@pytest.mark.parametrize(
    ("url", "nodes", "master_name", "db"),
    [
        (
            "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster",
            (("127.0.0.1", 26379), ("127.0.0.1", 26380)),
            "mymaster",
            0,
        ),
        (
            "redis+sentinel://sentinel-a,sentinel-b:26380/tokens/2",
            (("sentinel-a", 26379), ("sentinel-b", 26380)),
            "tokens",
            2,
        ),
        (
            "redis+sentinel://[::1]:26379,[::1]/tokens/0",
            (("::1", 26379), ("::1", 26379)),
            "tokens",
            0,
        ),
        (
            "REDIS+SENTINEL://h:1/my%20master",
            (("h", 1),),
            "my master",
            0,
        ),
    ],
)
def test_sentinel_url_parts(url, nodes, master_name, db):
    parsed = parse_redis_url(url)
    assert parsed.topology is Topology.SENTINEL
    assert parsed.nodes == nodes
    assert parsed.master_name == master_name
    assert parsed.db == db
    assert parsed.tls is False


@pytest.mark.parametrize(
    ("url", "nodes"),
    [
        (
            "redis+cluster://10.0.0.1:7000,10.0.0.2:7001/",
            (("10.0.0.1", 7000), ("10.0.0.2", 7001)),
        ),
        ("redis+cluster://cache", (("cache", 6379),)),
        ("redis+cluster://cache:7000/0", (("cache", 7000),)),
    ],
)
def test_cluster_url_parts(url, nodes):
    parsed = parse_redis_url(url)
    assert parsed.topology is Topology.CLUSTER
    assert parsed.nodes == nodes
    assert parsed.db == 0


@pytest.mark.parametrize(
    "url",
    [
        f"redis+sentinel://gateway:{PASSWORD}@h1,h2/tokens",
        f"redis+cluster://gateway:{PASSWORD}@h1,h2/",
        f"redis://gateway:{PASSWORD}@h1:6379/0",
        f"rediss://gateway:{PASSWORD}@h1/0",
    ],
)
def test_url_credentials(url):
    parsed = parse_redis_url(url)
    assert parsed.username == "gateway"
    assert parsed.password == PASSWORD
    assert PASSWORD not in repr(parsed)


def test_url_credentials_percent_encoded():
    parsed = parse_redis_url("redis+cluster://gate%40way:p%3Ass%40rd@h1/")
    assert parsed.username == "gate@way"
    assert parsed.password == "p:ss@rd"


@pytest.mark.parametrize(
    ("url", "topology", "tls"),
    [
        ("redis://127.0.0.1:6379/0", Topology.SINGLE, False),
        ("rediss://cache.example:6380/1", Topology.SINGLE, True),
        ("unix:///run/redis/redis.sock", Topology.SINGLE, False),
        ("redis+sentinel://h/tokens", Topology.SENTINEL, False),
        ("redis+cluster://h/", Topology.CLUSTER, False),
    ],
)
def test_url_topology(url, topology, tls):
    parsed = parse_redis_url(url)
    assert parsed.topology is topology
    assert parsed.tls is tls
    assert load(redis__url=url).store.url == url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis+sentinel://h1:26379", "master name is missing"),
        ("redis+sentinel://h1:26379/", "master name is missing"),
        ("redis+sentinel://h1/tokens/x", "invalid database number"),
        ("redis+sentinel://h1/tokens/0/1", "path segments after the database"),
        ("redis+sentinel://h1:port/tokens", "invalid port in address 1"),
        ("redis+sentinel://h1,h2:70000/tokens", "invalid port in address 2"),
        ("redis+sentinel://h1,,h3/tokens", "empty host in address 2"),
        ("redis+sentinel://[::1/tokens", "invalid IPv6 address in address 1"),
        ("redis+sentinel://[::1]x/tokens", "invalid IPv6 address in address 1"),
        ("redis+sentinel://h1/tokens?db=1", "must not have a query"),
        ("redis+cluster://h1:7000/1", "only database 0"),
        ("redis+cluster://", "empty host in address 1"),
        ("redis+cluster://h1#x", "must not have a query or fragment"),
        ("rediss+cluster://h1/", "must start with"),
        ("redis-sentinel://h1/tokens", "must start with"),
        ("redis://h1:0/0", "port 0"),
        ("redis://h1/zero", "invalid database number"),
        ("redis:///0", "needs a host"),
        ("unix://", "socket path"),
        ("redis//h1", "must start with"),
    ],
)
def test_url_invalid(url, expected):
    error = config_error(redis__url=url)
    assert error.key == "redis.url"
    assert expected in str(error)


def test_url_invalid_lists_schemes():
    message = str(config_error(redis__url="memcached://h1"))
    for scheme in ("redis://", "rediss://", "unix://", "redis+sentinel://"):
        assert scheme in message
    assert "redis+cluster://" in message


def test_store_url_invalid_names_store_key():
    error = config_error(store__url="redis+sentinel://h1:26379")
    assert error.key == "store.url"
    assert "master name is missing" in str(error)


def test_store_url_unknown_scheme_lists_sqlite():
    error = config_error(store__url="redis+sentinels://h1/tokens")
    assert error.key == "store.url"
    assert "redis+sentinel://" in str(error)
    assert "sqlite:///" in str(error)


@pytest.mark.parametrize(
    "url",
    [
        f"redis+sentinel://user:{PASSWORD}/tokens",
        f"redis+sentinel://user:{PASSWORD}@h1:{PASSWORD}/tokens",
        f"redis+sentinel://user:{PASSWORD}@h1/{PASSWORD}/x",
        f"redis+cluster://user:{PASSWORD}@h1/{PASSWORD}",
        f"redis+cluster://user:{PASSWORD}@[{PASSWORD}/",
        f"redis://user:{PASSWORD}@h1/{PASSWORD}",
        f"redis://user:{PASSWORD}@h1:{PASSWORD}/0",
    ],
)
def test_url_invalid_hides_password(url):
    error = config_error(redis__url=url)
    assert PASSWORD not in str(error)
    assert PASSWORD not in error.key


# [redis] options


def test_redis_option_defaults():
    redis_settings = load().redis
    assert redis_settings.username == ""
    assert redis_settings.password == ""
    assert redis_settings.sentinel_password == ""
    assert redis_settings.tls_ca_file == ""
    assert redis_settings.tls_cert_file == ""
    assert redis_settings.tls_key_file == ""
    assert redis_settings.tls_verify_hostname is True


def test_redis_options_from_environment(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked before connecting")
    environ = {
        "MISSKEY_GATEWAY_REDIS_URL": "rediss://cache:6380/0",
        "MISSKEY_GATEWAY_REDIS_USERNAME": "gateway",
        "MISSKEY_GATEWAY_REDIS_PASSWORD": PASSWORD,
        "MISSKEY_GATEWAY_REDIS_TLS_CA_FILE": str(ca),
        "MISSKEY_GATEWAY_REDIS_TLS_VERIFY_HOSTNAME": "false",
    }
    settings = load(environ)
    assert settings.redis.username == "gateway"
    assert settings.redis.password == PASSWORD
    assert settings.redis.tls_ca_file == str(ca)
    assert settings.redis.tls_verify_hostname is False


def test_sentinel_password_from_environment():
    environ = {
        "MISSKEY_GATEWAY_REDIS_URL": "redis+sentinel://h1,h2/tokens",
        "MISSKEY_GATEWAY_REDIS_SENTINEL_PASSWORD": OTHER_PASSWORD,
    }
    assert load(environ).redis.sentinel_password == OTHER_PASSWORD


def test_passwords_not_in_repr():
    settings = load(
        redis__url=f"redis+sentinel://:{PASSWORD}@h1/tokens",
        redis__sentinel_password=OTHER_PASSWORD,
    )
    for text in (repr(settings), repr(settings.redis), repr(settings.store)):
        assert PASSWORD not in text
        assert OTHER_PASSWORD not in text
    settings = load(redis__url="redis://h1/0", redis__password=OTHER_PASSWORD)
    assert OTHER_PASSWORD not in repr(settings)


@pytest.mark.parametrize(
    ("overrides", "key", "expected"),
    [
        (
            {
                "redis__url": f"redis://:{PASSWORD}@h1/0",
                "redis__password": OTHER_PASSWORD,
            },
            "redis.password",
            "conflicts with the password in redis.url",
        ),
        (
            {
                "store__url": f"redis+cluster://:{PASSWORD}@h1/",
                "redis__password": OTHER_PASSWORD,
            },
            "redis.password",
            "conflicts with the password in store.url",
        ),
        (
            {"redis__url": "redis://gateway@h1/0", "redis__username": "other"},
            "redis.username",
            "conflicts with the user name in redis.url",
        ),
        (
            {"redis__url": "redis://h1/0", "redis__sentinel_password": OTHER_PASSWORD},
            "redis.sentinel_password",
            "only applies to redis+sentinel://",
        ),
        (
            {
                "redis__url": "redis+cluster://h1/",
                "redis__sentinel_password": OTHER_PASSWORD,
            },
            "redis.sentinel_password",
            "only applies to redis+sentinel://",
        ),
        (
            {"redis__url": "redis://h1/0", "redis__tls_verify_hostname": False},
            "redis.tls_verify_hostname",
            "only applies to rediss://",
        ),
    ],
)
def test_redis_option_conflicts(overrides, key, expected):
    error = config_error(**overrides)
    assert error.key == key
    assert expected in str(error)
    assert PASSWORD not in str(error)
    assert OTHER_PASSWORD not in str(error)


@pytest.mark.parametrize("name", ["tls_ca_file", "tls_cert_file", "tls_key_file"])
@pytest.mark.parametrize(
    "url",
    [
        "redis://h1/0",
        "unix:///run/redis.sock",
        "redis+sentinel://h1/tokens",
        "redis+cluster://h1/",
    ],
)
def test_tls_files_need_rediss(tmp_path, name, url):
    path = tmp_path / "file.pem"
    path.write_text("pem")
    error = config_error(redis__url=url, **{f"redis__{name}": str(path)})
    assert error.key == f"redis.{name}"
    assert "only applies to rediss://" in str(error)


@pytest.mark.parametrize("name", ["tls_ca_file", "tls_cert_file", "tls_key_file"])
def test_tls_file_not_found(tmp_path, name):
    missing = tmp_path / "missing.pem"
    overrides: dict[str, Any] = {
        "redis__url": "rediss://h1/0",
        f"redis__{name}": str(missing),
    }
    if name == "tls_key_file":
        cert = tmp_path / "client.pem"
        cert.write_text("pem")
        overrides["redis__tls_cert_file"] = str(cert)
    error = config_error(**overrides)
    assert error.key == f"redis.{name}"
    assert f"file not found: {missing}" in str(error)


def test_tls_key_needs_certificate(tmp_path):
    key = tmp_path / "client.key"
    key.write_text("pem")
    error = config_error(redis__url="rediss://h1/0", redis__tls_key_file=str(key))
    assert error.key == "redis.tls_cert_file"
    assert "missing" in str(error)


def test_tls_options_accepted(tmp_path):
    files = {}
    for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        path = tmp_path / f"{name}.pem"
        path.write_text("pem")
        files[f"redis__{name}"] = str(path)
    settings = load(
        redis__url="rediss://h1/0", redis__tls_verify_hostname=False, **files
    )
    assert settings.redis.tls_key_file == files["redis__tls_key_file"]
    assert settings.redis.tls_verify_hostname is False


def test_tls_verify_hostname_invalid_env():
    environ = {
        "MISSKEY_GATEWAY_REDIS_URL": "rediss://h1/0",
        "MISSKEY_GATEWAY_REDIS_TLS_VERIFY_HOSTNAME": "maybe",
    }
    with pytest.raises(ConfigError) as excinfo:
        load(environ)
    assert excinfo.value.key == (
        "redis.tls_verify_hostname (from MISSKEY_GATEWAY_REDIS_TLS_VERIFY_HOSTNAME)"
    )


@pytest.mark.parametrize("name", ["password", "sentinel_password"])
def test_password_wrong_type_hidden(tmp_path, name):
    path = tmp_path / "gateway.toml"
    path.write_text(f"[redis]\n{name} = 8675309123\n", encoding="utf-8")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, environ={})
    assert excinfo.value.key == f"redis.{name}"
    assert "8675309123" not in str(excinfo.value)


# Client factory


async def test_factory_single_server_tls(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("pem")
    client = create_client(
        RedisSettings(
            url="rediss://cache:6380/0", tls_ca_file=str(ca), password=PASSWORD
        )
    )
    try:
        assert type(client) is redis.Redis
        options = client.connection_pool.connection_kwargs
        assert options["ssl_ca_certs"] == str(ca)
        assert options["ssl_check_hostname"] is True
        assert options["password"] == PASSWORD
    finally:
        await client.aclose()


async def test_factory_sentinel_keeps_passwords_apart():
    settings = RedisSettings(
        url=f"redis+sentinel://gateway:{PASSWORD}@h1:26379,h2:26380/tokens/3",
        sentinel_password=OTHER_PASSWORD,
    )
    client = create_client(settings)
    try:
        assert isinstance(client, SentinelMasterClient)
        sentinel = client.owned_sentinel
        assert sentinel is not None
        assert sentinel.sentinel_kwargs["password"] == OTHER_PASSWORD
        assert "username" not in sentinel.sentinel_kwargs
        options = client.connection_pool.connection_kwargs
        assert options["password"] == PASSWORD
        assert options["username"] == "gateway"
        assert options["db"] == 3
    finally:
        await client.aclose()


async def test_factory_cluster():
    client = create_client(RedisSettings(url="redis+cluster://h1:7000,h2:7001/"))
    try:
        assert isinstance(client, RedisCluster)
    finally:
        await client.aclose()


async def test_factory_pubsub_has_no_read_timeout():
    client = create_client(
        RedisSettings(url="redis://h1/0", timeout=0.5), for_pubsub=True
    )
    try:
        options = client.connection_pool.connection_kwargs
        assert options["socket_timeout"] is None
        assert options["socket_connect_timeout"] == 0.5
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            f"redis+sentinel://:{PASSWORD}@h1:26379,h2:26380/tokens/0",
            "redis redis+sentinel://:***@h1:26379,h2:26380/tokens/0",
        ),
        (
            f"redis+cluster://gateway:{PASSWORD}@[::1]:7000,[::1]:7001/",
            "redis redis+cluster://gateway:***@[::1]:7000,[::1]:7001/",
        ),
        ("redis+cluster://h1:7000,h2:7001/", "redis redis+cluster://h1:7000,h2:7001/"),
    ],
)
def test_store_description_hides_password(url, expected):
    settings = load(redis__url=url)
    assert describe_store(settings) == expected
