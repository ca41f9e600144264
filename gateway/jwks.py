"""A JSON Web Key Set fetched over HTTP, with each key pinned to one algorithm.

The set is fetched on first use, used for ``cache_seconds``, and fetched again
early when a JWT names a key id the set lacks (an identity provider that
rotates keys publishes the new key before signing with it). Such early
fetches happen at most once every ``refetch_interval`` seconds, so JWTs with
made-up key ids cannot make the gateway hammer the provider. When a fetch
fails, the keys fetched before stay in use.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import jwt
import structlog

from gateway.errors import KeySetUnavailable

logger = structlog.get_logger("gateway.jwks")

FETCH_TIMEOUT_SECONDS = 5.0
MAX_KEY_SET_BYTES = 256 * 1024
# Algorithm of a key that names none, by key type and curve. RSA keys must
# name theirs, because RS256 and PS256 both fit them.
IMPLIED_ALGORITHMS = {
    ("EC", "P-256"): "ES256",
    ("EC", "P-384"): "ES384",
    ("EC", "P-521"): "ES512",
    ("OKP", "Ed25519"): "EdDSA",
}


class JwksKeySet:
    """Public keys by key id, each with the one algorithm it may verify."""

    def __init__(
        self,
        url: str,
        algorithms: tuple[str, ...],
        cache_seconds: float,
        refetch_interval: float,
    ):
        self.url = url
        self._algorithms = set(algorithms)
        self._cache_seconds = cache_seconds
        self._refetch_interval = refetch_interval
        self._keys: dict[str, tuple[Any, str]] = {}
        self._fetched_at: float | None = None
        self._attempted_at = float("-inf")
        self._refetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def key_for(self, kid: str) -> tuple[Any, str] | None:
        """Return the key and algorithm for ``kid``, or None if the set lacks it."""
        now = time.monotonic()
        if self._fetched_at is None or now - self._fetched_at > self._cache_seconds:
            await self._refresh(now)
        found = self._keys.get(kid)
        if found is None and now - self._refetched_at >= self._refetch_interval:
            self._refetched_at = now
            await self._refresh(now)
            found = self._keys.get(kid)
        return found

    async def _refresh(self, requested_at: float) -> None:
        async with self._lock:
            if self._attempted_at >= requested_at:
                return  # another request fetched while this one waited
            self._attempted_at = time.monotonic()
            try:
                document = await self._fetch()
                keys = self._parse(document)
            except (aiohttp.ClientError, TimeoutError, ValueError) as error:
                logger.warning("jwks.fetch_failed", url=self.url, error=str(error))
                if not self._keys:
                    raise KeySetUnavailable() from error
                return
            self._keys = keys
            self._fetched_at = time.monotonic()

    async def _fetch(self) -> Any:
        self.fetches += 1
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(self.url, allow_redirects=False) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                body = await response.content.read(MAX_KEY_SET_BYTES + 1)
        if len(body) > MAX_KEY_SET_BYTES:
            raise ValueError(f"the key set is larger than {MAX_KEY_SET_BYTES} bytes")
        return json.loads(body)

    def _parse(self, document: Any) -> dict[str, tuple[Any, str]]:
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError("the document has no 'keys' list")
        keys: dict[str, tuple[Any, str]] = {}
        for entry in document["keys"]:
            if not isinstance(entry, dict):
                continue
            kid = entry.get("kid")
            implied = IMPLIED_ALGORITHMS.get(
                (str(entry.get("kty", "")), str(entry.get("crv", "")))
            )
            algorithm = entry.get("alg") or implied
            if not isinstance(kid, str) or algorithm not in self._algorithms:
                # Keys without an id, or for an algorithm the gateway does not
                # accept, can never verify a gateway JWT.
                continue
            if entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry, algorithm=algorithm).key
            except jwt.PyJWTError as error:
                logger.warning(
                    "jwks.key_invalid", url=self.url, kid=kid, error=str(error)
                )
                continue
            keys[kid] = (key, algorithm)
        return keys
