"""Endpoint names, policy tables, the bundled table and its generator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.errors import NoSuchEndpoint
from gateway.policy import (
    Mode,
    PolicyRow,
    PolicyTable,
    endpoint_from_path,
    load_policy_table,
    parse_policy_document,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
GENERATOR = REPO_ROOT / "scripts" / "generate_policy.py"
POLICY_FILE = REPO_ROOT / "config" / "policy.toml"
ENDPOINTS_TSV = Path(__file__).resolve().parents[2] / "shared/misskey/endpoints.tsv"

# Endpoints whose metadata declares allowGet in Misskey 2026.5.4.
ALLOW_GET_ENDPOINTS = [
    "bubble-game/ranking",
    "charts/active-users",
    "charts/ap-request",
    "charts/drive",
    "charts/federation",
    "charts/instance",
    "charts/notes",
    "charts/user/drive",
    "charts/user/following",
    "charts/user/notes",
    "charts/user/pv",
    "charts/user/reactions",
    "charts/users",
    "emoji",
    "emojis",
    "federation/instances",
    "federation/stats",
    "fetch-rss",
    "get-online-users-count",
    "hashtags/trend",
    "notes/featured",
    "notes/reactions",
    "retention",
    "server-info",
    "users/featured-notes",
]


# endpoint_from_path


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/i", "i"),
        ("/api/notes/create", "notes/create"),
        ("/api/notes/local-timeline", "notes/local-timeline"),
        ("/api/miauth/0a1b-2c3d/check", "miauth/0a1b-2c3d/check"),
        ("/api/v1/instance/peers", "v1/instance/peers"),
        (
            "/api/admin/abuse-report/notification-recipient/create",
            "admin/abuse-report/notification-recipient/create",
        ),
        ("/api/a_b~c.d", "a_b~c.d"),
        ("/api/...", "..."),
    ],
)
def test_endpoint_from_path_valid(path, expected):
    assert endpoint_from_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/api/notes%2Fcreate",
        "/api/notes%2fcreate",
        "/api/%2e%2e/admin/meta",
        "/api/notes/%2e",
        "/api/%69",
        "/api/./i",
        "/api/../i",
        "/api/notes/.",
        "/api/notes/..",
        "/api/notes/../admin/meta",
        "/api/notes//create",
        "/api//i",
        "/api/notes/create/",
        "/api/i/",
        "/api/",
        "/api",
        "/api/i;x=1",
        "/api/i;",
        "/api/i#x",
        "/api/nötes/create",
        "/api/i\u00a0",
        "/api/\uff49",
        "/api/i x",
        "/api/i\n",
        "/api/i?x=1",
        "/api/i\\x",
        "/notes/create",
        "/apii",
        "/API/i",
        "api/i",
        "//api/i",
        "",
    ],
)
def test_endpoint_from_path_rejected(path):
    with pytest.raises(NoSuchEndpoint) as excinfo:
        endpoint_from_path(path)
    assert excinfo.value.status == 404


# PolicyTable


@pytest.fixture
def table() -> PolicyTable:
    return PolicyTable(
        {
            "notes/create": PolicyRow(mode="required", kind="write:notes"),
            "notes/local-timeline": PolicyRow(mode="optional"),
            "emojis": PolicyRow(mode="optional", allow_get=True),
            "i/regenerate-token": PolicyRow(mode="deny"),
            "miauth/*/check": PolicyRow(mode="none"),
            "miauth/special/check": PolicyRow(mode="deny"),
        },
        misskey_version="1.2.3",
    )


def test_table_exact_row(table):
    policy = table.lookup("notes/create")
    assert policy.endpoint == "notes/create"
    assert policy.mode is Mode.REQUIRED
    assert policy.kind == "write:notes"
    assert policy.allow_get is False
    assert policy.source == "default"


@pytest.mark.parametrize(
    ("endpoint", "mode", "allow_get"),
    [
        ("notes/local-timeline", Mode.OPTIONAL, False),
        ("emojis", Mode.OPTIONAL, True),
        ("i/regenerate-token", Mode.DENY, False),
    ],
)
def test_table_rows(table, endpoint, mode, allow_get):
    policy = table.lookup(endpoint)
    assert policy.mode is mode
    assert policy.kind is None
    assert policy.allow_get is allow_get


@pytest.mark.parametrize("session", ["abc", "0a1b-2c3d", "x.y_z~"])
def test_table_pattern_one_segment(table, session):
    policy = table.lookup(f"miauth/{session}/check")
    assert policy.mode is Mode.NONE
    assert policy.endpoint == "miauth/*/check"
    assert policy.source == "default"


@pytest.mark.parametrize(
    "endpoint",
    ["miauth/a/b/check", "miauth/check", "miauth/abc/check/x", "x/miauth/abc/check"],
)
def test_table_pattern_no_other_shapes(table, endpoint):
    policy = table.lookup(endpoint)
    assert policy.mode is Mode.REQUIRED
    assert policy.source == "unknown endpoint"


def test_table_exact_beats_pattern(table):
    assert table.lookup("miauth/special/check").mode is Mode.DENY


def test_table_unknown_endpoint(table):
    policy = table.lookup("brand-new/endpoint")
    assert policy.endpoint == "brand-new/endpoint"
    assert policy.mode is Mode.REQUIRED
    assert policy.kind is None
    assert policy.allow_get is False
    assert policy.source == "unknown endpoint"


def test_table_underscore_alias(table):
    with pytest.raises(NoSuchEndpoint) as excinfo:
        table.lookup("notes/local_timeline")
    assert excinfo.value.status == 404
    assert "notes/local-timeline" in str(excinfo.value)


def test_table_underscore_alias_of_denied():
    # No row is named "i/regenerate_token", but its hyphenated form is denied,
    # so the alias must not fall through to the unknown-endpoint default.
    table = PolicyTable({"i/regenerate-token": PolicyRow(mode="deny")})
    with pytest.raises(NoSuchEndpoint):
        table.lookup("i/regenerate_token")


def test_table_underscore_without_hyphen_row(table):
    assert table.lookup("some_endpoint").source == "unknown endpoint"


def test_table_names_and_len(table):
    assert table.names() == [
        "emojis",
        "i/regenerate-token",
        "miauth/*/check",
        "miauth/special/check",
        "notes/create",
        "notes/local-timeline",
    ]
    assert len(table) == 6
    assert table.misskey_version == "1.2.3"


def test_override_mode_keeps_kind():
    table = PolicyTable(
        {
            "notes/create": PolicyRow(
                mode="required", kind="write:notes", allow_get=True
            )
        },
        {"notes/create": PolicyRow(mode="deny")},
    )
    policy = table.lookup("notes/create")
    assert policy.mode is Mode.DENY
    assert policy.kind == "write:notes"
    assert policy.allow_get is True
    assert policy.source == "override"


def test_override_kind_keeps_mode():
    table = PolicyTable(
        {"meta": PolicyRow(mode="optional")},
        {"meta": PolicyRow(kind="read:account")},
    )
    policy = table.lookup("meta")
    assert policy.mode is Mode.OPTIONAL
    assert policy.kind == "read:account"
    assert policy.source == "override"


def test_override_allow_get_only():
    table = PolicyTable(
        {"emojis": PolicyRow(mode="optional", allow_get=True)},
        {"emojis": PolicyRow(allow_get=False)},
    )
    policy = table.lookup("emojis")
    assert policy.mode is Mode.OPTIONAL
    assert policy.allow_get is False


def test_override_new_endpoint():
    table = PolicyTable({}, {"custom/endpoint": PolicyRow(kind="write:custom")})
    policy = table.lookup("custom/endpoint")
    assert policy.mode is Mode.REQUIRED
    assert policy.kind == "write:custom"
    assert policy.source == "override"


def test_override_pattern_row():
    table = PolicyTable(
        {"miauth/*/check": PolicyRow(mode="none")},
        {"miauth/*/check": PolicyRow(mode="deny")},
    )
    policy = table.lookup("miauth/abc/check")
    assert policy.mode is Mode.DENY
    assert policy.source == "override"


def test_override_leaves_other_rows():
    table = PolicyTable(
        {"meta": PolicyRow(mode="optional"), "i": PolicyRow(mode="required")},
        {"meta": PolicyRow(mode="deny")},
    )
    assert table.lookup("i").source == "default"


# Bundled table


@pytest.fixture(scope="module")
def bundled() -> PolicyTable:
    return load_policy_table()


@pytest.mark.parametrize(
    "endpoint",
    [
        "i/regenerate-token",
        "i/revoke-token",
        "i/change-password",
        "i/delete-account",
        "i/2fa/done",
        "i/apps",
        "miauth/gen-token",
        "auth/accept",
        "admin/emoji/import-zip",
        "signup",
        "signup-pending",
        "signin-flow",
        "signin-with-passkey",
    ],
)
def test_bundled_deny(bundled, endpoint):
    assert bundled.lookup(endpoint).mode is Mode.DENY


@pytest.mark.parametrize(
    ("endpoint", "kind"),
    [
        ("notes/create", "write:notes"),
        ("i", "read:account"),
        ("i/update", "write:account"),
        ("drive/files/create", "write:drive"),
        ("admin/meta", "read:admin:meta"),
        # Only requireModerator is set, and requireCredential is false.
        ("admin/roles/users", "read:admin:roles"),
        # requireAdmin.
        ("admin/accounts/delete", "write:admin:account"),
        # Declares no credential, but its handler demands an administrator.
        ("admin/accounts/create", "write:admin:account"),
    ],
)
def test_bundled_required(bundled, endpoint, kind):
    policy = bundled.lookup(endpoint)
    assert policy.mode is Mode.REQUIRED
    assert policy.kind == kind
    assert policy.source == "default"


@pytest.mark.parametrize(
    "endpoint",
    [
        "app/create",
        "auth/session/generate",
        "auth/session/show",
        "auth/session/userkey",
        "miauth/0123abcd/check",
        "miauth/x-y_z.~/check",
    ],
)
def test_bundled_none(bundled, endpoint):
    assert bundled.lookup(endpoint).mode is Mode.NONE


@pytest.mark.parametrize("endpoint", ["meta", "notes/local-timeline", "emojis"])
def test_bundled_optional(bundled, endpoint):
    policy = bundled.lookup(endpoint)
    assert policy.mode is Mode.OPTIONAL
    assert policy.kind is None


@pytest.mark.parametrize("endpoint", ALLOW_GET_ENDPOINTS)
def test_bundled_allow_get(bundled, endpoint):
    assert bundled.lookup(endpoint).allow_get is True


def test_bundled_allow_get_complete(bundled):
    allowed = {name for name in bundled.names() if bundled.lookup(name).allow_get}
    assert allowed == {*ALLOW_GET_ENDPOINTS, "v1/instance/peers"}


@pytest.mark.parametrize("endpoint", ["notes/create", "i", "meta"])
def test_bundled_no_allow_get(bundled, endpoint):
    assert bundled.lookup(endpoint).allow_get is False


def test_bundled_version(bundled):
    assert bundled.misskey_version
    assert bundled.misskey_version in POLICY_FILE.read_text(encoding="utf-8")


def test_bundled_matches_config_file(bundled):
    from_file = load_policy_table(POLICY_FILE)
    assert from_file.names() == bundled.names()
    for name in bundled.names():
        assert from_file.lookup(name) == bundled.lookup(name)


def test_bundled_with_overrides():
    table = load_policy_table(overrides={"meta": PolicyRow(mode="deny")})
    assert table.lookup("meta").mode is Mode.DENY
    assert table.lookup("meta").source == "override"


# parse_policy_document


def test_parse_document():
    rows, version = parse_policy_document(
        'misskey_version = "2024.1.0"\n'
        "[endpoints]\n"
        '"notes/create" = { mode = "required", kind = "write:notes" }\n'
        '"emojis" = { mode = "optional", allow_get = true }\n',
        "test table",
    )
    assert version == "2024.1.0"
    assert rows["notes/create"] == PolicyRow("required", "write:notes", False)
    assert rows["emojis"] == PolicyRow("optional", None, True)


@pytest.mark.parametrize("header", ["", "misskey_version = 5\n"])
def test_parse_document_version_missing(header):
    _, version = parse_policy_document(f"{header}[endpoints]\n", "test table")
    assert version == ""


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[endpoints\n", "invalid TOML"),
        ("misskey_version = '1'\n", "missing [endpoints]"),
        ("endpoints = 5\n", "missing [endpoints]"),
        ('[endpoints]\n"i" = "required"\n', "'i'"),
        ('[endpoints]\n"i" = { kind = "read:account" }\n', "needs a mode"),
        ('[endpoints]\n"i" = { mode = "allow" }\n', "needs a mode"),
        ('[endpoints]\n"i" = { mode = "required", kind = 5 }\n', "kind"),
        ('[endpoints]\n"i" = { mode = "required", allow_get = 1 }\n', "allow_get"),
    ],
)
def test_parse_document_invalid(text, fragment):
    with pytest.raises(ValueError) as excinfo:
        parse_policy_document(text, "test table")
    assert "test table" in str(excinfo.value)
    assert fragment in str(excinfo.value)


def test_load_table_from_path(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text('[endpoints]\n"meta" = { mode = "deny" }\n', encoding="utf-8")
    table = load_policy_table(path)
    assert table.names() == ["meta"]
    assert table.lookup("meta").mode is Mode.DENY


# Generator

TSV_COLUMNS = (
    "endpoint",
    "requireCredential",
    "kind",
    "allowGet",
    "secure",
    "requireModerator",
    "requireAdmin",
)


def write_tsv(path: Path, rows: list[tuple[str, ...]]) -> Path:
    lines = ["\t".join(TSV_COLUMNS), *("\t".join(row) for row in rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_generator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATOR), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )


SAMPLE_ROWS = [
    # endpoint, requireCredential, kind, allowGet, secure, moderator, admin
    ("notes/create", "true", "write:notes", "false", "false", "false", "false"),
    ("meta", "false", "", "false", "false", "false", "false"),
    ("emojis", "false", "", "true", "false", "false", "false"),
    ("charts/user/pv", "true", "read:account", "true", "false", "false", "false"),
    ("i/regenerate-token", "true", "", "false", "true", "false", "false"),
    ("secure/no-credential", "false", "", "false", "true", "false", "false"),
    (
        "admin/moderator-only",
        "false",
        "read:admin:x",
        "false",
        "false",
        "true",
        "false",
    ),
    ("admin/admin-only", "false", "write:admin:y", "false", "false", "false", "true"),
    ("app/create", "false", "", "false", "false", "false", "false"),
    ("auth/session/generate", "false", "", "false", "false", "false", "false"),
    ("auth/session/show", "false", "", "false", "false", "false", "false"),
    ("auth/session/userkey", "false", "", "false", "false", "false", "false"),
]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> str:
    tsv = write_tsv(tmp_path_factory.mktemp("generator") / "sample.tsv", SAMPLE_ROWS)
    result = run_generator(str(tsv), "9.9.9")
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def generated_rows(generated: str) -> dict[str, PolicyRow]:
    rows, version = parse_policy_document(generated, "generated table")
    assert version == "9.9.9"
    return rows


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("notes/create", PolicyRow("required", "write:notes", False)),
        ("meta", PolicyRow("optional", None, False)),
        ("emojis", PolicyRow("optional", None, True)),
        ("charts/user/pv", PolicyRow("required", "read:account", True)),
        ("i/regenerate-token", PolicyRow("deny", None, False)),
        ("secure/no-credential", PolicyRow("deny", None, False)),
        ("admin/moderator-only", PolicyRow("required", "read:admin:x", False)),
        ("admin/admin-only", PolicyRow("required", "write:admin:y", False)),
        ("app/create", PolicyRow("none", None, False)),
        ("auth/session/generate", PolicyRow("none", None, False)),
        ("auth/session/show", PolicyRow("none", None, False)),
        ("auth/session/userkey", PolicyRow("none", None, False)),
        ("miauth/*/check", PolicyRow("none", None, False)),
        ("signup", PolicyRow("deny", None, False)),
        ("signup-pending", PolicyRow("deny", None, False)),
        ("signin-flow", PolicyRow("deny", None, False)),
        ("signin-with-passkey", PolicyRow("deny", None, False)),
        ("v1/instance/peers", PolicyRow("optional", None, True)),
    ],
)
def test_generator_classification(generated_rows, endpoint, expected):
    assert generated_rows[endpoint] == expected


def test_generator_row_count(generated_rows):
    assert len(generated_rows) == len(SAMPLE_ROWS) + 6


def test_generator_sorted(generated):
    names = [
        line.split('"')[1] for line in generated.splitlines() if line.startswith('"')
    ]
    assert names == sorted(names)


@pytest.mark.parametrize(
    "line",
    [
        'misskey_version = "9.9.9"',
        "[endpoints]",
        '"notes/create" = { mode = "required", kind = "write:notes" }',
        '"meta" = { mode = "optional" }',
        '"charts/user/pv" = { mode = "required", kind = "read:account", '
        "allow_get = true }",
    ],
)
def test_generator_line_format(generated, line):
    assert line in generated.splitlines()


def test_generator_trailing_newline(generated):
    assert generated.endswith("}\n")
    assert not generated.endswith("\n\n")


def test_generator_extra_row_in_input(tmp_path):
    tsv = write_tsv(
        tmp_path / "dup.tsv",
        [("signup", "false", "", "false", "false", "false", "false")],
    )
    result = run_generator(str(tsv), "9.9.9")
    assert result.returncode != 0
    assert "signup" in result.stderr


def test_generator_non_ascii_kind(tmp_path):
    tsv = write_tsv(
        tmp_path / "bad.tsv",
        [("notes/create", "true", "write:nötes", "false", "false", "false", "false")],
    )
    result = run_generator(str(tsv), "9.9.9")
    assert result.returncode != 0
    assert result.stdout == ""


@pytest.mark.parametrize("args", [(), ("only-one.tsv",), ("a.tsv", "1", "extra")])
def test_generator_usage(args):
    result = run_generator(*args)
    assert result.returncode == 2
    assert "Usage:" in result.stderr


def test_generator_reproduces_bundled_table():
    if not ENDPOINTS_TSV.is_file():
        pytest.skip(f"Misskey endpoint metadata not found at {ENDPOINTS_TSV}")
    expected = POLICY_FILE.read_bytes()
    _, version = parse_policy_document(expected.decode("utf-8"), str(POLICY_FILE))
    result = subprocess.run(
        [sys.executable, str(GENERATOR), str(ENDPOINTS_TSV), version],
        capture_output=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == expected
