"""The benchmark cases: which server each one measures and the request it sends."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Environment override that turns the gateway's token cache off, for the
# gateway-required-uncached case. The case runs only when StoreSettings has
# the field CACHE_SETTING_FIELD, because the gateway rejects unknown keys.
UNCACHED_OVERRIDE = {"MISSKEY_GATEWAY_STORE_CACHE_TTL": "0"}
# Environment override that leaves every request to aiohttp's server, for the
# gateway-required-aiohttp case: what the lean HTTP/1.1 server saves.
AIOHTTP_ONLY_OVERRIDE = {"MISSKEY_GATEWAY_SERVER_FAST_PATH": "false"}
CACHE_SETTING_FIELD = "cache_ttl"
CACHE_MISSING_REASON = "token cache not implemented"
MULTIPART_MISSING_REASON = "multipart streaming not implemented"

NOTE_BODY = b'{"text":"hello","visibility":"public"}'
APP_BODY = b'{"name":"bench","description":"bench/run","permission":[]}'
JSON_TYPE = "application/json"
UPLOAD_BYTES = 256 * 1024 * 1024

# An upload takes seconds, so its throughput run uses at most
# UPLOAD_CONNECTIONS connections, both runs last at least UPLOAD_MIN_SECONDS,
# and there is no warm-up.
UPLOAD_CONNECTIONS = 4
UPLOAD_MIN_SECONDS = 10
UPLOAD_TIMEOUT_SECONDS = 120
# wrk counts a request without a response within this time as a timeout.
REQUEST_TIMEOUT_SECONDS = 10

UPSTREAM = "upstream"
PROXY = "nginx-proxy"
GATEWAY = "gateway"


@dataclass(frozen=True)
class Case:
    """One row of the table: a server under test and the POST request it gets.

    ``scope`` is the permission kinds of the JWT sent as ``Authorization:
    Bearer``, or None for an anonymous request. The direct and nginx-proxy
    cases send the same bytes as gateway-required; nginx ignores the header.
    """

    number: int
    name: str
    description: str
    server: str  # UPSTREAM, PROXY or GATEWAY
    path: str
    body: bytes
    scope: str | None
    gateway_env: Mapping[str, str] = field(default_factory=dict)
    # Skipped unless the gateway has the token cache that gateway_env turns off.
    needs_token_cache: bool = False
    upload: bool = False


CASES = (
    Case(
        1, "direct", "nginx fixed-response upstream, no proxy",
        UPSTREAM, "/api/notes/create", NOTE_BODY, "write:notes",
    ),
    Case(
        2, "nginx-proxy", "nginx reverse proxy with keep-alive to the upstream",
        PROXY, "/api/notes/create", NOTE_BODY, "write:notes",
    ),
    Case(
        3, "gateway-none", "gateway, anonymous POST /api/app/create (mode none)",
        GATEWAY, "/api/app/create", APP_BODY, None,
    ),
    Case(
        4, "gateway-required", "gateway, POST /api/notes/create with a JWT",
        GATEWAY, "/api/notes/create", NOTE_BODY, "write:notes",
    ),
    Case(
        5, "gateway-required-uncached", "as gateway-required, token cache off",
        GATEWAY, "/api/notes/create", NOTE_BODY, "write:notes",
        gateway_env=UNCACHED_OVERRIDE, needs_token_cache=True,
    ),
    Case(
        7, "gateway-required-aiohttp", "as gateway-required, aiohttp's server only",
        GATEWAY, "/api/notes/create", NOTE_BODY, "write:notes",
        gateway_env=AIOHTTP_ONLY_OVERRIDE,
    ),
    Case(
        6, "upload-256mib", "gateway, 256 MiB multipart POST /api/drive/files/create",
        GATEWAY, "/api/drive/files/create", b"", "write:drive", upload=True,
    ),
)  # fmt: skip


def select_cases(text: str | None) -> list[Case]:
    """Return the cases named by "1,2,4" or "direct,gateway-none", in table order."""
    if not text:
        return list(CASES)
    wanted = set()
    for item in text.split(","):
        item = item.strip()
        matches = [case for case in CASES if item in (str(case.number), case.name)]
        if not matches:
            known = ", ".join(f"{case.number} ({case.name})" for case in CASES)
            raise ValueError(f"--cases: unknown case {item!r}; known: {known}")
        wanted.add(matches[0].number)
    return [case for case in CASES if case.number in wanted]


@dataclass(frozen=True)
class Durations:
    """Seconds of each wrk run of a case."""

    warmup: int
    throughput: int
    latency: int


FULL = Durations(warmup=2, throughput=15, latency=10)
QUICK = Durations(warmup=1, throughput=3, latency=2)


@dataclass(frozen=True)
class LoadPlan:
    """The wrk runs of one case: connections, seconds, and the request timeout."""

    connections: int
    warmup_s: int  # 0: no warm-up run
    throughput_s: int
    latency_s: int
    timeout_s: int


def load_plan(case: Case, durations: Durations, connections: int) -> LoadPlan:
    if case.upload:
        return LoadPlan(
            connections=min(connections, UPLOAD_CONNECTIONS),
            warmup_s=0,
            throughput_s=max(durations.throughput, UPLOAD_MIN_SECONDS),
            latency_s=max(durations.latency, UPLOAD_MIN_SECONDS),
            timeout_s=UPLOAD_TIMEOUT_SECONDS,
        )
    return LoadPlan(
        connections=connections,
        warmup_s=durations.warmup,
        throughput_s=durations.throughput,
        latency_s=durations.latency,
        timeout_s=REQUEST_TIMEOUT_SECONDS,
    )


def gateway_has_cache_setting(python: str) -> bool:
    """Check in a separate interpreter whether StoreSettings has the cache field.

    Raises RuntimeError when gateway.config cannot be imported.
    """
    code = (
        "import dataclasses, sys\n"
        "from gateway.config import StoreSettings\n"
        "names = {field.name for field in dataclasses.fields(StoreSettings)}\n"
        f"sys.exit(0 if {CACHE_SETTING_FIELD!r} in names else 3)\n"
    )
    result = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, check=False
    )
    if result.returncode not in (0, 3):
        raise RuntimeError(f"cannot import gateway.config: {result.stderr.strip()}")
    return result.returncode == 0


def write_multipart_body(path: Path, size: int) -> str:
    """Write a multipart/form-data body with one ``file`` part of ``size`` bytes.

    Returns the Content-Type header value, which carries the boundary.
    """
    boundary = f"bench-{secrets.token_hex(12)}"
    block = os.urandom(1024 * 1024)
    with path.open("wb") as handle:
        handle.write(
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="bench.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        remaining = size
        while remaining > 0:
            chunk = block[: min(len(block), remaining)]
            handle.write(chunk)
            remaining -= len(chunk)
        handle.write(f"\r\n--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}"


def tiny_multipart_body() -> tuple[bytes, str]:
    """Return a small multipart/form-data body and its Content-Type."""
    boundary = "bench-probe"
    body = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="probe.txt"\r\n'
        "Content-Type: text/plain\r\n\r\n"
        f"probe\r\n--{boundary}--\r\n"
    ).encode()
    return body, f"multipart/form-data; boundary={boundary}"
