"""In-process cache of Redis tokens, invalidated over Redis pub/sub.

Every write through the gateway's store (``misskey-gateway token set`` and
``delete``) publishes the principal's name on ``<prefix>rotations`` in the
same transaction, and every replica drops that principal's cached token when
the message arrives. Another tool rotates a token the same way:
``SET <prefix>token:P NEW`` followed by ``PUBLISH <prefix>rotations P``.

A message can be lost (the subscription drops, or a tool does not
publish), so entries also expire after ``ttl`` seconds; that is the bound on
staleness, with or without the subscription. The cache is emptied whenever
the subscription is (re)established, since messages may have been missed in
between. While Redis is unreachable, cached tokens keep being used for up to
``stale_limit`` seconds past their expiry; other requests get 503.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from gateway.apikeys import ApiKeyRecord
from gateway.errors import StoreUnavailable
from gateway.grants import MiAuthSession, OAuthClientRecord
from gateway.metrics import (
    BATCH,
    ROTATIONS,
    TOKEN_CACHE_HIT,
    TOKEN_CACHE_MISS,
    TOKEN_CACHE_STALE,
)
from gateway.redis_client import REDIS_ERRORS
from gateway.store import RedisTokenStore

logger = structlog.get_logger("gateway.store")

MAX_ENTRIES = 100_000
# Prefix of cache entries for JWT ids; principals cannot contain ":".
JWT_ID_ENTRY = "jti:"
RECONNECT_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)
SUBSCRIPTION_ERRORS: tuple[type[Exception], ...] = (*REDIS_ERRORS, OSError)


@dataclass(frozen=True)
class _Entry:
    token: str | None
    expires_at: float


class CachedTokenStore:
    """A RedisTokenStore with a per-process cache in front of ``get_token``."""

    kind = "redis"

    def __init__(self, inner: RedisTokenStore, ttl: float, stale_limit: float = 0.0):
        self.inner = inner
        self.description = inner.description
        self.ttl = ttl
        # Seconds past ``ttl`` a cached token is still used while Redis is
        # unreachable. A principal cached as having no token gets 503 instead.
        self.stale_limit = stale_limit
        self.hits = 0
        self.misses = 0
        self.stale_hits = 0
        self._serving_stale = False
        self._entries: dict[str, _Entry] = {}
        # Bumped by every invalidation, so a read that raced one is not cached.
        self._generation = 0
        self._subscribed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._callbacks: list[Callable[[str], None]] = []

    @property
    def subscribed(self) -> bool:
        """Whether rotation messages are being received."""
        return self._subscribed.is_set()

    def start(self) -> None:
        """Start listening for rotations; call once the event loop runs."""
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="token-rotations")

    def add_listener(self, callback: Callable[[str], None]) -> None:
        """Call ``callback`` with the payload of every rotation message.

        The payload is a principal, or ``jti:<id>`` for a revoked JWT. The
        callback runs after the cached entry is dropped, in the listener
        task, so it must not block.
        """
        self._callbacks.append(callback)

    def remove_listener(self, callback: Callable[[str], None]) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    async def wait_subscribed(self) -> None:
        """Wait until rotation messages are received."""
        await self._subscribed.wait()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except asyncio.CancelledError:
                pass
            self._listener = None
        await self.inner.close()

    async def ping(self) -> None:
        await self.inner.ping()

    async def get_token(self, principal: str) -> str | None:
        """Return the token of ``principal``, from the cache when it is fresh."""
        now = time.monotonic()
        entry = self._entries.get(principal)
        if entry is not None and now < entry.expires_at:
            self.hits += 1
            BATCH.inc(TOKEN_CACHE_HIT)
            return entry.token

        self.misses += 1
        TOKEN_CACHE_MISS.inc()
        generation = self._generation
        try:
            token = await self.inner.get_token(principal)
        except StoreUnavailable:
            if (
                entry is not None
                and entry.token is not None
                and now < entry.expires_at + self.stale_limit
            ):
                self.stale_hits += 1
                TOKEN_CACHE_STALE.inc()
                if not self._serving_stale:
                    self._serving_stale = True
                    logger.warning("store.serving_stale", stale_limit=self.stale_limit)
                return entry.token
            raise
        self._serving_stale = False
        if generation == self._generation:
            if len(self._entries) >= MAX_ENTRIES:
                del self._entries[next(iter(self._entries))]
            self._entries[principal] = _Entry(token, now + self.ttl)
        return token

    async def set_token(self, principal: str, token: str) -> None:
        await self.inner.set_token(principal, token)
        self.invalidate(principal)

    async def delete_token(self, principal: str) -> bool:
        deleted = await self.inner.delete_token(principal)
        self.invalidate(principal)
        return deleted

    async def principals(self) -> list[str]:
        return await self.inner.principals()

    async def jwt_secret(self) -> bytes:
        return await self.inner.jwt_secret()

    async def revoke_jwt_id(self, jwt_id: str, expires_at: float) -> None:
        await self.inner.revoke_jwt_id(jwt_id, expires_at)
        self.invalidate(JWT_ID_ENTRY + jwt_id)

    async def is_jwt_id_revoked(self, jwt_id: str) -> bool:
        """Return whether a jti is revoked, cached like tokens.

        The result is cached under ``jti:<jti>``, a name no principal can have,
        and dropped by the ``jti:<jti>`` message that a revocation publishes.
        """
        name = JWT_ID_ENTRY + jwt_id
        now = time.monotonic()
        entry = self._entries.get(name)
        if entry is not None and now < entry.expires_at:
            return entry.token is not None
        generation = self._generation
        try:
            revoked = await self.inner.is_jwt_id_revoked(jwt_id)
        except StoreUnavailable:
            if entry is not None and now < entry.expires_at + self.stale_limit:
                return entry.token is not None
            raise
        if generation == self._generation:
            self._remember(name, "revoked" if revoked else None, now)
        return revoked

    def _remember(self, name: str, value: str | None, now: float) -> None:
        if len(self._entries) >= MAX_ENTRIES:
            del self._entries[next(iter(self._entries))]
        self._entries[name] = _Entry(value, now + self.ttl)

    # API keys are not cached: a revoked key stops working at once.

    async def put_api_key(self, record: ApiKeyRecord) -> None:
        await self.inner.put_api_key(record)

    async def get_api_key(self, digest: str) -> ApiKeyRecord | None:
        return await self.inner.get_api_key(digest)

    async def list_api_keys(self, principal: str) -> list[ApiKeyRecord]:
        return await self.inner.list_api_keys(principal)

    async def delete_api_keys(self, principal: str, key_id: str | None = None) -> int:
        return await self.inner.delete_api_keys(principal, key_id)

    # Onboarding records and OAuth clients are read once each, never cached.

    async def put_miauth_session(self, session: MiAuthSession) -> None:
        await self.inner.put_miauth_session(session)

    async def take_miauth_session(self, session_id: str) -> MiAuthSession | None:
        return await self.inner.take_miauth_session(session_id)

    async def put_invite(self, principal: str, digest: str, expires_at: float) -> None:
        await self.inner.put_invite(principal, digest, expires_at)

    async def take_invite(self, principal: str, digest: str) -> bool:
        return await self.inner.take_invite(principal, digest)

    async def put_oauth_client(self, record: OAuthClientRecord) -> None:
        await self.inner.put_oauth_client(record)

    async def get_oauth_client(self, client_id: str) -> OAuthClientRecord | None:
        return await self.inner.get_oauth_client(client_id)

    async def delete_oauth_client(self, client_id: str) -> bool:
        return await self.inner.delete_oauth_client(client_id)

    def invalidate(self, principal: str) -> None:
        self._generation += 1
        self._entries.pop(principal, None)

    def invalidate_all(self) -> None:
        self._generation += 1
        self._entries.clear()

    def _notify(self, payload: str) -> None:
        for callback in list(self._callbacks):
            try:
                callback(payload)
            except Exception:
                logger.exception("store.listener_failed")

    async def _listen(self) -> None:
        channel = self.inner.rotation_channel
        failures = 0
        # Counts every connection attempt, so that in a cluster each attempt
        # subscribes through the next node.
        attempts = 0
        while True:
            client = self.inner.subscriber_client(attempts)
            attempts += 1
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(channel)
                async for message in pubsub.listen():
                    kind = message.get("type")
                    if kind == "subscribe":
                        # The server confirmed the subscription. Messages
                        # published before this point were missed.
                        self.invalidate_all()
                        self._subscribed.set()
                        if failures:
                            logger.info("store.subscription_restored", channel=channel)
                        failures = 0
                    elif kind == "message":
                        ROTATIONS.inc()
                        principal = message["data"]
                        if isinstance(principal, bytes):
                            principal = principal.decode("utf-8", "replace")
                        self.invalidate(principal)
                        self._notify(principal)
            except SUBSCRIPTION_ERRORS as error:
                # Cached entries stay: they expire on their own, and the cache
                # is emptied when the subscription comes back.
                self._subscribed.clear()
                if failures == 0:
                    logger.warning(
                        "store.subscription_lost", channel=channel, error=str(error)
                    )
                delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
                failures += 1
                await asyncio.sleep(delay)
            finally:
                self._subscribed.clear()
                await pubsub.aclose()
                await client.aclose()
