"""Embedded token store: one SQLite file for a single gateway machine.

The database runs in WAL mode, so the gateway keeps reading while another
process (``misskey-gateway token set``) writes. Each process keeps the tokens
in memory and checks with SQLite at most every ``poll_interval`` seconds whether any
connection changed the file (``PRAGMA data_version``), so a token written by
another process is used within that bound. SQLite calls run on one worker
thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import structlog

from gateway.apikeys import ApiKeyRecord
from gateway.errors import StoredTokenInvalid, StoreUnavailable
from gateway.grants import MiAuthSession, OAuthClientRecord
from gateway.store import JWT_SECRET_BYTES, validate_token

T = TypeVar("T")

logger = structlog.get_logger("gateway.store")

SCHEMA_VERSION = 1
SCHEMA_STATEMENTS = (
    "CREATE TABLE IF NOT EXISTS tokens ("
    " principal TEXT PRIMARY KEY, token TEXT NOT NULL, updated_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS api_keys ("
    " digest TEXT PRIMARY KEY, key_id TEXT NOT NULL, principal TEXT NOT NULL,"
    " scope TEXT NOT NULL, created_at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS api_keys_principal ON api_keys (principal)",
    "CREATE TABLE IF NOT EXISTS revoked_jwt_ids ("
    " jwt_id TEXT PRIMARY KEY, expires_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS miauth_sessions ("
    " session_id TEXT PRIMARY KEY, record TEXT NOT NULL, expires_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS invites ("
    " digest TEXT PRIMARY KEY, principal TEXT NOT NULL, expires_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS oauth_clients ("
    " client_id TEXT PRIMARY KEY, secret_digest TEXT NOT NULL,"
    " principal TEXT NOT NULL, scope TEXT NOT NULL, created_at REAL NOT NULL)",
)
JWT_SECRET_NAME = "jwt"  # noqa: S105 - a row name, not a secret
# Seconds a write waits for another process's write to finish.
BUSY_TIMEOUT_SECONDS = 5.0


def prepare_database_file(path: Path) -> None:
    """Create the database file and its folder readable by the owner only.

    Existing files keep their permissions; the gateway only warns about them
    (see ``loose_permissions``).
    """
    # Several processes may open a new database at once: whichever creates
    # the folder or the file first wins, and the others use what it made.
    path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(descriptor)


def loose_permissions(path: Path) -> bool:
    """Return whether group or others may read or write the database file."""
    mode = path.stat().st_mode
    return bool(mode & (stat.S_IRWXG | stat.S_IRWXO))


class SqliteTokenStore:
    """Principal → Misskey token in a local SQLite file."""

    kind = "sqlite"

    def __init__(self, path: Path, poll_interval: float = 1.0):
        self.path = path
        self.description = f"sqlite {path.resolve()}"
        self._poll_interval = poll_interval
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sqlite-store"
        )
        self._connection: sqlite3.Connection | None = None
        self._tokens: dict[str, str] | None = None
        self._revoked: frozenset[str] = frozenset()
        self._data_version: int | None = None
        self._checked_at = 0.0

    async def close(self) -> None:
        if self._connection is not None:
            await self._run(self._connection.close)
            self._connection = None
        self._executor.shutdown(wait=True)

    async def ping(self) -> None:
        await self._run(lambda: self._db().execute("SELECT 1").fetchone())

    async def get_token(self, principal: str) -> str | None:
        """Return the stored token of ``principal``, or None if there is none."""
        tokens = await self._snapshot()
        token = tokens.get(principal)
        if token is None:
            return None
        try:
            return validate_token(token)
        except ValueError:
            raise StoredTokenInvalid() from None

    async def _snapshot(self) -> dict[str, str]:
        """Return the tokens, reloaded if the file may have changed."""
        now = time.monotonic()
        if self._tokens is None or now - self._checked_at >= self._poll_interval:
            self._tokens = await self._run(self._refresh)
            self._checked_at = now
        return self._tokens

    async def revoke_jwt_id(self, jwt_id: str, expires_at: float) -> None:
        """Reject JWTs with this jti until ``expires_at`` (UNIX seconds)."""

        def write() -> None:
            with self._db() as db:
                db.execute(
                    "INSERT OR REPLACE INTO revoked_jwt_ids (jwt_id, expires_at)"
                    " VALUES (?, ?)",
                    (jwt_id, expires_at),
                )
                # Revocations of expired JWTs are no longer needed.
                db.execute(
                    "DELETE FROM revoked_jwt_ids WHERE expires_at < ?", (time.time(),)
                )

        await self._run(write)
        self._tokens = None

    async def is_jwt_id_revoked(self, jwt_id: str) -> bool:
        await self._snapshot()
        return jwt_id in self._revoked

    def invalidate(self, principal: str) -> None:
        """Reload every token from the file on the next read."""
        self._tokens = None

    async def set_token(self, principal: str, token: str) -> None:
        validate_token(token)

        def write() -> None:
            with self._db() as db:
                db.execute(
                    "INSERT INTO tokens (principal, token, updated_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (principal) DO UPDATE"
                    " SET token = excluded.token, updated_at = excluded.updated_at",
                    (principal, token, time.time()),
                )

        await self._run(write)
        self._tokens = None

    async def delete_token(self, principal: str) -> bool:
        """Delete the token of ``principal``; return whether one was stored."""

        def delete() -> bool:
            with self._db() as db:
                cursor = db.execute(
                    "DELETE FROM tokens WHERE principal = ?", (principal,)
                )
                return cursor.rowcount > 0

        deleted = await self._run(delete)
        self._tokens = None
        return deleted

    async def principals(self) -> list[str]:
        """Return every principal with a stored token, sorted."""

        def read() -> list[str]:
            rows = self._db().execute("SELECT principal FROM tokens ORDER BY principal")
            return [row[0] for row in rows]

        return await self._run(read)

    async def jwt_secret(self) -> bytes:
        """Return the HS* secret kept in the database, creating it once."""

        def read_or_create() -> bytes:
            with self._db() as db:
                db.execute(
                    "INSERT OR IGNORE INTO secrets (name, value) VALUES (?, ?)",
                    (JWT_SECRET_NAME, secrets.token_bytes(JWT_SECRET_BYTES)),
                )
                row = db.execute(
                    "SELECT value FROM secrets WHERE name = ?", (JWT_SECRET_NAME,)
                ).fetchone()
            return bytes(row[0])

        secret = await self._run(read_or_create)
        if len(secret) < JWT_SECRET_BYTES:
            raise StoreUnavailable(f"The JWT secret in {self.path} is too short.")
        return secret

    async def put_api_key(self, record: ApiKeyRecord) -> None:
        def write() -> None:
            with self._db() as db:
                db.execute(
                    "INSERT INTO api_keys"
                    " (digest, key_id, principal, scope, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        record.digest,
                        record.key_id,
                        record.principal,
                        record.scope,
                        record.created_at,
                    ),
                )

        await self._run(write)

    async def get_api_key(self, digest: str) -> ApiKeyRecord | None:
        def read() -> ApiKeyRecord | None:
            row = (
                self._db()
                .execute(
                    "SELECT digest, key_id, principal, scope, created_at"
                    " FROM api_keys WHERE digest = ?",
                    (digest,),
                )
                .fetchone()
            )
            return ApiKeyRecord(*row) if row else None

        return await self._run(read)

    async def list_api_keys(self, principal: str) -> list[ApiKeyRecord]:
        def read() -> list[ApiKeyRecord]:
            rows = self._db().execute(
                "SELECT digest, key_id, principal, scope, created_at FROM api_keys"
                " WHERE principal = ? ORDER BY created_at",
                (principal,),
            )
            return [ApiKeyRecord(*row) for row in rows]

        return await self._run(read)

    async def delete_api_keys(self, principal: str, key_id: str | None = None) -> int:
        """Delete the principal's keys, or only the one with ``key_id``."""

        def delete() -> int:
            with self._db() as db:
                if key_id is None:
                    cursor = db.execute(
                        "DELETE FROM api_keys WHERE principal = ?", (principal,)
                    )
                else:
                    cursor = db.execute(
                        "DELETE FROM api_keys WHERE principal = ? AND key_id = ?",
                        (principal, key_id),
                    )
                return cursor.rowcount

        return await self._run(delete)

    async def put_miauth_session(self, session: MiAuthSession) -> None:
        def write() -> None:
            with self._db() as db:
                db.execute(
                    "INSERT INTO miauth_sessions (session_id, record, expires_at)"
                    " VALUES (?, ?, ?)",
                    (session.session_id, session.to_json(), session.expires_at),
                )
                db.execute(
                    "DELETE FROM miauth_sessions WHERE expires_at < ?", (time.time(),)
                )

        await self._run(write)

    async def take_miauth_session(self, session_id: str) -> MiAuthSession | None:
        def take() -> str | None:
            # DELETE … RETURNING (SQLite 3.35 and later) reads and deletes in
            # one statement, so two processes cannot both take the session.
            with self._db() as db:
                row = db.execute(
                    "DELETE FROM miauth_sessions WHERE session_id = ? RETURNING record",
                    (session_id,),
                ).fetchone()
            return str(row[0]) if row else None

        value = await self._run(take)
        if value is None:
            return None
        session = MiAuthSession.from_json(value)
        if session is None or session.session_id != session_id or session.expired:
            return None
        return session

    async def put_invite(self, principal: str, digest: str, expires_at: float) -> None:
        def write() -> None:
            with self._db() as db:
                db.execute(
                    "INSERT INTO invites (digest, principal, expires_at)"
                    " VALUES (?, ?, ?)",
                    (digest, principal, expires_at),
                )
                db.execute("DELETE FROM invites WHERE expires_at < ?", (time.time(),))

        await self._run(write)

    async def take_invite(self, principal: str, digest: str) -> bool:
        def take() -> bool:
            with self._db() as db:
                cursor = db.execute(
                    "DELETE FROM invites"
                    " WHERE digest = ? AND principal = ? AND expires_at >= ?",
                    (digest, principal, time.time()),
                )
                return cursor.rowcount > 0

        return await self._run(take)

    async def put_oauth_client(self, record: OAuthClientRecord) -> None:
        def write() -> None:
            with self._db() as db:
                db.execute(
                    "INSERT INTO oauth_clients"
                    " (client_id, secret_digest, principal, scope, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        record.client_id,
                        record.secret_digest,
                        record.principal,
                        record.scope,
                        record.created_at,
                    ),
                )

        await self._run(write)

    async def get_oauth_client(self, client_id: str) -> OAuthClientRecord | None:
        def read() -> OAuthClientRecord | None:
            row = (
                self._db()
                .execute(
                    "SELECT client_id, secret_digest, principal, scope, created_at"
                    " FROM oauth_clients WHERE client_id = ?",
                    (client_id,),
                )
                .fetchone()
            )
            return OAuthClientRecord(*row) if row else None

        return await self._run(read)

    async def delete_oauth_client(self, client_id: str) -> bool:
        def delete() -> bool:
            with self._db() as db:
                cursor = db.execute(
                    "DELETE FROM oauth_clients WHERE client_id = ?", (client_id,)
                )
                return cursor.rowcount > 0

        return await self._run(delete)

    def _refresh(self) -> dict[str, str]:
        """Reload every token and revoked jti if another connection changed the file."""
        db = self._db()
        version = db.execute("PRAGMA data_version").fetchone()[0]
        if self._tokens is not None and version == self._data_version:
            return self._tokens
        rows = db.execute("SELECT principal, token FROM tokens").fetchall()
        revoked = db.execute(
            "SELECT jwt_id FROM revoked_jwt_ids WHERE expires_at >= ?", (time.time(),)
        ).fetchall()
        self._revoked = frozenset(row[0] for row in revoked)
        self._data_version = version
        return {principal: token for principal, token in rows}

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            prepare_database_file(self.path)
            if loose_permissions(self.path):
                logger.warning(
                    "store.permissions",
                    path=str(self.path),
                    detail="group or others can access the token database; "
                    "run chmod 600 on it",
                )
            connection = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_SECONDS,
                check_same_thread=False,
            )
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")
            # DDL runs outside transactions here; IF NOT EXISTS makes it safe
            # when several processes open a new file at once.
            for statement in SCHEMA_STATEMENTS:
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._connection = connection
        return self._connection

    async def _run(self, work: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, work)
        except (sqlite3.Error, OSError) as error:
            raise StoreUnavailable() from error
