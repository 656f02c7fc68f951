"""The drain loop: the one write path to Twenty. Each worker runs one; any number of workers share the work
through leases taken with SKIP LOCKED.

Group commit, as a database's log writer does it: each round takes *everything* that is waiting, up to a batch,
and pushes it in one call per kind — the trash read and `POST /batch/people` for leads, `POST /batch/tasks` and
`POST /batch/taskTargets` for follow-ups. With nothing waiting, a single lead goes through at once; under a burst,
batches fill by themselves while the previous call is in flight. There is no timer to tune and no per-item job:
the rows in PostgreSQL are the work, and a lease that runs out (a killed worker) hands them to another loop.

A round never spends Twenty calls on retries into a 429: when Twenty cannot be asked, the rows are backed off and
the loop waits (Retry-After or its own backoff) before the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from reactor import deadletters, followup_store, followups, jobs, metrics, store, sync
from reactor.db import transaction_retrying_deadlocks
from reactor.followups import Worked
from reactor.resources import Resources
from reactor.twenty import Person, TwentyError, TwentyUnavailable

log = logging.getLogger("reactor.drain")

IDLE_POLL_S = 0.02  # how often an idle loop looks for work (one cheap query): bounds a lone lead's latency
SLA_SWEEP_S = 60.0
ERROR_PAUSE_MAX_S = 30.0


@dataclass
class Round:
    """What one round of the loop did."""

    leads_synced: int = 0
    leads_failed: int = 0
    follow_ups_owed: int = 0
    follow_ups: Worked = field(default_factory=Worked)
    unavailable: TwentyUnavailable | None = None

    @property
    def busy(self) -> bool:
        worked = self.follow_ups
        return bool(self.leads_synced or self.leads_failed or self.follow_ups_owed or worked.opened
                    or worked.failed or worked.waiting)  # fmt: skip


@contextlib.asynccontextmanager
async def _leased(res: Resources, renew: list[int], lead_ids: list[str]) -> AsyncIterator[None]:
    """Keep the round's leases alive while it runs (a call may wait a minute for a token), so the lease itself
    can be short: only a dead loop's lease runs out, and its work is taken again within SYNC_LEASE_S."""
    lease = res.settings.sync_lease_s

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(lease / 3)
            with contextlib.suppress(Exception):  # PostgreSQL away: the lease simply runs out, work is redone
                async with res.db.acquire() as conn:
                    if renew:
                        await followup_store.renew(conn, renew, lease_s=lease)
                    if lead_ids:
                        await store.renew_sync_leases(conn, lead_ids, lease_s=lease)

    task = asyncio.create_task(heartbeat())
    try:
        yield
    finally:
        task.cancel()


async def sync_leads(
    res: Resources, *, limit: int | None = None
) -> tuple[sync.Pushed | None, TwentyUnavailable | None]:
    """Claim the waiting leads (up to a batch) and push them in one batch: the People, then their follow-ups owed.
    Returns what was pushed (None: nothing waited) and the outage that stopped it, if any."""
    assert res.twenty is not None
    options = sync.SyncOptions.from_settings(res.settings)
    async with res.db.acquire() as conn:
        leads = [dict(r) for r in await store.claim_unsynced(conn, limit=limit or options.batch_size,
                                                              lease_s=res.settings.sync_lease_s)]  # fmt: skip
    if not leads:
        return None, None
    ids = [lead["lead_id"] for lead in leads]
    async with _leased(res, [], ids):
        try:
            pushed = await sync.push(leads, res.twenty, options)
        except TwentyError as exc:
            await sync.release(res.db, ids, exc)
            return None, exc if isinstance(exc, TwentyUnavailable) else None
    await sync.record(res.db, pushed)
    for outcome, count in (("synced", len(pushed.synced)), ("suppressed", len(pushed.suppressed)),
                           ("failed", len(pushed.rejected))):  # fmt: skip
        metrics.DRAINED.labels("lead", outcome).inc(count)
    for lead_id, error in pushed.rejected.items():
        await deadletters.record(res.db, job_name=jobs.SYNC_LEAD, job_id=jobs.sync_lead_job_id(lead_id),
                                 args=[lead_id], error=error, attempts=1)  # fmt: skip
    people: dict[str, Person | None] = {p.id: p for p in pushed.people}
    synced = {pid: people.get(pid) for pid in pushed.synced.values()}
    await followups.owe(res.db, synced, trigger="lead_sync")
    checked = list(pushed.synced)  # their submissions' follow-up check is this one
    await transaction_retrying_deadlocks(res.db, lambda conn: followup_store.mark_follow_up_checked(conn, checked),
                                         what="drain.follow_up_checked")  # fmt: skip
    return pushed, None


async def sync_all_leads(res: Resources) -> tuple[sync.Pushed, TwentyUnavailable | None]:
    """Rounds of `sync_leads` until no lead waits or Twenty cannot be asked (POST /sync-crm, bench/sync.py):
    what they pushed, together, and the outage that stopped them, if any."""
    total = sync.Pushed()
    while True:
        pushed, outage = await sync_leads(res)
        if pushed is not None:
            total.synced |= pushed.synced
            total.suppressed += pushed.suppressed
            total.rejected |= pushed.rejected
        if pushed is None or outage is not None:
            return total, outage


async def owe_for_returning_leads(res: Resources, *, limit: int = 200) -> int:
    """Leads submitted again since their follow-up was checked: their person gets one unless one is active."""
    async with res.db.acquire() as conn, conn.transaction():
        people = await followup_store.take_leads_owing_follow_up(conn, limit=limit)
        owed = await followup_store.owe(conn, dict.fromkeys(people), trigger="returning_lead") if people else []
    return len(owed)


async def work_follow_ups(res: Resources, *, limit: int | None = None) -> Worked:
    deps = res.follow_up_deps()
    async with res.db.acquire() as conn:
        rows = await followup_store.claim(conn, limit=limit or res.settings.twenty_batch_size,
                                          lease_s=res.settings.sync_lease_s)  # fmt: skip
    if not rows:
        return Worked()
    async with _leased(res, [r["id"] for r in rows], []):
        worked = await followups.work(deps, rows)
    for outcome, count in (("opened", len(worked.opened)), ("failed", len(worked.failed)),
                           ("waiting", worked.waiting)):  # fmt: skip
        metrics.DRAINED.labels("follow_up", outcome).inc(count)
    for person_id, error in worked.failed.items():
        await deadletters.record(res.db, job_name=jobs.FOLLOW_UP, job_id=jobs.follow_up_job_id(person_id),
                                 args=[person_id], error=error, attempts=1)  # fmt: skip
    return worked


async def run_round(res: Resources) -> Round:
    """One round: leads, then follow-ups owed by returning leads, then follow-up rows."""
    result = Round()
    pushed, outage = await sync_leads(res)
    if pushed is not None:
        result.leads_synced, result.leads_failed = len(pushed.synced), len(pushed.rejected)
    if outage is not None:
        result.unavailable = outage
        return result
    result.follow_ups_owed = await owe_for_returning_leads(res)
    result.follow_ups = await work_follow_ups(res)
    result.unavailable = result.follow_ups.unavailable
    return result


async def until_idle(res: Resources, *, max_rounds: int = 1000) -> list[Round]:
    """Run rounds until one finds nothing to do or Twenty cannot be asked (tests, POST /sync-crm, reconcile)."""
    rounds = []
    for _ in range(max_rounds):
        result = await run_round(res)
        rounds.append(result)
        if not result.busy or result.unavailable is not None:
            break
    return rounds


async def run_forever(res: Resources) -> None:
    """The worker's loop. Pauses after an outage (Twenty: Retry-After or backoff; PostgreSQL or Redis: backoff),
    never exits on one."""
    failures = outages = 0
    next_sla = 0.0
    while True:
        try:
            result = await run_round(res)
            if time.monotonic() >= next_sla and res.settings.follow_up_sla_hours and res.settings.max_reassignments:
                next_sla = time.monotonic() + SLA_SWEEP_S
                await followups.sla_sweep(res.follow_up_deps(), lease_s=res.settings.sync_lease_s)
            failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # PostgreSQL or Redis away, or a bug: log once per failure, back off, go on
            failures += 1
            pause = min(ERROR_PAUSE_MAX_S, 0.5 * 2**failures) * random.uniform(0.5, 1.0)
            log.warning("drain.paused error=%s: %s pause_s=%.1f", type(exc).__name__, exc, pause)
            await asyncio.sleep(pause)
            continue
        if result.unavailable is not None:
            outages += 1
            pause = max(result.unavailable.retry_after or 0.0, min(60.0, 2.0**outages) * random.uniform(0.5, 1.0))
            log.info("drain.waiting_for_twenty pause_s=%.1f error=%s", pause, result.unavailable)
            await asyncio.sleep(pause)
            continue
        outages = 0
        if not result.busy:
            await _until_work(res)


async def _until_work(res: Resources, *, at_most_s: float = 5.0) -> None:
    """Idle: look for work every IDLE_POLL_S with one cheap query, and run a full round at least every
    `at_most_s` anyway (e.g. a wait that ended)."""
    deadline = time.monotonic() + at_most_s
    while time.monotonic() < deadline:
        await asyncio.sleep(IDLE_POLL_S)
        async with res.db.acquire() as conn:
            if await followup_store.work_waiting(conn):
                return
