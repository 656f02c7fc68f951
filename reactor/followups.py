"""Follow-up tasks: the work the drain loop does on the follow-up rows it claimed, a batch at a time, and the SLA
sweep. One follow-up per person, written by the LLM (or the template), assigned with no CRM call, created in
Twenty and linked to the person.

A batch costs at most: one people look-up (only for rows owed without the Person record), one `POST /batch/tasks`
and one `POST /batch/taskTargets`. Every step is recorded on the rows before the next, and every record's id was
chosen with its row, so a crash or an outage anywhere is finished by the next claim (same ids, upserted), with no
second task and no orphan: a row stays `created` until its link exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx

from reactor import assignees, followup_store, lifecycle
from reactor import copywriter as llm
from reactor import store as lead_store
from reactor.loadcache import LoadCache, to_ms
from reactor.settings import Settings
from reactor.twenty import (
    Person,
    Task,
    TaskInput,
    TwentyClient,
    TwentyRejected,
    TwentyUnavailable,
    one_of,
)

log = logging.getLogger("reactor.followups")

LLM_CONCURRENCY = 4
WAIT_FOR_MEMBER_S = 300  # nobody available: the row is looked at again this much later
ID_CHUNK = 100  # ids per `id[in]` look-up: keeps the URL short
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
class Worked:
    """What one batch did."""

    opened: list[str] = field(default_factory=list)  # task ids linked and open
    failed: dict[str, str] = field(default_factory=dict)  # person id -> why (Twenty refused, person gone)
    waiting: int = 0
    unavailable: TwentyUnavailable | None = None  # Twenty could not be asked: the rest waits for a retry

    def as_dict(self) -> dict[str, Any]:
        return {"opened": len(self.opened), "failed": len(self.failed), "waiting": self.waiting,
                "unavailable": str(self.unavailable) if self.unavailable else None}  # fmt: skip


def title(person: Person) -> str:
    return f"📞 Sales Follow-up — {full_name(person)}"


def full_name(person: Person) -> str:
    name = " ".join(p for p in (person.name.first_name, person.name.last_name) if p) if person.name else ""
    return name or person.email or "new lead"


async def work(deps: FollowUpDeps, rows: Sequence[asyncpg.Record]) -> Worked:
    """Take claimed rows as far as they can go: assigned, written, created, linked. Never raises for Twenty:
    when it cannot be asked, the rows not yet done keep their state and are backed off (`unavailable` says so)."""
    done = Worked()
    claimed = [dict(r) for r in rows]
    try:
        await assignees.ensure_ready(deps.twenty, deps.cache, deps.db, deps.settings)
    except TwentyUnavailable as exc:
        await _back_off(deps, claimed, exc)
        done.unavailable = exc
        return done
    pending = [r for r in claimed if r["state"] == "pending"]
    linking = [r for r in claimed if r["state"] == "created"]
    try:
        pending = await _assign(deps, pending, done)
        pending = await _with_people(deps, pending, done)
        created = await _create_tasks(deps, pending, done)
        await _link(deps, [*linking, *created], done)
    except TwentyUnavailable as exc:
        async with deps.db.acquire() as conn:  # what was recorded stays; the rest is retried later
            fresh = await followup_store.unfinished(conn, [r["id"] for r in claimed])
        await _back_off(deps, [dict(r) for r in fresh], exc)
        done.unavailable = exc
    return done


async def _assign(deps: FollowUpDeps, rows: list[dict[str, Any]], done: Worked) -> list[dict[str, Any]]:
    """Decide availability before anything is fetched: rows nobody can take wait, at no CRM cost."""
    need = [r for r in rows if r["assignee_id"] is None]
    assigned = await assignees.assign(deps.cache, deps.db, deps.settings, need) if need else None
    if assigned and assigned.waiting:
        async with deps.db.acquire() as conn:
            await followup_store.wait(conn, assigned.waiting, seconds=WAIT_FOR_MEMBER_S)
        done.waiting += len(assigned.waiting)
        log.info("followup.waiting rows=%d (nobody available; looked at again in %ds)", len(assigned.waiting),
                 WAIT_FOR_MEMBER_S)  # fmt: skip
    out = []
    for row in rows:
        record = dict(row)
        if assigned and row["id"] in assigned.members:
            record["assignee_id"] = assigned.members[row["id"]]
        if record["assignee_id"] is not None:
            out.append(record)
    return out


async def _with_people(deps: FollowUpDeps, rows: list[dict[str, Any]], done: Worked) -> list[dict[str, Any]]:
    """Attach each row's Person: the record it was owed with, else one `id[in]` look-up per 100 rows."""
    unknown = [r["person_id"] for r in rows if not r["person"]]
    found: dict[str, Person] = {}
    for start in range(0, len(unknown), ID_CHUNK):
        chunk = unknown[start : start + ID_CHUNK]
        async for listed in deps.twenty.list_people(f"id[in]:{one_of(chunk)}"):
            found[listed.id] = listed
    if found:
        async with deps.db.acquire() as conn:
            await followup_store.remember_person(conn, {r["id"]: found[r["person_id"]].model_dump(
                by_alias=True, mode="json") for r in rows if r["person_id"] in found})  # fmt: skip
    out, gone = [], {}
    for row in rows:
        person = Person.model_validate(row["person"]) if row["person"] else found.get(row["person_id"])
        if person is None or person.deleted_at is not None:
            gone[row["id"]] = "the person is not in Twenty (deleted?)"
            done.failed[row["person_id"]] = gone[row["id"]]
        else:
            out.append(row | {"person_model": person})
    if gone:
        async with deps.db.acquire() as conn:
            await followup_store.fail(conn, gone)
    return out


class _PreparedTask(TaskInput):
    llm_used: bool = False  # not sent: TaskInput.body() picks Twenty's fields by name


async def _prepare(deps: FollowUpDeps, rows: Sequence[Mapping[str, Any]]) -> list[_PreparedTask]:
    limit = asyncio.Semaphore(LLM_CONCURRENCY)
    due = dt.datetime.now(dt.UTC) + dt.timedelta(hours=deps.settings.follow_up_due_hours)

    async with deps.db.acquire() as conn:
        leads = await lead_store.leads_for_people(conn, [row["person_model"].id for row in rows])

    async def one(row: Mapping[str, Any]) -> _PreparedTask:
        person: Person = row["person_model"]
        lead = leads.get(person.id)
        context = llm.FollowUpContext(
            full_name=full_name(person), email=person.email,
            phone=person.phones.primary_phone_number if person.phones else None,
            job_title=person.job_title or (lead["job_title"] if lead else None),
            city=person.city or (lead["city"] if lead else None),
            lead={k: lead[k] for k in LEAD_CONTEXT if lead[k] is not None} if lead else None,
        )  # fmt: skip
        async with limit:
            copy = await llm.write_follow_up(deps.llm_http, deps.llm_config, context)
        return _PreparedTask(id=row["task_id"], title=title(person), markdown=copy.markdown, status="TODO",
                             assignee_id=row["assignee_id"], due_at=due, llm_used=copy.llm_used)  # fmt: skip

    return list(await asyncio.gather(*(one(r) for r in rows)))


async def _create_tasks(deps: FollowUpDeps, rows: list[dict[str, Any]], done: Worked) -> list[dict[str, Any]]:
    """One `POST /batch/tasks` (upserts on the ids chosen with the rows). A refused batch is split in halves
    until the refused record is found; the others go through."""
    if not rows:
        return []
    tasks = await _prepare(deps, rows)
    made, refused = await _split_on_refusal(deps.twenty.create_tasks, tasks, key=lambda t: t.id or "")
    by_task = {t.id: t for t in made}
    rows_by_task = {r["task_id"]: r for r in rows}
    async with deps.db.acquire() as conn:
        if refused:
            await followup_store.fail(conn, {rows_by_task[t]["id"]: why for t, why in refused.items()})
        written = {}
        for task in tasks:
            if task.id in by_task or task.id not in refused:
                twin = by_task.get(task.id) or Task(id=task.id or "")
                version = to_ms(twin.updated_at) or int(time.time() * 1000)
                written[rows_by_task[task.id]["id"]] = (
                    version,
                    twin.status or "TODO",
                    twin.updated_at.isoformat() if twin.updated_at else None,
                )
        await followup_store.created(conn, written, llm_used={rows_by_task[t.id]["id"]: t.llm_used for t in tasks})
    for task_id, why in refused.items():
        done.failed[rows_by_task[task_id]["person_id"]] = why
        log.warning("followup.refused task=%s error=%s", task_id, why)
    return [r for r in rows if r["task_id"] not in refused]


async def _link(deps: FollowUpDeps, rows: Sequence[Mapping[str, Any]], done: Worked) -> None:
    """One `POST /batch/taskTargets`. A link Twenty refuses for good leaves no orphan: its task is deleted."""
    if not rows:
        return
    links = [(r["target_id"], r["task_id"], r["person_id"]) for r in rows]
    _, refused = await _split_on_refusal(deps.twenty.create_task_targets, links, key=lambda link: link[1])
    by_task = {r["task_id"]: r for r in rows}
    for task_id in refused:
        with contextlib.suppress(TwentyRejected):  # already gone
            await deps.twenty.delete_task(task_id)
    async with deps.db.acquire() as conn:
        if refused:
            await followup_store.fail(conn, {by_task[t]["id"]: f"the task could not be linked: {why}"
                                             for t, why in refused.items()})  # fmt: skip
        opened = await followup_store.opened(conn, [r["id"] for r in rows if r["task_id"] not in refused],
                                             sla_hours=_sla_hours(deps.settings))  # fmt: skip
    for row in opened:
        done.opened.append(row["task_id"])
        log.info("followup.created person=%s task=%s assignee=%s llm=%s", row["person_id"], row["task_id"],
                 row["assignee_id"], row["llm_used"])  # fmt: skip
    for task_id, why in refused.items():
        done.failed[by_task[task_id]["person_id"]] = why


def _sla_hours(settings: Settings) -> float:
    return settings.follow_up_sla_hours if settings.max_reassignments else 0.0


async def _split_on_refusal(call: Any, items: Sequence[Any], *, key: Any) -> tuple[list[Any], dict[str, str]]:
    """`call(items)`; when Twenty refuses the whole batch, the halves are tried (and so on), so only the refused
    records are left out. Returns (what Twenty answered, key -> Twenty's message for each refused record)."""
    try:
        return list(await call(items)), {}
    except TwentyRejected as exc:
        if len(items) == 1:
            return [], {key(items[0]): str(exc)}
    answered: list[Any] = []
    refused: dict[str, str] = {}
    for half in lifecycle.split(items):
        if half:
            got, bad = await _split_on_refusal(call, half, key=key)
            answered += got
            refused |= bad
    return answered, refused


async def _back_off(deps: FollowUpDeps, rows: Sequence[Mapping[str, Any]], exc: TwentyUnavailable) -> None:
    if not rows:
        return
    attempts = max(r["attempts"] for r in rows)
    delay = lifecycle.retry_delay(attempts, exc.retry_after, base_s=deps.settings.sync_retry_base_s)
    async with deps.db.acquire() as conn:
        await followup_store.back_off(conn, [r["id"] for r in rows], error=str(exc), delay_s=delay)
    log.warning("followup.deferred rows=%d delay_s=%.1f error=%s", len(rows), delay, exc)


# -- the SLA sweep ------------------------------------------------------------------------------------------


async def sla_sweep(deps: FollowUpDeps, *, lease_s: float, limit: int = ID_CHUNK) -> dict[str, int]:
    """Open follow-ups whose SLA is due: each untouched since reactor's last write (same status, assignee and
    updatedAt) goes to the next member by the same rules, its body saying so; a touched one leaves the SLA. A
    round is recorded once however many sweeps race (guarded by the round). Rows, not deferred jobs: a Redis
    restart loses nothing."""
    settings = deps.settings
    async with deps.db.acquire() as conn:
        due = await followup_store.claim_sla_due(conn, limit=limit, max_rounds=settings.max_reassignments,
                                                 lease_s=lease_s)  # fmt: skip
    outcome = {"reassigned": 0, "touched": 0, "nobody_available": 0}
    if not due:
        return outcome
    tasks = {t.id: t async for t in deps.twenty.list_tasks(f"id[in]:{one_of([r['task_id'] for r in due])}")}
    untouched: list[asyncpg.Record] = []
    touched: list[asyncpg.Record] = []
    for row in due:
        task = tasks.get(row["task_id"])
        version = task.updated_at.isoformat() if task and task.updated_at else None
        same = (task is not None and task.deleted_at is None and task.status == "TODO"
                and task.assignee_id == row["assignee_id"] and version == row["task_version"])  # fmt: skip
        (untouched if same else touched).append(row)
    async with deps.db.acquire() as conn:
        for row in touched:
            await followup_store.reassigned(
                conn,
                row["id"],
                round_=row["reassignments"],
                assignee_id=None,
                version_ms=row["event_version"],
                written=None,
                next_due_hours=None,
            )
    outcome["touched"] = len(touched)
    if not untouched:
        return outcome
    await assignees.ensure_ready(deps.twenty, deps.cache, deps.db, settings)
    choice = await assignees.assign(deps.cache, deps.db, settings, [dict(r) for r in untouched], reserve=False,
                                    exclude={r["id"]: r["assignee_id"] for r in untouched},
                                    rule_prefix="sla_reassignment:")  # fmt: skip
    names = await deps.cache.names()
    hours = settings.follow_up_sla_hours
    for row in untouched:
        chosen = choice.members.get(row["id"])
        if chosen is None:
            outcome["nobody_available"] += 1
            continue
        previous = row["assignee_id"]
        note = (f"\n\n> Re-assigned from {names.get(previous, previous)} to {names.get(chosen, chosen)}: "
                f"untouched for {hours:g} h (SLA).")  # fmt: skip
        task = tasks[row["task_id"]]
        body = ((task.body_v2.markdown if task.body_v2 else None) or "") + note
        try:
            updated = await deps.twenty.update_task(row["task_id"], TaskInput.model_construct(
                assignee_id=chosen, markdown=body, _fields_set={"assignee_id", "markdown"}))  # fmt: skip
        except TwentyRejected as exc:
            log.warning("followup.reassign_refused task=%s error=%s", row["task_id"], exc)
            continue
        round_ = row["reassignments"]
        more = round_ + 1 < settings.max_reassignments
        async with deps.db.acquire() as conn:
            await followup_store.reassigned(
                conn, row["id"], round_=round_, assignee_id=chosen, version_ms=to_ms(updated.updated_at),
                written=updated.updated_at.isoformat() if updated.updated_at else None,
                next_due_hours=hours if more else None)  # fmt: skip
        outcome["reassigned"] += 1
        log.info("followup.reassigned task=%s from=%s to=%s round=%d", row["task_id"], previous, chosen, round_ + 1)
    return outcome


async def owe(db: asyncpg.Pool, people: Mapping[str, Person | None], *, trigger: str) -> list[str]:
    """A pending follow-up for each person without an active one (race-free); the drain does the rest."""
    records = {pid: p.model_dump(by_alias=True, mode="json") if p else None for pid, p in people.items()}
    async with db.acquire() as conn:
        return await followup_store.owe(conn, records, trigger=trigger)
