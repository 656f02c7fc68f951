"""Job names, deterministic job ids, and enqueueing. The only module that knows how work is queued.

Jobs go out after the commit that makes them necessary, carry ids rather than objects, and have ids derived
from what they work on, so a second enqueue of the same work is refused by arq instead of running twice.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from arq.connections import ArqRedis
from arq.jobs import Job
from redis.exceptions import RedisError

log = logging.getLogger("reactor.jobs")

SYNC_LEAD = "sync_lead"
SYNC_BACKLOG = "sync_backlog"
FOLLOW_UP = "create_follow_up"
FOLLOW_UP_BATCH = "create_follow_ups"
AUTO_ASSIGN = "auto_assign"
RECONCILE = "reconcile"
SLA_CHECK = "sla_check"
ENQUEUE_TIMEOUT_S = 2.0


def sync_lead_job_id(lead_id: str) -> str:
    return f"sync:{lead_id}"


async def enqueue_sync_lead(queue: ArqRedis, lead_id: str) -> bool:
    """Queue the sync of one lead; False (logged) when Redis cannot take it.

    Never raises for Redis trouble: the lead is already committed as unsynced, and the periodic sweep syncs it,
    so intake keeps answering while Redis is down.
    """
    try:
        with anyio.fail_after(ENQUEUE_TIMEOUT_S):
            await queue.enqueue_job(SYNC_LEAD, lead_id, _job_id=sync_lead_job_id(lead_id))
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("jobs.enqueue_failed job=%s lead_id=%s error=%s (the sweep will sync it)",
                    SYNC_LEAD, lead_id, type(exc).__name__)  # fmt: skip
        return False
    return True


def follow_up_job_id(person_id: str) -> str:
    return f"follow_up:{person_id}"


async def enqueue_follow_up(queue: ArqRedis, person_id: str, person: dict[str, Any] | None = None) -> Job | None:
    """Queue the follow-up of one person (None: one is already queued or running). `person`: the Person record
    when the caller has it (a webhook does), which saves the job a call to Twenty."""
    args = (person_id, person) if person else (person_id,)
    return await enqueue(queue, FOLLOW_UP, *args, job_id=follow_up_job_id(person_id))


async def schedule_sla_check(queue: ArqRedis, task_id: str, round_: int, hours: float) -> None:
    """Look at the follow-up again in `hours`; its id makes scheduling one round twice harmless."""
    await queue.enqueue_job(SLA_CHECK, task_id, round_, _job_id=f"sla:{task_id}:{round_}", _defer_by=hours * 3600)


async def enqueue(queue: ArqRedis, name: str, *args: object, job_id: str | None = None) -> Job | None:
    """Queue a job; None when a job with that id is already queued, running, or has a kept result."""
    job: Job | None = await queue.enqueue_job(name, *args, _job_id=job_id)
    return job
