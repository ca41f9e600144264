"""The aiohttp application: routes, and the resources each process opens once."""

from __future__ import annotations

from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from gateway.config import Settings
from gateway.errors import GatewayError, NoSuchEndpoint, StoreUnavailable
from gateway.policy import PolicyTable, load_policy_table
from gateway.proxy import ApiProxy, error_response, new_request_id
from gateway.ratelimit import (
    RateLimiter,
    RateLimitSettings,
    local_limiter,
    redis_limiter,
)
from gateway.store import RedisTokenStore, TokenStore, open_serving_store
from gateway.token_cache import CachedTokenStore
from gateway.upstream import Relay, create_pool
from gateway.upstream_pool import UpstreamPool

logger = structlog.get_logger("gateway")

SETTINGS_KEY = web.AppKey("settings", Settings)
POLICY_KEY = web.AppKey("policy", PolicyTable)
STORE_KEY = web.AppKey("store", TokenStore)
UPSTREAM_KEY = web.AppKey("upstream", UpstreamPool)
PROXY_KEY = web.AppKey("proxy", ApiProxy)


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

    app.router.add_get("/_gateway/healthz", _healthz)
    app.router.add_get("/_gateway/readyz", _readyz)
    app.router.add_route("*", "/api/{endpoint:.*}", _api)
    app.router.add_route("*", "/{path:.*}", _not_api)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS_KEY]
    store = open_serving_store(settings)
    pool = create_pool(settings.upstream)
    app[STORE_KEY] = store
    app[UPSTREAM_KEY] = pool
    app[PROXY_KEY] = ApiProxy(
        settings, app[POLICY_KEY], store, Relay(pool), create_limiter(settings, store)
    )
    try:
        yield
    finally:
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


async def _not_api(request: web.Request) -> web.StreamResponse:
    error: GatewayError = NoSuchEndpoint(
        "This gateway serves the Misskey API under /api/ "
        "and its own routes under /_gateway/."
    )
    return error_response(error, new_request_id(request))


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    try:
        await store.ping()
    except StoreUnavailable:
        return web.json_response(
            {"status": "unavailable", "failing": [store.kind]}, status=503
        )
    return web.json_response({"status": "ok"})
