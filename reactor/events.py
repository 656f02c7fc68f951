"""What reactor does with each Twenty event. Fast and CRM-call-free, so the webhook answers in milliseconds:
task events update the load cache (and close follow-ups that are done), `person.created` queues a follow-up."""

from __future__ import annotations

import logging

import asyncpg
from arq.connections import ArqRedis

from reactor import jobs, store
from reactor.loadcache import LoadCache, TaskState, to_ms
from reactor.webhooks import Event

log = logging.getLogger("reactor.events")

TASK_ACTIONS = {"created", "updated", "deleted", "restored", "destroyed"}


def task_state(event: Event) -> TaskState:
    record = event.record
    version = max(to_ms(record.get("updatedAt")), to_ms(record.get("deletedAt")))
    deleted = record.get("deletedAt") is not None or event.action in {"deleted", "destroyed"}
    return TaskState(
        task_id=event.record_id,
        assignee_id=record.get("assigneeId"),
        status=record.get("status"),
        version_ms=version,
        deleted=deleted,
        partial="status" not in record,  # very old servers sent only {id, deletedAt} on delete
    )


async def handle(event: Event, *, db: asyncpg.Pool, cache: LoadCache, queue: ArqRedis) -> str:
    """Apply one (new, verified) event. Returns what was done, for the answer and the log."""
    if event.object_name == "task" and event.action in TASK_ACTIONS:
        state = task_state(event)
        applied = await cache.apply(state, restore=event.action == "restored",
                                    destroyed=event.action == "destroyed")  # fmt: skip
        if state.deleted or state.status == "DONE":
            async with db.acquire() as conn:
                await store.close_follow_up(conn, state.task_id)
        return "applied" if applied else "stale"
    if event.name == "person.created":
        await jobs.enqueue_follow_up(queue, event.record_id, event.record)
        return "follow_up_queued"
    return "ignored"
