"""The aiohttp application: routes, and the resources each process opens once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web

from gateway.config import Settings
from gateway.errors import GatewayError, NoSuchEndpoint, StoreUnavailable
from gateway.metrics import metrics_view
from gateway.oauth import TokenEndpoint
from gateway.onboarding import Onboarding
from gateway.policy import PolicyTable, load_policy_table
from gateway.policy_sync import compare, fetch_openapi, rows_from_openapi
from gateway.proxy import ApiProxy, error_response, new_request_id
from gateway.ratelimit import (
    RateLimiter,
    RateLimitSettings,
    local_limiter,
    redis_limiter,
)
from gateway.readiness import UpstreamProbe
from gateway.store import RedisTokenStore, TokenStore, open_serving_store
from gateway.streaming import StreamingProxy
from gateway.token_cache import CachedTokenStore
from gateway.upstream import Relay, create_pool
from gateway.upstream_pool import UpstreamPool

logger = structlog.get_logger("gateway")

SETTINGS_KEY = web.AppKey("settings", Settings)
POLICY_KEY = web.AppKey("policy", PolicyTable)
STORE_KEY = web.AppKey("store", TokenStore)
UPSTREAM_KEY = web.AppKey("upstream", UpstreamPool)
PROXY_KEY = web.AppKey("proxy", ApiProxy)
ONBOARDING_KEY = web.AppKey("onboarding", Onboarding)
TOKEN_ENDPOINT_KEY = web.AppKey("token_endpoint", TokenEndpoint)
STREAMING_KEY = web.AppKey("streaming", StreamingProxy)
UPSTREAM_PROBE_KEY = web.AppKey("upstream_probe", UpstreamProbe)


def create_app(
    settings: Settings, policy: PolicyTable | None = None
) -> web.Application:
    """Build the gateway application; resources open when it starts."""
    settings.require_upstream()
    if policy is None:
        policy = load_policy_table(
            settings.policy.file or None, settings.policy.endpoints
        )

    app = web.Application(client_max_size=settings.server.max_body_size)
    app[SETTINGS_KEY] = settings
    app[POLICY_KEY] = policy
    app.cleanup_ctx.append(_resources)
    # aiohttp runs on_shutdown after the listening sockets are closed and
    # before it waits for in-flight requests.
    app.on_shutdown.append(_log_stopping)
    app.on_shutdown.append(_close_streams)

    app.router.add_get("/_gateway/healthz", _healthz)
    app.router.add_get("/_gateway/readyz", _readyz)
    app.router.add_get("/_gateway/metrics", metrics_view)
    app.router.add_get("/_gateway/miauth/", _miauth_form)
    app.router.add_route("*", "/_gateway/miauth/start", _miauth_start)
    app.router.add_get("/_gateway/miauth/callback", _miauth_callback)
    app.router.add_route("*", "/_gateway/oauth/token", _oauth_token)
    app.router.add_route("*", "/api/{endpoint:.*}", _api)
    app.router.add_route("*", "/streaming", _streaming)
    app.router.add_route("*", "/{path:.*}", _not_api)
    return app


async def check_policy_against_upstream(settings: Settings, table: PolicyTable) -> None:
    """Log, once, how the policy table differs from the upstream's endpoints."""
    try:
        rows, version = rows_from_openapi(await fetch_openapi(settings.upstream.url))
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        logger.warning("policy.check_failed", error=str(error) or type(error).__name__)
        return
    difference = compare(table, rows)
    if difference.empty:
        logger.info("policy.matches_upstream", misskey_version=version)
        return
    shown = 20
    logger.warning(
        "policy.differs_from_upstream",
        misskey_version=version,
        table_misskey_version=table.misskey_version,
        missing_from_table=difference.missing_from_table[:shown],
        missing_from_table_count=len(difference.missing_from_table),
        missing_upstream=difference.missing_upstream[:shown],
        missing_upstream_count=len(difference.missing_upstream),
        changed=difference.changed[:shown],
        changed_count=len(difference.changed),
        detail="endpoints missing from the table are treated as required; "
        "run misskey-gateway policy sync to build a table from the upstream; "
        "rows changed by [policy.endpoints] overrides are listed as changed",
    )


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS_KEY]
    store = open_serving_store(settings)
    pool = create_pool(settings.upstream)
    app[STORE_KEY] = store
    app[UPSTREAM_KEY] = pool

    probe = UpstreamProbe(pool.host, pool.port)
    app[UPSTREAM_PROBE_KEY] = probe
    app[ONBOARDING_KEY] = Onboarding(settings, store)
    app[TOKEN_ENDPOINT_KEY] = TokenEndpoint(settings, store)
    app[PROXY_KEY] = ApiProxy(
        settings, app[POLICY_KEY], store, Relay(pool), create_limiter(settings, store)
    )

    streaming = StreamingProxy(settings, app[PROXY_KEY], store)
    app[STREAMING_KEY] = streaming
    streaming.start()

    policy_check: asyncio.Task[None] | None = None
    if settings.policy.check_upstream:
        policy_check = asyncio.create_task(
            check_policy_against_upstream(settings, app[POLICY_KEY]),
            name="policy-check",
        )

    try:
        yield
    finally:
        if policy_check is not None:
            policy_check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await policy_check
        await streaming.close()
        await probe.close()
        await pool.close()
        await store.close()


def create_limiter(settings: Settings, store: TokenStore) -> RateLimiter | None:
    """Create the per-principal rate limiter, or None when no limit is set.

    With Redis the budget is shared by every replica; with SQLite each
    process counts on its own.
    """
    config = settings.ratelimit
    limits = RateLimitSettings(
        requests_per_minute=config.requests_per_minute,
        burst=config.burst,
        principals=config.principals,
    )
    if not limits.enabled:
        return None
    redis_store = store.inner if isinstance(store, CachedTokenStore) else store
    if isinstance(redis_store, RedisTokenStore):
        return redis_limiter(redis_store.client, settings.redis.prefix, limits)
    return local_limiter(limits)


async def _api(request: web.Request) -> web.StreamResponse:
    return await request.app[PROXY_KEY].handle(request)


async def _streaming(request: web.Request) -> web.StreamResponse:
    return await request.app[STREAMING_KEY].handle(request)


async def _close_streams(app: web.Application) -> None:
    # Runs before the server waits for open handlers, so open WebSockets
    # end with 1001 instead of holding up the shutdown.
    await app[STREAMING_KEY].shutdown()


async def _miauth_form(request: web.Request) -> web.StreamResponse:
    return await request.app[ONBOARDING_KEY].form(request)


async def _miauth_start(request: web.Request) -> web.StreamResponse:
    if request.method not in ("GET", "POST"):
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])
    return await request.app[ONBOARDING_KEY].start(request)


async def _miauth_callback(request: web.Request) -> web.StreamResponse:
    return await request.app[ONBOARDING_KEY].callback(request)


async def _oauth_token(request: web.Request) -> web.StreamResponse:
    return await request.app[TOKEN_ENDPOINT_KEY].handle(request)


async def _not_api(request: web.Request) -> web.StreamResponse:
    error: GatewayError = NoSuchEndpoint(
        "This gateway serves the Misskey API under /api/ "
        "and its own routes under /_gateway/."
    )
    return error_response(error, new_request_id(request))


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _log_stopping(app: web.Application) -> None:
    grace = app[SETTINGS_KEY].server.shutdown_grace
    logger.info("gateway.stopping", grace_seconds=grace)


async def _readyz(request: web.Request) -> web.Response:
    """Report whether the store, the upstream and the policy table are usable."""
    app = request.app
    store = app[STORE_KEY]
    store_ok, upstream_ok = await asyncio.gather(
        _store_answers(store), app[UPSTREAM_PROBE_KEY].reachable()
    )
    failing = []
    if not store_ok:
        failing.append(store.kind)
    if not upstream_ok:
        failing.append("upstream")
    if len(app[POLICY_KEY]) == 0:
        failing.append("policy")
    if failing:
        return web.json_response(
            {"status": "unavailable", "failing": failing}, status=503
        )
    return web.json_response({"status": "ok"})


async def _store_answers(store: TokenStore) -> bool:
    try:
        await store.ping()
    except StoreUnavailable:
        return False
    return True
