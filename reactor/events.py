"""What reactor does with each Twenty event. Fast and CRM-call-free, so the webhook answers in milliseconds.

* An event of a task reactor created moves its follow-up row (lifecycle.transition: guarded by the task's
  version, so duplicates and late events change nothing). That row is what counts the task in its assignee's load,
  so the event of reactor's own `task.created` can never count it twice, whenever it arrives.
* An event of any other task updates the load cache.
* `person.created` owes the person a follow-up: a row the drain loop picks up (no job to lose).
"""

from __future__ import annotations

import logging

import asyncpg

from reactor import followup_store, lifecycle
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


async def handle(event: Event, *, db: asyncpg.Pool, cache: LoadCache) -> str:
    """Apply one (new, verified) event. Returns what was done, for the answer and the log."""
    if event.object_name == "task" and event.action in TASK_ACTIONS:
        return await _task_event(event, db, cache)
    if event.name == "person.created":
        async with db.acquire() as conn:
            owed = await followup_store.owe(conn, {event.record_id: event.record}, trigger="person_created")
        return "follow_up_owed" if owed else "follow_up_exists"
    return "ignored"


async def _task_event(event: Event, db: asyncpg.Pool, cache: LoadCache) -> str:
    state = task_state(event)
    restored, destroyed = event.action == "restored", event.action == "destroyed"
    async with db.acquire() as conn, conn.transaction():
        row = await followup_store.lock_by_task(conn, state.task_id)
        if row is not None:
            changes = lifecycle.transition(dict(row), state, restored=restored, destroyed=destroyed)
            if changes is None:
                return "stale"
            if await followup_store.apply_event(conn, row["id"], changes=changes):
                return f"follow_up_{changes.get('state', row['state'])}"
            # A reopened task of a person who has a newer follow-up: its row stays closed, the cache counts it.
    applied = await cache.apply(state, restore=restored, destroyed=destroyed)
    return "applied" if applied else "stale"
