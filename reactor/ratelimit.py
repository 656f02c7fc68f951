"""A token bucket in Redis, shared by every process that calls Twenty, so a fleet of workers stays under
Twenty's per-workspace limit instead of feeding on 429s.

The bucket holds `limit` tokens and refills continuously at `limit / window_s` per second, like Twenty's own
throttler. Time comes from the Redis server (TIME), so clocks of different hosts never disagree about it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from reactor import metrics

# Returns 0 when a token was taken, else the milliseconds until one will be there.
_TAKE_OR_WAIT_SCRIPT = """
pcall(redis.replicate_commands)
local capacity = tonumber(ARGV[1])
local per_ms = tonumber(ARGV[2])
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now_ms
tokens = math.min(capacity, tokens + math.max(0, now_ms - at) * per_ms)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) / per_ms)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now_ms)
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / per_ms) + 1000)
return wait
"""


class RateLimitUnavailable(Exception):
    """No token could be had in time: the shared bucket is exhausted for too long, or Redis is unreachable."""


class Limiter(Protocol):
    async def acquire(self) -> None: ...


class Unlimited:
    async def acquire(self) -> None:
        return None


class RedisTokenBucket:
    def __init__(self, redis: Redis, *, key: str, limit: int, window_s: float, max_wait_s: float = 60.0) -> None:
        self._redis = redis
        self._key = key
        self._capacity = limit
        self._per_ms = limit / (window_s * 1000)
        self._max_wait_s = max_wait_s
        self._script = redis.register_script(_TAKE_OR_WAIT_SCRIPT)

    @property
    def token_interval_s(self) -> float:
        """How long the bucket takes to earn one token."""
        return 1 / (self._per_ms * 1000)

    async def acquire(self) -> None:
        """Wait for a token. Raises RateLimitUnavailable after `max_wait_s`, or at once if Redis is down, so
        the caller can give the work back to the queue instead of holding a worker slot."""
        deadline = time.monotonic() + self._max_wait_s
        while True:
            try:
                wait_ms = int(await self._script(keys=[self._key], args=[self._capacity, self._per_ms]))
            except (RedisError, OSError) as exc:
                raise RateLimitUnavailable(f"rate limiter unavailable: {type(exc).__name__}") from exc
            if wait_ms == 0:
                return
            if time.monotonic() + wait_ms / 1000 > deadline:
                raise RateLimitUnavailable(f"no Twenty call budget within {self._max_wait_s:g}s")
            metrics.RATE_LIMIT_WAIT.inc(wait_ms / 1000)
            await asyncio.sleep(wait_ms / 1000)
