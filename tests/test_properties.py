"""Generated requests: JSON bodies survive the rewrite, and nothing makes a 500.

Hypothesis drives the running gateway from a worker thread, because its test
functions are synchronous while the gateway and the fake Misskey run in the
test's event loop. ``FUZZ_EXAMPLES`` sets how many requests the fuzz test
sends (default 300; the figures in docs/hardening.md come from 10,000).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.http_raw import send_raw
from tests.strategies import json_values

STORED = "misskey-token-alice"
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))

pytestmark = pytest.mark.parametrize("store_backend", ["sqlite"], indirect=True)

json_objects = st.dictionaries(st.text(max_size=10), json_values(), max_size=8)


def run_in_loop(
    loop: asyncio.AbstractEventLoop, make: Callable[[], Awaitable[Any]]
) -> Any:
    return asyncio.run_coroutine_threadsafe(make(), loop).result(timeout=30)


async def test_json_object_survives_rewrite(gateway):
    loop = asyncio.get_running_loop()
    headers = {**gateway.bearer(), "Content-Type": "application/json"}

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(document=json_objects, credential_in_body=st.booleans())
    def check(document: dict[str, Any], credential_in_body: bool) -> None:
        document.pop("i", None)
        sent = dict(document)
        request_headers = dict(headers)
        if credential_in_body:
            sent["i"] = request_headers.pop("Authorization").removeprefix("Bearer ")
        body = json.dumps(sent).encode()
        before = len(gateway.fake.received)

        async def post() -> int:
            response = await gateway.client.post(
                "/api/notes/show", data=body, headers=request_headers
            )
            await response.read()
            return response.status

        status = run_in_loop(loop, post)
        assert status == 200
        received = gateway.fake.received[before]
        assert json.loads(received.body) == {**document, "i": STORED}
        assert int(received.headers["Content-Length"]) == len(received.body)

    await asyncio.to_thread(check)


paths = st.one_of(
    st.sampled_from(
        [
            "/api/i",
            "/api/notes/create",
            "/api/meta",
            "/api/emojis",
            "/api/i/regenerate-token",
            "/api/drive/files/create",
            "/api/miauth/abc/check",
            "/streaming",
            "/_gateway/healthz",
        ]
    ),
    st.builds(
        lambda parts: "/api/" + "/".join(parts),
        st.lists(
            st.sampled_from(
                ["notes", "create", "..", ".", "", "%2F", "%2e", "i", "a;b", "ü", "%00"]
            ),
            min_size=1,
            max_size=4,
        ),
    ),
)
queries = st.sampled_from(["", "?i=x", "?a=1&i=", "?i=1&i=2", "?x=%zz", "?endpoint=i"])
content_types = st.sampled_from(
    [
        None,
        "application/json",
        "text/plain",
        "multipart/form-data; boundary=b",
        "multipart/form-data",
        "application/x-www-form-urlencoded",
        "application/json; charset=latin-1",
    ]
)
bodies = st.one_of(
    json_objects.map(lambda value: json.dumps(value).encode()),
    st.builds(
        lambda value: json.dumps({"i": value, "text": "x"}).encode(),
        json_values(),
    ),
    st.binary(max_size=200),
    st.just(b'--b\r\nContent-Disposition: form-data; name="i"\r\n\r\nx\r\n--b--\r\n'),
)


async def test_generated_requests_never_500(gateway):
    loop = asyncio.get_running_loop()
    server = gateway.client.server
    good = gateway.jwt()
    authorizations = st.sampled_from(
        [
            None,
            f"Bearer {good}",
            "Bearer",
            "Bearer x.y.z",
            "Basic YTpi",
            f"bearer {good}",
        ]
    )
    statuses: dict[int, int] = {}

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
        ],
    )
    @given(
        method=st.sampled_from(["POST", "GET", "PUT", "OPTIONS", "HEAD", "DELETE"]),
        path=paths,
        query=queries,
        content_type=content_types,
        authorization=authorizations,
        body=bodies,
        chunked=st.booleans(),
    )
    def check(method, path, query, content_type, authorization, body, chunked) -> None:
        lines = [
            f"{method} {path}{query} HTTP/1.1",
            "Host: gateway.test",
            "Connection: close",
        ]
        if content_type is not None:
            lines.append(f"Content-Type: {content_type}")
        if authorization is not None:
            lines.append(f"Authorization: {authorization}")
        if chunked:
            lines.append("Transfer-Encoding: chunked")
            payload = (
                f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
                if body
                else b"0\r\n\r\n"
            )
        else:
            lines.append(f"Content-Length: {len(body)}")
            payload = body
        raw = "\r\n".join(lines).encode("utf-8") + b"\r\n\r\n" + payload

        response = run_in_loop(loop, lambda: send_raw(server.host, server.port, raw))
        statuses[response.status] = statuses.get(response.status, 0) + 1
        assert response.status != 500, (method, path, query, content_type, body[:80])

    await asyncio.to_thread(check)

    # Whatever was sent, no request reached the upstream carrying the
    # gateway's credential, and every token sent upstream was the stored one.
    for received in gateway.fake.received:
        assert good not in received.body.decode("utf-8", "replace")
        assert received.token in (None, STORED)
    counts = dict(sorted(statuses.items()))
    print(f"\nstatuses over {sum(statuses.values())} requests: {counts}")
