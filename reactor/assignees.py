"""Who gets a follow-up: the eligible workspace members (ASSIGNEE_EMAILS, ASSIGNEE_WEIGHTS), every member's load,
and the picks themselves — made with no CRM call.

A member's load = open tasks reactor did not create (the Redis cache, kept by task events) + reactor's own
follow-ups for them (rows in PostgreSQL, reservations included). Picks are made a batch at a time under a
PostgreSQL advisory lock, so every pick sees the ones before it, whichever worker made them; a pick is written as
the row's assignee before the lock is released, so it is the reservation, and nothing can leak.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg

from reactor import followup_store, lifecycle, routing
from reactor import store as lead_store
from reactor.loadcache import LoadCache, TaskState, to_ms
from reactor.settings import Settings
from reactor.twenty import OPEN_STATUSES, PAGE_SIZE, TwentyClient, WorkspaceMember, one_of

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
    await cache.set_members(eligible, {m.id: _display_name(m) for m in members},
                            {m.user_email.lower(): m.id for m in members if m.user_email})  # fmt: skip
    log.info("assign.members eligible=%d of=%d", len(eligible), len(members))
    return eligible


def _display_name(member: WorkspaceMember) -> str:
    name = " ".join(p for p in ((member.name.first_name, member.name.last_name) if member.name else ()) if p)
    return name or member.user_email or member.id


async def ensure_ready(twenty: TwentyClient, cache: LoadCache, db: asyncpg.Pool, settings: Settings) -> None:
    """Before the first pick of a process (or after Redis lost the cache): members read, foreign loads counted."""
    if await cache.is_built() and await cache.members():
        return
    async with _first_build:  # once per process, however many picks are waiting
        if not await cache.is_built():
            await refresh_members(twenty, cache, settings)
            await rebuild_loads(twenty, cache, db, settings)
        elif not await cache.members():
            await refresh_members(twenty, cache, settings)


async def member_loads(db: asyncpg.Pool, cache: LoadCache, settings: Settings) -> dict[str, int]:
    """member -> open load: the cache's count of other tasks plus reactor's own follow-ups."""
    foreign = await cache.counts()
    async with db.acquire() as conn:
        own = await followup_store.own_loads(conn, settings.load_statuses)
    return _add(foreign, own)


@dataclass(frozen=True)
class Assigned:
    members: dict[int, str]  # row id -> member
    waiting: list[int]  # rows nobody can take now


async def assign(cache: LoadCache, db: asyncpg.Pool, settings: Settings, rows: Sequence[Mapping[str, Any]], *,
                 exclude: dict[int, str] | None = None, rule_prefix: str = "", reserve: bool = True,
                 ) -> Assigned:  # fmt: skip
    """Choose the member of each row by the routing rules, write it as the row's assignee (its reservation;
    `reserve=False`: the caller writes it, as an SLA move does once Twenty has it), and store every decision.
    Rows nobody can take (and no fallback) are returned as waiting."""
    moment = dt.datetime.now(dt.UTC)
    weights = await cache.members()
    open_to, skipped = routing.candidates(weights, await routing.read_availability(db), settings, moment)
    fallback = None
    if settings.fallback_assignee_email:
        fallback = (await cache.member_ids_by_email()).get(settings.fallback_assignee_email)
    foreign = await cache.counts()
    members: dict[int, str] = {}
    waiting: list[int] = []
    decisions: list[dict[str, Any]] = []
    async with db.acquire() as conn, conn.transaction():
        await followup_store.lock_picks(conn)
        own = await followup_store.own_loads(conn, settings.load_statuses)
        last = await followup_store.last_assigned(conn)
        loads = {m: foreign.get(m, 0) + own.get(m, 0) for m in weights}
        for row in rows:
            candidates = dict(open_to)
            row_skipped = list(skipped)
            current = (exclude or {}).get(row["id"])
            if current is not None and current in candidates:
                weight, cap = candidates.pop(current)
                row_skipped.append(routing.Candidate(current, weight, cap, skipped="current_assignee"))
            [(choice, seen)] = lifecycle.pick_many(1, candidates, loads, last, now=time.time())
            member, rule = choice.member_id, choice.rule if choice.member_id else "none_available"
            if member is None and fallback is not None:
                member, rule = fallback, "fallback"
            if member is None:
                waiting.append(row["id"])
            else:
                members[row["id"]] = member
                loads[member] = loads.get(member, 0) + 1
                last[member] = time.time()
            listed = [routing.Candidate(m, w, c, load=seen.get(m), skipped="capped" if c and seen.get(m, 0) >= c
                                        else None) for m, (w, c) in candidates.items()] + row_skipped  # fmt: skip
            decisions.append({"person_id": row["person_id"], "task_id": row["task_id"], "member": member,
                              "rule": rule_prefix + rule, "candidates": [asdict(c) for c in listed]})  # fmt: skip
        if members and reserve:
            await followup_store.assign(conn, members)
        await lead_store.record_decisions(conn, decisions)  # one pipelined statement, not a round trip a row
    for d in decisions:
        log.info("assign.decided task=%s member=%s rule=%s candidates=%s", d["task_id"], d["member"], d["rule"],
                 json.dumps({c["member"]: c["skipped"] or c["load"] for c in d["candidates"]}))  # fmt: skip
    return Assigned(members, waiting)


@dataclass(frozen=True)
class Rebuilt:
    before: dict[str, int]  # member -> load before the rebuild
    after: dict[str, int]  # member -> load after it (with events that arrived meanwhile)
    unknown_tasks: int  # open tasks in Twenty the cache had never seen
    corrected: int  # cache entries and rows that were wrong (lost events)
    listed: int  # open tasks Twenty listed
    own_reopened: int = 0
    own_closed: int = 0

    @property
    def drift(self) -> dict[str, tuple[int, int]]:
        """member -> (before, after), for the members whose load was wrong."""
        members = self.before.keys() | self.after.keys()
        return {m: (self.before.get(m, 0), self.after.get(m, 0)) for m in sorted(members)
                if self.before.get(m, 0) != self.after.get(m, 0)}  # fmt: skip


async def rebuild_loads(twenty: TwentyClient, cache: LoadCache, db: asyncpg.Pool, settings: Settings, *,
                        apply: bool = True) -> Rebuilt:  # fmt: skip
    """Recount every member's load from Twenty's open tasks, a page (200) at a time: tasks reactor did not
    create go to the cache (a short script per page, keeping events that arrived meanwhile), reactor's own are
    checked against their rows (an open row whose task is no longer listed, and older than the listing, was closed
    while its event was lost). `apply=False` only compares."""
    started_ms = int(time.time() * 1000)
    async with db.acquire() as conn:
        own_before = await followup_store.own_loads(conn, settings.load_statuses)
    before = _add(own_before, await cache.counts())
    rebuild = cache.rebuild(uuid.uuid4().hex, started_ms, apply=apply)
    own_listed: set[str] = set()
    page: list[TaskState] = []
    statuses = tuple(dict.fromkeys((*settings.load_statuses, *OPEN_STATUSES)))

    async def flush() -> None:
        nonlocal page
        if not page:
            return
        async with db.acquire() as conn:
            ours = await followup_store.which_are_ours(conn, [t.task_id for t in page])
        own_listed.update(ours)
        await rebuild.add(t for t in page if t.task_id not in ours and cache.counts_as_load(t.status))
        page = []

    async for task in twenty.list_tasks(f"status[in]:{one_of(statuses)}"):
        page.append(TaskState(task.id, task.assignee_id, task.status, to_ms(task.updated_at)))
        if len(page) >= PAGE_SIZE:
            await flush()
    await flush()
    await rebuild.finish()
    async with db.acquire() as conn:
        rows = await followup_store.open_rows(conn)
        missing = [r["id"] for r in rows if r["task_id"] not in own_listed and r["event_version"] < started_ms]
        closed = await followup_store.close_missing(conn, missing) if apply and missing else len(missing)
    after = await member_loads(db, cache, settings) if apply else _add(own_before, rebuild.counts_from_listing or {})
    rebuilt = Rebuilt(before, after, rebuild.unknown, rebuild.corrected + closed, rebuild.listed, own_closed=closed)
    log.info("assign.loads_rebuilt tasks=%d drift=%s applied=%s", rebuild.listed, rebuilt.drift, apply)
    return rebuilt


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {m: a.get(m, 0) + b.get(m, 0) for m in a.keys() | b.keys() if a.get(m, 0) + b.get(m, 0)}
