"""A fake Misskey server that behaves like Misskey where the gateway depends on it.

It follows Misskey 2025.7 to 2026.5 in these points: the token is read from
``Authorization: Bearer`` (exact, case-sensitive prefix) before the ``i``
field; a non-string ``i`` gets no response at all; a POST without a body is 400
INVALID_PARAM; GET on an endpoint without ``allowGet`` is 405 with an empty
body; errors use Misskey's envelope and 401s carry ``WWW-Authenticate``.
Every request is recorded before it is handled, so tests can assert on
exactly what Misskey would have seen.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web
from multidict import CIMultiDict

from tests.fake_streaming import StreamRecord, handle_streaming

VERSION = "2026.5.4"


@dataclass(frozen=True)
class EndpointMeta:
    require_credential: bool = False
    kind: str | None = None
    allow_get: bool = False
    secure: bool = False


ENDPOINTS: dict[str, EndpointMeta] = {
    "i": EndpointMeta(require_credential=True, kind="read:account"),
    "meta": EndpointMeta(),
    "notes/create": EndpointMeta(require_credential=True, kind="write:notes"),
    "notes/local-timeline": EndpointMeta(),
    "notes/timeline": EndpointMeta(require_credential=True, kind="read:account"),
    "notes/show": EndpointMeta(),
    "users/show": EndpointMeta(),
    "emojis": EndpointMeta(allow_get=True),
    "server-info": EndpointMeta(allow_get=True),
    "app/create": EndpointMeta(),
    "auth/session/generate": EndpointMeta(),
    "admin/meta": EndpointMeta(require_credential=True, kind="read:admin:meta"),
    "i/regenerate-token": EndpointMeta(require_credential=True, secure=True),
    "miauth/*/check": EndpointMeta(),
}


@dataclass(frozen=True)
class Account:
    username: str
    permissions: frozenset[str]

    @property
    def user_id(self) -> str:
        return f"id-{self.username}"


INVALID_PARAM_ID = "3d81ceae-475f-4600-b2a8-2bc116157532"
AUTHENTICATION_FAILED_ID = "b0a7f5f8-dc2f-4171-b91f-de88ad238e14"
CREDENTIAL_REQUIRED_ID = "1384574d-a912-4b81-8601-c7b1c4085df1"


@dataclass
class Upload:
    """A multipart upload as the fake Misskey read it."""

    fields: list[tuple[str, str]] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    filename: str | None = None
    size: int = 0
    sha256: str | None = None


@dataclass
class Received:
    """One request as the fake Misskey saw it."""

    method: str
    path: str
    query_string: str
    headers: CIMultiDict[str]
    body: bytes
    token: Any = None
    received_at: float = field(default_factory=time.monotonic)
    upload: Upload | None = None

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


Handler = Callable[[web.Request, "Received"], Awaitable[web.StreamResponse]]


@dataclass
class MiAuthGrant:
    """A MiAuth session as the fake saw it: the request, then the approval."""

    name: str
    callback: str
    permissions: tuple[str, ...]
    token: str | None = None
    checked: bool = False


@dataclass
class FakeMisskey:
    accounts: dict[str, Account] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    # Extra handlers for test-only paths, by endpoint name; they run after the
    # request is recorded and skip the token checks.
    handlers: dict[str, Handler] = field(default_factory=dict)
    # Every /streaming request, accepted or not (see tests.fake_streaming).
    streams: list[StreamRecord] = field(default_factory=list)
    # MiAuth sessions by id, from GET /miauth/{session} on.
    miauth: dict[str, MiAuthGrant] = field(default_factory=dict)
    # The account that approves MiAuth requests on the approval page.
    miauth_username: str = "carol"
    # Larger uploads get 413, as from Misskey's maxFileSize.
    max_upload_size: int = 1024 * 1024 * 1024
    # Misskey before 13.14 read only i, never the Authorization header.
    reads_bearer: bool = True
    # More paths for GET /api.json, as a newer Misskey would list them.
    openapi_extra_paths: dict[str, Any] = field(default_factory=dict)

    def add_token(
        self, token: str, username: str = "alice", permissions: tuple[str, ...] = ()
    ) -> Account:
        from tests.conftest import remember_secret

        remember_secret(token)
        all_kinds = permissions or (
            "read:account",
            "write:notes",
            "read:admin:meta",
        )
        account = Account(username=username, permissions=frozenset(all_kinds))
        self.accounts[token] = account
        return account

    def remove_token(self, token: str) -> None:
        self.accounts.pop(token, None)

    def requests_to(self, endpoint: str) -> list[Received]:
        return [r for r in self.received if r.path == f"/api/{endpoint}"]

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/api/{endpoint:.*}", self._handle)
        app.router.add_get("/api.json", self._openapi)
        app.router.add_get("/streaming", self._handle_streaming)
        app.router.add_get("/miauth/{session}", self._miauth_page)
        app.router.add_post("/miauth/{session}/approve", self._miauth_approve)
        return app

    async def _openapi(self, request: web.Request) -> web.StreamResponse:
        """Serve the endpoint list as Misskey's GET /api.json describes it."""
        paths: dict[str, Any] = {}
        for name, meta in ENDPOINTS.items():
            if "*" in name:
                continue
            lines = ["No description provided.", ""]
            if meta.secure:
                lines.append(
                    "**Internal Endpoint**: This endpoint is an API for the misskey "
                    "mainframe and is not intended for use by third parties."
                )
            if meta.require_credential:
                credential = "**Credential required**: *Yes*"
                if meta.kind:
                    credential += f" / **Permission**: *{meta.kind}*"
            else:
                credential = "**Credential required**: *No*"
            lines.append(credential)
            operation = {
                "operationId": name,
                "description": "\n".join(lines),
                "security": [{"bearerAuth": []}] if meta.require_credential else [],
            }
            paths[f"/{name}"] = {"post": operation}
            if meta.allow_get:
                paths[f"/{name}"]["get"] = operation
        extra = self.openapi_extra_paths
        paths.update(extra)
        return web.json_response(
            {"openapi": "3.1.0", "info": {"version": VERSION}, "paths": paths}
        )

    async def _handle_streaming(self, request: web.Request) -> web.StreamResponse:
        return await handle_streaming(self.accounts, self.streams, request)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.content_type == "multipart/form-data":
            return await self._handle_upload(request)
        body = await request.read()
        received = Received(
            method=request.method,
            path=request.raw_path.partition("?")[0],
            query_string=request.raw_path.partition("?")[2],
            headers=CIMultiDict(request.headers),
            body=body,
        )
        self.received.append(received)
        endpoint = request.match_info["endpoint"]

        custom = self.handlers.get(endpoint)
        if custom is not None:
            return await custom(request, received)
        parts = endpoint.split("/")
        if len(parts) == 3 and parts[0] == "miauth" and parts[2] == "check":
            return self._miauth_check(parts[1])

        meta = self._meta(endpoint)
        if meta is None:
            return _error(
                404,
                "UNKNOWN_API_ENDPOINT",
                "2ca3b769-540a-4f08-9dd5-b5a825b6d0f1",
                "Unknown API endpoint.",
            )
        if request.method == "GET":
            if not meta.allow_get:
                return web.Response(status=405)
            params: dict[str, Any] = dict(request.query)
        else:
            if not body:
                return _error(
                    400,
                    "INVALID_PARAM",
                    "3d81ceae-475f-4600-b2a8-2bc116157532",
                    "Invalid param.",
                )
            try:
                params = json.loads(body)
            except ValueError:
                return _error(
                    400,
                    "INVALID_PARAM",
                    "3d81ceae-475f-4600-b2a8-2bc116157532",
                    "Invalid param.",
                )
            if not isinstance(params, dict):
                return _error(
                    400,
                    "INVALID_PARAM",
                    "3d81ceae-475f-4600-b2a8-2bc116157532",
                    "Invalid param.",
                )

        authorization = request.headers.get("Authorization")
        if (
            self.reads_bearer
            and authorization is not None
            and authorization.startswith("Bearer ")
        ):
            token: Any = authorization[len("Bearer ") :]
        else:
            token = params.get("i")
        received.token = token
        if token is not None and not isinstance(token, str):
            # Misskey sets 400 and never sends a response for this.
            await asyncio.Event().wait()

        account = None
        if token is not None:
            account = self.accounts.get(token)
            if account is None:
                response = _error(
                    401,
                    "AUTHENTICATION_FAILED",
                    "b0a7f5f8-dc2f-4171-b91f-de88ad238e14",
                    "Authentication failed. Please ensure your token is correct.",
                )
                response.headers["WWW-Authenticate"] = (
                    'Bearer realm="Misskey", error="invalid_token"'
                )
                return response
        if meta.secure:
            return _error(
                403,
                "ACCESS_DENIED",
                "56f35758-7dd5-468b-8439-5d6fb8ec9b8e",
                "Access denied.",
                kind="permission",
            )
        if meta.require_credential and account is None:
            response = _error(
                401,
                "CREDENTIAL_REQUIRED",
                "1384574d-a912-4b81-8601-c7b1c4085df1",
                "Credential required.",
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="Misskey"'
            return response
        if account is not None and meta.kind and meta.kind not in account.permissions:
            return _error(
                403,
                "PERMISSION_DENIED",
                "1370e5b7-d4eb-4566-bb1d-7748ee6a1838",
                "Your app does not have the necessary permissions "
                "to use this endpoint.",
                kind="permission",
            )
        return web.json_response(self._answer(endpoint, params, account, request))

    async def _handle_upload(self, request: web.Request) -> web.StreamResponse:
        """Handle drive/files/create as Misskey does: Bearer first, then ``i``.

        Fields are recorded in order; the file is hashed as it streams in and
        never kept, so large uploads cost no memory here either.
        """
        upload = Upload()
        received = Received(
            method=request.method,
            path=request.raw_path.partition("?")[0],
            query_string=request.raw_path.partition("?")[2],
            headers=CIMultiDict(request.headers),
            body=b"",
            upload=upload,
        )
        self.received.append(received)
        if request.match_info["endpoint"] != "drive/files/create":
            return _error(400, "INVALID_PARAM", INVALID_PARAM_ID, "Invalid param.")
        try:
            reader = await request.multipart()
        except (ValueError, AssertionError):
            return web.Response(status=400)
        fields: dict[str, str] = {}
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue
            if part.filename is not None:
                upload.filename = part.filename
                upload.order.append(f"file:{part.name}")
                digest = hashlib.sha256()
                while chunk := await part.read_chunk(256 * 1024):
                    digest.update(chunk)
                    upload.size += len(chunk)
                    if upload.size > self.max_upload_size:
                        return web.Response(status=413)
                upload.sha256 = digest.hexdigest()
            else:
                value = (await part.read()).decode()
                upload.order.append(f"field:{part.name}")
                upload.fields.append((part.name or "", value))
                fields[part.name or ""] = value

        authorization = request.headers.get("Authorization")
        if (
            self.reads_bearer
            and authorization is not None
            and authorization.startswith("Bearer ")
        ):
            token: str | None = authorization[len("Bearer ") :]
        else:
            token = fields.get("i")
        received.token = token
        account = self.accounts.get(token) if token is not None else None
        if token is not None and account is None:
            return _error(
                401,
                "AUTHENTICATION_FAILED",
                AUTHENTICATION_FAILED_ID,
                "Authentication failed. Please ensure your token is correct.",
            )
        if account is None:
            return _error(
                401,
                "CREDENTIAL_REQUIRED",
                CREDENTIAL_REQUIRED_ID,
                "Credential required.",
            )
        if upload.sha256 is None:
            return _error(400, "INVALID_PARAM", INVALID_PARAM_ID, "Invalid param.")
        return web.json_response(
            {
                "id": "file-1",
                "name": fields.get("name") or upload.filename,
                "size": upload.size,
                "sha256": upload.sha256,
                "userId": account.user_id,
            }
        )

    async def _miauth_page(self, request: web.Request) -> web.Response:
        """Show Misskey's approval page for a MiAuth session."""
        session = request.match_info["session"]
        query = request.query
        permissions = tuple(
            kind for kind in query.get("permission", "").split(",") if kind
        )
        self.miauth.setdefault(
            session,
            MiAuthGrant(query.get("name", ""), query.get("callback", ""), permissions),
        )
        grant = self.miauth[session]
        page = (
            "<!doctype html><title>Fake Misskey</title>"
            f"<p>{html.escape(grant.name)} asks for: "
            f"{html.escape(', '.join(grant.permissions))}</p>"
            f'<form method="post" action="/miauth/{html.escape(session)}/approve">'
            '<button id="approve" type="submit">Approve</button></form>'
        )
        return web.Response(text=page, content_type="text/html")

    async def _miauth_approve(self, request: web.Request) -> web.Response:
        """Grant a new token for the session and send the browser to the callback."""
        session = request.match_info["session"]
        grant = self.miauth.get(session)
        if grant is None or grant.token is not None:
            return web.Response(status=404, text="unknown or approved session")
        grant.token = f"miauth-{secrets.token_hex(16)}"
        self.add_token(grant.token, self.miauth_username, grant.permissions)
        separator = "&" if "?" in grant.callback else "?"
        raise web.HTTPFound(f"{grant.callback}{separator}session={session}")

    def _miauth_check(self, session: str) -> web.Response:
        """Return the token once after approval, then ok: false, as Misskey does."""
        grant = self.miauth.get(session)
        if grant is None or grant.token is None or grant.checked:
            return web.json_response({"ok": False})
        grant.checked = True
        account = self.accounts[grant.token]
        user = {"id": account.user_id, "username": account.username}
        return web.json_response({"ok": True, "token": grant.token, "user": user})

    @staticmethod
    def _meta(endpoint: str) -> EndpointMeta | None:
        if endpoint in ENDPOINTS:
            return ENDPOINTS[endpoint]
        parts = endpoint.split("/")
        if len(parts) == 3 and parts[0] == "miauth" and parts[2] == "check":
            return ENDPOINTS["miauth/*/check"]
        return None

    @staticmethod
    def _answer(
        endpoint: str,
        params: dict[str, Any],
        account: Account | None,
        request: web.Request,
    ) -> Any:
        user = (
            {
                "id": account.user_id,
                "username": account.username,
                "name": account.username,
            }
            if account
            else None
        )
        note = {
            "id": "note-1",
            "text": params.get("text", "hello"),
            "userId": account.user_id if account else "id-bob",
            "visibility": "public",
        }
        if endpoint == "i":
            return user
        if endpoint == "meta":
            return {
                "name": "Fake Misskey",
                "version": VERSION,
                "uri": str(request.url.origin()),
            }
        if endpoint == "notes/create":
            return {"createdNote": note}
        if endpoint in ("notes/local-timeline", "notes/timeline"):
            return [note]
        # Misskey never sends the token back; echo everything else.
        echoed = {key: value for key, value in params.items() if key != "i"}
        return {"endpoint": endpoint, "user": user, "params": echoed}


def _error(
    status: int, code: str, error_id: str, message: str, kind: str = "client"
) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "code": code, "id": error_id, "kind": kind}},
        status=status,
    )
