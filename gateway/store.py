"""Token stores: the Misskey token of each principal.

Two implementations share the ``TokenStore`` interface, chosen by
``store.url``: Redis for shared deployments (``RedisTokenStore``, here) and an
embedded SQLite file for a single machine (``gateway.sqlite_store``).

In Redis the token of principal P lives under ``<prefix>token:P`` as a plain
string, so any tool that writes Redis can rotate it (``redis-cli SET``). The
gateway reads it on every request, so a changed token is used on the next
request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any, Protocol

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from gateway.config import RedisSettings, Settings, redact_url, sqlite_path, store_kind
from gateway.errors import StoredTokenInvalid, StoreUnavailable

# Misskey tokens are short alphanumeric strings; anything with whitespace,
# control characters or non-ASCII text was stored by mistake and is never
# forwarded.
STORED_TOKEN_PATTERN = re.compile(r"[\x21-\x7e]{1,512}")
JWT_SECRET_BYTES = 32


def fingerprint(token: str) -> str:
    """Return a short, non-reversible identifier of a token for display."""
    digest = hashlib.sha256(token.encode()).hexdigest()
    return f"sha256:{digest[:16]}"


def validate_token(token: str) -> str:
    """Return ``token`` if it can be a Misskey token, else raise ValueError."""
    if not STORED_TOKEN_PATTERN.fullmatch(token):
        raise ValueError(
            "a Misskey token is 1 to 512 printable ASCII characters without spaces"
        )
    return token


class TokenStore(Protocol):
    """Where the gateway keeps Misskey tokens and its generated JWT secret.

    Every method raises StoreUnavailable when the store cannot be reached.
    """

    kind: str
    description: str

    async def close(self) -> None: ...

    async def ping(self) -> None: ...

    async def get_token(self, principal: str) -> str | None: ...

    def invalidate(self, principal: str) -> None:
        """Forget any cached token of ``principal``; the next read goes to the store."""

    async def set_token(self, principal: str, token: str) -> None: ...

    async def delete_token(self, principal: str) -> bool: ...

    async def principals(self) -> list[str]: ...

    async def jwt_secret(self) -> bytes: ...


def open_store(settings: Settings) -> TokenStore:
    """Create the store that ``store.url`` names; connections open on first use."""
    url = settings.store.url
    if store_kind(url) == "sqlite":
        from gateway.sqlite_store import SqliteTokenStore

        return SqliteTokenStore(sqlite_path(url), settings.store.poll_interval)
    return RedisTokenStore(dataclasses.replace(settings.redis, url=url))


def open_serving_store(settings: Settings) -> TokenStore:
    """Create the store for ``serve``: with Redis, behind the rotation cache."""
    store = open_store(settings)
    if isinstance(store, RedisTokenStore) and settings.store.cache_ttl > 0:
        from gateway.token_cache import CachedTokenStore

        cached = CachedTokenStore(store, settings.store.cache_ttl)
        cached.start()
        return cached
    return store


def describe_store(settings: Settings) -> str:
    """Return the store kind and location, with any password masked."""
    url = settings.store.url
    if store_kind(url) == "sqlite":
        return f"sqlite {sqlite_path(url).resolve()}"
    return f"redis {redact_url(url)}"


class RedisTokenStore:
    """Principal → Misskey token in Redis, under a key prefix."""

    kind = "redis"

    def __init__(self, settings: RedisSettings):
        self.settings = settings
        self.description = f"redis {redact_url(settings.url)}"
        # One quick retry covers a connection that Redis closed while idle;
        # more would hold requests during an outage that should be a fast 503.
        self._client: redis.Redis = redis.Redis.from_url(
            settings.url,
            socket_timeout=settings.timeout,
            socket_connect_timeout=settings.timeout,
            retry=Retry(NoBackoff(), 1),
            decode_responses=False,
        )

    def token_key(self, principal: str) -> str:
        return f"{self.settings.prefix}token:{principal}"

    @property
    def jwt_secret_key(self) -> str:
        return f"{self.settings.prefix}jwt:secret"

    async def close(self) -> None:
        await self._client.aclose()

    async def ping(self) -> None:
        await self._call(self._client.ping)

    async def get_token(self, principal: str) -> str | None:
        """Return the stored token of ``principal``, or None if there is none."""
        try:
            value = await self._client.get(self.token_key(principal))
        except ResponseError as error:
            # WRONGTYPE: the key holds a hash, list or set, not a string.
            raise StoredTokenInvalid() from error
        except RedisError as error:
            raise StoreUnavailable() from error
        if value is None:
            return None
        try:
            text = value.decode("ascii") if isinstance(value, bytes) else value
            return validate_token(text)
        except (UnicodeDecodeError, ValueError):
            raise StoredTokenInvalid() from None

    def invalidate(self, principal: str) -> None:
        """Do nothing: every read goes to Redis."""

    @property
    def rotation_channel(self) -> str:
        """The pub/sub channel that announces changed tokens, by principal."""
        return f"{self.settings.prefix}rotations"

    async def set_token(self, principal: str, token: str) -> None:
        """Store the token and announce the change to every gateway replica."""
        validate_token(token)
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(self.token_key(principal), token)
                pipe.publish(self.rotation_channel, principal)
                await pipe.execute()
        except RedisError as error:
            raise StoreUnavailable() from error

    async def delete_token(self, principal: str) -> bool:
        """Delete the token of ``principal``; return whether one was stored."""
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self.token_key(principal))
                pipe.publish(self.rotation_channel, principal)
                deleted, _ = await pipe.execute()
        except RedisError as error:
            raise StoreUnavailable() from error
        return bool(deleted)

    def subscriber_client(self) -> redis.Redis:
        """Return a client of its own for waiting on the rotation channel.

        It has no read timeout, because it waits for messages indefinitely;
        a PING every 15 seconds finds a dead connection instead.
        """
        return redis.Redis.from_url(
            self.settings.url,
            socket_timeout=None,
            socket_connect_timeout=self.settings.timeout,
            health_check_interval=15,
        )

    async def principals(self) -> list[str]:
        """Return every principal with a stored token, sorted."""
        prefix = self.token_key("")
        found: list[str] = []
        try:
            async for key in self._scan(prefix):
                found.append(key.decode()[len(prefix) :])
        except RedisError as error:
            raise StoreUnavailable() from error
        return sorted(found)

    async def jwt_secret(self) -> bytes:
        """Return the shared HS* secret kept in the store, creating it once.

        Every replica that uses the same Redis and prefix reads the same
        secret, so a JWT issued against one is valid on all of them.
        """
        key = self.jwt_secret_key
        await self._call(
            self._client.set, key, secrets.token_bytes(JWT_SECRET_BYTES), nx=True
        )
        secret = await self._call(self._client.get, key)
        if not secret or len(secret) < JWT_SECRET_BYTES:
            raise StoreUnavailable(
                f"The JWT secret under {key} is missing or too short."
            )
        return bytes(secret)

    async def _scan(self, prefix: str) -> AsyncIterator[bytes]:
        pattern = _glob_escape(prefix) + "*"
        async for key in self._client.scan_iter(match=pattern, count=500):
            yield key

    async def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except RedisError as error:
            raise StoreUnavailable() from error


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
