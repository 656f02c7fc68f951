"""The composition root: the only code that opens pools and clients, once per process."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import httpx
from arq.connections import ArqRedis

from reactor.db import create_pool
from reactor.followups import FollowUpDeps
from reactor.intake import SubmissionWriter
from reactor.loadcache import LoadCache
from reactor.ratelimit import RedisTokenBucket
from reactor.settings import Settings
from reactor.twenty import TwentyClient, create_http_client


@dataclass(frozen=True)
class Resources:
    settings: Settings
    db: asyncpg.Pool
    redis: ArqRedis  # one client for the queue and everything else reactor keeps in Redis
    twenty: TwentyClient | None  # None when TWENTY_REST_URL/TOKEN are not set (intake still works)
    cache: LoadCache
    llm_http: httpx.AsyncClient  # to the local LLM (Ollama); each request carries its own timeout
    submissions: SubmissionWriter  # POST /leads' writes, batched while a burst lasts

    def follow_up_deps(self) -> FollowUpDeps:
        assert self.twenty is not None, "follow-ups need Twenty configured"
        return FollowUpDeps(db=self.db, twenty=self.twenty, cache=self.cache, llm_http=self.llm_http,
                            settings=self.settings)  # fmt: skip


def workspace_key(settings: Settings) -> str:
    """Names the Twenty workspace (its URL and token) without revealing the token: the load cache and the member
    list are kept per workspace, so a change of workspace never assigns to members of the previous one."""
    token = settings.twenty_rest_token.get_secret_value() if settings.twenty_rest_token else ""
    return hashlib.sha256(f"{settings.twenty_rest_url or ''}|{token}".encode()).hexdigest()[:16]


def twenty_bucket_key(token: str) -> str:
    """Twenty limits per workspace; the token names the workspace. Hashed: a key name is not a secret store."""
    return "reactor:twenty-rate:" + hashlib.sha256(token.encode()).hexdigest()[:16]


@contextlib.asynccontextmanager
async def open_resources(settings: Settings) -> AsyncIterator[Resources]:
    db = await create_pool(settings.postgres_dsn, size=settings.db_pool_size)
    # No ping here: intake must start and answer while Redis is down (the sweep catches up).
    redis = ArqRedis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
    twenty = None
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(db.close)
        stack.push_async_callback(redis.aclose)
        if settings.twenty_rest_url and settings.twenty_rest_token:
            token = settings.twenty_rest_token.get_secret_value()
            http = create_http_client(settings.twenty_rest_url, token)
            stack.push_async_callback(http.aclose)
            limiter = RedisTokenBucket(redis, key=twenty_bucket_key(token), limit=settings.twenty_rate_limit,
                                       window_s=settings.twenty_rate_window_s,
                                       burst=settings.twenty_rate_burst)  # fmt: skip
            twenty = TwentyClient(http, limiter=limiter, batch_size=settings.twenty_batch_size,
                                  max_attempts=settings.twenty_max_attempts,
                                  min_rate_limited_wait_s=limiter.token_interval_s)  # fmt: skip
        llm_http = httpx.AsyncClient(timeout=httpx.Timeout(settings.llm_timeout_s, connect=2.0))
        stack.push_async_callback(llm_http.aclose)
        cache = LoadCache(redis, load_statuses=settings.load_statuses, workspace=workspace_key(settings))
        submissions = SubmissionWriter(db)
        stack.push_async_callback(submissions.aclose)
        yield Resources(settings=settings, db=db, redis=redis, twenty=twenty, cache=cache, llm_http=llm_http,
                        submissions=submissions)  # fmt: skip
