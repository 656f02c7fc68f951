"""The pace of calls to Twenty, shared in Redis by every process that calls it, and learnt from Twenty's answers.

Twenty's legacy throttler (the default on self-hosted servers) nominally allows 100 calls per 60 s per workspace,
but it resets its refill clock on every accepted call and drops the fraction (`throttler.service.ts`), so a
burst drains it for good and, once drained, a call less than 600 ms after the previous accepted one is refused.
Under steady load it accepts about 79 calls a minute, not 100. So reactor does not keep a bucket of `limit`
tokens: it spaces calls evenly (GCRA: one call per interval), at most SAFE_SHARE of the nominal limit (75 a minute
for the default 100), and learns:

* a 429 cuts the shared rate for the whole fleet (multiplicatively) and pauses every caller for Retry-After or
  one new interval; the 429s of calls sent before that cut do not cut it again;
* after a quiet spell (a quarter of the window) without a 429, every call raises the rate a little
  (multiplicatively, so recovery takes about as many calls whatever the limit), up to the ceiling again;
* after such a quiet spell, a few calls (TWENTY_RATE_BURST, 8) may go at once: the handful of calls a lone lead's
  journey makes, or the first round of a burst, need not wait 800 ms each. It is safe against the legacy
  throttler: the burst is paid back at the same even pace before the next one, and that pace earns Twenty's
  bucket at least one token a call; a burst never follows a 429.

Time comes from the Redis server (TIME), so the clocks of different hosts never disagree; tests may pass a
clock instead. The state expires after ten idle windows: the learnt rate outlives a pause in the traffic.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from reactor import metrics

SAFE_SHARE = 0.75  # of the nominal limit: what the legacy throttler still accepts with room for jitter
FLOOR_SHARE = 0.05  # the rate is never cut below this share of the ceiling
CUT_FACTOR = 0.5  # a 429 halves the rate
RAISE_PER_CALL = 0.005  # each call after a quiet spell raises the rate by 0.5 %
QUIET_SHARE = 0.25  # of the window without a 429 before the rate rises again

# Put before both scripts: the clock they read, the caller's `now` when given (>= 0), else Redis's TIME.
_CLOCK = """
pcall(redis.replicate_commands)
local function clock(given)
  if given >= 0 then return given end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS[1]: the state hash (rate in calls per ms, tat = the next free slot, cut = when the rate was last cut).
# ARGV: ceiling, floor (calls/ms), raise factor, quiet ms, max wait ms, ttl ms, reserved_at (or -1), now (or -1),
# burst (calls that may go at once after a quiet spell; 1: none).
# Returns {wait_ms, now_ms, rate}: wait 0 = go now; > 0 = the slot reserved, come back at it with reserved_at =
# now_ms; -1 = no slot within the max wait (nothing reserved).
_ACQUIRE_SCRIPT = """
local ceiling, floor_rate = tonumber(ARGV[1]), tonumber(ARGV[2])
local raise, quiet, max_wait, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local reserved_at, now, burst = tonumber(ARGV[7]), clock(tonumber(ARGV[8])), tonumber(ARGV[9])
local state = redis.call('HMGET', KEYS[1], 'rate', 'tat', 'cut')
local rate = math.min(ceiling, math.max(floor_rate, tonumber(state[1]) or ceiling))
local tat = tonumber(state[2]) or now
local cut = tonumber(state[3]) or -1
if reserved_at >= 0 and reserved_at >= cut then
  return {0, now, tostring(rate)}
end
local tolerance = 0
if state[3] == false or now - cut >= quiet then tolerance = (burst - 1) / rate end
local slot = math.max(tat - tolerance, now)
local wait = slot - now
if wait > max_wait then
  return {-1, now, tostring(rate)}
end
if now - cut >= quiet then
  rate = math.min(ceiling, rate * (1 + raise))
end
redis.call('HSET', KEYS[1], 'rate', tostring(rate), 'tat', tostring(math.max(tat, now) + 1 / rate))
redis.call('PEXPIRE', KEYS[1], ttl)
return {math.ceil(wait), now, tostring(rate)}
"""

# ARGV: reserved_at, cut factor, floor (calls/ms), pause ms, ttl ms, now (or -1). Returns 1 when the rate was cut.
_SLOW_DOWN_SCRIPT = """
local reserved_at, factor, floor_rate = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local pause, ttl, now = tonumber(ARGV[4]), tonumber(ARGV[5]), clock(tonumber(ARGV[6]))
local state = redis.call('HMGET', KEYS[1], 'rate', 'tat', 'cut')
local rate = tonumber(state[1])
local tat = tonumber(state[2]) or now
local cut = tonumber(state[3]) or -1
local cutting = rate ~= nil and reserved_at >= cut
if cutting then
  rate = math.max(floor_rate, rate * factor)
  cut = now
  -- Every slot reserved at the old pace is void: their holders come back and queue again at the new one.
  tat = now
end
if rate ~= nil then
  tat = math.max(tat, now + math.max(pause, 1 / rate))
  redis.call('HSET', KEYS[1], 'rate', tostring(rate), 'tat', tostring(tat), 'cut', tostring(cut))
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return cutting and 1 or 0
"""


class RateLimitUnavailable(Exception):
    """No call could be had in time: the shared pace is booked too far ahead, or Redis is unreachable."""


@dataclass(frozen=True)
class Permit:
    """The right to one call; `granted_ms` (the shared clock) tells a 429 of the old pace from one of the new."""

    granted_ms: int = 0


class Limiter(Protocol):
    async def acquire(self) -> Permit: ...

    async def slow_down(self, permit: Permit, pause_s: float | None) -> None:
        """Twenty refused a call made with `permit` (429): slow the whole fleet down."""
        ...


class Unlimited:
    async def acquire(self) -> Permit:
        return Permit()

    async def slow_down(self, permit: Permit, pause_s: float | None) -> None:
        return None


class AdaptiveRateLimit:
    """Evenly spaced calls at a rate the fleet shares and learns (see the module docstring)."""

    def __init__(
        self,
        redis: Redis,
        *,
        key: str,
        limit: int,
        window_s: float,
        max_wait_s: float = 60.0,
        safe_share: float = SAFE_SHARE,
        cut_factor: float = CUT_FACTOR,
        burst: int = 1,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self._redis = redis
        self._key = key
        window_ms = window_s * 1000
        self._window_ms = window_ms
        self._ceiling = limit * safe_share / window_ms  # calls per ms
        self._cut_factor = cut_factor
        self._floor = self._ceiling * FLOOR_SHARE
        self._quiet_ms = window_ms * QUIET_SHARE
        self._ttl_ms = math.ceil(window_ms * 10)
        self._max_wait_ms = max_wait_s * 1000
        self._max_wait_s = max_wait_s
        self._burst = max(1, burst)
        self._clock = clock  # seconds; None: the Redis server's clock
        self._sleep = sleep
        self._acquire = redis.register_script(_CLOCK + _ACQUIRE_SCRIPT)
        self._slow_down = redis.register_script(_CLOCK + _SLOW_DOWN_SCRIPT)

    @property
    def token_interval_s(self) -> float:
        """The spacing of calls at the ceiling rate."""
        return 1 / (self._ceiling * 1000)

    def _now_ms(self) -> int:
        return -1 if self._clock is None else int(self._clock() * 1000)

    async def acquire(self) -> Permit:
        """Wait for this caller's slot. Raises RateLimitUnavailable when none is free within `max_wait_s`, or at
        once if Redis is down, so the caller gives the work back to the queue instead of holding a worker slot."""
        reserved_at = -1
        while True:
            args = [self._ceiling, self._floor, RAISE_PER_CALL, self._quiet_ms, self._max_wait_ms, self._ttl_ms,
                    reserved_at, self._now_ms(), self._burst]  # fmt: skip
            try:
                wait_ms, now_ms, rate = await self._acquire(keys=[self._key], args=args)
            except (RedisError, OSError) as exc:
                raise RateLimitUnavailable(f"rate limiter unavailable: {type(exc).__name__}") from exc
            metrics.TWENTY_RATE.set(float(rate) * 60_000)
            if int(wait_ms) == 0:
                return Permit(int(now_ms))
            if int(wait_ms) < 0:
                raise RateLimitUnavailable(f"no Twenty call budget within {self._max_wait_s:g}s")
            reserved_at = int(now_ms)
            metrics.RATE_LIMIT_WAIT.inc(int(wait_ms) / 1000)
            await self._sleep(int(wait_ms) / 1000)

    async def slow_down(self, permit: Permit, pause_s: float | None) -> None:
        """Cut the shared rate after a 429 (once per episode) and pause every caller. A Redis error is ignored:
        the call is retried through acquire(), which reports it."""
        args = [permit.granted_ms, self._cut_factor, self._floor, (pause_s or 0.0) * 1000, self._ttl_ms, self._now_ms()]
        try:
            await self._slow_down(keys=[self._key], args=args)
        except (RedisError, OSError):
            return

    async def rate_per_window(self) -> float | None:
        """The current shared rate, in calls per window (None before the first call)."""
        rate = await self._redis.hget(self._key, "rate")  # type: ignore[misc]
        return None if rate is None else float(rate) * self._window_ms


RedisTokenBucket = AdaptiveRateLimit  # the name the composition root knew it by
