"""Per-principal rate limits with the generic cell rate algorithm (GCRA).

Each principal may send ``requests_per_minute`` requests per minute on
average, plus ``burst`` extra requests at once after being idle. In any
interval of t seconds at most ``burst + 1 + t * requests_per_minute / 60``
requests are allowed. A ``burst`` of 0 means ``ceil(requests_per_minute / 6)``,
ten seconds' worth of requests, so a client that sends a few calls together
is not rejected at modest limits. Explicit values apply to every principal,
overrides included. A principal's limit of 0 disables limiting for that
principal.

GCRA keeps one number per principal: the theoretical arrival time (TAT),
when the principal's budget is full again. A request at time ``now`` is
allowed when ``TAT - now <= burst * interval``, where ``interval`` is
``60 / requests_per_minute`` seconds, and then moves TAT to
``max(TAT, now) + interval``. A rejected request changes nothing. Once TAT
is in the past the principal is idle and its state can be dropped.

Two implementations share the ``RateLimiter`` interface:

- ``redis_limiter``: the TAT lives in ``<prefix>ratelimit:<principal>``. One
  Lua script reads and writes it, so each check is one atomic round trip
  (EVALSHA, and EVAL once after Redis has lost its script cache) and every
  replica that shares the Redis shares each principal's budget exactly. The
  script takes the time from Redis (``TIME``), so replicas whose clocks
  disagree still agree on the budget. The key expires when its TAT passes,
  so an idle principal leaves nothing behind. Each call touches one key, so
  the script runs unchanged on Redis Cluster. It needs Redis 5 or later
  (tested with 7.0). Earlier versions replicate the script itself instead of
  its writes by default, so they reject a write after ``TIME``.
- ``local_limiter``: the same algorithm on a dictionary and the process's
  monotonic clock, for the embedded SQLite store. Processes do not share
  their counts, so with ``serve --workers N`` a principal may send up to N
  times the configured rate.

When Redis fails, ``check`` raises ``StoreUnavailable`` and the gateway
responds with 503. Letting requests through unlimited while Redis is down would
silently remove the limit exactly when the system is under stress, and
rejecting them as rate-limited would blame the client. A principal without
a limit is never looked up in Redis, so its requests pass during an outage.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.exceptions import NoScriptError

from gateway.credentials import validate_principal
from gateway.errors import ClientError, StoreUnavailable
from gateway.redis_client import REDIS_ERRORS, RedisClient

MICROSECONDS_PER_SECOND = 1_000_000
MICROSECONDS_PER_MINUTE = 60 * MICROSECONDS_PER_SECOND
# One request per microsecond, the resolution of the algorithm's clock.
MAX_REQUESTS_PER_MINUTE = MICROSECONDS_PER_MINUTE
# Keeps burst * interval, in microseconds, small enough that TAT values stay
# exact in the double-precision numbers that Lua uses.
MAX_BURST = 1_000_000
# Share of the per-minute limit that a burst of 0 allows: ten seconds' worth.
DEFAULT_BURST_DIVISOR = 6
KEY_SEGMENT = "ratelimit:"
# Seconds between sweeps of idle principals from the local limiter's table.
LOCAL_SWEEP_INTERVAL = 60.0


@dataclass(frozen=True)
class RateLimitSettings:
    """The ``[ratelimit]`` settings. Invalid values raise ValueError."""

    requests_per_minute: int = 0
    burst: int = 0
    # Per-principal replacements for requests_per_minute, where 0 means no
    # limit for that principal.
    principals: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_limit("ratelimit.requests_per_minute", self.requests_per_minute)
        if not _is_int_between(self.burst, 0, MAX_BURST):
            raise ValueError(
                f"ratelimit.burst must be an integer from 0 to {MAX_BURST}, "
                f"not {self.burst!r}"
            )
        for principal, limit in self.principals.items():
            try:
                validate_principal(principal)
            except ValueError as error:
                raise ValueError(
                    f"ratelimit.principals: invalid principal {principal!r}: {error}"
                ) from None
            _check_limit(f"ratelimit.principals.{principal}", limit)

    @property
    def enabled(self) -> bool:
        """Whether any principal has a limit."""
        return self.requests_per_minute > 0 or any(self.principals.values())

    def limit_for(self, principal: str) -> int:
        """Return the principal's requests per minute, or 0 for no limit."""
        return self.principals.get(principal, self.requests_per_minute)

    def burst_for(self, principal: str) -> int:
        """Return how many requests above the steady rate the principal may send."""
        if self.burst > 0:
            return self.burst
        return math.ceil(self.limit_for(principal) / DEFAULT_BURST_DIVISOR)

    def rate_for(self, principal: str) -> Rate | None:
        """Return the principal's GCRA parameters, or None when it has no limit."""
        limit = self.limit_for(principal)
        if limit == 0:
            return None
        # Rounded to whole microseconds, so that Redis and Lua work on
        # integers. The rate is off by less than one microsecond per request.
        interval = max(1, round(MICROSECONDS_PER_MINUTE / limit))
        return Rate(
            limit=limit,
            interval=interval,
            tolerance=self.burst_for(principal) * interval,
        )


def _is_int_between(value: object, low: int, high: int) -> bool:
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return low <= value <= high


def _check_limit(key: str, value: object) -> None:
    if not _is_int_between(value, 0, MAX_REQUESTS_PER_MINUTE):
        raise ValueError(
            f"{key} must be an integer from 0 to {MAX_REQUESTS_PER_MINUTE}, "
            f"not {value!r}"
        )


@dataclass(frozen=True)
class Rate:
    """GCRA parameters of one principal; times in microseconds."""

    limit: int  # requests per minute
    interval: int  # time between requests at the steady rate
    tolerance: int  # how far TAT may run ahead of now, burst * interval


@dataclass(frozen=True)
class Decision:
    """The outcome of one rate limit check.

    ``retry_after`` is the seconds until a request would be allowed, 0.0 when
    this one was. ``remaining`` is how many more requests would be allowed at
    once right now. ``limit`` is the principal's requests per minute. When
    ``limit`` is 0 the principal has no limit and ``remaining`` is 0.
    """

    allowed: bool
    retry_after: float
    remaining: int
    limit: int


UNLIMITED = Decision(allowed=True, retry_after=0.0, remaining=0, limit=0)


class RateLimiter(Protocol):
    async def check(self, principal: str) -> Decision:
        """Count one request of ``principal`` if its budget allows it.

        Raises StoreUnavailable when the shared store cannot be reached.
        """
        ...


class RateLimitExceeded(ClientError):
    status = 429
    code = "RATE_LIMIT_EXCEEDED"
    error_id = "d5826d14-3982-4d2e-8011-b9e9f02499ef"
    default_message = "Rate limit exceeded. Please try again later."

    def __init__(self, limit: int, retry_after: float, message: str | None = None):
        # Retry-After takes whole seconds, so the wait is rounded up.
        self.retry_after_seconds = max(0, math.ceil(retry_after))
        self.limit = limit
        super().__init__(
            message, {"limit": limit, "retryAfterSeconds": self.retry_after_seconds}
        )

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_seconds)}


def apply_gcra(now: int, tat: int | None, rate: Rate) -> tuple[Decision, int | None]:
    """Decide one request at ``now`` and return the decision and the new TAT.

    ``tat`` is None for a principal without state. The new TAT is None when
    the request is rejected, because a rejection changes nothing. This is the
    same computation as ``GCRA_SCRIPT``.
    """
    if tat is None or tat < now:
        tat = now
    if tat - now > rate.tolerance:
        wait = tat - rate.tolerance - now
        return Decision(False, wait / MICROSECONDS_PER_SECOND, 0, rate.limit), None
    new_tat = tat + rate.interval
    remaining = (now + rate.tolerance - new_tat) // rate.interval + 1
    return Decision(True, 0.0, remaining, rate.limit), new_tat


# KEYS[1]: the principal's key, holding its TAT in microseconds of Redis time.
# ARGV[1]: the interval and ARGV[2] the tolerance of ``Rate``, in microseconds.
# Returns {1 if allowed else 0, microseconds to wait, remaining requests}.
GCRA_SCRIPT = """
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
-- GET returns false for a missing key, and tonumber(false) is nil.
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then
    tat = now
end
if tat - now > tolerance then
    return {0, tat - tolerance - now, 0}
end
local new_tat = tat + interval
-- The key expires when its TAT passes, the moment the state would be reset
-- anyway. '%d' keeps all digits; tostring would switch to exponent notation.
redis.call('SET', KEYS[1], string.format('%d', new_tat),
    'PX', math.ceil((new_tat - now) / 1000))
return {1, 0, math.floor((now + tolerance - new_tat) / interval) + 1}
"""
GCRA_SCRIPT_SHA = hashlib.sha1(GCRA_SCRIPT.encode(), usedforsecurity=False).hexdigest()


class RedisRateLimiter:
    """GCRA on Redis, shared by every replica that uses the same prefix."""

    def __init__(self, client: RedisClient, prefix: str, settings: RateLimitSettings):
        self.settings = settings
        self._client = client
        self._prefix = prefix

    def key_for(self, principal: str) -> str:
        return f"{self._prefix}{KEY_SEGMENT}{principal}"

    async def check(self, principal: str) -> Decision:
        rate = self.settings.rate_for(principal)
        if rate is None:
            return UNLIMITED
        reply = await self._run_script(
            self.key_for(principal), rate.interval, rate.tolerance
        )
        allowed, wait, remaining = (int(value) for value in reply)
        return Decision(
            allowed=allowed == 1,
            retry_after=wait / MICROSECONDS_PER_SECOND,
            remaining=remaining,
            limit=rate.limit,
        )

    async def _run_script(self, key: str, *args: int) -> Any:
        # NOTE: the client retries once after a connection error or timeout.
        # When Redis ran the script but its reply was lost, the retry counts
        # the request a second time.
        try:
            try:
                return await self._client.evalsha(GCRA_SCRIPT_SHA, 1, key, *args)
            except NoScriptError:
                # Redis restarted, failed over or ran SCRIPT FLUSH. EVAL runs
                # the script and caches it again for the next EVALSHA.
                return await self._client.eval(GCRA_SCRIPT, 1, key, *args)
        except REDIS_ERRORS as error:
            raise StoreUnavailable() from error


class LocalRateLimiter:
    """GCRA in this process's memory; other processes keep their own counts."""

    def __init__(
        self, settings: RateLimitSettings, sweep_interval: float = LOCAL_SWEEP_INTERVAL
    ):
        self.settings = settings
        self._tats: dict[str, int] = {}
        self._sweep_interval = round(sweep_interval * MICROSECONDS_PER_SECOND)
        self._next_sweep = _monotonic_microseconds() + self._sweep_interval

    @property
    def tracked_principals(self) -> int:
        """Number of principals whose state is kept, idle ones not yet swept."""
        return len(self._tats)

    async def check(self, principal: str) -> Decision:
        # No await below, so concurrent checks on one event loop cannot
        # interleave between reading and writing a TAT.
        rate = self.settings.rate_for(principal)
        if rate is None:
            return UNLIMITED
        now = _monotonic_microseconds()
        if now >= self._next_sweep:
            self._sweep(now)
        decision, new_tat = apply_gcra(now, self._tats.get(principal), rate)
        if new_tat is not None:
            self._tats[principal] = new_tat
        return decision

    def _sweep(self, now: int) -> None:
        """Drop principals whose TAT has passed, because that state equals no state."""
        idle = [principal for principal, tat in self._tats.items() if tat <= now]
        for principal in idle:
            del self._tats[principal]
        self._next_sweep = now + self._sweep_interval


def _monotonic_microseconds() -> int:
    return time.monotonic_ns() // 1000


def redis_limiter(
    redis_client: RedisClient, prefix: str, settings: RateLimitSettings
) -> RedisRateLimiter:
    """Create a limiter that keeps its state in Redis under ``prefix``."""
    return RedisRateLimiter(redis_client, prefix, settings)


def local_limiter(settings: RateLimitSettings) -> LocalRateLimiter:
    """Create a limiter that keeps its state in this process."""
    return LocalRateLimiter(settings)
