"""Dead letters: jobs that failed for good are kept in `failed_jobs`, listed, and replayed on demand."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import asyncpg
from arq.connections import ArqRedis

from reactor import followup_store, jobs, store

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
    """Put pending dead letters back to work (all, one job name, or one row): a lead Twenty refused becomes
    waiting again and a refused follow-up is owed again — both for the drain loop — and a long job is
    re-enqueued. Each row is taken once, even when two operators replay at the same moment."""
    async with db.acquire() as conn:
        rows = await store.take_failed_jobs(conn, job_name=job_name, failed_id=failed_id)
        for row in rows:
            if row["job_name"] == jobs.SYNC_LEAD:
                await store.retry_sync(conn, row["args"][0])
            elif row["job_name"] == jobs.FOLLOW_UP:
                await followup_store.owe(conn, {row["args"][0]: None}, trigger="replay")
    replayed = []
    for row in rows:
        if row["job_name"] in (jobs.SYNC_LEAD, jobs.FOLLOW_UP):
            replayed.append(Replayed(row["id"], row["job_name"], row["job_id"], enqueued=True))
            continue
        job = await jobs.enqueue(queue, row["job_name"], *row["args"], job_id=row["job_id"])
        replayed.append(Replayed(row["id"], row["job_name"], row["job_id"], enqueued=job is not None))
    return replayed
