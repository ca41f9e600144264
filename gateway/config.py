"""Gateway settings: a TOML file, then ``MISSKEY_GATEWAY_*`` environment variables.

Every key ``[section] key`` can be set by the variable
``MISSKEY_GATEWAY_<SECTION>_<KEY>``; ``MISSKEY_GATEWAY_HOST`` and
``MISSKEY_GATEWAY_PORT`` are short forms of the ``[server]`` keys. Command-line
options override both. Invalid settings raise ``ConfigError``, whose message
names the key and never contains a secret's value.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

from gateway.policy import MODES, PolicyRow
from gateway.redis_url import REDIS_SCHEMES, RedisUrl, Topology, parse_redis_url

ENV_PREFIX = "MISSKEY_GATEWAY_"
CONFIG_PATH_ENV = "MISSKEY_GATEWAY_CONFIG"
SHORT_ENV_NAMES = {"HOST": ("server", "host"), "PORT": ("server", "port")}

SYMMETRIC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {
        "RS256", "RS384", "RS512",
        "PS256", "PS384", "PS512",
        "ES256", "ES384", "ES512",
        "EdDSA",
    }
)  # fmt: skip
MIN_SECRET_LENGTH = 32
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "console")


class ConfigError(Exception):
    """An invalid or missing setting.

    ``key`` is the setting's dotted name, followed by ``(from VARIABLE)`` when
    the value came from an environment variable, or the variable's name alone
    when no setting matches it.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    # Seconds that in-flight requests get to finish after SIGTERM or SIGINT
    # before their connections are closed.
    shutdown_grace: float = 30.0
    # Seconds a client connection may stay idle, or take to send the headers
    # of its next request, before it is closed.
    keepalive_timeout: float = 75.0
    max_body_size: int = 1024 * 1024
    # Largest multipart upload (drive/files/create), in bytes; the upstream
    # applies its own limit as well.
    max_upload_size: int = 1024 * 1024 * 1024
    # Largest file held in a temporary file while the gateway looks for an
    # i field after it (no Authorization header, no i before the file).
    max_spooled_upload_size: int = 64 * 1024 * 1024
    # Seconds a client may take to send a JSON body, and may go without
    # sending any part of an upload, before it gets 408.
    client_body_timeout: float = 30.0
    # Origins allowed to call the API from a browser; "*" allows any, which
    # is safe because credentials travel in headers, never in cookies.
    # Empty: no CORS headers at all.
    cors_origins: tuple[str, ...] = ("*",)
    # Peers (addresses or CIDR networks) whose X-Forwarded-For is kept and
    # extended; from anyone else it is replaced by the peer's address.
    trusted_proxies: tuple[str, ...] = ()
    # Serve plain JSON API calls (POST /api/... with a JSON body of known
    # length) on the gateway's lean HTTP/1.1 server instead of aiohttp's.
    # False leaves every request to aiohttp, at less than half the speed.
    fast_path: bool = True


@dataclass(frozen=True)
class UpstreamSettings:
    url: str = ""
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    # Idle keep-alive connections are closed after this many seconds, before
    # the upstream closes them (Node.js does so after 5 seconds by default).
    idle_timeout: float = 4.0
    # Where the token goes: "body" (the i field, which every Misskey reads)
    # or "header" (Authorization: Bearer, Misskey 13.14 and newer).
    token_transport: str = "body"  # noqa: S105 - a mode name, not a secret
    max_connections: int = 100


@dataclass(frozen=True)
class StoreSettings:
    # Empty: redis.url when that is set, else SQLite at the default location.
    # Left out of repr() because a Redis URL can contain a password.
    url: str = field(default="", repr=False)
    poll_interval: float = 1.0
    # Redis: seconds a token stays in the per-process cache when no rotation
    # message arrives; 0 reads Redis on every request.
    cache_ttl: float = 5.0
    # Redis: seconds past cache_ttl a cached token is still used while Redis
    # is unreachable; 0 returns 503 as soon as the entry expires.
    stale_limit: float = 60.0


@dataclass(frozen=True)
class RedisSettings:
    # Left out of repr() because it can contain a password.
    url: str = field(default="", repr=False)
    prefix: str = "misskey-gateway:"
    timeout: float = 2.0
    # ACL user and password of the data nodes, for URLs that carry none.
    username: str = ""
    password: str = field(default="", repr=False)
    # Password of the sentinels themselves (redis+sentinel:// URLs only).
    sentinel_password: str = field(default="", repr=False)
    # TLS options of rediss:// URLs. Empty tls_ca_file means the system CAs.
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_verify_hostname: bool = True


@dataclass(frozen=True)
class JwtSettings:
    algorithms: tuple[str, ...] = ("HS256",)
    secret: str = field(default="", repr=False)
    public_key_file: str = ""
    issuer: str = ""
    audience: str = ""
    leeway: float = 30.0
    default_ttl: int = 3600
    # JSON Web Key Set with the public keys, instead of public_key_file.
    jwks_url: str = ""
    # Seconds the key set is used before it is fetched again.
    jwks_cache_seconds: float = 300.0
    # Minimum seconds between fetches caused by a JWT with an unknown key id.
    jwks_refetch_interval: float = 30.0


@dataclass(frozen=True)
class RateLimitConfig:
    # Requests per minute for every principal; 0 means no limit.
    requests_per_minute: int = 0
    # Requests allowed at once above the steady rate; 0 means a sixth of the
    # principal's requests_per_minute, rounded up.
    burst: int = 0
    # Per-principal replacements for requests_per_minute (0: no limit).
    principals: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamingSettings:
    # Seconds a /streaming session may last before the gateway closes it.
    max_lifetime: float = 3600.0
    # Seconds between checks that each session's token and credential are
    # still current (stores without change notifications, and API keys).
    check_interval: float = 5.0
    # Seconds between WebSocket pings to the client and to the upstream.
    heartbeat: float = 30.0


@dataclass(frozen=True)
class OnboardingSettings:
    # Serve /_gateway/miauth/start; every start still needs an invite.
    enabled: bool = False
    # Application name that Misskey shows on its approval page.
    app_name: str = "misskey-gateway"
    # The gateway's origin as browsers reach it, for the MiAuth callback URL.
    # Empty: taken from the request's Host header (trusted only then).
    public_url: str = ""
    # Misskey's origin as browsers reach it; empty means upstream.url.
    misskey_url: str = ""
    # Lifetime in seconds of the JWT handed out at the end of onboarding.
    credential_ttl: int = 30 * 24 * 3600
    # Lifetime in seconds of access tokens from /_gateway/oauth/token.
    oauth_token_ttl: int = 3600


@dataclass(frozen=True)
class PolicySettings:
    file: str = ""
    endpoints: Mapping[str, PolicyRow] = field(default_factory=dict)
    # Compare the table with the upstream's GET /api.json at start-up and
    # log the differences once.
    check_upstream: bool = True


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "json"


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    jwt: JwtSettings = field(default_factory=JwtSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    ratelimit: RateLimitConfig = field(default_factory=RateLimitConfig)
    streaming: StreamingSettings = field(default_factory=StreamingSettings)
    onboarding: OnboardingSettings = field(default_factory=OnboardingSettings)
    log: LogSettings = field(default_factory=LogSettings)

    def require_upstream(self) -> str:
        """Return the upstream URL, or raise if none is configured."""
        if not self.upstream.url:
            raise ConfigError(
                "upstream.url",
                "missing: set it in the config file, with "
                "MISSKEY_GATEWAY_UPSTREAM_URL or with --upstream",
            )
        return self.upstream.url


SECTIONS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "upstream": UpstreamSettings,
    "store": StoreSettings,
    "redis": RedisSettings,
    "jwt": JwtSettings,
    "policy": PolicySettings,
    "ratelimit": RateLimitConfig,
    "streaming": StreamingSettings,
    "onboarding": OnboardingSettings,
    "log": LogSettings,
}
SECRET_KEYS = frozenset(
    {
        "jwt.secret",
        "redis.url",
        "redis.password",
        "redis.sentinel_password",
        "store.url",
    }
)
SQLITE_SCHEME = "sqlite"
TLS_FILE_KEYS = ("tls_ca_file", "tls_cert_file", "tls_key_file")
DEFAULT_DATABASE_NAME = "store.db"


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read the TOML file at ``path``, then the environment, then ``overrides``.

    ``overrides`` maps dotted keys (``"upstream.url"``) to values from the
    command line; ``None`` values are skipped. Without ``path`` the file named
    by ``MISSKEY_GATEWAY_CONFIG`` is read, if that variable is set.
    """
    environ = os.environ if environ is None else environ
    if path is None and environ.get(CONFIG_PATH_ENV):
        path = environ[CONFIG_PATH_ENV]

    raw: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if path is not None:
        _merge_file(raw, Path(path))
    _merge_environ(raw, environ)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            section, key = dotted.split(".", 1)
            raw[section][key] = value
    return _build(raw, environ)


def _merge_file(raw: dict[str, dict[str, Any]], path: Path) -> None:
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("config", f"file not found: {path}") from None
    except OSError as error:
        raise ConfigError("config", f"cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("config", f"invalid TOML in {path}: {error}") from None

    for section, table in document.items():
        if section not in SECTIONS:
            known = ", ".join(SECTIONS)
            raise ConfigError(section, f"unknown section (known: {known})")
        if not isinstance(table, dict):
            raise ConfigError(section, "must be a table")
        raw[section].update(table)


def _merge_environ(raw: dict[str, dict[str, Any]], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_PATH_ENV:
            continue
        suffix = name[len(ENV_PREFIX) :]
        if suffix in SHORT_ENV_NAMES:
            section, key = SHORT_ENV_NAMES[suffix]
        else:
            section, _, key = suffix.lower().partition("_")
            if section not in SECTIONS or not key:
                raise ConfigError(name, "unknown environment variable")
        if key == "endpoints":
            raise ConfigError(name, "policy rows can only be set in the config file")
        raw[section][key] = _EnvValue(name, value)


@dataclass(frozen=True)
class _EnvValue:
    """A setting read from the environment, converted once its type is known."""

    name: str
    text: str


def _build(raw: dict[str, dict[str, Any]], environ: Mapping[str, str]) -> Settings:
    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw[section].items():
            dotted = f"{section}.{key}"
            if key not in fields:
                if isinstance(value, _EnvValue):
                    dotted = f"{dotted} (from {value.name})"
                raise ConfigError(dotted, f"unknown key in [{section}]")
            if dotted == "policy.endpoints":
                values[key] = _convert_policy_rows(value)
            elif dotted == "ratelimit.principals":
                values[key] = _convert_rate_limits(value)
            else:
                default = fields[key].default
                values[key] = _convert(dotted, value, default)
        sections[section] = cls(**values)
    sections["store"] = _resolve_store(sections["store"], sections["redis"], environ)
    settings = Settings(**sections)
    _validate(settings)
    return settings


def _resolve_store(
    store: StoreSettings, redis: RedisSettings, environ: Mapping[str, str]
) -> StoreSettings:
    """Fill in ``store.url``: the setting itself, else ``redis.url``, else SQLite."""
    if store.url and redis.url and store.url != redis.url:
        raise ConfigError(
            "store.url", "conflicts with redis.url; set only one of the two"
        )
    url = store.url or redis.url
    if not url:
        url = f"{SQLITE_SCHEME}:///{default_database_path(environ)}"
    return dataclasses.replace(store, url=url)


def default_database_path(environ: Mapping[str, str]) -> Path:
    """Return the embedded store's default file, in the XDG data directory."""
    data_home = environ.get("XDG_DATA_HOME", "")
    if not data_home or not Path(data_home).is_absolute():
        # The XDG spec says to ignore a relative XDG_DATA_HOME.
        home = environ.get("HOME") or str(Path.home())
        data_home = str(Path(home) / ".local" / "share")
    return Path(data_home) / "misskey-gateway" / DEFAULT_DATABASE_NAME


def store_kind(url: str) -> str:
    """Return "redis" or "sqlite" for a resolved ``store.url``."""
    return SQLITE_SCHEME if urlsplit(url).scheme == SQLITE_SCHEME else "redis"


def sqlite_path(url: str) -> Path:
    """Return the file of a ``sqlite:///PATH`` URL.

    As in SQLAlchemy, three slashes start a relative path and four an
    absolute one: ``sqlite:///data/store.db``, ``sqlite:////var/lib/store.db``.
    """
    prefix = f"{SQLITE_SCHEME}:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ConfigError(
            "store.url",
            "a SQLite URL is sqlite:///relative/path or sqlite:////absolute/path",
        )
    return Path(url[len(prefix) :])


def _convert(dotted: str, value: Any, default: Any) -> Any:
    """Convert a file or environment value to the type of the key's default."""
    shown = "the value" if dotted in SECRET_KEYS else repr(_plain(value))
    if isinstance(value, _EnvValue):
        value = _parse_env_text(dotted, value, default)

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(dotted, f"must be true or false, not {shown}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(dotted, f"must be an integer, not {shown}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(dotted, f"must be a number, not {shown}")
        if not math.isfinite(value):
            raise ConfigError(dotted, "must be a finite number")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, list | tuple) or not all(
            isinstance(item, str) for item in value
        ):
            raise ConfigError(dotted, f"must be a list of strings, not {shown}")
        return tuple(value)
    if not isinstance(value, str):
        raise ConfigError(dotted, f"must be a string, not {shown}")
    return value


def _plain(value: Any) -> Any:
    return value.text if isinstance(value, _EnvValue) else value


def _parse_env_text(dotted: str, value: _EnvValue, default: Any) -> Any:
    text = value.text.strip()
    where = f"{dotted} (from {value.name})"
    shown = "the value" if dotted in SECRET_KEYS else repr(value.text)
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(where, f"must be true or false, not {shown}")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(where, f"must be an integer, not {shown}") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(where, f"must be a number, not {shown}") from None
    if isinstance(default, tuple):
        return [item.strip() for item in text.split(",") if item.strip()]
    return value.text


def _convert_policy_rows(value: Any) -> dict[str, PolicyRow]:
    if not isinstance(value, dict):
        raise ConfigError("policy.endpoints", "must be a table of endpoint rows")
    rows: dict[str, PolicyRow] = {}
    for endpoint, row in value.items():
        dotted = f'policy.endpoints."{endpoint}"'
        if isinstance(row, str):
            row = {"mode": row}
        if not isinstance(row, dict):
            raise ConfigError(
                dotted, 'must be a mode string or a table like { mode = "required" }'
            )
        unknown = set(row) - {"mode", "kind", "allow_get"}
        if unknown:
            raise ConfigError(dotted, f"unknown keys: {', '.join(sorted(unknown))}")
        mode = row.get("mode")
        if mode is not None and mode not in MODES:
            raise ConfigError(
                f"{dotted}.mode", f"must be one of {', '.join(MODES)}, not {mode!r}"
            )
        kind = row.get("kind")
        if kind is not None and not isinstance(kind, str):
            raise ConfigError(f"{dotted}.kind", "must be a string")
        allow_get = row.get("allow_get")
        if allow_get is not None and not isinstance(allow_get, bool):
            raise ConfigError(f"{dotted}.allow_get", "must be true or false")
        rows[endpoint] = PolicyRow(mode=mode, kind=kind, allow_get=allow_get)
    return rows


def _convert_rate_limits(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ConfigError(
            "ratelimit.principals", "must be a table of principal = limit"
        )
    limits: dict[str, int] = {}
    for principal, limit in value.items():
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise ConfigError(
                f'ratelimit.principals."{principal}"',
                "must be an integer number of requests per minute",
            )
        limits[principal] = limit
    return limits


def _validate_rate_limits(config: RateLimitConfig) -> None:
    # Imported here: the limiter module depends on this one.
    from gateway.ratelimit import RateLimitSettings

    try:
        RateLimitSettings(
            requests_per_minute=config.requests_per_minute,
            burst=config.burst,
            principals=config.principals,
        )
    except ValueError as error:
        message = str(error)
        key = message.split(" ", 1)[0].rstrip(":")
        raise ConfigError(key, message[len(key) :].lstrip(": ")) from None


def _validate(settings: Settings) -> None:
    server, upstream, redis, jwt = (
        settings.server,
        settings.upstream,
        settings.redis,
        settings.jwt,
    )
    if not 0 <= server.port <= 65535:
        raise ConfigError(
            "server.port", f"must be between 0 and 65535, not {server.port}"
        )
    if server.workers < 1:
        raise ConfigError("server.workers", f"must be at least 1, not {server.workers}")
    if server.shutdown_grace < 0:
        raise ConfigError(
            "server.shutdown_grace",
            f"must not be negative, not {server.shutdown_grace}",
        )
    for network in server.trusted_proxies:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(
                "server.trusted_proxies", f"{network!r} is not an address or network"
            ) from None
    for origin in server.cors_origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ConfigError(
                "server.cors_origins",
                f'{origin!r} is not an origin like https://app.example or "*"',
            )
    if server.keepalive_timeout <= 0:
        raise ConfigError(
            "server.keepalive_timeout", "must be a positive number of seconds"
        )
    if server.client_body_timeout <= 0:
        raise ConfigError(
            "server.client_body_timeout", "must be a positive number of seconds"
        )
    if server.max_spooled_upload_size < 0:
        raise ConfigError("server.max_spooled_upload_size", "must not be negative")
    if server.max_upload_size < 1:
        raise ConfigError(
            "server.max_upload_size", "must be a positive number of bytes"
        )
    if server.max_body_size < 1:
        raise ConfigError("server.max_body_size", "must be a positive number of bytes")

    if upstream.url:
        _validate_upstream_url(upstream.url)
    for key in ("connect_timeout", "read_timeout", "idle_timeout"):
        if getattr(upstream, key) <= 0:
            raise ConfigError(f"upstream.{key}", "must be a positive number of seconds")
    if upstream.token_transport not in ("body", "header"):
        raise ConfigError("upstream.token_transport", "must be body or header")
    if upstream.max_connections < 1:
        raise ConfigError("upstream.max_connections", "must be at least 1")

    store = settings.store
    _validate_store_url(store, redis)
    if store.poll_interval < 0:
        raise ConfigError("store.poll_interval", "must not be negative")
    if store.cache_ttl < 0:
        raise ConfigError("store.cache_ttl", "must not be negative")
    if store.stale_limit < 0:
        raise ConfigError("store.stale_limit", "must not be negative")
    if redis.timeout <= 0:
        raise ConfigError("redis.timeout", "must be a positive number of seconds")
    for name in TLS_FILE_KEYS:
        path = getattr(redis, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"redis.{name}", f"file not found: {path}")
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"redis.{name}", f"file is not readable: {path}")

    _validate_jwt(jwt)
    _validate_rate_limits(settings.ratelimit)
    for key in ("max_lifetime", "check_interval", "heartbeat"):
        if getattr(settings.streaming, key) <= 0:
            raise ConfigError(
                f"streaming.{key}", "must be a positive number of seconds"
            )

    _validate_onboarding(settings.onboarding)

    if settings.log.level not in LOG_LEVELS:
        raise ConfigError("log.level", f"must be one of {', '.join(LOG_LEVELS)}")
    if settings.log.format not in LOG_FORMATS:
        raise ConfigError("log.format", f"must be one of {', '.join(LOG_FORMATS)}")


def _validate_onboarding(onboarding: OnboardingSettings) -> None:
    for key in ("public_url", "misskey_url"):
        url = getattr(onboarding, key)
        if not url:
            continue
        parts = _http_url(f"onboarding.{key}", url)
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(
                f"onboarding.{key}",
                f"must be an origin without a path, like https://host, not {url!r}",
            )
    if not onboarding.app_name.strip():
        raise ConfigError("onboarding.app_name", "must not be empty")
    for key in ("credential_ttl", "oauth_token_ttl"):
        if getattr(onboarding, key) < 1:
            raise ConfigError(f"onboarding.{key}", "must be at least 1 second")


def _validate_store_url(store: StoreSettings, redis: RedisSettings) -> None:
    if redis.url:
        _parse_redis_url("redis.url", redis.url)
    if _scheme("store.url", store.url) == SQLITE_SCHEME:
        sqlite_path(store.url)
        return
    # store.url is a copy of redis.url unless it was set itself.
    key = "redis.url" if store.url == redis.url else "store.url"
    _validate_redis_options(redis, _parse_redis_url(key, store.url), key)


def _parse_redis_url(key: str, url: str) -> RedisUrl:
    try:
        return parse_redis_url(url)
    except ValueError as error:
        message = str(error)
        if key == "store.url" and _scheme(key, url) not in REDIS_SCHEMES:
            schemes = [f"{scheme}://" for scheme in REDIS_SCHEMES]
            message = f"must start with {', '.join(schemes)} or {SQLITE_SCHEME}:///"
        raise ConfigError(key, message) from None


def _validate_redis_options(redis: RedisSettings, url: RedisUrl, url_key: str) -> None:
    """Check the [redis] options against the store URL that they apply to."""
    if redis.username and url.username:
        raise ConfigError(
            "redis.username",
            f"conflicts with the user name in {url_key}; set only one of the two",
        )
    if redis.password and url.password:
        raise ConfigError(
            "redis.password",
            f"conflicts with the password in {url_key}; set only one of the two",
        )
    if redis.sentinel_password and url.topology is not Topology.SENTINEL:
        raise ConfigError(
            "redis.sentinel_password", "only applies to redis+sentinel:// URLs"
        )
    if not url.tls:
        tls_keys = [name for name in TLS_FILE_KEYS if getattr(redis, name)]
        if not redis.tls_verify_hostname:
            tls_keys.append("tls_verify_hostname")
        if tls_keys:
            raise ConfigError(
                f"redis.{tls_keys[0]}",
                f"only applies to rediss:// URLs, and {url_key} is {url.scheme}://",
            )
    if redis.tls_key_file and not redis.tls_cert_file:
        raise ConfigError(
            "redis.tls_cert_file",
            "missing: redis.tls_key_file is set, but not the client certificate",
        )


def _scheme(key: str, url: str) -> str:
    """Return the scheme of a URL setting; raise ConfigError if it is malformed."""
    try:
        return urlsplit(url).scheme
    except ValueError:
        # urlsplit rejects malformed IPv6 hosts; the URL may contain a password.
        raise ConfigError(key, "is not a valid URL") from None


def _http_url(key: str, url: str) -> SplitResult:
    """Split an http:// or https:// URL setting, or raise ConfigError naming ``key``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError(key, "is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            key, f"must be an http:// or https:// URL, not {redact_url(url)!r}"
        )
    return parts


def _validate_upstream_url(url: str) -> None:
    parts = _http_url("upstream.url", url)
    if parts.username or parts.password:
        raise ConfigError("upstream.url", "must not contain a user name or password")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(
            "upstream.url",
            "must be the server's origin without a path, "
            f"like https://misskey.example, not {redact_url(url)!r}",
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for an invalid port
    except ValueError:
        raise ConfigError(
            "upstream.url", f"has an invalid port: {redact_url(url)!r}"
        ) from None


def _validate_jwt(jwt: JwtSettings) -> None:
    if not jwt.algorithms:
        raise ConfigError("jwt.algorithms", "must name at least one algorithm")
    unknown = set(jwt.algorithms) - SYMMETRIC_ALGORITHMS - ASYMMETRIC_ALGORITHMS
    if unknown:
        raise ConfigError(
            "jwt.algorithms", f"unsupported algorithm: {', '.join(sorted(unknown))}"
        )
    symmetric = set(jwt.algorithms) & SYMMETRIC_ALGORITHMS
    asymmetric = set(jwt.algorithms) & ASYMMETRIC_ALGORITHMS
    if symmetric and asymmetric:
        # One key verifies every listed algorithm, so mixing the two families
        # would let a token be signed with the public key as an HMAC secret.
        raise ConfigError(
            "jwt.algorithms", "must not mix HS* algorithms with public-key algorithms"
        )
    if symmetric and jwt.secret and len(jwt.secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            "jwt.secret", f"must be at least {MIN_SECRET_LENGTH} characters long"
        )
    if jwt.jwks_url:
        _validate_jwks(jwt, asymmetric)
    elif asymmetric and not jwt.public_key_file:
        raise ConfigError(
            "jwt.public_key_file",
            "missing: public-key algorithms need a PEM key file or jwt.jwks_url",
        )
    if jwt.public_key_file and not asymmetric:
        raise ConfigError(
            "jwt.public_key_file",
            "is set, but jwt.algorithms lists no public-key algorithm",
        )
    if jwt.leeway < 0:
        raise ConfigError("jwt.leeway", "must not be negative")
    if jwt.default_ttl < 1:
        raise ConfigError("jwt.default_ttl", "must be at least 1 second")


def _validate_jwks(jwt: JwtSettings, asymmetric: set[str]) -> None:
    _http_url("jwt.jwks_url", jwt.jwks_url)
    if not asymmetric:
        raise ConfigError(
            "jwt.jwks_url", "is set, but jwt.algorithms lists no public-key algorithm"
        )
    if jwt.public_key_file:
        raise ConfigError(
            "jwt.public_key_file", "must not be set together with jwt.jwks_url"
        )
    if jwt.jwks_cache_seconds <= 0:
        raise ConfigError("jwt.jwks_cache_seconds", "must be a positive number")
    if jwt.jwks_refetch_interval < 0:
        raise ConfigError("jwt.jwks_refetch_interval", "must not be negative")


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced, for logs and messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
