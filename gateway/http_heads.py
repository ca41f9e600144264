"""Recognising a repeated HTTP/1.1 message head without parsing it again.

Clients on a keep-alive connection send nearly the same request head with
every call, and an upstream responds with nearly the same response head:
often only Content-Length differs. A head whose bytes equal those of a head
parsed before, but for the Content-Length value, parses to the same result
but for that value. Both the gateway's server and its upstream client keep
such results (``gateway.server.ParsedHead``, ``gateway.upstream_pool.KnownHead``)
keyed by ``split_content_length``.
"""

from __future__ import annotations

# Starts of a Content-Length line, in the spellings senders use.
CONTENT_LENGTH_STARTS = (b"\r\nContent-Length:", b"\r\ncontent-length:")
# Longest Content-Length value taken without a full parse: 15 digits is far
# above any body the gateway accepts or relays.
MAX_LENGTH_DIGITS = 15


def split_content_length(head: bytes) -> tuple[bytes, bytes, int] | None:
    """Return ``head`` without a Content-Length value, and that value.

    The line is the first one spelled ``Content-Length``, or if there is
    none, the first spelled ``content-length``. Heads with two such lines
    never reach a key, because the full parse rejects them.
    The value is returned without surrounding spaces and tabs, followed by
    the offset at which it starts, so ``head[:offset]`` is the part of the
    head up to the value. Returns None when the head has no Content-Length
    line in one of the usual spellings.
    """
    for start in CONTENT_LENGTH_STARTS:
        found = head.find(start)
        if found >= 0:
            value_start = found + len(start)
            value_end = head.find(b"\r\n", value_start)
            return (
                head[:value_start] + head[value_end:],
                head[value_start:value_end].strip(b" \t"),
                value_start,
            )
    return None


def length_value(value: bytes) -> int | None:
    """Return a Content-Length value as a number, or None unless it is plain digits."""
    if not value.isdigit() or len(value) > MAX_LENGTH_DIGITS:
        return None
    return int(value)
