"""The shared Twenty rate limit: a token bucket in the real Redis, shared by every process that uses it."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from reactor.devstack import free_port
from reactor.ratelimit import RateLimitUnavailable, RedisTokenBucket

pytestmark = pytest.mark.anyio


async def take_all(bucket: RedisTokenBucket) -> int:
    taken = 0
    while True:
        try:
            await bucket.acquire()
        except RateLimitUnavailable:
            return taken
        taken += 1


async def test_two_processes_share_one_budget(redis: Redis, redis_url: str) -> None:
    """Two clients (as two worker processes would be) draw on one bucket: together they get the limit, no more."""
    other = Redis.from_url(redis_url)
    try:
        buckets = [
            RedisTokenBucket(client, key="reactor:test-bucket", limit=30, window_s=600, max_wait_s=0.01)
            for client in (redis, other)
        ]
        taken = await asyncio.gather(*(take_all(bucket) for bucket in buckets))
    finally:
        await other.aclose()
    assert sum(taken) == 30
    assert all(count > 0 for count in taken)


async def test_a_waiting_caller_gets_the_next_token(redis: Redis) -> None:
    bucket = RedisTokenBucket(redis, key="reactor:test-refill", limit=2, window_s=0.2, max_wait_s=5)
    for _ in range(3):  # the third waits ~0.1 s for a refilled token instead of failing
        await bucket.acquire()
    assert bucket.token_interval_s == pytest.approx(0.1)


async def test_the_bucket_expires_when_idle(redis: Redis) -> None:
    bucket = RedisTokenBucket(redis, key="reactor:test-expiry", limit=100, window_s=60)
    await bucket.acquire()
    ttl_ms = await redis.pttl("reactor:test-expiry")
    assert 0 < ttl_ms <= 61_000


async def test_redis_down_is_unavailable_at_once() -> None:
    client = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    bucket = RedisTokenBucket(client, key="reactor:test-down", limit=10, window_s=1)
    with pytest.raises(RateLimitUnavailable, match="unavailable"):
        await bucket.acquire()
    await client.aclose()
