"""Onboarding: link a Misskey account to a principal through MiAuth.

The flow has three steps, all under /_gateway/miauth/:

1. ``start`` takes a principal name, the permission kinds and a one-time
   invite that an operator created with ``misskey-gateway invite create``.
   It spends the invite, remembers a new MiAuth session in the token store
   for ten minutes and redirects the browser to Misskey's approval page.
2. Misskey sends the browser back to ``callback?session=…``. The gateway
   takes the session (so it works once), fetches the token from Misskey with
   ``POST /api/miauth/{session}/check`` and stores it for the principal.
3. The callback page hands the person a gateway credential. The Misskey
   token itself is never shown, logged or put in a URL.

The flow cannot start without an invite, because an open start would let
anyone bind any principal name to their own Misskey account and so take
over that principal.
"""

from __future__ import annotations

import html
import json
import re
import time
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import structlog
from aiohttp import web

from gateway.apikeys import new_api_key
from gateway.config import ConfigError, Settings
from gateway.credentials import sign_gateway_jwt, validate_principal
from gateway.errors import StoreUnavailable
from gateway.grants import (
    INVITE_PATTERN,
    MIAUTH_SESSION_TTL,
    SESSION_ID_PATTERN,
    MiAuthSession,
    digest_secret,
)
from gateway.store import TokenStore, validate_token

logger = structlog.get_logger("gateway.onboarding")

CALLBACK_PATH = "/_gateway/miauth/callback"
START_PATH = "/_gateway/miauth/start"
# Misskey permission kinds look like read:account or read:admin:meta.
PERMISSION_PATTERN = re.compile(r"[a-z][a-z0-9_-]*(:[a-z0-9_-]+)+")
MAX_PERMISSIONS = 64
CREDENTIAL_KINDS = ("jwt", "api_key")
# Offered as check boxes on the form; any other kind can be typed in.
COMMON_PERMISSIONS = (
    "read:account",
    "write:account",
    "write:notes",
    "read:notifications",
    "read:drive",
    "write:drive",
    "read:reactions",
    "write:reactions",
)
# Largest /api/miauth/{session}/check response read, in bytes.
MAX_CHECK_RESPONSE = 256 * 1024


class OnboardingError(Exception):
    """A step failed; the message is shown to the person on an error page."""

    def __init__(self, status: int, title: str, message: str):
        super().__init__(message)
        self.status = status
        self.title = title


class Onboarding:
    """Serve the MiAuth onboarding pages."""

    def __init__(self, settings: Settings, store: TokenStore):
        self._settings = settings
        self._onboarding = settings.onboarding
        self._store = store
        self._misskey_url = (
            self._onboarding.misskey_url or settings.upstream.url
        ).rstrip("/")

    async def form(self, request: web.Request) -> web.Response:
        try:
            self._require_enabled()
        except OnboardingError as error:
            return self._error_page(error)
        return self._page("Link a Misskey account", self._form_body(request), 200)

    async def start(self, request: web.Request) -> web.Response:
        try:
            self._require_enabled()
            fields = await _request_fields(request)
            session = await self._start_session(fields)
        except OnboardingError as error:
            return self._error_page(error)
        except StoreUnavailable:
            logger.error("onboarding.store_unavailable", step="start")
            return self._error_page(_store_error())

        query = urlencode(
            {
                "name": self._onboarding.app_name,
                "callback": self._callback_url(request),
                "permission": ",".join(session.permissions),
            },
            quote_via=quote,
        )
        location = f"{self._misskey_url}/miauth/{session.session_id}?{query}"
        response = web.Response(status=302, headers={"Location": location})
        _add_page_headers(response, self._misskey_url)
        return response

    async def callback(self, request: web.Request) -> web.Response:
        try:
            self._require_enabled()
            return await self._finish(request.query.get("session", ""))
        except OnboardingError as error:
            return self._error_page(error)
        except StoreUnavailable:
            logger.error("onboarding.store_unavailable", step="callback")
            return self._error_page(_store_error())

    def _require_enabled(self) -> None:
        if not self._onboarding.enabled:
            raise OnboardingError(
                404,
                "Onboarding is disabled",
                "This gateway does not link Misskey accounts. An operator can "
                "turn it on with onboarding.enabled = true in the config file.",
            )

    async def _start_session(self, fields: dict[str, list[str]]) -> MiAuthSession:
        principal = _single(fields, "principal")
        try:
            validate_principal(principal)
        except ValueError as error:
            raise OnboardingError(
                400, "Invalid principal", f"The principal name is invalid: {error}."
            ) from None
        permissions = parse_permissions(fields.get("permission", []))
        credential = _single(fields, "credential") or "jwt"
        if credential not in CREDENTIAL_KINDS:
            raise OnboardingError(
                400,
                "Invalid credential type",
                "The credential type must be jwt or api_key.",
            )
        invite = _single(fields, "invite")
        if not INVITE_PATTERN.fullmatch(invite):
            raise OnboardingError(
                403,
                "Invite required",
                "Starting the link needs the invite an operator created with "
                "'misskey-gateway invite create PRINCIPAL'.",
            )
        if not await self._store.take_invite(principal, digest_secret(invite)):
            logger.warning("onboarding.invite_rejected", principal=principal)
            raise OnboardingError(
                403,
                "Invite not accepted",
                f"The invite is unknown, expired, already used or not for "
                f"{principal}. Ask an operator for a new one.",
            )

        session = MiAuthSession(
            session_id=str(uuid.uuid4()),
            principal=principal,
            permissions=permissions,
            credential=credential,
            expires_at=time.time() + MIAUTH_SESSION_TTL,
        )
        await self._store.put_miauth_session(session)
        logger.info(
            "onboarding.started",
            principal=principal,
            permissions=",".join(permissions),
            credential_type=credential,
        )
        return session

    def _callback_url(self, request: web.Request) -> str:
        if self._onboarding.public_url:
            return self._onboarding.public_url.rstrip("/") + CALLBACK_PATH
        # NOTE: without onboarding.public_url the callback URL comes from the
        # request's Host header, which the client controls; see README.md.
        return f"{request.scheme}://{request.host}{CALLBACK_PATH}"

    async def _finish(self, session_id: str) -> web.Response:
        # Only sessions this gateway created and stored are accepted, once
        # each, so a forged or replayed callback stores nothing.
        session = None
        if SESSION_ID_PATTERN.fullmatch(session_id):
            session = await self._store.take_miauth_session(session_id)
        if session is None:
            logger.warning("onboarding.unknown_session")
            raise OnboardingError(
                400,
                "Unknown or expired session",
                "This link is unknown, expired or was already used. "
                "Start again with a new invite.",
            )

        result = await self._check(session)
        token = result["token"]
        # NOTE: Misskey returns the token only once, so if this write fails
        # the token is lost and the person has to start again.
        await self._store.set_token(session.principal, token)
        user = result.get("user") if isinstance(result.get("user"), dict) else {}
        username = str(user.get("username", "")) if user else ""
        credential, expires = await self._issue_credential(session)
        logger.info(
            "onboarding.completed",
            principal=session.principal,
            misskey_user_id=str(user.get("id", "")) if user else "",
            misskey_username=username,
            credential_type=session.credential,
        )
        body = _result_body(session, username, credential, expires)
        return self._page("Account linked", body, 200)

    async def _check(self, session: MiAuthSession) -> dict[str, Any]:
        """Fetch the token Misskey granted for ``session``; raise OnboardingError."""
        upstream = self._settings.upstream
        url = f"{upstream.url.rstrip('/')}/api/miauth/{session.session_id}/check"
        timeout = aiohttp.ClientTimeout(
            connect=upstream.connect_timeout, sock_read=upstream.read_timeout
        )
        try:
            async with aiohttp.ClientSession(timeout=timeout) as client:
                async with client.post(url, json={}) as response:
                    status = response.status
                    text = await _read_limited(response, MAX_CHECK_RESPONSE)
        except (aiohttp.ClientError, TimeoutError) as error:
            logger.error(
                "onboarding.check_failed",
                principal=session.principal,
                error=type(error).__name__,
            )
            raise OnboardingError(
                502,
                "Misskey unreachable",
                "The gateway could not reach Misskey to finish the link. "
                "Start again with a new invite.",
            ) from None

        result = _parse_json_object(text)
        if status != 200 or result is None:
            logger.error(
                "onboarding.check_failed", principal=session.principal, status=status
            )
            raise OnboardingError(
                502,
                "Unexpected answer from Misskey",
                f"Misskey answered the token check with HTTP {status}. "
                "Start again with a new invite.",
            )
        if result.get("ok") is not True:
            logger.warning("onboarding.not_approved", principal=session.principal)
            raise OnboardingError(
                400,
                "Not approved",
                "Misskey reports that this request was not approved, or that "
                "its token was already collected. Start again with a new invite.",
            )
        token = result.get("token")
        if not isinstance(token, str):
            token = ""
        try:
            validate_token(token)
        except ValueError:
            logger.error("onboarding.invalid_token", principal=session.principal)
            raise OnboardingError(
                502,
                "Unexpected answer from Misskey",
                "Misskey returned no usable token. Start again with a new invite.",
            ) from None
        return result

    async def _issue_credential(self, session: MiAuthSession) -> tuple[str, str]:
        """Create the gateway credential; return it and when it expires."""
        scope = " ".join(session.permissions)
        if session.credential == "api_key":
            key, record = new_api_key(session.principal, scope)
            await self._store.put_api_key(record)
            return key, "never (revoke it with misskey-gateway key revoke)"
        ttl = self._onboarding.credential_ttl
        try:
            token = await sign_gateway_jwt(
                self._settings.jwt, self._store, session.principal, scope, ttl
            )
        except ConfigError as error:
            logger.error("onboarding.cannot_sign_jwt", error=str(error))
            raise OnboardingError(
                500,
                "Cannot issue a JWT",
                "The Misskey account is linked, but this gateway verifies JWTs "
                "with public keys and cannot sign one. Ask for an API key "
                "instead (misskey-gateway key create).",
            ) from None
        expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() + ttl))
        return token, expires

    def _form_body(self, request: web.Request) -> str:
        principal = html.escape(request.query.get("principal", ""))
        invite = html.escape(request.query.get("invite", ""))
        boxes = "\n".join(
            f'<label class="kind"><input type="checkbox" name="permission" '
            f'value="{kind}"{" checked" if kind == "read:account" else ""}> '
            f"{kind}</label>"
            for kind in COMMON_PERMISSIONS
        )
        return f"""
<p>This links your Misskey account to a principal on this gateway. You
approve the request on Misskey, then get a gateway credential here.</p>
<form method="post" action="{START_PATH}">
  <label for="principal">Principal</label>
  <input id="principal" name="principal" value="{principal}" required
    pattern="[A-Za-z0-9][A-Za-z0-9._@+\\-]{{0,127}}">
  <label for="invite">Invite</label>
  <input id="invite" name="invite" value="{invite}" required autocomplete="off">
  <fieldset><legend>Permissions</legend>
{boxes}
  <label for="more">Other kinds, comma-separated</label>
  <input id="more" name="permission" placeholder="read:following,write:following">
  </fieldset>
  <fieldset><legend>Credential</legend>
  <label class="kind"><input type="radio" name="credential" value="jwt" checked>
    JWT, valid {_duration(self._onboarding.credential_ttl)}</label>
  <label class="kind"><input type="radio" name="credential" value="api_key">
    API key, valid until revoked</label>
  </fieldset>
  <button id="start" type="submit">Continue to Misskey</button>
</form>"""

    def _page(self, title: str, body: str, status: int) -> web.Response:
        response = web.Response(
            status=status,
            text=_PAGE.format(title=html.escape(title), body=body),
            content_type="text/html",
            charset="utf-8",
        )
        _add_page_headers(response, self._misskey_url)
        return response

    def _error_page(self, error: OnboardingError) -> web.Response:
        body = f'<p id="error" class="error">{html.escape(str(error))}</p>'
        return self._page(error.title, body, error.status)


def parse_permissions(values: Iterable[str]) -> tuple[str, ...]:
    """Split comma-separated permission kinds; raise OnboardingError if invalid."""
    kinds: list[str] = []
    for value in values:
        for kind in value.split(","):
            kind = kind.strip()
            if not kind or kind in kinds:
                continue
            if not PERMISSION_PATTERN.fullmatch(kind) or len(kind) > 64:
                raise OnboardingError(
                    400,
                    "Invalid permission",
                    f"{kind[:64]!r} is not a Misskey permission kind "
                    "like read:account.",
                )
            kinds.append(kind)
    if not kinds:
        raise OnboardingError(
            400, "No permission", "Choose at least one permission kind."
        )
    if len(kinds) > MAX_PERMISSIONS:
        raise OnboardingError(
            400,
            "Too many permissions",
            f"At most {MAX_PERMISSIONS} permission kinds can be requested.",
        )
    return tuple(kinds)


async def _request_fields(request: web.Request) -> dict[str, list[str]]:
    """Return the query (GET) or form (POST) fields, each with all its values."""
    source: Any = request.query
    if request.method == "POST":
        source = await request.post()
    fields: dict[str, list[str]] = {}
    for name, value in source.items():
        if isinstance(value, str):
            fields.setdefault(name, []).append(value)
    return fields


def _single(fields: dict[str, list[str]], name: str) -> str:
    values = fields.get(name, [])
    if len(values) > 1:
        raise OnboardingError(
            400, "Invalid request", f"The field {name} is given more than once."
        )
    return values[0].strip() if values else ""


async def _read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read the body; a body longer than ``limit`` bytes is cut (and fails to parse)."""
    body = bytearray()
    async for chunk in response.content.iter_chunked(16 * 1024):
        body += chunk
        if len(body) > limit:
            break
    return bytes(body)


def _parse_json_object(text: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _duration(seconds: int) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} seconds"


def _store_error() -> OnboardingError:
    return OnboardingError(
        503,
        "Store unavailable",
        "The gateway cannot reach its token store. Try again in a minute.",
    )


def _add_page_headers(response: web.Response, misskey_url: str) -> None:
    # The form posts to start, which redirects to Misskey, so form-action
    # allows Misskey's origin as well.
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
        f"frame-ancestors 'none'; form-action 'self' {misskey_url}"
    )
    response.headers["Cache-Control"] = "no-store"
    # Invites and session ids travel in URLs; keep them out of Referer.
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"


def _result_body(
    session: MiAuthSession, username: str, credential: str, expires: str
) -> str:
    kind = "JWT" if session.credential == "jwt" else "API key"
    who = f" as @{html.escape(username)}" if username else ""
    return f"""
<p>Your Misskey account{who} is now linked to the principal
<strong id="principal">{html.escape(session.principal)}</strong>.</p>
<p>Your gateway credential ({kind}) is shown only on this page.
Copy it now and keep it secret:</p>
<textarea id="credential" readonly rows="4">{html.escape(credential)}</textarea>
<dl>
<dt>Permissions</dt><dd id="scope">{html.escape(" ".join(session.permissions))}</dd>
<dt>Expires</dt><dd>{html.escape(expires)}</dd>
</dl>
<p>Send it as <code>Authorization: Bearer &lt;credential&gt;</code>, or as the
<code>i</code> field, with requests to this gateway's <code>/api/</code>.</p>"""


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title} · misskey-gateway</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 36rem; margin: 2rem auto;
  padding: 0 1rem; color: #222; }}
h1 {{ font-size: 1.4rem; }}
label {{ display: block; margin-top: .8rem; font-weight: 600; }}
label.kind {{ font-weight: normal; margin-top: .2rem; }}
input:not([type]), textarea {{ width: 100%; box-sizing: border-box; padding: .4rem;
  font: inherit; }}
textarea {{ font-family: ui-monospace, monospace; word-break: break-all; }}
fieldset {{ margin-top: 1rem; border: 1px solid #ccc; }}
button {{ margin-top: 1rem; padding: .5rem 1rem; font: inherit; }}
.error {{ color: #a00; }}
dt {{ font-weight: 600; }}
</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""
