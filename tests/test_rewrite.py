"""Rewriting of the ``i`` field in JSON bodies and query strings.

The rewritten body must be the client's bytes with only the top-level ``i``
member cut out, and the injected member placed right after the opening brace.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidRequest
from gateway.rewrite import (
    _scan_object,
    parse_json_body,
    rewrite_json_body,
    strip_query_credential,
)
from tests.strategies import json_values

TOKEN = "misskey-token-0123"  # noqa: S105


def rewrite(body: bytes, token: str | None) -> bytes:
    return rewrite_json_body(parse_json_body(body), token)


def expected_object(body: bytes, token: str | None) -> dict[str, object]:
    """Return what ``json.loads`` must read from the rewritten body."""
    value = json.loads(body) if body.strip() else {}
    value.pop("i", None)
    if token is not None:
        value = {"i": token, **value}
    return value


# (input, output without a token, output with TOKEN injected)
CASES = [
    pytest.param(
        b'{"i":"old","a":1}',
        b'{"a":1}',
        b'{"i":"misskey-token-0123","a":1}',
        id="first",
    ),
    pytest.param(
        b'{"a":1,"i":"old","b":2}',
        b'{"a":1,"b":2}',
        b'{"i":"misskey-token-0123","a":1,"b":2}',
        id="middle",
    ),
    pytest.param(
        b'{"a":1,"i":"old"}',
        b'{"a":1}',
        b'{"i":"misskey-token-0123","a":1}',
        id="last",
    ),
    pytest.param(
        b'{"i":"old"}',
        b"{}",
        b'{"i":"misskey-token-0123"}',
        id="only",
    ),
    pytest.param(
        b'{"a":1}',
        b'{"a":1}',
        b'{"i":"misskey-token-0123","a":1}',
        id="absent",
    ),
    pytest.param(b"{}", b"{}", b'{"i":"misskey-token-0123"}', id="empty-object"),
    pytest.param(b"", b"{}", b'{"i":"misskey-token-0123"}', id="empty-body"),
    pytest.param(
        b" \r\n\t ", b"{}", b'{"i":"misskey-token-0123"}', id="whitespace-body"
    ),
    pytest.param(
        b' { "i" : "old" , "a" : 1 } ',
        b' { "a" : 1 } ',
        b' {"i":"misskey-token-0123", "a" : 1 } ',
        id="spaces",
    ),
    pytest.param(
        b'{\n  "a": 1,\n  "i": "old",\n  "b": [\n    2\n  ]\n}\n',
        b'{\n  "a": 1,\n  "b": [\n    2\n  ]\n}\n',
        b'{"i":"misskey-token-0123",\n  "a": 1,\n  "b": [\n    2\n  ]\n}\n',
        id="pretty-middle",
    ),
    pytest.param(
        b'{\n  "i": "old",\n  "a": 1\n}',
        b'{\n  "a": 1\n}',
        b'{"i":"misskey-token-0123",\n  "a": 1\n}',
        id="pretty-first",
    ),
    pytest.param(
        b'{\n  "a": 1,\n  "i": "old"\n}',
        b'{\n  "a": 1\n}',
        b'{"i":"misskey-token-0123",\n  "a": 1\n}',
        id="pretty-last",
    ),
    pytest.param(
        b'{\n  "i": "old"\n}',
        b"{\n  \n}",
        b'{"i":"misskey-token-0123"\n  \n}',
        id="pretty-only",
    ),
    pytest.param(
        '{"text":"こんにちは 🎉 Grüße","i":"old"}'.encode(),
        '{"text":"こんにちは 🎉 Grüße"}'.encode(),
        '{"i":"misskey-token-0123","text":"こんにちは 🎉 Grüße"}'.encode(),
        id="unicode-raw",
    ),
    pytest.param(
        b'{"text":"\\u3053\\ud83c\\udf89\\n\\"","i":"old"}',
        b'{"text":"\\u3053\\ud83c\\udf89\\n\\""}',
        b'{"i":"misskey-token-0123","text":"\\u3053\\ud83c\\udf89\\n\\""}',
        id="unicode-escaped",
    ),
    pytest.param(
        '{"\\u00e9t\\u00e9":1,"été":2,"i":"old"}'.encode(),
        '{"\\u00e9t\\u00e9":1,"été":2}'.encode(),
        '{"i":"misskey-token-0123","\\u00e9t\\u00e9":1,"été":2}'.encode(),
        id="unicode-keys",
    ),
    pytest.param(
        b'{"a":{"i":"nested","b":[{"i":2}]},"i":"old","c":{"i":null}}',
        b'{"a":{"i":"nested","b":[{"i":2}]},"c":{"i":null}}',
        b'{"i":"misskey-token-0123","a":{"i":"nested","b":[{"i":2}]},"c":{"i":null}}',
        id="nested-i",
    ),
    pytest.param(
        b'{"a":{"i":"nested"},"b":["i",{"i":1}]}',
        b'{"a":{"i":"nested"},"b":["i",{"i":1}]}',
        b'{"i":"misskey-token-0123","a":{"i":"nested"},"b":["i",{"i":1}]}',
        id="nested-i-only",
    ),
    pytest.param(
        b'{"n":1208925819614629174706176,"i":"old","m":-1208925819614629174706176}',
        b'{"n":1208925819614629174706176,"m":-1208925819614629174706176}',
        b'{"i":"misskey-token-0123","n":1208925819614629174706176,'
        b'"m":-1208925819614629174706176}',
        id="large-integer",
    ),
    pytest.param(
        b'{"f":1.0e10,"z":-0.0,"e":1E+2,"i":"old","g":0.10000000000000000001}',
        b'{"f":1.0e10,"z":-0.0,"e":1E+2,"g":0.10000000000000000001}',
        b'{"i":"misskey-token-0123","f":1.0e10,"z":-0.0,"e":1E+2,'
        b'"g":0.10000000000000000001}',
        id="floats",
    ),
    pytest.param(
        b'{"z":1,"a":2,"i":"old","m":3,"b":4}',
        b'{"z":1,"a":2,"m":3,"b":4}',
        b'{"i":"misskey-token-0123","z":1,"a":2,"m":3,"b":4}',
        id="key-order",
    ),
    pytest.param(
        b'{"\\u0069":"old","a":1}',
        b'{"a":1}',
        b'{"i":"misskey-token-0123","a":1}',
        id="escaped-key",
    ),
    pytest.param(
        b'{"a":1,"\\u0069":"old"}',
        b'{"a":1}',
        b'{"i":"misskey-token-0123","a":1}',
        id="escaped-key-last",
    ),
    pytest.param(
        b'{"a":1,"a":2,"i":"old","a":3}',
        b'{"a":1,"a":2,"a":3}',
        b'{"i":"misskey-token-0123","a":1,"a":2,"a":3}',
        id="duplicate-other-keys",
    ),
    pytest.param(
        b'{"i":{"nested":["x"]},"a":true,"b":null,"c":false}',
        b'{"a":true,"b":null,"c":false}',
        b'{"i":"misskey-token-0123","a":true,"b":null,"c":false}',
        id="object-credential",
    ),
    pytest.param(
        b'{"ii":1,"I":2,"i ":3,"":4}',
        b'{"ii":1,"I":2,"i ":3,"":4}',
        b'{"i":"misskey-token-0123","ii":1,"I":2,"i ":3,"":4}',
        id="similar-keys",
    ),
]


@pytest.mark.parametrize(("body", "stripped", "injected"), CASES)
def test_rewrite_strip_bytes(body, stripped, injected):
    assert rewrite(body, None) == stripped


@pytest.mark.parametrize(("body", "stripped", "injected"), CASES)
def test_rewrite_inject_bytes(body, stripped, injected):
    assert rewrite(body, TOKEN) == injected


@pytest.mark.parametrize(("body", "stripped", "injected"), CASES)
def test_rewrite_strip_json(body, stripped, injected):
    assert json.loads(rewrite(body, None)) == expected_object(body, None)


@pytest.mark.parametrize(("body", "stripped", "injected"), CASES)
def test_rewrite_inject_json(body, stripped, injected):
    output = json.loads(rewrite(body, TOKEN))
    assert output == expected_object(body, TOKEN)
    assert list(output) == list(expected_object(body, TOKEN))


def test_rewrite_token_escaped():
    output = rewrite(b'{"a":1}', 'to"k\\en')
    assert output == b'{"i":"to\\"k\\\\en","a":1}'
    assert json.loads(output)["i"] == 'to"k\\en'


# parse_json_body


@pytest.mark.parametrize(
    ("body", "credential"),
    [
        (b'{"i":"old"}', "old"),
        (b'{"\\u0069":"old"}', "old"),
        (b'{"a":1,"i":123}', 123),
        (b'{"i":null}', None),
        (b'{"i":["x"]}', ["x"]),
    ],
)
def test_parse_credential_value(body, credential):
    parsed = parse_json_body(body)
    assert parsed.has_credential_field
    assert parsed.credential == credential


@pytest.mark.parametrize("body", [b"", b"{}", b'{"a":{"i":"nested"}}', b'{"ii":1}'])
def test_parse_no_credential_field(body):
    parsed = parse_json_body(body)
    assert not parsed.has_credential_field
    assert parsed.credential is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"i":"a","i":"b"}',
        b'{"i":"a","b":1,"\\u0069":"b"}',
        b'{"i":"a","i":"a"}',
        b'{"i":null,"i":null}',
    ],
)
def test_parse_duplicate_credential(body):
    with pytest.raises(InvalidRequest) as excinfo:
        parse_json_body(body)
    assert excinfo.value.status == 400
    assert "more than one" in excinfo.value.message


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"a":"\xff"}', id="invalid-byte"),
        pytest.param(b'{"a":"\xc3"}', id="truncated-sequence"),
        pytest.param(b'{"a":"\xed\xa0\x80"}', id="encoded-surrogate"),
        pytest.param(b"\xef\xbb\xbf{}", id="bom"),
        pytest.param(b"\xef\xbb\xbf", id="bom-only"),
        pytest.param(b"\xff\xfe{\x00}\x00", id="utf-16"),
        pytest.param(b'{"a":NaN}', id="nan"),
        pytest.param(b'{"a":Infinity}', id="infinity"),
        pytest.param(b'{"a":-Infinity}', id="negative-infinity"),
        pytest.param(b'{"a":[1,NaN]}', id="nested-nan"),
        pytest.param(b"NaN", id="top-level-nan"),
        pytest.param(b'{"a":1}x', id="trailing-text"),
        pytest.param(b'{"a":1}{}', id="trailing-object"),
        pytest.param(b'{"a":1} 2', id="trailing-number"),
        pytest.param(b'{"a":1}\x00', id="trailing-nul"),
        pytest.param(b'{"a":1,}', id="trailing-comma"),
        pytest.param(b'{"a":[1,]}', id="trailing-comma-array"),
        pytest.param(b'{,"a":1}', id="leading-comma"),
        pytest.param(b'{"a":1,,"b":2}', id="double-comma"),
        pytest.param(b'{"a" 1}', id="missing-colon"),
        pytest.param(b'{"a":}', id="missing-value"),
        pytest.param(b'{"a":1 "b":2}', id="missing-comma"),
        pytest.param(b"{a:1}", id="unquoted-key"),
        pytest.param(b"{'a':1}", id="single-quotes"),
        pytest.param(b'{"a":1', id="unterminated-object"),
        pytest.param(b"{", id="open-brace"),
        pytest.param(b"}", id="close-brace"),
        pytest.param(b'{"a":"abc', id="unterminated-string"),
        pytest.param(b'{"ab', id="unterminated-key"),
        pytest.param(b'{"a":"x\ny"}', id="raw-newline"),
        pytest.param(b'{"a\tb":1}', id="raw-tab-in-key"),
        pytest.param(b'{"a":"\\x41"}', id="invalid-escape"),
        pytest.param(b'{"a":01}', id="leading-zero"),
        pytest.param(b'{"a":+1}', id="plus-sign"),
        pytest.param(b'{"a":.5}', id="bare-fraction"),
        pytest.param(b'{"a":tru}', id="bad-literal"),
        pytest.param(b'{"a":1}\x0c', id="form-feed"),
        pytest.param(b'\xc2\xa0{"a":1}', id="nbsp"),
        pytest.param(b'{"a":' + b"[" * 100000, id="deep-array"),
        pytest.param(b'{"a":' + b'{"b":' * 100000, id="deep-object"),
        pytest.param(b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}", id="deep-closed"),
        pytest.param(b"[" * 100000, id="deep-top-level"),
    ],
)
def test_parse_invalid(body):
    with pytest.raises(InvalidRequest) as excinfo:
        parse_json_body(body)
    assert excinfo.value.status == 400


@pytest.mark.parametrize(
    "body",
    [b"[]", b'[{"i":"x"}]', b'"i"', b"1", b"-0.5", b"null", b"true", b" [1] "],
)
def test_parse_not_object(body):
    with pytest.raises(InvalidRequest) as excinfo:
        parse_json_body(body)
    assert excinfo.value.status == 400
    assert "must be a JSON object" in excinfo.value.message


def test_parse_invalid_utf8_message():
    with pytest.raises(InvalidRequest) as excinfo:
        parse_json_body(b'{"a":"\xff"}')
    assert "UTF-8" in excinfo.value.message


def test_parse_invalid_reports_position():
    with pytest.raises(InvalidRequest) as excinfo:
        parse_json_body(b'{"a":1,}')
    assert excinfo.value.info is not None
    assert excinfo.value.info["position"] == 7


# strip_query_credential


@pytest.mark.parametrize(
    ("query", "kept", "credential"),
    [
        ("", "", None),
        ("i=tok", "", "tok"),
        ("a=1", "a=1", None),
        ("i=tok&a=1", "a=1", "tok"),
        ("a=1&i=tok", "a=1", "tok"),
        ("a=1&i=tok&b=2", "a=1&b=2", "tok"),
        ("a=%2F%20x&i=tok&b=c+d", "a=%2F%20x&b=c+d", "tok"),
        ("q=%E3%81%82&b=%zz&c", "q=%E3%81%82&b=%zz&c", None),
        ("a=1&&b=2&i=tok", "a=1&&b=2", "tok"),
        ("a=x=y&i=t=k", "a=x=y", "t=k"),
        ("i=a%2Bb%20c+d", "", "a+b c d"),
        ("i=%E3%81%82", "", "あ"),
        ("i=", "", ""),
        ("i", "", ""),
        ("%69=tok&a=1", "a=1", "tok"),
        ("%69", "", ""),
        ("ii=1&xi=2&I=3&i%20=4&i+=5", "ii=1&xi=2&I=3&i%20=4&i+=5", None),
        ("a[i]=1&i.x=2", "a[i]=1&i.x=2", None),
    ],
)
def test_query_strip(query, kept, credential):
    result = strip_query_credential(query)
    assert result.query == kept
    assert result.credential == credential


@pytest.mark.parametrize("query", ["i=1&i=2", "i=1&a=2&%69=3", "i&i", "i=x&i=x"])
def test_query_duplicate_credential(query):
    with pytest.raises(InvalidRequest) as excinfo:
        strip_query_credential(query)
    assert excinfo.value.status == 400


# The orjson check of bodies without an ``i`` member against the scanner

spacing = st.sampled_from(["", " ", "\n", "\t ", "\r\n  "])


@settings(max_examples=300, deadline=None)
@given(
    document=st.dictionaries(
        st.text(max_size=6), json_values(text_size=20, leaves=15), max_size=6
    ),
    before=spacing,
    after=spacing,
    ascii_only=st.booleans(),
    token=st.none() | st.just(TOKEN),
)
def test_quick_check_matches_scanner(document, before, after, ascii_only, token):
    text = before + json.dumps(document, ensure_ascii=ascii_only) + after
    body = text.encode()

    scanned = rewrite_json_body(_scan_object(text), token)

    assert rewrite(body, token) == scanned


@pytest.mark.parametrize(
    "body",
    [
        b'{"a":1,"a":2}',
        b'{"n":18446744073709551616}',
        b'{"n":1e400}',
        b"\xef\xbb\xbf{}",
        b'{"a":[' + b"[" * 300 + b"]" * 300 + b"]}",
        b'{"a":NaN}',
        b'{"a":1}x',
    ],
)
def test_quick_check_edge_bodies(body):
    try:
        expected: bytes | str = rewrite_json_body(_scan_object(body.decode()), TOKEN)
    except (InvalidRequest, UnicodeDecodeError, RecursionError) as error:
        expected = type(error).__name__
    try:
        actual: bytes | str = rewrite(body, TOKEN)
    except InvalidRequest as error:
        actual = type(error).__name__

    assert actual == expected
