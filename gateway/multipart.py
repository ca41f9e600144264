"""Streaming rewrite of multipart/form-data uploads (``drive/files/create``).

The fields before the file are small and read in full, so the gateway can
take a credential from an ``i`` field and decide whether to inject a token
before anything is sent upstream. From the file on, the body passes through
chunk by chunk: only the part boundaries are looked for, so file bytes are
never buffered, decoded or changed. The one exception is a body with no
credential before the file and none in a header: its file goes to a bounded
temporary file until the ``i`` after it has been read. Every ``i`` part the
client sent, before or after the file, is dropped, and the gateway's own
``i`` part, when it injects a token, goes first, before the file, where
Misskey reads it.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO

from gateway.errors import InvalidRequest, PayloadTooLarge, RequestTimeout

CREDENTIAL_FIELD = "i"
# Fields before the file, and each part's header block, are held in memory.
MAX_LEADING_FIELDS_SIZE = 64 * 1024
MAX_PART_HEADER_SIZE = 16 * 1024
SPOOL_READ_SIZE = 256 * 1024
# RFC 2046 section 5.1.1: 1 to 70 characters from this set, not ending in space.
BOUNDARY_PATTERN = re.compile(
    r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]"
)
_NAME = re.compile(r'(?i)(?:^|;)\s*name\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))')
_FILENAME = re.compile(r"(?i)(?:^|;)\s*filename\*?\s*=")


def parse_boundary(content_type: str) -> str:
    """Return the boundary of a multipart/form-data Content-Type, or raise 400."""
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.strip().partition("=")
        if name.strip().lower() == "boundary":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if BOUNDARY_PATTERN.fullmatch(value):
                return value
            raise InvalidRequest("The multipart boundary is invalid.")
    raise InvalidRequest("The multipart body has no boundary parameter.")


@dataclass
class PartHeader:
    raw: bytes
    name: str | None
    is_file: bool


def parse_part_header(raw: bytes) -> PartHeader:
    """Read the field name and whether a part is a file from its header block."""
    name: str | None = None
    is_file = False
    for line in raw.decode("latin-1").split("\r\n"):
        header, _, value = line.partition(":")
        if header.strip().lower() != "content-disposition":
            continue
        match = _NAME.search(value)
        if match:
            quoted, bare = match.group(1), match.group(2)
            name = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        is_file = _FILENAME.search(value) is not None
    return PartHeader(raw=raw, name=name, is_file=is_file)


@dataclass
class LeadingFields:
    """The parts before the file: kept fields as raw bytes, and the ``i`` value."""

    kept: bytes = b""
    credential: str | None = None
    credential_fields: int = 0
    file_header: PartHeader | None = None
    ended: bool = False  # the body ended before any file part


class MultipartRewriter:
    """Split a multipart body into its leading fields and a filtered remainder.

    ``read_leading_fields`` consumes the client body up to and including the
    header of the first file part. ``stream`` then yields the body to send
    upstream: the injected ``i`` part, the kept fields, and the rest of the
    client body with any further ``i`` parts removed.
    """

    def __init__(
        self,
        boundary: str,
        chunks: AsyncIterator[bytes],
        limit: int,
        idle_timeout: float | None = None,
    ):
        # Seconds the client may go without sending any part of the body.
        self._idle_timeout = idle_timeout
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        self._first = b"--" + boundary.encode("latin-1")
        self._chunks = chunks
        self._buffer = b""
        self._limit = limit
        self._received = 0
        self._eof = False
        self._spool: IO[bytes] | None = None
        self._trailing = b""
        self.leading = LeadingFields()

    async def read_leading_fields(self, spool_limit: int = 0) -> LeadingFields:
        """Read the parts before the file, and the file's header.

        When no ``i`` came before the file and ``spool_limit`` is positive,
        the file is written to a temporary file of at most ``spool_limit``
        bytes and the parts after it are read too, because some SDKs put
        ``i`` after the file. The caller passes 0 when the credential came in
        a header, so such uploads are always streamed.
        """
        await self._read_leading_fields()
        if (
            spool_limit > 0
            and self.leading.file_header is not None
            and self.leading.credential is None
        ):
            await self._spool_file(spool_limit)
        if self.leading.credential_fields > 1:
            raise InvalidRequest(
                "The multipart body has more than one 'i' field.", {"param": "i"}
            )
        return self.leading

    async def _spool_file(self, limit: int) -> None:
        # Closed by stream() or close(), whichever comes first.
        spool = tempfile.TemporaryFile()
        self._spool = spool
        size = 0
        async for piece in self._part_body(passthrough=True):
            size += len(piece)
            if size > limit:
                raise PayloadTooLarge(
                    f"Uploads that carry 'i' after the file are limited to {limit} "
                    "bytes; send 'i' before the file or use an Authorization header.",
                    {"limit": limit},
                )
            await asyncio.to_thread(spool.write, piece)

        trailing = bytearray()
        while await self._after_delimiter():
            header = await self._read_part_header()
            if header.is_file:
                raise InvalidRequest("The multipart body has more than one file.")
            value = await self._read_value()
            if header.name == CREDENTIAL_FIELD:
                self.leading.credential_fields += 1
                self.leading.credential = value.decode("utf-8", "replace")
                continue
            trailing += self._delimiter + b"\r\n" + header.raw + b"\r\n\r\n" + value
            if len(trailing) > MAX_LEADING_FIELDS_SIZE:
                raise PayloadTooLarge(
                    "The fields after the file are larger than "
                    f"{MAX_LEADING_FIELDS_SIZE} bytes."
                )
        self._trailing = bytes(trailing)

    async def _read_leading_fields(self) -> None:
        await self._fill_until(self._first + b"\r\n", MAX_LEADING_FIELDS_SIZE)
        start = self._buffer.find(self._first + b"\r\n")
        if start != 0:
            raise InvalidRequest("The multipart body does not start with its boundary.")
        self._buffer = self._buffer[len(self._first) + 2 :]

        kept = bytearray()
        while True:
            header = await self._read_part_header()
            if header.is_file:
                self.leading.file_header = header
                break
            value, more = await self._read_small_part()
            if header.name == CREDENTIAL_FIELD:
                self.leading.credential_fields += 1
                self.leading.credential = value.decode("utf-8", "replace")
            else:
                kept += (
                    self._first + b"\r\n" + header.raw + b"\r\n\r\n" + value + b"\r\n"
                )
            if len(kept) > MAX_LEADING_FIELDS_SIZE:
                raise PayloadTooLarge(
                    "The fields before the file are larger than "
                    f"{MAX_LEADING_FIELDS_SIZE} bytes."
                )
            if not more:
                self.leading.ended = True
                break
        self.leading.kept = bytes(kept)

    async def stream(self, token: str | None) -> AsyncIterator[bytes]:
        """Yield the upstream body; call after ``read_leading_fields``."""
        if token is not None:
            yield (
                self._first
                + b'\r\nContent-Disposition: form-data; name="i"\r\n\r\n'
                + token.encode("ascii")
                + b"\r\n"
            )
        if self.leading.kept:
            yield self.leading.kept
        if self.leading.ended or self.leading.file_header is None:
            yield self._first + b"--\r\n"
            return

        header = self.leading.file_header
        yield self._first + b"\r\n" + header.raw + b"\r\n\r\n"
        if self._spool is not None:
            async for piece in self._replay_spool():
                yield piece
            yield self._trailing + self._delimiter + b"--\r\n"
            return
        async for piece in self._part_body(passthrough=True):
            yield piece
        while await self._after_delimiter():
            header = await self._read_part_header()
            if header.name == CREDENTIAL_FIELD:
                async for _ in self._part_body(passthrough=False):
                    pass
                continue
            yield self._delimiter + b"\r\n" + header.raw + b"\r\n\r\n"
            async for piece in self._part_body(passthrough=True):
                yield piece
        yield self._delimiter + b"--\r\n"

    async def _replay_spool(self) -> AsyncIterator[bytes]:
        spool = self._spool
        if spool is None:
            return
        try:
            await asyncio.to_thread(spool.seek, 0)
            while piece := await asyncio.to_thread(spool.read, SPOOL_READ_SIZE):
                yield piece
        finally:
            spool.close()
            self._spool = None

    def close(self) -> None:
        """Delete the temporary file of a spooled upload, if any."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    # Reading the client body

    async def _next_chunk(self) -> bool:
        if self._eof:
            return False
        try:
            async with asyncio.timeout(self._idle_timeout):
                chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self._eof = True
            return False
        except TimeoutError:
            raise RequestTimeout(
                f"No part of the upload arrived for {self._idle_timeout:g} seconds."
            ) from None
        self._received += len(chunk)
        if self._received > self._limit:
            raise PayloadTooLarge(
                f"The upload is larger than {self._limit} bytes.",
                {"limit": self._limit},
            )
        self._buffer += chunk
        return True

    async def _fill_until(self, marker: bytes, limit: int) -> int:
        while True:
            index = self._buffer.find(marker)
            if index >= 0:
                return index
            if len(self._buffer) > limit:
                raise InvalidRequest("A multipart part header or field is too large.")
            if not await self._next_chunk():
                raise InvalidRequest("The multipart body ends in the middle of a part.")

    async def _read_part_header(self) -> PartHeader:
        end = await self._fill_until(b"\r\n\r\n", MAX_PART_HEADER_SIZE)
        raw = self._buffer[:end]
        self._buffer = self._buffer[end + 4 :]
        return parse_part_header(raw)

    async def _read_small_part(self) -> tuple[bytes, bool]:
        value = await self._read_value()
        return value, await self._after_delimiter()

    async def _read_value(self) -> bytes:
        """Read a small part's body and consume the delimiter after it."""
        end = await self._fill_until(self._delimiter, MAX_LEADING_FIELDS_SIZE)
        value = self._buffer[:end]
        self._buffer = self._buffer[end + len(self._delimiter) :]
        return value

    async def _after_delimiter(self) -> bool:
        """Consume what follows a delimiter; return whether another part follows."""
        while len(self._buffer) < 2:
            if not await self._next_chunk():
                raise InvalidRequest("The multipart body ends after a boundary.")
        if self._buffer.startswith(b"--"):
            # The close delimiter: whatever follows is the epilogue, dropped.
            self._buffer = b""
            while await self._next_chunk():
                self._buffer = b""
            return False
        if not self._buffer.startswith(b"\r\n"):
            # Transport padding (spaces, tabs) may sit before the CRLF.
            end = await self._fill_until(b"\r\n", MAX_PART_HEADER_SIZE)
            if self._buffer[:end].strip(b" \t"):
                raise InvalidRequest("A multipart boundary is followed by garbage.")
            self._buffer = self._buffer[end:]
        self._buffer = self._buffer[2:]
        return True

    async def _part_body(self, passthrough: bool) -> AsyncIterator[bytes]:
        """Yield a part's body up to the next delimiter, which is consumed.

        Up to ``len(delimiter) - 1`` bytes are held back at the end of the
        buffer, because a delimiter may be split across chunks.
        """
        keep = len(self._delimiter) - 1
        while True:
            index = self._buffer.find(self._delimiter)
            if index >= 0:
                if passthrough and index:
                    yield self._buffer[:index]
                self._buffer = self._buffer[index + len(self._delimiter) :]
                return
            if len(self._buffer) > keep:
                cut = len(self._buffer) - keep
                if passthrough:
                    yield self._buffer[:cut]
                self._buffer = self._buffer[cut:]
            if not await self._next_chunk():
                raise InvalidRequest("The multipart body ends in the middle of a part.")
