"""Benchmark reactor's pace of Twenty calls against the simulator's copy of Twenty's legacy throttler (nominally
100 calls per 60 s; about 79 a minute accepted under load): a 400-lead backlog's follow-ups (a task and its
target each) by two worker processes of ten jobs, in virtual time, old and new design side by side.

* old: the token bucket reactor had before (TWENTY_RATE_LIMIT tokens, continuous refill, no learning);
* new: reactor.ratelimit.AdaptiveRateLimit (even spacing at 75 % of TWENTY_RATE_LIMIT, cut by a 429, raised
  again after a quiet spell), shared in Redis.

    .venv/bin/python -m bench.ratelimit [--leads 400] [--limits 100,1000] [--seeds 1,2,3]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from redis.asyncio import Redis

from bench.common import servers
from reactor.ratelimit import Permit
from reactor.sim.virtualtime import VirtualTime
from tests.test_ratelimit import KEY, adaptive, backlog


class OldTokenBucket:
    """The previous design, as its Lua script computed it: `limit` tokens refilled continuously over the window,
    shared by the fleet (one object here), deaf to 429s."""

    def __init__(self, time: VirtualTime, limit: int, window_s: float = 60.0) -> None:
        self._time, self._capacity, self._per_s = time, float(limit), limit / window_s
        self._tokens, self._at = float(limit), 0.0

    async def acquire(self) -> Permit:
        while True:
            now = self._time.now
            self._tokens = min(self._capacity, self._tokens + (now - self._at) * self._per_s)
            self._at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return Permit()
            await self._time.sleep(max(0.001, (1 - self._tokens) / self._per_s))  # whole ms, as Lua's ceil

    async def slow_down(self, permit: Permit, pause_s: float | None) -> None:
        return None


class OldFleet:
    """One old bucket for every process of the fleet, as it was one key in Redis."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._bucket: OldTokenBucket | None = None

    def __call__(self, redis: Redis, clock: VirtualTime) -> OldTokenBucket:
        if self._bucket is None:
            self._bucket = OldTokenBucket(clock, self._limit)
        return self._bucket


async def run(redis_url: str, leads: int, limits: list[int], seeds: list[int]) -> None:
    clients = [Redis.from_url(redis_url), Redis.from_url(redis_url)]
    print(f"{'design':<5} {'TWENTY_RATE_LIMIT':>17} {'seed':>4} {'calls':>6} {'429':>5} {'share':>6} "
          f"{'accepted/min':>12} {'minutes':>7} {'gave up':>7} {'wall s':>6}")  # fmt: skip
    try:
        for limit in limits:
            for seed in seeds:
                for design in ("old", "new"):
                    await clients[0].delete(KEY)
                    old = OldFleet(limit)

                    started = time.perf_counter()
                    out = await backlog(clients, old if design == "old" else adaptive(limit), leads=leads, seed=seed)
                    wall = time.perf_counter() - started
                    minutes = out["seconds"] / 60
                    accepted = (out["calls"] - out["429"]) / max(minutes, 1 / 60)
                    print(f"{design:<5} {limit:>17} {seed:>4} {out['calls']:>6} {out['429']:>5} "
                          f"{out['429'] / out['calls']:>6.1%} {accepted:>12.1f} {minutes:>7.1f} "
                          f"{out['gave_up']:>7} {wall:>6.1f}")  # fmt: skip
    finally:
        for client in clients:
            await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leads", type=int, default=400)
    parser.add_argument("--limits", default="100,1000", help="TWENTY_RATE_LIMIT values to try")
    parser.add_argument("--seeds", default="1,2,3", help="seeds of the latency randomness")
    parser.add_argument("--redis-db", type=int, default=10, help="a Redis database of your own")
    args = parser.parse_args()
    with servers() as (_, rd):
        head, _, tail = rd.url.rstrip("/").rpartition("/")
        url = f"{head if tail.isdigit() else rd.url.rstrip('/')}/{args.redis_db}"
        asyncio.run(run(url, args.leads, [int(v) for v in args.limits.split(",")],
                        [int(v) for v in args.seeds.split(",")]))  # fmt: skip


if __name__ == "__main__":
    main()
