"""The /streaming WebSocket: identify the client, then relay frames to Misskey.

Misskey (2025.7 to 2026.5) reads the streaming token from ``Authorization:
Bearer`` or from the query ``?i=``, rejects a bad token with a plain HTTP 401
before the upgrade, and requires an app token to carry ``read:account``
(``StreamingApiServerService.attach``). Connections without a token are
anonymous and may use the public channels.

The gateway accepts its own credential in three places, which must agree when
more than one is used:

- ``Authorization: Bearer <credential>``;
- the query ``?i=<credential>``, which misskey-js's ``Stream`` sends;
- a ``Sec-WebSocket-Protocol`` entry ``misskey-gateway.bearer.<credential>``,
  for browsers, which cannot set headers. The client must offer the entry
  ``misskey-gateway`` as well, and the gateway selects that one, so the
  credential never appears in the response.

Everything is checked before the upgrade, so a rejected client gets an HTTP
error in Misskey's envelope and the upstream never receives the attempt. The
upstream connection carries the stored Misskey token in ``Authorization:
Bearer``, never in the URL, and is opened before the client's upgrade is
answered, so upstream failures are HTTP errors too.

Frames are relayed as they are, in both directions. Each side answers pings
itself (aiohttp's autoping) and is pinged every ``streaming.heartbeat``
seconds. A close frame from one side is passed to the other with its code
and reason. The gateway closes a session itself with these codes:

========  ==============================================================
code      meaning
========  ==============================================================
1001      the gateway is shutting down
1014      the connection to the Misskey server was lost
4001      the principal's stored Misskey token changed or was deleted;
          reconnecting picks up the new token
4002      the session reached ``streaming.max_lifetime``; reconnect
4401      the credential was revoked or has expired; get a new one
========  ==============================================================
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from gateway.apikeys import digest_key, looks_like_api_key, matches
from gateway.config import Settings
from gateway.credentials import Principal
from gateway.errors import (
    AccessDenied,
    AuthenticationFailed,
    ClientError,
    CredentialRequired,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    PermissionDenied,
    StoredTokenInvalid,
    StoreUnavailable,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.proxy import (
    REQUEST_ID_HEADER,
    ApiProxy,
    RequestLog,
    error_response,
    new_request_id,
)
from gateway.rewrite import strip_query_credential
from gateway.store import TokenStore
from gateway.token_cache import JWT_ID_ENTRY, CachedTokenStore
from gateway.upstream import forward_request_headers

logger = structlog.get_logger("gateway.streaming")

SUBPROTOCOL = "misskey-gateway"
BEARER_SUBPROTOCOL_PREFIX = "misskey-gateway.bearer."
# The permission kind Misskey requires of app tokens on /streaming.
STREAM_KIND = "read:account"

CLOSE_GOING_AWAY = 1001
CLOSE_UPSTREAM_LOST = 1014
CLOSE_TOKEN_ROTATED = 4001
CLOSE_LIFETIME_ENDED = 4002
CLOSE_CREDENTIAL_INVALID = 4401
# A close reason is at most 123 bytes of UTF-8 (RFC 6455, section 5.5).
MAX_CLOSE_REASON = 123
# Seconds to wait for the peer's close frame after sending ours.
CLOSE_TIMEOUT = 5.0


class UpgradeRequired(ClientError):
    status = 426
    code = "UPGRADE_REQUIRED"
    error_id = "7c2e9b14-58d3-4a0f-b6e1-3d9a5f0c8e27"
    default_message = "This endpoint only accepts WebSocket connections."

    def headers(self) -> dict[str, str]:
        return {"Upgrade": "websocket", "Connection": "Upgrade"}


@dataclass(frozen=True)
class StopRequest:
    """Why the gateway ends a session: close code, close reason, log label."""

    code: int
    message: str
    reason: str


@dataclass(eq=False)
class StreamSession:
    """One relayed WebSocket: the client's identity and both connections."""

    principal: Principal | None
    token: str | None
    api_key_digest: str | None
    client: web.WebSocketResponse
    upstream: aiohttp.ClientWebSocketResponse
    stopped: asyncio.Future[StopRequest] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    frames_from_client: int = 0
    frames_from_upstream: int = 0

    def stop(self, code: int, message: str, reason: str) -> None:
        """Ask the relay to close both connections; the first request wins."""
        if not self.stopped.done():
            self.stopped.set_result(StopRequest(code, message, reason))


@dataclass(frozen=True)
class _Ending:
    """The end of one direction of the relay: which side ended, and its close code."""

    # "client" or "upstream": the side whose connection ended.
    side: str
    # The close code that side sent, or None when its connection was lost.
    code: int | None
    message: str = ""


class StreamingProxy:
    """Handle GET /streaming, and close sessions whose credential changed."""

    def __init__(self, settings: Settings, api: ApiProxy, store: TokenStore):
        self._settings = settings
        self._config = settings.streaming
        self._api = api
        self._store = store
        self._upstream_url = URL(settings.require_upstream())
        self._sessions: set[StreamSession] = set()
        self._http: aiohttp.ClientSession | None = None
        self._checker: asyncio.Task[None] | None = None
        self._pending_checks: set[asyncio.Task[None]] = set()
        self._session_tasks: set[asyncio.Task[None]] = set()
        self._check_failing = False

    def start(self) -> None:
        """Open the upstream client and start watching credentials."""
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self._settings.upstream.connect_timeout,
            sock_read=self._settings.upstream.read_timeout,
        )
        # Every WebSocket keeps its connection, so connections are not pooled.
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=timeout,
            trust_env=False,
        )
        if isinstance(self._store, CachedTokenStore):
            self._store.add_listener(self._on_rotation)
        self._checker = asyncio.create_task(
            self._check_periodically(), name="streaming-checks"
        )

    async def shutdown(self) -> None:
        """Close every open session with 1001 (going away)."""
        for session in list(self._sessions):
            session.stop(CLOSE_GOING_AWAY, "The gateway is shutting down.", "shutdown")

    async def close(self) -> None:
        if self._session_tasks:
            await asyncio.wait(self._session_tasks, timeout=2 * CLOSE_TIMEOUT)
        if isinstance(self._store, CachedTokenStore):
            self._store.remove_listener(self._on_rotation)
        tasks = [*self._pending_checks]
        if self._checker is not None:
            tasks.append(self._checker)
            self._checker = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        log = RequestLog(request_id=new_request_id(request), method=request.method)
        status: int | None = None
        try:
            response = await self._handle(request, log)
            status = response.status
            return response
        except GatewayError as error:
            log.fields["error"] = error.code
            status = error.status
            return error_response(error, log.request_id)
        except Exception:
            logger.exception("streaming.failed", request_id=log.request_id)
            log.fields["error"] = "INTERNAL_ERROR"
            status = 500
            return error_response(GatewayError(), log.request_id)
        finally:
            # An upgraded session is logged by _run_session when it ends.
            if log.fields.get("status") != 101:
                log.fields["status"] = status
                _log_session(log)

    async def _handle(
        self, request: web.Request, log: RequestLog
    ) -> web.StreamResponse:
        if request.method != "GET":
            raise MethodNotAllowed(("GET",))
        _check_upgrade(request)

        raw_query = request.raw_path.partition("?")[2]
        query = strip_query_credential(raw_query)
        credential = self._pick_credential(request, query.credential, log)
        principal = await self._api.identify(credential, log)
        token: str | None = None
        if principal is not None:
            if not principal.allows(STREAM_KIND):
                raise PermissionDenied(
                    f"Streaming requires the {STREAM_KIND} permission kind.",
                    {"kind": STREAM_KIND},
                )
            await self._api.check_rate_limit(principal)
            token = await self._fetch_token(principal)

        upstream, token = await self._connect(
            request, query.query, principal, token, log.request_id
        )
        log.fields["token_injected"] = token is not None
        client = web.WebSocketResponse(
            protocols=(SUBPROTOCOL,),
            autoclose=False,
            autoping=True,
            heartbeat=self._config.heartbeat,
            timeout=CLOSE_TIMEOUT,
        )
        try:
            await client.prepare(request)
        except BaseException:
            await upstream.close(code=CLOSE_GOING_AWAY)
            raise
        api_key_digest = (
            digest_key(credential)
            if credential is not None and looks_like_api_key(credential)
            else None
        )
        session = StreamSession(principal, token, api_key_digest, client, upstream)
        log.fields["status"] = client.status
        # The relay runs in a task of its own, so that when aiohttp cancels
        # this handler (a lost client connection, with handler cancellation
        # on) both sockets are still closed and the session is still logged.
        task = asyncio.create_task(self._run_session(session, log))
        self._session_tasks.add(task)
        task.add_done_callback(self._session_tasks.discard)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            session.stop(CLOSE_GOING_AWAY, "The request was cancelled.", "cancelled")
            raise
        return client

    async def _run_session(self, session: StreamSession, log: RequestLog) -> None:
        self._sessions.add(session)
        try:
            await self._relay(session, log)
        finally:
            self._sessions.discard(session)
            _log_session(log)

    def _pick_credential(
        self, request: web.Request, query_credential: str | None, log: RequestLog
    ) -> str | None:
        found = [
            (source, value)
            for source, value in (
                ("header", self._api.header_credential(request)),
                ("query", query_credential),
                ("subprotocol", _subprotocol_credential(request)),
            )
            if value is not None
        ]
        if not found:
            return None
        first = found[0][1]
        for _, other in found[1:]:
            if not hmac.compare_digest(first.encode(), other.encode()):
                raise InvalidRequest(
                    "The Authorization header, the 'i' query parameter and the "
                    "Sec-WebSocket-Protocol entry contain different credentials."
                )
        log.fields["credential_source"] = ",".join(source for source, _ in found)
        return first

    async def _fetch_token(self, principal: Principal) -> str:
        token = await self._store.get_token(principal.subject)
        if token is None:
            raise CredentialRequired(
                "Credential required. No Misskey token is stored for this principal."
            )
        return token

    async def _connect(
        self,
        request: web.Request,
        query: str,
        principal: Principal | None,
        token: str | None,
        request_id: str,
    ) -> tuple[aiohttp.ClientWebSocketResponse, str | None]:
        """Open the upstream WebSocket; return it and the token it carries.

        When Misskey rejects a stored token and the store now contains another
        one (it was rotated after it was cached), the connection is tried
        once more with the new token, as on the API path.
        """
        try:
            upstream = await self._open_upstream(request, query, token, request_id)
            return upstream, token
        except aiohttp.WSServerHandshakeError as error:
            if error.status != 401 or principal is None:
                raise _handshake_error(error) from None
            self._store.invalidate(principal.subject)
            fresh = await self._fetch_token(principal)
            if fresh == token:
                raise _handshake_error(error) from None
        try:
            upstream = await self._open_upstream(request, query, fresh, request_id)
            return upstream, fresh
        except aiohttp.WSServerHandshakeError as error:
            raise _handshake_error(error) from None

    async def _open_upstream(
        self, request: web.Request, query: str, token: str | None, request_id: str
    ) -> aiohttp.ClientWebSocketResponse:
        if self._http is None:
            raise RuntimeError("StreamingProxy.start() was not called")
        target = "/streaming" + (f"?{query}" if query else "")
        url = self._upstream_url.join(URL(target, encoded=True))
        headers: CIMultiDict[str] = CIMultiDict(
            (name, value)
            for name, value in forward_request_headers(request.headers)
            if not name.lower().startswith("sec-websocket-")
        )
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        headers["X-Forwarded-For"] = self._api.forwarded_for(request)
        headers["X-Forwarded-Proto"] = request.scheme
        headers[REQUEST_ID_HEADER] = request_id
        try:
            return await self._http.ws_connect(
                url,
                headers=headers,
                autoclose=False,
                autoping=True,
                heartbeat=self._config.heartbeat,
                timeout=aiohttp.ClientWSTimeout(
                    ws_receive=None, ws_close=CLOSE_TIMEOUT
                ),
            )
        except aiohttp.WSServerHandshakeError:
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError) as error:
            raise UpstreamTimeout() from error
        except (aiohttp.ClientError, OSError) as error:
            raise UpstreamUnavailable() from error

    async def _relay(self, session: StreamSession, log: RequestLog) -> None:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        timer = loop.call_later(
            self._config.max_lifetime,
            session.stop,
            CLOSE_LIFETIME_ENDED,
            "The session reached its maximum lifetime; reconnect.",
            "lifetime",
        )
        expiry = None
        principal = session.principal
        if principal is not None and principal.expires_at is not None:
            expiry = loop.call_later(
                max(principal.expires_at - time.time(), 0.0),
                session.stop,
                CLOSE_CREDENTIAL_INVALID,
                "The credential has expired.",
                "expired",
            )

        to_upstream = asyncio.create_task(self._pump(session, "client"))
        to_client = asyncio.create_task(self._pump(session, "upstream"))
        waited: set[asyncio.Future[Any]] = {to_upstream, to_client, session.stopped}
        try:
            await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if expiry is not None:
                expiry.cancel()
            for task in (to_upstream, to_client):
                if not task.done():
                    task.cancel()
            results = await asyncio.gather(
                to_upstream, to_client, return_exceptions=True
            )

        endings = [result for result in results if isinstance(result, _Ending)]
        client_code, upstream_code, closed_by, reason = _close_plan(
            session, endings[0] if endings else None
        )
        message = _close_message(session, endings[0] if endings else None)
        await asyncio.gather(
            _close(session.client, client_code, message),
            _close(session.upstream, upstream_code, message),
        )
        log.fields.update(
            {
                "principal": principal.subject if principal is not None else None,
                "session_ms": round((time.monotonic() - started) * 1000, 3),
                "frames_from_client": session.frames_from_client,
                "frames_from_upstream": session.frames_from_upstream,
                "closed_by": closed_by,
                "close_reason": reason,
                "client_close_code": client_code,
                "upstream_close_code": upstream_code,
            }
        )

    async def _pump(self, session: StreamSession, side: str) -> _Ending:
        """Copy frames from ``side`` to the other side until ``side`` closes."""
        source: Any = session.client if side == "client" else session.upstream
        target: Any = session.upstream if side == "client" else session.client
        other = "upstream" if side == "client" else "client"
        while True:
            message = await source.receive()
            try:
                if message.type is WSMsgType.TEXT:
                    await target.send_str(message.data)
                elif message.type is WSMsgType.BINARY:
                    await target.send_bytes(message.data)
                elif message.type is WSMsgType.CLOSE:
                    return _Ending(side, int(message.data), message.extra or "")
                elif message.type is WSMsgType.ERROR and source.close_code not in (
                    None,
                    1006,
                ):
                    # aiohttp has closed the source with the error's code,
                    # such as 1009 for a message over the size limit.
                    return _Ending(side, source.close_code)
                else:
                    # CLOSING, CLOSED or ERROR: the connection is gone.
                    return _Ending(side, None)
            except ConnectionError:
                return _Ending(other, None)
            if side == "client":
                session.frames_from_client += 1
            else:
                session.frames_from_upstream += 1

    def _on_rotation(self, payload: str) -> None:
        if payload.startswith(JWT_ID_ENTRY):
            jwt_id = payload[len(JWT_ID_ENTRY) :]
            affected = [
                s
                for s in self._sessions
                if s.principal is not None and s.principal.jwt_id == jwt_id
            ]
        else:
            affected = [
                s
                for s in self._sessions
                if s.principal is not None and s.principal.subject == payload
            ]
        if affected:
            task = asyncio.create_task(self._check_sessions(affected))
            self._pending_checks.add(task)
            task.add_done_callback(self._pending_checks.discard)

    async def _check_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._config.check_interval)
            await self._check_sessions(list(self._sessions))

    async def _check_sessions(self, sessions: list[StreamSession]) -> None:
        for session in sessions:
            if session.principal is None or session.stopped.done():
                continue
            try:
                await self._check(session, session.principal)
            except StoreUnavailable:
                # Sessions stay open while the store is unreachable; the next
                # check after it is back closes the affected ones.
                if not self._check_failing:
                    self._check_failing = True
                    logger.warning("streaming.check_failed", error="store unavailable")
                return
        if self._check_failing:
            self._check_failing = False
            logger.info("streaming.check_restored")

    async def _check(self, session: StreamSession, principal: Principal) -> None:
        """Stop ``session`` if its credential was revoked or its token changed."""
        if principal.jwt_id is not None and await self._store.is_jwt_id_revoked(
            principal.jwt_id
        ):
            session.stop(
                CLOSE_CREDENTIAL_INVALID, "The credential has been revoked.", "revoked"
            )
            return
        digest = session.api_key_digest
        if digest is not None:
            record = await self._store.get_api_key(digest)
            if record is None or not matches(record, digest):
                session.stop(
                    CLOSE_CREDENTIAL_INVALID,
                    "The API key has been revoked.",
                    "revoked",
                )
                return
        try:
            token = await self._store.get_token(principal.subject)
        except StoredTokenInvalid:
            token = None
        if token != session.token:
            session.stop(
                CLOSE_TOKEN_ROTATED,
                "The stored Misskey token changed; reconnect.",
                "token_rotated",
            )


def _log_session(log: RequestLog) -> None:
    """Log the one ``streaming.session`` event of a /streaming request."""
    duration_ms = (time.perf_counter() - log.started) * 1000
    logger.info(
        "streaming.session",
        request_id=log.request_id,
        duration_ms=round(duration_ms, 3),
        **log.fields,
    )


def _check_upgrade(request: web.Request) -> None:
    """Raise unless the request is a valid WebSocket handshake."""
    upgrade = request.headers.get("Upgrade", "").strip().lower()
    connection = {
        token.strip().lower()
        for value in request.headers.getall("Connection", [])
        for token in value.split(",")
    }
    if upgrade != "websocket" or "upgrade" not in connection:
        raise UpgradeRequired(
            "This endpoint only accepts WebSocket connections; send a WebSocket "
            "handshake (Connection: Upgrade, Upgrade: websocket)."
        )
    if request.headers.get("Sec-WebSocket-Version", "").strip() != "13":
        raise InvalidRequest(
            "The WebSocket handshake must use Sec-WebSocket-Version 13.",
            {"param": "Sec-WebSocket-Version"},
        )
    if not request.headers.get("Sec-WebSocket-Key", "").strip():
        raise InvalidRequest(
            "The WebSocket handshake has no Sec-WebSocket-Key.",
            {"param": "Sec-WebSocket-Key"},
        )


def _subprotocol_credential(request: web.Request) -> str | None:
    """Return the credential of a ``misskey-gateway.bearer.`` subprotocol entry."""
    offered = [
        entry.strip()
        for value in request.headers.getall("Sec-WebSocket-Protocol", [])
        for entry in value.split(",")
    ]
    bearer = [entry for entry in offered if entry.startswith(BEARER_SUBPROTOCOL_PREFIX)]
    if not bearer:
        return None
    if len(bearer) > 1:
        raise InvalidRequest(
            "Sec-WebSocket-Protocol offers more than one credential.",
            {"param": "Sec-WebSocket-Protocol"},
        )
    if SUBPROTOCOL not in offered:
        raise InvalidRequest(
            f"Offer the subprotocol '{SUBPROTOCOL}' next to the credential entry; "
            "the gateway selects it so the credential is never sent back.",
            {"param": "Sec-WebSocket-Protocol"},
        )
    credential = bearer[0][len(BEARER_SUBPROTOCOL_PREFIX) :]
    if not credential:
        raise AuthenticationFailed(
            f"The '{BEARER_SUBPROTOCOL_PREFIX}' entry contains no credential."
        )
    return credential


def _handshake_error(error: aiohttp.WSServerHandshakeError) -> GatewayError:
    """Translate the upstream's refusal of a WebSocket handshake."""
    if error.status == 401:
        return AuthenticationFailed(
            "The Misskey server rejected the stored token of this principal."
        )
    if error.status == 403:
        return AccessDenied(
            "The Misskey server refused the stream; the account may be suspended."
        )
    return UpstreamUnavailable(
        f"The Misskey server answered the WebSocket handshake with HTTP "
        f"{error.status}.",
        {"upstream_status": error.status},
    )


def _close_plan(
    session: StreamSession, ending: _Ending | None
) -> tuple[int, int, str, str | None]:
    """Return the client's and the upstream's close codes, who closed, and why."""
    if session.stopped.done():
        stop = session.stopped.result()
        return stop.code, stop.code, "gateway", stop.reason
    if ending is None:
        return CLOSE_GOING_AWAY, CLOSE_GOING_AWAY, "gateway", "cancelled"
    if ending.side == "client":
        if ending.code is None:
            return CLOSE_GOING_AWAY, CLOSE_GOING_AWAY, "client", "client_lost"
        code = _sendable(ending.code)
        return code, code, "client", None
    if ending.code is None:
        return CLOSE_UPSTREAM_LOST, CLOSE_GOING_AWAY, "upstream", "upstream_lost"
    code = _sendable(ending.code)
    return code, code, "upstream", None


def _close_message(session: StreamSession, ending: _Ending | None) -> str:
    if session.stopped.done():
        return session.stopped.result().message
    if ending is not None and ending.code is not None:
        return ending.message
    if ending is not None and ending.side == "upstream":
        return "The connection to the Misskey server was lost."
    return ""


def _sendable(code: int) -> int:
    """Return ``code`` if a close frame may carry it, else a stand-in.

    A close frame without a code arrives as 0 and becomes 1000; codes that
    only describe local events (1005, 1006, 1015) or are unassigned become
    1011.
    """
    if code == 0:
        return 1000
    if 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999:
        return code
    return 1011


async def _close(socket: Any, code: int, message: str) -> None:
    reason = message.encode()
    if len(reason) > MAX_CLOSE_REASON:
        reason = reason[:MAX_CLOSE_REASON].decode("utf-8", "ignore").encode()
    try:
        await socket.close(code=code, message=reason)
    except (ConnectionError, TimeoutError):
        pass
