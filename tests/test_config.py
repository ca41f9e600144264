"""Settings loader: TOML file, environment variables, overrides and validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import (
    ConfigError,
    Settings,
    _convert,
    _EnvValue,
    load_settings,
    redact_url,
)
from gateway.policy import PolicyRow

# Distinctive values, so that a test can search messages for them.
SECRET = "jwt-secret-value-0123456789abcdef-XYZ"  # noqa: S105
REDIS_PASSWORD = "redis-password-Q7w9e"  # noqa: S105
UPSTREAM_PASSWORD = "upstream-password-K3j8r"  # noqa: S105


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load(
    text: str | None = None,
    tmp_path: Path | None = None,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    path = None
    if text is not None:
        assert tmp_path is not None
        path = write_config(tmp_path, text)
    return load_settings(path, environ=environ or {}, overrides=overrides)


# Defaults and sources


def test_defaults_without_file(tmp_path):
    settings = load_settings(None, environ={"HOME": str(tmp_path)})
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8080
    assert settings.upstream.url == ""
    assert settings.redis.url == ""
    assert settings.store.url.startswith("sqlite:///")
    assert settings.jwt.algorithms == ("HS256",)
    assert settings.jwt.secret == ""
    assert settings.policy.endpoints == {}


def test_file_values(tmp_path):
    settings = load(
        """
        [server]
        host = "192.0.2.10"
        port = 9000
        workers = 2
        [upstream]
        url = "https://misskey.example"
        read_timeout = 12.5
        [redis]
        url = "redis://127.0.0.1:6380/2"
        prefix = "gw:"
        timeout = 1
        [jwt]
        algorithms = ["HS512"]
        issuer = "https://idp.example"
        [log]
        level = "debug"
        format = "console"
        """,
        tmp_path,
    )

    assert settings.server.host == "192.0.2.10"
    assert settings.server.port == 9000
    assert settings.server.workers == 2
    assert settings.upstream.url == "https://misskey.example"
    assert settings.upstream.read_timeout == 12.5
    assert settings.redis.url == "redis://127.0.0.1:6380/2"
    assert settings.redis.prefix == "gw:"
    assert settings.redis.timeout == 1.0
    assert isinstance(settings.redis.timeout, float)
    assert settings.jwt.algorithms == ("HS512",)
    assert settings.jwt.issuer == "https://idp.example"
    assert settings.log.level == "debug"
    assert settings.log.format == "console"


def test_file_from_config_env_var(tmp_path):
    path = write_config(tmp_path, "[server]\nport = 9100\n")
    settings = load_settings(None, environ={"MISSKEY_GATEWAY_CONFIG": str(path)})
    assert settings.server.port == 9100


def test_env_overrides_file(tmp_path):
    settings = load(
        "[server]\nport = 9000\nhost = '10.0.0.1'\n",
        tmp_path,
        environ={
            "MISSKEY_GATEWAY_SERVER_PORT": "9001",
            "MISSKEY_GATEWAY_SERVER_HOST": "::1",
        },
    )
    assert settings.server.port == 9001
    assert settings.server.host == "::1"


@pytest.mark.parametrize(
    ("name", "value", "attribute", "expected"),
    [
        ("MISSKEY_GATEWAY_PORT", "9002", "port", 9002),
        ("MISSKEY_GATEWAY_HOST", "192.0.2.10", "host", "192.0.2.10"),
    ],
)
def test_env_short_forms(tmp_path, name, value, attribute, expected):
    settings = load("[server]\nport = 9000\n", tmp_path, environ={name: value})
    assert getattr(settings.server, attribute) == expected


def test_env_multiword_key():
    settings = load(environ={"MISSKEY_GATEWAY_SERVER_MAX_BODY_SIZE": "2048"})
    assert settings.server.max_body_size == 2048


def test_env_ignores_other_variables():
    settings = load(environ={"HOME": "/root", "MISSKEY_PORT": "1", "PATH": "/bin"})
    assert settings.server.port == 8080


def test_overrides_beat_env(tmp_path):
    settings = load(
        "[server]\nport = 9000\n",
        tmp_path,
        environ={"MISSKEY_GATEWAY_PORT": "9001"},
        overrides={"server.port": 9002, "upstream.url": "http://127.0.0.1:3000"},
    )
    assert settings.server.port == 9002
    assert settings.upstream.url == "http://127.0.0.1:3000"


def test_overrides_none_skipped():
    settings = load(
        environ={"MISSKEY_GATEWAY_PORT": "9001"}, overrides={"server.port": None}
    )
    assert settings.server.port == 9001


# Conversion of environment text


@pytest.mark.parametrize(
    ("name", "text", "section", "key", "expected"),
    [
        ("MISSKEY_GATEWAY_SERVER_PORT", "9000", "server", "port", 9000),
        ("MISSKEY_GATEWAY_SERVER_PORT", " 9000 ", "server", "port", 9000),
        ("MISSKEY_GATEWAY_SERVER_WORKERS", "4", "server", "workers", 4),
        ("MISSKEY_GATEWAY_REDIS_TIMEOUT", "0.25", "redis", "timeout", 0.25),
        ("MISSKEY_GATEWAY_REDIS_TIMEOUT", "3", "redis", "timeout", 3.0),
        ("MISSKEY_GATEWAY_JWT_LEEWAY", "0", "jwt", "leeway", 0.0),
        ("MISSKEY_GATEWAY_JWT_ALGORITHMS", "HS384", "jwt", "algorithms", ("HS384",)),
        (
            "MISSKEY_GATEWAY_JWT_ALGORITHMS",
            "HS256, HS512 ,",
            "jwt",
            "algorithms",
            ("HS256", "HS512"),
        ),
        ("MISSKEY_GATEWAY_REDIS_PREFIX", " gw: ", "redis", "prefix", " gw: "),
    ],
)
def test_env_conversion(name, text, section, key, expected):
    settings = load(environ={name: text})
    value = getattr(getattr(settings, section), key)
    assert value == expected
    assert type(value) is type(expected)


def test_env_list_for_public_key_algorithms(tmp_path):
    settings = load(
        environ={
            "MISSKEY_GATEWAY_JWT_ALGORITHMS": "RS256,ES256",
            "MISSKEY_GATEWAY_JWT_PUBLIC_KEY_FILE": str(tmp_path / "key.pem"),
        }
    )
    assert settings.jwt.algorithms == ("RS256", "ES256")
    assert settings.jwt.public_key_file == str(tmp_path / "key.pem")


# No setting is boolean yet, so the boolean branch of the environment
# conversion is checked on the converter itself.
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        (" yes ", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
    ],
)
def test_env_bool_conversion(text, expected):
    value = _convert(
        "section.flag", _EnvValue("MISSKEY_GATEWAY_SECTION_FLAG", text), False
    )
    assert value is expected


@pytest.mark.parametrize("text", ["", "2", "enabled", "truthy"])
def test_env_bool_invalid(text):
    with pytest.raises(ConfigError) as excinfo:
        _convert("section.flag", _EnvValue("MISSKEY_GATEWAY_SECTION_FLAG", text), True)
    assert excinfo.value.key.startswith("section.flag")
    assert "MISSKEY_GATEWAY_SECTION_FLAG" in str(excinfo.value)


# Invalid settings


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[bogus]\nx = 1\n", "bogus"),
        ("server = 5\n", "server"),
        ("[server]\ncolour = 'red'\n", "server.colour"),
        ("[jwt]\nsecrets = 'x'\n", "jwt.secrets"),
        ("[server]\nport = '80'\n", "server.port"),
        ("[server]\nport = true\n", "server.port"),
        ("[server]\nport = 80.0\n", "server.port"),
        ("[server]\nhost = 5\n", "server.host"),
        ("[server]\nworkers = 0\n", "server.workers"),
        ("[server]\nmax_body_size = 0\n", "server.max_body_size"),
        ("[upstream]\nconnect_timeout = 'x'\n", "upstream.connect_timeout"),
        ("[upstream]\nconnect_timeout = 0\n", "upstream.connect_timeout"),
        ("[upstream]\nread_timeout = -1.0\n", "upstream.read_timeout"),
        ("[upstream]\nread_timeout = inf\n", "upstream.read_timeout"),
        ("[upstream]\nread_timeout = nan\n", "upstream.read_timeout"),
        ("[upstream]\nmax_connections = 0\n", "upstream.max_connections"),
        ("[redis]\ntimeout = true\n", "redis.timeout"),
        ("[redis]\ntimeout = 0\n", "redis.timeout"),
        ("[redis]\nprefix = ['a']\n", "redis.prefix"),
        ("[jwt]\nalgorithms = 'HS256'\n", "jwt.algorithms"),
        ("[jwt]\nalgorithms = [256]\n", "jwt.algorithms"),
        ("[jwt]\nalgorithms = []\n", "jwt.algorithms"),
        ("[jwt]\nalgorithms = ['none']\n", "jwt.algorithms"),
        ("[jwt]\nalgorithms = ['HS256', 'RS256']\n", "jwt.algorithms"),
        ("[jwt]\nalgorithms = ['HS512', 'EdDSA']\n", "jwt.algorithms"),
        ("[jwt]\nalgorithms = ['RS256']\n", "jwt.public_key_file"),
        ("[jwt]\nalgorithms = ['ES256', 'EdDSA']\n", "jwt.public_key_file"),
        ("[jwt]\npublic_key_file = 'key.pem'\n", "jwt.public_key_file"),
        ("[jwt]\nleeway = -1\n", "jwt.leeway"),
        ("[jwt]\ndefault_ttl = 0\n", "jwt.default_ttl"),
        ("[jwt]\ndefault_ttl = 1.5\n", "jwt.default_ttl"),
        ("[log]\nlevel = 'verbose'\n", "log.level"),
        ("[log]\nformat = 'xml'\n", "log.format"),
        ("[policy]\nfile = 5\n", "policy.file"),
        ("[policy]\nendpoints = 'x'\n", "policy.endpoints"),
    ],
)
def test_invalid_file_value(tmp_path, text, key):
    with pytest.raises(ConfigError) as excinfo:
        load(text, tmp_path)
    assert excinfo.value.key == key
    assert key in str(excinfo.value)


@pytest.mark.parametrize(
    ("port", "valid"),
    [(-1, False), (0, True), (1, True), (65535, True), (65536, False), (70000, False)],
)
def test_port_range(port, valid):
    if valid:
        assert load(overrides={"server.port": port}).server.port == port
        return
    with pytest.raises(ConfigError) as excinfo:
        load(overrides={"server.port": port})
    assert excinfo.value.key == "server.port"
    assert str(port) in str(excinfo.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_settings(tmp_path / "absent.toml", environ={})
    assert excinfo.value.key == "config"
    assert "absent.toml" in str(excinfo.value)


def test_invalid_toml(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load("[server\nport = 1\n", tmp_path)
    assert excinfo.value.key == "config"
    assert "invalid TOML" in str(excinfo.value)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("MISSKEY_GATEWAY_BOGUS", "MISSKEY_GATEWAY_BOGUS"),
        ("MISSKEY_GATEWAY_SERVER", "MISSKEY_GATEWAY_SERVER"),
        ("MISSKEY_GATEWAY_", "MISSKEY_GATEWAY_"),
        ("MISSKEY_GATEWAY_POLICY_ENDPOINTS", "MISSKEY_GATEWAY_POLICY_ENDPOINTS"),
    ],
)
def test_unknown_env_var(name, key):
    with pytest.raises(ConfigError) as excinfo:
        load(environ={name: "1"})
    assert excinfo.value.key == key
    assert key in str(excinfo.value)


def test_unknown_env_key_in_section():
    with pytest.raises(ConfigError) as excinfo:
        load(environ={"MISSKEY_GATEWAY_SERVER_COLOUR": "red"})
    assert excinfo.value.key.startswith("server.colour")
    assert "MISSKEY_GATEWAY_SERVER_COLOUR" in str(excinfo.value)


@pytest.mark.parametrize(
    ("name", "text", "key"),
    [
        ("MISSKEY_GATEWAY_SERVER_PORT", "eighty", "server.port"),
        ("MISSKEY_GATEWAY_PORT", "80.5", "server.port"),
        ("MISSKEY_GATEWAY_PORT", "", "server.port"),
        ("MISSKEY_GATEWAY_PORT", "99999", "server.port"),
        ("MISSKEY_GATEWAY_SERVER_WORKERS", "many", "server.workers"),
        ("MISSKEY_GATEWAY_REDIS_TIMEOUT", "soon", "redis.timeout"),
        ("MISSKEY_GATEWAY_REDIS_TIMEOUT", "nan", "redis.timeout"),
        ("MISSKEY_GATEWAY_REDIS_TIMEOUT", "inf", "redis.timeout"),
        ("MISSKEY_GATEWAY_JWT_ALGORITHMS", "", "jwt.algorithms"),
        ("MISSKEY_GATEWAY_JWT_ALGORITHMS", "HS256,RS256", "jwt.algorithms"),
        ("MISSKEY_GATEWAY_JWT_ALGORITHMS", "RS256", "jwt.public_key_file"),
        ("MISSKEY_GATEWAY_LOG_LEVEL", "loud", "log.level"),
    ],
)
def test_invalid_env_value(name, text, key):
    with pytest.raises(ConfigError) as excinfo:
        load(environ={name: text})
    assert excinfo.value.key.startswith(key)
    assert key in str(excinfo.value)


def test_invalid_env_value_names_variable():
    with pytest.raises(ConfigError) as excinfo:
        load(environ={"MISSKEY_GATEWAY_SERVER_PORT": "eighty"})
    assert "MISSKEY_GATEWAY_SERVER_PORT" in str(excinfo.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://misskey.example/api",
        "https://misskey.example?x=1",
        "https://misskey.example#top",
        "https://user:password@misskey.example",
        "https://user@misskey.example",
        "ftp://misskey.example",
        "misskey.example",
        "//misskey.example",
        "https://",
        "https://misskey.example:99999",
        "https://misskey.example:port",
        "http://[::1",
    ],
)
def test_upstream_url_invalid(url):
    with pytest.raises(ConfigError) as excinfo:
        load(overrides={"upstream.url": url})
    assert excinfo.value.key == "upstream.url"
    assert "upstream.url" in str(excinfo.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:3000",
        "https://misskey.example",
        "https://misskey.example/",
        "http://[::1]:3000",
        "https://misskey.example:443",
    ],
)
def test_upstream_url_valid(url):
    assert load(overrides={"upstream.url": url}).upstream.url == url


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://cache.example:6380/1",
        "unix:///run/redis/redis.sock",
        f"redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0",
    ],
)
def test_redis_url_valid(url):
    assert load(overrides={"redis.url": url}).redis.url == url


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379",
        "127.0.0.1:6379",
        "sqlite:///store.db",
        "redis://:pw@[::1/0",
    ],
)
def test_redis_url_invalid(url):
    with pytest.raises(ConfigError) as excinfo:
        load(overrides={"redis.url": url})
    assert excinfo.value.key == "redis.url"
    assert "redis.url" in str(excinfo.value)


@pytest.mark.parametrize(
    ("secret", "valid"),
    [
        ("", True),
        ("x" * 31, False),
        ("x" * 32, True),
        ("short", False),
    ],
)
def test_hs_secret_length(secret, valid):
    if valid:
        assert load(overrides={"jwt.secret": secret}).jwt.secret == secret
        return
    with pytest.raises(ConfigError) as excinfo:
        load(overrides={"jwt.secret": secret})
    assert excinfo.value.key == "jwt.secret"
    assert "32" in str(excinfo.value)


def test_public_key_algorithms_with_file(tmp_path):
    settings = load(
        overrides={
            "jwt.algorithms": ["RS256", "EdDSA"],
            "jwt.public_key_file": str(tmp_path / "key.pem"),
        }
    )
    assert settings.jwt.algorithms == ("RS256", "EdDSA")


# Token store selection


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {"HOME": "/home/gw"},
            "sqlite:////home/gw/.local/share/misskey-gateway/store.db",
        ),
        (
            {"HOME": "/home/gw", "XDG_DATA_HOME": "/srv/data"},
            "sqlite:////srv/data/misskey-gateway/store.db",
        ),
        (
            {"HOME": "/home/gw", "XDG_DATA_HOME": "relative/data"},
            "sqlite:////home/gw/.local/share/misskey-gateway/store.db",
        ),
    ],
)
def test_store_default_sqlite(environ, expected):
    assert load_settings(None, environ=environ).store.url == expected


def test_store_from_redis_url():
    settings = load(overrides={"redis.url": "redis://127.0.0.1:6380/1"})
    assert settings.store.url == "redis://127.0.0.1:6380/1"


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://cache.example/0",
        "unix:///run/redis.sock",
        "sqlite:///data/store.db",
        "sqlite:////var/lib/misskey-gateway/store.db",
    ],
)
def test_store_url_valid(url):
    assert load(environ={"MISSKEY_GATEWAY_STORE_URL": url}).store.url == url


def test_store_url_same_as_redis_url():
    url = "redis://127.0.0.1:6379/0"
    settings = load(overrides={"store.url": url, "redis.url": url})
    assert settings.store.url == url


def test_store_url_conflict():
    with pytest.raises(ConfigError) as excinfo:
        load(
            overrides={
                "store.url": "sqlite:///store.db",
                "redis.url": "redis://127.0.0.1:6379/0",
            }
        )
    assert excinfo.value.key == "store.url"
    assert "redis.url" in str(excinfo.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379",
        "store.db",
        "sqlite://",
        "sqlite:///",
        "sqlite:store.db",
        "sqlite://host/store.db",
        "redis://:pw@[::1/0",
    ],
)
def test_store_url_invalid(url):
    with pytest.raises(ConfigError) as excinfo:
        load(overrides={"store.url": url})
    assert excinfo.value.key == "store.url"
    assert "store.url" in str(excinfo.value)


def test_store_poll_interval_negative():
    with pytest.raises(ConfigError) as excinfo:
        load(overrides={"store.poll_interval": -0.5})
    assert excinfo.value.key == "store.poll_interval"


# Secrets stay out of messages


@pytest.mark.parametrize(
    ("text", "environ", "overrides"),
    [
        pytest.param(f"[jwt]\nsecret = '{SECRET[:20]}'\n", {}, {}, id="short-file"),
        pytest.param("[jwt]\nsecret = 1234567890123\n", {}, {}, id="int-file"),
        pytest.param(f"[jwt]\nsecret = ['{SECRET}']\n", {}, {}, id="list-file"),
        pytest.param(
            None, {"MISSKEY_GATEWAY_JWT_SECRET": SECRET[:20]}, {}, id="short-env"
        ),
        pytest.param(None, {}, {"jwt.secret": SECRET[:20]}, id="short-override"),
        pytest.param(None, {}, {"jwt.secret": 1234567890123}, id="int-override"),
        pytest.param(
            f"[redis]\nurl = 'http://:{REDIS_PASSWORD}@127.0.0.1/0'\n",
            {},
            {},
            id="redis-scheme-file",
        ),
        pytest.param(
            None,
            {"MISSKEY_GATEWAY_REDIS_URL": f"http://:{REDIS_PASSWORD}@h/0"},
            {},
            id="redis-scheme-env",
        ),
        pytest.param(
            None,
            {},
            {"redis.url": f"tcp://user:{REDIS_PASSWORD}@127.0.0.1/0"},
            id="redis-scheme-override",
        ),
        pytest.param(
            None,
            {},
            {"redis.url": f"redis://:{REDIS_PASSWORD}@[::1/0"},
            id="redis-bad-ipv6",
        ),
        pytest.param(
            None,
            {},
            {"redis.url": [f"redis://:{REDIS_PASSWORD}@h/0"]},
            id="redis-list",
        ),
        pytest.param(
            None,
            {},
            {"store.url": f"http://:{REDIS_PASSWORD}@h/0"},
            id="store-scheme",
        ),
        pytest.param(
            None,
            {},
            {"store.url": f"redis://:{REDIS_PASSWORD}@[::1/0"},
            id="store-bad-ipv6",
        ),
        pytest.param(
            None,
            {"MISSKEY_GATEWAY_STORE_URL": f"redis://:{REDIS_PASSWORD}@a/0"},
            {"redis.url": f"redis://:{REDIS_PASSWORD}@b/0"},
            id="store-conflict",
        ),
        pytest.param(
            f"[store]\npoll_interval = 1\nurl = ['redis://:{REDIS_PASSWORD}@h/0']\n",
            {},
            {},
            id="store-list",
        ),
    ],
)
def test_secret_not_in_message(tmp_path, text, environ, overrides):
    with pytest.raises(ConfigError) as excinfo:
        load(text, tmp_path, environ=environ, overrides=overrides)
    message = str(excinfo.value)
    for secret in (SECRET[:20], "1234567890123", REDIS_PASSWORD):
        assert secret not in message
        assert secret not in excinfo.value.key


@pytest.mark.parametrize(
    "url",
    [
        f"ftp://user:{UPSTREAM_PASSWORD}@misskey.example",
        f"https://user:{UPSTREAM_PASSWORD}@misskey.example/api",
        f"https://user:{UPSTREAM_PASSWORD}@misskey.example:port",
        f"http://user:{UPSTREAM_PASSWORD}@[::1",
    ],
)
def test_upstream_password_not_in_message(url):
    with pytest.raises(ConfigError) as excinfo:
        load(overrides={"upstream.url": url})
    assert UPSTREAM_PASSWORD not in str(excinfo.value)


def test_secret_not_in_repr():
    settings = load(overrides={"jwt.secret": SECRET})
    assert SECRET not in repr(settings)


# Policy overrides


def test_policy_override_rows(tmp_path):
    settings = load(
        """
        [policy.endpoints]
        "notes/create" = "deny"
        "i" = { kind = "read:account" }
        "emojis" = { mode = "optional", allow_get = false }
        """,
        tmp_path,
    )

    endpoints = settings.policy.endpoints
    assert endpoints["notes/create"] == PolicyRow(mode="deny")
    assert endpoints["i"] == PolicyRow(kind="read:account")
    assert endpoints["emojis"] == PolicyRow(mode="optional", allow_get=False)


@pytest.mark.parametrize(
    ("row", "key"),
    [
        ('"allow"', 'policy.endpoints."notes/create".mode'),
        ('{ mode = "REQUIRED" }', 'policy.endpoints."notes/create".mode'),
        ("{ mode = 1 }", 'policy.endpoints."notes/create".mode'),
        ("5", 'policy.endpoints."notes/create"'),
        ('{ mode = "deny", colour = "red" }', 'policy.endpoints."notes/create"'),
        ("{ kind = 5 }", 'policy.endpoints."notes/create".kind'),
        ('{ allow_get = "yes" }', 'policy.endpoints."notes/create".allow_get'),
    ],
)
def test_policy_override_invalid(tmp_path, row, key):
    with pytest.raises(ConfigError) as excinfo:
        load(f'[policy.endpoints]\n"notes/create" = {row}\n', tmp_path)
    assert excinfo.value.key == key
    assert key in str(excinfo.value)


def test_policy_override_invalid_mode_listed(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load('[policy.endpoints]\n"notes/create" = "allow"\n', tmp_path)
    message = str(excinfo.value)
    assert "'allow'" in message
    assert "required, optional, none, deny" in message


# redact_url and require_upstream


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://user@127.0.0.1:6379/0", "redis://user@127.0.0.1:6379/0"),
        ("redis://:secret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://user:secret@cache:6379/0", "redis://user:***@cache:6379/0"),
        ("rediss://user:secret@cache/0?ssl=1", "rediss://user:***@cache/0?ssl=1"),
        ("redis://u:p%40ss@cache:6379", "redis://u:***@cache:6379"),
        ("redis://:secret@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("redis://:secret@Cache.Example:6379", "redis://:***@Cache.Example:6379"),
        ("redis://:secret@[::1/0", "<invalid URL>"),
        ("", ""),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_redact_url_hides_password():
    redacted = redact_url(f"redis://default:{REDIS_PASSWORD}@cache:6379/0")
    assert REDIS_PASSWORD not in redacted


def test_require_upstream_missing():
    settings = load()
    with pytest.raises(ConfigError) as excinfo:
        settings.require_upstream()
    assert excinfo.value.key == "upstream.url"
    assert "MISSKEY_GATEWAY_UPSTREAM_URL" in str(excinfo.value)


def test_require_upstream_set():
    settings = load(environ={"MISSKEY_GATEWAY_UPSTREAM_URL": "http://127.0.0.1:3000"})
    assert settings.require_upstream() == "http://127.0.0.1:3000"
