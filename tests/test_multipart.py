"""The streaming multipart rewriter, fed the same body in many chunkings."""

from __future__ import annotations

import random

import pytest

from gateway.errors import InvalidRequest
from gateway.multipart import MultipartRewriter, parse_boundary, parse_part_header

BOUNDARY = "b0undary"


def body_of(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def field(name: str, value: bytes) -> bytes:
    return (
        f"--{BOUNDARY}\r\n".encode()
        + f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        + value
        + b"\r\n"
    )


def file(content: bytes) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
        'filename="a.bin"\r\n\r\n'.encode()
        + content
        + b"\r\n"
    )


async def chunks_of(data: bytes, rng: random.Random):
    position = 0
    while position < len(data):
        size = rng.choice([1, 2, 3, 7, 64, 1000, 4096])
        yield data[position : position + size]
        position += size


async def rewrite(
    data: bytes, token: str | None, seed: int
) -> tuple[bytes, str | None]:
    rewriter = MultipartRewriter(BOUNDARY, chunks_of(data, random.Random(seed)), 10**9)
    leading = await rewriter.read_leading_fields()
    output = b"".join([piece async for piece in rewriter.stream(token)])
    return output, leading.credential


# Near misses of the delimiter "\r\n--b0undary", which a valid body never
# contains inside a part (RFC 2046 section 5.1.1).
CONTENT = (b"\r\n--b0undar" + bytes(range(256)) + b"x--b0undary\r\n") * 40


@pytest.mark.parametrize("seed", range(25))
async def test_rewrite_any_chunking(seed):
    data = body_of(
        field("i", b"jwt-value"),
        field("name", b"x"),
        file(CONTENT),
        field("i", b"late"),
        field("after", b"y"),
    )
    output, credential = await rewrite(data, "TOKEN", seed)

    assert credential == "jwt-value"
    assert output == body_of(
        field("i", b"TOKEN"), field("name", b"x"), file(CONTENT), field("after", b"y")
    )


@pytest.mark.parametrize("seed", range(5))
async def test_rewrite_without_token(seed):
    data = body_of(field("i", b"jwt"), file(CONTENT))
    output, _ = await rewrite(data, None, seed)

    assert output == body_of(file(CONTENT))


async def test_rewrite_fields_only():
    data = body_of(field("a", b"1"))
    output, credential = await rewrite(data, "T", 0)

    assert credential is None
    assert output == body_of(field("i", b"T"), field("a", b"1"))


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("multipart/form-data; boundary=abc", "abc"),
        ('multipart/form-data; charset=utf-8; boundary="a b:c"', "a b:c"),
        ("multipart/form-data; BOUNDARY=xyz", "xyz"),
    ],
)
def test_parse_boundary(content_type, expected):
    assert parse_boundary(content_type) == expected


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/form-data",
        "multipart/form-data; boundary=",
        "multipart/form-data; boundary=" + "a" * 71,
    ],
)
def test_parse_boundary_invalid(content_type):
    with pytest.raises(InvalidRequest):
        parse_boundary(content_type)


@pytest.mark.parametrize(
    ("raw", "name", "is_file"),
    [
        (b'Content-Disposition: form-data; name="i"', "i", False),
        (b"content-disposition: form-data; name=i", "i", False),
        (b'Content-Disposition: form-data; name="f"; filename="x.png"', "f", True),
        (
            b"Content-Disposition: form-data; name=\"f\"; filename*=UTF-8''x.png",
            "f",
            True,
        ),
        (b'Content-Disposition: form-data; name="a\\"b"', 'a"b', False),
    ],
)
def test_parse_part_header(raw, name, is_file):
    header = parse_part_header(raw)

    assert header.name == name
    assert header.is_file is is_file
