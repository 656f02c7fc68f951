"""Follow-up tasks: one open follow-up per person, written by the LLM (or the template), assigned from the load
cache, created in Twenty and linked to the person.

Exactly one, however the triggers race (duplicate webhooks, a lead's sync, a backfill): the person's slot is a
row in `follow_ups` under a partial unique index, taken before Twenty is called. The task's id is chosen with that
row and sent to Twenty with `upsert=true`, so a worker that dies after Twenty created the task but before the row
says so is repaired by the retry upserting the same task, not by a second task.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx

from reactor import assignees, store
from reactor import copywriter as llm
from reactor.loadcache import LoadCache, to_ms
from reactor.settings import Settings
from reactor.twenty import Person, TaskInput, TwentyClient, TwentyError, TwentyRejected

log = logging.getLogger("reactor.followups")

LLM_CONCURRENCY = 4
TRUST_OPEN_S = 600  # a follow-up opened this recently is taken as open without asking Twenty
LEAD_CONTEXT = ("employer", "employment_status", "years_employed", "salary_min", "salary_max", "current_credit",
                "vehicle_make", "vehicle_model", "vehicle_year", "source", "utm_campaign")  # fmt: skip


@dataclass(frozen=True)
class FollowUpDeps:
    db: asyncpg.Pool
    twenty: TwentyClient
    cache: LoadCache
    llm_http: httpx.AsyncClient
    settings: Settings

    @property
    def llm_config(self) -> llm.LlmConfig:
        s = self.settings
        return llm.LlmConfig(enabled=s.enable_llm_copywriting, url=s.ollama_url, model=s.ollama_model,
                             timeout_s=s.llm_timeout_s)  # fmt: skip


@dataclass
class Outcome:
    person_id: str
    status: str  # created | exists | person_gone | failed
    task_id: str | None = None
    assignee_id: str | None = None
    llm_used: bool = False
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class BatchOutcome:
    created: list[Outcome] = field(default_factory=list)
    failed: list[Outcome] = field(default_factory=list)
    skipped: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"created": len(self.created), "failed": len(self.failed), "skipped": self.skipped,
                "details": [o.as_dict() for o in [*self.created, *self.failed]]}  # fmt: skip


def title(person: Person) -> str:
    return f"📞 Sales Follow-up — {full_name(person)}"


def full_name(person: Person) -> str:
    name = " ".join(p for p in (person.name.first_name, person.name.last_name) if p) if person.name else ""
    return name or person.email or "new lead"


async def create_follow_up(deps: FollowUpDeps, person_id: str, *, person: Person | None = None) -> Outcome:
    """The person's follow-up: created, or `exists` when an open one is already there (a returning lead whose
    last follow-up is done gets a new one). Raises TwentyUnavailable for the job to retry."""
    for _ in range(2):
        task_id, target_id = str(uuid.uuid4()), str(uuid.uuid4())
        async with deps.db.acquire() as conn:
            taken = await store.begin_follow_up(conn, person_id, task_id=task_id, target_id=target_id)
            current = None if taken is not None else await store.current_follow_up(conn, person_id)
        if taken is not None:
            return await _create(deps, dict(taken), person)
        if current is None:
            continue  # freed between the two statements: take it now
        if current["state"] == "pending":
            age = dt.datetime.now(dt.UTC) - current["created_at"]
            if age.total_seconds() < store.STALE_PENDING_S:
                return Outcome(person_id, "exists", task_id=current["task_id"])
            log.info("followup.resume person=%s task=%s (left pending)", person_id, current["task_id"])
            return await _create(deps, dict(current), person)
        opened = current["opened_at"]
        recent = opened is not None and (dt.datetime.now(dt.UTC) - opened).total_seconds() < TRUST_OPEN_S
        if recent or await _still_open(deps.twenty, current["task_id"]):
            return Outcome(person_id, "exists", task_id=current["task_id"], assignee_id=current["assignee_id"])
        async with deps.db.acquire() as conn:  # done or deleted while its event was lost: the slot is free
            await store.close_follow_up(conn, current["task_id"])
    return Outcome(person_id, "exists")


async def _still_open(twenty: TwentyClient, task_id: str) -> bool:
    task = await twenty.get_task(task_id)
    return task is not None and task.deleted_at is None and task.status != "DONE"


async def _create(deps: FollowUpDeps, row: Mapping[str, Any], person: Person | None) -> Outcome:
    person_id, task_id = row["person_id"], row["task_id"]
    try:
        person = person or await deps.twenty.get_person(person_id)
    except TwentyError as exc:
        await _note(deps, task_id, exc)
        raise
    if person is None or person.deleted_at is not None:
        await _close(deps, task_id, "failed", "the person is not in Twenty (deleted?)")
        return Outcome(person_id, "person_gone", task_id=task_id)
    [task] = await _prepare(deps, [person], [task_id])
    try:
        created = await deps.twenty.create_task(task)
        await deps.twenty.create_task_target(task_id, person_id, target_id=row["target_id"])
    except TwentyRejected as exc:
        await deps.cache.release(task_id)
        await _close(deps, task_id, "failed", str(exc))
        return Outcome(person_id, "failed", task_id=task_id, error=str(exc))
    except TwentyError as exc:
        await deps.cache.release(task_id)
        await _note(deps, task_id, exc)
        raise
    await deps.cache.confirm(task_id, to_ms(created.updated_at) or to_ms(dt.datetime.now(dt.UTC)))
    async with deps.db.acquire() as conn:
        await store.open_follow_up(conn, task_id, assignee_id=task.assignee_id, llm_used=task.llm_used)
    log.info("followup.created person=%s task=%s assignee=%s llm=%s", person_id, task_id, task.assignee_id,
             task.llm_used)  # fmt: skip
    return Outcome(person_id, "created", task_id=task_id, assignee_id=task.assignee_id, llm_used=task.llm_used)


class _PreparedTask(TaskInput):
    llm_used: bool = False  # not sent: TaskInput.body() picks Twenty's fields by name


async def _prepare(deps: FollowUpDeps, people: Sequence[Person], task_ids: Sequence[str]) -> list[_PreparedTask]:
    """Pick an assignee and write the body of each task (the LLM a few at a time)."""
    limit = asyncio.Semaphore(LLM_CONCURRENCY)
    due = dt.datetime.now(dt.UTC) + dt.timedelta(hours=deps.settings.follow_up_due_hours)

    async def one(person: Person, task_id: str) -> _PreparedTask:
        chosen = await assignees.pick(deps.twenty, deps.cache, deps.settings, task_id)
        async with deps.db.acquire() as conn:
            lead = await store.lead_for_person(conn, person.id)
        context = llm.FollowUpContext(
            full_name=full_name(person), email=person.email,
            phone=person.phones.primary_phone_number if person.phones else None,
            job_title=person.job_title or (lead["job_title"] if lead else None),
            city=person.city or (lead["city"] if lead else None),
            lead={k: lead[k] for k in LEAD_CONTEXT if lead[k] is not None} if lead else None,
        )  # fmt: skip
        async with limit:
            copy = await llm.write_follow_up(deps.llm_http, deps.llm_config, context)
        return _PreparedTask(id=task_id, title=title(person), markdown=copy.markdown, status="TODO",
                             assignee_id=chosen.member_id if chosen else None, due_at=due,
                             llm_used=copy.llm_used)  # fmt: skip

    return list(await asyncio.gather(*(one(p, t) for p, t in zip(people, task_ids, strict=True))))


async def create_follow_ups(deps: FollowUpDeps, people: Sequence[Person]) -> BatchOutcome:
    """Follow-ups for many people through Twenty's batch endpoints: tasks, then task targets, `batch_size` a
    call. People who already have an open follow-up are skipped. Raises TwentyUnavailable (the job retries;
    rows left pending are resumed later)."""
    outcome = BatchOutcome()
    taken: list[tuple[Person, Mapping[str, Any]]] = []
    async with deps.db.acquire() as conn:
        for person in people:
            slot = await store.begin_follow_up(conn, person.id, task_id=str(uuid.uuid4()), target_id=str(uuid.uuid4()))
            if slot is None:
                outcome.skipped += 1
            else:
                taken.append((person, dict(slot)))
    size = deps.twenty.batch_size
    for start in range(0, len(taken), size):
        chunk = taken[start : start + size]
        tasks = await _prepare(deps, [p for p, _ in chunk], [r["task_id"] for _, r in chunk])
        try:
            created = await deps.twenty.create_tasks(tasks)
            await deps.twenty.create_task_targets([(r["target_id"], r["task_id"], p.id) for p, r in chunk])
        except TwentyRejected as exc:
            for (person, row), task in zip(chunk, tasks, strict=True):
                await deps.cache.release(row["task_id"])
                await _close(deps, row["task_id"], "failed", str(exc))
                outcome.failed.append(Outcome(person.id, "failed", task_id=task.id, error=str(exc)))
            continue
        except TwentyError:
            for _, row in taken[start:]:
                await deps.cache.release(row["task_id"])
            raise
        versions = {task.id: to_ms(task.updated_at) for task in created}
        for (person, row), task in zip(chunk, tasks, strict=True):
            await deps.cache.confirm(row["task_id"], versions.get(row["task_id"]) or to_ms(dt.datetime.now(dt.UTC)))
            async with deps.db.acquire() as conn:
                await store.open_follow_up(conn, row["task_id"], assignee_id=task.assignee_id, llm_used=task.llm_used)
            outcome.created.append(Outcome(person.id, "created", task_id=task.id, assignee_id=task.assignee_id,
                                           llm_used=task.llm_used))  # fmt: skip
    return outcome


async def _close(deps: FollowUpDeps, task_id: str, state: str, error: str) -> None:
    async with deps.db.acquire() as conn:
        await store.close_follow_up(conn, task_id, state=state, error=error)


async def _note(deps: FollowUpDeps, task_id: str, exc: Exception) -> None:
    async with deps.db.acquire() as conn:
        await store.note_follow_up_error(conn, task_id, str(exc))
