#!/usr/bin/env python3
"""Print docs/configuration.md, the reference of every setting, to standard output.

The keys, types and defaults come from the settings dataclasses in
gateway/config.py. The meaning of a key is its entry in HELP below if it has
one, else the comment block right above its field in gateway/config.py.

    .venv/bin/python scripts/generate_config_reference.py > docs/configuration.md
"""

from __future__ import annotations

import ast
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway import config  # noqa: E402 - needs the repository on sys.path

CONFIG_SOURCE = ROOT / "gateway" / "config.py"

# Meanings of fields that have no comment of their own in gateway/config.py,
# or whose comment covers several fields or only the empty value. An entry
# here takes precedence over the comment.
HELP = {
    "server.host": "Address to listen on.",
    "server.port": "TCP port to listen on.",
    "server.workers": "Processes that share the port through SO_REUSEPORT.",
    "server.max_body_size": "Largest JSON request body, in bytes; larger bodies "
    "get 413.",
    "upstream.url": "Origin of the Misskey server, http(s)://host[:port] without "
    "a path. Required by serve and check.",
    "upstream.connect_timeout": "Seconds to get a connection to the upstream.",
    "upstream.read_timeout": "Seconds for each read of the upstream's answer.",
    "upstream.max_connections": "Pooled keep-alive connections to the upstream, "
    "per worker process.",
    "store.url": "Token store: redis://, rediss://, unix://, redis+sentinel://, "
    "redis+cluster:// or sqlite:///PATH (three slashes start a relative path, "
    "four an absolute one). Empty: redis.url when that is set, else SQLite at "
    "$XDG_DATA_HOME/misskey-gateway/store.db.",
    "store.poll_interval": "SQLite: seconds between checks for changes made by "
    "other processes; 0 checks on every request.",
    "redis.url": "Redis URL of the token store; the same as store.url, which "
    "must not name another store.",
    "redis.username": "ACL user of the data nodes, for URLs that name none; "
    "empty: default.",
    "redis.tls_ca_file": "rediss:// only: PEM CA certificates that verify the "
    "server; empty: the system's CA certificates.",
    "redis.prefix": "Prefix of every Redis key and channel the gateway uses.",
    "redis.timeout": "Seconds to connect, and seconds per Redis command before "
    "it counts as failed.",
    "redis.password": "Password of the data nodes, for URLs that carry none.",
    "redis.tls_cert_file": "rediss:// only: PEM client certificate, for servers "
    "that require one.",
    "redis.tls_key_file": "rediss:// only: PEM private key of the client "
    "certificate; empty when the key is in tls_cert_file.",
    "redis.tls_verify_hostname": "rediss:// only: require the server certificate "
    "to name the URL's host.",
    "jwt.algorithms": "Accepted JWT signing algorithms, all HS* or all public-key "
    "(RS*, PS*, ES*, EdDSA).",
    "jwt.secret": "HS* shared secret, at least 32 characters. Empty: a random "
    "secret kept in the token store and shared by every replica.",
    "jwt.public_key_file": "PEM public key for the public-key algorithms.",
    "jwt.issuer": "Required iss claim; empty: not checked.",
    "jwt.audience": "Required aud claim; empty: not checked.",
    "jwt.leeway": "Seconds of clock skew allowed for exp and nbf.",
    "jwt.default_ttl": "Lifetime in seconds of JWTs made by jwt issue.",
    "policy.file": "Policy table that replaces the bundled one (same format as "
    "config/policy.toml); empty: the bundled table.",
    "policy.endpoints": "Overrides of single policy rows: a mode, or a table "
    "with mode, kind and allow_get.",
    "log.level": "debug, info, warning or error.",
    "log.format": "json (one object per line) or console.",
}

TYPE_NAMES = {
    "str": "string",
    "int": "integer",
    "float": "number",
    "bool": "boolean",
    "tuple[str, ...]": "list of strings",
    "Mapping[str, PolicyRow]": "table",
    "Mapping[str, int]": "table of integers",
}


def field_comments() -> dict[str, str]:
    """Return "section.key" -> the comment block right above the field."""
    source = CONFIG_SOURCE.read_text(encoding="utf-8")
    lines = source.splitlines()
    classes = {cls.__name__: section for section, cls in config.SECTIONS.items()}
    comments: dict[str, str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef) or node.name not in classes:
            continue
        section = classes[node.name]
        for statement in node.body:
            if not isinstance(statement, ast.AnnAssign):
                continue
            if not isinstance(statement.target, ast.Name):
                continue
            block: list[str] = []
            index = statement.lineno - 2  # the line above, 0-based
            while index >= 0 and lines[index].strip().startswith("#"):
                block.insert(0, lines[index].strip().lstrip("#").strip())
                index -= 1
            if block:
                comments[f"{section}.{statement.target.id}"] = " ".join(block)
    return comments


def field_annotations() -> dict[str, str]:
    source = CONFIG_SOURCE.read_text(encoding="utf-8")
    classes = {cls.__name__: section for section, cls in config.SECTIONS.items()}
    annotations: dict[str, str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name in classes:
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign) and isinstance(
                    statement.target, ast.Name
                ):
                    dotted = f"{classes[node.name]}.{statement.target.id}"
                    annotations[dotted] = ast.unparse(statement.annotation)
    return annotations


def operator_text(comment: str) -> str:
    """Drop sentences about the Python object (repr) that mean nothing to operators."""
    sentences = re.split(r"(?<=\.)\s+", comment)
    kept = [sentence for sentence in sentences if "repr()" not in sentence]
    return " ".join(kept)


def format_default(value: Any) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`' if value else "empty"
    if isinstance(value, tuple):
        items = ", ".join(f'"{item}"' for item in value)
        return f"`[{items}]`" if value else "empty"
    if isinstance(value, dict):
        return "empty" if not value else f"`{value}`"
    return f"`{value}`"


def variables(section: str, key: str, is_table: bool) -> str:
    if is_table:
        return "config file only"
    names = [f"{config.ENV_PREFIX}{section.upper()}_{key.upper()}"]
    for short, target in config.SHORT_ENV_NAMES.items():
        if target == (section, key):
            names.append(f"{config.ENV_PREFIX}{short}")
    return ", ".join(f"`{name}`" for name in names)


def reference_rows() -> list[dict[str, str]]:
    """Return one row per setting, in the order of gateway/config.py."""
    comments = field_comments()
    annotations = field_annotations()
    rows = []
    for section, cls in config.SECTIONS.items():
        defaults = cls()
        for item in dataclasses.fields(cls):
            dotted = f"{section}.{item.name}"
            default = getattr(defaults, item.name)
            annotation = annotations[dotted]
            meaning = HELP.get(dotted) or operator_text(comments.get(dotted, ""))
            if dotted in config.SECRET_KEYS:
                meaning += " Its value is never shown in error messages."
            rows.append(
                {
                    "section": section,
                    "key": dotted,
                    "variable": variables(
                        section, item.name, annotation.startswith("Mapping")
                    ),
                    "type": TYPE_NAMES.get(annotation, annotation),
                    "default": format_default(default),
                    "meaning": meaning.strip(),
                }
            )
    return rows


HEADER = """\
# Configuration reference

<!-- Generated by scripts/generate_config_reference.py from
gateway/config.py; edit the comments there and run the script again. -->

Settings are read from a TOML file (`--config PATH`, or the file named by
`MISSKEY_GATEWAY_CONFIG`), then from environment variables, then from
command-line options, each overriding the one before. The key `[section] key`
is set by the variable `MISSKEY_GATEWAY_<SECTION>_<KEY>`. In variables, lists
are comma-separated and booleans are `true`/`false`, `1`/`0`, `yes`/`no` or
`on`/`off`. Tables can only be set in the file. An unknown key or variable,
or an invalid value, stops the command with exit status 2 and a message that
names the key. `config/gateway.example.toml` is a commented example file.
"""


def render() -> str:
    parts = [HEADER]
    current = ""
    for row in reference_rows():
        if row["section"] != current:
            current = row["section"]
            parts.append(
                f"\n## [{current}]\n\n"
                "| key | variable | type | default | meaning |\n"
                "|---|---|---|---|---|\n"
            )
        cells = [
            f"`{row['key']}`",
            row["variable"],
            row["type"],
            row["default"],
            row["meaning"].replace("|", "\\|"),
        ]
        parts.append("| " + " | ".join(cells) + " |\n")
    return "".join(parts)


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
