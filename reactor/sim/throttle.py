"""The simulator's rate limiters: Twenty's legacy throttler as its source has it, and a kinder continuous bucket.

`LegacyThrottle` follows `ThrottlerService.tokenBucketThrottleOrThrow` (twenty-server
`engine/core-modules/throttler/throttler.service.ts`) as the record API calls it
(`common-base-query-runner.service`, `throttleQueryExecution`): per workspace, a short bucket (100 per 1 s) and
then a long one (`limit` per window), each call costing one token from each. A bucket holds whole tokens: the
refill is `floor(elapsed_ms * limit / window_ms)` since `lastRefillAt`, and `lastRefillAt` becomes *now* on every
accepted call, so the fraction earned so far is lost. A refused call changes nothing (the throw comes before the
write), except that the short bucket was already charged when the long one refuses. The stored state expires
after two windows (the cache TTL), which refills the bucket. Under steady load this accepts about 79 calls a
minute of a nominal 100 (`recorded/rest/64-…`, the recorded README).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

SHORT_LIMIT, SHORT_WINDOW_MS = 100, 1000  # API_RATE_LIMITING_SHORT_LIMIT / _SHORT_TTL_IN_MS defaults


class Throttle(Protocol):
    def take(self, limit: int, window_s: float) -> str | None: ...


@dataclass
class _Bucket:
    tokens: int = 0
    last_refill_ms: float | None = None


@dataclass
class LegacyThrottle:
    clock: Callable[[], float]  # seconds
    _short: _Bucket = field(default_factory=_Bucket)
    _long: _Bucket = field(default_factory=_Bucket)

    def take(self, limit: int, window_s: float) -> str | None:
        """None when the call is accepted, else the message of the bucket that refused it."""
        now_ms = self.clock() * 1000
        for bucket, max_tokens, window_ms in ((self._short, SHORT_LIMIT, SHORT_WINDOW_MS),
                                              (self._long, limit, window_s * 1000)):  # fmt: skip
            available = self._available(bucket, max_tokens, window_ms, now_ms)
            if available < 1:
                return f"Limit reached ({max_tokens} tokens per {window_ms:g} ms)"
            bucket.tokens, bucket.last_refill_ms = available - 1, now_ms
        return None

    @staticmethod
    def _available(bucket: _Bucket, max_tokens: int, window_ms: float, now_ms: float) -> int:
        if bucket.last_refill_ms is None or now_ms - bucket.last_refill_ms > 2 * window_ms:  # expired: full
            return max_tokens
        refill = math.floor((now_ms - bucket.last_refill_ms) * max_tokens / window_ms)
        return min(bucket.tokens + refill, max_tokens)


@dataclass
class ContinuousThrottle:
    """A bucket of `limit` tokens refilled continuously, keeping fractions: kinder than the legacy throttler
    (it accepts the full nominal rate), and the simulator's default when not imitating the 1.16-era server."""

    clock: Callable[[], float]
    tokens: float | None = None
    at: float = 0.0

    def take(self, limit: int, window_s: float) -> str | None:
        now_s = self.clock()
        tokens = limit if self.tokens is None else min(limit, self.tokens + (now_s - self.at) * limit / window_s)
        self.at = now_s
        if tokens < 1:
            self.tokens = tokens
            return f"Limit reached ({limit} tokens per {window_s * 1000:g} ms)"
        self.tokens = tokens - 1
        return None
