"""Redis store URLs: one server, a Sentinel-monitored master, or a cluster.

``redis://`` (TCP), ``rediss://`` (TLS) and ``unix://`` (socket) URLs name one
server and are passed to redis-py's ``Redis.from_url`` as they are. The two
other forms list several addresses, which ``urllib`` cannot parse::

    redis+sentinel://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER_NAME[/DB]
    redis+cluster://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]...][/]

The user and password in a Sentinel URL are those of the data nodes; the
sentinels' own password is the separate ``redis.sentinel_password`` setting.
Error messages name the part that is wrong and never contain the password.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from urllib.parse import unquote, urlsplit

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
SINGLE_SERVER_SCHEMES = ("redis", "rediss", "unix")
REDIS_SCHEMES = (*SINGLE_SERVER_SCHEMES, SENTINEL_SCHEME, CLUSTER_SCHEME)
TLS_SCHEME = "rediss"
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_REDIS_PORT = 6379
SENTINEL_FORM = f"{SENTINEL_SCHEME}://HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]"
CLUSTER_FORM = f"{CLUSTER_SCHEME}://HOST:PORT[,HOST:PORT...]/"


class Topology(Enum):
    """Arrangement of the Redis servers behind a URL."""

    SINGLE = "single"
    SENTINEL = "sentinel"
    CLUSTER = "cluster"


@dataclass(frozen=True)
class RedisUrl:
    """The parts of a Redis store URL that select and reach its servers."""

    scheme: str
    topology: Topology
    # Sentinel addresses or cluster seed nodes, empty for a single server.
    nodes: tuple[tuple[str, int], ...] = ()
    # The name that the sentinels monitor the master under.
    master_name: str = ""
    db: int = 0
    username: str = ""
    password: str = field(default="", repr=False)

    @property
    def tls(self) -> bool:
        return self.scheme == TLS_SCHEME


def parse_redis_url(url: str) -> RedisUrl:
    """Split a Redis store URL into its parts, or raise ValueError if invalid.

    The ValueError message never contains the URL's password.
    """
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in REDIS_SCHEMES:
        raise ValueError(
            "must start with " + ", ".join(f"{name}://" for name in REDIS_SCHEMES)
        )
    if scheme in SINGLE_SERVER_SCHEMES:
        return _parse_single(url, scheme)
    return _parse_multi_host(scheme, rest)


def _parse_single(url: str, scheme: str) -> RedisUrl:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        # urlsplit rejects malformed IPv6 hosts and ports that are not numbers.
        raise ValueError("is not a valid URL: check the host and port") from None
    username = unquote(parts.username or "")
    password = unquote(parts.password or "")
    if scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs the socket path: unix:///PATH")
        return RedisUrl(scheme, Topology.SINGLE, username=username, password=password)

    if not parts.hostname:
        raise ValueError(f"needs a host: {scheme}://HOST[:PORT][/DB]")
    if port == 0:
        raise ValueError("has the invalid port 0")
    db = _parse_db(parts.path.removeprefix("/"))
    return RedisUrl(
        scheme, Topology.SINGLE, db=db, username=username, password=password
    )


def _parse_multi_host(scheme: str, rest: str) -> RedisUrl:
    form = SENTINEL_FORM if scheme == SENTINEL_SCHEME else CLUSTER_FORM
    if "?" in rest or "#" in rest:
        raise ValueError(
            f"must not have a query or fragment, because options are [redis] keys: "
            f"{form}"
        )
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = ""
    if at:
        user_text, _, password_text = userinfo.partition(":")
        username, password = unquote(user_text), unquote(password_text)

    default_port = (
        DEFAULT_SENTINEL_PORT if scheme == SENTINEL_SCHEME else DEFAULT_REDIS_PORT
    )
    nodes = tuple(
        _parse_address(item, position, default_port, form)
        for position, item in enumerate(hosts.split(","), start=1)
    )

    if scheme == CLUSTER_SCHEME:
        if path not in ("", "0"):
            raise ValueError(f"a cluster has only database 0: {form}")
        return RedisUrl(
            scheme, Topology.CLUSTER, nodes, username=username, password=password
        )

    master_name, _, db_text = path.partition("/")
    master_name = unquote(master_name)
    if not master_name:
        raise ValueError(f"the master name is missing: {form}")
    if "/" in db_text:
        raise ValueError(f"has path segments after the database: {form}")
    return RedisUrl(
        scheme,
        Topology.SENTINEL,
        nodes,
        master_name=master_name,
        db=_parse_db(db_text),
        username=username,
        password=password,
    )


def _parse_address(
    text: str, position: int, default_port: int, form: str
) -> tuple[str, int]:
    """Parse ``HOST``, ``HOST:PORT``, ``[IPV6]`` or ``[IPV6]:PORT``.

    Messages give the address's position, not its text, because a malformed
    URL can put the password where a host or port is expected.
    """
    where = f"address {position} of the host list"
    if text.startswith("["):
        host, bracket, port_text = text[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise ValueError(f"has an invalid IPv6 address in {where}: {form}")
        port_text = port_text[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"has an empty host in {where}: {form}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"has an invalid port in {where}: {form}")
    return host, int(port_text)


def _parse_db(text: str) -> int:
    if not text:
        return 0
    if not text.isdigit():
        raise ValueError("has an invalid database number: use a number like /0")
    return int(text)
