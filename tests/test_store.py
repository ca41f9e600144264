"""Token store against a real redis-server started for the test session."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as redis

from gateway.config import RedisSettings
from gateway.errors import StoredTokenInvalid, StoreUnavailable
from gateway.store import (
    JWT_SECRET_BYTES,
    RedisTokenStore,
    fingerprint,
    validate_token,
)
from tests.conftest import RedisServer, free_port

TOKEN = "misskey-token-AbC123"  # noqa: S105


def make_store(url: str, prefix: str) -> RedisTokenStore:
    return RedisTokenStore(RedisSettings(url=url, prefix=prefix, timeout=1.0))


@pytest.fixture
async def store(
    redis_server: RedisServer, redis_prefix: str
) -> AsyncIterator[RedisTokenStore]:
    token_store = make_store(redis_server.url, redis_prefix)
    yield token_store
    await token_store.close()


@pytest.fixture
async def raw_redis(redis_server: RedisServer) -> AsyncIterator[redis.Redis]:
    """A plain redis-py client on the same server, for writing and reading keys."""
    client = redis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


# Tokens


async def test_get_missing(store):
    assert await store.get_token("alice") is None


async def test_set_get(store):
    await store.set_token("alice", TOKEN)
    assert await store.get_token("alice") == TOKEN


async def test_set_overwrites(store):
    await store.set_token("alice", TOKEN)
    await store.set_token("alice", "rotated-token")
    assert await store.get_token("alice") == "rotated-token"


async def test_set_key_layout(store, raw_redis, redis_prefix):
    await store.set_token("alice", TOKEN)
    assert store.token_key("alice") == f"{redis_prefix}token:alice"
    assert await raw_redis.get(f"{redis_prefix}token:alice") == TOKEN.encode()


async def test_set_invalid_token(store, raw_redis):
    with pytest.raises(ValueError):
        await store.set_token("alice", "token with spaces")
    assert await raw_redis.exists(store.token_key("alice")) == 0


async def test_get_written_by_redis_cli(store, raw_redis):
    await raw_redis.set(store.token_key("bob"), b"externally-rotated")
    assert await store.get_token("bob") == "externally-rotated"


async def test_delete(store):
    await store.set_token("alice", TOKEN)
    assert await store.delete_token("alice") is True
    assert await store.get_token("alice") is None


async def test_delete_missing(store):
    assert await store.delete_token("alice") is False


async def test_tokens_per_principal(store):
    await store.set_token("alice", "token-a")
    await store.set_token("bob", "token-b")
    assert await store.get_token("alice") == "token-a"
    assert await store.get_token("bob") == "token-b"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"tok en", id="space"),
        pytest.param(b"token\n", id="newline"),
        pytest.param(b"\ttoken", id="tab"),
        pytest.param(b"tok\x00en", id="nul"),
        pytest.param(b"tok\x7fen", id="delete"),
        pytest.param("tökén".encode(), id="non-ascii"),
        pytest.param(b"\xff\xfe", id="non-utf8"),
        pytest.param(b"a" * 513, id="too-long"),
    ],
)
async def test_get_malformed(store, raw_redis, value):
    await raw_redis.set(store.token_key("alice"), value)
    with pytest.raises(StoredTokenInvalid) as excinfo:
        await store.get_token("alice")
    assert excinfo.value.status == 500


async def test_get_wrong_type(store, raw_redis):
    await raw_redis.hset(store.token_key("alice"), "token", "value")
    with pytest.raises(StoredTokenInvalid) as excinfo:
        await store.get_token("alice")
    assert excinfo.value.status == 500


async def test_get_max_length(store, raw_redis):
    await raw_redis.set(store.token_key("alice"), b"a" * 512)
    assert await store.get_token("alice") == "a" * 512


# Principals


async def test_principals_sorted(store):
    for principal in ("carol", "alice", "bob@misskey.example"):
        await store.set_token(principal, TOKEN)
    assert await store.principals() == ["alice", "bob@misskey.example", "carol"]


async def test_principals_empty(store):
    assert await store.principals() == []


async def test_principals_after_delete(store):
    await store.set_token("alice", TOKEN)
    await store.set_token("bob", TOKEN)
    await store.delete_token("alice")
    assert await store.principals() == ["bob"]


async def test_principals_prefix_isolation(redis_server, redis_prefix, store):
    other = make_store(redis_server.url, redis_prefix + "other:")
    try:
        await store.set_token("alice", TOKEN)
        await other.set_token("mallory", TOKEN)
        assert await store.principals() == ["alice"]
        assert await other.principals() == ["mallory"]
        assert await store.get_token("mallory") is None
    finally:
        await other.close()


async def test_principals_ignore_other_keys(store, raw_redis, redis_prefix):
    await store.set_token("alice", TOKEN)
    await store.jwt_secret()
    await raw_redis.set(f"{redis_prefix}tokens:bob", TOKEN)
    await raw_redis.set(f"{redis_prefix}other:token:carol", TOKEN)
    assert await store.principals() == ["alice"]


@pytest.mark.parametrize("glob", ["*", "?", "[abc]", "[!x]", "\\", "a\\*"])
async def test_principals_glob_prefix(redis_server, redis_prefix, glob):
    # Each neighbour prefix would match the glob characters if they were
    # passed to SCAN MATCH unescaped.
    prefix = f"{redis_prefix}{glob}:"
    neighbours = [f"{redis_prefix}{name}:" for name in ("a", "x", "abc", "\\a", "")]
    store = make_store(redis_server.url, prefix)
    others = [make_store(redis_server.url, name) for name in neighbours]
    try:
        await store.set_token("alice", TOKEN)
        for index, other in enumerate(others):
            await other.set_token(f"intruder{index}", TOKEN)
        assert await store.principals() == ["alice"]
    finally:
        await store.close()
        for other in others:
            await other.close()


async def test_principals_many(store, raw_redis):
    expected = sorted(f"user{index:04d}" for index in range(1200))
    async with raw_redis.pipeline(transaction=False) as pipe:
        for principal in expected:
            pipe.set(store.token_key(principal), TOKEN)
        await pipe.execute()
    assert await store.principals() == expected


# validate_token and fingerprint


@pytest.mark.parametrize(
    "token",
    ["a", "AbC123", "x" * 512, "!~#$%&'()*+,-./:;<=>?@[]^_`{|}"],
)
def test_validate_token_valid(token):
    assert validate_token(token) == token


@pytest.mark.parametrize(
    "token",
    ["", " ", "a b", "token\n", "\ttoken", "tök", "a\x7f", "a\x00", "x" * 513],
)
def test_validate_token_invalid(token):
    with pytest.raises(ValueError):
        validate_token(token)


def test_fingerprint_stable():
    assert fingerprint(TOKEN) == fingerprint(TOKEN)


def test_fingerprint_format():
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    assert fingerprint(TOKEN) == f"sha256:{digest[:16]}"


def test_fingerprint_hides_token():
    assert TOKEN not in fingerprint(TOKEN)
    assert "a" * 40 not in fingerprint("a" * 40)


def test_fingerprint_distinct():
    assert fingerprint("token-a") != fingerprint("token-b")


# Shared JWT secret


async def test_jwt_secret_created(store, raw_redis):
    secret = await store.jwt_secret()
    assert isinstance(secret, bytes)
    assert len(secret) == JWT_SECRET_BYTES
    assert await raw_redis.get(store.jwt_secret_key) == secret


async def test_jwt_secret_stable(store):
    assert await store.jwt_secret() == await store.jwt_secret()


async def test_jwt_secret_shared(redis_server, redis_prefix, store):
    first = await store.jwt_secret()
    second_store = make_store(redis_server.url, redis_prefix)
    try:
        assert await second_store.jwt_secret() == first
    finally:
        await second_store.close()


async def test_jwt_secret_per_prefix(redis_server, redis_prefix, store):
    other = make_store(redis_server.url, redis_prefix + "other:")
    try:
        assert await other.jwt_secret() != await store.jwt_secret()
    finally:
        await other.close()


async def test_jwt_secret_existing(store, raw_redis):
    existing = bytes(range(48))
    await raw_redis.set(store.jwt_secret_key, existing)
    assert await store.jwt_secret() == existing


async def test_jwt_secret_too_short(store, raw_redis):
    await raw_redis.set(store.jwt_secret_key, b"short")
    with pytest.raises(StoreUnavailable):
        await store.jwt_secret()


# Unreachable Redis

UNREACHABLE_CALLS: dict[str, Callable[[RedisTokenStore], Awaitable[Any]]] = {
    "ping": lambda store: store.ping(),
    "get_token": lambda store: store.get_token("alice"),
    "set_token": lambda store: store.set_token("alice", TOKEN),
    "delete_token": lambda store: store.delete_token("alice"),
    "principals": lambda store: store.principals(),
    "jwt_secret": lambda store: store.jwt_secret(),
}


@pytest.fixture
async def unreachable_store(redis_prefix: str) -> AsyncIterator[RedisTokenStore]:
    # free_port() binds and releases a port, so nothing listens on it.
    token_store = make_store(f"redis://127.0.0.1:{free_port()}/0", redis_prefix)
    yield token_store
    await token_store.close()


@pytest.mark.parametrize("method", list(UNREACHABLE_CALLS))
async def test_unreachable(unreachable_store, method):
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as excinfo:
        await UNREACHABLE_CALLS[method](unreachable_store)
    assert time.monotonic() - started < 2.0
    assert excinfo.value.status == 503


async def test_description_redacts_password(redis_prefix):
    token_store = make_store("redis://:hunter2-pass@127.0.0.1:1/0", redis_prefix)
    try:
        assert "hunter2-pass" not in token_store.description
        assert "127.0.0.1:1" in token_store.description
    finally:
        await token_store.close()
