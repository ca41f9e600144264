"""A policy table built from the upstream's GET /api.json."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from gateway.policy import load_policy_table
from gateway.policy_sync import compare, rows_from_openapi

DOCUMENT = {
    "info": {"version": "2099.1.0"},
    "paths": {
        "/notes/create": {
            "post": {
                "description": "Post a note.\n\n**Credential required**: *Yes* / "
                "**Permission**: *write:notes*",
                "security": [{"bearerAuth": []}],
            }
        },
        "/charts/users": {
            "get": {"description": "**Credential required**: *No*"},
            "post": {"description": "**Credential required**: *No*"},
        },
        "/i/regenerate-token": {
            "post": {
                "description": "**Internal Endpoint**: This endpoint is an API for "
                "the misskey mainframe.\n**Credential required**: *Yes*",
                "security": [{"bearerAuth": []}],
            }
        },
        "/admin/roles/users": {
            "post": {"description": "**Credential required**: *No*"}
        },
        "/app/create": {"post": {"description": "**Credential required**: *No*"}},
        "/brand-new/endpoint": {
            "post": {
                "description": "**Credential required**: *Yes* / **Permission**: "
                "*write:new-things*"
            }
        },
        "/../escape": {"post": {"description": ""}},
    },
}


def test_rows_from_openapi():
    rows, version = rows_from_openapi(DOCUMENT)

    assert version == "2099.1.0"
    assert rows["notes/create"].mode == "required"
    assert rows["notes/create"].kind == "write:notes"
    assert rows["charts/users"].mode == "optional"
    assert rows["charts/users"].allow_get is True
    assert rows["i/regenerate-token"].mode == "deny"
    assert rows["admin/roles/users"].mode == "required"
    assert rows["app/create"].mode == "none"
    assert rows["brand-new/endpoint"].kind == "write:new-things"
    assert rows["miauth/*/check"].mode == "none"
    assert "../escape" not in rows


def test_rows_from_bundled_generator_agree():
    """The sync and the generator classify the same facts the same way."""
    rows, _ = rows_from_openapi(DOCUMENT)
    bundled = load_policy_table()

    for name in (
        "notes/create",
        "i/regenerate-token",
        "app/create",
        "admin/roles/users",
    ):
        assert bundled.lookup(name).mode.value == rows[name].mode, name


def test_compare_reports_differences():
    rows, _ = rows_from_openapi(DOCUMENT)
    difference = compare(load_policy_table(), rows)

    assert "brand-new/endpoint" in difference.missing_from_table
    assert "meta" in difference.missing_upstream
    assert "notes/create" not in difference.changed


async def run_cli(env, *args):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, stdout.decode(), stderr.decode()


async def test_cli_sync_writes_loadable_table(upstream_server, fake_misskey, tmp_path):
    fake_misskey.openapi_extra_paths["/brand-new/endpoint"] = {
        "post": {
            "description": "**Credential required**: *Yes* / **Permission**: *write:x*"
        }
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("MISSKEY_GATEWAY_")}
    env["MISSKEY_GATEWAY_STORE_URL"] = f"sqlite:///{tmp_path / 'store.db'}"
    output = tmp_path / "policy.toml"
    upstream = str(upstream_server.make_url("")).rstrip("/")
    code, _, stderr = await run_cli(
        env, "policy", "sync", "--upstream", upstream, "--output", str(output)
    )
    table = load_policy_table(output)

    assert code == 0, stderr
    assert "not in the current table" in stderr
    assert table.misskey_version == "2026.5.4"
    assert table.lookup("brand-new/endpoint").kind == "write:x"
    assert table.lookup("notes/create").mode.value == "required"
    assert table.lookup("i/regenerate-token").mode.value == "deny"
    assert table.lookup("emojis").allow_get is True

    env["MISSKEY_GATEWAY_POLICY_FILE"] = str(output)
    code, stdout, _ = await run_cli(env, "policy", "show", "brand-new/endpoint")
    assert code == 0
    assert "source:    default" in stdout


async def test_startup_logs_difference(log_output, start_gateway):
    gateway = await start_gateway(**{"policy.check_upstream": True})
    for _ in range(100):
        events = [json.loads(line) for line in log_output.getvalue().splitlines()]
        found = [e for e in events if e["event"].startswith("policy.")]
        if found:
            break
        await asyncio.sleep(0.02)

    assert len(found) == 1
    event = found[0]
    assert event["event"] == "policy.differs_from_upstream"
    assert event["misskey_version"] == "2026.5.4"
    assert event["missing_upstream_count"] > 400
    assert gateway.fake.received == []
