"""Dead letters: jobs that failed for good are kept in `failed_jobs`, listed, and replayed on demand."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import asyncpg
from arq.connections import ArqRedis

from reactor import jobs, store

log = logging.getLogger("reactor.deadletters")


async def record(
    db: asyncpg.Pool, *, job_name: str, job_id: str | None, args: list[Any], error: str, attempts: int
) -> None:
    async with db.acquire() as conn:
        await store.record_failed_job(conn, job_name=job_name, job_id=job_id, args=args, error=error, attempts=attempts)
    log.warning("job.dead_letter job=%s job_id=%s attempts=%d error=%s", job_name, job_id, attempts, error)


@dataclass(frozen=True)
class Replayed:
    failed_id: int
    job_name: str
    job_id: str | None
    enqueued: bool


async def replay(
    db: asyncpg.Pool, queue: ArqRedis, *, job_name: str | None = None, failed_id: int | None = None
) -> list[Replayed]:
    """Re-enqueue pending dead letters (all, one job name, or one row). Each row is taken once, even when
    two operators replay at the same moment."""
    async with db.acquire() as conn:
        rows = await store.take_failed_jobs(conn, job_name=job_name, failed_id=failed_id)
        for row in rows:
            if row["job_name"] == jobs.SYNC_LEAD:
                await store.retry_sync(conn, row["args"][0])
    replayed = []
    for row in rows:
        job = await jobs.enqueue(queue, row["job_name"], *row["args"], job_id=row["job_id"])
        replayed.append(Replayed(row["id"], row["job_name"], row["job_id"], enqueued=job is not None))
    return replayed
