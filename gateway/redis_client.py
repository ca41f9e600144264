"""redis-py asyncio clients for the Redis token store, one per topology.

The store URL (see ``gateway.redis_url``) selects a single server, a master
found through Sentinel, or a cluster. Command clients fail fast: the socket
timeout is ``redis.timeout`` and a failed command is retried once at once,
so an outage becomes a quick 503 rather than a request held for seconds.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from gateway.config import RedisSettings
from gateway.redis_url import RedisUrl, Topology, parse_redis_url

RedisClient = redis.Redis | RedisCluster

# Exceptions that a failed Redis call raises. redis-py's cluster client raises
# RedisClusterException, which is not a RedisError, when it reaches no node
# or a slot has no node.
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException)

# A subscriber connection waits for messages without a read timeout, and
# sends a PING after this many idle seconds to find a dead connection.
PUBSUB_HEALTH_CHECK_INTERVAL = 15


class SentinelMasterClient(redis.Redis):
    """A client of the master that the sentinels report, which closes them too.

    redis-py's ``Sentinel.master_for`` client looks the master up again on
    each new connection, so it follows a failover by itself.
    """

    owned_sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.owned_sentinel is not None:
                await self.owned_sentinel.aclose()


def create_client(settings: RedisSettings, *, for_pubsub: bool = False) -> RedisClient:
    """Create a client for the store URL in ``settings.url`` without connecting.

    With ``for_pubsub`` the client has no read timeout and no retries: the
    subscriber in ``gateway.token_cache`` reconnects by itself, with backoff,
    and in a cluster through another node.
    """
    url = parse_redis_url(settings.url)
    options = _connection_options(settings, for_pubsub)
    if url.topology is Topology.SENTINEL:
        return _sentinel_master(settings, url, options)
    if url.topology is Topology.CLUSTER:
        return _cluster(url, options)

    if url.tls:
        options.update(_tls_options(settings))
    # Query parameters of the URL take precedence over these options.
    return redis.Redis.from_url(settings.url, **options)


def _connection_options(settings: RedisSettings, for_pubsub: bool) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_connect_timeout": settings.timeout,
        "decode_responses": False,
    }
    if for_pubsub:
        options["socket_timeout"] = None
        options["health_check_interval"] = PUBSUB_HEALTH_CHECK_INTERVAL
        options["retry"] = Retry(NoBackoff(), 0)
    else:
        options["socket_timeout"] = settings.timeout
        # One quick retry covers a connection that Redis closed while idle;
        # more would hold requests during an outage that should be a fast 503.
        options["retry"] = Retry(NoBackoff(), 1)
    if settings.username:
        options["username"] = settings.username
    if settings.password:
        options["password"] = settings.password
    return options


def _tls_options(settings: RedisSettings) -> dict[str, Any]:
    return {
        "ssl_ca_certs": settings.tls_ca_file or None,
        "ssl_certfile": settings.tls_cert_file or None,
        "ssl_keyfile": settings.tls_key_file or None,
        "ssl_check_hostname": settings.tls_verify_hostname,
    }


def _sentinel_master(
    settings: RedisSettings, url: RedisUrl, options: dict[str, Any]
) -> SentinelMasterClient:
    sentinel_options: dict[str, Any] = {
        "socket_timeout": settings.timeout,
        "socket_connect_timeout": settings.timeout,
        # Master discovery moves on to the next sentinel when one fails.
        "retry": Retry(NoBackoff(), 0),
    }
    if settings.sentinel_password:
        sentinel_options["password"] = settings.sentinel_password
    _add_url_credentials(options, url)
    sentinel = Sentinel(
        list(url.nodes), sentinel_kwargs=sentinel_options, db=url.db, **options
    )
    client = sentinel.master_for(url.master_name, redis_class=SentinelMasterClient)
    assert isinstance(client, SentinelMasterClient)  # noqa: S101 - narrows the type
    client.owned_sentinel = sentinel
    return client


def _add_url_credentials(options: dict[str, Any], url: RedisUrl) -> None:
    """Add the data nodes' user and password from a Sentinel or cluster URL."""
    if url.username:
        options["username"] = url.username
    if url.password:
        options["password"] = url.password


def _cluster(url: RedisUrl, options: dict[str, Any]) -> RedisCluster:
    _add_url_credentials(options, url)
    # NOTE: redis-py 8.2 reads the command table from the first master in
    # CLUSTER SLOTS when the client first connects, so a client created
    # while that master is down fails every command until it is back.
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in url.nodes],
        # Serve the slots of reachable nodes while other nodes are down. The
        # servers' own cluster-require-full-coverage setting still applies.
        require_full_coverage=False,
        **options,
    )


def create_subscriber_client(
    settings: RedisSettings, command_client: RedisClient, attempt: int
) -> redis.Redis:
    """Create a client for SUBSCRIBE on the rotation channel.

    A cluster sends every PUBLISH to all of its nodes, so the client connects
    to a single node: the nodes in ``command_client``'s topology, then the
    seed nodes of the URL, one after another as ``attempt`` grows, so that
    an attempt after a failure tries the next node. It is a plain client of that
    node rather than a new RedisCluster, which could not connect at all while
    the master that it reads the command table from is down.
    """
    if not isinstance(command_client, RedisCluster):
        client = create_client(settings, for_pubsub=True)
        assert isinstance(client, redis.Redis)  # noqa: S101 - narrows the type
        return client

    url = parse_redis_url(settings.url)
    addresses = [(node.host, int(node.port)) for node in command_client.get_nodes()]
    addresses += [seed for seed in url.nodes if seed not in addresses]
    host, port = addresses[attempt % len(addresses)]
    options = _connection_options(settings, for_pubsub=True)
    _add_url_credentials(options, url)
    return redis.Redis(host=host, port=port, **options)
