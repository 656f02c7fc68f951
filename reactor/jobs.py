"""Job names, deterministic job ids, and enqueueing. The only module that knows how work is queued.

Only long jobs are arq jobs (the backlog push behind POST /sync-crm, auto-assign, reconcile); a lead's sync and a
follow-up are rows the drain loop takes. The names `sync_lead` and `create_follow_up` remain as dead-letter
kinds, so replaying one puts its row back in the drain's way.
"""

from __future__ import annotations

from arq.connections import ArqRedis
from arq.jobs import Job

SYNC_LEAD = "sync_lead"
SYNC_BACKLOG = "sync_backlog"
FOLLOW_UP = "create_follow_up"
AUTO_ASSIGN = "auto_assign"
RECONCILE = "reconcile"


def sync_lead_job_id(lead_id: str) -> str:
    return f"sync:{lead_id}"


def follow_up_job_id(person_id: str) -> str:
    return f"follow_up:{person_id}"


async def enqueue(queue: ArqRedis, name: str, *args: object, job_id: str | None = None) -> Job | None:
    """Queue a job; None when a job with that id is already queued, running, or has a kept result."""
    job: Job | None = await queue.enqueue_job(name, *args, _job_id=job_id)
    return job
