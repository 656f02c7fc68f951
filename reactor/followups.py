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
from arq.connections import ArqRedis

from reactor import assignees, jobs, store
from reactor import copywriter as llm
from reactor.loadcache import LoadCache, TaskState, to_ms
from reactor.settings import Settings
from reactor.twenty import Person, Task, TaskInput, TwentyClient, TwentyError, TwentyRejected

log = logging.getLogger("reactor.followups")

LLM_CONCURRENCY = 4
WAIT_FOR_MEMBER_S = 300  # when nobody is available, the follow-up is tried again this much later (by the sweep)
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
    queue: ArqRedis  # for the SLA checks

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
    waiting: int = 0  # nobody was available: tried again later

    def as_dict(self) -> dict[str, Any]:
        return {"created": len(self.created), "failed": len(self.failed), "skipped": self.skipped,
                "waiting": self.waiting,
                "details": [o.as_dict() for o in [*self.created, *self.failed]]}  # fmt: skip


def title(person: Person) -> str:
    return f"📞 Sales Follow-up — {full_name(person)}"


def full_name(person: Person) -> str:
    name = " ".join(p for p in (person.name.first_name, person.name.last_name) if p) if person.name else ""
    return name or person.email or "new lead"


async def create_follow_up(
    deps: FollowUpDeps, person_id: str, *, person: Person | None = None, resume: bool = False
) -> Outcome:
    """The person's follow-up: created, or `exists` when an open one is already there (a returning lead whose
    last follow-up is done gets a new one). `resume`: finish a pending one however young (reconcile).
    Raises TwentyUnavailable for the job to retry."""
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
            now = dt.datetime.now(dt.UTC)
            waiting = current["wait_until"]
            if waiting is not None and waiting > now:
                return Outcome(person_id, "waiting", task_id=current["task_id"])
            # A pending slot is another attempt in progress, unless it is old (its worker died) or its attempt
            # failed (last_error): then resuming it, with the same ids and the same reservation, is safe.
            young = (now - current["created_at"]).total_seconds() < store.STALE_PENDING_S
            if waiting is None and young and current["last_error"] is None and not resume:
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
    if task.waiting:
        await _wait(deps, task_id)
        return Outcome(person_id, "waiting", task_id=task_id)
    try:
        created = await deps.twenty.create_task(task)
    except TwentyRejected as exc:
        await deps.cache.release(task_id)
        await _close(deps, task_id, "failed", str(exc))
        return Outcome(person_id, "failed", task_id=task_id, error=str(exc))
    except TwentyError as exc:
        # The reservation stays: the retry upserts the same task for the same member (the pick returns it), so a
        # task Twenty created before the error is neither counted twice nor moved to someone else.
        await _note(deps, task_id, exc)
        raise
    try:
        await deps.twenty.create_task_target(task_id, person_id, target_id=row["target_id"])
    except TwentyRejected as exc:
        await deps.cache.confirm(task_id, to_ms(created.updated_at), task.assignee_id)  # the task does exist
        await _close(deps, task_id, "failed", f"the task exists but could not be linked: {exc}")
        return Outcome(person_id, "failed", task_id=task_id, error=str(exc))
    except TwentyError as exc:
        await _note(deps, task_id, exc)
        raise
    await _opened(deps, task_id, created, task)
    log.info("followup.created person=%s task=%s assignee=%s llm=%s", person_id, task_id, task.assignee_id,
             task.llm_used)  # fmt: skip
    return Outcome(person_id, "created", task_id=task_id, assignee_id=task.assignee_id, llm_used=task.llm_used)


class _PreparedTask(TaskInput):
    # Not sent: TaskInput.body() picks Twenty's fields by name.
    llm_used: bool = False
    waiting: bool = False  # nobody can take it now (and there is no fallback): try again later


async def _opened(deps: FollowUpDeps, task_id: str, created: Task, task: _PreparedTask) -> None:
    """Twenty has the task: the reservation becomes it, the row says so, and the SLA clock starts."""
    await deps.cache.confirm(task_id, to_ms(created.updated_at) or to_ms(dt.datetime.now(dt.UTC)), task.assignee_id)
    version = created.updated_at.isoformat() if created.updated_at else None
    async with deps.db.acquire() as conn:
        await store.open_follow_up(conn, task_id, assignee_id=task.assignee_id, llm_used=task.llm_used,
                                   task_version=version)  # fmt: skip
    if deps.settings.follow_up_sla_hours and deps.settings.max_reassignments:
        await jobs.schedule_sla_check(deps.queue, task_id, 0, deps.settings.follow_up_sla_hours)


async def _wait(deps: FollowUpDeps, task_id: str) -> None:
    async with deps.db.acquire() as conn:
        await store.wait_follow_up(conn, task_id, seconds=WAIT_FOR_MEMBER_S)
    log.info("followup.waiting task=%s (nobody available; tried again in %ds)", task_id, WAIT_FOR_MEMBER_S)


async def _prepare(deps: FollowUpDeps, people: Sequence[Person], task_ids: Sequence[str]) -> list[_PreparedTask]:
    """Pick an assignee and write the body of each task (the LLM a few at a time)."""
    limit = asyncio.Semaphore(LLM_CONCURRENCY)
    due = dt.datetime.now(dt.UTC) + dt.timedelta(hours=deps.settings.follow_up_due_hours)

    async def one(person: Person, task_id: str) -> _PreparedTask:
        chosen = await assignees.choose(deps.twenty, deps.cache, deps.db, deps.settings, task_id=task_id,
                                        person_id=person.id)  # fmt: skip
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
                             assignee_id=chosen.member_id, due_at=due, llm_used=copy.llm_used,
                             waiting=chosen.member_id is None and chosen.rule.endswith("none_available"))  # fmt: skip

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
        prepared = await _prepare(deps, [p for p, _ in taken[start : start + size]],
                                  [r["task_id"] for _, r in taken[start : start + size]])  # fmt: skip
        chunk, tasks = [], []
        for (person, row), task in zip(taken[start : start + size], prepared, strict=True):
            if task.waiting:
                await _wait(deps, row["task_id"])
                outcome.waiting += 1
            else:
                chunk.append((person, row))
                tasks.append(task)
        if not tasks:
            continue
        try:
            created = await deps.twenty.create_tasks(tasks)
        except TwentyRejected as exc:  # the batch failed as a whole: none of its tasks exists
            for (person, row), task in zip(chunk, tasks, strict=True):
                await deps.cache.release(row["task_id"])
                await _close(deps, row["task_id"], "failed", str(exc))
                outcome.failed.append(Outcome(person.id, "failed", task_id=task.id, error=str(exc)))
            continue
        # From here the tasks exist, and a TwentyUnavailable leaves their rows pending with their reservations:
        # resuming them (same ids, same members) finishes the job without a second task.
        await deps.twenty.create_task_targets([(r["target_id"], r["task_id"], p.id) for p, r in chunk])
        by_id = {task.id: task for task in created}
        for (person, row), task in zip(chunk, tasks, strict=True):
            twin = by_id.get(row["task_id"]) or Task(id=row["task_id"])
            await _opened(deps, row["task_id"], twin, task)
            outcome.created.append(Outcome(person.id, "created", task_id=task.id, assignee_id=task.assignee_id,
                                           llm_used=task.llm_used))  # fmt: skip
    return outcome


async def reassign_if_untouched(deps: FollowUpDeps, task_id: str, round_: int) -> str:
    """SLA round `round_` of a follow-up: if its task is untouched since our last write (same status, same
    assignee, same updatedAt), it goes to the next member by the same rules, the load moving with it, and its body
    says so. Idempotent: a round that already happened, or a task someone touched, changes nothing."""
    async with deps.db.acquire() as conn:
        row = await store.follow_up_by_task(conn, task_id)
    if row is None or row["state"] != "open" or row["reassignments"] != round_:
        return "not_due"
    task = await deps.twenty.get_task(task_id)
    version = task.updated_at.isoformat() if task and task.updated_at else None
    if (task is None or task.deleted_at is not None or task.status != "TODO" or task.assignee_id != row["assignee_id"]
            or version != row["task_version"]):  # fmt: skip
        return "touched"
    hours = deps.settings.follow_up_sla_hours
    reservation = f"sla:{task_id}:{round_}"
    decision = await assignees.choose(deps.twenty, deps.cache, deps.db, deps.settings, task_id=reservation,
                                      person_id=row["person_id"], exclude=row["assignee_id"],
                                      rule_prefix="sla_reassignment:")  # fmt: skip
    if decision.member_id is None:
        return "nobody_available"
    names = await deps.cache.names()
    previous, chosen = row["assignee_id"], decision.member_id
    note = (f"\n\n> Re-assigned from {names.get(previous, previous)} to {names.get(chosen, chosen)}: "
            f"untouched for {hours:g} h (SLA).")  # fmt: skip
    body = ((task.body_v2.markdown if task.body_v2 else None) or "") + note
    try:
        updated = await deps.twenty.update_task(task_id, TaskInput.model_construct(
            assignee_id=chosen, markdown=body, _fields_set={"assignee_id", "markdown"}))  # fmt: skip
    except TwentyError:
        await deps.cache.release(reservation)
        raise
    # The load moves: the reservation goes, and the task counts against its new assignee from this version on.
    await deps.cache.release(reservation)
    await deps.cache.apply(TaskState(task_id, chosen, updated.status or "TODO", to_ms(updated.updated_at)))
    new_version = updated.updated_at.isoformat() if updated.updated_at else None
    async with deps.db.acquire() as conn:
        await store.reassign_follow_up(conn, task_id, assignee_id=chosen, task_version=new_version)
    log.info("followup.reassigned task=%s from=%s to=%s round=%d", task_id, previous, chosen, round_ + 1)
    if round_ + 1 < deps.settings.max_reassignments:
        await jobs.schedule_sla_check(deps.queue, task_id, round_ + 1, hours)
    return "reassigned"


async def _close(deps: FollowUpDeps, task_id: str, state: str, error: str) -> None:
    async with deps.db.acquire() as conn:
        await store.close_follow_up(conn, task_id, state=state, error=error)


async def _note(deps: FollowUpDeps, task_id: str, exc: Exception) -> None:
    async with deps.db.acquire() as conn:
        await store.note_follow_up_error(conn, task_id, str(exc))
