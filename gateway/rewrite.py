"""Request rewriting: the ``i`` field of JSON bodies and of query strings.

The body is never re-serialised. The gateway scans the top level of the JSON
object, cuts out the ``i`` member and, when a token is injected, writes a new
``"i"`` member right after the opening brace. Every other byte is forwarded as
the client sent it: key order, whitespace, escapes, number spellings and
duplicate keys included.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any
from urllib.parse import unquote_plus

import orjson

from gateway.errors import InvalidRequest

CREDENTIAL_FIELD = "i"
_WHITESPACE = re.compile(r"[ \t\n\r]*")
# Bodies with more opening brackets than this are left to the scanner, which
# decides whether they are nested too deeply; orjson's own limit is higher.
MAX_QUICK_BRACKETS = 256


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON and Misskey do not.
    raise ValueError(f"{name} is not valid JSON")


_scan_value = json.JSONDecoder(parse_constant=_reject_constant).scan_once  # type: ignore[attr-defined]


@dataclass(slots=True)
class JsonBody:
    """A JSON object body and the position of each top-level member.

    ``members`` contains the ``(start, end)`` character offsets of every top-level
    member in ``text``; ``credential_member`` is the index of the ``i`` member.
    A body known to have no ``i`` member may leave ``members`` empty and give
    only ``member_count``; it then keeps the body as received in ``raw``, and
    ``text`` and ``open_brace`` are left empty and 0 (a ``raw`` body needs no
    decoding, as only its leading whitespace is looked at).
    """

    text: str
    open_brace: int
    members: list[tuple[int, int]] = field(default_factory=list)
    credential_member: int | None = None
    credential: Any = None
    member_count: int | None = None
    raw: bytes | None = None

    @property
    def has_credential_field(self) -> bool:
        return self.credential_member is not None


def parse_json_body(body: bytes) -> JsonBody:
    """Parse a request body that must be a JSON object; an empty body is ``{}``."""
    quick = _parse_without_credential(body)
    if quick is not None:
        return quick
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidRequest(
            "The request body is not valid UTF-8.", {"position": error.start}
        ) from None
    if not _WHITESPACE.fullmatch(text):
        try:
            return _scan_object(text)
        except RecursionError:
            raise InvalidRequest("The request body is nested too deeply.") from None
    return JsonBody(text="{}", open_brace=0)


def _parse_without_credential(body: bytes) -> JsonBody | None:
    """Return a body that has no ``i`` member, checked by orjson, else None.

    Without a backslash a key can only be spelled ``"i"`` literally, so a
    body without that sequence has no ``i`` member and needs no offsets.
    orjson accepts a subset of what the scanner accepts (it also rejects
    integers beyond 64 bits), and everything it rejects goes to the scanner,
    which gives the exact error.
    """
    if b'"i"' in body or b"\\" in body:
        return None
    if body.count(b"{") + body.count(b"[") > MAX_QUICK_BRACKETS:
        return None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    return JsonBody(text="", open_brace=0, member_count=len(document), raw=body)


def _scan_object(text: str) -> JsonBody:
    position = _skip(text, 0)
    if text[position] != "{":
        _raise_not_object(text)
    parsed = JsonBody(text=text, open_brace=position)
    position = _skip(text, position + 1)
    if text.startswith("}", position):
        return _expect_end(parsed, position + 1)

    while True:
        start = position
        if not text.startswith('"', position):
            _raise_invalid(text, position, "expected a property name")
        try:
            key, position = scanstring(text, position + 1, True)
        except ValueError as error:
            _raise_invalid(text, position, str(error))
        position = _skip(text, position)
        if not text.startswith(":", position):
            _raise_invalid(text, position, "expected ':'")
        position = _skip(text, position + 1)
        try:
            value, position = _scan_value(text, position)
        except StopIteration:
            _raise_invalid(text, position, "expected a value")
        except ValueError as error:
            _raise_invalid(text, position, str(error))

        if key == CREDENTIAL_FIELD:
            if parsed.credential_member is not None:
                raise InvalidRequest(
                    "The request body has more than one 'i' field.", {"param": "i"}
                )
            parsed.credential_member = len(parsed.members)
            parsed.credential = value
        parsed.members.append((start, position))

        position = _skip(text, position)
        if text.startswith(",", position):
            position = _skip(text, position + 1)
            continue
        if text.startswith("}", position):
            return _expect_end(parsed, position + 1)
        _raise_invalid(text, position, "expected ',' or '}'")


def _skip(text: str, position: int) -> int:
    match = _WHITESPACE.match(text, position)
    return match.end() if match else position


def _expect_end(parsed: JsonBody, position: int) -> JsonBody:
    position = _skip(parsed.text, position)
    if position != len(parsed.text):
        _raise_invalid(parsed.text, position, "unexpected data after the JSON object")
    return parsed


def _raise_not_object(text: str) -> None:
    try:
        json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise InvalidRequest("The request body is not valid JSON.") from None
    raise InvalidRequest("The request body must be a JSON object.")


def _raise_invalid(text: str, position: int, reason: str) -> Any:
    raise InvalidRequest(
        "The request body is not valid JSON.", {"position": position, "reason": reason}
    )


def rewrite_json_body(parsed: JsonBody, token: str | None) -> bytes:
    """Return the body with ``i`` removed, then set to ``token`` if given."""
    raw = parsed.raw
    if raw is not None:
        # No ``i`` member to remove: insert one after the opening brace, which
        # only JSON whitespace (ASCII) precedes.
        if token is None:
            return raw
        insert_at = len(raw) - len(raw.lstrip(b" \t\n\r")) + 1
        member = _credential_member(token) + ("," if parsed.member_count else "")
        return raw[:insert_at] + member.encode("utf-8") + raw[insert_at:]
    text = parsed.text
    members = parsed.members
    index = parsed.credential_member

    if index is not None:
        start, end = members[index]
        if index + 1 < len(members):
            # Cut up to the next member, taking the comma with it.
            end = members[index + 1][0]
        elif index > 0:
            # The last member: cut from the end of the previous one.
            start = members[index - 1][1]
        text = text[:start] + text[end:]
        remaining = len(members) - 1
    elif parsed.member_count is not None:
        remaining = parsed.member_count
    else:
        remaining = len(members)

    if token is not None:
        insert_at = parsed.open_brace + 1
        member = _credential_member(token) + ("," if remaining else "")
        text = text[:insert_at] + member + text[insert_at:]
    return text.encode("utf-8")


@functools.lru_cache(maxsize=256)
def _credential_member(token: str) -> str:
    """Return the ``"i"`` member that injects ``token``; a few tokens recur."""
    return f'"i":{json.dumps(token)}'


@dataclass(frozen=True)
class QueryRewrite:
    """A query string without its ``i`` parameters, and the ``i`` value found."""

    query: str
    credential: str | None


NO_QUERY = QueryRewrite("", None)


def strip_query_credential(query: str) -> QueryRewrite:
    """Remove every ``i`` parameter from a raw query string.

    The other parameters stay byte for byte as sent. More than one ``i``
    parameter is refused, because it would be ambiguous which one counts.
    """
    if not query:
        return NO_QUERY
    kept: list[str] = []
    credential: str | None = None
    seen = False
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if unquote_plus(name) == CREDENTIAL_FIELD:
            if seen:
                raise InvalidRequest(
                    "The query string has more than one 'i' parameter.", {"param": "i"}
                )
            seen = True
            credential = unquote_plus(value)
        else:
            kept.append(pair)
    return QueryRewrite("&".join(kept), credential)
