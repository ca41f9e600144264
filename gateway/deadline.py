"""A deadline that moves often, kept by one timer that re-arms itself."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    """A timeout that calls ``expired`` once ``start`` was last called long enough ago.

    Keep-alive and read timeouts restart on every request or read. Cancelling
    an event-loop timer and creating a new one each time costs more than the
    rest of a small request's bookkeeping, so ``start`` only moves the
    deadline, and the one pending timer re-arms itself when it fires early.
    """

    __slots__ = ("_loop", "_expired", "_deadline", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, expired: Callable[[], None]):
        self._loop = loop
        self._expired = expired
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self, seconds: float) -> None:
        """Expire ``seconds`` from now, replacing any earlier deadline."""
        self._deadline = self._loop.time() + seconds
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._check)

    def clear(self) -> None:
        """Stop the deadline; the pending timer, if any, then does nothing."""
        self._deadline = None

    def stop(self) -> None:
        """Stop the deadline and its timer, for good or until the next start."""
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._check)
            return
        self._deadline = None
        self._expired()
