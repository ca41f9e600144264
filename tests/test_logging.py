"""One JSON event per request, and never a credential in the logs."""

from __future__ import annotations

import json
import time

from gateway.logs import Timestamps
from tests.conftest import JWT_SECRET

STORED = "misskey-token-alice"


def events(log_output) -> list[dict]:
    return [json.loads(line) for line in log_output.getvalue().splitlines() if line]


async def test_one_event_per_request(log_output, gateway):
    await gateway.client.post("/api/i", json={}, headers=gateway.bearer())
    logged = [e for e in events(log_output) if e["event"] == "request"]

    assert len(logged) == 1
    event = logged[0]
    assert event["principal"] == "alice"
    assert event["endpoint"] == "i"
    assert event["mode"] == "required"
    assert event["status"] == 200
    assert event["upstream_status"] == 200
    assert event["token_injected"] is True
    assert event["level"] == "info"
    for name in ("request_id", "duration_ms", "upstream_ms", "store_ms", "timestamp"):
        assert name in event, name


async def test_error_event_has_code(log_output, gateway):
    await gateway.client.post("/api/i", json={})
    event = [e for e in events(log_output) if e["event"] == "request"][0]

    assert event["status"] == 401
    assert event["error"] == "CREDENTIAL_REQUIRED"
    assert event["principal"] is None


async def test_no_credential_in_logs(log_output, gateway):
    jwt = gateway.jwt()
    bad_jwt = jwt[:-4] + "AAAA"
    requests = [
        ("/api/i", {}, {"Authorization": f"Bearer {jwt}"}),
        ("/api/i", {"i": jwt}, {}),
        ("/api/i", {}, {"Authorization": f"Bearer {bad_jwt}"}),
        ("/api/i", {"i": STORED}, {}),
        ("/api/meta", {"i": jwt, "x": 1}, {"Authorization": f"Bearer {jwt}"}),
        ("/api/i/regenerate-token", {"i": jwt}, {}),
        ("/api/some/unknown", {"i": jwt}, {}),
    ]
    for path, body, headers in requests:
        await gateway.client.post(path, json=body, headers=headers)
    await gateway.client.get(f"/api/emojis?i={jwt}")
    text = log_output.getvalue()

    assert len(events(log_output)) >= len(requests) + 1
    for secret in (jwt, bad_jwt, STORED, JWT_SECRET, jwt.split(".")[2]):
        assert secret not in text


async def test_secret_fields_redacted(log_output):
    import structlog

    structlog.get_logger("test").info("probe", token="abc", secret="def", kept="ghi")
    event = events(log_output)[-1]

    assert event["token"] == "[redacted]"
    assert event["secret"] == "[redacted]"
    assert event["kept"] == "ghi"


def test_timestamps_in_utc_milliseconds(monkeypatch):
    clock = iter([1796425200.0004, 1796425200.0009, 1796425200.9996, 1796425261.25])
    monkeypatch.setattr(time, "time", lambda: next(clock))
    timestamps = Timestamps()

    assert [timestamps.now() for _ in range(4)] == [
        "2026-12-04T23:00:00.000Z",
        "2026-12-04T23:00:00.000Z",
        "2026-12-04T23:00:00.999Z",
        "2026-12-04T23:01:01.250Z",
    ]


async def test_durations_have_three_decimals(log_output, gateway):
    await gateway.client.post("/api/i", json={}, headers=gateway.bearer())
    event = [e for e in events(log_output) if e["event"] == "request"][0]

    for name in ("duration_ms", "upstream_ms", "upstream_headers_ms", "store_ms"):
        assert round(event[name], 3) == event[name], name
