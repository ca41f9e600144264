"""Token stores: the Misskey token of each principal.

Two implementations share the ``TokenStore`` interface, chosen by
``store.url``: Redis for shared deployments (``RedisTokenStore``, here) and an
embedded SQLite file for a single machine (``gateway.sqlite_store``).

In Redis the token of principal P lives under ``<prefix>token:P`` as a plain
string, so any tool that writes Redis can rotate it (``redis-cli SET``). The
gateway reads it on every request, so a changed token is used on the next
request. ``gateway.redis_client`` creates the client for a single server, a
Sentinel-managed master or a cluster.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any, Protocol

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from gateway.apikeys import ApiKeyRecord
from gateway.config import RedisSettings, Settings, redact_url, sqlite_path, store_kind
from gateway.errors import StoredTokenInvalid, StoreUnavailable
from gateway.grants import MiAuthSession, OAuthClientRecord
from gateway.redis_client import (
    REDIS_ERRORS,
    RedisClient,
    create_client,
    create_subscriber_client,
)

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
    """Storage for Misskey tokens and the gateway's generated JWT secret.

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

    async def put_api_key(self, record: ApiKeyRecord) -> None: ...

    async def revoke_jwt_id(self, jwt_id: str, expires_at: float) -> None:
        """Reject JWTs with this jti until ``expires_at`` (UNIX seconds)."""
        ...

    async def is_jwt_id_revoked(self, jwt_id: str) -> bool: ...

    async def get_api_key(self, digest: str) -> ApiKeyRecord | None: ...

    async def list_api_keys(self, principal: str) -> list[ApiKeyRecord]: ...

    async def delete_api_keys(self, principal: str, key_id: str | None = None) -> int:
        """Delete the principal's API keys, or only the one with ``key_id``."""
        ...

    async def put_miauth_session(self, session: MiAuthSession) -> None:
        """Keep a started MiAuth session until ``session.expires_at``."""
        ...

    async def take_miauth_session(self, session_id: str) -> MiAuthSession | None:
        """Remove and return a MiAuth session; None if unknown, used or expired."""
        ...

    async def put_invite(self, principal: str, digest: str, expires_at: float) -> None:
        """Keep an onboarding invite for ``principal`` until ``expires_at``."""
        ...

    async def take_invite(self, principal: str, digest: str) -> bool:
        """Remove an unexpired invite of ``principal``; return whether one existed."""
        ...

    async def put_oauth_client(self, record: OAuthClientRecord) -> None: ...

    async def get_oauth_client(self, client_id: str) -> OAuthClientRecord | None: ...

    async def delete_oauth_client(self, client_id: str) -> bool: ...


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

        cached = CachedTokenStore(
            store, settings.store.cache_ttl, settings.store.stale_limit
        )
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
        self._client: RedisClient = create_client(settings)

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
            if str(error).startswith("WRONGTYPE"):
                # The key contains a hash, list or set, not a string.
                raise StoredTokenInvalid() from error
            # NOPERM, CLUSTERDOWN, MASTERDOWN and the like.
            raise StoreUnavailable() from error
        except REDIS_ERRORS as error:
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
        await self._write_and_announce(
            "SET", self.token_key(principal), principal, token
        )

    async def delete_token(self, principal: str) -> bool:
        """Delete the token of ``principal``; return whether one was stored."""
        deleted = await self._write_and_announce(
            "DEL", self.token_key(principal), principal
        )
        return bool(deleted)

    async def _write_and_announce(
        self, command: str, key: str, message: str, *args: str
    ) -> Any:
        """Run SET or DEL on ``key``, then PUBLISH ``message`` on the channel.

        Return the reply to the write. Outside a cluster both run in one
        MULTI/EXEC. A cluster cannot run them in one transaction, because
        PUBLISH has no key to tie it to the key's slot, so the write comes
        first and a replica that reacts to the message reads the new value.
        When the PUBLISH fails after the write, this raises StoreUnavailable
        and other replicas see the change once their cached entry expires.
        """
        try:
            if isinstance(self._client, RedisCluster):
                reply = await self._client.execute_command(command, key, *args)
                # Any node passes a PUBLISH on to the whole cluster. The node
                # that just took the write is the one most likely to respond;
                # redis-py would otherwise pick a random node.
                node = self._client.get_node_from_key(key)
                await self._client.publish(
                    self.rotation_channel, message, target_nodes=node
                )
                return reply
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.execute_command(command, key, *args)
                pipe.publish(self.rotation_channel, message)
                reply, _ = await pipe.execute()
                return reply
        except REDIS_ERRORS as error:
            raise StoreUnavailable() from error

    def subscriber_client(self, attempt: int = 0) -> redis.Redis:
        """Return a client of its own for waiting on the rotation channel.

        It has no read timeout, because it waits for messages indefinitely;
        a PING every 15 seconds finds a dead connection instead. In a cluster
        it connects to one node, a different one for each ``attempt``.
        """
        return create_subscriber_client(self.settings, self._client, attempt)

    async def principals(self) -> list[str]:
        """Return every principal with a stored token, sorted."""
        prefix = self.token_key("")
        found: list[str] = []
        try:
            async for key in self._scan(prefix):
                found.append(key.decode()[len(prefix) :])
        except REDIS_ERRORS as error:
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

    @property
    def client(self) -> RedisClient:
        """The Redis client, shared with the rate limiter."""
        return self._client

    def revoked_jwt_id_key(self, jwt_id: str) -> str:
        return f"{self.settings.prefix}revoked-jti:{jwt_id}"

    async def revoke_jwt_id(self, jwt_id: str, expires_at: float) -> None:
        """Reject JWTs with this jti until ``expires_at``, on every replica.

        The key expires with the JWT, so revocations clean up after
        themselves; the message on the rotation channel drops the replicas'
        cached results for this jti.
        """
        await self._write_and_announce(
            "SET",
            self.revoked_jwt_id_key(jwt_id),
            f"jti:{jwt_id}",
            "1",
            "EXAT",
            str(int(expires_at) + 1),
        )

    async def is_jwt_id_revoked(self, jwt_id: str) -> bool:
        return bool(
            await self._call(self._client.exists, self.revoked_jwt_id_key(jwt_id))
        )

    def api_key_key(self, digest: str) -> str:
        return f"{self.settings.prefix}apikey:{digest}"

    def api_key_index(self, principal: str) -> str:
        return f"{self.settings.prefix}apikeys:{principal}"

    async def put_api_key(self, record: ApiKeyRecord) -> None:
        """Store an API key's record and list it under its principal.

        Two commands rather than one transaction, because in a cluster the
        two keys live in different slots.
        """
        fields = {
            "key_id": record.key_id,
            "principal": record.principal,
            "scope": record.scope,
            "created_at": repr(record.created_at),
        }
        await self._call(
            self._client.hset, self.api_key_key(record.digest), mapping=fields
        )
        await self._call(
            self._client.sadd, self.api_key_index(record.principal), record.digest
        )

    async def get_api_key(self, digest: str) -> ApiKeyRecord | None:
        fields = await self._call(self._client.hgetall, self.api_key_key(digest))
        return _api_key_record(digest, fields)

    async def list_api_keys(self, principal: str) -> list[ApiKeyRecord]:
        digests = await self._call(self._client.smembers, self.api_key_index(principal))
        records = []
        for raw in digests:
            digest = raw.decode() if isinstance(raw, bytes) else raw
            record = await self.get_api_key(digest)
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda record: record.created_at)

    async def delete_api_keys(self, principal: str, key_id: str | None = None) -> int:
        """Delete the principal's API keys, or only the one with ``key_id``."""
        deleted = 0
        for record in await self.list_api_keys(principal):
            if key_id is not None and record.key_id != key_id:
                continue
            await self._call(self._client.delete, self.api_key_key(record.digest))
            await self._call(
                self._client.srem, self.api_key_index(principal), record.digest
            )
            deleted += 1
        return deleted

    def miauth_session_key(self, session_id: str) -> str:
        return f"{self.settings.prefix}miauth:{session_id}"

    def invite_key(self, principal: str, digest: str) -> str:
        # The principal is part of the key, so taking an invite with another
        # principal's name finds nothing and leaves the invite usable.
        return f"{self.settings.prefix}invite:{principal}:{digest}"

    def oauth_client_key(self, client_id: str) -> str:
        return f"{self.settings.prefix}oauth-client:{client_id}"

    async def put_miauth_session(self, session: MiAuthSession) -> None:
        await self._call(
            self._client.set,
            self.miauth_session_key(session.session_id),
            session.to_json(),
            exat=int(session.expires_at) + 1,
        )

    async def take_miauth_session(self, session_id: str) -> MiAuthSession | None:
        # GETDEL (Redis 6.2 and later) reads and deletes in one step, so two
        # callbacks with the same session cannot both get it.
        value = await self._call(
            self._client.getdel, self.miauth_session_key(session_id)
        )
        if value is None:
            return None
        session = MiAuthSession.from_json(value)
        if session is None or session.session_id != session_id or session.expired:
            return None
        return session

    async def put_invite(self, principal: str, digest: str, expires_at: float) -> None:
        await self._call(
            self._client.set,
            self.invite_key(principal, digest),
            "1",
            exat=int(expires_at) + 1,
        )

    async def take_invite(self, principal: str, digest: str) -> bool:
        deleted = await self._call(
            self._client.delete, self.invite_key(principal, digest)
        )
        return bool(deleted)

    async def put_oauth_client(self, record: OAuthClientRecord) -> None:
        fields = {
            "secret_digest": record.secret_digest,
            "principal": record.principal,
            "scope": record.scope,
            "created_at": repr(record.created_at),
        }
        await self._call(
            self._client.hset, self.oauth_client_key(record.client_id), mapping=fields
        )

    async def get_oauth_client(self, client_id: str) -> OAuthClientRecord | None:
        fields = await self._call(
            self._client.hgetall, self.oauth_client_key(client_id)
        )
        if not fields:
            return None
        values = _decode_hash(fields)
        try:
            return OAuthClientRecord(
                client_id=client_id,
                secret_digest=values["secret_digest"],
                principal=values["principal"],
                scope=values["scope"],
                created_at=float(values["created_at"]),
            )
        except (KeyError, ValueError):
            return None

    async def delete_oauth_client(self, client_id: str) -> bool:
        deleted = await self._call(
            self._client.delete, self.oauth_client_key(client_id)
        )
        return bool(deleted)

    async def _scan(self, prefix: str) -> AsyncIterator[bytes]:
        pattern = _glob_escape(prefix) + "*"
        # In a cluster, scan_iter walks every master in turn.
        async for key in self._client.scan_iter(match=pattern, count=500):
            yield key

    async def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except REDIS_ERRORS as error:
            raise StoreUnavailable() from error


def _api_key_record(digest: str, fields: dict[Any, Any]) -> ApiKeyRecord | None:
    """Build a record from a Redis hash; None when it is missing or damaged."""
    if not fields:
        return None
    values = _decode_hash(fields)
    try:
        return ApiKeyRecord(
            digest=digest,
            key_id=values["key_id"],
            principal=values["principal"],
            scope=values["scope"],
            created_at=float(values["created_at"]),
        )
    except (KeyError, ValueError):
        return None


def _decode_hash(fields: dict[Any, Any]) -> dict[str, str]:
    """Return a Redis hash's fields and values as text."""
    return {
        (k.decode() if isinstance(k, bytes) else k): (
            v.decode() if isinstance(v, bytes) else v
        )
        for k, v in fields.items()
    }


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
