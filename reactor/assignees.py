"""Who gets a follow-up: the eligible workspace members (ASSIGNEE_EMAILS, ASSIGNEE_WEIGHTS) and the pick itself,
made in the Redis load cache with no CRM call. Each pick is logged with the loads it saw."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import asyncpg

from reactor import routing
from reactor.loadcache import LoadCache, Rebuilt, TaskState, to_ms
from reactor.settings import Settings
from reactor.twenty import PAGE_SIZE, TwentyClient, WorkspaceMember, one_of

log = logging.getLogger("reactor.assign")
_first_build = asyncio.Lock()


async def refresh_members(twenty: TwentyClient, cache: LoadCache, settings: Settings) -> dict[str, float]:
    """Read the workspace members from Twenty and make the eligible ones pickable, with their weights."""
    members = await twenty.list_workspace_members()
    eligible: dict[str, float] = {}
    for member in members:
        email = (member.user_email or "").lower()
        if settings.assignee_emails and email not in settings.assignee_emails:
            continue
        eligible[member.id] = settings.assignee_weights.get(email, 1.0)
    missing = settings.assignee_emails - {(m.user_email or "").lower() for m in members}
    if missing:
        log.warning("assign.unknown_assignees emails=%s (not workspace members)", ",".join(sorted(missing)))
    await cache.set_members(eligible)
    await cache.set_names({m.id: _display_name(m) for m in members})
    await cache.set_emails({m.user_email.lower(): m.id for m in members if m.user_email})
    log.info("assign.members eligible=%d of=%d", len(eligible), len(members))
    return eligible


def _display_name(member: WorkspaceMember) -> str:
    name = " ".join(p for p in ((member.name.first_name, member.name.last_name) if member.name else ()) if p)
    return name or member.user_email or member.id


async def choose(
    twenty: TwentyClient, cache: LoadCache, db: asyncpg.Pool, settings: Settings, *, task_id: str,
    person_id: str | None, exclude: str | None = None, rule_prefix: str = "",
) -> routing.Decision:  # fmt: skip
    """Decide (and reserve, under the task's id) who takes a task, by the routing rules; no CRM call once the
    cache is built. The decision is logged and stored."""
    if not await cache.is_built():  # first use (or Redis was flushed): count the loads before choosing
        async with _first_build:  # once per process, however many picks are waiting
            if not await cache.is_built():
                await refresh_members(twenty, cache, settings)
                await rebuild_loads(twenty, cache, settings)
    if not await cache.members():
        await refresh_members(twenty, cache, settings)  # the members were never read
    return await routing.decide(cache, db, settings, task_id=task_id, person_id=person_id, exclude=exclude,
                                rule_prefix=rule_prefix)  # fmt: skip


async def rebuild_loads(twenty: TwentyClient, cache: LoadCache, settings: Settings, *, apply: bool = True) -> Rebuilt:
    """Recount every member's load from Twenty's open tasks, every page at Twenty's largest page size. Pages are
    staged in Redis as they come (memory stays one page), then merged with the live cache in one atomic swap
    that keeps every task event that arrived meanwhile. `apply=False` only compares."""
    staging = cache.staging(uuid.uuid4().hex, started_ms=int(time.time() * 1000))
    page: list[TaskState] = []
    async for task in twenty.list_tasks(f"status[in]:{one_of(settings.load_statuses)}"):
        page.append(TaskState(task.id, task.assignee_id, task.status, to_ms(task.updated_at)))
        if len(page) >= PAGE_SIZE:
            await staging.add(page)
            page = []
    await staging.add(page)
    rebuilt = await staging.swap(built_ms=int(time.time() * 1000), apply=apply)
    log.info("assign.loads_rebuilt tasks=%d drift=%s applied=%s", staging.staged, rebuilt.drift, apply)
    return rebuilt
