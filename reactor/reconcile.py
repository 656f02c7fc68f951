"""Reconciliation: put the cache and the CRM back in step after lost webhooks, a paused subscription or downtime,
and report what was wrong. Safe while events flow; one run at a time.

Steps: refresh the workspace members; recount the loads from Twenty's open tasks page by page, keeping events that
arrived meanwhile, and close follow-ups whose task was done or deleted while its event was lost
(assignees.rebuild_loads); sync every waiting lead and finish every follow-up left owed (the drain's batches);
owe a follow-up where its trigger was lost.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.asyncio import Redis

from reactor import assignees, drain, followup_store, followups, metrics, store, subscription
from reactor.resources import Resources
from reactor.twenty import Person, TwentyClient, quoted

log = logging.getLogger("reactor.reconcile")

LOCK_KEY = "reactor:reconcile:lock"
LOCK_TTL_S = 3600  # a crashed run's lock frees itself; a live run renews it at every step
PROGRESS_TTL_S = 24 * 3600

Progress = Callable[[str, int, int | None], Awaitable[None]]

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


async def acquire(redis: Redis, run_id: str) -> str | None:
    """Take the reconcile lock for `run_id`. None when taken; else the id of the run that holds it."""
    if await redis.set(LOCK_KEY, run_id, nx=True, ex=LOCK_TTL_S):
        return None
    holder = await redis.get(LOCK_KEY)
    if holder is None:  # freed between the two calls
        return await acquire(redis, run_id)
    held = holder.decode() if isinstance(holder, bytes) else str(holder)
    return None if held == run_id else held


async def release(redis: Redis, run_id: str) -> None:
    await redis.eval(_RELEASE, 1, LOCK_KEY, run_id)  # type: ignore[misc]


def progress_key(run_id: str) -> str:
    return f"reactor:reconcile:progress:{run_id}"


async def read_progress(redis: Redis, run_id: str) -> dict[str, Any] | None:
    raw: dict[bytes, bytes] = await redis.hgetall(progress_key(run_id))  # type: ignore[misc]
    if not raw:
        return None
    data = {k.decode(): v.decode() for k, v in raw.items()}
    return {"step": data.get("step"), "done": int(data.get("done", 0)),
            "total": int(data["total"]) if data.get("total") else None}  # fmt: skip


@dataclass
class Report:
    dry_run: bool
    members: int = 0
    loads: dict[str, dict[str, int]] = field(default_factory=dict)  # member -> {cached, true}
    drift: dict[str, dict[str, int]] = field(default_factory=dict)  # the members whose load was wrong
    open_tasks: int = 0
    tasks_unknown_to_cache: int = 0
    cache_entries_corrected: int = 0
    leads_unsynced: int = 0
    leads_synced: int = 0
    leads_failed: int = 0
    people_without_follow_up: int = 0  # whose trigger was lost: synced by reactor, or created since the install
    follow_ups_created: int = 0
    follow_ups_failed: int = 0
    follow_ups_closed: int = 0  # their task was deleted or done in Twenty, and no event said so
    events_during_run: int = 0
    seconds: float = 0.0
    interrupted: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


INSTALLED_AT = "webhook_installed_at"


async def run(res: Resources, run_id: str, *, dry_run: bool = False, progress: Progress | None = None) -> Report:
    """One reconcile. The caller holds the lock for `run_id`.

    A follow-up is owed only where its trigger was lost: a person reactor synced from a lead who never had one,
    or a person created in Twenty since reactor's subscription was installed who never had one. A follow-up a
    rep completed or deleted stays done; historical contacts are left alone (POST /tasks/auto-assign is the
    command that covers them)."""
    assert res.twenty is not None, "reconcile needs Twenty configured"
    twenty, started = res.twenty, time.monotonic()
    report = Report(dry_run=dry_run)
    events_before = await res.cache.events_applied()

    async def step(name: str, done: int, total: int | None = None) -> None:
        await res.redis.hset(progress_key(run_id), mapping={"step": name, "done": done, "total": total or ""})  # type: ignore[misc]
        await res.redis.expire(progress_key(run_id), PROGRESS_TTL_S)
        await res.redis.eval(_RENEW, 1, LOCK_KEY, run_id, str(LOCK_TTL_S))  # type: ignore[misc]
        if progress is not None:
            await progress(name, done, total)

    await step("members", 0)
    if dry_run:
        report.members = len(await twenty.list_workspace_members())
    else:
        report.members = len(await assignees.refresh_members(twenty, res.cache, res.settings))

    await step("loads", 0)
    rebuilt = await assignees.rebuild_loads(twenty, res.cache, res.db, res.settings, apply=not dry_run)
    members = sorted(rebuilt.before.keys() | rebuilt.after.keys())
    report.loads = {m: {"cached": rebuilt.before.get(m, 0), "true": rebuilt.after.get(m, 0)} for m in members}
    report.drift = {m: {"cached": c, "true": t} for m, (c, t) in rebuilt.drift.items()}
    report.open_tasks = rebuilt.listed
    report.tasks_unknown_to_cache, report.cache_entries_corrected = rebuilt.unknown_tasks, rebuilt.corrected
    report.follow_ups_closed = rebuilt.own_closed

    async with res.db.acquire() as conn:
        report.leads_unsynced = await store.count_unsynced(conn)
    await step("leads", 0, report.leads_unsynced)
    if not dry_run and report.leads_unsynced:
        while True:
            pushed, outage = await drain.sync_leads(res)
            if pushed is not None:
                report.leads_synced += len(pushed.synced)
                report.leads_failed += len(pushed.rejected)
            if outage is not None:
                report.interrupted = str(outage)
            if pushed is None or outage is not None:
                break

    await step("follow_ups", 0)
    lost = await _lost_triggers(res, twenty)
    report.people_without_follow_up = len(lost)
    await step("follow_ups", 0, len(lost))
    if not dry_run:
        await followups.owe(res.db, lost, trigger="reconcile")
        rounds = await drain.until_idle(res)
        report.follow_ups_created = sum(len(r.follow_ups.opened) for r in rounds)
        report.follow_ups_failed = sum(len(r.follow_ups.failed) for r in rounds)
        report.interrupted = report.interrupted or next((str(r.unavailable) for r in rounds if r.unavailable), None)
        await step("follow_ups", len(lost), len(lost))

    report.events_during_run = await res.cache.events_applied() - events_before
    report.seconds = round(time.monotonic() - started, 2)
    last = report.as_dict() | {"run_id": run_id, "finished_at": time.time()}
    await res.redis.set(metrics.LAST_RECONCILE_KEY, json.dumps(last))  # for /metrics and the dashboard
    await step("done", 1, 1)
    log.info("reconcile.done run=%s dry_run=%s drift=%s leads_synced=%d follow_ups_created=%d closed=%d events=%d",
             run_id, dry_run, report.drift, report.leads_synced, report.follow_ups_created,
             report.follow_ups_closed, report.events_during_run)  # fmt: skip
    return report


async def _lost_triggers(res: Resources, twenty: TwentyClient) -> dict[str, Person | None]:
    """People owed a follow-up whose trigger never arrived (and who never had one)."""
    async with res.db.acquire() as conn:
        owed: dict[str, Person | None] = dict.fromkeys(await followup_store.synced_people_without_any(conn))
    installed = await installed_at(res, twenty)
    if installed is not None:
        since = installed.isoformat().replace("+00:00", "Z")
        recent = {p.id: p async for p in twenty.list_people(f"createdAt[gte]:{quoted(since)}")}
        async with res.db.acquire() as conn:
            covered = await followup_store.people_with_any(conn, list(recent))
        owed |= {pid: p for pid, p in recent.items() if pid not in covered}
    return owed


async def installed_at(res: Resources, twenty: TwentyClient) -> dt.datetime | None:
    """When reactor's webhook subscription was installed: remembered in PostgreSQL the first time it is seen
    (Twenty's subscription records it as createdAt)."""
    async with res.db.acquire() as conn:
        known = await followup_store.get_fact(conn, INSTALLED_AT)
    if known:
        return dt.datetime.fromisoformat(known)
    hooks = [h for h in await twenty.list_webhooks() if not subscription.covers(h) and h.created_at is not None]
    if not hooks:
        return None
    first = min(h.created_at for h in hooks if h.created_at is not None)
    async with res.db.acquire() as conn:
        await followup_store.set_fact(conn, INSTALLED_AT, first.isoformat(), keep_existing=True)
    return first


async def check(res: Resources) -> dict[str, dict[str, int]]:
    """Compare cached loads with Twenty's, in one groupBy call; changes nothing. member -> {cached, true}."""
    assert res.twenty is not None
    true_loads = await res.twenty.count_open_tasks_by_assignee(res.settings.load_statuses)
    cached = await assignees.member_loads(res.db, res.cache, res.settings)
    members = sorted(cached.keys() | {m for m in true_loads if m})
    return {m: {"cached": cached.get(m, 0), "true": true_loads.get(m, 0)} for m in members}


def parse_cron(expression: str) -> dict[str, set[int] | None]:
    """A five-field cron expression (minute hour day month weekday; numbers, lists, ranges, */n and *) as the
    keyword sets arq's cron() takes. Weekdays follow cron (0 or 7 = Sunday) and are converted to Python's."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError("RECONCILE_CRON needs five fields: minute hour day month weekday")
    bounds = [("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31), ("month", 1, 12), ("weekday", 0, 7)]
    parsed: dict[str, set[int] | None] = {}
    for text, (name, low, high) in zip(fields, bounds, strict=True):
        parsed[name] = None if text == "*" else _cron_field(text, low, high, name)
    if parsed["weekday"] is not None:
        parsed["weekday"] = {(day - 1) % 7 for day in parsed["weekday"]}
    return parsed


def _cron_field(text: str, low: int, high: int, name: str) -> set[int]:
    values: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if base == "*":
            start, stop = low, high
        elif "-" in base:
            start, stop = (int(x) for x in base.split("-", 1))
        else:
            start = stop = int(base)
        if not (low <= start <= stop <= high) or step < 1:
            raise ValueError(f"{name} {part!r} is outside {low}-{high}")
        values.update(range(start, stop + 1, step))
    return values


def summary_lines(report: Report) -> Sequence[str]:
    verb = "would" if report.dry_run else "did"
    lines = [f"members: {report.members}; open tasks in Twenty: {report.open_tasks}"]
    if report.drift:
        lines.append("load drift (cached -> true):")
        lines += [f"  {member}: {d['cached']} -> {d['true']}" for member, d in report.drift.items()]
    else:
        lines.append("load drift: none")
    lines += [
        f"tasks unknown to the cache: {report.tasks_unknown_to_cache}; entries corrected: "
        f"{report.cache_entries_corrected}",
        f"leads unsynced: {report.leads_unsynced}; synced: {report.leads_synced}; failed: {report.leads_failed}",
        f"people without a follow-up: {report.people_without_follow_up}; created: {report.follow_ups_created}; "
        f"failed: {report.follow_ups_failed}",
        f"follow-ups whose task was deleted or done ({verb} close): {report.follow_ups_closed}",
        f"task events during the run: {report.events_during_run}; {report.seconds}s"
        + (f"; interrupted: {report.interrupted}" if report.interrupted else ""),
    ]
    return lines
