"""Readiness checks behind ``/_gateway/readyz``."""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

logger = structlog.get_logger("gateway")

# Seconds a TCP connect to the upstream may take before it counts as failed.
CONNECT_TIMEOUT = 1.0
# Seconds a probe result is reused, so frequent readiness probes from several
# orchestrators open at most one connection per interval and process.
CACHE_SECONDS = 5.0


class UpstreamProbe:
    """Check that the upstream accepts TCP connections, with the result cached.

    Only the TCP handshake is made, without TLS or HTTP, so the check costs
    the upstream one accepted and closed connection.
    """

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float = CONNECT_TIMEOUT,
        cache_seconds: float = CACHE_SECONDS,
    ):
        self.host = host
        self.port = port
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self._checked_at = -float("inf")
        self._reachable = False
        # Probes that arrive while a connect is running wait for its result.
        self._running: asyncio.Task[bool] | None = None

    async def reachable(self) -> bool:
        """Return whether the last connect within ``cache_seconds`` succeeded."""
        if time.monotonic() - self._checked_at < self.cache_seconds:
            return self._reachable
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._connect(), name="upstream-probe")
        task = self._running
        try:
            # shield: a probe request that is cancelled leaves the connect
            # running for the others.
            return await asyncio.shield(task)
        finally:
            if task.done() and self._running is task:
                self._running = None

    async def close(self) -> None:
        """Cancel a connect that is still running."""
        if self._running is not None:
            self._running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._running
            self._running = None

    async def _connect(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(self.host, self.port)
        except (OSError, TimeoutError) as error:
            reachable = False
            if self._reachable or self._checked_at == -float("inf"):
                logger.warning(
                    "readiness.upstream_unreachable",
                    host=self.host,
                    port=self.port,
                    error=str(error) or type(error).__name__,
                )
        else:
            reachable = True
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            if not self._reachable and self._checked_at != -float("inf"):
                logger.info(
                    "readiness.upstream_reachable", host=self.host, port=self.port
                )
        self._reachable = reachable
        self._checked_at = time.monotonic()
        return reachable
