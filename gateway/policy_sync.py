"""A policy table from a running Misskey server's OpenAPI document.

Misskey publishes ``GET /api.json``. Each endpoint is a path with a POST
operation (and a GET one when the endpoint allows GET); the credential
requirement is the operation's ``security`` and the description line
``**Credential required**: *Yes*``; the permission kind is only in the
description (``**Permission**: *write:notes*``), and endpoints for the web UI
alone say ``**Internal Endpoint**``. Moderator and administrator endpoints
all live under ``admin/``, and are treated as needing a credential even where
the description does not say so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.policy import ENDPOINT_PATTERN, PolicyTable
from gateway.policy_rules import Row, classify, with_extra_rows

CREDENTIAL_REQUIRED = re.compile(r"\*\*Credential required\*\*:\s*\*Yes\*")
PERMISSION = re.compile(r"\*\*Permission\*\*:\s*\*([A-Za-z0-9:_-]+)\*")
INTERNAL_ENDPOINT = "**Internal Endpoint**"
FETCH_TIMEOUT_SECONDS = 30.0
MAX_DOCUMENT_BYTES = 32 * 1024 * 1024


def rows_from_openapi(document: Any) -> tuple[dict[str, Row], str]:
    """Return the policy rows described by an OpenAPI document, and its version."""
    if not isinstance(document, dict) or not isinstance(document.get("paths"), dict):
        raise ValueError("the document has no 'paths' object")
    info = document.get("info")
    version = info.get("version", "") if isinstance(info, dict) else ""
    rows: dict[str, Row] = {}
    for path, operations in document["paths"].items():
        name = str(path).strip("/")
        if not isinstance(operations, dict) or not ENDPOINT_PATTERN.fullmatch(name):
            continue
        operation = operations.get("post") or operations.get("get")
        if not isinstance(operation, dict):
            continue
        description = str(operation.get("description") or "")
        permission = PERMISSION.search(description)
        rows[name] = classify(
            name,
            needs_credential=bool(
                CREDENTIAL_REQUIRED.search(description)
                or operation.get("security")
                or name.startswith("admin/")
            ),
            secure=INTERNAL_ENDPOINT in description,
            kind=permission.group(1) if permission else "",
            allow_get="get" in operations,
        )
    return with_extra_rows(rows), str(version)


async def fetch_openapi(upstream_url: str) -> Any:
    """Fetch and parse ``GET <upstream>/api.json``."""
    url = upstream_url.rstrip("/") + "/api.json"
    client_timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        async with session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                raise ValueError(f"{url} returned HTTP {response.status}")
            body = await response.content.read(MAX_DOCUMENT_BYTES + 1)
    if len(body) > MAX_DOCUMENT_BYTES:
        raise ValueError(f"{url} is larger than {MAX_DOCUMENT_BYTES} bytes")
    return json.loads(body)


@dataclass
class PolicyDifference:
    """Differences between the gateway's table and the upstream's endpoint list."""

    missing_from_table: list[str] = field(default_factory=list)
    missing_upstream: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.missing_from_table or self.missing_upstream or self.changed)


def compare(table: PolicyTable, upstream_rows: dict[str, Row]) -> PolicyDifference:
    """Compare the effective table with rows built from the upstream.

    Operator overrides are part of the effective table, so an endpoint an
    operator changed on purpose is reported as changed, and the log message
    points that out.
    """
    difference = PolicyDifference()
    names = {name for name in table.names() if "*" not in name}
    upstream_names = {name for name in upstream_rows if "*" not in name}
    difference.missing_from_table = sorted(upstream_names - names)
    difference.missing_upstream = sorted(names - upstream_names)
    for name in sorted(names & upstream_names):
        policy = table.lookup(name)
        row = upstream_rows[name]
        if (policy.mode.value, policy.kind or "", policy.allow_get) != (
            row.mode,
            row.kind,
            row.allow_get,
        ):
            difference.changed.append(name)
    return difference
