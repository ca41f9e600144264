"""Endpoint policy: what the gateway does for each Misskey API endpoint.

Each row has a mode and, where Misskey has one, the permission kind that a
principal's scope must include:

- ``required``: inject the principal's stored token; without a principal or
  without a stored token the response is 401 CREDENTIAL_REQUIRED;
- ``optional``: inject the token when the principal has one, otherwise forward
  the request anonymously;
- ``none``: never inject a token, and strip any ``i`` the client sent;
- ``deny``: respond 403 ACCESS_DENIED and forward nothing.

The default table ships with the package (``config/policy.toml`` in the
source tree). Operators override single rows in their config; endpoints
missing from the table are treated as ``required`` with no permission kind.
"""

from __future__ import annotations

import enum
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gateway.errors import NoSuchEndpoint


class Mode(enum.StrEnum):
    REQUIRED = "required"
    OPTIONAL = "optional"
    NONE = "none"
    DENY = "deny"


MODES = tuple(mode.value for mode in Mode)
API_PREFIX = "/api/"
DEFAULT_POLICY_RESOURCE = "policy.toml"

# One path segment of an endpoint name: RFC 3986 unreserved characters only,
# so that the name has exactly one spelling. Percent-encoding, dot segments
# and empty segments never match.
_SEGMENT = r"(?!\.{1,2}(?:/|$))[A-Za-z0-9._~-]+"
ENDPOINT_PATTERN = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")


@dataclass(frozen=True)
class PolicyRow:
    """One row as written in a table or config; ``None`` fields are unset."""

    mode: str | None = None
    kind: str | None = None
    allow_get: bool | None = None


@dataclass(frozen=True)
class EndpointPolicy:
    """The effective policy of one endpoint."""

    endpoint: str
    mode: Mode
    kind: str | None
    allow_get: bool
    source: str  # "default", "override" or "unknown endpoint"


class PolicyTable:
    """Effective policy rows, looked up by canonical endpoint name.

    A row name may contain ``*`` as a whole segment, matching any one
    segment (``miauth/*/check``). Exact rows win over patterns.
    """

    def __init__(
        self,
        defaults: Mapping[str, PolicyRow],
        overrides: Mapping[str, PolicyRow] | None = None,
        misskey_version: str = "",
    ):
        self.misskey_version = misskey_version
        self._exact: dict[str, EndpointPolicy] = {}
        self._patterns: list[tuple[re.Pattern[str], EndpointPolicy]] = []
        overrides = overrides or {}

        for name in sorted(set(defaults) | set(overrides)):
            base = defaults.get(name)
            override = overrides.get(name)
            policy = _merge(name, base, override)
            if "*" in name:
                self._patterns.append((_compile_pattern(name), policy))
            else:
                self._exact[name] = policy

        # Old Misskey releases also routed "a_b" for an endpoint "a-b". A name
        # that differs from a known endpoint only in that way is refused, so
        # that it can never be used to reach a row under a different policy.
        self._underscore_aliases = {
            name.replace("-", "_") for name in self._exact if "-" in name
        }

    def __len__(self) -> int:
        return len(self._exact) + len(self._patterns)

    def names(self) -> list[str]:
        """Return every row name, patterns included, sorted."""
        return sorted(
            [*self._exact, *(policy.endpoint for _, policy in self._patterns)]
        )

    def lookup(self, endpoint: str) -> EndpointPolicy:
        """Return the effective policy of a canonical endpoint name."""
        policy = self._exact.get(endpoint)
        if policy is not None:
            return policy
        for pattern, pattern_policy in self._patterns:
            if pattern.fullmatch(endpoint):
                return pattern_policy
        if endpoint in self._underscore_aliases:
            raise NoSuchEndpoint(
                f"Unknown API endpoint: {endpoint}. "
                f"Did you mean {endpoint.replace('_', '-')}?"
            )
        if endpoint != endpoint.lower():
            # Misskey's endpoint names are lower case. Another spelling of a
            # known name must not pass as an unknown endpoint under another
            # policy, in case a router matches names case-insensitively.
            raise NoSuchEndpoint(
                f"Unknown API endpoint: {endpoint}. Endpoint names are lower case."
            )
        return EndpointPolicy(
            endpoint=endpoint,
            mode=Mode.REQUIRED,
            kind=None,
            allow_get=False,
            source="unknown endpoint",
        )


def _merge(
    name: str, base: PolicyRow | None, override: PolicyRow | None
) -> EndpointPolicy:
    mode = kind = allow_get = None
    for row in (base, override):
        if row is None:
            continue
        mode = row.mode if row.mode is not None else mode
        kind = row.kind if row.kind is not None else kind
        allow_get = row.allow_get if row.allow_get is not None else allow_get
    if mode is None:
        # An override row for an endpoint the default table lacks may omit
        # the mode; such an endpoint is unknown, so it keeps the unknown default.
        mode = Mode.REQUIRED.value
    return EndpointPolicy(
        endpoint=name,
        mode=Mode(mode),
        kind=kind or None,
        allow_get=bool(allow_get),
        source="override" if override is not None else "default",
    )


def _compile_pattern(name: str) -> re.Pattern[str]:
    parts = [r"[^/]+" if part == "*" else re.escape(part) for part in name.split("/")]
    return re.compile("/".join(parts))


def parse_policy_document(text: str, source: str) -> tuple[dict[str, PolicyRow], str]:
    """Parse a policy table in TOML; return its rows and Misskey version."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{source}: invalid TOML: {error}") from None
    endpoints = document.get("endpoints")
    if not isinstance(endpoints, dict):
        raise ValueError(f"{source}: missing [endpoints] table")

    rows: dict[str, PolicyRow] = {}
    for name, row in endpoints.items():
        if not isinstance(row, dict) or row.get("mode") not in MODES:
            raise ValueError(
                f"{source}: row {name!r} needs a mode out of {', '.join(MODES)}"
            )
        kind = row.get("kind")
        allow_get = row.get("allow_get", False)
        if kind is not None and not isinstance(kind, str):
            raise ValueError(f"{source}: row {name!r}: kind must be a string")
        if not isinstance(allow_get, bool):
            raise ValueError(f"{source}: row {name!r}: allow_get must be true or false")
        rows[name] = PolicyRow(mode=row["mode"], kind=kind, allow_get=allow_get)
    version = document.get("misskey_version", "")
    return rows, version if isinstance(version, str) else ""


def load_policy_table(
    path: str | Path | None = None, overrides: Mapping[str, PolicyRow] | None = None
) -> PolicyTable:
    """Load the table at ``path`` (default: the bundled one) with ``overrides``."""
    if path:
        source = str(path)
        text = Path(path).read_text(encoding="utf-8")
    else:
        source = "bundled policy table"
        text = (
            resources.files("gateway")
            .joinpath(DEFAULT_POLICY_RESOURCE)
            .read_text(encoding="utf-8")
        )
    rows, version = parse_policy_document(text, source)
    return PolicyTable(rows, overrides, misskey_version=version)


def endpoint_from_path(raw_path: str) -> str:
    """Return the canonical endpoint name of a raw request path.

    ``raw_path`` is the path exactly as the client sent it, without the query.
    Only one spelling of each endpoint is accepted: a path with percent-escapes,
    dot segments, empty segments or a trailing slash is refused, so that the
    name checked against the policy is byte for byte the path forwarded.
    """
    if not raw_path.startswith(API_PREFIX):
        raise NoSuchEndpoint()
    name = raw_path[len(API_PREFIX) :]
    if not ENDPOINT_PATTERN.fullmatch(name):
        raise NoSuchEndpoint(
            "Unknown API endpoint. Endpoint names are plain path segments without "
            "percent-escapes, dot segments, empty segments or a trailing slash."
        )
    return name
